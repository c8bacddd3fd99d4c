/*
 * The portable engine: each op runs synchronously (preadv/pwritev/...) on a
 * worker thread; the work queue brings the completion back to the loop.
 */
#include "io_engine.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

static struct io_op *
op_of(struct workq_item *it)
{
	return (struct io_op *)((char *)it - offsetof(struct io_op, wq));
}

static void
threads_run(struct workq_item *it)
{
	struct io_op *op = op_of(it);
	op->res = io_op_run_sync(op);
}

static void
threads_done(struct workq_item *it)
{
	struct io_op *op = op_of(it);
	io_op_complete(op->engine, op, op->res);
}

static void
threads_submit(struct io_engine *e, struct io_op *op)
{
	op->wq.run = threads_run;
	op->wq.done = threads_done;
	workq_push(e->impl, &op->wq);
}

static void
threads_free(struct io_engine *e)
{
	workq_free(e->impl);
}

static const struct io_engine_ops threads_ops = {
	.name = "threads",
	.submit = threads_submit,
	.free = threads_free,
};

int
io_threads_engine_init(struct io_engine *e, unsigned nthreads)
{
	struct workq *wq = workq_new(e->base, nthreads);
	if (!wq)
		return errno ? -errno : -ENOMEM;
	e->impl = wq;
	e->ops = &threads_ops;
	return 0;
}
