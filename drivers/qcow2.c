/*
 * qcow2: qemu's copy-on-write format, versions 2 and 3, on the request path.
 *
 * Guest clusters map through the L1 table (in memory) and L2 tables (a
 * bounded cache, loaded asynchronously); refcount blocks are cached the same
 * way. Reads go to the data cluster, to the backing file, to zeros, or
 * through inflate for compressed clusters. Everything after open is
 * asynchronous and never waits on the disk from the loop.
 *
 * Writes to an allocated cluster go in place. A write to any other cluster
 * (unallocated, zero, compressed) becomes that cluster's allocation job:
 * its data is completed to a whole cluster first (copy-on-write from the
 * backing file or the compressed data, or zeros), then jobs are allocated
 * in batches, one batch at a time, always at the end of the file (freed
 * clusters are never reused, so a crash can never make two guest clusters
 * share one), in the order qemu's documentation prescribes so that a crash
 * of the process leaves at worst leaked clusters:
 *   1. refcounts: the refcount blocks counting the new clusters (new blocks
 *      whole, existing ones the changed bytes);
 *   2. the refcount table entries of new blocks (or a grown table, then the
 *      header pointing at it);
 *   3. the data of every new cluster, and new L2 tables whole;
 *   4. the L2 entries that make the data reachable, and L1 entries of new
 *      L2 tables;
 * and only then are the writes acknowledged. Clusters a batch unlinks
 * (discard, zeroing, overwritten compressed data) lose their references
 * in step 4 and their refcounts in step 1 of a later batch (or at close).
 * Writes to a cluster being allocated wait for it: it is allocated once.
 */
#include "driver.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "file_io.h"
#include "log.h"
#include "qcow2_file.h"
#include "qcow2_format.h"

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define Q_INLINE_IOV	4
#define Q_HASH		64
#define Q_JOB_HASH	256
#define Q_BATCH_MAX	256		/* jobs per allocation batch */
#define Q_L2_CACHE	(4u << 20)	/* bytes of L2 tables cached per image */
#define Q_RB_CACHE	(1u << 20)	/* bytes of refcount blocks */
#define Q_CACHE_MIN	4		/* entries, whatever the cluster size */
#define Q_ZERO_BYTES	(2u << 20)	/* one cluster of the largest size */

static char q_zeros[Q_ZERO_BYTES] __attribute__((aligned(4096)));

struct qcow2;
struct qop;
struct job;

/* Someone waiting for a cache entry or a job. */
struct mwait {
	void (*fn)(struct mwait *w, int err);
	TAILQ_ENTRY(mwait) link;
};
TAILQ_HEAD(mwait_list, mwait);

/* A cached L2 table or refcount block: one cluster, as on disk. */
struct centry {
	struct mcache *c;
	uint64_t idx;			/* L1 index, or refcount table index */
	uint64_t host;
	int loading;
	unsigned refs;			/* pins; never evicted while > 0 */
	uint8_t *buf;
	struct mwait_list waiters;
	struct io_op op;
	struct iovec iov;
	LIST_ENTRY(centry) hash;
	TAILQ_ENTRY(centry) lru;
};

struct mcache {
	struct qcow2 *q;
	int is_l2;
	LIST_HEAD(, centry) hash[Q_HASH];
	TAILQ_HEAD(centry_lru, centry) lru;
	unsigned count, max;
};

/* One incoming request. */
struct qreq {
	struct td_request *req;
	struct qcow2 *q;
	int pending;			/* pieces in flight, +1 while issuing */
	int err;
	struct io_op sync_op;		/* FUA */
	struct mwait wait;		/* block status: an L2 table loading */
};

/* One piece of a request: a range inside one L2 table's span, or one run. */
struct qop {
	struct qreq *qr;
	struct qcow2 *q;
	uint64_t off, len;		/* guest bytes */
	int zero;			/* write zeros, not the request's data */
	int mode;			/* whole-cluster zeroing: enum zmode */
	uint64_t entry;			/* the L2 entry a run was classified by */
	struct mwait wait;
	struct io_op op;
	struct td_request sub;		/* a read from the backing file */
	struct iovec *iov;
	int iovcnt;
	struct iovec iov_inline[Q_INLINE_IOV];
	struct iovec miov;		/* a read of metadata or compressed bytes */
	uint8_t *buf;			/* compressed bytes */
	uint8_t *cluster;		/* an inflated cluster */
	uint64_t csize;
	struct io_call call;		/* inflate, off the loop */
	struct job *job;		/* the allocation it started */
	void (*next)(struct qop *v, int err);	/* where an I/O completion goes */
	void (*after)(struct qop *v, int err);	/* where an inflate goes */
	void (*resume)(struct qop *v);		/* after a wait: start again */
};

/* What whole-cluster zeroing makes of the entries (by op, version, backing). */
enum zmode {
	ZM_DEALLOC,			/* unallocated: reads zero (no backing) */
	ZM_ZERO,			/* v3 zero flag, the old cluster freed */
	ZM_ZERO_KEEP,			/* v3 zero flag on the kept allocation */
};

/* Work on clusters others must wait for. */
struct job {
	enum { JOB_ALLOC, JOB_ZERO } kind;
	uint64_t first, count;		/* guest clusters (ALLOC: count 1) */
	struct qop *v;			/* the piece it completes */
	uint64_t old;			/* ALLOC: the entry it replaces */
	uint64_t host;			/* ALLOC: the new cluster (planned) */
	uint8_t *bounce;		/* ALLOC: the whole cluster, copy-on-write */
	struct iovec *data;		/* ALLOC: what goes into the new cluster */
	int ndata;
	int err;
	struct mwait_list waiting;	/* later writes to these clusters */
	LIST_ENTRY(job) hash;		/* ALLOC, by cluster */
	TAILQ_ENTRY(job) range;		/* ZERO: all of them */
	TAILQ_ENTRY(job) queue;		/* waiting for a batch */
};
TAILQ_HEAD(job_list, job);

struct qcow2 {
	struct td_image *img;
	struct td_file f;
	struct qcow2_meta m;
	int rdonly;
	unsigned span_bits;		/* log2 of the guest bytes one L2 table maps */
	uint64_t next_free;		/* bytes: new clusters go here, never below */
	uint64_t known_end;		/* bytes of the file known to be written */
	struct mcache l2c, rbc;
	LIST_HEAD(, job) jobs[Q_JOB_HASH];
	struct job_list zero_jobs;
	struct job_list ready;		/* waiting for a batch */
	struct batch *batch;		/* the one in flight */
	uint64_t *frees;		/* host clusters to decrement */
	size_t nfrees, cap_frees;
	struct log_ratelimit rl;
};

static void qop_finish(struct qop *v, int err);
static void write_range(struct qop *v);
static void zero_range(struct qop *v);
static void batch_start(struct qcow2 *q);

static uint64_t
div_up(uint64_t v, uint64_t d)
{
	return v / d + (v % d != 0);
}

static uint64_t
min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static uint64_t
cluster_of(const struct qcow2 *q, uint64_t off)
{
	return off >> q->m.cluster_bits;
}

/* The raw L2 entry of guest cluster c in a table (NULL: no table, unallocated). */
static uint64_t
l2_entry(const struct qcow2 *q, const struct centry *l2, uint64_t c)
{
	if (!l2)
		return 0;
	return qcow2_be64(l2->buf + 8 * (c & (q->m.l2_entries - 1)));
}

/* Entries were checked when their table was loaded (qcow2_l2_check). */
static enum qcow2_ckind
entry_kind(uint64_t e)
{
	if (e & QCOW2_COMPRESSED)
		return QCOW2_COMPRESSED_DATA;
	if (e & QCOW2_ZERO)
		return QCOW2_ZERO_CLUSTER;
	return (e & QCOW2_OFFSET_MASK) ? QCOW2_DATA : QCOW2_UNALLOCATED;
}

static struct qcow2_cluster
entry_decode(const struct qcow2 *q, uint64_t e)
{
	struct qcow2_cluster c;
	char why[96];
	if (qcow2_l2_decode(&q->m, e, q->next_free, &c, why, sizeof(why)) < 0)
		c.kind = QCOW2_UNALLOCATED;	/* cannot happen: checked at load */
	return c;
}

/* A buffer O_DIRECT can take (aligned_alloc wants whole alignment units). */
static void *
buf_alloc(size_t len)
{
	return aligned_alloc(4096, (len + 4095) / 4096 * 4096);
}

static void
io_prep_meta(struct qcow2 *q, struct io_op *op, enum io_opcode opc, struct iovec *iov,
	     void *buf, size_t len, uint64_t off)
{
	iov->iov_base = buf;
	iov->iov_len = len;
	op->opcode = opc;
	op->flags = q->f.io_flags;
	op->fd = q->f.fd;
	op->offset = off;
	op->iov = iov;
	op->iovcnt = 1;
}

/* ---- the metadata cache ---- */

static void
cache_init(struct mcache *c, struct qcow2 *q, int is_l2, unsigned bytes)
{
	c->q = q;
	c->is_l2 = is_l2;
	for (int i = 0; i < Q_HASH; i++)
		LIST_INIT(&c->hash[i]);
	TAILQ_INIT(&c->lru);
	c->max = bytes / q->m.cluster_size;
	if (c->max < Q_CACHE_MIN)
		c->max = Q_CACHE_MIN;
}

