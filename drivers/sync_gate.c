/* The sync gate: shared fdatasyncs ordering dependent writes (sync_gate.h). */
#include "sync_gate.h"

static void gate_start(struct sync_gate *g);

static void
gate_synced(struct io_op *op, int res)
{
	struct sync_gate *g = op->data;
	struct sync_waiters done = TAILQ_HEAD_INITIALIZER(done);

	TAILQ_CONCAT(&done, &g->covered, link);
	g->busy = 0;
	if (!TAILQ_EMPTY(&g->next))
		gate_start(g);
	/* callbacks may wait again: they join the sync just started or a new one */
	while (!TAILQ_EMPTY(&done)) {
		struct sync_waiter *w = TAILQ_FIRST(&done);
		TAILQ_REMOVE(&done, w, link);
		w->fn(w, res < 0 ? -res : 0);
	}
}

static void
gate_start(struct sync_gate *g)
{
	TAILQ_CONCAT(&g->covered, &g->next, link);
	g->busy = 1;
	g->syncs++;
	g->op.opcode = IO_OP_FDATASYNC;
	g->op.flags = g->f->io_flags;
	g->op.fd = g->f->fd;
	g->op.done = gate_synced;
	g->op.data = g;
	io_submit(g->io, &g->op);
}

void
sync_gate_init(struct sync_gate *g, const struct td_file *f, struct io_engine *io)
{
	g->f = f;
	g->io = io;
	g->busy = 0;
	g->syncs = 0;
	TAILQ_INIT(&g->covered);
	TAILQ_INIT(&g->next);
}

void
sync_gate_wait(struct sync_gate *g, struct sync_waiter *w)
{
	TAILQ_INSERT_TAIL(&g->next, w, link);
	if (!g->busy)
		gate_start(g);
}

int
sync_gate_busy(const struct sync_gate *g)
{
	return g->busy || !TAILQ_EMPTY(&g->next);
}
