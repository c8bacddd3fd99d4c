/*
 * vmdk: VMware disks, read-only (the import path). Monolithic sparse (the
 * descriptor embedded in the extent), descriptor files naming FLAT (and
 * VMFS), SPARSE and ZERO extents (monolithicFlat, twoGbMaxExtentFlat and
 * -Sparse, vmfs), stream-optimized (deflated grains behind markers, the
 * grain directory maybe at the end), and delta disks on a VMDK parent
 * (parentCID, parentFileNameHint). Opening for writing fails with EROFS.
 *
 * Extent files are named relative to the descriptor and must stay in its
 * directory: no absolute path, no "..", no symlink leading out (a
 * descriptor that came with a downloaded appliance must not make the
 * server read host files or devices). A parent may be anywhere, as VHD
 * parents may: it is opened as a VMDK and must carry the CID the child
 * names.
 *
 * After open everything is asynchronous. FLAT extents are embedded raw
 * images (reads, SEEK_DATA block status). Sparse extents keep their grain
 * directory from open; grain tables are read through the I/O engine into
 * a bounded LRU cache (VMDK_GT_CACHE per image); a run of grains
 * contiguous in the file is one read. Compressed grains are inflated on
 * the loop thread in the completion of their read, one grain per step
 * (64 KiB with every known writer, VMDK_MAX_GRAIN at most), into a small
 * cache of inflated grains (VMDK_ZCACHE_BYTES) so that small sequential
 * reads inflate each grain once. A read is served in pieces (td_pieces: one
 * per extent and grain table, then one per run of grains) whose state comes
 * from the request's scratch, as do the sub-requests' to a FLAT extent's raw
 * image and to the parent (td_req_lend).
 */
#include "driver.h"

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "container_of.h"
#include "file_io.h"
#include "log.h"
#include "meta_cache.h"
#include "vhd_file.h"
#include "vmdk_format.h"

#ifndef EUCLEAN
#define EUCLEAN EINVAL
#endif

#define VMDK_GT_CACHE		256	/* grain tables per image (2 KiB each, usually) */
#define VMDK_ZCACHE_BYTES	(1u << 20)	/* inflated grains kept per image */
#define VMDK_ZSLOTS_MAX		16
#define VMDK_INLINE_IOV		4
/* what a FLAT extent's read lends the raw driver: its ctx_size (272 bytes on x86-64) */
#define VMDK_FLAT_CTX		320

struct vmdk_extent {
	enum vmdk_ext_type type;
	unsigned idx;
	char *name;			/* as the descriptor says */
	char *path;			/* resolved */
	uint64_t start, len;		/* virtual bytes */
	uint64_t file_off;		/* FLAT: bytes into the file */
	struct td_image raw;		/* FLAT: the file, served by the raw driver */
	struct td_file f;		/* SPARSE */
	struct vmdk_sparse s;		/* SPARSE */
};

/* An inflated grain. */
struct zslot {
	const struct vmdk_extent *ext;
	uint64_t grain;
	uint64_t stamp;			/* last use; 0: empty */
	uint8_t *buf;
	uint32_t cap;
};

struct vmdk_priv {
	struct td_image *img;
	struct vmdk_extent *ext;
	unsigned nr_ext;
	uint32_t cid, parent_cid;
	char *parent_path;		/* delta disks */
	struct mc_cache gt;		/* grain tables, by extent and index */
	struct zslot z[VMDK_ZSLOTS_MAX];
	unsigned nr_z;
	uint64_t zclock;
	struct log_ratelimit rl;	/* damage found while serving */
};

/*
 * A piece of a read (inside one extent and one grain table, then one run
 * of grains), or a block status step waiting for a grain table. Taken from
 * the request's scratch: a read inside one grain table, the usual kind,
 * needs its td_pieces and one vop (ctx_size).
 */
struct vop {
	struct td_pieces *ps;		/* a read's; NULL: a block status step */
	struct td_request *req;
	struct vmdk_priv *p;
	struct vmdk_extent *ext;
	uint64_t off, len;		/* virtual bytes */
	uint32_t gdi;
	struct mc_entry *gt;		/* its grain table, pinned */
	struct mc_waiter gt_wait;
	uint64_t grain;			/* compressed grain being read */
	uint8_t *zbuf;
	uint32_t zlen;			/* bytes of zbuf read from the file */
	struct iovec zvec;		/* zbuf for the engine, which may advance it */
	struct io_op op;
	struct td_request sub;		/* to the parent, or a FLAT extent's raw image */
	struct iovec *iov;		/* the request's bytes of this piece (td_req_iov) */
	int iovcnt;
	struct iovec iov_inline[VMDK_INLINE_IOV];
};

static void status_run(struct vmdk_priv *p, struct td_request *req);

