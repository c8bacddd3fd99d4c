/*
 * blkif ring processing. The loop consumes entries between req_cons and the
 * guest's req_prod, each copied out of shared memory once and decoded from
 * that copy; a req_prod that runs more than a ring ahead of our responses
 * disconnects the ring. Data moves by grant copy into pooled bounce
 * buffers, one batched copy per request; with persistent grants
 * (pgrant.c) the same copy is a memcpy from pages kept mapped. Responses
 * are pushed, and the guest notified, once per loop turn. A barrier stops consumption until
 * everything before it is done, and everything after it waits for it.
 */
#include "ring.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "bufpool.h"
#include "freelist.h"
#include "log.h"
#include "loop.h"
#include "pgrant.h"
#include "port.h"
#include "server.h"
#include "vbd.h"

#define RING_INLINE_COPIES BLKIF_MAX_SEGMENTS

struct blkif_ring {
	struct loop *loop;		/* the vbd's: everything here runs on it */
	struct xport *port;
	struct vbd *vbd;
	uint32_t domid;
	int proto, index;
	unsigned nr_pages, size;
	size_t entry;
	uint8_t *sring;
	struct xport_evtchn *evt;
	struct event *ev, *push_ev, *dead_ev;
	uint32_t req_cons, rsp_prod_pvt;
	unsigned inflight;		/* consumed, not yet answered */
	int dead;
	int broken;			/* the guest broke the ring: consume nothing more */
	int barrier;			/* consumption stopped for a barrier */
	struct blkif_req *barrier_req;	/* waiting for the ring to drain */
	void (*on_dead)(void *arg);
	void *arg;
	struct blkif_ring_stats stats;
	struct log_ratelimit rl;
	struct freelist reqs;		/* blkif_reqs with their scratch, for reuse */
	struct blkif_req *spare;	/* the next request's, had before it is consumed */
	struct event *mem_ev;		/* out of memory: retry consuming */
	int mem_waiting;
	struct blkif_req *mem_parked;	/* consumed, waiting for its data buffer */
	struct blkif_seg *spare_segs;	/* the next indirect request's, had before it is consumed */
	uint8_t *desc;			/* an indirect request's descriptor pages, parsed at once */
	struct pgrant_table *pg;	/* persistent grants, or NULL: grant copy */
	uint64_t pg_evict_base, pg_overflow_base;	/* at the last stats reset */
};

enum breq_kind { BR_DATA, BR_FLUSH, BR_DISCARD };

/* an indirect request's segments, and the pages that describe them */
#define INDIRECT_SEGS_BYTES (BLKIF_MAX_INDIRECT_SEGMENTS * sizeof(struct blkif_seg))
#define INDIRECT_DESC_PAGES \
	((BLKIF_MAX_INDIRECT_SEGMENTS + BLKIF_SEGS_PER_INDIRECT_PAGE - 1) / BLKIF_SEGS_PER_INDIRECT_PAGE)
#define INDIRECT_DESC_BYTES ((size_t)INDIRECT_DESC_PAGES * XEN_PAGE_SIZE)

struct blkif_req {
	struct vbd_request vr;
	struct blkif_ring *ring;
	uint64_t id;
	uint8_t op;			/* echoed in the response */
	int is_write;
	int flush_then_write;		/* barrier/flush with data: flush, then write FUA */
	int answered;			/* timed out: the guest has its error, the I/O is still out */
	unsigned nr_segs;
	struct blkif_seg *segs;		/* inline_segs, or an indirect request's from the pool */
	struct blkif_seg inline_segs[BLKIF_MAX_SEGMENTS];
	void *buf;
	size_t buflen;
	uint64_t sector, bytes;
	struct iovec iov;
};

static void ring_process(struct blkif_ring *r);
static void breq_submit(struct blkif_req *b);
static void data_request_go(struct blkif_req *b);

/* ---- shared indices (the guest writes req_prod and rsp_event) ---- */

static uint32_t *
idx(struct blkif_ring *r, int which)
{
	return (uint32_t *)(r->sring + 4 * which);	/* req_prod, req_event, rsp_prod, rsp_event */
}

