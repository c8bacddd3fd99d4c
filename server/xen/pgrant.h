/*
 * Persistent grants (blkif feature-persistent) of one ring: the guest's
 * data and indirect pages stay mapped across requests, so moving a segment
 * is a memcpy instead of a grant copy. At most `max` pages per ring; past
 * that a page long unused is unmapped to make room, else the segment is
 * grant-copied (see pgrant.c). Loop thread of the ring only: a mapping is used only
 * inside pgrant_copy, synchronously, so an unmap (eviction or
 * pgrant_free) can never fall in the middle of a copy.
 */
#ifndef TD_XEN_PGRANT_H
#define TD_XEN_PGRANT_H

#include <stdint.h>

#include "port.h"

/* Linux blkback's default bound per ring (its max_persistent_grants). */
#define PGRANT_DEFAULT_MAX	1056u
/* What TAPDISKD_MAX_PERSISTENT_GRANTS may ask for (0 turns the feature off). */
#define PGRANT_LIMIT		65536u

struct pgrant_table;

/* NULL (errno) if out of memory; max is 1..PGRANT_LIMIT. */
struct pgrant_table *pgrant_new(struct xport *port, uint32_t domid, unsigned max);
/* Unmaps every page and frees the table. */
void pgrant_free(struct pgrant_table *t);
/*
 * Same contract as xport_ops.copy: moves each segment between its buf and
 * the guest page of its ref, mapping that page if it is not mapped yet
 * (or grant-copying it when there is no room). A ref that cannot be mapped
 * gets a non-zero status; the others go on.
 */
int pgrant_copy(struct pgrant_table *t, struct xport_copy *segs, unsigned n);
/* Maps ref's page if needed; 0, or -1 if the guest's grant cannot be mapped. */
int pgrant_touch(struct pgrant_table *t, uint32_t ref);
unsigned pgrant_mapped(const struct pgrant_table *t);
uint64_t pgrant_evictions(const struct pgrant_table *t);
/* Segments grant-copied because the table was full of pages in use. */
uint64_t pgrant_overflow(const struct pgrant_table *t);

#endif
