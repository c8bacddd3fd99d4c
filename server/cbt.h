/*
 * A vbd's changed-block tracking: its CBT log (tapdisk's format,
 * docs/CBT-LOG.md) open while the vbd is, and the write-ahead rule: a
 * write, write-zeroes or discard goes down the chain only once the bits of
 * every 64 KiB block it touches are durable in the log (written and
 * fdatasync'd). Requests that find their bits missing wait; the bits of all
 * the requests waiting together go out in one log write and one fdatasync,
 * through the loop's I/O engine. Bits only ever go from 0 to 1.
 *
 * Ownership: the vbd owns its struct cbt. Threading: cbt_open, cbt_close
 * and cbt_resize block (workers, with no request of the vbd in flight);
 * everything else runs on the vbd's loop.
 */
#ifndef TD_CBT_H
#define TD_CBT_H

#include <stdint.h>
#include <sys/queue.h>
#include <sys/uio.h>

#include <jansson.h>

#include "cbt_file.h"

struct io_engine;
struct vbd_request;

struct cbt {
	char *path;
	struct cbt_file f;	/* f.bitmap: the bits durable in the log */
	uint8_t *want;		/* every bit asked for: durable, being written, or to write */
	uint8_t *shadow;	/* the bytes the log write in flight took (and older ones) */
	uint64_t bytes;		/* of each bitmap */
	uint64_t dirty;		/* bits set in want: blocks marked */
	uint64_t lo, hi;	/* bytes of want not yet given to a log write */
	uint64_t fl_lo, fl_hi;	/* the log write in flight */
	uint64_t started, done;	/* log writes (each with its sync) started and ended */
	int busy;
	unsigned nr_waiting;
	struct iovec iov;
	uint64_t log_writes, log_errors;	/* stats */
	struct io_engine *io;
	struct io_op *op;	/* the write, then the sync */
	TAILQ_HEAD(, vbd_request) waiting;	/* by the log write they need */
	/* a waiting request's bits are durable (err 0) or cannot be (errno) */
	void (*resume)(struct vbd_request *vr, int err);
};

/*
 * Worker: opens path for a disk of size bytes (rdonly: never written). A
 * writable log's consistent flag is cleared (and synced) until cbt_close.
 * -errno with one line in err: missing, damaged, or made for another size.
 */
int cbt_open(const char *path, uint64_t size, int rdonly, struct cbt **out, char *err,
	     size_t errlen);
/* Worker: the disk is now size bytes; the log grows (never shrinks: -EINVAL). */
int cbt_resize(struct cbt *c, uint64_t size, char *err, size_t errlen);
/* Worker, nothing in flight: a writable log is marked consistent and synced; frees c. */
int cbt_close(struct cbt *c);

/* Loop: from now on the log's writes go through io (the vbd's loop's engine). */
void cbt_attach(struct cbt *c, struct io_engine *io,
		void (*resume)(struct vbd_request *vr, int err));
/*
 * Loop: a write to [offset, offset + length) may go ahead now (0), or must
 * wait for its bits to reach the log (1: resume(vr, err) is called later,
 * from a completion, never from inside this call).
 */
int cbt_before_write(struct cbt *c, struct vbd_request *vr, uint64_t offset, uint64_t length);
/* Loop: whether block (64 KiB) is marked. */
int cbt_block_dirty(const struct cbt *c, uint64_t block);
json_t *cbt_stats_json(const struct cbt *c);

#endif