static uint32_t
load(struct blkif_ring *r, int which)
{
	return __atomic_load_n(idx(r, which), __ATOMIC_ACQUIRE);
}

static void
store(struct blkif_ring *r, int which, uint32_t v)
{
	__atomic_store_n(idx(r, which), v, __ATOMIC_RELEASE);
}

enum { REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT };

/* ---- responses ---- */

/* Publishes the responses made so far; notifies if the guest asked to hear. */
static void
push_responses(struct blkif_ring *r)
{
	uint32_t old = load(r, RSP_PROD), now = r->rsp_prod_pvt;
	if (old == now)
		return;
	store(r, RSP_PROD, now);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if ((uint32_t)(now - load(r, RSP_EVENT)) < (uint32_t)(now - old)) {
		r->stats.kicks_out++;
		r->port->ops->notify(r->evt);
	}
}

/* Once per loop turn after responses: push them, then look for more work. */
static void
ring_push(evutil_socket_t fd, short what, void *arg)
{
	struct blkif_ring *r = arg;
	(void)fd;
	(void)what;

	if (r->dead)
		return;
	push_responses(r);
	/* requests may have come in while consumption was stopped */
	ring_process(r);
}

static void
respond(struct blkif_ring *r, uint64_t id, uint8_t op, int16_t status)
{
	if (r->dead)
		return;
	uint8_t *e = r->sring + BLKIF_RING_HEADER + (r->rsp_prod_pvt & (r->size - 1)) * r->entry;
	blkif_encode_response(r->proto, e, id, op, status);
	r->rsp_prod_pvt++;
	r->stats.reqs_out++;
	event_active(r->push_ev, 0, 0);
}

/* ---- freeing ---- */

static void
ring_free(struct blkif_ring *r)
{
	if (r->ev)
		event_free(r->ev);
	if (r->push_ev)
		event_free(r->push_ev);
	if (r->dead_ev)
		event_free(r->dead_ev);
	if (r->mem_ev)
		event_free(r->mem_ev);
	if (r->spare)
		vbd_request_put(&r->reqs, &r->spare->vr);
	if (r->spare_segs)
		bufpool_put(r->loop->pool, r->spare_segs, INDIRECT_SEGS_BYTES);
	if (r->desc)
		bufpool_put(r->loop->pool, r->desc, INDIRECT_DESC_BYTES);
	freelist_drain(&r->reqs);
	pgrant_free(r->pg);	/* NULL unless connecting failed */
	free(r);
}

static void
ring_release(struct blkif_ring *r)
{
	if (r->dead && !r->inflight)
		ring_free(r);
}

static void
breq_free(struct blkif_req *b)
{
	struct blkif_ring *r = b->ring;
	if (b->buf)
		bufpool_put(r->loop->pool, b->buf, b->buflen);
	if (b->segs != b->inline_segs)
		bufpool_put(r->loop->pool, b->segs, INDIRECT_SEGS_BYTES);
	vbd_request_put(&r->reqs, &b->vr);
	r->inflight--;
}

/* Answers b, frees it, and lets a waiting barrier go when the ring drains. */
static void
breq_done(struct blkif_req *b, int16_t status)
{
	struct blkif_ring *r = b->ring;

	if (!b->answered)
		respond(r, b->id, b->op, status);
	if (b->op == BLKIF_OP_WRITE_BARRIER)
		r->barrier = 0;	/* whatever its outcome, later requests may go */
	breq_free(b);
	if (r->dead) {
		ring_release(r);
		return;
	}
	if (r->mem_waiting)
		event_active(r->mem_ev, EV_TIMEOUT, 0);	/* memory came back with b */
	if (r->barrier_req && r->inflight == 1) {
		struct blkif_req *bar = r->barrier_req;
		r->barrier_req = NULL;
		breq_submit(bar);
	}
}

/* ---- grant copies ---- */

