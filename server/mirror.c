/*
 * The copying block jobs (mirror.h has the design): the mirror and the
 * stream share the bitmap of blocks to visit, the copies, and the guest
 * writes kept off ranges being copied. A mirror copies to a destination,
 * sends guest writes to both and ends with a pivot or a cancel; a stream
 * copies the parents' data up into the leaf and ends by detaching it.
 */
#include "mirror.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "blockjob.h"
#include "io.h"
#include "log.h"
#include "loop.h"
#include "server.h"
#include "vbd.h"

#define MIRROR_BLOCK	(64 * 1024)	/* the bitmap's granularity */
#define MIRROR_CHUNK	(1024 * 1024)	/* at most one copy's range */
#define MIRROR_COPIES	4		/* copies at once */
#define MIRROR_EXTENTS	16		/* block status extents per copy */

struct mirror;

/* One range being copied: block status, then piece by piece. */
struct mirror_copy {
	struct mirror *m;
	int busy;
	uint64_t off, len;	/* the range it owns: no guest write overlaps it */
	uint64_t pos;		/* the next byte to handle */
	unsigned ext, next_ext;	/* source extents: how many, the one at pos */
	uint64_t ext_left;	/* bytes of that extent from pos */
	uint64_t piece;		/* the current step's length */
	struct td_request req;
	struct td_extent extents[MIRROR_EXTENTS];	/* the source's, walked piece by piece */
	struct td_extent dest_extent;			/* the destination's, at pos */
	struct iovec iov;
	void *buf;		/* MIRROR_CHUNK bytes */
	void *scratch;
	size_t scratch_size;
};

/* A guest write sent to both sides, or one whose blocks are copied again after. */
struct mirror_write {
	struct mirror *m;
	struct vbd_request *vr;
	uint64_t off, len;
	int dest_out;		/* its destination part is in flight */
	int src_done, src_err;
	int mark_dirty;		/* copy its blocks again once the source has it */
	struct td_request td;
	TAILQ_ENTRY(mirror_write) link;
};

struct mirror {
	struct blockjob job;
	struct td_image *dest;	/* a stream's is the vbd's leaf, not its own */
	char *dest_params;
	int top;
	int stream;
	struct td_image *stream_base;	/* a stream --base: the leaf's parent at the end */
	const struct td_image *commit_base;	/* a commit's: where the segment ends */
	struct td_image *commit_top;	/* an intermediate commit's: the image merged... */
	struct td_image *commit_child;	/* ...and the one above it, pointed at the base at the end */
	int finishing;		/* a stream's last step: the vbd quiescing, then... */
	int detaching;		/* ...the leaf dropping its parents on a worker */
	size_t dest_scratch;

	uint64_t *dirty;	/* one bit per MIRROR_BLOCK still to copy */
	uint64_t nblocks, ndirty, scan;

	struct mirror_copy copies[MIRROR_COPIES];
	unsigned ncopies;
	TAILQ_HEAD(, mirror_write) writes;		/* guest writes in flight */
	TAILQ_HEAD(, vbd_request) parked;	/* guest writes waiting (write_waits), in order */
	struct vbd_request *unparked;	/* being sent again by unpark: it waits no more */

	struct io_defer kick;
	int kick_pending;
	struct event *timer;	/* the speed limit's wait */
	int timer_armed;

	/* pivot: the vbd quiesced, then the last copies, a flush, the swap */
	int pivoting, drained, flushing;
	vbd_done_fn pivot_fn;
	void *pivot_arg;
	struct td_request flush;
	int closing;		/* the destination is being closed: stopped soon */
};

static void mirror_pump(struct mirror *m);
static void copy_step(struct mirror_copy *c);
static void copy_status_query(struct mirror_copy *c);
static void copy_status(struct td_request *r, int err);
static void copy_chain_status(struct td_request *r, int err);

static struct mirror *
job_mirror(struct blockjob *job)
{
	return (struct mirror *)job;
}

/* Where copies read: the vbd's leaf, or the image an intermediate commit merges. */
static struct td_image *
source(const struct mirror *m)
{
	return m->commit_child ? m->commit_top : m->job.vbd->leaf;
}

static struct loop *
mirror_loop(const struct mirror *m)
{
	return m->job.vbd->loop;
}

/* ---- the bitmap ---- */

static int
dirty_test(const struct mirror *m, uint64_t b)
{
	return (m->dirty[b / 64] >> (b % 64)) & 1;
}

static void
dirty_set(struct mirror *m, uint64_t off, uint64_t len)
{
	uint64_t first = off / MIRROR_BLOCK, last = (off + len - 1) / MIRROR_BLOCK;

	for (uint64_t b = first; b <= last && len; b++) {
		if (!dirty_test(m, b)) {
			m->dirty[b / 64] |= 1ULL << (b % 64);
			m->ndirty++;
			m->job.bytes_total += MIRROR_BLOCK;
		}
	}
}

static void
dirty_clear(struct mirror *m, uint64_t b)
{
	m->dirty[b / 64] &= ~(1ULL << (b % 64));
	m->ndirty--;
}

/* Does [off, off+len) meet a copy in flight (other than skip) or a guest write? */
static int
range_busy(const struct mirror *m, uint64_t off, uint64_t len, int writes)
{
	for (unsigned i = 0; i < MIRROR_COPIES; i++) {
		const struct mirror_copy *c = &m->copies[i];
		if (c->busy && off < c->off + c->len && c->off < off + len)
			return 1;
	}
	if (writes) {
		const struct mirror_write *w;
		TAILQ_FOREACH(w, &m->writes, link)
			if (off < w->off + w->len && w->off < off + len)
				return 1;
	}
	return 0;
}

/* Does [off, off+len) meet a guest write parked before `before` (NULL: any)? */
static int
parked_before(const struct mirror *m, const struct vbd_request *before, uint64_t off,
	      uint64_t len)
{
	const struct vbd_request *vr;

	TAILQ_FOREACH(vr, &m->parked, job_link) {
		if (vr == before)
			return 0;
		if (off < vr->td.offset + vr->td.length && vr->td.offset < off + len)
			return 1;
	}
	return 0;
}

