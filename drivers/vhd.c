/*
 * vhd: fixed, dynamic and differencing VHDs.
 *
 * Fixed disks are raw files with a footer: the raw driver serves them.
 * Dynamic and differencing disks map each block through the BAT; inside a
 * block, a sector bitmap says which sectors this image holds (the others
 * come from the parent, or read as zeros). blktap's batmap marks blocks
 * whose bitmap is full, so their bitmaps need not be read.
 *
 * Everything after open is asynchronous. New blocks are allocated in
 * batches, in an order that leaves a consistent file at every instant, a
 * power loss included (a sync between steps: without one the disk may keep
 * a later write and lose an earlier one):
 *   1. the footer moves to the new end of the file (the old one stays,
 *      dead, in the gap before the first new block); sync;
 *   2. bitmap and data of every new block; sync;
 *   3. the BAT sectors that make them reachable (for deallocations: sync,
 *      then the hole punched);
 * and only then are the writes acknowledged. In an allocated block, a
 * write's data is synced before the bitmap bits that expose it are set and
 * written; a flush syncs before it writes the batmap (which vouches for
 * bitmaps). The syncs are shared (sync_gate.h): concurrent writers wait
 * for one. Block data is 4 KiB-aligned
 * (the bitmap sits in the sector before it), so O_DIRECT can take it.
 * Writes to a block being allocated wait for it; other blocks go on.
 */
#include "driver.h"

#include <assert.h>
#include <errno.h>
#include <sys/stat.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "container_of.h"
#include "file_io.h"
#include "meta_cache.h"
#include "sync_gate.h"
#include "vhd_file.h"
#include "vhd_format.h"

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define VHD_BM_CACHE	256	/* cached block bitmaps per image */
#define VHD_MAX_BATCH	64	/* new blocks per allocation batch */
#define VHD_INLINE_IOV	4
#define VHD_ZERO_CHUNK	(1u << 20)

static char vhd_zeros[VHD_ZERO_CHUNK] __attribute__((aligned(4096)));

struct vhd_priv;
struct vop;

TAILQ_HEAD(vop_list, vop);

/*
 * Work on one block that others must wait for: allocation, deallocation,
 * and setting bits in its bitmap (MARK: until the file has them, no other
 * write may trust them and skip its own bitmap write).
 */
struct bjob {
	uint32_t blk;
	enum { JOB_ALLOC, JOB_DEALLOC, JOB_MARK } kind;
	struct vop *first;		/* ALLOC, MARK: the write that started it */
	struct vop_list waiting;	/* later writes to the block */
	uint64_t start;			/* ALLOC: where the block goes (bitmap) */
	uint8_t *map;			/* ALLOC: its new bitmap; MARK: the bytes it changed, before */
	size_t mark_off, mark_len;	/* MARK: where those bytes are in the bitmap */
	int made_full;			/* MARK: it set the block's batmap bit */
	int err;
	LIST_ENTRY(bjob) link;		/* all jobs of the image */
	TAILQ_ENTRY(bjob) queue;	/* ALLOC: waiting for a batch */
};

/* One piece of a request, inside one block (or one metadata step). */
/* What a piece does once its block's bitmap is at hand. */
enum vop_kind { VOP_READ, VOP_WRITE, VOP_STATUS };

struct vop {
	struct td_pieces *ps;
	struct vhd_priv *p;
	uint32_t blk;
	uint64_t off, len;		/* virtual bytes */
	enum vop_kind kind;		/* what the block's bitmap is wanted for */
	int zero;			/* write zeros rather than the request's data */
	struct mc_entry *bm;		/* its bitmap, pinned */
	struct mc_waiter bm_wait;
	struct io_op op;
	struct td_request sub;		/* a read from the parent */
	struct iovec *iov;
	int iovcnt;
	struct iovec iov_inline[VHD_INLINE_IOV];
	void (*next)(struct vop *v, int err);	/* where an I/O completion goes */
	struct sync_waiter sw;		/* its data synced before its bitmap bits */
	TAILQ_ENTRY(vop) link;
};

/* An allocation batch in flight. */
struct batch {
	struct bjob *jobs[VHD_MAX_BATCH];
	int nr, pending, err;
	uint64_t old_next;
	struct io_op footer_op;
	struct iovec footer_iov;
	uint8_t *footer;
	uint8_t *bat_secs;		/* one 512-byte sector per distinct BAT sector */
	uint32_t bat_sec_idx[VHD_MAX_BATCH];
	int nr_secs;
	struct io_op *ops;		/* bitmap, data and BAT writes */
	struct iovec *iovs;
	struct sync_waiter sw;		/* the sync between steps */
	struct vhd_priv *p;
};

struct vhd_priv {
	struct td_image *img;
	struct td_file f;
	struct vhd_meta m;
	struct td_image raw;		/* fixed disks: served by the raw driver */
	int rdonly;
	uint64_t next_free;		/* the footer's place; new blocks go after it */
	struct mc_cache bm;		/* sector bitmaps, by block */
	LIST_HEAD(, bjob) jobs;
	TAILQ_HEAD(, bjob) alloc_queue;
	struct batch *batch;
	int batmap_dirty;
	struct sync_gate gate;		/* orders dependent writes (dynamic disks) */
};

static void vop_start_write(struct vop *v);

static uint64_t
align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

/* ---- open / close ---- */

static int
vhd_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct vhd_priv *p = calloc(1, sizeof(*p));
	char dir[4096];
	int rc;

	if (!p)
		return td_error_set(err, ENOMEM, "out of memory");
	p->img = img;
	p->rdonly = (img->oflags & TD_OPEN_RDONLY) != 0;
	rc = td_file_open(&p->f, img->path, p->rdonly, (img->oflags & TD_OPEN_NODIRECT) != 0,
			  err);
	if (rc < 0) {
		free(p);
		return rc;
	}
	const char *slash = strrchr(img->path, '/');
	if (slash)
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - img->path), img->path);
	else
		snprintf(dir, sizeof(dir), ".");
	if (!dir[0])
		snprintf(dir, sizeof(dir), "/");
	rc = vhd_meta_load(&p->m, td_pread_full, &p->f.fd, p->f.size, dir, vhd_file_exists, err);
	if (rc < 0) {
		td_file_close(&p->f, 0);
		free(p);
		return rc;
	}
	img->size = p->m.size;
	img->sector_size = 512;
	img->min_io = VHD_SECTOR;
	img->priv = p;

	if (p->m.footer.type == VHD_TYPE_FIXED) {
		p->raw.drv = &td_driver_raw;
		p->raw.path = img->path;
		p->raw.oflags = img->oflags;
		p->raw.io = ctx->io;
		rc = td_driver_raw.open(&p->raw, ctx, err);
		if (rc < 0) {
			vhd_meta_free(&p->m);
			td_file_close(&p->f, 0);
			free(p);
			return rc;
		}
		p->raw.size = img->size;	/* the footer is not the disk's */
		img->caps = p->raw.caps;
		return 0;
	}
	mc_init(&p->bm, ctx->io, VHD_BM_CACHE);
	sync_gate_init(&p->gate, &p->f, ctx->io);
	/* a batmap found stale is rewritten (zeroed: true) at the next flush or close */
	p->batmap_dirty = !p->rdonly && p->m.batmap_stale;
	LIST_INIT(&p->jobs);
	TAILQ_INIT(&p->alloc_queue);
	p->next_free = p->m.footer_offset;
	img->caps = TD_CAP_BLOCK_STATUS | TD_CAP_CACHE;
	if (!p->rdonly)
		img->caps |= TD_CAP_FLUSH | TD_CAP_DISCARD | TD_CAP_WRITE_ZEROES;
	return 0;
}