/* Moves segments by grant copy, or by memcpy through persistent grants. */
static int
ring_copy(struct blkif_ring *r, struct xport_copy *c, unsigned n)
{
	if (r->dead)
		return -ESHUTDOWN;	/* the guest's pages are no longer ours to touch */
	if (r->pg)
		return pgrant_copy(r->pg, c, n);
	return r->port->ops->copy(r->port, r->domid, c, n);
}

/*
 * Persistent grants: a read's pages are mapped before the disk is asked,
 * so that a grant the guest cannot back costs no I/O (blkback maps at
 * submit too). They may be evicted again before the read completes; the
 * copy then maps them once more.
 */
static int
breq_premap(struct blkif_req *b)
{
	struct blkif_ring *r = b->ring;
	for (unsigned i = 0; i < b->nr_segs; i++) {
		if (pgrant_touch(r->pg, b->segs[i].gref) < 0) {
			r->stats.errors_map++;
			log_limited(&r->rl, LOG_LVL_WARN, "blkif d%u ring %d: cannot map grant %u "
				    "(request %ju)", r->domid, r->index, b->segs[i].gref,
				    (uintmax_t)b->id);
			return -1;
		}
	}
	return 0;
}

/* Copies b's segments between the guest and b->buf; 0, or -1 if any failed. */
static int
breq_copy(struct blkif_req *b, int to_guest)
{
	struct blkif_ring *r = b->ring;
	struct xport_copy inline_c[RING_INLINE_COPIES], *c = inline_c;
	size_t off = 0;
	int rc = 0;

	if (b->nr_segs > RING_INLINE_COPIES && !(c = calloc(b->nr_segs, sizeof(*c))))
		return -1;
	for (unsigned i = 0; i < b->nr_segs; i++) {
		const struct blkif_seg *s = &b->segs[i];
		c[i].ref = s->gref;
		c[i].offset = (uint16_t)(s->first_sect * 512u);
		c[i].len = (uint16_t)((s->last_sect - s->first_sect + 1) * 512u);
		c[i].buf = (char *)b->buf + off;
		c[i].to_guest = to_guest;
		c[i].status = 0;
		off += c[i].len;
	}
	if (ring_copy(r, c, b->nr_segs) < 0) {
		rc = -1;
	} else {
		for (unsigned i = 0; i < b->nr_segs; i++)
			if (c[i].status)
				rc = -1;
	}
	if (rc) {
		r->stats.errors_map++;
		log_limited(&r->rl, LOG_LVL_WARN, "blkif d%u ring %d: %s failed (request %ju)",
			    r->domid, r->index, r->pg ? "copy through persistent grants" : "grant copy",
			    (uintmax_t)b->id);
	}
	if (c != inline_c)
		free(c);
	return rc;
}

/* ---- the vbd side ---- */

static void
breq_complete(struct vbd_request *vr, int err)
{
	struct blkif_req *b = (struct blkif_req *)vr;
	struct blkif_ring *r = b->ring;

	if (err || r->dead) {
		if (err && !b->answered)
			r->stats.errors_vbd++;
		breq_done(b, BLKIF_RSP_ERROR);
		return;
	}
	if (b->flush_then_write) {
		/* the flush is done: now the data, durable before it completes */
		b->flush_then_write = 0;
		void *scratch = b->vr.td.scratch;
		size_t scratch_size = b->vr.td.scratch_size;
		memset(&b->vr.td, 0, sizeof(b->vr.td));
		b->vr.td.scratch = scratch;
		b->vr.td.scratch_size = scratch_size;
		b->vr.td.op = TD_OP_WRITE;
		b->vr.td.flags = TD_REQ_FUA;
		b->vr.td.offset = b->sector * 512;
		b->vr.td.length = b->bytes;
		b->vr.td.iov = &b->iov;
		b->vr.td.iovcnt = 1;
		vbd_submit(r->vbd, &b->vr);
		return;
	}
	if (!r->dead && b->is_write == 0 && b->nr_segs && breq_copy(b, 1) < 0) {
		breq_done(b, BLKIF_RSP_ERROR);
		return;
	}
	breq_done(b, BLKIF_RSP_OKAY);
}

/*
 * The vbd's timeout: the guest hears now (it may reuse the id); b and its
 * buffer stay until the I/O is back, and breq_done then says nothing more.
 */