static struct centry *
cache_find(struct mcache *c, uint64_t idx)
{
	struct centry *e;
	LIST_FOREACH(e, &c->hash[idx % Q_HASH], hash)
		if (e->idx == idx)
			return e;
	return NULL;
}

static void
cache_drop(struct centry *e)
{
	LIST_REMOVE(e, hash);
	TAILQ_REMOVE(&e->c->lru, e, lru);
	e->c->count--;
	free(e->buf);
	free(e);
}

static void
cache_evict(struct mcache *c)
{
	struct centry *e, *prev;
	for (e = TAILQ_LAST(&c->lru, centry_lru); e && c->count > c->max; e = prev) {
		prev = TAILQ_PREV(e, centry_lru, lru);
		if (!e->refs && !e->loading)
			cache_drop(e);
	}
}

/* A table made in memory (a new L2 table or refcount block): buf is the cache's now. */
static struct centry *
cache_insert(struct mcache *c, uint64_t idx, uint64_t host, uint8_t *buf)
{
	struct centry *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->c = c;
	e->idx = idx;
	e->host = host;
	e->buf = buf;
	TAILQ_INIT(&e->waiters);
	LIST_INSERT_HEAD(&c->hash[idx % Q_HASH], e, hash);
	TAILQ_INSERT_HEAD(&c->lru, e, lru);
	c->count++;
	return e;
}

static void
cache_loaded(struct io_op *op, int res)
{
	struct centry *e = op->data;
	struct qcow2 *q = e->c->q;
	struct mwait_list waiters;
	char why[160];
	int err = res < 0 ? -res : 0;

	if (!err && e->c->is_l2 &&
	    qcow2_l2_check(&q->m, e->buf, q->next_free, why, sizeof(why)) < 0) {
		log_limited(&q->rl, LOG_LVL_ERR, "%s: L2 table %ju at %#jx is corrupt: %s",
			    q->img->params, (uintmax_t)e->idx, (uintmax_t)e->host, why);
		err = EIO;
	}
	TAILQ_INIT(&waiters);
	TAILQ_CONCAT(&waiters, &e->waiters, link);
	if (err)
		cache_drop(e);	/* forget it: a later request tries again */
	else
		e->loading = 0;
	while (!TAILQ_EMPTY(&waiters)) {
		struct mwait *w = TAILQ_FIRST(&waiters);
		TAILQ_REMOVE(&waiters, w, link);
		w->fn(w, err);
	}
}

/*
 * The table idx (at host): 0 with *out pinned if it is in memory; 1 if w
 * will be called once it is (then ask again); -ENOMEM.
 */
static int
cache_get(struct mcache *c, uint64_t idx, uint64_t host, struct mwait *w,
	  struct centry **out)
{
	struct qcow2 *q = c->q;
	struct centry *e = cache_find(c, idx);

	if (e && !e->loading) {
		TAILQ_REMOVE(&c->lru, e, lru);
		TAILQ_INSERT_HEAD(&c->lru, e, lru);
		e->refs++;
		*out = e;
		return 0;
	}
	if (!e) {
		uint8_t *buf = buf_alloc(q->m.cluster_size);
		if (!buf || !(e = cache_insert(c, idx, host, buf))) {
			free(buf);
			return -ENOMEM;
		}
		e->loading = 1;
		io_prep_meta(q, &e->op, IO_OP_READV, &e->iov, e->buf, q->m.cluster_size, host);
		e->op.done = cache_loaded;
		e->op.data = e;
		io_submit(q->img->io, &e->op);
		cache_evict(c);
	}
	TAILQ_INSERT_TAIL(&e->waiters, w, link);
	return 1;
}

static void
cache_put(struct centry *e)
{
	if (!e)
		return;
	e->refs--;
	cache_evict(e->c);
}

/* The L2 table of guest offset off: see cache_get; *out NULL when there is none. */
static int
l2_get(struct qcow2 *q, uint64_t off, struct mwait *w, struct centry **out)
{
	uint64_t l1i = off >> q->span_bits;

	*out = NULL;
	if (l1i >= q->m.h.l1_size || !q->m.l1[l1i])
		return 0;
	return cache_get(&q->l2c, l1i, q->m.l1[l1i] & QCOW2_OFFSET_MASK, w, out);
}

/* ---- requests and pieces ---- */

static struct qreq *
qreq_new(struct qcow2 *q, struct td_request *req)
{
	struct qreq *qr = calloc(1, sizeof(*qr));
	if (!qr)
		return NULL;
	qr->req = req;
	qr->q = q;
	qr->pending = 1;
	return qr;
}

static void
qreq_synced(struct io_op *op, int res)
{
	struct qreq *qr = op->data;
	struct td_request *req = qr->req;
	free(qr);
	req->done(req, res < 0 ? -res : 0);
}

static void
qreq_piece_done(struct qreq *qr, int err)
{
	if (err && !qr->err)
		qr->err = err;
	if (--qr->pending)
		return;
	struct td_request *req = qr->req;
	if (!qr->err && (req->flags & TD_REQ_FUA) && req->op != TD_OP_READ) {
		qr->sync_op.opcode = IO_OP_FDATASYNC;
		qr->sync_op.flags = qr->q->f.io_flags;
		qr->sync_op.fd = qr->q->f.fd;
		qr->sync_op.done = qreq_synced;
		qr->sync_op.data = qr;
		io_submit(qr->q->img->io, &qr->sync_op);
		return;
	}
	int e = qr->err;
	free(qr);
	req->done(req, e);
}

static struct qop *
qop_new(struct qreq *qr, uint64_t off, uint64_t len)
{
	struct qop *v = calloc(1, sizeof(*v));
	if (!v)
		return NULL;
	v->qr = qr;
	v->q = qr->q;
	v->off = off;
	v->len = len;
	qr->pending++;
	return v;
}

static void
qop_finish(struct qop *v, int err)
{
	struct qreq *qr = v->qr;
	if (v->iov && v->iov != v->iov_inline)
		free(v->iov);
	free(v->buf);
	free(v->cluster);
	free(v);
	qreq_piece_done(qr, err);
}

/*
 * The piece of v for [off, off+len): v itself when that is all of it
 * (*whole set), else a new piece of the same request and kind.
 */
static struct qop *
qop_part(struct qop *v, uint64_t off, uint64_t len, int *whole)
{
	struct qop *p;

	*whole = off == v->off && len == v->len;
	if (*whole)
		return v;
	if (!(p = qop_new(v->qr, off, len))) {
		v->qr->err = ENOMEM;
		return NULL;
	}
	p->zero = v->zero;
	p->mode = v->mode;
	return p;
}

/* Points v->iov at bytes [off, off+len) of the request (or of zeros). */
static int
qop_slice(struct qop *v, uint64_t off, uint64_t len)
{
	return td_req_iov(v->qr->req, off, len, v->zero ? q_zeros : NULL, Q_ZERO_BYTES,
			  v->iov_inline, Q_INLINE_IOV, &v->iov, &v->iovcnt);
}

static void
qop_io_done(struct io_op *op, int res)
{
	struct qop *v = op->data;
	v->next(v, res < 0 ? -res : 0);
}

static void
qop_io(struct qop *v, enum io_opcode opc, uint64_t foff, void (*next)(struct qop *, int))
{
	v->op.iov = v->iov;
	v->op.iovcnt = v->iovcnt;
	td_file_prep(&v->q->f, &v->op, opc, foff);
	v->op.done = qop_io_done;
	v->op.data = v;
	v->next = next;
	io_submit(v->q->img->io, &v->op);
}

/* Copies bytes between a buffer and an iovec array. */
static void
iov_copy(const struct iovec *iov, int iovcnt, uint8_t *buf, int to_buf)
{
	for (int i = 0; i < iovcnt; i++) {
		if (to_buf)
			memcpy(buf, iov[i].iov_base, iov[i].iov_len);
		else
			memcpy(iov[i].iov_base, buf, iov[i].iov_len);
		buf += iov[i].iov_len;
	}
}

/* A piece that waited (for a table or a job) starts again, or fails. */
static void
qop_resume(struct mwait *w, int err)
{
	struct qop *v = (struct qop *)((char *)w - offsetof(struct qop, wait));
	if (err)
		qop_finish(v, err);
	else
		v->resume(v);
}

/* ---- reads ---- */

static void
qop_done_next(struct qop *v, int err)
{
	qop_finish(v, err);
}

static void
qop_parent_done(struct td_request *sub, int err)
{
	qop_finish(sub->priv, err);
}

static void
read_parent(struct qop *v)
{
	if (qop_slice(v, v->off, v->len) < 0) {
		qop_finish(v, ENOMEM);
		return;
	}
	v->sub.priv = v;
	td_image_read_parent_range(v->q->img, &v->sub, v->off, v->len, v->iov, v->iovcnt,
				   qop_parent_done);
}

static void
read_zero(struct qop *v)
{
	if (qop_slice(v, v->off, v->len) < 0) {
		qop_finish(v, ENOMEM);
		return;
	}
	td_iov_zero(v->iov, v->iovcnt);
	qop_finish(v, 0);
}