/* The batmap header sector for the map in buf + VHD_SECTOR, into buf. */
static void
batmap_header(struct vhd_priv *p, uint8_t *buf)
{
	struct vhd_meta *m = &p->m;
	size_t map = (size_t)m->batmap_hdr.size * VHD_SECTOR;
	uint64_t sum_len = align_up(m->footer.curr_size >> 24, VHD_SECTOR);
	if (sum_len < VHD_SECTOR)
		sum_len = VHD_SECTOR;
	if (sum_len > map)
		sum_len = map;
	m->batmap_hdr.version = VHD_BATMAP_VERSION;
	m->batmap_hdr.checksum = vhd_batmap_checksum(buf + VHD_SECTOR, (size_t)sum_len);
	vhd_batmap_hdr_encode(&m->batmap_hdr, buf);
}

/* The batmap, header first, as one buffer (they are adjacent when we made them). */
static uint8_t *
batmap_image(struct vhd_priv *p, size_t *len)
{
	struct vhd_meta *m = &p->m;
	size_t map = (size_t)m->batmap_hdr.size * VHD_SECTOR;
	uint8_t *buf = malloc(VHD_SECTOR + map);
	if (!buf)
		return NULL;
	memcpy(buf + VHD_SECTOR, m->batmap, map);
	batmap_header(p, buf);
	*len = VHD_SECTOR + map;
	return buf;
}

/*
 * A batmap write failed part way. Each of its sectors is now old or new,
 * and either is true (a bit only ever says a block is full; load ignores
 * one on a free block), so the header is made to agree with what is there:
 * a checksum mismatch would fail vhd-util check.
 */
static void
batmap_mend(struct vhd_priv *p)
{
	size_t map = (size_t)p->m.batmap_hdr.size * VHD_SECTOR;
	uint8_t *buf = malloc(VHD_SECTOR + map);

	if (buf && fc_pread_full(p->f.fd, buf + VHD_SECTOR, map, p->m.batmap_hdr.offset) == 0) {
		batmap_header(p, buf);
		(void)fc_pwrite_full(p->f.fd, buf, VHD_SECTOR, p->m.batmap_hdr_offset);
	}
	free(buf);
}

static int
batmap_contiguous(const struct vhd_meta *m)
{
	return m->batmap_hdr.offset == m->batmap_hdr_offset + VHD_SECTOR;
}

static void
vhd_close(struct td_image *img)
{
	struct vhd_priv *p = img->priv;

	if (p->m.footer.type == VHD_TYPE_FIXED) {
		td_driver_raw.close(&p->raw);
	} else if (p->batmap_dirty && p->m.has_batmap && batmap_contiguous(&p->m)) {
		size_t len;
		uint8_t *buf = batmap_image(p, &len);
		/*
		 * The batmap vouches for bitmaps: they are durable first. Only an
		 * optimisation is lost if its write fails, once the header agrees.
		 */
		if (buf && fc_fdatasync(p->f.fd) == 0 &&
		    fc_pwrite_full(p->f.fd, buf, len, p->m.batmap_hdr_offset) < 0)
			batmap_mend(p);
		free(buf);
	}
	mc_free(&p->bm);
	vhd_meta_free(&p->m);
	td_file_close(&p->f, !p->rdonly);
	free(p);
}

static int
vhd_get_parent(struct td_image *img, char **params, struct td_error *err)
{
	struct vhd_priv *p = img->priv;

	*params = NULL;
	if (p->m.footer.type != VHD_TYPE_DIFF)
		return 0;
	if (asprintf(params, "%s:%s", p->m.parent_raw ? "aio" : "vhd", p->m.parent_path) < 0) {
		*params = NULL;
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}

static void
uuid_text(const uint8_t *u, char out[37])
{
	snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
		 u[12], u[13], u[14], u[15]);
}

static int
vhd_validate_parent(struct td_image *img, struct td_image *parent, struct td_error *err)
{
	struct vhd_priv *p = img->priv;

	if (p->m.parent_raw)
		return 0;
	if (parent->drv != &td_driver_vhd)
		return td_error_set(err, EINVAL, "parent %s is not a VHD", parent->path);
	struct vhd_priv *pp = parent->priv;
	if (memcmp(pp->m.footer.uuid, p->m.header.parent_uuid, 16)) {
		char want[37], got[37];
		uuid_text(p->m.header.parent_uuid, want);
		uuid_text(pp->m.footer.uuid, got);
		return td_error_set(err, EINVAL, "parent %s has uuid %s, the child expects %s",
				    parent->path, got, want);
	}
	return 0;
}

/* ---- requests: pieces ---- */

static struct vop *
vop_new(struct td_pieces *ps, struct vhd_priv *p, uint32_t blk, uint64_t off, uint64_t len)
{
	struct vop *v = td_req_alloc(ps->req, sizeof(*v));
	if (!v)
		return NULL;
	v->ps = ps;
	v->p = p;
	v->blk = blk;
	v->off = off;
	v->len = len;
	td_pieces_add(ps);
	return v;
}

static void
vop_finish(struct vop *v, int err)
{
	struct td_pieces *ps = v->ps;
	if (v->iov && v->iov != v->iov_inline)
		free(v->iov);
	td_req_free(ps->req, v);
	td_pieces_done(ps, err);
}

/* Points v->iov at bytes [off, off+len) of the request (or of zeros). */
static int
vop_slice(struct vop *v, uint64_t off, uint64_t len)
{
	return td_req_iov(v->ps->req, off, len, v->zero ? vhd_zeros : NULL, VHD_ZERO_CHUNK,
			  v->iov_inline, VHD_INLINE_IOV, &v->iov, &v->iovcnt);
}

static void
vop_io_done(struct io_op *op, int res)
{
	struct vop *v = op->data;
	v->next(v, res < 0 ? -res : 0);
}

/* File I/O for v: data at file offset foff. */
static void
vop_file_io(struct vop *v, enum io_opcode opc, uint64_t foff,
	    void (*next)(struct vop *, int))
{
	v->op.iov = v->iov;
	v->op.iovcnt = v->iovcnt;
	td_file_prep(&v->p->f, &v->op, opc, foff);
	v->op.done = vop_io_done;
	v->op.data = v;
	v->next = next;
	io_submit(v->p->img->io, &v->op);
}

