/* A vbd's changed-block tracking: see cbt.h and docs/CBT-LOG.md. */
#include "cbt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "log.h"
#include "vbd.h"

static void
cbt_free(struct cbt *c)
{
	cbt_file_close(&c->f);
	free(c->want);
	free(c->shadow);
	free(c->op);
	free(c->path);
	free(c);
}

int
cbt_open(const char *path, uint64_t size, int rdonly, struct cbt **out, char *err,
	 size_t errlen)
{
	struct cbt *c = calloc(1, sizeof(*c));
	int rc;

	if (!c || !(c->path = strdup(path))) {
		free(c);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	c->f.fd = -1;
	TAILQ_INIT(&c->waiting);
	if ((rc = cbt_file_open(path, rdonly, &c->f, err, errlen)) < 0)
		goto fail;
	if (c->f.h.size != size) {
		snprintf(err, errlen, "CBT log %s is for a disk of %ju bytes, this one has %ju",
			 path, (uintmax_t)c->f.h.size, (uintmax_t)size);
		rc = -EINVAL;
		goto fail;
	}
	if (!rdonly) {
		if (!c->f.h.consistent)
			log_info("CBT log %s is new or was not closed cleanly: either way its bits "
				 "were written ahead of their data, so it marks every changed block",
				 path);
		c->f.h.consistent = 0;
		if ((rc = cbt_file_write_header(&c->f)) || (rc = cbt_file_sync(&c->f))) {
			snprintf(err, errlen, "CBT log %s: %s", path, strerror(-rc));
			goto fail;
		}
	}
	c->bytes = cbt_bitmap_bytes(size);
	if (!(c->want = malloc(c->bytes)) || !(c->shadow = malloc(c->bytes)) ||
	    !(c->op = calloc(1, sizeof(*c->op)))) {
		snprintf(err, errlen, "out of memory");
		rc = -ENOMEM;
		goto fail;
	}
	memcpy(c->want, c->f.bitmap, c->bytes);
	memcpy(c->shadow, c->f.bitmap, c->bytes);
	c->dirty = cbt_count_set(c->want, cbt_blocks(size));
	*out = c;
	return 0;
fail:
	cbt_free(c);
	return rc;
}

int
cbt_resize(struct cbt *c, uint64_t size, char *err, size_t errlen)
{
	uint64_t n = cbt_bitmap_bytes(size);
	uint8_t *w, *s;
	int rc;

	if (size == c->f.h.size)
		return 0;
	if (size < c->f.h.size) {
		snprintf(err, errlen, "CBT log %s is for a disk of %ju bytes: the disk shrank to %ju",
			 c->path, (uintmax_t)c->f.h.size, (uintmax_t)size);
		return -EINVAL;
	}
	if (c->f.rdonly) {
		snprintf(err, errlen, "CBT log %s is read-only and the disk grew", c->path);
		return -EROFS;
	}
	if (!(w = realloc(c->want, n)))
		return -ENOMEM;
	c->want = w;
	if (!(s = realloc(c->shadow, n)))
		return -ENOMEM;
	c->shadow = s;
	if ((rc = cbt_file_grow(&c->f, size, err, errlen)) < 0)
		return rc;
	/* nothing is in flight: the file's bits are all there is */
	memcpy(c->want, c->f.bitmap, n);
	memcpy(c->shadow, c->f.bitmap, n);
	c->bytes = n;
	log_info("CBT log %s grown for a disk of %ju bytes", c->path, (uintmax_t)size);
	return 0;
}

int
cbt_close(struct cbt *c)
{
	int rc = 0;

	if (!c)
		return 0;
	if (!c->f.rdonly && c->f.fd >= 0) {
		c->f.h.consistent = 1;
		if ((rc = cbt_file_write_header(&c->f)) || (rc = cbt_file_sync(&c->f)))
			log_err("CBT log %s: marking it consistent: %s", c->path, strerror(-rc));
	}
	cbt_free(c);
	return rc;
}

void
cbt_attach(struct cbt *c, struct io_engine *io, void (*resume)(struct vbd_request *vr, int err))
{
	c->io = io;
	c->resume = resume;
}

int
cbt_block_dirty(const struct cbt *c, uint64_t block)
{
	return cbt_bit(c->want, block);
}

/* ---- the log write: bytes [lo, hi) of want, then an fdatasync ---- */

static void
range_add(struct cbt *c, uint64_t lo, uint64_t hi)
{
	if (c->lo == c->hi) {
		c->lo = lo;
		c->hi = hi;
		return;
	}
	c->lo = lo < c->lo ? lo : c->lo;
	c->hi = hi > c->hi ? hi : c->hi;
}

static void log_write_start(struct cbt *c);

static void
log_write_end(struct cbt *c, int res)
{
	struct vbd_request *vr, *next;

	c->busy = 0;
	c->done = c->started;
	if (res < 0) {
		/* still wanted: the bytes go out again with the next write */
		c->log_errors++;
		range_add(c, c->fl_lo, c->fl_hi);
		log_err("CBT log %s: %s: the writes waiting for it fail", c->path, strerror(-res));
	} else {
		memcpy(c->f.bitmap + c->fl_lo, c->shadow + c->fl_lo, c->fl_hi - c->fl_lo);
	}
	/* those this write carried, in the order they came; the others wait for the next */
	for (vr = TAILQ_FIRST(&c->waiting); vr; vr = next) {
		next = TAILQ_NEXT(vr, cbt_link);
		if (vr->cbt_need > c->done)
			continue;
		TAILQ_REMOVE(&c->waiting, vr, cbt_link);
		c->nr_waiting--;
		c->resume(vr, res < 0 ? EIO : 0);
	}
	if (!TAILQ_EMPTY(&c->waiting))
		log_write_start(c);
}

static void
log_synced(struct io_op *op, int res)
{
	log_write_end(op->data, res);
}

static void
log_written(struct io_op *op, int res)
{
	struct cbt *c = op->data;

	if (res < 0) {
		log_write_end(c, res);
		return;
	}
	memset(op, 0, sizeof(*op));
	op->opcode = IO_OP_FDATASYNC;
	op->fd = c->f.fd;
	op->done = log_synced;
	op->data = c;
	io_submit(c->io, op);
}

static void
log_write_start(struct cbt *c)
{
	struct io_op *op = c->op;

	c->busy = 1;
	c->started++;
	c->log_writes++;
	c->fl_lo = c->lo;
	c->fl_hi = c->hi;
	c->lo = c->hi = 0;
	memcpy(c->shadow + c->fl_lo, c->want + c->fl_lo, c->fl_hi - c->fl_lo);
	memset(op, 0, sizeof(*op));
	c->iov.iov_base = c->shadow + c->fl_lo;
	c->iov.iov_len = c->fl_hi - c->fl_lo;
	op->opcode = IO_OP_WRITEV;
	op->fd = c->f.fd;
	op->offset = CBT_HEADER_SIZE + c->fl_lo;
	op->iov = &c->iov;
	op->iovcnt = 1;
	op->done = log_written;
	op->data = c;
	io_submit(c->io, op);
}

int
cbt_before_write(struct cbt *c, struct vbd_request *vr, uint64_t offset, uint64_t length)
{
	uint64_t first = offset / CBT_BLOCK_SIZE, last = (offset + length - 1) / CBT_BLOCK_SIZE;
	int missing = 0, all_in_flight = 1;

	for (uint64_t b = first; b <= last; b++) {
		if (cbt_bit(c->f.bitmap, b))
			continue;	/* durable */
		missing = 1;
		uint64_t byte = b / 8;
		if (!c->busy || byte < c->fl_lo || byte >= c->fl_hi || !cbt_bit(c->shadow, b))
			all_in_flight = 0;
		if (!cbt_bit(c->want, b)) {
			cbt_bit_set(c->want, b);
			c->dirty++;
			range_add(c, byte, byte + 1);
		}
	}
	if (!missing)
		return 0;
	/* a bit in want and in no write in flight is in [lo, hi): the next write takes it */
	vr->cbt_need = all_in_flight ? c->started : c->started + 1;
	TAILQ_INSERT_TAIL(&c->waiting, vr, cbt_link);
	c->nr_waiting++;
	if (!c->busy)
		log_write_start(c);
	return 1;
}

json_t *
cbt_stats_json(const struct cbt *c)
{
	return json_pack("{s:s, s:I, s:I, s:b, s:I, s:I, s:i}", "log", c->path,
			 "dirty_blocks", (json_int_t)c->dirty,
			 "blocks", (json_int_t)cbt_blocks(c->f.h.size),
			 "readonly", c->f.rdonly,
			 "log_writes", (json_int_t)c->log_writes,
			 "log_errors", (json_int_t)c->log_errors,
			 "waiting", (int)c->nr_waiting);
}