/*
 * Whether guest write vr waits: while a copy holds its range, and while it
 * overlaps an earlier guest write still waiting or (on a mirror) in
 * flight. Two overlapping writes then reach the source and the
 * destination in the same order: sent together, a retry of the first
 * (vbd.c resends to the source alone) could land after the second on one
 * side only, and the sides would differ after the pivot.
 */
static int
write_waits(const struct mirror *m, const struct vbd_request *vr)
{
	const struct td_request *td = &vr->td;

	return range_busy(m, td->offset, td->length, !m->stream) ||
	       parked_before(m, vr, td->offset, td->length);
}

/* Parked guest writes that need not wait any more go on, in order. */
static void
unpark(struct mirror *m)
{
	struct vbd_request *vr, *next;

	for (vr = TAILQ_FIRST(&m->parked); vr; vr = next) {
		next = TAILQ_NEXT(vr, job_link);
		if (write_waits(m, vr))
			continue;
		TAILQ_REMOVE(&m->parked, vr, job_link);
		/* checked against the writes parked before it; those after it
		 * must not hold it back when mirror_guest_write sees it again */
		m->unparked = vr;
		vbd_request_send(m->job.vbd, vr);
		m->unparked = NULL;
		if (m->job.stopping)
			break;	/* it failed the job: mirror_cancel sent the others on */
	}
}

/* The next dirty block no copy or guest write is on, from the scan cursor; -1 if none. */
static int64_t
dirty_next(struct mirror *m)
{
	uint64_t nwords = (m->nblocks + 63) / 64;

	for (uint64_t n = 0; n <= nwords; n++) {
		uint64_t w = (m->scan / 64 + n) % nwords, bits = m->dirty[w];
		if (n == 0)
			bits &= ~0ULL << (m->scan % 64);	/* from the cursor on */
		while (bits) {
			uint64_t b = w * 64 + (uint64_t)__builtin_ctzll(bits);
			bits &= bits - 1;
			if (!range_busy(m, b * MIRROR_BLOCK, MIRROR_BLOCK, 1))
				return (int64_t)b;
		}
	}
	return -1;
}

/* ---- copies ---- */

static uint64_t
disk_size(const struct mirror *m)
{
	return m->job.vbd->size;
}

static void
copy_submit(struct mirror_copy *c, struct td_image *img, enum td_op op, unsigned flags,
	    uint64_t off, uint64_t len, void (*done)(struct td_request *, int))
{
	struct td_request *r = &c->req;

	memset(r, 0, sizeof(*r));
	r->op = op;
	r->flags = flags;
	r->offset = off;
	r->length = len;
	r->done = done;
	r->priv = c;
	r->scratch = c->scratch;
	r->scratch_size = c->scratch_size;
	if (op == TD_OP_READ || op == TD_OP_WRITE) {
		c->iov.iov_base = c->buf;
		c->iov.iov_len = len;
		r->iov = &c->iov;
		r->iovcnt = 1;
	} else if (op == TD_OP_BLOCK_STATUS && done == copy_status) {
		r->extents = c->extents;	/* the walk's */
		r->max_extents = MIRROR_EXTENTS;
		r->stop_at = c->m->commit_base;	/* a commit: its segment only */
	} else if (op == TD_OP_BLOCK_STATUS) {
		r->extents = &c->dest_extent;	/* one look at pos */
		r->max_extents = 1;
		if (done == copy_chain_status)
			r->stop_at = c->m->stream_base;	/* --base: only what lies above it */
	}
	td_image_submit(img, r);
}

static void
copy_finished(struct mirror_copy *c)
{
	struct mirror *m = c->m;

	c->busy = 0;
	m->ncopies--;
	unpark(m);	/* guest writes that waited for this range */
	mirror_pump(m);
}

static void
copy_failed(struct mirror_copy *c, const char *what, int err)
{
	blockjob_fail(&c->m->job, "%s at %ju failed: %s", what, (uintmax_t)c->pos,
		      strerror(err));
	copy_finished(c);
}

static void
copy_advance(struct mirror_copy *c, uint64_t n)
{
	c->pos += n;
	c->ext_left -= n;
	if (!c->ext_left && c->next_ext + 1 < c->ext) {
		c->next_ext++;
		c->ext_left = c->extents[c->next_ext].length;
	}
	blockjob_progress(&c->m->job, n);
	copy_step(c);
}

static void
copy_written(struct td_request *r, int err)
{
	struct mirror_copy *c = r->priv;
	if (err)
		copy_failed(c, "writing the destination", err);
	else
		copy_advance(c, c->piece);
}

static void
copy_read(struct td_request *r, int err)
{
	struct mirror_copy *c = r->priv;
	if (err) {
		copy_failed(c, "reading the disk", err);
		return;
	}
	copy_submit(c, c->m->dest, TD_OP_WRITE, 0, c->pos, c->piece, copy_written);
}

static const char zeros[MIRROR_CHUNK];

/* Zeros onto the destination: write-zeroes where it can, else a buffer of them. */
static void
copy_write_zeros(struct mirror_copy *c, uint64_t len)
{
	struct mirror *m = c->m;

	c->piece = len;
	if (m->dest->caps & TD_CAP_WRITE_ZEROES) {
		copy_submit(c, m->dest, TD_OP_WRITE_ZEROES, 0, c->pos, len, copy_written);
		return;
	}
	memcpy(c->buf, zeros, len);
	copy_submit(c, m->dest, TD_OP_WRITE, 0, c->pos, len, copy_written);
}