/* A data run at host: what lies past the written end of the file reads as zeros. */
static void
read_data(struct qop *v, uint64_t host)
{
	struct qcow2 *q = v->q;

	if (qop_slice(v, v->off, v->len) < 0) {
		qop_finish(v, ENOMEM);
		return;
	}
	if (host + v->len > q->known_end) {
		uint64_t keep = host < q->known_end ? q->known_end - host : 0;
		v->iovcnt = td_iov_zero_tail(v->iov, v->iovcnt, keep);
		if (!keep) {
			qop_finish(v, 0);
			return;
		}
	}
	qop_io(v, IO_OP_READV, host, qop_done_next);
}

/* ---- compressed clusters ---- */

/* Worker thread: inflate one cluster. */
static int
inflate_run(struct io_call *c)
{
	struct qop *v = c->arg;
	return qcow2_inflate(v->buf, v->csize, v->cluster, v->q->m.cluster_size);
}

static void
inflate_done(struct io_call *c, int res)
{
	struct qop *v = c->arg;
	struct qcow2 *q = v->q;

	if (res < 0)
		log_limited(&q->rl, LOG_LVL_ERR, "%s: the compressed cluster at %#jx is corrupt",
			    q->img->params, (uintmax_t)entry_decode(q, v->entry).host);
	v->after(v, res < 0 ? EIO : 0);
}

static void
compressed_read(struct qop *v, int err)
{
	if (err) {
		v->after(v, err);
		return;
	}
	v->call.fn = inflate_run;
	v->call.done = inflate_done;
	v->call.arg = v;
	io_call(v->q->img->io, &v->call);
}

/* Inflates the compressed cluster of v->entry into v->cluster, then after(v, err). */
static void
inflate_cluster(struct qop *v, void (*after)(struct qop *, int))
{
	struct qcow2 *q = v->q;
	struct qcow2_cluster c = entry_decode(q, v->entry);
	uint64_t len = q->known_end > c.host ? min_u64(c.csize, q->known_end - c.host) : 0;

	v->after = after;
	v->buf = malloc(len ? len : 1);
	v->cluster = buf_alloc(q->m.cluster_size);
	if (!v->buf || !v->cluster || !len) {
		after(v, len ? ENOMEM : EIO);
		return;
	}
	v->csize = len;
	io_prep_meta(q, &v->op, IO_OP_READV, &v->miov, v->buf, len, c.host);
	v->op.done = qop_io_done;
	v->op.data = v;
	v->next = compressed_read;
	io_submit(q->img->io, &v->op);
}

static void
read_compressed_done(struct qop *v, int err)
{
	if (!err)
		iov_copy(v->iov, v->iovcnt, v->cluster + (v->off & (v->q->m.cluster_size - 1)), 0);
	qop_finish(v, err);
}

static void
read_compressed(struct qop *v)
{
	if (qop_slice(v, v->off, v->len) < 0) {
		qop_finish(v, ENOMEM);
		return;
	}
	inflate_cluster(v, read_compressed_done);
}

/* ---- reads ---- */

/* A run of clusters that read alike: one kind, and data contiguous in the file. */
struct run {
	enum qcow2_ckind kind;
	uint64_t entry;			/* of its first cluster */
	uint64_t host;			/* DATA: where pos is in the file */
	uint64_t len;
};

/* Is the next cluster's entry en a continuation of a run that began with e at c? */
static int
run_continues(const struct qcow2 *q, uint64_t e, uint64_t c, uint64_t en, uint64_t nc)
{
	enum qcow2_ckind k = entry_kind(e);
	if (entry_kind(en) != k || k == QCOW2_COMPRESSED_DATA)
		return 0;
	return k != QCOW2_DATA ||
	       (en & QCOW2_OFFSET_MASK) == (e & QCOW2_OFFSET_MASK) + ((nc - c) << q->m.cluster_bits);
}

/* The run from pos (inside the span of l2, below end). */
static void
run_of(const struct qcow2 *q, const struct centry *l2, uint64_t pos, uint64_t end,
       struct run *r)
{
	uint64_t cs = q->m.cluster_size, c = cluster_of(q, pos);
	uint64_t stop = min_u64((c + 1) * cs, end);

	r->entry = l2_entry(q, l2, c);
	r->kind = entry_kind(r->entry);
	r->host = (r->entry & QCOW2_OFFSET_MASK) + (pos & (cs - 1));
	while (stop < end) {
		uint64_t nc = cluster_of(q, stop);
		if (!run_continues(q, r->entry, c, l2_entry(q, l2, nc), nc))
			break;
		stop = min_u64(stop + cs, end);
	}
	r->len = stop - pos;
}

static void read_range(struct qop *v);


/* v lies inside one L2 table's span: split it into runs and read each. */
static void
read_range(struct qop *v)
{
	struct qcow2 *q = v->q;
	uint64_t pos, end = v->off + v->len;
	struct centry *l2;
	struct run r;
	int whole = 0, rc;

	v->wait.fn = qop_resume;
	v->resume = read_range;
	if ((rc = l2_get(q, v->off, &v->wait, &l2))) {
		if (rc < 0)
			qop_finish(v, -rc);
		return;
	}
	for (pos = v->off; pos < end && !whole; pos += r.len) {
		run_of(q, l2, pos, end, &r);
		struct qop *p = qop_part(v, pos, r.len, &whole);
		if (!p)
			break;
		p->entry = r.entry;
		switch (r.kind) {
		case QCOW2_DATA:
			read_data(p, r.host);
			break;
		case QCOW2_ZERO_CLUSTER:
			read_zero(p);
			break;
		case QCOW2_UNALLOCATED:
			read_parent(p);
			break;
		case QCOW2_COMPRESSED_DATA:
			read_compressed(p);
			break;
		}
	}
	cache_put(l2);
	if (!whole)
		qop_finish(v, 0);
}

/* ---- jobs ---- */

static struct job *
job_find(struct qcow2 *q, uint64_t c)
{
	struct job *j;
	LIST_FOREACH(j, &q->jobs[c % Q_JOB_HASH], hash)
		if (j->first == c)
			return j;
	TAILQ_FOREACH(j, &q->zero_jobs, range)
		if (c >= j->first && c - j->first < j->count)
			return j;
	return NULL;
}

static struct job *
job_new(struct qcow2 *q, int kind, uint64_t first, uint64_t count, struct qop *v)
{
	struct job *j = calloc(1, sizeof(*j));
	if (!j)
		return NULL;
	j->kind = kind;
	j->first = first;
	j->count = count;
	j->v = v;
	v->job = j;
	TAILQ_INIT(&j->waiting);
	if (kind == JOB_ALLOC)
		LIST_INSERT_HEAD(&q->jobs[first % Q_JOB_HASH], j, hash);
	else
		TAILQ_INSERT_TAIL(&q->zero_jobs, j, range);
	return j;
}

/* The job is over: its piece completes with err, its waiters look again. */
static void
job_end(struct qcow2 *q, struct job *j, int err)
{
	struct mwait_list waiting;

	if (j->kind == JOB_ALLOC)
		LIST_REMOVE(j, hash);
	else
		TAILQ_REMOVE(&q->zero_jobs, j, range);
	TAILQ_INIT(&waiting);
	TAILQ_CONCAT(&waiting, &j->waiting, link);
	free(j->data);
	free(j->bounce);
	j->v->job = NULL;
	qop_finish(j->v, err);
	free(j);
	while (!TAILQ_EMPTY(&waiting)) {
		struct mwait *w = TAILQ_FIRST(&waiting);
		TAILQ_REMOVE(&waiting, w, link);
		w->fn(w, 0);
	}
}

static void
job_ready(struct qcow2 *q, struct job *j)
{
	TAILQ_INSERT_TAIL(&q->ready, j, queue);
	if (!q->batch)
		batch_start(q);
}

/* ---- writes ---- */


static void
write_in_place(struct qop *v, uint64_t host)
{
	if (qop_slice(v, v->off, v->len) < 0) {
		qop_finish(v, ENOMEM);
		return;
	}
	qop_io(v, IO_OP_WRITEV, host, qop_done_next);
}

/* Does guest cluster c, of kind k, read as zeros? */
static int
reads_zero(const struct qcow2 *q, enum qcow2_ckind k, uint64_t c)
{
	const struct td_image *parent = q->img->parent;
	if (k == QCOW2_ZERO_CLUSTER)
		return 1;
	return k == QCOW2_UNALLOCATED && (!parent || (c << q->m.cluster_bits) >= parent->size);
}

/* The job's data: the piece's bytes with zeros around them, no copy. */
static int
alloc_data_direct(struct qcow2 *q, struct job *j, struct qop *v)
{
	uint64_t cs = q->m.cluster_size, in = v->off & (cs - 1);
	uint64_t tail = cs - in - v->len;

	if (qop_slice(v, v->off, v->len) < 0 ||
	    !(j->data = calloc((size_t)v->iovcnt + 2, sizeof(*j->data))))
		return -ENOMEM;
	if (in) {
		j->data[j->ndata].iov_base = q_zeros;
		j->data[j->ndata++].iov_len = in;
	}
	memcpy(j->data + j->ndata, v->iov, (size_t)v->iovcnt * sizeof(*v->iov));
	j->ndata += v->iovcnt;
	if (tail) {
		j->data[j->ndata].iov_base = q_zeros;
		j->data[j->ndata++].iov_len = tail;
	}
	return 0;
}

