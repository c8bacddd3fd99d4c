/*
 * A connection's receive buffer: one block of memory, kept for the
 * connection's life, that a non-blocking socket is read into and a protocol
 * parser takes whole messages from. Unlike an evbuffer it allocates nothing
 * per read, so a steady stream of requests costs no heap calls.
 *
 * Threading: one owner on one loop. Errors: negative errnos.
 */
#ifndef TD_RXBUF_H
#define TD_RXBUF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct rxbuf {
	uint8_t *data;		/* NULL: not set up */
	size_t cap;
	size_t head, tail;	/* unread bytes are [head, tail) */
};

/* 0, or -ENOMEM. */
int rxbuf_init(struct rxbuf *rb, size_t cap);
void rxbuf_free(struct rxbuf *rb);

static inline size_t rxbuf_len(const struct rxbuf *rb) { return rb->tail - rb->head; }
static inline const uint8_t *rxbuf_peek(const struct rxbuf *rb) { return rb->data + rb->head; }
/* Marks n (<= rxbuf_len) bytes read. */
void rxbuf_consume(struct rxbuf *rb, size_t n);
/* Copies up to n bytes to dst and consumes them; returns how many. */
size_t rxbuf_take(struct rxbuf *rb, void *dst, size_t n);
/* Room after the unread bytes (moving them to the front first), to append into. */
uint8_t *rxbuf_space(struct rxbuf *rb, size_t *len);
void rxbuf_commit(struct rxbuf *rb, size_t n);
/*
 * One recv from fd into the room left: bytes read (> 0), 0 at end of
 * stream, -EAGAIN if nothing is there, -ENOBUFS if the buffer is full, or
 * the socket's -errno.
 */
ssize_t rxbuf_fill(struct rxbuf *rb, int fd);

#endif