/* What the destination already reads as zeros needs no writing. */
static void
copy_dest_status(struct td_request *r, int err)
{
	struct mirror_copy *c = r->priv;

	if (!err && r->nr_extents && (r->extents[0].flags & TD_EXTENT_ZERO)) {
		uint64_t n = r->extents[0].length < c->piece ? r->extents[0].length : c->piece;
		copy_advance(c, n);
		return;
	}
	copy_write_zeros(c, (!err && r->nr_extents && r->extents[0].length < c->piece)
			? r->extents[0].length : c->piece);
}

/* A stream: what the chain reads at pos, for a piece the leaf does not hold. */
static void
copy_chain_status(struct td_request *r, int err)
{
	struct mirror_copy *c = r->priv;

	if (err) {
		copy_failed(c, "block status of the disk", err);
		return;
	}
	uint64_t n = r->nr_extents && r->extents[0].length < c->piece ? r->extents[0].length
								     : c->piece;
	uint32_t flags = r->nr_extents ? r->extents[0].flags : 0;

	c->piece = n;
	if (flags & TD_EXTENT_PARENT) {	/* --base: the base (or below) has it, and keeps it */
		copy_advance(c, n);
	} else if ((flags & TD_EXTENT_ZERO) && !c->m->stream_base) {
		copy_advance(c, n);	/* zeros: the leaf alone reads them too */
	} else if (flags & TD_EXTENT_ZERO) {
		/* zeros an image above the base holds: the base's data must not show */
		copy_submit(c, c->m->dest, TD_OP_WRITE_ZEROES, TD_REQ_NO_HOLE, c->pos, n,
			    copy_written);
	} else {
		copy_submit(c, source(c->m), TD_OP_READ, 0, c->pos, n, copy_read);
	}
}

/* A stream's piece: the leaf's own data stays, the parents' comes up. */
static void
stream_step(struct mirror_copy *c, uint32_t flags, uint64_t n)
{
	c->piece = n;
	if (flags & TD_EXTENT_PARENT)
		copy_submit(c, c->m->job.vbd->leaf, TD_OP_BLOCK_STATUS, 0, c->pos, n,
			    copy_chain_status);
	else
		copy_advance(c, n);
}

/* The next piece of the range: skip, zeros, or data. */
static void
copy_step(struct mirror_copy *c)
{
	struct mirror *m = c->m;
	uint64_t end = c->off + c->len;

	if (c->pos >= end || m->job.stopping) {
		copy_finished(c);
		return;
	}
	if (!c->ext_left) {	/* the extents ended short of the range: ask again */
		copy_status_query(c);
		return;
	}
	uint32_t flags = c->extents[c->next_ext].flags;
	uint64_t n = c->ext_left < end - c->pos ? c->ext_left : end - c->pos;

	if (m->stream) {
		stream_step(c, flags, n);
		return;
	}
	c->piece = n;
	if (flags & TD_EXTENT_PARENT) {		/* top: the destination's parents have it */
		copy_advance(c, n);
	} else if (flags & TD_EXTENT_ZERO) {
		if (m->dest->caps & TD_CAP_BLOCK_STATUS)
			copy_submit(c, m->dest, TD_OP_BLOCK_STATUS, 0, c->pos, n, copy_dest_status);
		else
			copy_write_zeros(c, n);
	} else {
		copy_submit(c, source(m), TD_OP_READ, 0, c->pos, n, copy_read);
	}
}

static void
copy_status(struct td_request *r, int err)
{
	struct mirror_copy *c = r->priv;

	if (err) {
		copy_failed(c, "block status of the disk", err);
		return;
	}
	if (!r->nr_extents || !c->extents[0].length) {
		copy_failed(c, "block status of the disk", EIO);	/* a driver's bug: no loop */
		return;
	}
	c->ext = r->nr_extents;
	c->next_ext = 0;
	c->ext_left = c->extents[0].length;
	copy_step(c);
}

/* What the source holds from pos to the range's end. */
static void
copy_status_query(struct mirror_copy *c)
{
	struct mirror *m = c->m;
	uint64_t len = c->off + c->len - c->pos;

	if (m->job.vbd->caps & TD_CAP_BLOCK_STATUS) {
		copy_submit(c, source(m), TD_OP_BLOCK_STATUS,
			    m->top || m->stream ? TD_REQ_ONE_IMAGE : 0, c->pos, len, copy_status);
		return;
	}
	c->ext = 1;	/* all data, then */
	c->next_ext = 0;
	c->extents[0].length = c->ext_left = len;
	c->extents[0].flags = 0;
	copy_step(c);
}

static void
copy_start(struct mirror *m, struct mirror_copy *c, uint64_t off, uint64_t len)
{
	c->busy = 1;
	m->ncopies++;
	c->off = c->pos = off;
	c->len = len;
	c->ext_left = 0;
	copy_status_query(c);
}

static void
timer_fired(evutil_socket_t fd, short what, void *arg)
{
	struct mirror *m = arg;
	(void)fd;
	(void)what;
	m->timer_armed = 0;
	mirror_pump(m);
}

/* Starts the copies there is room and a range for. 1 if the speed limit holds them. */
static int
copies_start(struct mirror *m)
{
	while (m->ncopies < MIRROR_COPIES && m->ndirty && !m->job.stopping && !m->flushing) {
		int64_t b = dirty_next(m);
		if (b < 0)
			return 0;
		uint64_t first = (uint64_t)b, n = 0;
		/* a run of dirty blocks no guest write is on, at most a chunk */
		while (first + n < m->nblocks && n < MIRROR_CHUNK / MIRROR_BLOCK &&
		       dirty_test(m, first + n) &&
		       !range_busy(m, (first + n) * MIRROR_BLOCK, MIRROR_BLOCK, 1))
			n++;
		uint64_t off = first * MIRROR_BLOCK, len = n * MIRROR_BLOCK;
		if (off + len > disk_size(m))
			len = disk_size(m) - off;
		uint64_t wait = m->drained ? 0 : blockjob_throttle(&m->job, len);
		if (wait) {
			struct timeval tv = { (time_t)(wait / 1000000000),
					      (suseconds_t)(wait % 1000000000 / 1000) };
			evtimer_add(m->timer, &tv);
			m->timer_armed = 1;
			return 1;
		}
		for (uint64_t i = 0; i < n; i++)
			dirty_clear(m, first + i);
		m->scan = first + n < m->nblocks ? first + n : 0;
		for (unsigned i = 0; i < MIRROR_COPIES; i++) {
			if (!m->copies[i].busy) {
				copy_start(m, &m->copies[i], off, len);
				break;
			}
		}
	}
	return 0;
}

