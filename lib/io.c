/*
 * Engine selection and what both engines share: synchronous execution of an
 * op (for the thread pool and for opcodes a kernel's io_uring lacks),
 * blocking calls on worker threads, and deferred completions.
 */
#include "io_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "container_of.h"
#include "io_observe.h"

/* the fuzz build takes 0 for both: no threads, everything on the loop, in order */
#ifndef IO_CALL_THREADS
#define IO_CALL_THREADS 2
#endif
#ifndef IO_POOL_THREADS
#define IO_POOL_THREADS 8
#endif
/* tmpfs ops this big are copies worth another CPU; smaller ones run inline */
#define IO_MEMORY_INLINE_MAX (64u << 10)

struct iovec *
io_iov_advance(struct iovec *iov, int *iovcnt, uint64_t n)
{
	while (n && *iovcnt) {
		if (n < iov->iov_len) {
			iov->iov_base = (char *)iov->iov_base + n;
			iov->iov_len -= n;
			return iov;
		}
		n -= iov->iov_len;
		iov++;
		(*iovcnt)--;
	}
	return iov;
}

static int
io_rw_sync(struct io_op *op)
{
	struct iovec *iov = op->iov;
	int cnt = op->iovcnt;
	uint64_t total = 0;

	while (cnt > 0) {
		ssize_t n;
		if (op->opcode == IO_OP_READV)
			n = preadv(op->fd, iov, cnt, (off_t)(op->offset + total));
		else
			n = pwritev(op->fd, iov, cnt, (off_t)(op->offset + total));
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;	/* the file shrank under us */
		total += (uint64_t)n;
		iov = io_iov_advance(iov, &cnt, (uint64_t)n);
		/* skip empty trailing entries */
		while (cnt > 0 && iov->iov_len == 0) {
			iov++;
			cnt--;
		}
	}
	return (int)(total > INT32_MAX ? INT32_MAX : total);
}

int
io_op_run_sync(struct io_op *op)
{
	switch (op->opcode) {
	case IO_OP_READV:
	case IO_OP_WRITEV:
		return io_rw_sync(op);
	case IO_OP_FDATASYNC:
		return fdatasync(op->fd) < 0 ? -errno : 0;
	case IO_OP_FALLOCATE:
#ifdef __linux__
		return fallocate(op->fd, op->mode, (off_t)op->offset,
				 (off_t)op->length) < 0 ? -errno : 0;
#else
		return -EOPNOTSUPP;
#endif
	case IO_OP_FADVISE:
		return -posix_fadvise(op->fd, (off_t)op->offset,
				      (off_t)op->length, op->mode);
	}
	return -EINVAL;
}

static uint64_t
io_op_bytes(const struct io_op *op)
{
	uint64_t n = 0;
	if (op->opcode != IO_OP_READV && op->opcode != IO_OP_WRITEV)
		return 0;
	for (int i = 0; i < op->iovcnt; i++)
		n += op->iov[i].iov_len;
	return n;
}

/* The observers' view of an op; 0 for ops they do not see (fadvise). */
static int
io_op_event(const struct io_op *op, struct io_obs_event *ev)
{
	static const enum io_obs_kind kinds[] = {
		[IO_OP_READV] = IO_OBS_READ, [IO_OP_WRITEV] = IO_OBS_WRITE,
		[IO_OP_FDATASYNC] = IO_OBS_FDATASYNC, [IO_OP_FALLOCATE] = IO_OBS_FALLOCATE,
	};
	if (op->opcode == IO_OP_FADVISE)
		return 0;
	*ev = (struct io_obs_event){ .kind = kinds[op->opcode], .fd = op->fd, .mode = op->mode,
				     .offset = op->offset, .length = op->length,
				     .iov = op->iov, .iovcnt = op->iovcnt, .id = op->obs_id };
	if (op->opcode == IO_OP_READV || op->opcode == IO_OP_WRITEV)
		ev->length = io_op_bytes(op);
	return 1;
}

void
io_op_complete(struct io_engine *e, struct io_op *op, int res)
{
	struct io_obs_event ev;
	if (op->obs_short && res >= 0)
		res = -ENOSPC;	/* an observer's short write: its first part landed */
	if (op->obs_id && io_op_event(op, &ev)) {
		ev.iov = NULL;		/* advanced by short transfers: no longer the data */
		io_obs_end(&ev, res);
	}
	e->stats.completed++;
	e->stats.inflight--;
	op->done(op, res);
}

static void
io_memory_done(struct io_defer *d)
{
	struct io_op *op = d->arg;
	io_op_complete(op->engine, op, op->res);
}

/* Cuts an iovec array down to its first n bytes (n less than its total). */
static void
io_iov_truncate(struct iovec *iov, int *iovcnt, uint64_t n)
{
	int i = 0;
	while (i < *iovcnt && n > iov[i].iov_len)
		n -= iov[i++].iov_len;
	iov[i].iov_len = (size_t)n;
	*iovcnt = i + 1;
}