static void
breq_timed_out(struct vbd_request *vr, int err)
{
	struct blkif_req *b = (struct blkif_req *)vr;
	(void)err;
	b->answered = 1;
	b->ring->stats.errors_vbd++;
	respond(b->ring, b->id, b->op, BLKIF_RSP_ERROR);
}

static void
breq_submit(struct blkif_req *b)
{
	struct blkif_ring *r = b->ring;

	if (r->dead || !r->vbd) {
		breq_done(b, BLKIF_RSP_ERROR);
		return;
	}
	b->vr.complete = breq_complete;
	b->vr.timed_out = breq_timed_out;
	b->vr.flow = r;
	vbd_submit(r->vbd, &b->vr);
}

/* ---- requests ---- */

#define RING_MEM_RETRY_MS 10

/*
 * No memory for the next request: leave it on the ring (the guest sees a
 * slow disk, not an error) and look again when a request comes back or
 * after a moment.
 */
static void
ring_mem_wait(struct blkif_ring *r)
{
	struct timeval tv = { 0, RING_MEM_RETRY_MS * 1000 };

	if (!r->mem_waiting)
		log_limited(&r->rl, LOG_LVL_WARN, "blkif d%u ring %d: out of memory; "
			    "requests wait on the ring", r->domid, r->index);
	r->mem_waiting = 1;
	evtimer_add(r->mem_ev, &tv);
}

static struct blkif_req *
breq_alloc(struct blkif_ring *r)
{
	return (struct blkif_req *)vbd_request_get(r->vbd, &r->reqs, sizeof(struct blkif_req));
}

/* The spare that ring_process made sure of before consuming the request. */
static struct blkif_req *
breq_new(struct blkif_ring *r, uint64_t id, uint8_t op)
{
	struct blkif_req *b = r->spare;
	r->spare = NULL;
	if (!b)
		return NULL;
	b->ring = r;
	b->id = id;
	b->op = op;
	b->segs = b->inline_segs;
	r->inflight++;
	return b;
}

static void
log_bad(struct blkif_ring *r, uint64_t id, uint8_t op, const char *why)
{
	r->stats.errors_msg++;
	log_limited(&r->rl, LOG_LVL_WARN, "blkif d%u ring %d: request %ju (op %u): %s",
		    r->domid, r->index, (uintmax_t)id, op, why);
}

/* A request refused before any state was made for it. */
static void
bad_request(struct blkif_ring *r, uint64_t id, uint8_t op, const char *why, int16_t status)
{
	log_bad(r, id, op, why);
	respond(r, id, op, status);
}

/* A request refused after it was set up. */
static void
breq_refuse(struct blkif_req *b, const char *why)
{
	log_bad(b->ring, b->id, b->op, why);
	breq_done(b, BLKIF_RSP_ERROR);
}

/* A read or write of nr segments (direct or from indirect pages). */
static void
data_request(struct blkif_ring *r, struct blkif_req *b, int is_write)
{
	uint64_t size_sectors = r->vbd->size / 512, bytes;
	const char *why = blkif_check_segments(b->segs, b->nr_segs, b->sector, size_sectors,
					       &bytes);
	if (why) {
		breq_refuse(b, why);
		return;
	}
	if (is_write && r->vbd->readonly) {
		breq_refuse(b, "write to a read-only disk");
		return;
	}
	if (b->nr_segs > r->stats.max_segments)
		r->stats.max_segments = b->nr_segs;
	b->is_write = is_write;
	b->bytes = bytes;
	b->buflen = bytes;
	data_request_go(b);
}

/*
 * A checked read or write from its data buffer on. Without memory for the
 * buffer, b waits on its ring (consumption stops behind it, as it does
 * for a request context) and goes on when memory comes back: the guest
 * sees a slow disk, not an error.
 */