/* ---- stopping ---- */

struct dest_close {
	struct io_call call;
	struct td_image *leaf;
	struct mirror *m;	/* NULL: nobody waits */
};

static int
dest_close_run(struct io_call *c)
{
	td_chain_close(((struct dest_close *)c)->leaf);
	return 0;
}

static void
dest_closed(struct io_call *c, int res)
{
	struct mirror *m = ((struct dest_close *)c)->m;
	(void)res;
	free(c);
	if (!m)
		return;
	m->closing = 0;
	m->job.state = m->job.error[0] ? BJ_FAILED : BJ_CANCELLED;
	blockjob_stopped(&m->job);
}

/* Closes leaf on a worker; m (if any) is told when it is done. */
static void
dest_close(struct io_engine *io, struct td_image *leaf, struct mirror *m)
{
	struct dest_close *dc = calloc(1, sizeof(*dc));

	if (!dc) {	/* the chain stays open: a leak, not a crash */
		log_err("out of memory closing %s", leaf->params);
		if (m)
			dest_closed(NULL, 0);
		return;
	}
	dc->leaf = leaf;
	dc->m = m;
	dc->call.fn = dest_close_run;
	dc->call.done = dest_closed;
	io_call(io, &dc->call);
}

static void pivot_end(struct mirror *m, int err, const char *msg);

/* Stopping: once no copy or guest write is out, close the destination. */
static void
stop_check(struct mirror *m)
{
	if (!m->job.stopping || m->ncopies || !TAILQ_EMPTY(&m->writes) || m->closing ||
	    m->flushing || m->finishing || !m->dest)
		return;
	if (m->timer_armed) {
		evtimer_del(m->timer);
		m->timer_armed = 0;
	}
	if (m->pivoting)
		pivot_end(m, ECANCELED, m->job.error[0] ? m->job.error : "the mirror was cancelled");
	if (m->stream) {	/* its destination is the leaf: the vbd's */
		m->dest = NULL;
		m->job.state = m->job.error[0] ? BJ_FAILED : BJ_CANCELLED;
		blockjob_stopped(&m->job);
		return;
	}
	m->closing = 1;
	struct td_image *dest = m->dest;
	m->dest = NULL;
	dest_close(mirror_loop(m)->io, dest, m);
}

static void
mirror_cancel(struct blockjob *job)
{
	struct mirror *m = job_mirror(job);
	struct vbd_request *vr;

	job->stopping = 1;
	if (m->finishing && !m->detaching) {	/* a stream's quiesce, not drained yet */
		m->finishing = 0;
		vbd_resume(job->vbd);
	}
	/* guest writes that waited for a copy go on, to the disk alone */
	while ((vr = TAILQ_FIRST(&m->parked))) {
		TAILQ_REMOVE(&m->parked, vr, job_link);
		vbd_request_send(job->vbd, vr);
	}
	mirror_pump(m);
}

/* ---- pivot ---- */

static void
pivot_end(struct mirror *m, int err, const char *msg)
{
	vbd_done_fn fn = m->pivot_fn;

	m->pivoting = m->drained = 0;
	m->pivot_fn = NULL;
	vbd_resume(m->job.vbd);
	if (fn)
		fn(m->pivot_arg, err, msg);
}

static void
pivot_flushed(struct td_request *r, int err)
{
	struct mirror *m = r->priv;
	struct vbd *vbd = m->job.vbd;

	m->flushing = 0;
	if (err) {
		blockjob_fail(&m->job, "flushing the destination failed: %s", strerror(err));
		mirror_pump(m);
		return;
	}
	char *params = strdup(m->dest_params);	/* the vbd's; the job keeps its copy */
	struct td_image *dest = m->dest;

	if (!params) {
		blockjob_fail(&m->job, "out of memory");
		mirror_pump(m);
		return;
	}
	m->dest = NULL;
	log_info("minor %d: %s: switched to %s", vbd->minor, m->job.type, params);
	vbd_swap_chain(vbd, dest, params, m->commit_base != NULL);
	m->job.state = BJ_DONE;
	pivot_end(m, 0, NULL);
	blockjob_stopped(&m->job);
}

/* Quiesced: copy what is left, flush the destination, swap. */
static void
pivot_check(struct mirror *m)
{
	if (!m->pivoting || !m->drained || m->ncopies || m->ndirty || m->flushing ||
	    m->job.stopping)
		return;
	m->flushing = 1;
	memset(&m->flush, 0, sizeof(m->flush));
	m->flush.priv = m;
	if (!(m->dest->caps & TD_CAP_FLUSH)) {
		pivot_flushed(&m->flush, 0);
		return;
	}
	m->flush.op = TD_OP_FLUSH;
	m->flush.done = pivot_flushed;
	m->flush.scratch = m->copies[0].scratch;	/* the copies are idle */
	m->flush.scratch_size = m->copies[0].scratch_size;
	td_image_submit(m->dest, &m->flush);
}

static void
pivot_drained(void *arg)
{
	struct mirror *m = arg;
	m->drained = 1;
	mirror_pump(m);
}

static void
pivot_begin(struct mirror *m, vbd_done_fn done, void *arg)
{
	m->pivoting = 1;
	m->pivot_fn = done;
	m->pivot_arg = arg;
	vbd_quiesce(m->job.vbd, pivot_drained, m);
}

