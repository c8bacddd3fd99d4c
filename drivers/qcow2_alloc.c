/*
 * qcow2 allocation batches: where new clusters go and the order in which
 * they are written, so that a crash of the process or a power loss leaves
 * at worst leaked clusters (qemu's documented order: refcounts before L2
 * before L1). A step whose writes point at an earlier step's must not
 * reach the disk first, and without a sync in between a power loss may
 * keep the later write and lose the earlier: the steps marked "sync"
 * below wait for one (shared with other waiters, sync_gate.h).
 *
 * Jobs ready (their data completed to whole clusters) are allocated in
 * batches, one batch at a time, always past the end of the file: freed
 * clusters are never reused, so a crash can never make two guest clusters
 * share one. A batch plans where everything goes (loading the L2 tables and
 * refcount blocks it needs first), then writes, each step after the last
 * has completed:
 *   0. with decrements to make: sync (the unlinking L2 writes of earlier
 *      batches are durable before their clusters' refcounts drop);
 *   1. the refcount blocks counting the new clusters (new blocks whole,
 *      existing ones the changed bytes), with the decrements of clusters
 *      earlier batches unlinked;
 *   2. with new refcount blocks: sync; the refcount table entries of new
 *      blocks, or a larger table, sync, and then the header pointing at it
 *      (the old table is freed by a later batch);
 *   3. the data of every new cluster (and holes punched where refcounts
 *      reached zero); sync;
 *   4. the L2 entries that make the data reachable (in place), and new L2
 *      tables whole;
 *   5. for new L2 tables: sync; the L1 entries pointing at them;
 * and only then are the jobs' writes acknowledged. Clusters a batch unlinks
 * (discard, zeroing, overwritten compressed data) lose their references in
 * step 4 and their refcounts in step 1 of a later batch, or at close.
 */
#include "qcow2_priv.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "container_of.h"

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
	struct mc_entry *e;
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