/* The job's data: the bounce buffer (the cluster as it was) with the piece copied in. */
static int
alloc_data_bounce(struct qcow2 *q, struct job *j, struct qop *v)
{
	if (qop_slice(v, v->off, v->len) < 0 || !(j->data = calloc(1, sizeof(*j->data))))
		return -ENOMEM;
	iov_copy(v->iov, v->iovcnt, j->bounce + (v->off & (q->m.cluster_size - 1)), 1);
	j->data[0].iov_base = j->bounce;
	j->data[0].iov_len = q->m.cluster_size;
	j->ndata = 1;
	return 0;
}

static void
cow_ready(struct qop *v, int err)
{
	struct job *j = v->job;
	struct qcow2 *q = v->q;

	if (!err && alloc_data_bounce(q, j, v) < 0)
		err = ENOMEM;
	if (err) {
		job_end(q, j, err);
		return;
	}
	job_ready(q, j);
}

static void
cow_backing_read(struct td_request *sub, int err)
{
	cow_ready(sub->priv, err);
}

static void
cow_inflated(struct qop *v, int err)
{
	if (!err) {
		v->job->bounce = v->cluster;	/* the job owns it now */
		v->cluster = NULL;
	}
	cow_ready(v, err);
}

/*
 * A write to a cluster that is not allocated here (v->entry says how it
 * reads): its allocation job. What the write does not cover comes from the
 * backing file or the compressed data (read first), or is zeros.
 */
static void
alloc_cluster(struct qop *v)
{
	struct qcow2 *q = v->q;
	uint64_t cs = q->m.cluster_size, c = cluster_of(q, v->off), start = c * cs;
	enum qcow2_ckind k = entry_kind(v->entry);
	struct job *j = job_new(q, JOB_ALLOC, c, 1, v);

	if (!j) {
		qop_finish(v, ENOMEM);
		return;
	}
	j->old = v->entry;
	/* what lies past the disk's end in its last cluster is never read */
	int covers = v->off == start && v->len >= min_u64(cs, q->img->size - start);
	if (covers || reads_zero(q, k, c)) {
		if (alloc_data_direct(q, j, v) < 0) {
			job_end(q, j, ENOMEM);
			return;
		}
		job_ready(q, j);
		return;
	}
	if (k == QCOW2_COMPRESSED_DATA) {
		inflate_cluster(v, cow_inflated);
		return;
	}
	if (!(j->bounce = buf_alloc(cs))) {
		job_end(q, j, ENOMEM);
		return;
	}
	v->miov.iov_base = j->bounce;
	v->miov.iov_len = cs;
	v->sub.priv = v;
	td_image_read_parent_range(q->img, &v->sub, start, cs, &v->miov, 1, cow_backing_read);
}

/* v lies inside one L2 table's span: write in place, or allocate, cluster by cluster. */
static void
write_range(struct qop *v)
{
	struct qcow2 *q = v->q;
	uint64_t cs = q->m.cluster_size, pos, stop, end = v->off + v->len;
	struct centry *l2;
	int whole = 0, rc;

	v->wait.fn = qop_resume;
	v->resume = write_range;
	if ((rc = l2_get(q, v->off, &v->wait, &l2))) {
		if (rc < 0)
			qop_finish(v, -rc);
		return;
	}
	for (pos = v->off; pos < end && !whole; pos = stop) {
		uint64_t c = cluster_of(q, pos), e = l2_entry(q, l2, c);
		struct job *j = job_find(q, c);
		struct qop *p;

		stop = min_u64((c + 1) * cs, end);
		if (!j && entry_kind(e) == QCOW2_DATA) {
			while (stop < end) {
				uint64_t nc = cluster_of(q, stop);
				if (job_find(q, nc) || !run_continues(q, e, c, l2_entry(q, l2, nc), nc))
					break;
				stop = min_u64(stop + cs, end);
			}
		} else if (!j && v->zero && reads_zero(q, entry_kind(e), c)) {
			continue;	/* already zeros */
		}
		if (!(p = qop_part(v, pos, stop - pos, &whole)))
			break;
		if (j) {
			p->wait.fn = qop_resume;
			p->resume = write_range;
			TAILQ_INSERT_TAIL(&j->waiting, &p->wait, link);
		} else if (entry_kind(e) == QCOW2_DATA) {
			write_in_place(p, (e & QCOW2_OFFSET_MASK) + (pos & (cs - 1)));
		} else {
			p->entry = e;
			alloc_cluster(p);
		}
	}
	cache_put(l2);
	if (!whole)
		qop_finish(v, 0);
}

/* ---- zeroing whole clusters ---- */


/* The job on any of clusters [first, first+count), or NULL. */
static struct job *
job_overlapping(struct qcow2 *q, uint64_t first, uint64_t count)
{
	struct job *j;
	TAILQ_FOREACH(j, &q->zero_jobs, range)
		if (j->first < first + count && first < j->first + j->count)
			return j;
	for (uint64_t c = first; c < first + count; c++)
		LIST_FOREACH(j, &q->jobs[c % Q_JOB_HASH], hash)
			if (j->first == c)
				return j;
	return NULL;
}

/* v covers whole clusters inside one L2 table's span: one job sets their entries. */
static void
zero_range(struct qop *v)
{
	struct qcow2 *q = v->q;
	uint64_t first = cluster_of(q, v->off);
	uint64_t count = div_up(v->off + v->len, q->m.cluster_size) - first;
	uint64_t l1i = v->off >> q->span_bits;
	struct job *j = job_overlapping(q, first, count);

	if (j) {
		v->wait.fn = qop_resume;
		v->resume = zero_range;
		TAILQ_INSERT_TAIL(&j->waiting, &v->wait, link);
		return;
	}
	if (v->mode == ZM_DEALLOC && !q->m.l1[l1i]) {
		qop_finish(v, 0);	/* nothing allocated there */
		return;
	}
	if (!(j = job_new(q, JOB_ZERO, first, count, v))) {
		qop_finish(v, ENOMEM);
		return;
	}
	job_ready(q, j);
}

/* What whole-cluster zeroing makes of an entry. */
static uint64_t
zero_entry(int mode, uint64_t old)
{
	enum qcow2_ckind k = entry_kind(old);

	switch (mode) {
	case ZM_DEALLOC:
		return 0;
	case ZM_ZERO_KEEP:
		if ((k == QCOW2_DATA || k == QCOW2_ZERO_CLUSTER) && (old & QCOW2_OFFSET_MASK))
			return (old & QCOW2_OFFSET_MASK) | QCOW2_ZERO | QCOW2_COPIED;
		return QCOW2_ZERO;
	default:
		return QCOW2_ZERO;
	}
}

/* ---- allocation batches ---- */

/* A table the batch holds: pinned, with the entries it changed (lo > hi: none). */
struct pin {
	struct centry *e;
	uint64_t lo, hi;
};

/* A table the batch creates: an L2 table or a refcount block. */
struct fresh {
	uint64_t idx;			/* L1 index, or refcount table index */
	uint64_t host;
	uint8_t *buf;
};

struct batch;

/* One I/O of the batch. */
struct bio {
	struct io_op op;
	struct iovec iov;
	struct batch *b;
	struct job *job;		/* a data write: the job that fails with it */
	void *owned;			/* freed with it */
	int advisory;			/* a hole punched: errors do not count */
};

struct loadwait {
	struct mwait w;
	struct batch *b;
};

struct batch {
	struct qcow2 *q;
	struct job *jobs[Q_BATCH_MAX];
	int nr;
	uint64_t *frees;		/* clusters to decrement: unlinked by earlier batches */
	size_t nfrees;
	uint64_t *punch;		/* clusters whose refcount reached zero */
	size_t npunch, cap_punch;
	uint64_t *unlinked;		/* clusters this batch unlinks */
	size_t nunlinked, cap_unlinked;
	struct pin *l2pins, *rbpins;
	int nl2pins, nrbpins, cap_l2pins, cap_rbpins;
	struct fresh *tabs, *rbs;
	int ntabs, nrbs, cap_tabs, cap_rbs;
	uint64_t start, end;		/* bytes: the clusters it allocates */
	uint64_t grow_host;		/* a larger refcount table, or 0 */
	uint32_t grow_entries;
	int loads, pending, err;
	void (*phase_done)(struct batch *b);
};

static int
grow_array(void **arr, int *cap, int n, size_t size)
{
	if (n < *cap)
		return 0;
	int ncap = *cap ? *cap * 2 : 8;
	void *p = realloc(*arr, (size_t)ncap * size);
	if (!p)
		return -ENOMEM;
	*arr = p;
	*cap = ncap;
	return 0;
}

static int
push_cluster(uint64_t **arr, size_t *n, size_t *cap, uint64_t c)
{
	if (*n == *cap) {
		size_t ncap = *cap ? *cap * 2 : 64;
		uint64_t *p = realloc(*arr, ncap * sizeof(*p));
		if (!p)
			return -ENOMEM;	/* a leak at worst: the cluster is never freed */
		*arr = p;
		*cap = ncap;
	}
	(*arr)[(*n)++] = c;
	return 0;
}