void
mirror_pivot(struct blockjob *job, vbd_done_fn done, void *arg)
{
	struct mirror *m;

	if (!job || strcmp(job->type, "mirror") || !blockjob_busy(job)) {
		done(arg, EINVAL, job && blockjob_busy(job) ? "the job is not a mirror"
			     : "no mirror is running");
		return;
	}
	m = job_mirror(job);
	if (job->stopping || m->pivoting) {
		done(arg, EBUSY, job->stopping ? "the mirror is being cancelled"
			     : "the mirror is already switching");
		return;
	}
	if (job->state != BJ_READY) {
		char msg[160];
		snprintf(msg, sizeof(msg), "the mirror is not ready yet: %ju of %ju bytes copied",
			 (uintmax_t)job->bytes_done, (uintmax_t)job->bytes_total);
		done(arg, EAGAIN, msg);
		return;
	}
	pivot_begin(m, done, arg);
}

/* ---- the pump: run on the loop's next turn, never from inside a completion ---- */

static void stream_finish(struct mirror *m);
static void pivot_begin(struct mirror *m, vbd_done_fn done, void *arg);

static void
pump_now(struct mirror *m)
{
	int throttled = copies_start(m);
	int converged = !throttled && !m->ncopies && !m->ndirty && m->job.state == BJ_RUNNING &&
			!m->job.stopping && TAILQ_EMPTY(&m->parked);

	if (converged && (m->stream || m->commit_child) && !m->finishing) {
		stream_finish(m);
	} else if (converged && !m->stream && !m->commit_child) {
		m->job.state = BJ_READY;
		log_info("minor %d: %s to %s ready", m->job.vbd->minor, m->job.type,
			 m->dest_params);
		if (m->commit_base && !m->pivoting)	/* a commit ends by itself */
			pivot_begin(m, NULL, NULL);
	}
	pivot_check(m);
	stop_check(m);
}

static void
pump_deferred(struct io_defer *d)
{
	struct mirror *m = d->arg;
	m->kick_pending = 0;
	pump_now(m);
}

static void
mirror_pump(struct mirror *m)
{
	if (m->kick_pending)
		return;
	m->kick_pending = 1;
	m->kick.fn = pump_deferred;
	m->kick.arg = m;
	io_defer(mirror_loop(m)->io, &m->kick);
}

/* ---- guest writes ---- */

static void mirror_write_end(struct mirror_write *w);

static void
write_dest_done(struct td_request *td, int err)
{
	struct mirror_write *w = td->priv;

	w->dest_out = 0;
	if (err)
		blockjob_fail(&w->m->job, "writing the destination at %ju failed: %s",
			      (uintmax_t)td->offset, strerror(err));
	if (w->src_done) {
		struct vbd_request *vr = w->vr;
		int src_err = w->src_err;
		mirror_write_end(w);
		vbd_request_end(vr, src_err);
	}
}

static int
mirror_guest_write(struct blockjob *job, struct vbd_request *vr)
{
	struct mirror *m = job_mirror(job);
	struct td_request *td = &vr->td;
	struct mirror_write *w;

	if (m->commit_child)
		return 0;	/* the leaf above the merged images: none of the job's business */

	if (vr->job_write) {	/* started before the job and only now sent: mirrored instead */
		w = vr->job_write;
		TAILQ_REMOVE(&m->writes, w, link);
		vr->job_write = NULL;
		free(w);
	}
	if (vr != m->unparked && write_waits(m, vr)) {
		TAILQ_INSERT_TAIL(&m->parked, vr, job_link);
		return 1;
	}
	w = calloc(1, sizeof(*w) + m->dest_scratch);
	if (!w) {
		blockjob_fail(job, "out of memory");
		return 0;
	}
	w->m = m;
	w->vr = vr;
	w->off = td->offset;
	w->len = td->length;
	vr->job_write = w;
	TAILQ_INSERT_TAIL(&m->writes, w, link);
	if (m->stream)
		return 0;	/* only kept off the ranges being copied */
	if (td->op == TD_OP_DISCARD ||
	    (td->op == TD_OP_WRITE_ZEROES && !(m->dest->caps & TD_CAP_WRITE_ZEROES))) {
		w->mark_dirty = 1;	/* copied again once the disk has it */
		return 0;
	}
	w->td.op = td->op;
	w->td.flags = td->flags & TD_REQ_NO_HOLE;
	w->td.offset = td->offset;
	w->td.length = td->length;
	w->td.iov = td->iov;
	w->td.iovcnt = td->iovcnt;
	w->td.done = write_dest_done;
	w->td.priv = w;
	w->td.scratch = w + 1;
	w->td.scratch_size = m->dest_scratch;
	w->dest_out = 1;
	td_image_submit(m->dest, &w->td);
	return 0;
}

static void
mirror_write_end(struct mirror_write *w)
{
	struct mirror *m = w->m;

	TAILQ_REMOVE(&m->writes, w, link);
	w->vr->job_write = NULL;
	if (w->mark_dirty && !w->src_err && !m->job.stopping)
		dirty_set(m, w->off, w->len);
	free(w);
	unpark(m);	/* guest writes that overlapped it */
	mirror_pump(m);	/* a copy may have waited for this range */
}

/*
 * Writes already in flight when the job starts went to the disk alone: no
 * copy may read their blocks until they are back, and then they are copied
 * again.
 */
static int
mirror_adopt_inflight(struct mirror *m)
{
	struct vbd_request *vr;

	TAILQ_FOREACH(vr, &m->job.vbd->inflight, link) {
		enum td_op op = vr->td.op;
		if (op != TD_OP_WRITE && op != TD_OP_WRITE_ZEROES && op != TD_OP_DISCARD)
			continue;
		struct mirror_write *w = calloc(1, sizeof(*w));
		if (!w)
			return -ENOMEM;
		w->m = m;
		w->vr = vr;
		w->off = vr->td.offset;
		w->len = vr->td.length;
		w->mark_dirty = 1;
		vr->job_write = w;
		TAILQ_INSERT_TAIL(&m->writes, w, link);
	}
	return 0;
}

