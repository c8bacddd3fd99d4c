/*
 * The io_uring engine. Submissions are batched: io_submit() only fills SQEs
 * and arms a one-shot "flush" event, so every op queued during one loop turn
 * goes to the kernel in one io_uring_submit(). Completions are signalled by
 * an eventfd registered with the ring and read by the loop. Opcodes the
 * running kernel lacks fall back to the engine's worker threads.
 */
#include "io_engine.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/event.h>
#include <liburing.h>

#include "container_of.h"
#include "log.h"

#define RING_ENTRIES 256
#define CQ_ENTRIES 4096

struct uring_impl {
	struct io_uring ring;
	int efd;
	struct event *cq_ev;
	struct event *flush_ev;
	int flush_armed;
	unsigned inflight;	/* ops owned by the kernel */
	struct io_op *backlog, **backlog_tail;	/* waiting for CQ room */
	int has_op[IORING_OP_LAST];
};

static void uring_reap(struct io_engine *e);

static int
uring_opcode(enum io_opcode op)
{
	switch (op) {
	case IO_OP_READV: return IORING_OP_READV;
	case IO_OP_WRITEV: return IORING_OP_WRITEV;
	case IO_OP_FDATASYNC: return IORING_OP_FSYNC;
	case IO_OP_FALLOCATE: return IORING_OP_FALLOCATE;
	case IO_OP_FADVISE: return IORING_OP_FADVISE;
	}
	return -1;
}

static void
uring_arm_flush(struct uring_impl *u)
{
	if (!u->flush_armed) {
		u->flush_armed = 1;
		event_active(u->flush_ev, 0, 0);
	}
}

/* Puts one op on the SQ; returns 0, or -EBUSY when the CQ has no room. */
static int
uring_queue(struct io_engine *e, struct io_op *op)
{
	struct uring_impl *u = e->impl;
	struct io_uring_sqe *sqe;

	if (u->inflight >= CQ_ENTRIES)
		return -EBUSY;
	sqe = io_uring_get_sqe(&u->ring);
	if (!sqe) {
		io_uring_submit(&u->ring);
		sqe = io_uring_get_sqe(&u->ring);
		if (!sqe)
			return -EBUSY;
	}
	switch (op->opcode) {
	case IO_OP_READV:
		io_uring_prep_readv(sqe, op->fd, op->iov, (unsigned)op->iovcnt,
				    op->offset + op->xfer);
		break;
	case IO_OP_WRITEV:
		io_uring_prep_writev(sqe, op->fd, op->iov, (unsigned)op->iovcnt,
				     op->offset + op->xfer);
		break;
	case IO_OP_FDATASYNC:
		io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
		break;
	case IO_OP_FALLOCATE:
		io_uring_prep_fallocate(sqe, op->fd, op->mode, op->offset, op->length);
		break;
	case IO_OP_FADVISE:
		io_uring_prep_fadvise(sqe, op->fd, op->offset, (off_t)op->length, op->mode);
		break;
	}
	if (op->flags & IO_F_MAY_BLOCK)
		sqe->flags |= IOSQE_ASYNC;
	io_uring_sqe_set_data(sqe, op);
	u->inflight++;
	uring_arm_flush(u);
	return 0;
}

/* Ops the kernel's ring cannot do run on a worker thread. */
static void
fallback_run(struct workq_item *it)
{
	struct io_op *op = container_of(it, struct io_op, wq);
	op->res = io_op_run_sync(op);
}

static void
fallback_done(struct workq_item *it)
{
	struct io_op *op = container_of(it, struct io_op, wq);
	io_op_complete(op->engine, op, op->res);
}

/* Queues op, or parks it until completions make room. */
static void
uring_queue_or_park(struct io_engine *e, struct io_op *op)
{
	struct uring_impl *u = e->impl;

	if (u->backlog || uring_queue(e, op) < 0) {
		op->next = NULL;
		*u->backlog_tail = op;
		u->backlog_tail = &op->next;
	}
}

static void
uring_submit(struct io_engine *e, struct io_op *op)
{
	struct uring_impl *u = e->impl;

	if (!u->has_op[uring_opcode(op->opcode)]) {
		op->wq.run = fallback_run;
		op->wq.done = fallback_done;
		workq_push(e->calls, &op->wq);
		return;
	}
	uring_queue_or_park(e, op);
}

static void
uring_drain_backlog(struct io_engine *e)
{
	struct uring_impl *u = e->impl;

	while (u->backlog) {
		struct io_op *op = u->backlog;
		if (uring_queue(e, op) < 0)
			return;
		u->backlog = op->next;
		if (!u->backlog)
			u->backlog_tail = &u->backlog;
	}
}

static void
uring_flush(evutil_socket_t fd, short what, void *arg)
{
	struct io_engine *e = arg;
	struct uring_impl *u = e->impl;
	(void)fd;
	(void)what;

	u->flush_armed = 0;
	int rc;
	do
		rc = io_uring_submit(&u->ring);
	while (rc == -EINTR);
	if (rc < 0 && rc != -EAGAIN && rc != -EBUSY)
		log_err("io_uring_submit: %s", strerror(-rc));
	/* The kernel may complete inline; look now rather than a turn later. */
	uring_reap(e);
}

