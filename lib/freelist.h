/*
 * A cache of equal-size objects that are allocated and freed all the time
 * (a frontend's requests, with the scratch space their drivers use), so
 * that steady-state I/O calls malloc for none of them. Objects come back
 * zeroed. The size may change (a vbd reopened on another chain): the
 * objects of the old size are then freed as they come back.
 *
 * Threading: one owner (a connection, a ring) on one loop; no locking.
 */
#ifndef TD_FREELIST_H
#define TD_FREELIST_H

#include <stddef.h>

struct freelist {
	void *head;		/* each free object's first word links the next */
	size_t size;		/* of the objects held */
	unsigned count, max;	/* held, and at most held */
};

#define FREELIST_INIT(max_held) { NULL, 0, 0, (max_held) }

/* A zeroed object of size bytes (at least a pointer), NULL if out of memory. */
void *freelist_get(struct freelist *fl, size_t size);
/* Takes obj (of the size it was got with) back, or frees it. */
void freelist_put(struct freelist *fl, void *obj, size_t size);
/* Frees every object held. */
void freelist_drain(struct freelist *fl);

#endif