static int
mirror_guest_write_done(struct blockjob *job, struct vbd_request *vr, int err)
{
	struct mirror_write *w = vr->job_write;
	(void)job;

	w->src_done = 1;
	w->src_err = err;
	if (w->dest_out)
		return 1;
	mirror_write_end(w);
	return 0;
}

/* ---- a stream's end: the leaf drops its parents ---- */

struct stream_detach {
	struct io_call call;
	struct mirror *m;
	struct td_error err;
};

/* The last step: a stream's leaf drops its parents, a commit's child takes the base. */
static int
stream_detach_run(struct io_call *c)
{
	struct stream_detach *sd = (struct stream_detach *)c;
	struct mirror *m = sd->m;

	if (m->commit_child)
		return td_chain_rebase(m->commit_child, m->dest, 1, &sd->err);
	if (m->stream_base)
		return td_chain_rebase(m->job.vbd->leaf, m->stream_base, 0, &sd->err);
	return td_chain_detach(m->job.vbd->leaf, &sd->err);
}

static void
stream_detached(struct io_call *c, int res)
{
	struct stream_detach *sd = (struct stream_detach *)c;
	struct mirror *m = sd->m;
	struct vbd *vbd = m->job.vbd;

	m->finishing = m->detaching = 0;
	m->commit_top = NULL;	/* closed by the rebase, or not needed any more */
	if (res < 0) {
		blockjob_fail(&m->job, "%s", sd->err.msg);
	} else {
		vbd_chain_changed(vbd);
		m->dest = NULL;	/* the chain's now (a commit's base) */
		m->job.state = BJ_DONE;
		if (m->commit_child)	/* the top is closed now: not named */
			log_info("minor %d: commit done: merged into %s", vbd->minor,
				 m->dest_params);
		else if (m->stream_base)
			log_info("minor %d: stream done: %s's parent is %s now", vbd->minor,
				 vbd->params, m->stream_base->path);
		else
			log_info("minor %d: stream done: %s has no parent now", vbd->minor,
				 vbd->params);
	}
	free(sd);
	vbd_resume(vbd);
	if (m->job.state == BJ_DONE)
		blockjob_stopped(&m->job);
	else
		mirror_pump(m);
}

static void stream_detach_start(struct mirror *m);

/* A commit's base holds its data durably before the child names it. */
static void
finish_flushed(struct td_request *r, int err)
{
	struct mirror *m = r->priv;

	if (err) {
		m->finishing = 0;
		vbd_resume(m->job.vbd);
		blockjob_fail(&m->job, "flushing %s failed: %s", m->dest_params, strerror(err));
		return;
	}
	stream_detach_start(m);
}

/* Quiesced: nothing in flight touches the chain's metadata while it changes. */
static void
stream_drained(void *arg)
{
	struct mirror *m = arg;

	if (m->job.stopping) {	/* cancelled while it drained */
		m->finishing = 0;
		vbd_resume(m->job.vbd);
		mirror_pump(m);
		return;
	}
	if (m->commit_child && (m->dest->caps & TD_CAP_FLUSH)) {
		memset(&m->flush, 0, sizeof(m->flush));
		m->flush.op = TD_OP_FLUSH;
		m->flush.done = finish_flushed;
		m->flush.priv = m;
		m->flush.scratch = m->copies[0].scratch;	/* the copies are idle */
		m->flush.scratch_size = m->copies[0].scratch_size;
		td_image_submit(m->dest, &m->flush);
		return;
	}
	stream_detach_start(m);
}

static void
stream_detach_start(struct mirror *m)
{
	struct stream_detach *sd;

	if (!(sd = calloc(1, sizeof(*sd)))) {
		m->finishing = 0;
		vbd_resume(m->job.vbd);
		blockjob_fail(&m->job, "out of memory");
		return;
	}
	sd->m = m;
	m->detaching = 1;
	sd->call.fn = stream_detach_run;
	sd->call.done = stream_detached;
	io_call(m->job.vbd->loop->io, &sd->call);
}

static void
stream_finish(struct mirror *m)
{
	m->finishing = 1;
	vbd_quiesce(m->job.vbd, stream_drained, m);
}

/* ---- the job ---- */

static void
mirror_describe(const struct blockjob *job, json_t *doc)
{
	const struct mirror *m = (const struct mirror *)job;

	if (!strcmp(job->type, "mirror"))
		json_object_set_new(doc, "sync", json_string(m->top ? "top" : "full"));
	if (m->dest_params)
		json_object_set_new(doc, "dest", json_string(m->dest_params));
	json_object_set_new(doc, "dirty_bytes",
			    json_integer((json_int_t)(m->ndirty * MIRROR_BLOCK)));
}

static void
mirror_free(struct blockjob *job)
{
	struct mirror *m = job_mirror(job);

	for (unsigned i = 0; i < MIRROR_COPIES; i++) {
		free(m->copies[i].buf);
		free(m->copies[i].scratch);
	}
	if (m->timer)
		event_free(m->timer);
	free(m->dirty);
	free(m->dest_params);
	free(m);
}

/* One table for the three: they differ in their struct mirror, not their code. */
static const struct blockjob_ops mirror_ops = {
	.cancel = mirror_cancel,
	.guest_write = mirror_guest_write,
	.guest_write_done = mirror_guest_write_done,
	.describe = mirror_describe,
	.free = mirror_free,
};

/* ---- starting ---- */

/* 1 if vbd may start a job (writes: it writes the vbd's chain), else replied. */
static int
job_may_start(struct vbd *vbd, int writes, vbd_done_fn done, void *arg)
{
	if (vbd->job_starting || blockjob_busy(vbd->job))
		done(arg, EBUSY, "the vbd already has a block job: cancel it first");
	else if (vbd->state || !vbd->leaf)
		done(arg, EBUSY, "the vbd must be open and running (not paused)");
	else if (writes && vbd->readonly)
		done(arg, EROFS, "the vbd is read-only: the job would write its chain");
	else
		return 1;
	return 0;
}

