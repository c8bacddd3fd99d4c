/* What io.c needs from each engine implementation; not for users of io.h. */
#ifndef TD_IO_ENGINE_H
#define TD_IO_ENGINE_H

#include "io.h"

struct event;

struct io_engine_ops {
	const char *name;
	void (*submit)(struct io_engine *e, struct io_op *op);
	void (*free)(struct io_engine *e);
};

struct io_engine {
	const struct io_engine_ops *ops;
	struct event_base *base;
	struct workq *calls;		/* blocking calls, both engines */
	struct io_defer *defer_head, **defer_tail;
	struct event *defer_ev;
	struct io_engine_stats stats;
	void *impl;
};

/* Each returns 0, or -errno when the engine cannot run here. */
int io_uring_engine_init(struct io_engine *e);
int io_threads_engine_init(struct io_engine *e, unsigned nthreads);

/* Called by implementations when an op has fully completed. */
void io_op_complete(struct io_engine *e, struct io_op *op, int res);

#endif