static void
data_request_go(struct blkif_req *b)
{
	struct blkif_ring *r = b->ring;
	int is_write = b->is_write;

	b->buf = bufpool_get(r->loop->pool, b->bytes);
	if (!b->buf) {
		r->mem_parked = b;
		ring_mem_wait(r);
		return;
	}
	b->iov.iov_base = b->buf;
	b->iov.iov_len = b->bytes;
	if (is_write ? breq_copy(b, 0) < 0 : r->pg && breq_premap(b) < 0) {
		breq_done(b, BLKIF_RSP_ERROR);
		return;
	}
	b->vr.td.op = is_write ? TD_OP_WRITE : TD_OP_READ;
	b->vr.td.offset = b->sector * 512;
	b->vr.td.length = b->bytes;
	b->vr.td.iov = &b->iov;
	b->vr.td.iovcnt = 1;
	if (b->flush_then_write) {
		/* flush first (the data follows in breq_complete) */
		b->vr.td.op = TD_OP_FLUSH;
		b->vr.td.offset = 0;
		b->vr.td.length = 0;
	}
	if (b->op == BLKIF_OP_WRITE_BARRIER && r->inflight > 1) {
		r->barrier_req = b;	/* breq_done submits it when the ring drains */
		return;
	}
	breq_submit(b);
}

/* Reads the indirect descriptor pages and the segments they hold. */
static void
indirect_request(struct blkif_ring *r, const struct blkif_raw_req *raw)
{
	unsigned nr = raw->indirect_nr_segments;
	uint8_t op = raw->indirect_op;

	/* the answer names the inner operation, as blkback's does and blkfront checks */
	r->stats.indirect++;
	if (op != BLKIF_OP_READ && op != BLKIF_OP_WRITE) {
		bad_request(r, raw->id, op, "indirect operation is not read or write",
			    BLKIF_RSP_ERROR);
		return;
	}
	if (nr == 0 || nr > BLKIF_MAX_INDIRECT_SEGMENTS) {
		bad_request(r, raw->id, op, "indirect segment count out of range", BLKIF_RSP_ERROR);
		return;
	}
	unsigned pages = (nr + BLKIF_SEGS_PER_INDIRECT_PAGE - 1) / BLKIF_SEGS_PER_INDIRECT_PAGE;
	uint8_t *desc = r->desc;
	/* ring_process made sure of both before it consumed the request */
	struct blkif_req *b = breq_new(r, raw->id, op);
	b->segs = r->spare_segs;
	r->spare_segs = NULL;
	b->nr_segs = nr;
	struct xport_copy c[BLKIF_MAX_INDIRECT_PAGES];
	for (unsigned i = 0; i < pages; i++) {
		c[i].ref = raw->indirect_grefs[i];
		c[i].offset = 0;
		c[i].len = XEN_PAGE_SIZE;
		c[i].buf = desc + (size_t)i * XEN_PAGE_SIZE;
		c[i].to_guest = 0;
		c[i].status = 0;
	}
	int bad = ring_copy(r, c, pages) < 0;
	for (unsigned i = 0; i < pages; i++)
		bad |= c[i].status != 0;
	if (bad) {
		r->stats.errors_map++;
		breq_done(b, BLKIF_RSP_ERROR);
		return;
	}
	for (unsigned i = 0; i < nr; i++)
		blkif_indirect_seg(desc, i, &b->segs[i]);
	b->sector = raw->sector;
	data_request(r, b, op == BLKIF_OP_WRITE);
}

