/*
 * A sync gate: the ordering barrier between a file's dependent writes.
 * Completed writes survive a power loss only once an fdatasync submitted
 * after they completed has completed; a write that makes earlier data
 * reachable (a BAT or L2 entry, a sector bitmap, a footer's successor)
 * must wait for that, or a power loss can keep it and lose what it points
 * to. Waiters that arrive while a sync is in flight share the next one, so
 * a burst of dependent writes costs two syncs, not one each.
 *
 * Threading: the image's loop only. Ownership: waiters belong to the
 * caller and must stay valid until called back.
 */
#ifndef TD_SYNC_GATE_H
#define TD_SYNC_GATE_H

#include <sys/queue.h>

#include "file_io.h"
#include "io.h"

struct sync_waiter {
	void (*fn)(struct sync_waiter *w, int err);	/* err: the sync's errno, or 0 */
	TAILQ_ENTRY(sync_waiter) link;
};

TAILQ_HEAD(sync_waiters, sync_waiter);

struct sync_gate {
	const struct td_file *f;
	struct io_engine *io;
	struct io_op op;
	int busy;			/* a sync in flight */
	struct sync_waiters covered;	/* called back when it completes */
	struct sync_waiters next;	/* arrived during it: the next sync */
	unsigned long long syncs;	/* issued, for tests and stats */
};

void sync_gate_init(struct sync_gate *g, const struct td_file *f, struct io_engine *io);
/* Calls w->fn after a sync submitted now or later completes (never inside this call). */
void sync_gate_wait(struct sync_gate *g, struct sync_waiter *w);
/* 1 if a sync is in flight or waiters wait (the image is not idle). */
int sync_gate_busy(const struct sync_gate *g);

#endif
