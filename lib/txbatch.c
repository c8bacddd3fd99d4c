/*
 * The outgoing batch (txbatch.h): adjacent copies share one iovec; a piece
 * the socket took only part of is handed to the evbuffer by reference,
 * with a small record that releases the whole buffer afterwards.
 */
#include "txbatch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>

int
txb_add(struct txbatch *b, const void *data, size_t len)
{
	if (len > TXB_BYTES - b->used)
		return -ENOSPC;
	uint8_t *p = b->bytes + b->used;
	struct iovec *last = b->n ? &b->iov[b->n - 1] : NULL;

	if (last && !b->ref[b->n - 1].release && (uint8_t *)last->iov_base + last->iov_len == p) {
		last->iov_len += len;
	} else {
		if (b->n == TXB_IOV)
			return -ENOSPC;
		b->iov[b->n] = (struct iovec){ p, 0 };
		b->ref[b->n] = (struct txb_ref){ NULL, NULL };
		b->iov[b->n++].iov_len = len;
	}
	memcpy(p, data, len);
	b->used += len;
	b->length += len;
	return 0;
}

int
txb_add_ref(struct txbatch *b, const void *data, size_t len, txb_release_fn *release, void *arg)
{
	if (b->n == TXB_IOV)
		return -ENOSPC;
	b->iov[b->n] = (struct iovec){ (void *)data, len };
	b->ref[b->n++] = (struct txb_ref){ release, arg };
	b->length += len;
	return 0;
}

static void
txb_reset(struct txbatch *b)
{
	b->n = 0;
	b->used = 0;
	b->length = 0;
}

static void
piece_release(struct txbatch *b, unsigned i)
{
	if (b->ref[i].release)
		b->ref[i].release(b->iov[i].iov_base, b->iov[i].iov_len, b->ref[i].arg);
}

void
txb_drop(struct txbatch *b)
{
	for (unsigned i = 0; i < b->n; i++)
		piece_release(b, i);
	txb_reset(b);
}

/* A piece sent in part: its tail goes by reference, the whole released after. */
struct tail_ref {
	struct iovec whole;
	struct txb_ref ref;
};

static void
tail_release(const void *data, size_t len, void *arg)
{
	struct tail_ref *t = arg;
	(void)data;
	(void)len;
	t->ref.release(t->whole.iov_base, t->whole.iov_len, t->ref.arg);
	free(t);
}

int
txb_evbuffer_add(struct evbuffer *out, const void *data, size_t len)
{
	struct evbuffer_iovec v;

	if (!len)
		return 0;
	/* reserve sizes a new chain to len (evbuffer_expand would not help: add ignores it) */
	if (evbuffer_reserve_space(out, (ev_ssize_t)len, &v, 1) < 1)
		return -ENOMEM;
	memcpy(v.iov_base, data, len);
	v.iov_len = len;
	return evbuffer_commit_space(out, &v, 1) < 0 ? -ENOMEM : 0;
}

/* Moves piece i, its first skip bytes sent, to out. */
static int
piece_spill(struct txbatch *b, unsigned i, size_t skip, struct evbuffer *out)
{
	const uint8_t *p = (const uint8_t *)b->iov[i].iov_base + skip;
	size_t len = b->iov[i].iov_len - skip;
	struct txb_ref *r = &b->ref[i];

	if (!r->release)
		return txb_evbuffer_add(out, p, len);
	if (!skip)
		return evbuffer_add_reference(out, p, len, r->release, r->arg) < 0 ? -ENOMEM : 0;
	struct tail_ref *t = malloc(sizeof(*t));
	if (!t)
		return -ENOMEM;
	*t = (struct tail_ref){ b->iov[i], *r };
	if (evbuffer_add_reference(out, p, len, tail_release, t) < 0) {
		free(t);
		return -ENOMEM;
	}
	return 0;
}

static ssize_t
txb_send(struct txbatch *b, int fd)
{
	struct msghdr msg = { .msg_iov = b->iov, .msg_iovlen = b->n };
	for (;;) {
		ssize_t n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n >= 0 || errno != EINTR)
			return n < 0 ? -errno : n;
	}
}

int
txb_flush(struct txbatch *b, int fd, struct evbuffer *out)
{
	ssize_t sent = 0;
	int err = 0;

	if (b->n && fd >= 0)
		sent = txb_send(b, fd);
	if (sent == -EAGAIN || sent == -EWOULDBLOCK)
		sent = 0;
	if (sent < 0) {
		txb_drop(b);
		return (int)sent;
	}
	for (unsigned i = 0; i < b->n; i++) {
		size_t len = b->iov[i].iov_len;
		if ((size_t)sent >= len) {
			sent -= (ssize_t)len;
			piece_release(b, i);
			continue;
		}
		if (!err)
			err = piece_spill(b, i, (size_t)sent, out);
		/* spilled, a reference is the evbuffer's to release */
		if (err)
			piece_release(b, i);
		sent = 0;
	}
	txb_reset(b);
	return err;
}
