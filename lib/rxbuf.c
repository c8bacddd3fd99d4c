/*
 * The receive buffer (rxbuf.h): compaction only when the room at the end
 * runs out, so a parser that keeps up never moves bytes.
 */
#include "rxbuf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int
rxbuf_init(struct rxbuf *rb, size_t cap)
{
	rb->data = malloc(cap);
	if (!rb->data)
		return -ENOMEM;
	rb->cap = cap;
	rb->head = rb->tail = 0;
	return 0;
}

void
rxbuf_free(struct rxbuf *rb)
{
	free(rb->data);
	rb->data = NULL;
	rb->cap = rb->head = rb->tail = 0;
}

void
rxbuf_consume(struct rxbuf *rb, size_t n)
{
	rb->head += n;
	if (rb->head == rb->tail)
		rb->head = rb->tail = 0;
}

size_t
rxbuf_take(struct rxbuf *rb, void *dst, size_t n)
{
	size_t len = rxbuf_len(rb);
	if (n > len)
		n = len;
	memcpy(dst, rxbuf_peek(rb), n);
	rxbuf_consume(rb, n);
	return n;
}

uint8_t *
rxbuf_space(struct rxbuf *rb, size_t *len)
{
	if (rb->head && rb->tail == rb->cap) {
		memmove(rb->data, rb->data + rb->head, rb->tail - rb->head);
		rb->tail -= rb->head;
		rb->head = 0;
	}
	*len = rb->cap - rb->tail;
	return rb->data + rb->tail;
}

void
rxbuf_commit(struct rxbuf *rb, size_t n)
{
	rb->tail += n;
}

ssize_t
rxbuf_fill(struct rxbuf *rb, int fd)
{
	size_t room;
	uint8_t *p = rxbuf_space(rb, &room);

	if (!room)
		return -ENOBUFS;
	for (;;) {
		ssize_t n = recv(fd, p, room, MSG_DONTWAIT);
		if (n >= 0) {
			rxbuf_commit(rb, (size_t)n);
			return n;
		}
		if (errno != EINTR)
			return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	}
}