static void
handle_request(struct blkif_ring *r, const struct blkif_raw_req *raw)
{
	struct blkif_req *b;

	r->stats.reqs_in++;
	switch (raw->op) {
	case BLKIF_OP_READ:
	case BLKIF_OP_WRITE:
	case BLKIF_OP_WRITE_BARRIER:
	case BLKIF_OP_FLUSH_DISKCACHE: {
		int data = raw->nr_segments > 0;
		if (raw->nr_segments > BLKIF_MAX_SEGMENTS ||
		    (!data && (raw->op == BLKIF_OP_READ || raw->op == BLKIF_OP_WRITE))) {
			bad_request(r, raw->id, raw->op, "segment count out of range",
				    BLKIF_RSP_ERROR);
			return;
		}
		b = breq_new(r, raw->id, raw->op);
		if (!b) {
			respond(r, raw->id, raw->op, BLKIF_RSP_ERROR);
			return;
		}
		if (raw->op == BLKIF_OP_WRITE_BARRIER) {
			r->stats.barriers++;
			r->barrier = 1;	/* nothing after it starts until it is done */
		} else if (raw->op == BLKIF_OP_FLUSH_DISKCACHE) {
			r->stats.flushes++;
		}
		if (!data) {	/* a flush (or an empty barrier) */
			b->vr.td.op = TD_OP_FLUSH;
			if (raw->op == BLKIF_OP_WRITE_BARRIER && r->inflight > 1) {
				r->barrier_req = b;
				return;
			}
			breq_submit(b);
			return;
		}
		memcpy(b->segs, raw->seg, raw->nr_segments * sizeof(*raw->seg));
		b->nr_segs = raw->nr_segments;
		b->sector = raw->sector;
		b->flush_then_write = raw->op == BLKIF_OP_WRITE_BARRIER ||
				      raw->op == BLKIF_OP_FLUSH_DISKCACHE;
		data_request(r, b, raw->op != BLKIF_OP_READ);
		return;
	}
	case BLKIF_OP_INDIRECT:
		indirect_request(r, raw);
		return;
	case BLKIF_OP_DISCARD: {
		uint64_t size = r->vbd->size / 512;
		r->stats.discards++;
		if (raw->discard_flag & BLKIF_DISCARD_SECURE) {
			respond(r, raw->id, raw->op, BLKIF_RSP_EOPNOTSUPP);	/* discard-secure=0 */
			return;
		}
		if (raw->sector > size || raw->nr_sectors > size - raw->sector) {
			bad_request(r, raw->id, raw->op, "discard past the end of the disk",
				    BLKIF_RSP_ERROR);
			return;
		}
		b = breq_new(r, raw->id, raw->op);
		if (!b) {
			respond(r, raw->id, raw->op, BLKIF_RSP_ERROR);
			return;
		}
		b->vr.td.op = TD_OP_DISCARD;
		b->vr.td.offset = raw->sector * 512;
		b->vr.td.length = raw->nr_sectors * 512;
		breq_submit(b);
		return;
	}
	default:
		bad_request(r, raw->id, raw->op, "unknown operation", BLKIF_RSP_EOPNOTSUPP);
		return;
	}
}

/* ---- consuming the ring ---- */

/* Tells the device, from a loop turn of its own (never from inside ring code). */
static void
ring_on_dead(evutil_socket_t fd, short what, void *arg)
{
	struct blkif_ring *r = arg;
	(void)fd;
	(void)what;
	if (!r->dead && r->on_dead)
		r->on_dead(r->arg);	/* the device disconnects us */
}

static void
ring_kill(struct blkif_ring *r, const char *why)
{
	if (r->broken)
		return;
	log_warn("blkif d%u ring %d: %s; disconnecting the ring", r->domid, r->index, why);
	r->stats.errors_msg++;
	r->broken = 1;
	event_active(r->dead_ev, 0, 0);
}

static void
ring_process(struct blkif_ring *r)
{
	uint8_t entry[128];
	struct blkif_raw_req raw;

	while (!r->dead && !r->broken && !r->barrier && !r->mem_parked) {
		uint32_t prod = load(r, REQ_PROD);
		/* the guest may have at most a ring's worth outstanding */
		if ((uint32_t)(prod - r->rsp_prod_pvt) > r->size ||
		    (uint32_t)(prod - r->req_cons) > r->size) {
			ring_kill(r, "request producer ran more than a ring ahead");
			return;
		}
		while (r->req_cons != prod && !r->barrier && !r->dead && !r->mem_parked) {
			if (!r->spare && !(r->spare = breq_alloc(r))) {
				ring_mem_wait(r);
				return;
			}
			const uint8_t *e = r->sring + BLKIF_RING_HEADER +
					   (r->req_cons & (r->size - 1)) * r->entry;
			memcpy(entry, e, r->entry);	/* once: the guest may rewrite it */
			blkif_decode(r->proto, entry, &raw);
			if (raw.op == BLKIF_OP_INDIRECT && !r->spare_segs &&
			    !(r->spare_segs = bufpool_get(r->loop->pool, INDIRECT_SEGS_BYTES))) {
				ring_mem_wait(r);
				return;	/* not consumed: read again then */
			}
			r->req_cons++;
			handle_request(r, &raw);
		}
		if (r->dead || r->barrier || r->mem_parked)
			return;
		/* RING_FINAL_CHECK_FOR_REQUESTS: ask to be told, then look again */
		store(r, REQ_EVENT, r->req_cons + 1);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (load(r, REQ_PROD) == r->req_cons)
			return;
	}
}

