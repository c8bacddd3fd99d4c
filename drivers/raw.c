/*
 * raw (alias aio): a file or block device holding the disk byte for byte.
 * O_DIRECT where the file system allows it; requests that O_DIRECT cannot
 * take (unaligned offset, length or buffer) go through a second, buffered
 * descriptor of the same file, which the kernel keeps coherent with the
 * direct one. Discard punches holes; block status comes from SEEK_DATA and
 * SEEK_HOLE.
 */
#include "driver.h"
#include "file_io.h"
#include "vhd_file.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/fs.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>
#endif

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#define FALLOC_FL_PUNCH_HOLE 0x02
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

#define RAW_ZERO_CHUNK (1u << 20)
#define RAW_INLINE_IOV 4

static char raw_zeros[RAW_ZERO_CHUNK] __attribute__((aligned(4096)));

struct raw_priv {
	struct td_file f;
	/*
	 * The last data region SEEK_DATA/SEEK_HOLE found, [data_start,
	 * data_end): on tmpfs a SEEK_HOLE walks every page up to the hole, so
	 * a fully written 1 GiB file costs milliseconds per call; block status
	 * inside the region then needs no call (qemu's file driver keeps the
	 * same). Writes only add data; a discard or write-zeroes empties it
	 * (gen: a scan that raced one does not store what it saw).
	 */
	pthread_mutex_t lock;
	uint64_t data_start, data_end, gen;
};

/* Steps of a write-zeroes, tried in order until one is supported. */
enum raw_zero_step {
	ZSTEP_PUNCH,		/* deallocate: reads back zero */
	ZSTEP_ZERO_RANGE,	/* zero, keep allocated */
	ZSTEP_PUNCH_THEN_ALLOC,	/* tmpfs: no ZERO_RANGE */
	ZSTEP_ALLOC,
	ZSTEP_WRITE,		/* last resort: write zeros */
	ZSTEP_SYNC,		/* FUA */
};

struct raw_req {
	struct io_op op;
	struct td_request *req;
	struct td_image *img;
	enum raw_zero_step step;
	uint64_t zeroed;	/* ZSTEP_WRITE progress */
	struct iovec zero_iov;
	struct iovec iov_inline[RAW_INLINE_IOV];
	struct iovec *iov;
};

static int
raw_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct raw_priv *p = calloc(1, sizeof(*p));
	int rc;
	(void)ctx;

	if (!p)
		return td_error_set(err, ENOMEM, "out of memory");
	pthread_mutex_init(&p->lock, NULL);
	rc = td_file_open(&p->f, img->path, (img->oflags & TD_OPEN_RDONLY) != 0,
			  (img->oflags & TD_OPEN_NODIRECT) != 0, err);
	if (rc < 0) {
		pthread_mutex_destroy(&p->lock);
		free(p);
		return rc;
	}
	img->size = p->f.size;
	img->sector_size = p->f.sector_size;
	img->caps = TD_CAP_BLOCK_STATUS | TD_CAP_CACHE;
	if (!(img->oflags & TD_OPEN_RDONLY))
		img->caps |= TD_CAP_FLUSH | TD_CAP_DISCARD | TD_CAP_WRITE_ZEROES |
			     TD_CAP_FAST_ZERO;
	img->priv = p;
	return 0;
}

static void
raw_close(struct td_image *img)
{
	struct raw_priv *p = img->priv;
	td_file_close(&p->f, !(img->oflags & TD_OPEN_RDONLY));
	pthread_mutex_destroy(&p->lock);
	free(p);
}

static void raw_op_done(struct io_op *op, int res);

static void
raw_finish(struct raw_req *rr, int res)
{
	struct td_request *req = rr->req;
	if (rr->iov != rr->iov_inline)
		free(rr->iov);
	td_req_free(req, rr);
	td_request_done(req, res < 0 ? -res : 0);
}

static void
raw_issue(struct raw_req *rr, enum io_opcode opcode, int mode, uint64_t offset,
	  uint64_t length)
{
	struct raw_priv *p = rr->img->priv;

	td_file_prep(&p->f, &rr->op, opcode, offset);
	rr->op.mode = mode;
	rr->op.length = length;
	rr->op.done = raw_op_done;
	rr->op.data = rr;
	io_submit(rr->img->io, &rr->op);
}

static void
raw_issue_sync(struct raw_req *rr)
{
	rr->step = ZSTEP_SYNC;
	raw_issue(rr, IO_OP_FDATASYNC, 0, 0, 0);
}

/* Writes the next chunk of zeros (the fallback when fallocate cannot). */
static void
raw_issue_zero_write(struct raw_req *rr)
{
	uint64_t off = rr->req->offset + rr->zeroed;
	uint64_t n = rr->req->length - rr->zeroed;

	if (n > RAW_ZERO_CHUNK)
		n = RAW_ZERO_CHUNK;
	rr->zero_iov.iov_base = raw_zeros;
	rr->zero_iov.iov_len = n;
	rr->op.iov = &rr->zero_iov;
	rr->op.iovcnt = 1;
	raw_issue(rr, IO_OP_WRITEV, 0, off, 0);
}