/* A table the batch waits for. */
struct loadwait {
	struct mc_waiter w;
	struct batch *b;
	struct mc_cache *c;
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
	int planning;			/* batch_plan is running: loads may end inside it */
	void (*phase_done)(struct batch *b);
	struct sync_waiter sw;
	void (*after_sync)(struct batch *b);
	/*
	 * The step under way changed tables in memory before writing them: if
	 * it fails, this puts memory back as the file is, so that no later
	 * write trusts what never reached it.
	 */
	void (*undo)(struct batch *b);
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
		if (pins[i].e->key == idx)
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

/* The pins of cache c: L2 tables or refcount blocks. */
static void
pins_of(struct batch *b, struct mc_cache *c, struct pin ***pins, int **n, int **cap)
{
	int is_l2 = c == &b->q->l2c;

	*pins = is_l2 ? &b->l2pins : &b->rbpins;
	*n = is_l2 ? &b->nl2pins : &b->nrbpins;
	*cap = is_l2 ? &b->cap_l2pins : &b->cap_rbpins;
}

/* The batch holds e (pinned for it) from now on; a second pin of the same table goes back. */
static void
pin_add(struct batch *b, struct mc_cache *c, struct mc_entry *e)
{
	struct pin **pins;
	int *n, *cap;

	pins_of(b, c, &pins, &n, &cap);
	if (pin_find(*pins, *n, e->key)) {
		mc_put(c, e);
		return;
	}
	if (grow_array((void **)pins, cap, *n, sizeof(**pins)) < 0) {
		mc_put(c, e);
		if (!b->err)
			b->err = ENOMEM;
		return;
	}
	(*pins)[*n].e = e;
	(*pins)[*n].lo = UINT64_MAX;
	(*pins)[*n].hi = 0;
	(*n)++;
}

/* A table is there (now, or loaded later) or failed; the last one replans. */
static void
batch_loaded(struct mc_waiter *w, struct mc_entry *e, int err)
{
	struct loadwait *lw = container_of(w, struct loadwait, w);
	struct batch *b = lw->b;
	struct mc_cache *c = lw->c;

	free(lw);
	if (e)
		pin_add(b, c, e);
	else if (!b->err)
		b->err = err;
	if (--b->loads == 0 && !b->planning)
		batch_plan_and_go(b);
}

/* Pins table idx of cache c for the batch, or starts loading it (b->loads). */
static int
batch_pin(struct batch *b, struct mc_cache *c, uint64_t idx, uint64_t host)
{
	struct pin **pins;
	int *n, *cap;
	struct loadwait *lw;

	pins_of(b, c, &pins, &n, &cap);
	if (pin_find(*pins, *n, idx))
		return 0;
	if (!(lw = calloc(1, sizeof(*lw))))
		return -ENOMEM;
	lw->w.ready = batch_loaded;
	lw->b = b;
	lw->c = c;
	b->loads++;
	if (qcow2_table_get(b->q, c, idx, host, &lw->w) < 0) {
		b->loads--;
		free(lw);
		return -ENOMEM;
	}
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
	if (b->err) {
		batch_finish(b);
		return;
	}
	b->undo = NULL;		/* the file holds what memory says */
	b->phase_done(b);
}

/* The changed tables of pins go; the next user reads them from the file. */
static void
drop_changed(struct mc_cache *c, const struct pin *pins, int n)
{
	for (int i = 0; i < n; i++)
		if (pins[i].lo <= pins[i].hi)
			mc_drop(c, pins[i].e->key);
}

static void
undo_refcounts(struct batch *b)
{
	drop_changed(&b->q->rbc, b->rbpins, b->nrbpins);
}

static void
undo_reftable(struct batch *b)
{
	for (int i = 0; i < b->nrbs; i++)
		b->q->m.reftable[b->rbs[i].idx] = 0;
}

static void
undo_l2(struct batch *b)
{
	drop_changed(&b->q->l2c, b->l2pins, b->nl2pins);
}

static void
undo_l1(struct batch *b)
{
	for (int i = 0; i < b->ntabs; i++) {
		b->q->m.l1[b->tabs[i].idx] = 0;		/* fresh tables replace no entry */
		mc_drop(&b->q->l2c, b->tabs[i].idx);
	}
}

static void
batch_synced(struct sync_waiter *w, int err)
{
	struct batch *b = container_of(w, struct batch, sw);
	if (err && !b->err)
		b->err = err;
	if (b->err)
		batch_finish(b);
	else
		b->after_sync(b);
}

/* Runs next once everything the batch wrote so far is durable. */
static void
batch_sync_then(struct batch *b, void (*next)(struct batch *))
{
	b->after_sync = next;
	b->sw.fn = batch_synced;
	sync_gate_wait(&b->q->gate, &b->sw);
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
		qcow2_io_prep_meta(q, &io->op, opc, &io->iov, buf, len, off);
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
static void batch_refcounts(struct batch *b);

/* New refcount blocks are durable before the table points at them. */
static void
batch_link_blocks_synced(struct batch *b)
{
	batch_sync_then(b, batch_link_blocks);
}

/* Step 0: decrements wait until the L2 writes that unlinked their clusters are durable. */
static void
batch_commit(struct batch *b)
{
	if (b->nfrees)
		batch_sync_then(b, batch_refcounts);
	else
		batch_refcounts(b);
}

/* Step 1: the refcounts of new clusters (and the decrements of unlinked ones). */
static void
batch_refcounts(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t cs = q->m.cluster_size;

	q->next_free = b->end;	/* never handed out again, whatever happens next */
	for (int i = 0; i < b->nrbs; i++) {
		if (!(b->rbs[i].buf = qcow2_buf_alloc(cs))) {
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
	b->undo = undo_refcounts;
	batch_step_begin(b, b->nrbs ? batch_link_blocks_synced : batch_link_blocks);
	for (int i = 0; i < b->nrbs; i++)
		batch_io(b, IO_OP_WRITEV, NULL, 0, b->rbs[i].buf, cs, b->rbs[i].host, NULL, NULL);
	for (int i = 0; i < b->nrbpins; i++) {
		struct pin *p = &b->rbpins[i];
		uint64_t off, len;
		if (p->lo > p->hi)
			continue;
		qcow2_rc_bytes(p->lo, p->hi, q->m.refcount_bits, &off, &len);
		batch_io(b, IO_OP_WRITEV, NULL, 0, (uint8_t *)p->e->buf + off, len, p->e->off + off,
			 NULL, NULL);
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

/* The new table is durable before the header points at it. */
static void
batch_grow_table_written(struct batch *b)
{
	batch_sync_then(b, batch_grow_written);
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
		uint8_t *t = qcow2_buf_alloc(len);
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
		batch_step_begin(b, batch_grow_table_written);
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
	b->undo = undo_reftable;
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

/* Data and refcounts are durable before any table points at them. */
static void
batch_data_written(struct batch *b)
{
	batch_sync_then(b, batch_write_tables);
}

/* Step 3: the data of every new cluster; holes where refcounts reached zero. */
static void
batch_write_data(struct batch *b)
{
	struct qcow2 *q = b->q;

	/* the new blocks are the cache's from now on */
	for (int i = 0; i < b->nrbs; i++)
		if (mc_insert(&q->rbc, b->rbs[i].idx, b->rbs[i].host, b->rbs[i].buf) == 0)
			b->rbs[i].buf = NULL;
	batch_step_begin(b, batch_data_written);
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
	struct qcow2_cluster c = qcow2_entry_decode(q, old);

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

/* New L2 tables are durable before L1 points at them. */
static void
batch_tables_written(struct batch *b)
{
	batch_sync_then(b, batch_link_tables);
}

/* Step 4: the L2 entries (in place, and new tables whole). */
static void
batch_write_tables(struct batch *b)
{
	struct qcow2 *q = b->q;
	uint64_t cs = q->m.cluster_size;

	if (b->end > q->known_end)
		q->known_end = b->end;
	for (int i = 0; i < b->ntabs; i++) {
		if (!(b->tabs[i].buf = qcow2_buf_alloc(cs))) {
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
	b->undo = undo_l2;
	batch_step_begin(b, b->ntabs ? batch_tables_written : batch_finish);
	for (int i = 0; i < b->nl2pins; i++) {
		struct pin *p = &b->l2pins[i];
		if (p->lo <= p->hi)
			batch_io(b, IO_OP_WRITEV, NULL, 0, (uint8_t *)p->e->buf + 8 * p->lo,
				 (p->hi - p->lo + 1) * 8, p->e->off + 8 * p->lo, NULL, NULL);
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
		if (mc_insert(&q->l2c, f->idx, f->host, f->buf) == 0)
			f->buf = NULL;	/* the cache's now */
		lo = f->idx < lo ? f->idx : lo;
		hi = f->idx > hi ? f->idx : hi;
	}
	b->undo = undo_l1;
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
		mc_put(&b->q->l2c, b->l2pins[i].e);
	for (int i = 0; i < b->nrbpins; i++)
		mc_put(&b->q->rbc, b->rbpins[i].e);
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

/*
 * Acknowledge: every job ends; the next batch starts. Everything else
 * first: the last job to end may complete the last request of a vbd being
 * paused or closed, whose chain close starts on a worker at once and frees
 * q, its caches (the tables this batch pinned) and all. The next batch
 * holds only jobs of requests still in flight, so starting it first is
 * safe, and after the last qcow2_job_end nothing here touches q.
 */
static void
batch_finish(struct batch *b)
{
	struct qcow2 *q = b->q;
	struct job *jobs[Q_BATCH_MAX];
	int nr = b->nr, err = b->err;

	if (!err)
		for (size_t i = 0; i < b->nunlinked; i++)
			push_cluster(&q->frees, &q->nfrees, &q->cap_frees, b->unlinked[i]);
	else
		log_limited(&q->rl, LOG_LVL_ERR, "%s: allocation failed: %s", q->img->params,
			    strerror(err));
	if (err && b->undo)
		b->undo(b);
	memcpy(jobs, b->jobs, sizeof(jobs[0]) * (size_t)nr);
	batch_free(b);
	q->batch = NULL;
	qcow2_batch_start(q);
	for (int i = 0; i < nr; i++)
		qcow2_job_end(q, jobs[i], jobs[i]->err ? jobs[i]->err : err);
}

/*
 * Plans the batch and commits it, or fails it; waits instead while tables
 * load (batch_loaded calls again once the last is there or failed).
 */
static void
batch_plan_and_go(struct batch *b)
{
	int rc = -b->err;

	if (!rc) {
		b->planning = 1;
		rc = batch_plan(b);
		b->planning = 0;
	}
	if (!rc && b->err)
		rc = -b->err;	/* a table failed to pin */
	if (rc < 0)
		b->err = -rc;
	if (b->loads)
		return;		/* the loads still refer to b */
	if (rc < 0)
		batch_finish(b);
	else
		batch_commit(b);
}

void
qcow2_batch_start(struct qcow2 *q)
{
	struct batch *b;

	if (q->batch || TAILQ_EMPTY(&q->ready))
		return;
	if (!(b = calloc(1, sizeof(*b)))) {
		/* off q first: the last job's end may let a close free q */
		struct job_list failed = TAILQ_HEAD_INITIALIZER(failed);
		TAILQ_CONCAT(&failed, &q->ready, queue);
		while (!TAILQ_EMPTY(&failed)) {
			struct job *j = TAILQ_FIRST(&failed);
			TAILQ_REMOVE(&failed, j, queue);
			qcow2_job_end(q, j, ENOMEM);
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
void
qcow2_apply_frees(struct qcow2 *q)
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
				fc_fallocate(q->f.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
					     q->frees[i] << m->cluster_bits, m->cluster_size);
		}
		if (ok && td_pwrite_full(&q->f.fd, block, m->cluster_size, host) < 0)
			break;	/* leaked clusters: qemu-img check -r leaks reclaims them */
	}
	free(block);
}
