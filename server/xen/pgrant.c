/*
 * The persistent-grant table of one blkif ring. A hash of grant reference
 * -> mapped page, with an LRU list through the same entries; both link by
 * index into one array sized for the bound, allocated when the ring
 * connects, so a lookup or an eviction makes no heap call.
 *
 * At the bound a miss does not evict blindly: a pure LRU thrashes (every
 * lookup a map and an unmap) as soon as the guest cycles through more refs
 * than the bound, which Linux's blkfront does with big indirect requests.
 * The least recently used page is unmapped only once it has gone unused
 * for PG_IDLE_FACTOR times the bound in lookups (so a working set that
 * moved still moves in); until then the missing segment is grant-copied
 * as without persistent grants (blkback likewise maps past its bound
 * non-persistently, and purges grants left unused for a minute).
 *
 * The guest picks the refs: a chain can be as long as the table, which the
 * bound keeps small (1056 by default). Its pages may be anything the guest
 * granted, even its ring or an indirect page also used as data: we only
 * ever copy within one mapped page, at offsets the ring checked.
 */
#include "pgrant.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "blkif_abi.h"

#define PG_NONE UINT32_MAX
#define PG_MAP_FAILED (-1)	/* a segment's status when its grant cannot be mapped */
#define PG_IDLE_FACTOR 8	/* lookups, in bounds, before a page may be evicted */
#define PG_SPILL 64		/* grant copies batched per port call */

struct pg_entry {
	uint8_t *page;
	uint32_t ref;
	uint32_t chain;			/* next in the hash bucket */
	uint32_t newer, older;		/* the LRU list */
	uint64_t used_at;		/* the table's tick at the last lookup */
};

struct pgrant_table {
	struct xport *port;
	uint32_t domid;
	unsigned max, used;
	uint32_t mask;			/* buckets - 1 */
	uint32_t *buckets;
	uint32_t newest, oldest;
	uint64_t evictions, overflow;
	uint64_t tick;			/* lookups so far */
	struct pg_entry e[];
};

static uint32_t
bucket_of(const struct pgrant_table *t, uint32_t ref)
{
	return (ref * 2654435761u) & t->mask;	/* Knuth's multiplicative hash */
}

struct pgrant_table *
pgrant_new(struct xport *port, uint32_t domid, unsigned max)
{
	if (max == 0 || max > PGRANT_LIMIT) {
		errno = EINVAL;
		return NULL;
	}
	struct pgrant_table *t = calloc(1, sizeof(*t) + (size_t)max * sizeof(t->e[0]));
	uint32_t nb = 1;
	while (nb < 2 * max)
		nb <<= 1;
	if (!t || !(t->buckets = malloc(nb * sizeof(*t->buckets)))) {
		free(t);
		errno = ENOMEM;
		return NULL;
	}
	for (uint32_t i = 0; i < nb; i++)
		t->buckets[i] = PG_NONE;
	t->port = port;
	t->domid = domid;
	t->max = max;
	t->mask = nb - 1;
	t->newest = t->oldest = PG_NONE;
	return t;
}

void
pgrant_free(struct pgrant_table *t)
{
	if (!t)
		return;
	for (unsigned i = 0; i < t->used; i++)
		t->port->ops->unmap(t->port, t->domid, t->e[i].page, 1);
	free(t->buckets);
	free(t);
}

/* ---- the LRU list ---- */

static void
lru_unlink(struct pgrant_table *t, uint32_t i)
{
	struct pg_entry *e = &t->e[i];
	if (e->newer != PG_NONE)
		t->e[e->newer].older = e->older;
	else
		t->newest = e->older;
	if (e->older != PG_NONE)
		t->e[e->older].newer = e->newer;
	else
		t->oldest = e->newer;
}

static void
lru_push(struct pgrant_table *t, uint32_t i)
{
	struct pg_entry *e = &t->e[i];
	e->newer = PG_NONE;
	e->older = t->newest;
	if (t->newest != PG_NONE)
		t->e[t->newest].newer = i;
	t->newest = i;
	if (t->oldest == PG_NONE)
		t->oldest = i;
}

/* ---- the hash ---- */

static uint32_t
lookup(const struct pgrant_table *t, uint32_t ref)
{
	uint32_t i = t->buckets[bucket_of(t, ref)];
	while (i != PG_NONE && t->e[i].ref != ref)
		i = t->e[i].chain;
	return i;
}

static void
hash_remove(struct pgrant_table *t, uint32_t i)
{
	uint32_t *link = &t->buckets[bucket_of(t, t->e[i].ref)];
	while (*link != i)
		link = &t->e[*link].chain;
	*link = t->e[i].chain;
}

