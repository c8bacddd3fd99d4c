/*
 * The asynchronous I/O engine: the one place where the server touches a disk.
 * Two implementations behind one interface: io_uring (liburing) and a
 * portable thread pool. Completions always run on the event loop thread,
 * never inside io_submit().
 */
#ifndef TD_IO_H
#define TD_IO_H

#include <stdint.h>
#include <sys/uio.h>

#include "workq.h"

struct event_base;
struct io_engine;

enum io_opcode {
	IO_OP_READV,
	IO_OP_WRITEV,
	IO_OP_FDATASYNC,
	IO_OP_FALLOCATE,	/* mode: FALLOC_FL_* */
	IO_OP_FADVISE,		/* mode: POSIX_FADV_* */
};

/* Run fn on the loop's next turn: how synchronous drivers complete. */
struct io_defer {
	void (*fn)(struct io_defer *d);
	void *arg;
	struct io_defer *next;
};

/* The fd is memory (tmpfs): run the op on the loop, it cannot wait on a device. */
#define IO_F_MEMORY 0x1
/* The fd's filesystem may block io_uring's inline attempt (FUSE, network
 * filesystems): hand the op straight to the kernel's workers. */
#define IO_F_MAY_BLOCK 0x2

struct io_op {
	enum io_opcode opcode;
	unsigned flags;		/* IO_F_* */
	int fd;
	int mode;
	uint64_t offset;
	uint64_t length;	/* FALLOCATE, FADVISE */
	/*
	 * READV/WRITEV. The engine finishes short transfers itself and may
	 * advance iov in place to do so: pass an array the caller owns.
	 */
	struct iovec *iov;
	int iovcnt;
	/* res: bytes transferred (all of them) or 0, or -errno */
	void (*done)(struct io_op *op, int res);
	void *data;

	/* engine-private */
	struct io_defer defer;
	struct io_engine *engine;
	uint64_t xfer;		/* bytes done before a resubmission */
	int res;
	struct workq_item wq;
	struct io_op *next;
	uint64_t obs_id;	/* io_observe.h: 0 when not observed */
	int obs_short;		/* an observer made it a short write: ends with -ENOSPC */
};

/* A blocking function to run off the loop (open, close, lseek scans). */
struct io_call {
	int (*fn)(struct io_call *c);		/* worker thread; 0 or -errno */
	void (*done)(struct io_call *c, int res);	/* loop thread */
	void *arg;
	/* engine-private */
	int res;
	struct workq_item wq;
};

struct io_engine_stats {
	uint64_t submitted, completed, short_xfers, inflight;
};

/* name: "uring", "threads" or NULL (uring when the kernel has it). */
struct io_engine *io_engine_new(struct event_base *base, const char *name,
				 char *err, size_t errlen);
void io_engine_free(struct io_engine *e);
const char *io_engine_name(const struct io_engine *e);
/*
 * The loop the engine completes on: for a driver that watches a descriptor
 * of its own (a network connection). Its events are the loop thread's:
 * made, changed and freed there only.
 */
struct event_base *io_engine_base(const struct io_engine *e);
void io_engine_get_stats(const struct io_engine *e, struct io_engine_stats *st);

void io_submit(struct io_engine *e, struct io_op *op);
void io_call(struct io_engine *e, struct io_call *c);
void io_defer(struct io_engine *e, struct io_defer *d);

/* Executes one op synchronously (thread pool and fallbacks). 0/bytes or -errno. */
int io_op_run_sync(struct io_op *op);
/* Advances an iovec array past n bytes; returns the new start. */
struct iovec *io_iov_advance(struct iovec *iov, int *iovcnt, uint64_t n);

#endif