/* Damage found while serving: EIO, and a line in the log saying where. */
static int
damaged(struct vmdk_priv *p, const struct vmdk_extent *e, const char *why)
{
	if (p->nr_ext > 1)
		log_limited(&p->rl, LOG_LVL_ERR, "vmdk:%s: extent %u (%s): %s", p->img->path,
			    e->idx + 1, e->name, why);
	else
		log_limited(&p->rl, LOG_LVL_ERR, "vmdk:%s: %s", p->img->path, why);
	return EIO;
}

/* Puts before in front of err's message. */
static int
error_prefix(struct td_error *err, const char *before)
{
	char msg[sizeof(err->msg)];
	memcpy(msg, err->msg, sizeof(msg));
	return td_error_set(err, err->code, "%s%s", before, msg);
}

/* Says which extent err is about. */
static int
extent_error(struct td_error *err, const struct vmdk_desc_extent *de, unsigned idx)
{
	char before[VMDK_MAX_NAME + 32];
	snprintf(before, sizeof(before), "extent %u (%s): ", idx + 1, de->file);
	return error_prefix(err, before);
}

/* ---- open / close ---- */

static void
extent_close(struct vmdk_extent *e)
{
	if (e->type == VMDK_EXT_FLAT && e->raw.priv)
		td_driver_raw.close(&e->raw);
	vmdk_sparse_free(&e->s);
	td_file_close(&e->f, 0);
	free(e->name);
	free(e->path);
}

static void
priv_free(struct vmdk_priv *p)
{
	for (unsigned i = 0; i < p->nr_ext; i++)
		extent_close(&p->ext[i]);
	mc_free(&p->gt);
	for (unsigned i = 0; i < VMDK_ZSLOTS_MAX; i++)
		free(p->z[i].buf);
	free(p->ext);
	free(p->parent_path);
	free(p);
}

static int
extents_alloc(struct vmdk_priv *p, unsigned n, struct td_error *err)
{
	p->ext = calloc(n, sizeof(*p->ext));
	if (!p->ext)
		return td_error_set(err, ENOMEM, "out of memory");
	for (unsigned i = 0; i < n; i++) {
		p->ext[i].idx = i;
		p->ext[i].f.fd = p->ext[i].f.dfd = -1;
	}
	p->nr_ext = n;
	return 0;
}

/* The directory of path ("." for a bare name), in dir. */
static void
dir_of(const char *path, char *dir, size_t len)
{
	const char *slash = strrchr(path, '/');
	if (!slash)
		snprintf(dir, len, ".");
	else if (slash == path)
		snprintf(dir, len, "/");
	else
		snprintf(dir, len, "%.*s", (int)(slash - path), path);
}

/* CID, parent: from the descriptor, whichever kind of file held it. */
static int
take_parent(struct vmdk_priv *p, const struct vmdk_desc *d, const char *dir,
	    struct td_error *err)
{
	p->cid = d->cid;
	p->parent_cid = d->parent_cid;
	if (d->parent_cid == VMDK_NO_PARENT)
		return 0;
	if (!d->parent_hint)
		return td_error_set(err, EUCLEAN, "delta disk (parentCID %08x) without a "
				    "parentFileNameHint", d->parent_cid);
	int n = d->parent_hint[0] == '/' ? asprintf(&p->parent_path, "%s", d->parent_hint) :
		asprintf(&p->parent_path, "%s/%s", dir, d->parent_hint);
	if (n < 0) {
		p->parent_path = NULL;
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}

/* A file that is itself a sparse extent, its descriptor inside. */
static int
open_monolithic(struct vmdk_priv *p, struct td_file *f, const char *dir, struct td_error *err)
{
	struct vmdk_extent *e;
	struct vmdk_desc d;
	char *text;
	int rc;

	if ((rc = extents_alloc(p, 1, err)) < 0) {
		td_file_close(f, 0);
		return rc;
	}
	e = &p->ext[0];
	e->type = VMDK_EXT_SPARSE;
	e->f = *f;
	if (!(e->name = strdup(p->img->path)))
		return td_error_set(err, ENOMEM, "out of memory");
	if ((rc = vmdk_sparse_load(&e->s, td_pread_full, &e->f.fd, e->f.size, err)) < 0 ||
	    (rc = vmdk_sparse_descriptor(&e->s, td_pread_full, &e->f.fd, &text, err)) < 0)
		return rc;
	e->len = e->s.capacity * VMDK_SECTOR;
	if (!text)
		return 0;
	rc = vmdk_desc_parse(text, strlen(text), &d, err);
	free(text);
	if (rc < 0)
		return error_prefix(err, "embedded ");
	rc = take_parent(p, &d, dir, err);
	vmdk_desc_free(&d);
	return rc;
}

/* The extent's file, which must resolve inside the descriptor's directory. */
static int
extent_path(struct vmdk_extent *e, const char *dir, const char *real_dir,
	    struct td_error *err)
{
	char *joined;