/* Unmaps the least recently used page; its slot is free for the caller. */
static uint32_t
evict_oldest(struct pgrant_table *t)
{
	uint32_t i = t->oldest;
	lru_unlink(t, i);
	hash_remove(t, i);
	t->port->ops->unmap(t->port, t->domid, t->e[i].page, 1);
	t->e[i].page = NULL;
	t->evictions++;
	return i;
}

/* Frees slot i (linked nowhere): the last used slot moves into it, so 0..used-1 stay full. */
static void
compact(struct pgrant_table *t, uint32_t i)
{
	uint32_t last = --t->used;
	if (i == last)
		return;
	lru_unlink(t, last);
	hash_remove(t, last);
	t->e[i] = t->e[last];
	uint32_t b = bucket_of(t, t->e[i].ref);
	t->e[i].chain = t->buckets[b];
	t->buckets[b] = i;
	lru_push(t, i);		/* a move, not a use: close enough for an LRU */
}

/* Full, and every page was used lately: the caller grant-copies instead. */
static int
table_busy(const struct pgrant_table *t)
{
	return t->used == t->max &&
	       t->tick - t->e[t->oldest].used_at <= (uint64_t)PG_IDLE_FACTOR * t->max;
}

/*
 * ref's page, mapped now if it was not. NULL if the grant cannot be mapped
 * (*busy 0) or if the table has no room for it now (*busy 1).
 */
static uint8_t *
page_of(struct pgrant_table *t, uint32_t ref, int *busy)
{
	uint32_t i = lookup(t, ref);
	*busy = 0;
	t->tick++;
	if (i != PG_NONE) {
		if (t->newest != i) {
			lru_unlink(t, i);
			lru_push(t, i);
		}
		t->e[i].used_at = t->tick;
		return t->e[i].page;
	}
	if (table_busy(t)) {
		*busy = 1;
		return NULL;
	}
	/* evict first: at the bound, the new map must not be one too many */
	i = t->used < t->max ? t->used++ : evict_oldest(t);
	uint8_t *page = t->port->ops->map(t->port, t->domid, &ref, 1);
	if (!page) {
		compact(t, i);	/* slot i is linked nowhere: give it back */
		return NULL;
	}
	t->e[i].page = page;
	t->e[i].ref = ref;
	t->e[i].used_at = t->tick;
	uint32_t b = bucket_of(t, ref);
	t->e[i].chain = t->buckets[b];
	t->buckets[b] = i;
	lru_push(t, i);
	return page;
}

int
pgrant_touch(struct pgrant_table *t, uint32_t ref)
{
	int busy;
	/* no room to map it: the grant copy will say whether it is good */
	return page_of(t, ref, &busy) || busy ? 0 : -1;
}

/* Grant-copies the segments the table had no room for; their statuses go back. */
static void
spill_flush(struct pgrant_table *t, struct xport_copy *spill, const unsigned *idx, unsigned n,
	    struct xport_copy *segs)
{
	if (!n)
		return;
	int rc = t->port->ops->copy(t->port, t->domid, spill, n);
	for (unsigned k = 0; k < n; k++)
		segs[idx[k]].status = rc < 0 ? PG_MAP_FAILED : spill[k].status;
	t->overflow += n;
}

int
pgrant_copy(struct pgrant_table *t, struct xport_copy *segs, unsigned n)
{
	struct xport_copy spill[PG_SPILL];
	unsigned idx[PG_SPILL], ns = 0;
	int busy;

	for (unsigned k = 0; k < n; k++) {
		struct xport_copy *c = &segs[k];
		/* the caller checked the span; a page is all a mapping gives */
		if ((unsigned)c->offset + c->len > XEN_PAGE_SIZE) {
			c->status = PG_MAP_FAILED;
			continue;
		}
		uint8_t *page = page_of(t, c->ref, &busy);
		if (!page) {
			c->status = PG_MAP_FAILED;
			if (busy) {
				spill[ns] = *c;
				idx[ns++] = k;
				if (ns == PG_SPILL) {
					spill_flush(t, spill, idx, ns, segs);
					ns = 0;
				}
			}
			continue;
		}
		if (c->to_guest)
			memcpy(page + c->offset, c->buf, c->len);
		else
			memcpy(c->buf, page + c->offset, c->len);
		c->status = 0;
	}
	spill_flush(t, spill, idx, ns, segs);
	return 0;
}

unsigned
pgrant_mapped(const struct pgrant_table *t)
{
	return t ? t->used : 0;
}

uint64_t
pgrant_evictions(const struct pgrant_table *t)
{
	return t ? t->evictions : 0;
}

uint64_t
pgrant_overflow(const struct pgrant_table *t)
{
	return t ? t->overflow : 0;
}