/* ---- a mirror's destination opens on a worker ---- */

struct mirror_open {
	struct io_call call;
	struct vbd *vbd;
	char *params;
	unsigned oflags;
	int top;
	uint64_t speed;
	struct td_image *leaf;
	struct td_error err;
	vbd_done_fn done;
	void *arg;
};

static int
mirror_open_run(struct io_call *c)
{
	struct mirror_open *mo = (struct mirror_open *)c;
	struct td_open_ctx ctx = { .io = mo->vbd->loop->io, .timeout = mo->vbd->timeout };
	return td_chain_open(mo->params, mo->oflags, &ctx, &mo->leaf, &mo->err);
}

/* dest: a mirror's destination, or a stream's leaf. */
static struct mirror *
mirror_new(struct vbd *vbd, struct td_image *dest, int top, int stream, uint64_t speed)
{
	struct mirror *m = calloc(1, sizeof(*m));
	size_t src = td_chain_scratch_size(vbd->leaf), dst = td_chain_scratch_size(dest);

	if (!m)
		return NULL;
	blockjob_init(&m->job, &mirror_ops, stream ? "stream" : "mirror", vbd, speed);
	TAILQ_INIT(&m->writes);
	TAILQ_INIT(&m->parked);
	m->top = top;
	m->stream = stream;
	m->dest_scratch = dst;
	m->nblocks = (vbd->size + MIRROR_BLOCK - 1) / MIRROR_BLOCK;
	m->dirty = calloc((m->nblocks + 63) / 64 + 1, sizeof(uint64_t));
	m->timer = evtimer_new(vbd->loop->base, timer_fired, m);
	int ok = m->dirty && m->timer;
	for (unsigned i = 0; ok && i < MIRROR_COPIES; i++) {
		struct mirror_copy *c = &m->copies[i];
		c->m = m;
		c->scratch_size = src > dst ? src : dst;
		c->scratch = c->scratch_size ? calloc(1, c->scratch_size) : NULL;
		ok = posix_memalign(&c->buf, 4096, MIRROR_CHUNK) == 0 &&
		     (c->scratch || !c->scratch_size);
	}
	if (!ok) {
		mirror_free(&m->job);
		return NULL;
	}
	if (vbd->size)
		dirty_set(m, 0, vbd->size);
	m->job.bytes_total = vbd->size;
	return m;
}

static void
mirror_opened(struct io_call *c, int res)
{
	struct mirror_open *mo = (struct mirror_open *)c;
	struct vbd *vbd = mo->vbd;	/* kept: a close waits for job_starting */
	struct mirror *m = NULL;
	char msg[sizeof(mo->err.msg) + 64] = "";

	vbd->job_starting = 0;
	if (res < 0)
		snprintf(msg, sizeof(msg), "%s", mo->err.msg);
	else if (vbd->state || !vbd->leaf)
		snprintf(msg, sizeof(msg), "the vbd was paused or closed while %s opened",
			 mo->params);
	else if (mo->leaf->size != vbd->size)
		snprintf(msg, sizeof(msg), "%s is %ju bytes and the disk %ju: the destination "
			 "must have the disk's size", mo->params, (uintmax_t)mo->leaf->size,
			 (uintmax_t)vbd->size);
	else if (vbd->min_io % mo->leaf->min_io || MIRROR_BLOCK % mo->leaf->min_io)
		snprintf(msg, sizeof(msg), "%s needs %u-byte aligned I/O, the disk's clients "
			 "send %u", mo->params, mo->leaf->min_io, vbd->min_io);
	else if (!(m = mirror_new(vbd, mo->leaf, mo->top, 0, mo->speed)))
		snprintf(msg, sizeof(msg), "out of memory");
	if (msg[0]) {
		if (mo->leaf)
			dest_close(vbd->loop->io, mo->leaf, NULL);
		mo->done(mo->arg, res < 0 ? mo->err.code : EINVAL, msg);
		vbd_job_stopped(vbd);	/* a close may wait for this */
	} else {
		if (mirror_adopt_inflight(m) < 0)
			blockjob_fail(&m->job, "out of memory");
		m->dest = mo->leaf;
		m->dest_params = mo->params;
		mo->params = NULL;
		blockjob_free(vbd->job);	/* the last one's summary */
		vbd->job = &m->job;
		log_info("minor %d: mirror to %s started (%s%s)", vbd->minor, m->dest_params,
			 m->top ? "top" : "full", m->job.speed ? ", speed limited" : "");
		mo->done(mo->arg, 0, NULL);
		mirror_pump(m);
	}
	free(mo->params);
	free(mo);
}

void
mirror_start(struct vbd *vbd, const char *dest, int top, uint64_t speed, vbd_done_fn done,
	     void *arg)
{
	struct mirror_open *mo;

	if (!job_may_start(vbd, 0, done, arg))
		return;
	mo = calloc(1, sizeof(*mo));
	if (!mo || !(mo->params = strdup(dest))) {
		free(mo);
		done(arg, ENOMEM, "out of memory");
		return;
	}
	mo->vbd = vbd;
	mo->top = top;
	mo->speed = speed;
	mo->done = done;
	mo->arg = arg;
	mo->oflags = (vbd->nodirect ? TD_OPEN_NODIRECT : 0) | vbd->srv->open_flags;
	mo->call.fn = mirror_open_run;
	mo->call.done = mirror_opened;
	vbd->job_starting = 1;
	io_call(vbd->loop->io, &mo->call);
}