/* Handles one CQE: completes the op, or requeues the rest of a short transfer. */
static void
uring_finish(struct io_engine *e, struct io_op *op, int res)
{
	if (res == -EINTR || res == -EAGAIN) {
		uring_queue_or_park(e, op);
		return;
	}
	if ((op->opcode == IO_OP_READV || op->opcode == IO_OP_WRITEV) && res >= 0) {
		uint64_t want = 0;
		for (int i = 0; i < op->iovcnt; i++)
			want += op->iov[i].iov_len;
		if (res == 0 && want) {
			res = -EIO;	/* the file shrank under us */
		} else if ((uint64_t)res < want) {
			e->stats.short_xfers++;
			op->xfer += (uint64_t)res;
			op->iov = io_iov_advance(op->iov, &op->iovcnt, (uint64_t)res);
			uring_queue_or_park(e, op);
			return;
		} else {
			op->xfer += (uint64_t)res;
			res = (int)(op->xfer > INT32_MAX ? INT32_MAX : op->xfer);
		}
	} else if (res > 0) {
		res = 0;
	}
	io_op_complete(e, op, res);
}

static void
uring_reap(struct io_engine *e)
{
	struct uring_impl *u = e->impl;
	struct io_uring_cqe *cqe;

	for (;;) {
		unsigned head, n = 0;
		io_uring_for_each_cqe(&u->ring, head, cqe) {
			struct io_op *op = io_uring_cqe_get_data(cqe);
			int res = cqe->res;
			n++;
			u->inflight--;
			uring_finish(e, op, res);
		}
		if (!n)
			break;
		io_uring_cq_advance(&u->ring, n);
		uring_drain_backlog(e);
	}
}

static void
uring_on_event(evutil_socket_t fd, short what, void *arg)
{
	uint64_t v;
	(void)what;
	while (read(fd, &v, sizeof(v)) < 0 && errno == EINTR)
		;
	uring_reap(arg);
}

static void
uring_free(struct io_engine *e)
{
	struct uring_impl *u = e->impl;

	/* Pending ops cannot be abandoned while the kernel owns their buffers. */
	while (u->inflight) {
		struct io_uring_cqe *cqe;
		io_uring_submit(&u->ring);
		if (io_uring_wait_cqe(&u->ring, &cqe) < 0)
			break;
		uring_reap(e);
	}
	event_free(u->cq_ev);
	event_free(u->flush_ev);
	io_uring_unregister_eventfd(&u->ring);
	io_uring_queue_exit(&u->ring);
	close(u->efd);
	free(u);
}

static const struct io_engine_ops uring_ops = {
	.name = "uring",
	.submit = uring_submit,
	.free = uring_free,
};

static int
uring_setup(struct io_uring *ring)
{
	struct io_uring_params p;
	/* Newer flags first; older kernels refuse them with EINVAL. */
	static const unsigned flag_sets[] = {
		IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN,
		IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN,
		IORING_SETUP_CQSIZE,
	};
	int rc = -EINVAL;

	for (unsigned i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
		memset(&p, 0, sizeof(p));
		p.flags = flag_sets[i];
		p.cq_entries = CQ_ENTRIES;
		rc = io_uring_queue_init_params(RING_ENTRIES, ring, &p);
		if (rc != -EINVAL)
			return rc;
	}
	return rc;
}

int
io_uring_engine_init(struct io_engine *e)
{
	struct uring_impl *u = calloc(1, sizeof(*u));
	int rc;

	if (!u)
		return -ENOMEM;
	u->backlog_tail = &u->backlog;
	rc = uring_setup(&u->ring);
	if (rc < 0) {
		free(u);
		return rc;
	}
	struct io_uring_probe *probe = io_uring_get_probe_ring(&u->ring);
	if (probe) {
		for (int op = 0; op < IORING_OP_LAST; op++)
			u->has_op[op] = io_uring_opcode_supported(probe, op);
		io_uring_free_probe(probe);
	}
	if (!u->has_op[IORING_OP_READV] || !u->has_op[IORING_OP_WRITEV]) {
		rc = -ENOSYS;
		goto fail_ring;
	}
	u->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (u->efd < 0) {
		rc = -errno;
		goto fail_ring;
	}
	rc = io_uring_register_eventfd(&u->ring, u->efd);
	if (rc < 0)
		goto fail_efd;
	u->cq_ev = event_new(e->base, u->efd, EV_READ | EV_PERSIST, uring_on_event, e);
	u->flush_ev = event_new(e->base, -1, 0, uring_flush, e);
	if (!u->cq_ev || !u->flush_ev || event_add(u->cq_ev, NULL) < 0) {
		rc = -ENOMEM;
		goto fail_ev;
	}
	e->impl = u;
	e->ops = &uring_ops;
	return 0;
fail_ev:
	if (u->cq_ev)
		event_free(u->cq_ev);
	if (u->flush_ev)
		event_free(u->flush_ev);
	io_uring_unregister_eventfd(&u->ring);
fail_efd:
	close(u->efd);
fail_ring:
	io_uring_queue_exit(&u->ring);
	free(u);
	return rc;
}