static void
ring_mem_retry(evutil_socket_t fd, short what, void *arg)
{
	struct blkif_ring *r = arg;
	(void)fd;
	(void)what;
	if (!r->mem_waiting || r->dead)
		return;
	r->mem_waiting = 0;
	event_del(r->mem_ev);
	if (r->mem_parked) {
		struct blkif_req *b = r->mem_parked;
		r->mem_parked = NULL;
		data_request_go(b);	/* may park it again */
		if (r->mem_parked || r->dead)
			return;
	}
	ring_process(r);
}

static void
ring_on_event(evutil_socket_t fd, short what, void *arg)
{
	struct blkif_ring *r = arg;
	(void)fd;
	(void)what;
	if (r->dead)
		return;
	if (r->port->ops->pending(r->evt))
		r->stats.kicks_in++;
	ring_process(r);
}

struct blkif_ring *
blkif_ring_connect(struct xport *port, struct vbd *vbd,
		   const struct blkif_ring_cfg *cfg, void (*dead)(void *), void *arg,
		   char *err, size_t errlen)
{
	struct blkif_ring *r = calloc(1, sizeof(*r));

	if (!r) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	if (cfg->nr_pages == 0 || cfg->nr_pages > (1u << BLKIF_MAX_RING_ORDER) ||
	    (cfg->nr_pages & (cfg->nr_pages - 1))) {
		snprintf(err, errlen, "ring of %u pages", cfg->nr_pages);
		free(r);
		return NULL;
	}
	r->loop = vbd->loop;
	r->port = port;
	r->vbd = vbd;
	r->domid = cfg->domid;
	r->proto = cfg->proto;
	r->index = cfg->index;
	r->nr_pages = cfg->nr_pages;
	r->entry = blkif_entry_size(cfg->proto);
	r->size = blkif_ring_entries(cfg->proto, cfg->nr_pages);
	r->on_dead = dead;
	r->arg = arg;
	r->rl = (struct log_ratelimit)LOG_RATELIMIT_INIT;
	r->reqs = (struct freelist)FREELIST_INIT(r->size);
	if (cfg->max_pgrants && !(r->pg = pgrant_new(port, cfg->domid, cfg->max_pgrants))) {
		snprintf(err, errlen, "persistent grants: %s", strerror(errno));
		free(r);
		return NULL;
	}
	r->sring = port->ops->map(port, cfg->domid, cfg->refs, cfg->nr_pages);
	if (!r->sring) {
		snprintf(err, errlen, "cannot map the ring: %s", strerror(errno));
		pgrant_free(r->pg);
		free(r);
		return NULL;
	}
	r->evt = port->ops->bind(port, cfg->domid, cfg->evtchn);
	if (!r->evt) {
		snprintf(err, errlen, "cannot bind event channel %u: %s", cfg->evtchn, strerror(errno));
		port->ops->unmap(port, r->domid, r->sring, r->nr_pages);
		pgrant_free(r->pg);
		free(r);
		return NULL;
	}
	/* the frontend initialised the indices; we start after its last answer */
	r->req_cons = load(r, RSP_PROD);
	r->rsp_prod_pvt = r->req_cons;
	struct event_base *base = r->loop->base;
	r->ev = event_new(base, port->ops->fd(r->evt), EV_READ | EV_PERSIST, ring_on_event, r);
	r->push_ev = event_new(base, -1, 0, ring_push, r);
	r->dead_ev = event_new(base, -1, 0, ring_on_dead, r);
	r->mem_ev = evtimer_new(base, ring_mem_retry, r);
	r->desc = bufpool_get(r->loop->pool, INDIRECT_DESC_BYTES);
	if (!r->ev || !r->push_ev || !r->dead_ev || !r->mem_ev || !r->desc ||
	    event_add(r->ev, NULL) < 0) {
		snprintf(err, errlen, "out of memory");
		port->ops->unbind(r->evt);
		port->ops->unmap(port, r->domid, r->sring, r->nr_pages);
		ring_free(r);
		return NULL;
	}
	ring_process(r);	/* requests queued before we connected */
	return r;
}