static void
raw_zero_step(struct raw_req *rr)
{
	struct td_request *req = rr->req;
	int keep = FALLOC_FL_KEEP_SIZE;

	switch (rr->step) {
	case ZSTEP_PUNCH:
	case ZSTEP_PUNCH_THEN_ALLOC:
		raw_issue(rr, IO_OP_FALLOCATE, keep | FALLOC_FL_PUNCH_HOLE,
			  req->offset, req->length);
		return;
	case ZSTEP_ZERO_RANGE:
		raw_issue(rr, IO_OP_FALLOCATE, keep | FALLOC_FL_ZERO_RANGE,
			  req->offset, req->length);
		return;
	case ZSTEP_ALLOC:
		raw_issue(rr, IO_OP_FALLOCATE, keep, req->offset, req->length);
		return;
	case ZSTEP_WRITE:
		if (req->flags & TD_REQ_FAST_ZERO) {
			raw_finish(rr, -ENOTSUP);
			return;
		}
		raw_issue_zero_write(rr);
		return;
	case ZSTEP_SYNC:
		raw_issue_sync(rr);
		return;
	}
}

/* A write-zeroes step finished: move on, or fall back to the next way. */
static void
raw_zero_done(struct raw_req *rr, int res)
{
	struct td_request *req = rr->req;
	int unsupported = res == -EOPNOTSUPP || res == -ENOTSUP || res == -EINVAL ||
			  res == -ENOSYS;

	if (res < 0 && !unsupported) {
		raw_finish(rr, res);
		return;
	}
	switch (rr->step) {
	case ZSTEP_PUNCH:
		rr->step = unsupported ? ZSTEP_ZERO_RANGE : ZSTEP_SYNC;
		break;
	case ZSTEP_ZERO_RANGE:
		rr->step = unsupported ? ZSTEP_PUNCH_THEN_ALLOC : ZSTEP_SYNC;
		break;
	case ZSTEP_PUNCH_THEN_ALLOC:
		rr->step = unsupported ? ZSTEP_WRITE : ZSTEP_ALLOC;
		break;
	case ZSTEP_ALLOC:
		/* the range is already zero; it only stays a hole */
		rr->step = ZSTEP_SYNC;
		break;
	case ZSTEP_WRITE:
		if (res < 0) {
			raw_finish(rr, res);
			return;
		}
		rr->zeroed += rr->zero_iov.iov_len;
		if (rr->zeroed < req->length)
			break;
		rr->step = ZSTEP_SYNC;
		break;
	case ZSTEP_SYNC:
		raw_finish(rr, res);
		return;
	}
	if (rr->step == ZSTEP_SYNC && !(req->flags & TD_REQ_FUA)) {
		raw_finish(rr, 0);
		return;
	}
	raw_zero_step(rr);
}

static void
raw_op_done(struct io_op *op, int res)
{
	struct raw_req *rr = op->data;
	struct td_request *req = rr->req;

	switch (req->op) {
	case TD_OP_WRITE:
		if (res >= 0 && (req->flags & TD_REQ_FUA) && op->opcode == IO_OP_WRITEV) {
			raw_issue_sync(rr);
			return;
		}
		break;
	case TD_OP_WRITE_ZEROES:
		raw_zero_done(rr, res);
		return;
	case TD_OP_DISCARD:
		/* discard is advisory: a file system without holes still succeeds */
		if (res == -EOPNOTSUPP || res == -ENOTSUP || res == -EINVAL)
			res = 0;
		break;
	case TD_OP_CACHE:
		res = 0;
		break;
	default:
		break;
	}
	raw_finish(rr, res);
}

struct raw_scan {
	struct io_call call;
	struct td_request *req;
	struct raw_priv *p;
};

/* Loop thread: a discard or write-zeroes may make holes in the cached region. */
static void
raw_data_forget(struct raw_priv *p)
{
	pthread_mutex_lock(&p->lock);
	p->data_start = p->data_end = 0;
	p->gen++;
	pthread_mutex_unlock(&p->lock);
}

/* Worker thread: the cached data region's end if pos is in it, else 0. */
static uint64_t
raw_data_cached(struct raw_priv *p, uint64_t pos, uint64_t *gen)
{
	uint64_t stop = 0;

	pthread_mutex_lock(&p->lock);
	if (pos >= p->data_start && pos < p->data_end)
		stop = p->data_end;
	*gen = p->gen;
	pthread_mutex_unlock(&p->lock);
	return stop;
}

static void
raw_data_remember(struct raw_priv *p, uint64_t start, uint64_t end, uint64_t gen)
{
	pthread_mutex_lock(&p->lock);
	if (p->gen == gen) {
		p->data_start = start;
		p->data_end = end;
	}
	pthread_mutex_unlock(&p->lock);
}

