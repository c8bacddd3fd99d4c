/*
 * qcow2: qemu's copy-on-write format, versions 2 and 3, on the request path.
 *
 * Guest clusters map through the L1 table (in memory) and L2 tables, which
 * are loaded asynchronously into a bounded cache (meta_cache.h) and checked
 * as they are read; refcount blocks are cached the same way. Reads go to the data cluster, to the backing file, to zeros, or
 * through inflate (off the loop) for compressed clusters. Everything after
 * open is asynchronous and never waits on the disk from the loop.
 *
 * Writes to an allocated cluster go in place. A write to any other cluster
 * (unallocated, zero, compressed) becomes that cluster's allocation job:
 * its data is completed to a whole cluster first (copy-on-write from the
 * backing file or the compressed data, or zeros), then qcow2_alloc.c
 * allocates it in a batch with the others ready, in an order a crash cannot
 * break. Later writes to a cluster being allocated wait for it: it is
 * allocated once. Discard and write-zeroes of whole clusters are jobs too,
 * that set their L2 entries (zero flag, or unallocated).
 */
#include "qcow2_priv.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "byteorder.h"
#include "container_of.h"
#include "qcow2_file.h"

static char q_zeros[Q_ZERO_BYTES] __attribute__((aligned(4096)));

static void qop_finish(struct qop *v, int err);
static void write_range(struct qop *v);
static void zero_range(struct qop *v);

/* The raw L2 entry of guest cluster c in a table (NULL: no table, unallocated). */
static uint64_t
l2_entry(const struct qcow2 *q, const struct mc_entry *l2, uint64_t c)
{
	if (!l2)
		return 0;
	return qcow2_be64((const uint8_t *)l2->buf + 8 * (c & (q->m.l2_entries - 1)));
}

struct qcow2_cluster
qcow2_entry_decode(const struct qcow2 *q, uint64_t e)
{
	struct qcow2_cluster c;
	char why[96];
	if (qcow2_l2_decode(&q->m, e, q->next_free, &c, why, sizeof(why)) < 0)
		c.kind = QCOW2_UNALLOCATED;	/* cannot happen: checked at load */
	return c;
}

/* A buffer O_DIRECT can take (aligned_alloc wants whole alignment units). */
void *
qcow2_buf_alloc(size_t len)
{
	return aligned_alloc(4096, (len + 4095) / 4096 * 4096);
}