void
blkif_ring_disconnect(struct blkif_ring *r)
{
	if (r->dead)
		return;
	push_responses(r);	/* answers already made reach the guest */
	r->dead = 1;
	event_del(r->ev);
	r->port->ops->unbind(r->evt);
	r->port->ops->unmap(r->port, r->domid, r->sring, r->nr_pages);
	r->sring = NULL;
	/* now, not when the disk gives back the requests in flight: a dead
	 * ring copies nothing more (ring_copy), and a guest that is gone must
	 * get its pages back at once */
	pgrant_free(r->pg);
	r->pg = NULL;
	if (r->barrier_req) {
		struct blkif_req *b = r->barrier_req;
		r->barrier_req = NULL;
		breq_free(b);
	}
	if (r->mem_parked) {
		struct blkif_req *b = r->mem_parked;
		r->mem_parked = NULL;
		breq_free(b);
	}
	r->vbd = NULL;
	ring_release(r);
}

void
blkif_ring_get_stats(const struct blkif_ring *r, struct blkif_ring_stats *st)
{
	*st = r->stats;
	st->pgrants = pgrant_mapped(r->pg);
	st->pgrant_evictions = pgrant_evictions(r->pg) - r->pg_evict_base;
	st->pgrant_overflow = pgrant_overflow(r->pg) - r->pg_overflow_base;
}

/* Persistent grants: negotiated or not, mapped now; evicted, overflowed since the reset. */
static void
ring_pgrant_json(const struct blkif_ring *r, json_t *j)
{
	struct blkif_ring_stats st;
	blkif_ring_get_stats(r, &st);
	json_object_set_new(j, "persistent", json_boolean(r->pg != NULL));
	json_object_set_new(j, "persistent_grants", json_integer((json_int_t)st.pgrants));
	json_object_set_new(j, "persistent_evictions",
			    json_integer((json_int_t)st.pgrant_evictions));
	json_object_set_new(j, "persistent_overflow", json_integer((json_int_t)st.pgrant_overflow));
}

/* All of them are counters (max_segments: since the reset). */
void
blkif_ring_reset_stats(struct blkif_ring *r)
{
	memset(&r->stats, 0, sizeof(r->stats));
	r->pg_evict_base = pgrant_evictions(r->pg);
	r->pg_overflow_base = pgrant_overflow(r->pg);
}

json_t *
blkif_ring_stats_json(const struct blkif_ring *r)
{
	const struct blkif_ring_stats *s = &r->stats;
	json_t *j = json_pack("{s:i, s:i, s:i, s:[I,I], s:[I,I], s:{s:I, s:I, s:I}, s:I, s:I, s:I, s:I, s:I}",
			 "queue", r->index, "pages", (int)r->nr_pages, "entries", (int)r->size,
			 "reqs", (json_int_t)s->reqs_in, (json_int_t)s->reqs_out,
			 "kicks", (json_int_t)s->kicks_in, (json_int_t)s->kicks_out,
			 "errors", "msg", (json_int_t)s->errors_msg, "map", (json_int_t)s->errors_map,
			 "vbd", (json_int_t)s->errors_vbd,
			 "indirect", (json_int_t)s->indirect, "barriers", (json_int_t)s->barriers,
			 "flushes", (json_int_t)s->flushes, "discards", (json_int_t)s->discards,
			 "max_segments", (json_int_t)s->max_segments);
	if (j)
		ring_pgrant_json(r, j);
	return j;
}
