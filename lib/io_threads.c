/*
 * The portable engine: each op runs synchronously (preadv/pwritev/...) on a
 * worker thread; the work queue brings the completion back to the loop.
 */
#include "io_engine.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

#include <event2/event.h>

#include "container_of.h"

/* Ops submitted during one loop turn go to the workers together. */
struct threads_impl {
	struct workq *wq;
	struct workq_item *head, **tail;
	unsigned n;
	struct event *flush_ev;
};

static struct io_op *
op_of(struct workq_item *it)
{
	return container_of(it, struct io_op, wq);
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
threads_flush(evutil_socket_t fd, short what, void *arg)
{
	struct threads_impl *t = arg;
	(void)fd;
	(void)what;
	if (!t->n)
		return;
	workq_push_batch(t->wq, t->head, t->tail, t->n);
	t->head = NULL;
	t->tail = &t->head;
	t->n = 0;
}

static void
threads_submit(struct io_engine *e, struct io_op *op)
{
	struct threads_impl *t = e->impl;

	op->wq.run = threads_run;
	op->wq.done = threads_done;
	if (!t->n)
		event_active(t->flush_ev, 0, 0);
	*t->tail = &op->wq;
	t->tail = &op->wq.next;
	t->n++;
}

static void
threads_free(struct io_engine *e)
{
	struct threads_impl *t = e->impl;
	threads_flush(-1, 0, t);
	workq_free(t->wq);
	event_free(t->flush_ev);
	free(t);
}

static const struct io_engine_ops threads_ops = {
	.name = "threads",
	.submit = threads_submit,
	.free = threads_free,
};

int
io_threads_engine_init(struct io_engine *e, unsigned nthreads)
{
	struct threads_impl *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->tail = &t->head;
	t->flush_ev = event_new(e->base, -1, 0, threads_flush, t);
	t->wq = workq_new(e->base, nthreads);
	if (!t->wq || !t->flush_ev) {
		int rc = errno ? -errno : -ENOMEM;
		if (t->wq)
			workq_free(t->wq);
		if (t->flush_ev)
			event_free(t->flush_ev);
		free(t);
		return rc;
	}
	e->impl = t;
	e->ops = &threads_ops;
	return 0;
}