void
qcow2_io_prep_meta(struct qcow2 *q, struct io_op *op, enum io_opcode opc, struct iovec *iov,
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

/* ---- the metadata caches (meta_cache.h) ---- */

/* The L2 cache's on_load: a table is checked as it is read, its entries trusted after. */
static int
l2_loaded(struct mc_cache *c, struct mc_entry *e, size_t len)
{
	struct qcow2 *q = c->priv;
	char why[160];

	(void)len;
	if (qcow2_l2_check(&q->m, e->buf, q->next_free, why, sizeof(why)) == 0)
		return 0;
	log_limited(&q->rl, LOG_LVL_ERR, "%s: L2 table %ju at %#jx is corrupt: %s",
		    q->img->params, (uintmax_t)e->key, (uintmax_t)e->off, why);
	return EIO;
}

/* A cache of whole clusters, bytes of them at most (Q_CACHE_MIN at least). */
static void
cache_init(struct mc_cache *c, struct qcow2 *q, struct io_engine *io, unsigned bytes)
{
	unsigned max = bytes / q->m.cluster_size;

	mc_init(c, io, max < Q_CACHE_MIN ? Q_CACHE_MIN : max);
	c->priv = q;
}

int
qcow2_table_get(struct qcow2 *q, struct mc_cache *c, uint64_t idx, uint64_t host,
		struct mc_waiter *w)
{
	return mc_get(c, idx, q->f.fd, q->f.io_flags, host, q->m.cluster_size, w);
}

static void
l2_put(struct qcow2 *q, struct mc_entry *l2)
{
	if (l2)
		mc_put(&q->l2c, l2);
}

/* ---- requests and pieces ---- */

static int
op_writes(enum td_op op)
{
	return op == TD_OP_WRITE || op == TD_OP_DISCARD || op == TD_OP_WRITE_ZEROES;
}

static void
qreq_synced(struct io_op *op, int res)
{
	struct qreq *qr = op->data;
	td_pieces_end(qr->ps, res < 0 ? -res : 0);
}

/* The pieces' last step: a flush, or a FUA write that succeeded, syncs before it completes. */
static int
qreq_last(struct td_pieces *ps)
{
	struct qreq *qr = ps->priv;
	struct qcow2 *q = qr->q;
	const struct td_request *req = ps->req;

	if (ps->err || (req->op != TD_OP_FLUSH && !(op_writes(req->op) && (req->flags & TD_REQ_FUA))))
		return 0;
	qr->sync_op.opcode = IO_OP_FDATASYNC;
	qr->sync_op.flags = q->f.io_flags;
	qr->sync_op.fd = q->f.fd;
	qr->sync_op.done = qreq_synced;
	qr->sync_op.data = qr;
	io_submit(q->img->io, &qr->sync_op);
	return 1;
}

static struct qop *
qop_new(struct td_pieces *ps, struct qcow2 *q, uint64_t off, uint64_t len)
{
	struct qop *v = td_req_alloc(ps->req, sizeof(*v));
	if (!v)
		return NULL;
	v->ps = ps;
	v->q = q;
	v->off = off;
	v->len = len;
	td_pieces_add(ps);
	return v;
}

static void zero_issue(struct qreq *qr);

static void
qop_finish(struct qop *v, int err)
{
	struct td_pieces *ps = v->ps;
	struct qreq *qr = ps->priv;

	if (v->iov && v->iov != v->iov_inline)
		free(v->iov);
	free(v->buf);
	free(v->cluster);
	td_req_free(ps->req, v);
	if (qr->zpos < qr->zend && !err && !ps->err && ps->pending <= Q_ZERO_PIECES / 2)
		zero_issue(qr);		/* more of a long zeroing, while this piece holds it */
	td_pieces_done(ps, err);
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
	if (!(p = qop_new(v->ps, v->q, off, len))) {
		v->ps->err = ENOMEM;
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
	return td_req_iov(v->ps->req, off, len, v->zero ? q_zeros : NULL, Q_ZERO_BYTES,
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

/* A piece that waited for a job starts again, or fails. */
static void
qop_resume(struct jwait *w, int err)
{
	struct qop *v = container_of(w, struct qop, wait);
	if (err)
		qop_finish(v, err);
	else
		v->resume(v);
}

static void
l2_ready(struct mc_waiter *w, struct mc_entry *l2, int err)
{
	struct qop *v = container_of(w, struct qop, l2_wait);
	if (err)
		qop_finish(v, err);
	else
		v->with_l2(v, l2);
}

/* fn(v, the L2 table of v's span pinned, or NULL if it has none): now, or once it is loaded. */
static void
l2_with(struct qop *v, void (*fn)(struct qop *v, struct mc_entry *l2))
{
	struct qcow2 *q = v->q;
	uint64_t l1i = v->off >> q->span_bits;

	if (l1i >= q->m.h.l1_size || !q->m.l1[l1i]) {
		fn(v, NULL);
		return;
	}
	v->with_l2 = fn;
	v->l2_wait.ready = l2_ready;
	if (qcow2_table_get(q, &q->l2c, l1i, q->m.l1[l1i] & QCOW2_OFFSET_MASK, &v->l2_wait) < 0)
		qop_finish(v, ENOMEM);
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
	td_image_read_parent_range(v->q->img, v->ps->req, &v->sub, v->off, v->len, v->iov, v->iovcnt,
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
			    q->img->params, (uintmax_t)qcow2_entry_decode(q, v->entry).host);
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
	struct qcow2_cluster c = qcow2_entry_decode(q, v->entry);
	uint64_t len = q->known_end > c.host ? min_u64(c.csize, q->known_end - c.host) : 0;

	v->after = after;
	v->buf = malloc(len ? len : 1);
	v->cluster = qcow2_buf_alloc(q->m.cluster_size);
	if (!v->buf || !v->cluster || !len) {
		after(v, len ? ENOMEM : EIO);
		return;
	}
	v->csize = len;
	qcow2_io_prep_meta(q, &v->op, IO_OP_READV, &v->miov, v->buf, len, c.host);
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
run_of(const struct qcow2 *q, const struct mc_entry *l2, uint64_t pos, uint64_t end,
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

/* v lies inside the span of l2 (pinned, or NULL): split it into runs and read each. */
static void
read_runs(struct qop *v, struct mc_entry *l2)
{
	struct qcow2 *q = v->q;
	uint64_t pos, end = v->off + v->len;
	struct run r;
	int whole = 0;

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
	l2_put(q, l2);
	if (!whole)
		qop_finish(v, 0);
}

/* v lies inside one L2 table's span. */
static void
read_range(struct qop *v)
{
	l2_with(v, read_runs);
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
void
qcow2_job_end(struct qcow2 *q, struct job *j, int err)
{
	struct jwait_list waiting;

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
		struct jwait *w = TAILQ_FIRST(&waiting);
		TAILQ_REMOVE(&waiting, w, link);
		w->fn(w, 0);
	}
}

static void
job_ready(struct qcow2 *q, struct job *j)
{
	TAILQ_INSERT_TAIL(&q->ready, j, queue);
	if (!q->batch)
		qcow2_batch_start(q);
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
		qcow2_job_end(q, j, err);
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
			qcow2_job_end(q, j, ENOMEM);
			return;
		}
		job_ready(q, j);
		return;
	}
	if (k == QCOW2_COMPRESSED_DATA) {
		inflate_cluster(v, cow_inflated);
		return;
	}
	if (!(j->bounce = qcow2_buf_alloc(cs))) {
		qcow2_job_end(q, j, ENOMEM);
		return;
	}
	v->miov.iov_base = j->bounce;
	v->miov.iov_len = cs;
	v->sub.priv = v;
	td_image_read_parent_range(q->img, v->ps->req, &v->sub, start, cs, &v->miov, 1, cow_backing_read);
}

/* v lies inside the span of l2 (pinned, or NULL): write in place, or allocate, by cluster. */
static void
write_runs(struct qop *v, struct mc_entry *l2)
{
	struct qcow2 *q = v->q;
	uint64_t cs = q->m.cluster_size, pos, stop, end = v->off + v->len;
	int whole = 0;

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
	l2_put(q, l2);
	if (!whole)
		qop_finish(v, 0);
}

/* v lies inside one L2 table's span (again, after waiting for a job). */
static void
write_range(struct qop *v)
{
	l2_with(v, write_runs);
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
	struct qop *v = qop_new(qr->ps, qr->q, off, len);

	if (!v) {
		qr->ps->err = ENOMEM;
		return;
	}
	v->zero = 1;
	v->mode = mode;
	if (mode >= 0)
		zero_range(v);
	else
		write_range(v);
}

/* One L2 table's span of a discard or write-zeroes, from qr->zpos. */
static void
zero_span(struct qcow2 *q, struct qreq *qr)
{
	uint64_t cs = q->m.cluster_size, size = q->img->size, pos = qr->zpos;
	uint64_t stop = min_u64(((pos >> q->span_bits) + 1) << q->span_bits, qr->zend);
	int discard = qr->ps->req->op == TD_OP_DISCARD, mode = qr->zmode;
	/* whole clusters: [a, z); the disk's last cluster is whole at its end */
	uint64_t a = div_up(pos, cs) * cs;
	uint64_t z = stop == size ? stop : stop / cs * cs;

	qr->zpos = stop;
	if (a >= z || mode < 0) {	/* no whole cluster, or zeros written throughout */
		if (!discard)
			zero_piece(qr, pos, stop - pos, -1);
		return;
	}
	if (pos < a && !discard)
		zero_piece(qr, pos, a - pos, -1);
	zero_piece(qr, a, z - a, mode);
	if (z < stop && !discard)
		zero_piece(qr, z, stop - z, -1);
}

/*
 * Issues the spans of a discard or write-zeroes, Q_ZERO_PIECES at most in
 * flight (a request may cover a whole disk); qop_finish calls again as
 * they complete. The caller holds the request (submit, or a piece not yet
 * done): pieces that complete at once do not end it under us.
 */
static void
zero_issue(struct qreq *qr)
{
	struct td_pieces *ps = qr->ps;

	if (qr->issuing)
		return;
	qr->issuing = 1;
	while (qr->zpos < qr->zend && ps->pending <= Q_ZERO_PIECES && !ps->err)
		zero_span(qr->q, qr);
	qr->issuing = 0;
}

static void
zero_submit(struct qcow2 *q, struct qreq *qr)
{
	struct td_request *req = qr->ps->req;

	qr->zmode = zero_mode(q, req);
	if (qr->zmode == -2)
		return;
	qr->zpos = req->offset;
	qr->zend = req->offset + req->length;
	zero_issue(qr);
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

static void status_run(struct qreq *qr, struct mc_entry *held);

/* The table a status step waited for: start again with it. */
static void
status_loaded(struct mc_waiter *w, struct mc_entry *l2, int err)
{
	struct qreq *qr = container_of(w, struct qreq, wait);

	if (!err)
		status_run(qr, l2);
	td_pieces_done(qr->ps, err);
}

/* The L2 table l1i is not in memory: load it (a piece of the request), then start again. */
static void
status_load(struct qreq *qr, uint64_t l1i)
{
	struct qcow2 *q = qr->q;

	td_pieces_add(qr->ps);
	qr->wait.ready = status_loaded;
	if (qcow2_table_get(q, &q->l2c, l1i, q->m.l1[l1i] & QCOW2_OFFSET_MASK, &qr->wait) < 0)
		td_pieces_done(qr->ps, ENOMEM);
}

/*
 * Extents as far as the tables in memory tell (held: one pinned for us);
 * loads one table when none does.
 */
static void
status_run(struct qreq *qr, struct mc_entry *held)
{
	struct qcow2 *q = qr->q;
	struct td_request *req = qr->ps->req;
	uint64_t pos = req->offset, end = req->offset + req->length;

	req->nr_extents = 0;
	while (pos < end) {
		uint64_t stop = min_u64(((pos >> q->span_bits) + 1) << q->span_bits, end);
		uint64_t l1i = pos >> q->span_bits;
		struct mc_entry *l2 = NULL;
		if (pos >= q->img->size) {	/* a chain asking past our end */
			td_extent_add(req, end - pos, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
			break;
		}
		if (q->m.l1[l1i]) {
			l2 = held && held->key == l1i ? held : mc_find(&q->l2c, l1i);
			if (!l2 || !l2->ready) {
				if (!req->nr_extents)
					status_load(qr, l1i);
				break;	/* else what we have so far, rather than wait */
			}
		}
		struct run r;
		int room = 1;
		for (; pos < stop && room; pos += r.len) {
			run_of(q, l2, pos, stop, &r);
			room = td_extent_add(req, r.len, status_flags(r.kind));
		}
		if (!room)
			break;
	}
	l2_put(q, held);
}

/* ---- submit ---- */

/* Reads and writes: a piece per L2 table's span. */
static void
rw_submit(struct qreq *qr)
{
	struct qcow2 *q = qr->q;
	struct td_request *req = qr->ps->req;

	for (uint64_t pos = req->offset, end = req->offset + req->length; pos < end;) {
		uint64_t stop = min_u64(((pos >> q->span_bits) + 1) << q->span_bits, end);
		struct qop *v = qop_new(qr->ps, q, pos, stop - pos);
		if (!v) {
			qr->ps->err = ENOMEM;
			break;
		}
		if (req->op == TD_OP_READ)
			read_range(v);
		else
			write_range(v);
		pos = stop;
	}
}

static void
qcow2_submit(struct td_image *img, struct td_request *req)
{
	struct qcow2 *q = img->priv;
	struct td_pieces *ps;
	struct qreq *qr;

	/* vbd_start refuses writes to read-only disks; caps keep flushes away */
	assert(!q->rdonly || (!op_writes(req->op) && req->op != TD_OP_FLUSH));
	if (req->op == TD_OP_CACHE) {
		td_complete_later(img, req, 0);
		return;
	}
	if (req->op == TD_OP_WRITE_ZEROES && (req->flags & TD_REQ_FAST_ZERO) &&
	    zero_is_slow(q, req)) {
		td_complete_later(img, req, ENOTSUP);
		return;
	}
	if (!(ps = td_pieces_new(img, req, sizeof(*qr)))) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	qr = ps->priv;
	qr->ps = ps;
	qr->q = q;
	ps->last = qreq_last;
	if (req->op == TD_OP_BLOCK_STATUS)
		status_run(qr, NULL);
	else if (req->op == TD_OP_DISCARD || req->op == TD_OP_WRITE_ZEROES)
		zero_submit(q, qr);
	else if (req->op != TD_OP_FLUSH)	/* a flush is its last step alone */
		rw_submit(qr);
	td_pieces_issued(ps);
}

/* ---- open / close ---- */

/* What the request path keeps of an image just loaded: caches, jobs. */
static void
q_state_init(struct qcow2 *q, struct io_engine *io)
{
	q->span_bits = q->m.cluster_bits + q->m.l2_bits;
	cache_init(&q->l2c, q, io, Q_L2_CACHE);
	q->l2c.on_load = l2_loaded;
	cache_init(&q->rbc, q, io, Q_RB_CACHE);
	for (int i = 0; i < Q_JOB_HASH; i++)
		LIST_INIT(&q->jobs[i]);
	TAILQ_INIT(&q->zero_jobs);
	TAILQ_INIT(&q->ready);
}

static int
qcow2_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct qcow2 *q = calloc(1, sizeof(*q));
	int rc;

	if (!q)
		return td_error_set(err, ENOMEM, "out of memory");
	q->img = img;
	q->rdonly = (img->oflags & TD_OPEN_RDONLY) != 0;
	q->rl = (struct log_ratelimit)LOG_RATELIMIT_INIT;
	sync_gate_init(&q->gate, &q->f, ctx->io);
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
	q_state_init(q, ctx->io);
	img->size = m->h.size;
	img->sector_size = 512;
	img->min_io = 1;
	img->priv = q;
	img->caps = TD_CAP_BLOCK_STATUS | TD_CAP_CACHE;
	if (!q->rdonly)
		img->caps |= TD_CAP_FLUSH | TD_CAP_DISCARD | TD_CAP_WRITE_ZEROES | TD_CAP_FAST_ZERO;
	return 0;
}

static void
qcow2_close(struct td_image *img)
{
	struct qcow2 *q = img->priv;

	if (!q->rdonly)
		qcow2_apply_frees(q);
	mc_free(&q->l2c);
	mc_free(&q->rbc);
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

/*
 * Drops the backing file: the header's backing_file_offset and _size (bytes
 * 8..19) become 0, in one sector written and synced. The backing format
 * extension may stay: without a backing file nothing reads it.
 */
static int
qcow2_detach_parent(struct td_image *img, struct td_error *err)
{
	struct qcow2 *q = img->priv;
	size_t len = q->f.sector_size > 512 ? q->f.sector_size : 512;
	uint8_t *buf;
	int rc;

	if (!q->m.backing)
		return 0;
	if (!(buf = aligned_alloc(4096, len < 4096 ? 4096 : len)))
		return td_error_set(err, ENOMEM, "out of memory");
	if ((rc = fc_pread_full(q->f.fd, buf, len, 0)) == 0) {
		memset(buf + 8, 0, 12);
		if ((rc = fc_pwrite_full(q->f.fd, buf, len, 0)) == 0)
			rc = fc_fdatasync(q->f.fd);
	}
	free(buf);
	if (rc < 0)
		return td_error_set(err, -rc, "%s: dropping the backing file: %s", img->path,
				    strerror(-rc));
	free(q->m.backing);
	q->m.backing = NULL;
	q->m.backing_fmt[0] = 0;
	q->m.h.backing_file_offset = 0;
	q->m.h.backing_file_size = 0;
	return 0;
}

/* Where the backing format extension's name is in cluster 0 (buf: its first len bytes). */
static int
backing_fmt_ext(const struct qcow2 *q, const uint8_t *buf, uint64_t len, uint64_t *at,
		uint32_t *elen)
{
	uint64_t off = q->m.h.header_length, end = q->m.h.backing_file_offset;

	while (off + 8 <= end && off + 8 <= len) {
		uint32_t type = get_be32(buf + off), l = get_be32(buf + off + 4);
		if (type == QCOW2_EXT_END)
			break;
		if (type == QCOW2_EXT_BACKING_FMT) {
			*at = off + 8;
			*elen = l;
			return 1;
		}
		off += 8 + ((l + 7) & ~7u);
	}
	return 0;
}

/*
 * Points the image at another backing file (a commit merged its old one
 * into that): the new name goes after the old one in cluster 0 (which holds
 * nothing else), then the sector with the header's backing fields (and the
 * format extension, when the format changes) is written last, in one write.
 */
static int
qcow2_set_parent(struct td_image *img, struct td_image *parent, struct td_error *err)
{
	struct qcow2 *q = img->priv;
	const char *slash = strrchr(img->path, '/'), *pslash = strrchr(parent->path, '/');
	const char *fmt = parent->drv == &td_driver_qcow2 ? "qcow2" : "raw";
	size_t sec = q->f.sector_size > 512 ? q->f.sector_size : 512;
	uint64_t at = 0, off, len;
	uint32_t elen = 0;
	uint8_t *buf = NULL;
	char *name;
	int rc;

	if (parent->drv != &td_driver_qcow2 && parent->drv != &td_driver_raw)
		return td_error_set(err, ENOTSUP, "%s: a qcow2's backing file is qcow2 or raw",
				    img->path);
	/* the same directory: its name, as qemu-img writes a relative one */
	if (slash && pslash && slash - img->path == pslash - parent->path &&
	    !strncmp(img->path, parent->path, (size_t)(slash - img->path)))
		name = strdup(pslash + 1);
	else
		name = strdup(parent->path);
	if (!name)
		return td_error_set(err, ENOMEM, "out of memory");
	off = q->m.h.backing_file_offset + q->m.h.backing_file_size;
	len = (off + strlen(name) + sec - 1) / sec * sec;
	if (!q->m.h.backing_file_offset || off + strlen(name) > q->m.cluster_size) {
		rc = td_error_set(err, ENOSPC, "%s: no room in the header cluster for the name %s",
				  img->path, name);
		goto out;
	}
	if (!(buf = aligned_alloc(4096, (len + 4095) / 4096 * 4096))) {
		rc = td_error_set(err, ENOMEM, "out of memory");
		goto out;
	}
	if ((rc = fc_pread_full(q->f.fd, buf, len, 0)) < 0)
		goto io;
	memcpy(buf + off, name, strlen(name));
	qcow2_put64(buf + 8, off);
	qcow2_put32(buf + 16, (uint32_t)strlen(name));
	if (backing_fmt_ext(q, buf, len, &at, &elen) && strcmp(q->m.backing_fmt, fmt)) {
		if (at + ((elen + 7) & ~7u) > sec || strlen(fmt) > ((elen + 7) & ~7u)) {
			rc = td_error_set(err, ENOTSUP, "%s: the backing format cannot change from "
					  "%s to %s here", img->path, q->m.backing_fmt, fmt);
			goto out;
		}
		memset(buf + at, 0, (elen + 7) & ~7u);
		memcpy(buf + at, fmt, strlen(fmt));
		qcow2_put32(buf + at - 4, (uint32_t)strlen(fmt));
	}
	/* the name's sectors past the first, then the first */
	if ((len > sec && (rc = fc_pwrite_full(q->f.fd, buf + sec, len - sec, sec)) < 0) ||
	    (rc = fc_fdatasync(q->f.fd)) < 0 || (rc = fc_pwrite_full(q->f.fd, buf, sec, 0)) < 0 ||
	    (rc = fc_fdatasync(q->f.fd)) < 0)
		goto io;
	q->m.h.backing_file_offset = off;
	q->m.h.backing_file_size = (uint32_t)strlen(name);
	if (elen)
		snprintf(q->m.backing_fmt, sizeof(q->m.backing_fmt), "%s", fmt);
	free(q->m.backing);
	q->m.backing = name;
	name = NULL;
	rc = 0;
	goto out;
io:
	rc = td_error_set(err, -rc, "%s: pointing it at %s: %s", img->path, parent->path,
			  strerror(-rc));
out:
	free(name);
	free(buf);
	return rc;
}

const struct td_driver td_driver_qcow2 = {
	.name = "qcow2",
	.ctx_size = TD_PIECES_CTX_SIZE(sizeof(struct qreq)) + TD_CTX_SIZE(struct qop),
	.open = qcow2_open,
	.close = qcow2_close,
	.submit = qcow2_submit,
	.get_parent = qcow2_get_parent,
	.create_child = qcow2_create_child,
	.detach_parent = qcow2_detach_parent,
	.set_parent = qcow2_set_parent,
};