static struct pin *
pin_find(struct pin *pins, int n, uint64_t idx)
{
	for (int i = 0; i < n; i++)
		if (pins[i].e->idx == idx)
			return &pins[i];
	return NULL;
}

static struct fresh *
fresh_find(struct fresh *f, int n, uint64_t idx)
{
	for (int i = 0; i < n; i++)
		if (f[i].idx == idx)
			return &f[i];
	return NULL;
}

static int
fresh_add(struct fresh **f, int *n, int *cap, uint64_t idx, uint64_t host)
{
	if (grow_array((void **)f, cap, *n, sizeof(**f)) < 0)
		return -ENOMEM;
	(*f)[*n].idx = idx;
	(*f)[*n].host = host;
	(*f)[*n].buf = NULL;
	(*n)++;
	return 0;
}

static void batch_plan_and_go(struct batch *b);

static void
batch_loaded(struct mwait *w, int err)
{
	struct loadwait *lw = (struct loadwait *)w;
	struct batch *b = lw->b;

	free(lw);
	if (err && !b->err)
		b->err = err;
	if (--b->loads == 0)
		batch_plan_and_go(b);
}

/* Pins table idx of cache c for the batch, or starts loading it (b->loads). */
static int
batch_pin(struct batch *b, struct mcache *c, uint64_t idx, uint64_t host)
{
	int is_l2 = c->is_l2;
	struct pin **pins = is_l2 ? &b->l2pins : &b->rbpins;
	int *n = is_l2 ? &b->nl2pins : &b->nrbpins, *cap = is_l2 ? &b->cap_l2pins : &b->cap_rbpins;
	struct loadwait *lw;
	struct centry *e;
	int rc;

	if (pin_find(*pins, *n, idx))
		return 0;
	if (grow_array((void **)pins, cap, *n, sizeof(**pins)) < 0 ||
	    !(lw = calloc(1, sizeof(*lw))))
		return -ENOMEM;
	lw->w.fn = batch_loaded;
	lw->b = b;
	if ((rc = cache_get(c, idx, host, &lw->w, &e)) != 0) {
		if (rc < 0)
			free(lw);
		else
			b->loads++;
		return rc < 0 ? rc : 0;
	}
	free(lw);
	(*pins)[*n].e = e;
	(*pins)[*n].lo = UINT64_MAX;
	(*pins)[*n].hi = 0;
	(*n)++;
	return 0;
}

static int
job_needs_table(const struct job *j)
{
	return j->kind == JOB_ALLOC || j->v->mode != ZM_DEALLOC;
}

/*
 * The refcount blocks counting new clusters [b->start, end), placed after
 * end (new ones count themselves), and a larger table when they do not
 * fit in the one there is.
 */
static int
plan_refcounts(struct batch *b, uint64_t end)
{
	struct qcow2 *q = b->q;
	const struct qcow2_meta *m = &q->m;
	uint64_t cs = m->cluster_size, target = m->reftable_entries;
	unsigned shift = m->cluster_bits + m->rb_bits;
	int rc;

	for (int iter = 0; iter < 32; iter++) {
		uint64_t p = end;
		b->nrbs = 0;
		b->grow_host = 0;
		if (target > m->reftable_entries) {
			b->grow_host = p;
			b->grow_entries = (uint32_t)target;
			p += div_up(target * 8, cs) * cs;
		}
		for (uint64_t ri = b->start >> shift; ri <= (p - 1) >> shift; ri++) {
			if (ri < m->reftable_entries && m->reftable[ri])
				rc = batch_pin(b, &q->rbc, ri, m->reftable[ri]);
			else if ((rc = fresh_add(&b->rbs, &b->nrbs, &b->cap_rbs, ri, p)) == 0)
				p += cs;
			if (rc < 0)
				return rc;
		}
		uint64_t last = (p - 1) >> shift;
		if (last < target) {
			b->end = p;
			return 0;
		}
		target = last + 1 > 2ULL * m->reftable_entries ? last + 1 : 2ULL * m->reftable_entries;
		target = div_up(target * 8, cs) * cs / 8;
		if (target * 8 > QCOW2_MAX_REFTABLE_BYTES)
			break;
	}
	log_limited(&q->rl, LOG_LVL_ERR, "%s: the refcount table cannot grow further",
		    q->img->params);
	return -ENOSPC;
}

/* Where everything goes: 0, 1 while tables load (b->loads), -errno. */
static int
batch_plan(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t cs = q->m.cluster_size, pos = q->next_free;
	int rc;

	b->ntabs = b->nrbs = 0;
	b->grow_host = 0;
	b->start = pos;
	for (int i = 0; i < b->nr; i++) {
		struct job *j = b->jobs[i];
		uint64_t l1i = j->first >> q->m.l2_bits;
		if (q->m.l1[l1i])
			rc = batch_pin(b, &q->l2c, l1i, q->m.l1[l1i] & QCOW2_OFFSET_MASK);
		else if (job_needs_table(j) && !fresh_find(b->tabs, b->ntabs, l1i) &&
			 (rc = fresh_add(&b->tabs, &b->ntabs, &b->cap_tabs, l1i, pos)) == 0)
			pos += cs;
		else
			rc = 0;
		if (rc < 0)
			return rc;
	}
	for (int i = 0; i < b->nr; i++) {
		if (b->jobs[i]->kind == JOB_ALLOC) {
			b->jobs[i]->host = pos;
			pos += cs;
		}
	}
	for (size_t i = 0; i < b->nfrees; i++) {
		uint64_t ri = b->frees[i] >> q->m.rb_bits;
		if (ri < q->m.reftable_entries && q->m.reftable[ri] &&
		    (rc = batch_pin(b, &q->rbc, ri, q->m.reftable[ri])) < 0)
			return rc;
	}
	b->end = pos;
	if (pos > b->start && (rc = plan_refcounts(b, pos)) < 0)
		return rc;
	if (b->end >= QCOW2_MAX_HOST)
		return -ENOSPC;
	return b->loads ? 1 : 0;
}

static void batch_finish(struct batch *b);

/* A step's I/O is being issued: next runs once all of it is done (or the batch failed). */
static void
batch_step_begin(struct batch *b, void (*next)(struct batch *))
{
	b->phase_done = next;
	b->pending++;		/* held while issuing */
}

static void
batch_step_end(struct batch *b)
{
	if (--b->pending)
		return;
	if (b->err)
		batch_finish(b);
	else
		b->phase_done(b);
}

static void
bio_done(struct io_op *op, int res)
{
	struct bio *io = op->data;
	struct batch *b = io->b;

	if (res < 0 && !io->advisory) {
		if (io->job)
			io->job->err = -res;
		else if (!b->err)
			b->err = -res;
	}
	free(io->owned);
	free(io);
	batch_step_end(b);
}

/* An I/O of the batch: iov (or buf, len when iov is NULL) at off. */
static void
batch_io(struct batch *b, enum io_opcode opc, struct iovec *iov, int iovcnt, void *buf,
	 size_t len, uint64_t off, struct job *job, void *owned)
{
	struct qcow2 *q = b->q;
	struct bio *io = calloc(1, sizeof(*io));

	if (!io) {
		free(owned);
		if (job)
			job->err = ENOMEM;
		else if (!b->err)
			b->err = ENOMEM;
		return;
	}
	io->b = b;
	io->job = job;
	io->owned = owned;
	if (iov) {
		io->op.iov = iov;
		io->op.iovcnt = iovcnt;
		td_file_prep(&q->f, &io->op, opc, off);
	} else {
		io_prep_meta(q, &io->op, opc, &io->iov, buf, len, off);
	}
	io->op.done = bio_done;
	io->op.data = io;
	b->pending++;
	io_submit(q->img->io, &io->op);
}

static void
batch_punch(struct batch *b, uint64_t c)
{
	struct qcow2 *q = b->q;
	struct bio *io = calloc(1, sizeof(*io));

	if (!io)
		return;		/* the space stays allocated: only a hole is lost */
	io->b = b;
	io->advisory = 1;
	io->op.opcode = IO_OP_FALLOCATE;
	io->op.flags = q->f.io_flags;
	io->op.fd = q->f.fd;
	io->op.mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
	io->op.offset = c << q->m.cluster_bits;
	io->op.length = q->m.cluster_size;
	io->op.done = bio_done;
	io->op.data = io;
	b->pending++;
	io_submit(q->img->io, &io->op);
}

/* A refcount change of cluster c (+1: a new cluster, -1: one unlinked). */
static void
rc_change(struct batch *b, uint64_t c, int delta)
{
	struct qcow2 *q = b->q;
	unsigned bits = q->m.refcount_bits;
	uint64_t ri = c >> q->m.rb_bits, i = c & (q->m.rb_entries - 1);
	struct fresh *f = fresh_find(b->rbs, b->nrbs, ri);
	struct pin *p = f ? NULL : pin_find(b->rbpins, b->nrbpins, ri);
	uint8_t *block = f ? f->buf : p ? p->e->buf : NULL;

	if (!block)
		return;		/* a free of a cluster nothing counted: leave it */
	uint64_t old = qcow2_rc_get(block, i, bits);
	if (delta > 0) {
		qcow2_rc_set(block, i, bits, 1);
	} else {
		if (!old)
			return;
		qcow2_rc_set(block, i, bits, old - 1);
		if (old == 1)
			push_cluster(&b->punch, &b->npunch, &b->cap_punch, c);
	}
	if (p) {
		p->lo = i < p->lo ? i : p->lo;
		p->hi = i > p->hi ? i : p->hi;
	}
}