	if (asprintf(&joined, "%s/%s", dir, e->name) < 0)
		return td_error_set(err, ENOMEM, "out of memory");
	e->path = realpath(joined, NULL);
	free(joined);
	if (!e->path)
		return td_error_set(err, errno, "%s", strerror(errno));
	size_t n = strlen(real_dir);
	if (strcmp(real_dir, "/") && (strncmp(e->path, real_dir, n) || e->path[n] != '/'))
		return td_error_set(err, EACCES, "leads out of the descriptor's directory "
				    "(through a symlink)");
	return 0;
}

static int
open_flat(struct vmdk_extent *e, struct td_image *img, const struct td_open_ctx *ctx,
	  struct td_error *err)
{
	e->raw.drv = &td_driver_raw;
	e->raw.path = e->path;
	e->raw.oflags = img->oflags;
	e->raw.io = ctx->io;
	int rc = td_driver_raw.open(&e->raw, ctx, err);
	if (rc < 0)
		return rc;
	if (e->raw.size < e->file_off || e->raw.size - e->file_off < e->len)
		return td_error_set(err, EUCLEAN, "file of %ju bytes ends inside the extent "
				    "(%ju bytes at offset %ju)", (uintmax_t)e->raw.size,
				    (uintmax_t)e->len, (uintmax_t)e->file_off);
	return 0;
}

static int
open_sparse(struct vmdk_extent *e, struct td_image *img, struct td_error *err)
{
	int rc = td_file_open(&e->f, e->path, 1, (img->oflags & TD_OPEN_NODIRECT) != 0, err);
	if (rc < 0 || (rc = vmdk_sparse_load(&e->s, td_pread_full, &e->f.fd, e->f.size, err)) < 0)
		return rc;
	if (e->s.capacity * VMDK_SECTOR < e->len)
		return td_error_set(err, EUCLEAN, "sparse file of %ju sectors for an extent of %ju",
				    (uintmax_t)e->s.capacity, (uintmax_t)(e->len / VMDK_SECTOR));
	return 0;
}

static int
open_extent(struct vmdk_priv *p, const struct vmdk_desc_extent *de, unsigned i, uint64_t start,
	    const char *dir, const char *real_dir, const struct td_open_ctx *ctx,
	    struct td_error *err)
{
	struct vmdk_extent *e = &p->ext[i];
	int rc = 0;