/* Worker thread: walks SEEK_DATA/SEEK_HOLE over the range. */
static int
raw_scan_run(struct io_call *c)
{
	struct raw_scan *s = (struct raw_scan *)c;
	struct td_request *req = s->req;
	uint64_t pos = req->offset, end = req->offset + req->length, gen;

	req->nr_extents = 0;
	while (pos < end && req->nr_extents < req->max_extents) {
		uint64_t cached = raw_data_cached(s->p, pos, &gen);
		if (cached) {
			uint64_t stop = cached < end ? cached : end;
			td_extent_add(req, stop - pos, 0);
			pos = stop;
			continue;
		}
		off_t data = lseek(s->p->f.fd, (off_t)pos, SEEK_DATA);
		if (data < 0 && errno == ENXIO) {
			td_extent_add(req, end - pos, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
			break;
		}
		if (data < 0) {	/* no hole support: all data */
			td_extent_add(req, end - pos, 0);
			break;
		}
		if ((uint64_t)data > pos) {
			uint64_t n = (uint64_t)data < end ? (uint64_t)data - pos : end - pos;
			td_extent_add(req, n, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
			pos += n;
			continue;
		}
		off_t hole = lseek(s->p->f.fd, (off_t)pos, SEEK_HOLE);
		if (hole > (off_t)pos)
			raw_data_remember(s->p, pos, (uint64_t)hole, gen);
		uint64_t stop = hole < 0 || (uint64_t)hole > end ? end : (uint64_t)hole;
		if (stop <= pos)
			stop = end;
		td_extent_add(req, stop - pos, 0);
		pos = stop;
	}
	return 0;
}

static void
raw_scan_done(struct io_call *c, int res)
{
	struct raw_scan *s = (struct raw_scan *)c;
	struct td_request *req = s->req;
	free(s);
	td_request_done(req, res < 0 ? -res : 0);
}

static void
raw_submit(struct td_image *img, struct td_request *req)
{
	struct raw_priv *p = img->priv;
	struct raw_req *rr;

	if (req->op == TD_OP_BLOCK_STATUS) {
		struct raw_scan *s = calloc(1, sizeof(*s));
		if (!s) {
			td_complete_later(img, req, ENOMEM);
			return;
		}
		s->req = req;
		s->p = p;
		s->call.fn = raw_scan_run;
		s->call.done = raw_scan_done;
		io_call(img->io, &s->call);
		return;
	}
	/* vbd_start refuses writes to read-only disks; caps keep flushes away */
	assert(!(img->oflags & TD_OPEN_RDONLY) || req->op == TD_OP_READ ||
	       req->op == TD_OP_CACHE || req->op == TD_OP_BLOCK_STATUS);
	rr = td_req_alloc(req, sizeof(*rr));
	if (!rr) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	rr->req = req;
	rr->img = img;
	switch (req->op) {
	case TD_OP_READ:
	case TD_OP_WRITE:
		rr->iov = rr->iov_inline;
		if (req->iovcnt > RAW_INLINE_IOV) {
			rr->iov = calloc((size_t)req->iovcnt, sizeof(*rr->iov));
			if (!rr->iov) {
				td_req_free(req, rr);
				td_complete_later(img, req, ENOMEM);
				return;
			}
		}
		memcpy(rr->iov, req->iov, (size_t)req->iovcnt * sizeof(*rr->iov));
		rr->op.iov = rr->iov;
		rr->op.iovcnt = req->iovcnt;
		raw_issue(rr, req->op == TD_OP_READ ? IO_OP_READV : IO_OP_WRITEV, 0,
			  req->offset, 0);
		return;
	case TD_OP_FLUSH:
		raw_issue(rr, IO_OP_FDATASYNC, 0, 0, 0);
		return;
	case TD_OP_DISCARD:
		raw_data_forget(p);
		raw_issue(rr, IO_OP_FALLOCATE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, req->offset,
			  req->length);
		return;
	case TD_OP_WRITE_ZEROES:
		raw_data_forget(p);
		rr->step = (req->flags & TD_REQ_NO_HOLE) ? ZSTEP_ZERO_RANGE : ZSTEP_PUNCH;
		raw_zero_step(rr);
		return;
	case TD_OP_CACHE:
		raw_issue(rr, IO_OP_FADVISE, POSIX_FADV_WILLNEED, req->offset,
			  req->length);
		return;
	case TD_OP_BLOCK_STATUS:
		break;
	}
	td_req_free(req, rr);
	td_complete_later(img, req, EINVAL);
}

static int
raw_create_child(const char *parent_path, const char *child_path, char **child_params,
		 struct td_error *err)
{
	return vhd_create_child(parent_path, child_path, 1, child_params, err);
}

const struct td_driver td_driver_raw = {
	.name = "raw",
	.ctx_size = TD_CTX_SIZE(struct raw_req),
	.open = raw_open,
	.close = raw_close,
	.submit = raw_submit,
	.create_child = raw_create_child,
};