static void batch_link_blocks(struct batch *b);

/* Step 1: the refcounts of new clusters (and the decrements of unlinked ones). */
static void
batch_commit(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t cs = q->m.cluster_size;

	q->next_free = b->end;	/* never handed out again, whatever happens next */
	for (int i = 0; i < b->nrbs; i++) {
		if (!(b->rbs[i].buf = buf_alloc(cs))) {
			b->err = ENOMEM;
			batch_finish(b);
			return;
		}
		memset(b->rbs[i].buf, 0, cs);
	}
	for (uint64_t c = b->start / cs; c < b->end / cs; c++)
		rc_change(b, c, 1);
	for (size_t i = 0; i < b->nfrees; i++)
		rc_change(b, b->frees[i], -1);
	batch_step_begin(b, batch_link_blocks);
	for (int i = 0; i < b->nrbs; i++)
		batch_io(b, IO_OP_WRITEV, NULL, 0, b->rbs[i].buf, cs, b->rbs[i].host, NULL, NULL);
	for (int i = 0; i < b->nrbpins; i++) {
		struct pin *p = &b->rbpins[i];
		uint64_t off, len;
		if (p->lo > p->hi)
			continue;
		qcow2_rc_bytes(p->lo, p->hi, q->m.refcount_bits, &off, &len);
		batch_io(b, IO_OP_WRITEV, NULL, 0, p->e->buf + off, len, p->e->host + off, NULL,
			 NULL);
	}
	batch_step_end(b);
}

static void batch_write_data(struct batch *b);

/* Encodes entries [lo, hi] of a host-order table; the caller frees it. */
static uint8_t *
encode_entries(const uint64_t *t, uint64_t lo, uint64_t hi)
{
	uint8_t *buf = malloc((hi - lo + 1) * 8);
	if (buf)
		for (uint64_t i = lo; i <= hi; i++)
			qcow2_put64(buf + 8 * (i - lo), t[i]);
	return buf;
}

static void
batch_grown(struct batch *b)
{
	struct qcow2 *q = b->q;
	struct qcow2_meta *m = &q->m;
	uint64_t cs = m->cluster_size;

	uint64_t *t = calloc(b->grow_entries, sizeof(*t));
	if (!t) {		/* the file is right; our memory is not: stop here */
		b->err = ENOMEM;
		batch_finish(b);
		return;
	}
	memcpy(t, m->reftable, (size_t)m->reftable_entries * sizeof(*t));
	for (int i = 0; i < b->nrbs; i++)
		t[b->rbs[i].idx] = b->rbs[i].host;
	/* the old table's clusters are freed by a later batch, through the new one */
	for (uint64_t c = 0; c < m->h.refcount_table_clusters; c++)
		push_cluster(&q->frees, &q->nfrees, &q->cap_frees,
			     (m->h.refcount_table_offset >> m->cluster_bits) + c);
	free(m->reftable);
	m->reftable = t;
	m->reftable_entries = b->grow_entries;
	m->h.refcount_table_offset = b->grow_host;
	m->h.refcount_table_clusters = (uint32_t)div_up((uint64_t)b->grow_entries * 8, cs);
	batch_write_data(b);
}

static void
batch_grow_written(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint8_t *hdr = malloc(12);
	uint32_t clusters = (uint32_t)div_up((uint64_t)b->grow_entries * 8, q->m.cluster_size);

	if (b->err || !hdr) {
		free(hdr);
		b->err = b->err ? b->err : ENOMEM;
		batch_finish(b);
		return;
	}
	qcow2_put64(hdr, b->grow_host);
	qcow2_put32(hdr + 8, clusters);
	batch_step_begin(b, batch_grown);
	batch_io(b, IO_OP_WRITEV, NULL, 0, hdr, 12, 48, NULL, hdr);
	batch_step_end(b);
}

/* Step 2: the refcount table points at new blocks (a new table, then the header). */
static void
batch_link_blocks(struct batch *b)
{
	struct qcow2 *q = b->q;
	struct qcow2_meta *m = &q->m;
	uint64_t cs = m->cluster_size;

	if (b->grow_host) {
		uint64_t len = div_up((uint64_t)b->grow_entries * 8, cs) * cs;
		uint8_t *t = buf_alloc(len);
		if (!t) {
			b->err = ENOMEM;
			batch_finish(b);
			return;
		}
		memset(t, 0, len);
		for (uint32_t i = 0; i < m->reftable_entries; i++)
			qcow2_put64(t + 8 * i, m->reftable[i]);
		for (int i = 0; i < b->nrbs; i++)
			qcow2_put64(t + 8 * b->rbs[i].idx, b->rbs[i].host);
		batch_step_begin(b, batch_grow_written);
		batch_io(b, IO_OP_WRITEV, NULL, 0, t, len, b->grow_host, NULL, t);
		batch_step_end(b);
		return;
	}
	if (!b->nrbs) {
		batch_write_data(b);
		return;
	}
	uint64_t lo = UINT64_MAX, hi = 0;
	for (int i = 0; i < b->nrbs; i++) {
		m->reftable[b->rbs[i].idx] = b->rbs[i].host;
		lo = b->rbs[i].idx < lo ? b->rbs[i].idx : lo;
		hi = b->rbs[i].idx > hi ? b->rbs[i].idx : hi;
	}
	uint8_t *buf = encode_entries(m->reftable, lo, hi);
	batch_step_begin(b, batch_write_data);
	if (buf)
		batch_io(b, IO_OP_WRITEV, NULL, 0, buf, (hi - lo + 1) * 8,
			 m->h.refcount_table_offset + lo * 8, NULL, buf);
	else
		b->err = ENOMEM;
	batch_step_end(b);
}

static void batch_write_tables(struct batch *b);

/* Step 3: the data of every new cluster; holes where refcounts reached zero. */
static void
batch_write_data(struct batch *b)
{
	struct qcow2 *q = b->q;

	/* the new blocks are the cache's from now on */
	for (int i = 0; i < b->nrbs; i++)
		if (cache_insert(&q->rbc, b->rbs[i].idx, b->rbs[i].host, b->rbs[i].buf))
			b->rbs[i].buf = NULL;
	cache_evict(&q->rbc);
	batch_step_begin(b, batch_write_tables);
	for (size_t i = 0; i < b->npunch; i++)
		batch_punch(b, b->punch[i]);
	for (int i = 0; i < b->nr; i++) {
		struct job *j = b->jobs[i];
		if (j->kind == JOB_ALLOC)
			batch_io(b, IO_OP_WRITEV, j->data, j->ndata, NULL, 0, j->host, j, NULL);
	}
	batch_step_end(b);
}

/* The clusters an entry held that new no longer does: freed by a later batch. */
static void
unlink_old(struct batch *b, uint64_t old, uint64_t new)
{
	struct qcow2 *q = b->q;
	struct qcow2_cluster c = entry_decode(q, old);

	if (c.kind == QCOW2_COMPRESSED_DATA) {
		for (uint64_t k = c.rc_start >> q->m.cluster_bits;
		     k <= (c.rc_start + c.rc_len - 1) >> q->m.cluster_bits; k++)
			push_cluster(&b->unlinked, &b->nunlinked, &b->cap_unlinked, k);
	} else if (c.host && c.host != (new & QCOW2_OFFSET_MASK)) {
		push_cluster(&b->unlinked, &b->nunlinked, &b->cap_unlinked,
			     c.host >> q->m.cluster_bits);
	}
}

/* Writes a job's entries into table (an L2 table in memory); p tracks the change. */
static void
job_apply(struct batch *b, struct job *j, uint8_t *table, struct pin *p)
{
	struct qcow2 *q = b->q;

	for (uint64_t c = j->first; c < j->first + j->count; c++) {
		uint64_t i = c & (q->m.l2_entries - 1);
		uint64_t old = qcow2_be64(table + 8 * i);
		uint64_t new = j->kind == JOB_ALLOC ? j->host | QCOW2_COPIED
						    : zero_entry(j->v->mode, old);
		if (new == old)
			continue;
		qcow2_put64(table + 8 * i, new);
		unlink_old(b, old, new);
		if (p) {
			p->lo = i < p->lo ? i : p->lo;
			p->hi = i > p->hi ? i : p->hi;
		}
	}
}

static void batch_link_tables(struct batch *b);