/* Asks the observers about op; 0 to go on, or -errno to fail it instead. */
static int
io_op_observe(struct io_op *op)
{
	struct io_obs_event ev;
	op->obs_id = 0;
	op->obs_short = 0;
	if (!io_op_event(op, &ev))
		return 0;
	int rc = io_obs_begin(&ev);
	if (rc < 0)
		return rc;
	op->obs_id = ev.id;	/* their end comes at completion */
	if (rc > 0) {
		/* the iov is ours to change (io.h): the engine writes the first rc bytes */
		io_iov_truncate(op->iov, &op->iovcnt, (uint64_t)rc);
		op->obs_short = 1;
	}
	return 0;
}

void
io_submit(struct io_engine *e, struct io_op *op)
{
	op->engine = e;
	op->xfer = 0;
	op->obs_short = 0;
	e->stats.submitted++;
	e->stats.inflight++;
	if (io_observed) {
		int rc = io_op_observe(op);
		if (rc < 0) {
			op->res = rc;
			op->defer.fn = io_memory_done;	/* never inside io_submit */
			op->defer.arg = op;
			io_defer(e, &op->defer);
			return;
		}
	}
	if (op->flags & IO_F_MEMORY) {
		if (io_op_bytes(op) < IO_MEMORY_INLINE_MAX) {
			/* a small copy: doing it here beats a hand-off to another thread */
			op->res = io_op_run_sync(op);
			op->defer.fn = io_memory_done;
			op->defer.arg = op;
			io_defer(e, &op->defer);
			return;
		}
		/* a big one: another CPU copies while the loop serves sockets */
		op->flags |= IO_F_MAY_BLOCK;
	}
	e->ops->submit(e, op);
}

static void
io_call_run(struct workq_item *it)
{
	struct io_call *c = container_of(it, struct io_call, wq);
	c->res = c->fn(c);
}

static void
io_call_done(struct workq_item *it)
{
	struct io_call *c = container_of(it, struct io_call, wq);
	c->done(c, c->res);
}

void
io_call(struct io_engine *e, struct io_call *c)
{
	c->wq.run = io_call_run;
	c->wq.done = io_call_done;
	workq_push(e->calls, &c->wq);
}

static void
io_defer_run(evutil_socket_t fd, short what, void *arg)
{
	struct io_engine *e = arg;
	(void)fd;
	(void)what;

	/* Take the whole list: callbacks may defer more, for the next turn. */
	struct io_defer *d = e->defer_head;
	e->defer_head = NULL;
	e->defer_tail = &e->defer_head;
	while (d) {
		struct io_defer *next = d->next;
		d->fn(d);
		d = next;
	}
}

void
io_defer(struct io_engine *e, struct io_defer *d)
{
	d->next = NULL;
	if (!e->defer_head)
		event_active(e->defer_ev, 0, 0);
	*e->defer_tail = d;
	e->defer_tail = &d->next;
}

struct io_engine *
io_engine_new(struct event_base *base, const char *name, char *err, size_t errlen)
{
	struct io_engine *e = calloc(1, sizeof(*e));
	int rc = -EINVAL;

	if (!e) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	e->base = base;
	e->defer_tail = &e->defer_head;
	e->defer_ev = event_new(base, -1, 0, io_defer_run, e);
	e->calls = workq_new(base, IO_CALL_THREADS);
	if (!e->defer_ev || !e->calls) {
		snprintf(err, errlen, "cannot start the I/O engine: %s", strerror(errno));
		goto fail;
	}

	if (!name || strcmp(name, "uring") == 0) {
		rc = io_uring_engine_init(e);
		if (rc == 0)
			return e;
		if (name) {
			snprintf(err, errlen, "io_uring is not available: %s", strerror(-rc));
			goto fail;
		}
	}
	if (!name || strcmp(name, "threads") == 0) {
		rc = io_threads_engine_init(e, IO_POOL_THREADS);
		if (rc == 0)
			return e;
		snprintf(err, errlen, "cannot start I/O threads: %s", strerror(-rc));
		goto fail;
	}
	snprintf(err, errlen, "unknown I/O engine '%s' (uring or threads)", name);
fail:
	if (e->calls)
		workq_free(e->calls);
	if (e->defer_ev)
		event_free(e->defer_ev);
	free(e);
	return NULL;
}

void
io_engine_free(struct io_engine *e)
{
	if (!e)
		return;
	e->ops->free(e);
	workq_free(e->calls);
	event_free(e->defer_ev);
	free(e);
}

struct event_base *
io_engine_base(const struct io_engine *e)
{
	return e->base;
}

const char *
io_engine_name(const struct io_engine *e)
{
	return e->ops->name;
}

void
io_engine_get_stats(const struct io_engine *e, struct io_engine_stats *st)
{
	*st = e->stats;
}