void
stream_start(struct vbd *vbd, const char *base, uint64_t speed, vbd_done_fn done, void *arg)
{
	struct mirror *m;
	struct td_image *b = NULL;

	if (!job_may_start(vbd, 1, done, arg))
		return;
	if (!vbd->leaf->parent) {
		done(arg, EINVAL, "nothing to stream: the leaf has no parent");
		return;
	}
	if (base) {
		char msg[PATH_MAX + 128];
		for (b = vbd->leaf->parent->parent; b && strcmp(b->path, base); b = b->parent)
			;
		if (!b) {
			snprintf(msg, sizeof(msg), "%s is not below the leaf's parent in minor %d's "
				 "chain", base, vbd->minor);
			done(arg, EINVAL, msg);
			return;
		}
	}
	if (b ? !vbd->leaf->drv->set_parent : !vbd->leaf->drv->detach_parent) {
		char msg[128];
		snprintf(msg, sizeof(msg), "a %s leaf cannot %s (vhd and qcow2 can)",
			 vbd->leaf->drv->name, b ? "change its parent" : "drop its parent");
		done(arg, ENOTSUP, msg);
		return;
	}
	if (!(m = mirror_new(vbd, vbd->leaf, 0, 1, speed))) {
		done(arg, ENOMEM, "out of memory");
		return;
	}
	m->dest = vbd->leaf;
	m->stream_base = b;
	if (mirror_adopt_inflight(m) < 0)
		blockjob_fail(&m->job, "out of memory");
	blockjob_free(vbd->job);
	vbd->job = &m->job;
	log_info("minor %d: stream into %s started", vbd->minor, vbd->params);
	done(arg, 0, NULL);
	mirror_pump(m);
}

/* ---- commit: the destination is the base, made writable on a worker ---- */

struct commit_open {
	struct io_call call;
	struct vbd *vbd;
	struct td_image *child;		/* the image above the top: the leaf's... */
	struct td_image *top;		/* ...child for an active commit (top is the leaf) */
	struct td_image *base;
	uint64_t speed;
	struct td_image *rw;
	struct td_error err;
	vbd_done_fn done;
	void *arg;
};

static int
commit_open_run(struct io_call *c)
{
	struct commit_open *co = (struct commit_open *)c;
	struct td_open_ctx ctx = { .io = co->vbd->loop->io, .timeout = co->vbd->timeout };
	unsigned oflags = (co->vbd->nodirect ? TD_OPEN_NODIRECT : 0) | co->vbd->srv->open_flags;

	/* every image from the top down to the base must be this disk's alone */
	return td_image_open_writable(co->child ? co->child : co->top, co->base, oflags, &ctx,
				      &co->rw, &co->err);
}

static void
commit_opened(struct io_call *c, int res)
{
	struct commit_open *co = (struct commit_open *)c;
	struct vbd *vbd = co->vbd;	/* kept: a close waits for job_starting */
	struct mirror *m = NULL;
	const char *why = NULL;

	vbd->job_starting = 0;
	if (res < 0)
		why = co->err.msg;
	else if (vbd->state || !vbd->leaf)
		why = "the vbd was paused or closed while the base opened";
	else if (co->rw->size != vbd->size)
		why = "the base's size differs from the disk's (a grown leaf): not merged";
	else if (vbd->min_io % co->rw->min_io)
		why = "the base needs larger aligned I/O than the disk's clients send";
	else if (!(m = mirror_new(vbd, co->rw, 0, 0, co->speed)) ||
		 !(m->dest_params = strdup(co->base->params)))
		why = "out of memory";
	if (why) {
		if (m) {
			mirror_free(&m->job);
			m = NULL;
		}
		if (co->rw)
			dest_close(vbd->loop->io, co->rw, NULL);
		co->done(co->arg, res < 0 ? co->err.code : EINVAL, why);
		vbd_job_stopped(vbd);
		free(co);
		return;
	}
	m->job.type = "commit";
	m->commit_base = co->base;
	m->commit_top = co->top;
	m->commit_child = co->child;
	m->dest = co->rw;
	if (!co->child && mirror_adopt_inflight(m) < 0)
		blockjob_fail(&m->job, "out of memory");
	blockjob_free(vbd->job);
	vbd->job = &m->job;
	log_info("minor %d: commit of %s into %s started", vbd->minor, co->top->path,
		 m->dest_params);
	co->done(co->arg, 0, NULL);
	free(co);
	mirror_pump(m);
}

void
commit_start(struct vbd *vbd, const char *top, const char *base, uint64_t speed,
	     vbd_done_fn done, void *arg)
{
	struct td_image *t = vbd->leaf, *child = NULL, *b;
	struct commit_open *co;
	char msg[PATH_MAX + 128];

	if (!job_may_start(vbd, 1, done, arg))
		return;
	for (; top && t && strcmp(t->path, top); t = t->parent)
		child = t;
	if (!t) {
		snprintf(msg, sizeof(msg), "%s is not in minor %d's chain", top, vbd->minor);
		done(arg, EINVAL, msg);
		return;
	}
	if (!t->parent) {
		done(arg, EINVAL, "nothing to commit into: the top has no parent");
		return;
	}
	if (t->size != vbd->size) {
		done(arg, ENOTSUP, "the disk grew since the top was made: not merged");
		return;
	}
	if (child && !child->drv->set_parent) {
		snprintf(msg, sizeof(msg), "%s is a %s image, which cannot be pointed at another "
			 "parent (vhd and qcow2 can)", child->path, child->drv->name);
		done(arg, ENOTSUP, msg);
		return;
	}
	for (b = t->parent; b && base && strcmp(b->path, base); b = b->parent)
		;
	if (!b) {
		snprintf(msg, sizeof(msg), "%s is not below %s in minor %d's chain", base, t->path,
			 vbd->minor);
		done(arg, EINVAL, msg);
		return;
	}
	if (!(co = calloc(1, sizeof(*co)))) {
		done(arg, ENOMEM, "out of memory");
		return;
	}
	co->vbd = vbd;
	co->top = t;
	co->child = child;
	co->base = b;
	co->speed = speed;
	co->done = done;
	co->arg = arg;
	co->call.fn = commit_open_run;
	co->call.done = commit_opened;
	vbd->job_starting = 1;
	io_call(vbd->loop->io, &co->call);
}