/* Step 4: the L2 entries (in place, and new tables whole). */
static void
batch_write_tables(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t cs = q->m.cluster_size;

	if (b->end > q->known_end)
		q->known_end = b->end;
	for (int i = 0; i < b->ntabs; i++) {
		if (!(b->tabs[i].buf = buf_alloc(cs))) {
			b->err = ENOMEM;
			batch_finish(b);
			return;
		}
		memset(b->tabs[i].buf, 0, cs);
	}
	for (int i = 0; i < b->nr; i++) {
		struct job *j = b->jobs[i];
		uint64_t l1i = j->first >> q->m.l2_bits;
		struct fresh *f = fresh_find(b->tabs, b->ntabs, l1i);
		struct pin *p = f ? NULL : pin_find(b->l2pins, b->nl2pins, l1i);
		if (j->err || (!f && !p))
			continue;	/* failed, or a deallocation where nothing is */
		job_apply(b, j, f ? f->buf : p->e->buf, p);
	}
	batch_step_begin(b, b->ntabs ? batch_link_tables : batch_finish);
	for (int i = 0; i < b->nl2pins; i++) {
		struct pin *p = &b->l2pins[i];
		if (p->lo <= p->hi)
			batch_io(b, IO_OP_WRITEV, NULL, 0, p->e->buf + 8 * p->lo,
				 (p->hi - p->lo + 1) * 8, p->e->host + 8 * p->lo, NULL, NULL);
	}
	for (int i = 0; i < b->ntabs; i++)
		batch_io(b, IO_OP_WRITEV, NULL, 0, b->tabs[i].buf, cs, b->tabs[i].host, NULL, NULL);
	batch_step_end(b);
}

/* Step 5, for new L2 tables only: the L1 entries pointing at them. */
static void
batch_link_tables(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t lo = UINT64_MAX, hi = 0;

	for (int i = 0; i < b->ntabs; i++) {
		struct fresh *f = &b->tabs[i];
		q->m.l1[f->idx] = f->host | QCOW2_COPIED;
		if (cache_insert(&q->l2c, f->idx, f->host, f->buf))
			f->buf = NULL;	/* the cache's now */
		lo = f->idx < lo ? f->idx : lo;
		hi = f->idx > hi ? f->idx : hi;
	}
	cache_evict(&q->l2c);
	uint8_t *buf = encode_entries(q->m.l1, lo, hi);
	batch_step_begin(b, batch_finish);
	if (buf)
		batch_io(b, IO_OP_WRITEV, NULL, 0, buf, (hi - lo + 1) * 8,
			 q->m.h.l1_table_offset + lo * 8, NULL, buf);
	else
		b->err = ENOMEM;
	batch_step_end(b);
}

static void
batch_free(struct batch *b)
{
	for (int i = 0; i < b->nl2pins; i++)
		cache_put(b->l2pins[i].e);
	for (int i = 0; i < b->nrbpins; i++)
		cache_put(b->rbpins[i].e);
	for (int i = 0; i < b->ntabs; i++)
		free(b->tabs[i].buf);
	for (int i = 0; i < b->nrbs; i++)
		free(b->rbs[i].buf);
	free(b->l2pins);
	free(b->rbpins);
	free(b->tabs);
	free(b->rbs);
	free(b->frees);
	free(b->punch);
	free(b->unlinked);
	free(b);
}

/* Acknowledge: every job ends; the next batch starts. */
static void
batch_finish(struct batch *b)
{
	struct qcow2 *q = b->q;

	if (!b->err)
		for (size_t i = 0; i < b->nunlinked; i++)
			push_cluster(&q->frees, &q->nfrees, &q->cap_frees, b->unlinked[i]);
	else
		log_limited(&q->rl, LOG_LVL_ERR, "%s: allocation failed: %s", q->img->params,
			    strerror(b->err));
	for (int i = 0; i < b->nr; i++) {
		struct job *j = b->jobs[i];
		job_end(q, j, j->err ? j->err : b->err);
	}
	batch_free(b);
	q->batch = NULL;
	batch_start(q);
}

static void
batch_plan_and_go(struct batch *b)
{
	int rc = b->err ? -b->err : batch_plan(b);
	if (rc > 0)
		return;		/* batch_loaded calls again */
	if (rc < 0) {
		b->err = -rc;
		batch_finish(b);
		return;
	}
	batch_commit(b);
}

static void
batch_start(struct qcow2 *q)
{
	struct batch *b;

	if (q->batch || TAILQ_EMPTY(&q->ready))
		return;
	if (!(b = calloc(1, sizeof(*b)))) {
		while (!TAILQ_EMPTY(&q->ready)) {
			struct job *j = TAILQ_FIRST(&q->ready);
			TAILQ_REMOVE(&q->ready, j, queue);
			job_end(q, j, ENOMEM);
		}
		return;
	}
	b->q = q;
	while (!TAILQ_EMPTY(&q->ready) && b->nr < Q_BATCH_MAX) {
		struct job *j = TAILQ_FIRST(&q->ready);
		TAILQ_REMOVE(&q->ready, j, queue);
		b->jobs[b->nr++] = j;
	}
	b->frees = q->frees;
	b->nfrees = q->nfrees;
	q->frees = NULL;
	q->nfrees = q->cap_frees = 0;
	q->batch = b;
	batch_plan_and_go(b);
}

/* ---- discard and write-zeroes ---- */

/*
 * How whole clusters are zeroed (ZM_*), or -1 when zeros must be written
 * (a version 2 image over a backing file, or kept allocations), or -2
 * when there is nothing to do (discard is advisory).
 */
static int
zero_mode(const struct qcow2 *q, const struct td_request *req)
{
	int backing = q->img->parent != NULL, v3 = q->m.h.version >= 3;
	int no_hole = (req->flags & TD_REQ_NO_HOLE) != 0;

	if (req->op == TD_OP_DISCARD) {
		if (!backing)
			return ZM_DEALLOC;
		return v3 ? ZM_ZERO : -2;
	}
	if (v3)
		return no_hole ? ZM_ZERO_KEEP : backing ? ZM_ZERO : ZM_DEALLOC;
	return !backing && !no_hole ? ZM_DEALLOC : -1;
}

/* A piece of zeroing: whole clusters by their entries, or zeros written. */
static void
zero_piece(struct qreq *qr, uint64_t off, uint64_t len, int mode)
{
	struct qop *v = qop_new(qr, off, len);

	if (!v) {
		qr->err = ENOMEM;
		return;
	}
	v->zero = 1;
	v->mode = mode;
	if (mode >= 0)
		zero_range(v);
	else
		write_range(v);
}

static void
zero_submit(struct qcow2 *q, struct qreq *qr)
{
	struct td_request *req = qr->req;
	uint64_t cs = q->m.cluster_size, size = q->img->size;
	uint64_t pos = req->offset, end = req->offset + req->length;
	int mode = zero_mode(q, req), discard = req->op == TD_OP_DISCARD;

	if (mode == -2)
		return;
	while (pos < end && !qr->err) {
		uint64_t stop = min_u64(((pos >> q->span_bits) + 1) << q->span_bits, end);
		/* whole clusters: [a, z); the disk's last cluster is whole at its end */
		uint64_t a = div_up(pos, cs) * cs;
		uint64_t z = stop == size ? stop : stop / cs * cs;
		if (a >= z || mode < 0) {
			a = z = stop;	/* no whole cluster, or zeros written throughout */
			if (!discard)
				zero_piece(qr, pos, stop - pos, -1);
		} else {
			if (pos < a && !discard)
				zero_piece(qr, pos, a - pos, -1);
			zero_piece(qr, a, z - a, mode);
			if (z < stop && !discard)
				zero_piece(qr, z, stop - z, -1);
		}
		pos = stop;
	}
}

/* Would zeroing write data (FAST_ZERO refuses that)? */
static int
zero_is_slow(const struct qcow2 *q, const struct td_request *req)
{
	uint64_t cs = q->m.cluster_size, end = req->offset + req->length;
	if (zero_mode(q, req) == -1)
		return 1;
	return req->offset % cs || (end % cs && end != q->img->size);
}

/* ---- block status ---- */

static uint32_t
status_flags(enum qcow2_ckind k)
{
	switch (k) {
	case QCOW2_UNALLOCATED:
		return TD_EXTENT_PARENT;
	case QCOW2_ZERO_CLUSTER:
		return TD_EXTENT_HOLE | TD_EXTENT_ZERO;
	default:
		return 0;
	}
}

static void status_run(struct qreq *qr);

static void
status_retry(struct mwait *w, int err)
{
	struct qreq *qr = (struct qreq *)((char *)w - offsetof(struct qreq, wait));
	struct td_request *req = qr->req;

	if (err) {
		free(qr);
		req->done(req, err);
		return;
	}
	status_run(qr);
}