/* Metadata I/O through the buffered descriptor. */
static void
meta_io(struct vhd_priv *p, struct io_op *op, enum io_opcode opc, struct iovec *iov,
	void *buf, size_t len, uint64_t off, void (*done)(struct io_op *, int), void *data)
{
	iov->iov_base = buf;
	iov->iov_len = len;
	op->opcode = opc;
	op->flags = p->f.io_flags;
	op->fd = p->f.fd;
	op->offset = off;
	op->iov = iov;
	op->iovcnt = 1;
	op->done = done;
	op->data = data;
	io_submit(p->img->io, op);
}

static void
vop_done_next(struct vop *v, int err)
{
	vop_finish(v, err);
}

static void
vop_parent_done(struct td_request *sub, int err)
{
	vop_finish(sub->priv, err);
}

/* Reads [off, off+len) from the parent (zeros past its end or below the root). */
static void
vop_read_parent(struct vop *v, uint64_t off, uint64_t len)
{
	if (vop_slice(v, off, len) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	v->sub.priv = v;
	td_image_read_parent_range(v->p->img, v->ps->req, &v->sub, off, len, v->iov, v->iovcnt,
				   vop_parent_done);
}

static void
vop_read_file(struct vop *v, uint64_t off, uint64_t len)
{
	struct vhd_meta *m = &v->p->m;
	uint64_t in_block = off - (uint64_t)v->blk * m->header.block_size;

	if (vop_slice(v, off, len) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	vop_file_io(v, IO_OP_READV, vhd_block_data(m, v->blk) + in_block, vop_done_next);
}

/* ---- bitmap cache ---- */

static void vop_with_bitmap(struct vop *v);

static void
bm_ready(struct mc_waiter *w, struct mc_entry *e, int err)
{
	struct vop *v = container_of(w, struct vop, bm_wait);

	v->bm = e;
	if (err)
		vop_finish(v, err);
	else
		vop_with_bitmap(v);
}

/* Gives v the bitmap of its block (v->bm, pinned) and calls vop_with_bitmap. */
static void
bm_get(struct vop *v)
{
	struct vhd_priv *p = v->p;

	v->bm_wait.ready = bm_ready;
	if (mc_get(&p->bm, v->blk, p->f.fd, p->f.io_flags, vhd_block_offset(&p->m, v->blk),
		   p->m.bitmap_bytes, &v->bm_wait) < 0)
		vop_finish(v, ENOMEM);
}

static void
bm_put(struct vop *v)
{
	if (v->bm) {
		mc_put(&v->p->bm, v->bm);
		v->bm = NULL;
	}
}

/* ---- reads ---- */

/* Splits a piece along its bitmap into runs from the file and from the parent. */
static void
read_by_bitmap(struct vop *v)
{
	struct vhd_priv *p = v->p;
	uint64_t bs = p->m.header.block_size, base = (uint64_t)v->blk * bs;
	uint32_t s = (uint32_t)((v->off - base) / VHD_SECTOR);
	uint32_t end = s + (uint32_t)(v->len / VHD_SECTOR);
	const uint8_t *map = v->bm->buf;
	struct td_pieces *ps = v->ps;

	while (s < end) {
		int bit = vhd_bitmap_test(map, s);
		uint32_t e = s + 1;
		while (e < end && vhd_bitmap_test(map, e) == bit)
			e++;
		struct vop *run = vop_new(ps, p, v->blk, base + (uint64_t)s * VHD_SECTOR,
					  (uint64_t)(e - s) * VHD_SECTOR);
		if (!run) {
			ps->err = ENOMEM;
			break;
		}
		if (bit)
			vop_read_file(run, run->off, run->len);
		else
			vop_read_parent(run, run->off, run->len);
		s = e;
	}
	bm_put(v);
	vop_finish(v, 0);
}

static void
read_piece(struct vop *v)
{
	struct vhd_meta *m = &v->p->m;

	if (m->bat[v->blk] == VHD_BAT_UNUSED)
		vop_read_parent(v, v->off, v->len);
	else if (vhd_batmap_test(m, v->blk))
		vop_read_file(v, v->off, v->len);
	else
		bm_get(v);
}

/* ---- writes to allocated blocks ---- */

static struct bjob *job_find(struct vhd_priv *p, uint32_t blk);
static void job_end(struct bjob *j);

/* v's bitmap write is over: the block's MARK job ends, its waiters go on. */
static void
bitmap_written(struct vop *v, int err)
{
	struct vhd_priv *p = v->p;
	struct bjob *j = job_find(p, v->blk);

	assert(j && j->kind == JOB_MARK && j->first == v);
	if (err) {
		/* the file has not the bits: memory must not either, or a later write trusts them */
		memcpy((uint8_t *)v->bm->buf + j->mark_off, j->map, j->mark_len);
		if (j->made_full)
			vhd_batmap_set(&p->m, v->blk, 0);
	}
	bm_put(v);
	job_end(j);
	vop_finish(v, err);
}

/* The sectors of v's block it covers: [*s, *end). */
static void
vop_sectors(const struct vop *v, uint32_t *s, uint32_t *end)
{
	uint64_t base = (uint64_t)v->blk * v->p->m.header.block_size;
	*s = (uint32_t)((v->off - base) / VHD_SECTOR);
	*end = *s + (uint32_t)(v->len / VHD_SECTOR);
}

static void write_mark_synced(struct sync_waiter *w, int err);

/* Data is in place: once it is durable, make its sectors this image's. */
static void
write_mark(struct vop *v, int err)
{
	struct vhd_priv *p = v->p;
	struct vhd_meta *m = &p->m;
	uint32_t s, end, i;

	if (err) {
		bm_put(v);
		vop_finish(v, err);
		return;
	}
	struct bjob *other = job_find(p, v->blk);
	if (other) {
		/* bits of the block on their way to the file (or it is going): after that, again */
		bm_put(v);
		TAILQ_INSERT_TAIL(&other->waiting, v, link);
		return;
	}
	if (vhd_batmap_test(m, v->blk)) {	/* full, and no job: the file says so */
		bm_put(v);
		vop_finish(v, 0);
		return;
	}
	vop_sectors(v, &s, &end);
	for (i = s; i < end && vhd_bitmap_test(v->bm->buf, i); i++)
		;
	if (i == end) {		/* no job in flight: the file has them */
		bm_put(v);
		vop_finish(v, 0);
		return;
	}
	/* bits set before the data is durable could reach the disk first */
	v->sw.fn = write_mark_synced;
	sync_gate_wait(&p->gate, &v->sw);
}

static void
write_mark_synced(struct sync_waiter *w, int err)
{
	struct vop *v = container_of(w, struct vop, sw);
	struct vhd_priv *p = v->p;
	struct vhd_meta *m = &p->m;
	uint8_t *map = v->bm->buf;
	uint32_t s, end;

	if (err) {
		bm_put(v);
		vop_finish(v, err);
		return;
	}
	if (job_find(p, v->blk)) {	/* another mark started meanwhile: look again after it */
		write_mark(v, 0);
		return;
	}
	vop_sectors(v, &s, &end);
	/* the sectors of the bitmap holding the change; the buffer only gains bits */
	uint32_t first = (s / 8) / VHD_SECTOR, last = ((end - 1) / 8) / VHD_SECTOR;
	struct bjob *j = calloc(1, sizeof(*j));
	if (j)
		j->map = malloc((size_t)(last - first + 1) * VHD_SECTOR);
	if (!j || !j->map) {
		free(j);
		bm_put(v);
		vop_finish(v, ENOMEM);
		return;
	}
	j->blk = v->blk;
	j->kind = JOB_MARK;
	j->first = v;
	TAILQ_INIT(&j->waiting);
	j->mark_off = (size_t)first * VHD_SECTOR;
	j->mark_len = (size_t)(last - first + 1) * VHD_SECTOR;
	memcpy(j->map, map + j->mark_off, j->mark_len);
	LIST_INSERT_HEAD(&p->jobs, j, link);
	for (uint32_t i = s; i < end; i++)
		vhd_bitmap_set(map, i);
	if (m->has_batmap && !vhd_batmap_test(m, v->blk)) {
		uint32_t full = 1;
		for (uint32_t i = 0; i < m->spb / 8 && full; i++)
			full = map[i] == 0xff;
		if (full) {
			vhd_batmap_set(m, v->blk, 1);
			p->batmap_dirty = 1;
			j->made_full = 1;
		}
	}
	v->iov_inline[0].iov_base = map + (size_t)first * VHD_SECTOR;
	v->iov_inline[0].iov_len = (size_t)(last - first + 1) * VHD_SECTOR;
	v->op.iov = v->iov_inline;
	v->op.iovcnt = 1;
	v->op.opcode = IO_OP_WRITEV;
	v->op.flags = p->f.io_flags;
	v->op.fd = p->f.fd;
	v->op.offset = vhd_block_offset(m, v->blk) + (uint64_t)first * VHD_SECTOR;
	v->op.done = vop_io_done;
	v->op.data = v;
	v->next = bitmap_written;
	if (v->iov != v->iov_inline)
		free(v->iov);
	v->iov = v->iov_inline;
	io_submit(p->img->io, &v->op);
}

static void
write_data(struct vop *v)
{
	struct vhd_meta *m = &v->p->m;
	uint64_t in_block = v->off - (uint64_t)v->blk * m->header.block_size;

	if (vop_slice(v, v->off, v->len) < 0) {
		bm_put(v);
		vop_finish(v, ENOMEM);
		return;
	}
	vop_file_io(v, IO_OP_WRITEV, vhd_block_data(m, v->blk) + in_block, write_mark);
}

static void vop_status_bitmap(struct vop *v);

static void
vop_with_bitmap(struct vop *v)
{
	switch (v->kind) {
	case VOP_STATUS:
		vop_status_bitmap(v);
		break;
	case VOP_WRITE:
		write_data(v);
		break;
	case VOP_READ:
		read_by_bitmap(v);
		break;
	}
}

/* ---- block jobs ---- */

static struct bjob *
job_find(struct vhd_priv *p, uint32_t blk)
{
	struct bjob *j;
	LIST_FOREACH(j, &p->jobs, link)
		if (j->blk == blk)
			return j;
	return NULL;
}

/* The job is over: its waiters start again, now on an allocated (or free) block. */
static void
job_end(struct bjob *j)
{
	struct vop_list waiting;

	LIST_REMOVE(j, link);
	TAILQ_INIT(&waiting);
	TAILQ_CONCAT(&waiting, &j->waiting, link);
	free(j->map);
	free(j);
	while (!TAILQ_EMPTY(&waiting)) {
		struct vop *v = TAILQ_FIRST(&waiting);
		TAILQ_REMOVE(&waiting, v, link);
		vop_start_write(v);
	}
}

/* The job failed in a way retrying cannot mend: everyone on it gets err. */
static void
job_fail(struct bjob *j, int err)
{
	LIST_REMOVE(j, link);
	vop_finish(j->first, err);
	while (!TAILQ_EMPTY(&j->waiting)) {
		struct vop *v = TAILQ_FIRST(&j->waiting);
		TAILQ_REMOVE(&j->waiting, v, link);
		vop_finish(v, err);
	}
	free(j->map);
	free(j);
}

static void batch_start(struct vhd_priv *p);

static void
batch_free(struct batch *b)
{
	free(b->footer);
	free(b->bat_secs);
	free(b->ops);
	free(b->iovs);
	free(b);
}

static void
dealloc_punched(struct io_op *op, int res)
{
	struct bjob *j = op->data;
	(void)res;	/* the block is already gone from the BAT: the hole is a bonus */
	free(op);
	vop_finish(j->first, 0);
	job_end(j);
}

/* A deallocated block's space goes back to the file system. */
static void
dealloc_punch(struct vhd_priv *p, struct bjob *j)
{
	struct io_op *op = calloc(1, sizeof(*op));
	if (!op) {
		vop_finish(j->first, 0);
		job_end(j);
		return;
	}
	op->opcode = IO_OP_FALLOCATE;
	op->flags = p->f.io_flags;
	op->fd = p->f.fd;
	op->mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
	op->offset = j->start;
	op->length = p->m.bitmap_bytes + (uint64_t)p->m.header.block_size;
	op->done = dealloc_punched;
	op->data = j;
	io_submit(p->img->io, op);
}

/* Step 4: everything is reachable (or gone); acknowledge, let the waiters go. */
static void
batch_finish(struct vhd_priv *p, struct batch *b)
{
	struct vhd_meta *m = &p->m;

	for (int i = 0; i < b->nr; i++) {
		struct bjob *j = b->jobs[i];
		int err = j->err ? j->err : b->err;
		if (err) {
			vop_finish(j->first, err);
			job_end(j);	/* its waiters try again */
			continue;
		}
		if (j->kind == JOB_DEALLOC) {
			m->bat[j->blk] = VHD_BAT_UNUSED;
			mc_drop(&p->bm, j->blk);
			if (m->has_batmap && vhd_batmap_test(m, j->blk)) {
				vhd_batmap_set(m, j->blk, 0);
				p->batmap_dirty = 1;
			}
			dealloc_punch(p, j);
			continue;
		}
		m->bat[j->blk] = (uint32_t)(j->start / VHD_SECTOR);
		int full = 1;
		for (uint32_t k = 0; k < m->spb / 8 && full; k++)
			full = j->map[k] == 0xff;
		if (full && m->has_batmap) {
			vhd_batmap_set(m, j->blk, 1);
			p->batmap_dirty = 1;
		}
		if (mc_insert(&p->bm, j->blk, j->start, j->map) == 0)
			j->map = NULL;	/* the cache owns it now */
		vop_finish(j->first, 0);
		job_end(j);
	}
	/* only now: waiters that started new jobs above queued behind this batch */
	p->batch = NULL;
	batch_free(b);
	if (!TAILQ_EMPTY(&p->alloc_queue))
		batch_start(p);
}

static void
batch_bat_synced(struct sync_waiter *w, int err)
{
	struct batch *b = container_of(w, struct batch, sw);
	if (err && !b->err)
		b->err = err;
	batch_finish(b->p, b);
}

static void
batch_bat_done(struct io_op *op, int res)
{
	struct batch *b = op->data;
	if (res < 0 && !b->err)
		b->err = -res;
	if (--b->pending)
		return;
	for (int i = 0; i < b->nr && !b->err; i++) {
		if (b->jobs[i]->kind == JOB_DEALLOC && !b->jobs[i]->err) {
			/* a hole punched before the BAT forgets the block would show */
			b->sw.fn = batch_bat_synced;
			sync_gate_wait(&b->p->gate, &b->sw);
			return;
		}
	}
	batch_finish(b->p, b);
}

static uint32_t
job_bat_value(const struct bjob *j)
{
	return j->kind == JOB_DEALLOC ? VHD_BAT_UNUSED : (uint32_t)(j->start / VHD_SECTOR);
}

/*
 * Step 3: the BAT sectors holding the changed entries. Batches run one at a
 * time, so no other BAT write races these.
 */
static void
batch_write_bat(struct vhd_priv *p, struct batch *b)
{
	struct vhd_meta *m = &p->m;
	int live = 0;

	for (int i = 0; i < b->nr; i++)
		if (!b->jobs[i]->err)
			live++;
	if (!live || b->err) {
		batch_finish(p, b);
		return;
	}
	b->nr_secs = 0;
	for (int i = 0; i < b->nr; i++) {
		if (b->jobs[i]->err)
			continue;
		uint32_t sec = b->jobs[i]->blk / (VHD_SECTOR / 4), k;
		for (k = 0; k < (uint32_t)b->nr_secs; k++)
			if (b->bat_sec_idx[k] == sec)
				break;
		if (k == (uint32_t)b->nr_secs)
			b->bat_sec_idx[b->nr_secs++] = sec;
	}
	b->bat_secs = aligned_alloc(4096, align_up((size_t)b->nr_secs * VHD_SECTOR, 4096));
	if (!b->bat_secs) {
		b->err = ENOMEM;
		batch_finish(p, b);
		return;
	}
	for (int k = 0; k < b->nr_secs; k++) {
		uint8_t *sec = b->bat_secs + (size_t)k * VHD_SECTOR;
		uint32_t first = b->bat_sec_idx[k] * (VHD_SECTOR / 4);
		for (uint32_t e = 0; e < VHD_SECTOR / 4; e++) {
			uint32_t v = first + e < m->header.max_bat ? m->bat[first + e] : VHD_BAT_UNUSED;
			for (int i = 0; i < b->nr; i++)
				if (!b->jobs[i]->err && b->jobs[i]->blk == first + e)
					v = job_bat_value(b->jobs[i]);
			sec[4 * e] = (uint8_t)(v >> 24);
			sec[4 * e + 1] = (uint8_t)(v >> 16);
			sec[4 * e + 2] = (uint8_t)(v >> 8);
			sec[4 * e + 3] = (uint8_t)v;
		}
	}
	b->pending = b->nr_secs;
	for (int k = 0; k < b->nr_secs; k++)
		meta_io(p, &b->ops[k], IO_OP_WRITEV, &b->iovs[k], b->bat_secs + (size_t)k * VHD_SECTOR,
			VHD_SECTOR, m->header.table_offset + (uint64_t)b->bat_sec_idx[k] * VHD_SECTOR,
			batch_bat_done, b);
}

static void
batch_blocks_synced(struct sync_waiter *w, int err)
{
	struct batch *b = container_of(w, struct batch, sw);
	if (err && !b->err)
		b->err = err;
	batch_write_bat(b->p, b);
}

/* Step 2 -> 3: the blocks are durable before the BAT points at them. */
static void
batch_blocks_written(struct batch *b)
{
	b->sw.fn = batch_blocks_synced;
	sync_gate_wait(&b->p->gate, &b->sw);
}

static void
batch_block_done(struct io_op *op, int res)
{
	struct batch *b = op->data;
	int idx = (int)(op - b->ops) / 2;	/* ops[2i] bitmap, ops[2i+1] data */
	if (res < 0 && !b->jobs[idx]->err)
		b->jobs[idx]->err = -res;
	if (--b->pending == 0)
		batch_blocks_written(b);
}

/* Step 2: bitmap and data of every new block. */
static void
batch_write_blocks(struct vhd_priv *p, struct batch *b)
{
	struct vhd_meta *m = &p->m;

	b->pending = 1;
	for (int i = 0; i < b->nr; i++) {
		struct bjob *j = b->jobs[i];
		if (j->kind != JOB_ALLOC)
			continue;
		struct vop *v = j->first;
		uint64_t in_block = v->off - (uint64_t)j->blk * m->header.block_size;
		struct io_op *dop = &b->ops[2 * i + 1];

		if (vop_slice(v, v->off, v->len) < 0) {
			j->err = ENOMEM;
			continue;
		}
		b->pending += 2;
		meta_io(p, &b->ops[2 * i], IO_OP_WRITEV, &b->iovs[2 * i], j->map, m->bitmap_bytes,
			j->start, batch_block_done, b);
		dop->iov = v->iov;
		dop->iovcnt = v->iovcnt;
		td_file_prep(&p->f, dop, IO_OP_WRITEV, j->start + m->bitmap_bytes + in_block);
		dop->done = batch_block_done;
		dop->data = b;
		io_submit(p->img->io, dop);
	}
	if (--b->pending == 0)
		batch_blocks_written(b);
}

static void
batch_footer_synced(struct sync_waiter *w, int err)
{
	struct batch *b = container_of(w, struct batch, sw);
	struct vhd_priv *p = b->p;

	if (err) {
		b->err = err;
		p->next_free = b->old_next;	/* no block was written beyond it */
		batch_finish(p, b);
		return;
	}
	batch_write_blocks(p, b);
}

/* Step 1 -> 2: the new footer is durable before blocks cover the old one. */
static void
batch_footer_done(struct io_op *op, int res)
{
	struct batch *b = op->data;
	b->sw.fn = batch_footer_synced;
	if (res < 0) {
		batch_footer_synced(&b->sw, -res);
		return;
	}
	sync_gate_wait(&b->p->gate, &b->sw);
}

/* Step 1: room for the new blocks, and the footer moved after them. */
static void
batch_start(struct vhd_priv *p)
{
	struct vhd_meta *m = &p->m;
	struct batch *b = calloc(1, sizeof(*b));
	int allocs = 0;

	if (b) {
		b->ops = calloc(2 * VHD_MAX_BATCH, sizeof(*b->ops));
		b->iovs = calloc(2 * VHD_MAX_BATCH, sizeof(*b->iovs));
		b->footer = aligned_alloc(4096, 4096);
	}
	if (!b || !b->ops || !b->iovs || !b->footer) {
		if (b)
			batch_free(b);
		while (!TAILQ_EMPTY(&p->alloc_queue)) {
			struct bjob *j = TAILQ_FIRST(&p->alloc_queue);
			TAILQ_REMOVE(&p->alloc_queue, j, queue);
			job_fail(j, ENOMEM);
		}
		return;
	}
	b->p = p;
	b->old_next = p->next_free;
	p->batch = b;
	uint64_t pos = p->next_free + VHD_FOOTER_SIZE;	/* the old footer stays */
	while (!TAILQ_EMPTY(&p->alloc_queue) && b->nr < VHD_MAX_BATCH) {
		struct bjob *j = TAILQ_FIRST(&p->alloc_queue);
		TAILQ_REMOVE(&p->alloc_queue, j, queue);
		if (j->kind == JOB_ALLOC) {
			uint64_t data = align_up(pos + m->bitmap_bytes, VHD_DATA_ALIGN);
			if ((data - m->bitmap_bytes) / VHD_SECTOR > 0xfffffffeULL) {
				/* BAT entries are 32-bit sectors: the file cannot grow further */
				job_fail(j, ENOSPC);
				continue;
			}
			j->start = data - m->bitmap_bytes;
			pos = data + m->header.block_size;
			allocs++;
		}
		b->jobs[b->nr++] = j;
	}
	if (!b->nr) {
		p->batch = NULL;
		batch_free(b);
		return;
	}
	if (!allocs) {		/* deallocations only: straight to the BAT */
		batch_write_bat(p, b);
		return;
	}
	p->next_free = pos;
	vhd_footer_encode(&m->footer, b->footer);
	meta_io(p, &b->footer_op, IO_OP_WRITEV, &b->footer_iov, b->footer, VHD_FOOTER_SIZE,
		pos, batch_footer_done, b);
}

static struct bjob *
job_queue(struct vhd_priv *p, struct vop *v, int kind)
{
	struct bjob *j = calloc(1, sizeof(*j));
	if (!j)
		return NULL;
	j->blk = v->blk;
	j->kind = kind;
	j->first = v;
	TAILQ_INIT(&j->waiting);
	LIST_INSERT_HEAD(&p->jobs, j, link);
	TAILQ_INSERT_TAIL(&p->alloc_queue, j, queue);
	return j;
}

/* A write to an unallocated block: it becomes the block's allocation. */
static void
alloc_block(struct vop *v)
{
	struct vhd_priv *p = v->p;
	struct vhd_meta *m = &p->m;
	uint8_t *map = malloc(m->bitmap_bytes);
	struct bjob *j;

	if (!map) {
		vop_finish(v, ENOMEM);
		return;
	}
	memset(map, 0, m->bitmap_bytes);
	uint64_t base = (uint64_t)v->blk * m->header.block_size;
	uint32_t s = (uint32_t)((v->off - base) / VHD_SECTOR);
	for (uint32_t i = s; i < s + v->len / VHD_SECTOR; i++)
		vhd_bitmap_set(map, i);
	j = job_queue(p, v, JOB_ALLOC);
	if (!j) {
		free(map);
		vop_finish(v, ENOMEM);
		return;
	}
	j->map = map;
	if (!p->batch)
		batch_start(p);
}

static void
vop_start_write(struct vop *v)
{
	struct vhd_priv *p = v->p;
	struct vhd_meta *m = &p->m;
	struct bjob *j = job_find(p, v->blk);

	if (j) {
		TAILQ_INSERT_TAIL(&j->waiting, v, link);
		return;
	}
	if (m->bat[v->blk] == VHD_BAT_UNUSED) {
		alloc_block(v);
		return;
	}
	v->kind = VOP_WRITE;
	if (vhd_batmap_test(m, v->blk))
		write_data(v);
	else
		bm_get(v);
}

/* A whole block of a dynamic disk goes back to unallocated (reads zero). */
static void
dealloc_block(struct vop *v)
{
	struct vhd_priv *p = v->p;
	struct bjob *j = job_queue(p, v, JOB_DEALLOC);

	if (!j) {
		vop_finish(v, ENOMEM);
		return;
	}
	j->start = vhd_block_offset(&p->m, v->blk);
	if (!p->batch)
		batch_start(p);
}

/* Punches [off, off+len) of an allocated block of a dynamic disk: reads zero. */
static void
punch_piece(struct vop *v)
{
	struct vhd_meta *m = &v->p->m;
	uint64_t in_block = v->off - (uint64_t)v->blk * m->header.block_size;

	v->op.mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
	v->op.length = v->len;
	v->op.iov = NULL;
	v->op.iovcnt = 0;
	td_file_prep(&v->p->f, &v->op, IO_OP_FALLOCATE, vhd_block_data(m, v->blk) + in_block);
	v->op.done = vop_io_done;
	v->op.data = v;
	v->next = vop_done_next;
	io_submit(v->p->img->io, &v->op);
}

/*
 * Discard and write-zeroes, per block. A dynamic disk has no parent to
 * expose: whole blocks go back to unallocated, parts of blocks are punched
 * (they read zero). A differencing disk must not expose its parent, so
 * zeroing writes zeros and discard does nothing.
 */
static void
zero_piece(struct vop *v, int discard, int no_hole)
{
	struct vhd_priv *p = v->p;
	struct vhd_meta *m = &p->m;
	int whole = v->len == m->header.block_size;

	if (m->footer.type == VHD_TYPE_DIFF) {
		if (discard) {
			vop_finish(v, 0);
			return;
		}
		v->zero = 1;
		vop_start_write(v);
		return;
	}
	if (no_hole) {
		v->zero = 1;
		vop_start_write(v);
		return;
	}
	struct bjob *j = job_find(p, v->blk);
	if (j) {	/* retried as a zero write once the job is done */
		v->zero = 1;
		TAILQ_INSERT_TAIL(&j->waiting, v, link);
		return;
	}
	if (m->bat[v->blk] == VHD_BAT_UNUSED)
		vop_finish(v, 0);
	else if (whole)
		dealloc_block(v);
	else
		punch_piece(v);
}

/* ---- block status ---- */

/* Fills extents as far as known without I/O; loads one bitmap if nothing is known. */
static void
status_run(struct vhd_priv *p, struct td_request *req)
{
	struct vhd_meta *m = &p->m;
	uint64_t bs = m->header.block_size, pos = req->offset, end = req->offset + req->length;

	req->nr_extents = 0;
	while (pos < end && req->nr_extents < req->max_extents) {
		uint32_t blk = (uint32_t)(pos / bs);
		uint64_t stop = ((uint64_t)blk + 1) * bs;
		if (stop > end)
			stop = end;
		if (m->bat[blk] == VHD_BAT_UNUSED) {
			td_extent_add(req, stop - pos, TD_EXTENT_PARENT);
		} else if (vhd_batmap_test(m, blk)) {
			td_extent_add(req, stop - pos, 0);
		} else {
			struct mc_entry *e = mc_find(&p->bm, blk);
			if (!e || !e->ready) {
				if (req->nr_extents)
					break;
				/* load it, then start again */
				struct td_pieces *ps = td_pieces_new(p->img, req, 0);
				struct vop *v = ps ? vop_new(ps, p, blk, pos, 0) : NULL;
				if (!v) {
					if (ps)
						td_req_free(req, ps);
					td_complete_later(p->img, req, ENOMEM);
					return;
				}
				ps->pending--;	/* only the vop holds it */
				v->kind = VOP_STATUS;
				bm_get(v);
				return;
			}
			uint32_t s = (uint32_t)((pos - (uint64_t)blk * bs) / VHD_SECTOR);
			uint32_t se = (uint32_t)((stop - (uint64_t)blk * bs) / VHD_SECTOR);
			while (s < se && req->nr_extents < req->max_extents) {
				int bit = vhd_bitmap_test(e->buf, s);
				uint32_t r = s + 1;
				while (r < se && vhd_bitmap_test(e->buf, r) == bit)
					r++;
				td_extent_add(req, (uint64_t)(r - s) * VHD_SECTOR, bit ? 0 : TD_EXTENT_PARENT);
				s = r;
			}
			stop = (uint64_t)blk * bs + (uint64_t)s * VHD_SECTOR;
		}
		pos = stop;
	}
	td_complete_later(p->img, req, 0);
}

/* ---- flush ---- */

struct flush {
	struct vhd_priv *p;
	struct td_request *req;
	struct io_op op;
	struct iovec iov;
	uint8_t *buf;
	size_t len;
	struct sync_waiter sw;
};

static void
flush_synced_err(struct flush *fl, int err)
{
	struct td_request *req = fl->req;
	free(fl->buf);
	free(fl);
	td_request_done(req, err);
}

static void
flush_synced(struct io_op *op, int res)
{
	flush_synced_err(op->data, res < 0 ? -res : 0);
}

static void
flush_sync(struct flush *fl)
{
	fl->op.opcode = IO_OP_FDATASYNC;
	fl->op.flags = fl->p->f.io_flags;
	fl->op.fd = fl->p->f.fd;
	fl->op.done = flush_synced;
	fl->op.data = fl;
	io_submit(fl->p->img->io, &fl->op);
}

static void
flush_batmap_written(struct io_op *op, int res)
{
	struct flush *fl = op->data;
	/* a batmap that did not make it costs speed, not data: the next flush tries again */
	if (res < 0)
		fl->p->batmap_dirty = 1;
	flush_sync(fl);
}

static void
flush_bitmaps_synced(struct sync_waiter *w, int err)
{
	struct flush *fl = container_of(w, struct flush, sw);
	struct vhd_priv *p = fl->p;
	if (err) {
		p->batmap_dirty = 1;
		free(fl->buf);
		fl->buf = NULL;
		flush_synced_err(fl, err);
		return;
	}
	meta_io(p, &fl->op, IO_OP_WRITEV, &fl->iov, fl->buf, fl->len, p->m.batmap_hdr_offset,
		flush_batmap_written, fl);
}

static void
vhd_flush(struct vhd_priv *p, struct td_request *req)
{
	struct flush *fl = calloc(1, sizeof(*fl));
	if (!fl) {
		td_complete_later(p->img, req, ENOMEM);
		return;
	}
	fl->p = p;
	fl->req = req;
	if (p->batmap_dirty && p->m.has_batmap && batmap_contiguous(&p->m)) {
		fl->buf = batmap_image(p, &fl->len);
		if (fl->buf) {
			/* the batmap vouches for bitmaps: they are durable first */
			p->batmap_dirty = 0;
			fl->sw.fn = flush_bitmaps_synced;
			sync_gate_wait(&p->gate, &fl->sw);
			return;
		}
	}
	flush_sync(fl);
}

/* ---- FUA ---- */

/* A FUA write's data and metadata are durable before it completes: one sync after its pieces. */
static void
fua_synced(struct io_op *op, int res)
{
	td_pieces_end(op->data, res < 0 ? -res : 0);
}

static int
fua_last(struct td_pieces *ps)
{
	struct vhd_priv *p = ps->img->priv;
	struct io_op *op = ps->priv;

	if (ps->err)
		return 0;
	op->opcode = IO_OP_FDATASYNC;
	op->flags = p->f.io_flags;
	op->fd = p->f.fd;
	op->done = fua_synced;
	op->data = ps;
	io_submit(p->img->io, op);
	return 1;
}

/* ---- submit ---- */

static void
vop_status_bitmap(struct vop *v)
{
	struct td_request *req = v->ps->req;
	struct td_pieces *ps = v->ps;
	bm_put(v);
	td_req_free(req, v);
	td_req_free(req, ps);
	status_run(req->img->priv, req);
}

static void
vhd_submit(struct td_image *img, struct td_request *req)
{
	struct vhd_priv *p = img->priv;
	struct vhd_meta *m = &p->m;

	if (m->footer.type == VHD_TYPE_FIXED) {
		td_driver_raw.submit(&p->raw, req);
		return;
	}
	/* vbd_start refuses writes to read-only disks; caps keep flushes away */
	assert(!p->rdonly || req->op == TD_OP_READ || req->op == TD_OP_BLOCK_STATUS ||
	       req->op == TD_OP_CACHE);
	switch (req->op) {
	case TD_OP_FLUSH:
		vhd_flush(p, req);
		return;
	case TD_OP_CACHE:
		td_complete_later(img, req, 0);
		return;
	case TD_OP_BLOCK_STATUS:
		status_run(p, req);
		return;
	default:
		break;
	}
	int fua = (req->flags & TD_REQ_FUA) && req->op != TD_OP_READ;
	struct td_pieces *ps = td_pieces_new(img, req, fua ? sizeof(struct io_op) : 0);
	if (!ps) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	if (fua)
		ps->last = fua_last;
	uint64_t bs = m->header.block_size, pos = req->offset, end = req->offset + req->length;
	while (pos < end) {
		uint32_t blk = (uint32_t)(pos / bs);
		uint64_t stop = ((uint64_t)blk + 1) * bs;
		if (stop > end)
			stop = end;
		struct vop *v = vop_new(ps, p, blk, pos, stop - pos);
		if (!v) {
			ps->err = ENOMEM;
			break;
		}
		switch (req->op) {
		case TD_OP_READ:
			read_piece(v);
			break;
		case TD_OP_WRITE:
			vop_start_write(v);
			break;
		case TD_OP_DISCARD:
			zero_piece(v, 1, 0);
			break;
		case TD_OP_WRITE_ZEROES:
			zero_piece(v, 0, (req->flags & TD_REQ_NO_HOLE) != 0);
			break;
		default:
			vop_finish(v, EINVAL);
			break;
		}
		pos = stop;
	}
	td_pieces_issued(ps);
}

/* Also serves raw leaves: their snapshot is a VHD on a raw parent. */
int
vhd_create_child(const char *parent_path, const char *child_path, int raw_parent,
		 char **child_params, struct td_error *err)
{
	int rc = vhd_file_snapshot(child_path, parent_path, raw_parent, 0, err);
	if (rc < 0) {
		char why[sizeof(err->msg)];
		snprintf(why, sizeof(why), "%s", err->msg);
		return td_error_set(err, err->code, "%s: %s", child_path, why);
	}
	if (asprintf(child_params, "vhd:%s", child_path) < 0) {
		*child_params = NULL;
		unlink(child_path);
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}

static int
vhd_snapshot(const char *parent_path, const char *child_path, char **child_params,
	     struct td_error *err)
{
	return vhd_create_child(parent_path, child_path, 0, child_params, err);
}

/*
 * A differencing disk whose data no longer needs its parent becomes a
 * dynamic one. The footer first (both copies), synced: from then on the
 * file is a dynamic disk, whose header's parent fields nothing reads; then
 * the header without them.
 */
static int
vhd_detach_parent(struct td_image *img, struct td_error *err)
{
	struct vhd_priv *p = img->priv;
	struct vhd_meta *m = &p->m;
	struct vhd_footer f = m->footer;
	struct vhd_header h = m->header;
	uint8_t *buf;
	int rc;

	if (f.type != VHD_TYPE_DIFF)
		return 0;
	if (!(buf = aligned_alloc(4096, 4096)))
		return td_error_set(err, ENOMEM, "out of memory");
	memset(buf, 0, 4096);
	f.type = VHD_TYPE_DYNAMIC;
	vhd_footer_encode(&f, buf);
	if ((rc = fc_pwrite_full(p->f.fd, buf, VHD_FOOTER_SIZE, p->next_free)) < 0 ||
	    (rc = fc_pwrite_full(p->f.fd, buf, VHD_FOOTER_SIZE, 0)) < 0 ||
	    (rc = fc_fdatasync(p->f.fd)) < 0)
		goto fail;
	m->footer = f;	/* the file says it now: keep saying it */
	memset(h.parent_uuid, 0, sizeof(h.parent_uuid));
	h.parent_ts = 0;
	memset(h.parent_name, 0, sizeof(h.parent_name));
	memset(h.loc, 0, sizeof(h.loc));
	memset(buf, 0, 4096);
	vhd_header_encode(&h, buf);
	if ((rc = fc_pwrite_full(p->f.fd, buf, VHD_HEADER_SIZE, f.data_offset)) < 0 ||
	    (rc = fc_fdatasync(p->f.fd)) < 0)
		goto fail;
	m->header = h;
	free(m->parent_path);
	m->parent_path = NULL;
	m->parent_raw = 0;
	free(buf);
	return 0;
fail:
	free(buf);
	return td_error_set(err, -rc, "%s: dropping the parent: %s", img->path, strerror(-rc));
}

/* Writes a header (1024 bytes, aligned) and syncs. */
static int
header_write_sync(struct vhd_priv *p, const struct vhd_header *h, uint8_t *buf)
{
	int rc;

	memset(buf, 0, VHD_HEADER_SIZE);
	vhd_header_encode(h, buf);
	if ((rc = fc_pwrite_full(p->f.fd, buf, VHD_HEADER_SIZE, p->m.footer.data_offset)) < 0)
		return rc;
	return fc_fdatasync(p->f.fd);
}

/* Writes locator i's new text. */
static int
locator_write(struct vhd_priv *p, const struct vhd_locator *l, const uint8_t *text, uint8_t *buf,
	      size_t buflen)
{
	uint64_t space = (uint64_t)l->data_len ? ((uint64_t)l->data_len + VHD_SECTOR - 1) /
						     VHD_SECTOR * VHD_SECTOR : 0;
	if (!space)
		return 0;
	if (space > buflen)
		return -ENOSPC;
	memset(buf, 0, space);
	memcpy(buf, text, l->data_len);
	return fc_pwrite_full(p->f.fd, buf, space, l->data_offset);
}

/*
 * Points a differencing disk at another parent (a commit merged the one it
 * had into it). So that the file names a parent it can open at every step
 * of the way, the header is written twice: the locators but the first (in
 * the header's order) get the new text; the header then gets the new
 * parent's uuid and name with one of those rewritten locators first; then
 * the old first locator's text; then the header in its own order.
 */
static int
vhd_set_parent(struct td_image *img, struct td_image *parent, struct td_error *err)
{
	struct vhd_priv *p = img->priv, *pp;
	struct vhd_header h = p->m.header, swapped;
	uint8_t *texts[8], *buf = NULL;
	struct stat st;
	int first = -1, second = -1, rc;

	if (p->m.footer.type != VHD_TYPE_DIFF)
		return td_error_set(err, EINVAL, "%s is not a differencing disk", img->path);
	if (parent->drv != &td_driver_vhd)
		return td_error_set(err, ENOTSUP, "%s: the new parent must be a VHD", img->path);
	pp = parent->priv;
	if (stat(parent->path, &st) < 0)
		return td_error_set(err, errno, "%s: %s", parent->path, strerror(errno));
	rc = vhd_header_reparent(&h, img->path, parent->path, pp->m.footer.uuid,
				 vhd_time((uint64_t)st.st_mtime), texts, err);
	if (rc < 0)
		return rc;
	for (int i = 0; i < 8; i++) {
		if (!texts[i])
			continue;
		if (first < 0)
			first = i;
		else if (second < 0)
			second = i;
	}
	if (first < 0 || !(buf = aligned_alloc(4096, 16384))) {
		rc = first < 0 ? td_error_set(err, EUCLEAN, "%s has no locator", img->path)
			       : td_error_set(err, ENOMEM, "out of memory");
		goto out;
	}
	for (int i = 0; i < 8 && rc == 0; i++)
		if (texts[i] && i != first)
			rc = locator_write(p, &h.loc[i], texts[i], buf, 16384);
	if (rc == 0 && (rc = fc_fdatasync(p->f.fd)) == 0) {
		swapped = h;
		if (second >= 0) {	/* a rewritten locator is looked at first */
			swapped.loc[first] = h.loc[second];
			swapped.loc[second] = h.loc[first];
		}
		rc = header_write_sync(p, &swapped, buf);
	}
	if (rc == 0)
		rc = locator_write(p, &h.loc[first], texts[first], buf, 16384);
	if (rc == 0)
		rc = header_write_sync(p, &h, buf);
	if (rc < 0) {
		rc = td_error_set(err, -rc, "%s: pointing it at %s: %s", img->path, parent->path,
				  strerror(-rc));
		goto out;
	}
	p->m.header = h;
	free(p->m.parent_path);
	p->m.parent_path = strdup(parent->path);
	p->m.parent_raw = 0;
out:
	for (int i = 0; i < 8; i++)
		free(texts[i]);
	free(buf);
	return rc;
}

const struct td_driver td_driver_vhd = {
	.name = "vhd",
	.ctx_size = TD_PIECES_CTX_SIZE(sizeof(struct io_op)) + TD_CTX_SIZE(struct vop),
	.open = vhd_open,
	.close = vhd_close,
	.submit = vhd_submit,
	.get_parent = vhd_get_parent,
	.validate_parent = vhd_validate_parent,
	.create_child = vhd_snapshot,
	.detach_parent = vhd_detach_parent,
	.set_parent = vhd_set_parent,
};
