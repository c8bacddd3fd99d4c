/*
 * A connection's outgoing batch: the replies made during one loop turn
 * (small headers copied in, data buffers referenced), written with one
 * sendmsg when the turn ends. Steady-state replies cost no heap calls and
 * one system call per turn, not per reply. What the socket does not take
 * at once moves, in order, to an evbuffer that the caller's bufferevent
 * writes as the socket drains; that slow path may allocate.
 *
 * Ordering rule for the caller: while that evbuffer holds bytes, write
 * there directly, not into the batch (the batch goes out first).
 *
 * Threading: one owner on one loop. Errors: negative errnos.
 */
#ifndef TD_TXBATCH_H
#define TD_TXBATCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define TXB_IOV 64		/* pieces per batch */
#define TXB_BYTES 2048		/* copied bytes per batch */

struct evbuffer;

/* Gives a referenced buffer back once sent (evbuffer_ref_cleanup_cb's shape). */
typedef void txb_release_fn(const void *data, size_t len, void *arg);

struct txb_ref {
	txb_release_fn *release;	/* NULL: the piece is copied bytes */
	void *arg;
};

struct txbatch {
	struct iovec iov[TXB_IOV];
	struct txb_ref ref[TXB_IOV];
	unsigned n;
	size_t used;			/* of bytes */
	size_t length;			/* total of iov */
	uint8_t bytes[TXB_BYTES];
};

/* Copies len bytes in; -ENOSPC if they do not fit (flush, or write elsewhere). */
int txb_add(struct txbatch *b, const void *data, size_t len);
/* References data until sent, then calls release(data, len, arg); -ENOSPC if full. */
int txb_add_ref(struct txbatch *b, const void *data, size_t len, txb_release_fn *release,
		void *arg);
static inline size_t txb_length(const struct txbatch *b) { return b->length; }
/*
 * Sends the batch on fd (fd < 0: nothing is sent) and moves what was not
 * taken to out. Returns 0; -ENOMEM if out could not take it all; or the
 * socket's -errno (EAGAIN excepted). The batch is empty afterwards in every
 * case; on an error the stream has lost bytes: close the connection.
 */
int txb_flush(struct txbatch *b, int fd, struct evbuffer *out);
/* Releases every referenced buffer unsent (the socket is gone). */
void txb_drop(struct txbatch *b);
/*
 * evbuffer_add for the slow path's copied bytes. After a referenced buffer
 * (a read's data), evbuffer_add makes its new chain as large as that
 * buffer: up to 32 MiB for one reply header. This makes it len's size.
 * 0 or -ENOMEM.
 */
int txb_evbuffer_add(struct evbuffer *out, const void *data, size_t len);

#endif