/* Extents as far as the tables in memory tell; loads one table when none does. */
static void
status_run(struct qreq *qr)
{
	struct qcow2 *q = qr->q;
	struct td_request *req = qr->req;
	uint64_t pos = req->offset, end = req->offset + req->length;
	struct centry *l2;
	int rc;

	req->nr_extents = 0;
	while (pos < end) {
		uint64_t stop = min_u64(((pos >> q->span_bits) + 1) << q->span_bits, end);
		if (pos >= q->img->size) {	/* a chain asking past our end */
			td_extent_add(req, end - pos, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
			break;
		}
		qr->wait.fn = status_retry;
		if (req->nr_extents && q->m.l1[pos >> q->span_bits] &&
		    !cache_find(&q->l2c, pos >> q->span_bits))
			break;	/* what we have so far, rather than wait */
		if ((rc = l2_get(q, pos, &qr->wait, &l2)) > 0)
			return;
		if (rc < 0) {
			free(qr);
			td_complete_later(q->img, req, -rc);
			return;
		}
		struct run r;
		int room = 1;
		for (; pos < stop && room; pos += r.len) {
			run_of(q, l2, pos, stop, &r);
			room = td_extent_add(req, r.len, status_flags(r.kind));
		}
		cache_put(l2);
		if (!room)
			break;
	}
	free(qr);
	td_complete_later(q->img, req, 0);
}

/* ---- submit ---- */

static int
op_writes(enum td_op op)
{
	return op == TD_OP_WRITE || op == TD_OP_DISCARD || op == TD_OP_WRITE_ZEROES;
}

static void
qcow2_submit(struct td_image *img, struct td_request *req)
{
	struct qcow2 *q = img->priv;
	struct qreq *qr;

	if ((op_writes(req->op) || req->op == TD_OP_FLUSH) && q->rdonly) {
		td_complete_later(img, req, EROFS);
		return;
	}
	if (req->op == TD_OP_CACHE) {
		td_complete_later(img, req, 0);
		return;
	}
	if (req->op == TD_OP_WRITE_ZEROES && (req->flags & TD_REQ_FAST_ZERO) &&
	    zero_is_slow(q, req)) {
		td_complete_later(img, req, ENOTSUP);
		return;
	}
	if (!(qr = qreq_new(q, req))) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	switch (req->op) {
	case TD_OP_BLOCK_STATUS:
		status_run(qr);
		return;
	case TD_OP_FLUSH:
		qr->sync_op.opcode = IO_OP_FDATASYNC;
		qr->sync_op.flags = q->f.io_flags;
		qr->sync_op.fd = q->f.fd;
		qr->sync_op.done = qreq_synced;
		qr->sync_op.data = qr;
		io_submit(img->io, &qr->sync_op);
		return;
	case TD_OP_DISCARD:
	case TD_OP_WRITE_ZEROES:
		zero_submit(q, qr);
		break;
	default:
		for (uint64_t pos = req->offset, end = req->offset + req->length; pos < end;) {
			uint64_t stop = min_u64(((pos >> q->span_bits) + 1) << q->span_bits, end);
			struct qop *v = qop_new(qr, pos, stop - pos);
			if (!v) {
				qr->err = ENOMEM;
				break;
			}
			if (req->op == TD_OP_READ)
				read_range(v);
			else
				write_range(v);
			pos = stop;
		}
		break;
	}
	/*
	 * The pieces may all be done already (zeros, holes): the last
	 * reference completes the request, but never from inside submit.
	 */
	if (qr->pending == 1 && !(op_writes(req->op) && (req->flags & TD_REQ_FUA) && !qr->err)) {
		int err = qr->err;
		free(qr);
		td_complete_later(img, req, err);
		return;
	}
	qreq_piece_done(qr, 0);
}

/* ---- open / close ---- */

static int
qcow2_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct qcow2 *q = calloc(1, sizeof(*q));
	int rc;
	(void)ctx;

	if (!q)
		return td_error_set(err, ENOMEM, "out of memory");
	q->img = img;
	q->rdonly = (img->oflags & TD_OPEN_RDONLY) != 0;
	q->rl = (struct log_ratelimit)LOG_RATELIMIT_INIT;
	rc = td_file_open(&q->f, img->path, q->rdonly, (img->oflags & TD_OPEN_NODIRECT) != 0, err);
	if (rc < 0) {
		free(q);
		return rc;
	}
	rc = qcow2_meta_load(&q->m, td_pread_full, &q->f.fd, q->f.size, q->rdonly, err);
	if (rc == 0 && !q->rdonly && qcow2_meta_dirty(&q->m))
		rc = qcow2_file_repair(q->f.fd, &q->m, err);
	if (rc == 0 && !q->rdonly && q->m.h.autoclear_features)
		rc = qcow2_file_clear_autoclear(q->f.fd, &q->m, err);
	const struct qcow2_meta *m = &q->m;
	uint64_t cs = m->cluster_size;
	if (rc == 0) {
		q->known_end = m->file_size;
		q->next_free = div_up(m->file_size, cs) * cs;
		if (q->f.is_blk && !q->rdonly)
			rc = qcow2_file_used_end(q->f.fd, m, &q->next_free, err);
	}
	if (rc < 0) {
		qcow2_meta_free(&q->m);
		td_file_close(&q->f, 0);
		free(q);
		return rc;
	}
	if (q->f.dfd >= 0 && cs < (uint64_t)sysconf(_SC_PAGESIZE)) {
		/*
		 * Data and metadata clusters would share pages: a direct write
		 * next to a buffered one fails the page cache's invalidation,
		 * and the kernel reports that as EIO at the next fdatasync.
		 */
		close(q->f.dfd);
		q->f.dfd = -1;
	}
	q->span_bits = m->cluster_bits + m->l2_bits;
	cache_init(&q->l2c, q, 1, Q_L2_CACHE);
	cache_init(&q->rbc, q, 0, Q_RB_CACHE);
	for (int i = 0; i < Q_JOB_HASH; i++)
		LIST_INIT(&q->jobs[i]);
	TAILQ_INIT(&q->zero_jobs);
	TAILQ_INIT(&q->ready);
	img->size = m->h.size;
	img->sector_size = 512;
	img->min_io = 1;
	img->priv = q;
	img->caps = TD_CAP_BLOCK_STATUS | TD_CAP_CACHE;
	if (!q->rdonly)
		img->caps |= TD_CAP_FLUSH | TD_CAP_DISCARD | TD_CAP_WRITE_ZEROES | TD_CAP_FAST_ZERO;
	return 0;
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/*
 * Close (blocking, nothing in flight): the decrements no later batch made,
 * one refcount block at a time, straight to the file.
 */
static void
apply_frees(struct qcow2 *q)
{
	const struct qcow2_meta *m = &q->m;
	uint8_t *block = malloc(m->cluster_size);
	size_t i = 0;

	if (!block || !q->nfrees) {
		free(block);
		return;
	}
	qsort(q->frees, q->nfrees, sizeof(*q->frees), cmp_u64);
	while (i < q->nfrees) {
		uint64_t ri = q->frees[i] >> m->rb_bits, host = 0;
		int ok = ri < m->reftable_entries && (host = m->reftable[ri]) &&
			 td_pread_full(&q->f.fd, block, m->cluster_size, host) == 0;
		for (; i < q->nfrees && q->frees[i] >> m->rb_bits == ri; i++) {
			uint64_t k = q->frees[i] & (m->rb_entries - 1);
			uint64_t v = ok ? qcow2_rc_get(block, k, m->refcount_bits) : 0;
			if (!v)
				continue;
			qcow2_rc_set(block, k, m->refcount_bits, v - 1);
			if (v == 1)
				fallocate(q->f.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
					  (off_t)(q->frees[i] << m->cluster_bits), (off_t)m->cluster_size);
		}
		if (ok && td_pwrite_full(&q->f.fd, block, m->cluster_size, host) < 0)
			break;	/* leaked clusters: qemu-img check -r leaks reclaims them */
	}
	free(block);
}

static void
cache_free_all(struct mcache *c)
{
	while (!TAILQ_EMPTY(&c->lru))
		cache_drop(TAILQ_FIRST(&c->lru));
}

static void
qcow2_close(struct td_image *img)
{
	struct qcow2 *q = img->priv;

	if (!q->rdonly)
		apply_frees(q);
	cache_free_all(&q->l2c);
	cache_free_all(&q->rbc);
	free(q->frees);
	qcow2_meta_free(&q->m);
	td_file_close(&q->f, !q->rdonly);
	free(q);
}

/* The backing file as "type:path": its format from the header, or from its bytes. */
static int
qcow2_get_parent(struct td_image *img, char **params, struct td_error *err)
{
	struct qcow2 *q = img->priv;
	const char *fmt = q->m.backing_fmt, *slash = strrchr(img->path, '/');
	char *path;
	int rc;

	*params = NULL;
	if (!q->m.backing)
		return 0;
	if (q->m.backing[0] == '/' || !slash)
		rc = asprintf(&path, "%s", q->m.backing);
	else
		rc = asprintf(&path, "%.*s/%s", (int)(slash - img->path), img->path, q->m.backing);
	if (rc < 0)
		return td_error_set(err, ENOMEM, "out of memory");
	if (!fmt[0])
		fmt = qcow2_probe_format(path);
	else if (!strcmp(fmt, "raw") || !strcmp(fmt, "file"))
		fmt = "aio";
	else if (!strcmp(fmt, "vpc"))
		fmt = "vhd";
	else if (strcmp(fmt, "qcow2") && strcmp(fmt, "vmdk")) {
		free(path);
		return td_error_set(err, ENOTSUP, "backing format '%s' is not supported", fmt);
	}
	rc = asprintf(params, "%s:%s", fmt, path);
	free(path);
	if (rc < 0) {
		*params = NULL;
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}

const struct td_driver td_driver_qcow2 = {
	.name = "qcow2",
	.open = qcow2_open,
	.close = qcow2_close,
	.submit = qcow2_submit,
	.get_parent = qcow2_get_parent,
	.create_child = qcow2_create_child,
};