	e->type = de->type;
	e->start = start;
	e->len = de->sectors * VMDK_SECTOR;
	e->file_off = de->offset * VMDK_SECTOR;
	if (!(e->name = strdup(de->file ? de->file : "ZERO")))
		return td_error_set(err, ENOMEM, "out of memory");
	if (e->type == VMDK_EXT_ZERO)
		return 0;
	if ((rc = extent_path(e, dir, real_dir, err)) == 0)
		rc = e->type == VMDK_EXT_FLAT ? open_flat(e, p->img, ctx, err) :
		     open_sparse(e, p->img, err);
	return rc < 0 ? extent_error(err, de, i) : 0;
}

/* Is this text meant to be a descriptor? (To say "bad descriptor", not "bad magic".) */
static int
looks_like_descriptor(const char *text)
{
	return strncmp(text, "# Disk DescriptorFile", 21) == 0;
}

static char *
read_text(struct td_file *f, struct td_error *err)
{
	if (f->size > VMDK_MAX_DESC) {
		td_error_set(err, EUCLEAN, "not a VMDK: no sparse extent magic, and too large "
			     "(%ju bytes) for a descriptor", (uintmax_t)f->size);
		return NULL;
	}
	char *text = malloc((size_t)f->size + 1);
	int rc;
	if (!text) {
		td_error_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	if ((rc = td_pread_full(&f->fd, text, (size_t)f->size, 0)) < 0) {
		td_error_set(err, -rc, "cannot read: %s", strerror(-rc));
		free(text);
		return NULL;
	}
	text[f->size] = '\0';
	return text;
}

/* A text descriptor naming the extents. */
static int
open_descriptor(struct vmdk_priv *p, struct td_file *f, const char *dir,
		const struct td_open_ctx *ctx, struct td_error *err)
{
	char *text = read_text(f, err), *real_dir = NULL;
	struct vmdk_desc d;
	uint64_t start = 0;
	int rc;

	td_file_close(f, 0);
	if (!text)
		return -err->code;
	rc = vmdk_desc_parse(text, strlen(text), &d, err);
	if (rc < 0 && !looks_like_descriptor(text))
		error_prefix(err, "not a VMDK: no sparse extent magic, and not a descriptor: ");
	free(text);
	if (rc < 0)
		return rc;
	if (!d.nr_ext) {
		rc = td_error_set(err, EUCLEAN, "descriptor names no extent");
		goto out;
	}
	if (!(real_dir = realpath(dir, NULL))) {
		rc = td_error_set(err, errno, "%s: %s", dir, strerror(errno));
		goto out;
	}
	if ((rc = extents_alloc(p, d.nr_ext, err)) < 0)
		goto out;
	for (unsigned i = 0; i < d.nr_ext && rc == 0; i++) {
		rc = open_extent(p, &d.ext[i], i, start, dir, real_dir, ctx, err);
		start += d.ext[i].sectors * VMDK_SECTOR;
	}
	if (rc == 0)
		rc = take_parent(p, &d, dir, err);
out:
	free(real_dir);
	vmdk_desc_free(&d);
	return rc;
}

/* The cache's on_load: grain tables are little-endian on disk. */
static int
gt_decode(struct mc_cache *c, struct mc_entry *e, size_t len)
{
	(void)c;
	vmdk_gt_decode(e->buf, (uint32_t)(len / 4));
	return 0;
}

/* Inflated-grain cache slots: as many grains as VMDK_ZCACHE_BYTES holds. */
static void
zcache_size(struct vmdk_priv *p)
{
	uint32_t grain = 0;
	for (unsigned i = 0; i < p->nr_ext; i++)
		if (p->ext[i].type == VMDK_EXT_SPARSE && p->ext[i].s.compressed &&
		    p->ext[i].s.grain_bytes > grain)
			grain = p->ext[i].s.grain_bytes;
	p->nr_z = 0;
	if (grain) {
		p->nr_z = VMDK_ZCACHE_BYTES / grain;
		p->nr_z = p->nr_z < 1 ? 1 : p->nr_z > VMDK_ZSLOTS_MAX ? VMDK_ZSLOTS_MAX : p->nr_z;
	}
}

/* Opens img->path, whichever kind of VMDK file it is. */
static int
open_file(struct vmdk_priv *p, const char *dir, const struct td_open_ctx *ctx,
	  struct td_error *err)
{
	uint8_t head[VMDK_SECTOR] = { 0 };
	struct td_file f;
	int rc = td_file_open(&f, p->img->path, 1, (p->img->oflags & TD_OPEN_NODIRECT) != 0, err);

	if (rc < 0)
		return rc;
	size_t n = f.size < sizeof(head) ? (size_t)f.size : sizeof(head);
	if ((rc = td_pread_full(&f.fd, head, n, 0)) < 0) {
		td_file_close(&f, 0);
		return td_error_set(err, -rc, "cannot read: %s", strerror(-rc));
	}
	switch (vmdk_probe(head, n)) {
	case VMDK_FILE_SPARSE:
		return open_monolithic(p, &f, dir, err);
	case VMDK_FILE_COWD:
		td_file_close(&f, 0);
		return td_error_set(err, ENOTSUP, "ESX sparse (COWD) extents are not supported");
	default:
		return open_descriptor(p, &f, dir, ctx, err);
	}
}

static int
vmdk_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	char dir[PATH_MAX];
	int rc;

	if (!(img->oflags & TD_OPEN_RDONLY))
		return td_error_set(err, EROFS, "vmdk: read-only format; open it read-only "
				    "(tap-ctl create -R)");
	struct vmdk_priv *p = calloc(1, sizeof(*p));
	if (!p)
		return td_error_set(err, ENOMEM, "out of memory");
	p->img = img;
	p->cid = p->parent_cid = VMDK_NO_PARENT;	/* a sparse file may have no descriptor */
	p->rl = (struct log_ratelimit)LOG_RATELIMIT_INIT;
	mc_init(&p->gt, ctx->io, VMDK_GT_CACHE);
	p->gt.on_load = gt_decode;
	dir_of(img->path, dir, sizeof(dir));
	if ((rc = open_file(p, dir, ctx, err)) < 0) {
		priv_free(p);
		return rc;
	}
	zcache_size(p);
	img->size = p->ext[p->nr_ext - 1].start + p->ext[p->nr_ext - 1].len;
	img->sector_size = VMDK_SECTOR;
	img->min_io = 1;
	img->caps = TD_CAP_BLOCK_STATUS | TD_CAP_CACHE;
	img->priv = p;
	return 0;
}

static void
vmdk_close(struct td_image *img)
{
	priv_free(img->priv);
}

static int
vmdk_get_parent(struct td_image *img, char **params, struct td_error *err)
{
	struct vmdk_priv *p = img->priv;

	*params = NULL;
	if (!p->parent_path)
		return 0;
	if (asprintf(params, "vmdk:%s", p->parent_path) < 0) {
		*params = NULL;
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}

static int
vmdk_validate_parent(struct td_image *img, struct td_image *parent, struct td_error *err)
{
	struct vmdk_priv *p = img->priv;

	if (parent->drv != &td_driver_vmdk)
		return td_error_set(err, EINVAL, "parent %s is not a VMDK", parent->path);
	struct vmdk_priv *pp = parent->priv;
	if (pp->cid != p->parent_cid)
		return td_error_set(err, EINVAL, "parent %s has CID %08x, the child expects %08x",
				    parent->path, pp->cid, p->parent_cid);
	if (parent->size < img->size)
		return td_error_set(err, EINVAL, "parent %s (%ju bytes) is smaller than the "
				    "child (%ju bytes)", parent->path, (uintmax_t)parent->size,
				    (uintmax_t)img->size);
	return 0;
}

/* ---- pieces (td_pieces: the request completes once the last one is done) ---- */

/* The extent holding virtual byte pos (extents are adjacent, in order). */
static struct vmdk_extent *
extent_at(struct vmdk_priv *p, uint64_t pos)
{
	unsigned lo = 0, hi = p->nr_ext - 1;
	while (lo < hi) {
		unsigned mid = (lo + hi + 1) / 2;
		if (p->ext[mid].start <= pos)
			lo = mid;
		else
			hi = mid - 1;
	}
	return &p->ext[lo];
}

/* Where a piece starting at pos ends: its extent's end, or its grain table's. */
static uint64_t
piece_end(const struct vmdk_extent *e, uint64_t pos, uint64_t end)
{
	uint64_t stop = e->start + e->len;
	if (e->type == VMDK_EXT_SPARSE) {
		uint64_t span = (uint64_t)e->s.grain_bytes * e->s.gtes;
		uint64_t gt_end = e->start + ((pos - e->start) / span + 1) * span;
		if (gt_end < stop)
			stop = gt_end;
	}
	return stop < end ? stop : end;
}

/* A piece of ps, or with ps NULL a block status step of req. */
static struct vop *
vop_new(struct vmdk_priv *p, struct td_request *req, struct td_pieces *ps,
	struct vmdk_extent *e, uint64_t off, uint64_t len)
{
	struct vop *v = td_req_alloc(req, sizeof(*v));
	if (!v)
		return NULL;
	v->ps = ps;
	v->req = req;
	v->p = p;
	v->ext = e;
	v->off = off;
	v->len = len;
	if (e->type == VMDK_EXT_SPARSE)
		v->gdi = vmdk_gd_index(&e->s, vmdk_grain_of(&e->s, off - e->start));
	if (ps)
		td_pieces_add(ps);
	return v;
}

/*
 * A piece is over. A block status step ends here only when it failed
 * before its I/O, maybe inside submit: its request fails on the next turn.
 */
static void
vop_finish(struct vop *v, int err)
{
	struct td_pieces *ps = v->ps;
	struct td_request *req = v->req;
	struct td_image *img = v->p->img;

	if (v->iov != v->iov_inline)
		free(v->iov);
	free(v->zbuf);
	td_req_free(req, v);
	if (ps)
		td_pieces_done(ps, err);
	else
		td_complete_later(img, req, err);
}

/* Points v->iov at the request's bytes of this piece. */
static int
vop_slice(struct vop *v)
{
	return td_req_iov(v->req, v->off, v->len, NULL, 0, v->iov_inline, VMDK_INLINE_IOV,
			  &v->iov, &v->iovcnt);
}

static void
vop_sub_done(struct td_request *sub, int err)
{
	vop_finish(sub->priv, err);
}

static void
vop_io_done(struct io_op *op, int res)
{
	vop_finish(op->data, res < 0 ? -res : 0);
}

static void
read_zero(struct vop *v)
{
	if (vop_slice(v) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	td_iov_zero(v->iov, v->iovcnt);
	vop_finish(v, 0);
}

/* Not allocated here: the parent's bytes, or zeros below the root. */
static void
read_parent(struct vop *v)
{
	struct td_image *img = v->p->img;

	if (vop_slice(v) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	v->sub.priv = v;
	td_image_read_parent_range(img, v->req, &v->sub, v->off, v->len, v->iov, v->iovcnt,
				   vop_sub_done);
}

static void
read_flat(struct vop *v)
{
	struct vmdk_extent *e = v->ext;

	if (vop_slice(v) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	td_req_lend(v->req, &v->sub, td_driver_raw.ctx_size);
	v->sub.op = TD_OP_READ;
	v->sub.offset = e->file_off + (v->off - e->start);
	v->sub.length = v->len;
	v->sub.iov = v->iov;
	v->sub.iovcnt = v->iovcnt;
	v->sub.done = vop_sub_done;
	v->sub.priv = v;
	td_driver_raw.submit(&e->raw, &v->sub);
}

/* Bytes of an uncompressed grain run, at foff in the extent's file. */
static void
read_data(struct vop *v, uint64_t foff)
{
	if (vop_slice(v) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	v->op.iov = v->iov;
	v->op.iovcnt = v->iovcnt;
	td_file_prep(&v->ext->f, &v->op, IO_OP_READV, foff);
	v->op.done = vop_io_done;
	v->op.data = v;
	io_submit(v->p->img->io, &v->op);
}

/* ---- compressed grains ---- */

static struct zslot *
zcache_find(struct vmdk_priv *p, const struct vmdk_extent *e, uint64_t grain)
{
	for (unsigned i = 0; i < p->nr_z; i++)
		if (p->z[i].stamp && p->z[i].ext == e && p->z[i].grain == grain) {
			p->z[i].stamp = ++p->zclock;
			return &p->z[i];
		}
	return NULL;
}

/* The least recently used slot, with room for one of e's grains. */
static struct zslot *
zcache_take(struct vmdk_priv *p, const struct vmdk_extent *e, uint64_t grain)
{
	struct zslot *z = &p->z[0];
	for (unsigned i = 1; i < p->nr_z; i++)
		if (p->z[i].stamp < z->stamp)
			z = &p->z[i];
	z->stamp = 0;
	if (z->cap < e->s.grain_bytes) {
		free(z->buf);
		z->cap = 0;
		if (!(z->buf = malloc(e->s.grain_bytes)))
			return NULL;
		z->cap = e->s.grain_bytes;
	}
	z->ext = e;
	z->grain = grain;
	z->stamp = ++p->zclock;
	return z;
}

/* Copies the piece's bytes out of an inflated grain. */
static void
zgrain_copy(struct vop *v, const struct zslot *z)
{
	const uint8_t *src = z->buf + (v->off - v->ext->start) % v->ext->s.grain_bytes;

	if (vop_slice(v) < 0) {
		vop_finish(v, ENOMEM);
		return;
	}
	for (int i = 0; i < v->iovcnt; i++) {
		memcpy(v->iov[i].iov_base, src, v->iov[i].iov_len);
		src += v->iov[i].iov_len;
	}
	vop_finish(v, 0);
}

static void
zgrain_loaded(struct io_op *op, int res)
{
	struct vop *v = op->data;
	struct vmdk_priv *p = v->p;
	char why[256];

	if (res < 0) {
		vop_finish(v, -res);
		return;
	}
	struct zslot *z = zcache_take(p, v->ext, v->grain);
	if (!z) {
		vop_finish(v, ENOMEM);
		return;
	}
	if (vmdk_grain_inflate(&v->ext->s, v->grain, v->zbuf, v->zlen, z->buf, why,
			       sizeof(why)) < 0) {
		z->stamp = 0;
		vop_finish(v, damaged(p, v->ext, why));
		return;
	}
	free(v->zbuf);
	v->zbuf = NULL;
	zgrain_copy(v, z);
}

/* A piece inside one compressed grain at foff: from the cache, or read and inflated. */
static void
read_zgrain(struct vop *v, uint64_t grain, uint64_t foff)
{
	struct vmdk_priv *p = v->p;
	struct zslot *z = zcache_find(p, v->ext, grain);

	if (z) {
		zgrain_copy(v, z);
		return;
	}
	v->zlen = vmdk_grain_zread_len(&v->ext->s, foff);
	v->grain = grain;
	v->zbuf = malloc(v->zlen);
	if (!v->zbuf) {
		vop_finish(v, ENOMEM);
		return;
	}
	v->zvec.iov_base = v->zbuf;
	v->zvec.iov_len = v->zlen;
	v->op.iov = &v->zvec;
	v->op.iovcnt = 1;
	v->op.opcode = IO_OP_READV;
	v->op.flags = v->ext->f.io_flags;
	v->op.fd = v->ext->f.fd;
	v->op.offset = foff;
	v->op.done = zgrain_loaded;
	v->op.data = v;
	io_submit(p->img->io, &v->op);
}

/* ---- grain tables ---- */

static uint64_t
gt_key(const struct vmdk_extent *e, uint32_t gdi)
{
	return (uint64_t)e->idx << 32 | gdi;
}

static void
gt_put(struct vop *v)
{
	mc_put(&v->p->gt, v->gt);
	v->gt = NULL;
}

static void read_runs(struct vop *v);

/* The grain table is there: a read splits into runs, a status step resumes. */
static void
gt_with(struct vop *v)
{
	if (!v->ps) {
		struct td_request *req = v->req;
		status_run(v->p, req);	/* first: the table stays while it runs */
		gt_put(v);
		td_req_free(req, v);
		return;
	}
	read_runs(v);
}

static void
gt_ready(struct mc_waiter *w, struct mc_entry *g, int err)
{
	struct vop *v = container_of(w, struct vop, gt_wait);

	v->gt = g;
	if (err)
		vop_finish(v, err);
	else
		gt_with(v);
}

/* Gives v its grain table (v->gt, pinned), then gt_with(v). */
static void
gt_get(struct vop *v)
{
	struct vmdk_extent *e = v->ext;

	v->gt_wait.ready = gt_ready;
	if (mc_get(&v->p->gt, gt_key(e, v->gdi), e->f.fd, e->f.io_flags,
		   (uint64_t)e->s.gd[v->gdi] * VMDK_SECTOR, e->s.gt_bytes, &v->gt_wait) < 0)
		vop_finish(v, ENOMEM);
}

/* ---- runs of grains ---- */

struct run {
	int kind;			/* enum vmdk_grain_kind */
	uint64_t grain;			/* the first */
	uint64_t foff;			/* DATA: file offset of pos; COMPRESSED: the grain's */
	uint64_t len;
};

static int
grain_kind(const struct vmdk_extent *e, const uint32_t *gt, uint64_t grain, uint64_t *foff,
	   char *why, size_t whylen)
{
	return vmdk_grain_decode(&e->s, grain, gt[grain % e->s.gtes], foff, why, whylen);
}

/*
 * The run of grains from pos (before end, inside one grain table) that one
 * step can serve: unallocated or zeroed grains alike, allocated grains
 * adjacent in the file, or one compressed grain. -EUCLEAN with why set if
 * the grain at pos is damaged.
 */
static int
run_at(const struct vmdk_extent *e, const uint32_t *gt, uint64_t pos, uint64_t end,
       struct run *r, char *why, size_t whylen)
{
	uint64_t gb = e->s.grain_bytes, rel = pos - e->start, off = 0, off2 = 0;
	uint64_t g = rel / gb;

	r->kind = grain_kind(e, gt, g, &off, why, whylen);
	if (r->kind < 0)
		return r->kind;
	r->grain = g;
	r->foff = r->kind == VMDK_GRAIN_DATA ? off + rel % gb : off;
	uint64_t stop = e->start + (g + 1) * gb;
	while (r->kind != VMDK_GRAIN_COMPRESSED && stop < end) {
		uint64_t g2 = (stop - e->start) / gb;
		char ignore[8];
		if (grain_kind(e, gt, g2, &off2, ignore, sizeof(ignore)) != r->kind ||
		    (r->kind == VMDK_GRAIN_DATA && off2 != off + (g2 - g) * gb))
			break;
		stop += gb;
	}
	r->len = (stop < end ? stop : end) - pos;
	return 0;
}

static void
run_start(struct vop *v, const struct run *r)
{
	switch (r->kind) {
	case VMDK_GRAIN_UNALLOC:
		read_parent(v);
		return;
	case VMDK_GRAIN_ZERO:
		read_zero(v);
		return;
	case VMDK_GRAIN_DATA:
		read_data(v, r->foff);
		return;
	default:
		read_zgrain(v, r->grain, r->foff);
		return;
	}
}

/*
 * A piece whose grain table is loaded: one step per run of grains, the
 * last one taken by the piece itself (its own td_pieces count and scratch).
 */
static void
read_runs(struct vop *v)
{
	struct td_pieces *ps = v->ps;
	uint64_t pos = v->off, end = v->off + v->len;
	char why[256];

	while (pos < end) {
		struct run r;
		if (run_at(v->ext, v->gt->buf, pos, end, &r, why, sizeof(why)) < 0) {
			ps->err = damaged(v->p, v->ext, why);
			break;
		}
		if (pos + r.len == end) {
			gt_put(v);
			v->off = pos;
			v->len = r.len;
			run_start(v, &r);
			return;
		}
		struct vop *rv = vop_new(v->p, v->req, ps, v->ext, pos, r.len);
		if (!rv) {
			ps->err = ENOMEM;
			break;
		}
		run_start(rv, &r);
		pos += r.len;
	}
	gt_put(v);
	vop_finish(v, 0);
}

static void
read_piece(struct vop *v)
{
	struct vmdk_extent *e = v->ext;

	switch (e->type) {
	case VMDK_EXT_ZERO:
		read_zero(v);
		return;
	case VMDK_EXT_FLAT:
		read_flat(v);
		return;
	case VMDK_EXT_SPARSE:
		if (e->s.gd[v->gdi] == 0)
			read_parent(v);		/* no grain table: nothing allocated */
		else
			gt_get(v);
		return;
	}
}

static void
read_start(struct vmdk_priv *p, struct td_request *req)
{
	struct td_pieces *ps = td_pieces_new(p->img, req, 0);
	uint64_t pos = req->offset, end = req->offset + req->length;

	if (!ps) {
		td_complete_later(p->img, req, ENOMEM);
		return;
	}
	while (pos < end) {
		struct vmdk_extent *e = extent_at(p, pos);
		uint64_t stop = piece_end(e, pos, end);
		struct vop *v = vop_new(p, req, ps, e, pos, stop - pos);
		if (!v) {
			ps->err = ENOMEM;
			break;
		}
		read_piece(v);
		pos = stop;
	}
	td_pieces_issued(ps);
}

/* ---- block status ---- */

static uint32_t
grain_flags(int kind)
{
	switch (kind) {
	case VMDK_GRAIN_UNALLOC:
		return TD_EXTENT_PARENT;
	case VMDK_GRAIN_ZERO:
		return TD_EXTENT_ZERO;
	default:
		return 0;	/* data (damage shows when it is read) */
	}
}

/* Extents of [pos, stop) from a loaded grain table; returns where it stopped. */
static uint64_t
status_grains(struct td_request *req, const struct vmdk_extent *e, const uint32_t *gt,
	      uint64_t pos, uint64_t stop)
{
	uint64_t gb = e->s.grain_bytes, off;
	char why[8];

	while (pos < stop && req->nr_extents < req->max_extents) {
		uint64_t g = (pos - e->start) / gb;
		uint64_t next = e->start + (g + 1) * gb;
		if (next > stop)
			next = stop;
		td_extent_add(req, next - pos, grain_flags(grain_kind(e, gt, g, &off, why,
								    sizeof(why))));
		pos = next;
	}
	return pos;
}

static void
status_flat_done(struct td_request *sub, int err)
{
	struct vop *v = sub->priv;
	struct td_request *req = v->req;

	req->nr_extents = sub->nr_extents;
	td_req_free(req, v);
	td_request_done(req, err);
}

/* A FLAT extent first: the raw driver scans its file. */
static void
status_flat(struct vmdk_priv *p, struct td_request *req, struct vmdk_extent *e, uint64_t pos,
	    uint64_t stop)
{
	struct vop *v = vop_new(p, req, NULL, e, pos, stop - pos);
	if (!v) {
		td_complete_later(p->img, req, ENOMEM);
		return;
	}
	td_req_lend(req, &v->sub, td_driver_raw.ctx_size);
	v->sub.op = TD_OP_BLOCK_STATUS;
	v->sub.offset = e->file_off + (pos - e->start);
	v->sub.length = stop - pos;
	v->sub.extents = req->extents;
	v->sub.max_extents = req->max_extents;
	v->sub.done = status_flat_done;
	v->sub.priv = v;
	td_driver_raw.submit(&e->raw, &v->sub);
}

/* A grain table is needed before anything can be said: load it, then start again. */
static void
status_load(struct vmdk_priv *p, struct td_request *req, struct vmdk_extent *e, uint64_t pos)
{
	struct vop *v = vop_new(p, req, NULL, e, pos, 0);
	if (!v) {
		td_complete_later(p->img, req, ENOMEM);
		return;
	}
	gt_get(v);
}

/* Fills extents as far as known without I/O; does the I/O if nothing is known. */
static void
status_run(struct vmdk_priv *p, struct td_request *req)
{
	uint64_t pos = req->offset, end = req->offset + req->length;

	req->nr_extents = 0;
	while (pos < end && req->nr_extents < req->max_extents) {
		struct vmdk_extent *e = extent_at(p, pos);
		uint64_t stop = piece_end(e, pos, end);
		if (e->type == VMDK_EXT_ZERO) {
			td_extent_add(req, stop - pos, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
		} else if (e->type == VMDK_EXT_FLAT) {
			if (req->nr_extents)
				break;
			status_flat(p, req, e, pos, stop);
			return;
		} else {
			uint32_t gdi = vmdk_gd_index(&e->s, vmdk_grain_of(&e->s, pos - e->start));
			struct mc_entry *g = e->s.gd[gdi] ? mc_find(&p->gt, gt_key(e, gdi)) : NULL;
			if (!e->s.gd[gdi]) {
				td_extent_add(req, stop - pos, TD_EXTENT_PARENT);
			} else if (!g || !g->ready) {
				if (!req->nr_extents) {
					status_load(p, req, e, pos);
					return;
				}
				break;
			} else {
				stop = status_grains(req, e, g->buf, pos, stop);
			}
		}
		pos = stop;
	}
	td_complete_later(p->img, req, 0);
}

static void
vmdk_submit(struct td_image *img, struct td_request *req)
{
	struct vmdk_priv *p = img->priv;

	switch (req->op) {
	case TD_OP_READ:
		read_start(p, req);
		return;
	case TD_OP_BLOCK_STATUS:
		status_run(p, req);
		return;
	case TD_OP_CACHE:
		td_complete_later(img, req, 0);
		return;
	default:
		/* read-only: vbd_start refuses writes, and caps keep flushes away */
		assert(!"a write reached a vmdk");
		td_complete_later(img, req, EROFS);	/* NDEBUG builds */
		return;
	}
}

const struct td_driver td_driver_vmdk = {
	.name = "vmdk",
	/* a read inside one grain table or one FLAT extent: nothing from the heap */
	.ctx_size = TD_PIECES_CTX_SIZE(0) + TD_CTX_SIZE(struct vop) + VMDK_FLAT_CTX,
	.open = vmdk_open,
	.close = vmdk_close,
	.submit = vmdk_submit,
	.get_parent = vmdk_get_parent,
	.validate_parent = vmdk_validate_parent,
};
