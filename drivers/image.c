/*
 * Chains of images: driver lookup, "type:path" parsing, the registry that
 * opens a shared parent once for every vbd that reaches it, and the request
 * plumbing down the chain (reads and block status of unallocated ranges
 * fall through to the parent; below the root they read zeros).
 */
#include "driver.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TD_CHAIN_MAX_DEPTH 256

static const struct td_driver *const drivers[] = {
	&td_driver_raw,
	&td_driver_ram,
	&td_driver_vhd,
	&td_driver_vmdk,
	&td_driver_qcow2,
	&td_driver_nbd,
#if defined(TD_RBD) && TD_RBD
	&td_driver_rbd,
#endif
};

#define TD_MAX_EXTRA_DRIVERS 8
static const struct td_driver *extra_drivers[TD_MAX_EXTRA_DRIVERS];

/* Guards the registry; held across whole chain opens and closes. */
static pthread_mutex_t chain_lock = PTHREAD_MUTEX_INITIALIZER;
static struct td_image *registry;
static uint64_t last_serial;

int
td_error_set(struct td_error *err, int code, const char *fmt, ...)
{
	va_list ap;
	err->code = code;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
	return -code;
}

const struct td_driver *
td_driver_find(const char *type)
{
	if (strcmp(type, "aio") == 0)
		type = "raw";
	for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
		if (strcmp(drivers[i]->name, type) == 0)
			return drivers[i];
	for (size_t i = 0; i < TD_MAX_EXTRA_DRIVERS && extra_drivers[i]; i++)
		if (strcmp(extra_drivers[i]->name, type) == 0)
			return extra_drivers[i];
	return NULL;
}

int
td_driver_register(const struct td_driver *drv)
{
	if (td_driver_find(drv->name))
		return -EEXIST;
	for (size_t i = 0; i < TD_MAX_EXTRA_DRIVERS; i++) {
		if (!extra_drivers[i]) {
			extra_drivers[i] = drv;
			return 0;
		}
	}
	return -ENOSPC;
}

int
td_params_parse(const char *params, const struct td_driver **drv, char **path,
		struct td_error *err)
{
	const char *colon = strchr(params, ':');
	char type[32];

	if (!colon || colon == params || colon[1] == '\0')
		return td_error_set(err, EINVAL,
				    "'%s' is not TYPE:PATH (e.g. aio:/srv/disk.img)", params);
	if ((size_t)(colon - params) >= sizeof(type))
		return td_error_set(err, EINVAL, "unknown image type in '%s'", params);
	memcpy(type, params, (size_t)(colon - params));
	type[colon - params] = '\0';
	*drv = td_driver_find(type);
#if !(defined(TD_RBD) && TD_RBD)
	if (!*drv && strcmp(type, "rbd") == 0)
		return td_error_set(err, ENOTSUP, "rbd: this tapdiskd was built without RBD "
				    "(make RBD=0): it cannot open Ceph images");
#endif
	if (!*drv) {
		char known[256] = "aio";
		for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++) {
			strncat(known, ", ", sizeof(known) - strlen(known) - 1);
			strncat(known, drivers[i]->name, sizeof(known) - strlen(known) - 1);
		}
		for (size_t i = 0; i < TD_MAX_EXTRA_DRIVERS && extra_drivers[i]; i++) {
			strncat(known, ", ", sizeof(known) - strlen(known) - 1);
			strncat(known, extra_drivers[i]->name, sizeof(known) - strlen(known) - 1);
		}
		return td_error_set(err, EINVAL, "unknown image type '%s' (known: %s)",
				    type, known);
	}
	*path = strdup(colon + 1);
	if (!*path)
		return td_error_set(err, ENOMEM, "out of memory");
	return 0;
}

int
td_path_absolute(const char *path, const char *dir, char **out, struct td_error *err)
{
	if (path[0] == '/')
		*out = strdup(path);
	else if (!dir || dir[0] != '/')
		return td_error_set(err, EINVAL, "'%s' is a relative path: give an absolute one "
				    "(tap-ctl sends its working directory as cwd)", path);
	else if (asprintf(out, "%s/%s", dir, path) < 0)
		*out = NULL;
	return *out ? 0 : td_error_set(err, ENOMEM, "out of memory");
}

int
td_params_absolute(const char *params, const char *dir, char **out, struct td_error *err)
{
	const struct td_driver *drv;
	char *path, *abs;
	int rc = td_params_parse(params, &drv, &path, err);

	if (rc < 0)
		return rc;
	if (drv->flags & (TD_DRV_NOFILE | TD_DRV_URI)) {
		free(path);
		*out = strdup(params);
		return *out ? 0 : td_error_set(err, ENOMEM, "out of memory");
	}
	rc = td_path_absolute(path, dir, &abs, err);
	free(path);
	if (rc < 0)
		return rc;
	int type_len = (int)(strchr(params, ':') - params);
	if (asprintf(out, "%.*s:%s", type_len, params, abs) < 0)
		*out = NULL;
	free(abs);
	return *out ? 0 : td_error_set(err, ENOMEM, "out of memory");
}

/* The registry key of a file: which file it is, whatever path names it. */
static int
image_key(const struct td_driver *drv, const char *path, char **key,
	  struct td_error *err)
{
	struct stat st;

	*key = NULL;
	if (drv->flags & (TD_DRV_NOFILE | TD_DRV_URI))
		return 0;	/* nothing to share: each chain has its own */
	if (stat(path, &st) < 0)
		return td_error_set(err, errno, "%s", strerror(errno));
	if (S_ISDIR(st.st_mode))
		return td_error_set(err, EISDIR, "%s", strerror(EISDIR));
	if (asprintf(key, "%ju:%ju", (uintmax_t)st.st_dev, (uintmax_t)st.st_ino) < 0) {
		*key = NULL;
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}

#define REGISTRY_BUSY ((struct td_image *)-1)

/*
 * The image at key to share (NULL: open it anew), or REGISTRY_BUSY with err
 * set. A writer is exclusive across every loop; a read-only image is shared
 * only by chains on the same I/O engine (one loop's), and is opened once
 * more for each other loop: an image's state is its loop's alone.
 */
static struct td_image *
registry_find(const char *key, unsigned oflags, struct io_engine *io, struct td_error *err)
{
	struct td_image *same_loop = NULL;

	for (struct td_image *img = registry; img; img = img->reg_next) {
		if (!img->key || strcmp(img->key, key) != 0)
			continue;
		if (!(oflags & TD_OPEN_RDONLY) || !(img->oflags & TD_OPEN_RDONLY)) {
			td_error_set(err, EBUSY, "%s is already open%s", img->path,
				     (img->oflags & TD_OPEN_RDONLY) ? " read-only" : " for writing");
			return REGISTRY_BUSY;
		}
		if (img->io == io)
			same_loop = img;
	}
	return same_loop;
}

static void
registry_remove(struct td_image *img)
{
	for (struct td_image **p = &registry; *p; p = &(*p)->reg_next) {
		if (*p == img) {
			*p = img->reg_next;
			return;
		}
	}
}

static void
image_free(struct td_image *img)
{
	free(img->params);
	free(img->path);
	free(img->key);
	free(img);
}

/*
 * Opens one image, or takes another reference on it when it is already open
 * read-only and this open is read-only too (*shared = 1). chain is the part
 * of the chain opened so far, to refuse loops.
 */
static int
image_open_one(const char *params, unsigned oflags, const struct td_open_ctx *ctx,
	       const struct td_image *chain, struct td_image **out, int *shared,
	       struct td_error *err)
{
	const struct td_driver *drv;
	char *path = NULL, *key = NULL;
	struct td_image *img;
	int rc;

	*shared = 0;
	rc = td_params_parse(params, &drv, &path, err);
	if (rc < 0)
		return rc;
	if ((oflags & TD_OPEN_NOFILE) && !(drv->flags & TD_DRV_NOFILE)) {
		rc = td_error_set(err, EACCES, "this server opens no files: only image types "
				  "that name none (ram)");
		goto fail;
	}
	rc = image_key(drv, path, &key, err);
	if (rc < 0)
		goto fail;
	if (key) {
		for (const struct td_image *c = chain; c; c = c->parent) {
			if (c->key && strcmp(c->key, key) == 0) {
				rc = td_error_set(err, ELOOP, "parent chain loops back to %s",
						  c->params);
				goto fail;
			}
		}
		img = registry_find(key, oflags, ctx->io, err);
		if (img == REGISTRY_BUSY) {
			rc = -err->code;
			goto fail;
		}
		if (img) {
			img->refs++;
			*out = img;
			*shared = 1;
			free(path);
			free(key);
			return 0;
		}
	}

	img = calloc(1, sizeof(*img));
	if (!img || !(img->params = strdup(params))) {
		free(img);
		rc = td_error_set(err, ENOMEM, "out of memory");
		goto fail;
	}
	img->drv = drv;
	img->path = path;
	img->key = key;
	img->oflags = oflags;
	img->io = ctx->io;
	img->sector_size = 512;
	img->min_io = 1;
	rc = drv->open(img, ctx, err);
	if (rc < 0) {
		img->key = NULL;
		img->path = NULL;
		image_free(img);
		goto fail;
	}
	img->refs = 1;
	img->serial = ++last_serial;
	img->reg_next = registry;
	registry = img;
	*out = img;
	return 0;
fail:
	free(path);
	free(key);
	return rc;
}

static void
chain_close_locked(struct td_image *img)
{
	while (img) {
		struct td_image *parent = img->parent;
		if (--img->refs > 0)
			return;	/* still someone's parent: its chain stays */
		registry_remove(img);
		img->drv->close(img);
		image_free(img);
		img = parent;
	}
}

/* Prefixes err's message with the params of the image it is about. */
static int
error_about(struct td_error *err, const char *what, const char *params)
{
	char msg[sizeof(err->msg)];
	/* a long path may cut the tail off; the message stays terminated */
	if (snprintf(msg, sizeof(msg), "%s%s: %s", what, params, err->msg) < 0)
		return -err->code;
	memcpy(err->msg, msg, sizeof(msg));
	return -err->code;
}

int
td_chain_open(const char *params, unsigned oflags, const struct td_open_ctx *ctx,
	      struct td_image **leafp, struct td_error *err)
{
	struct td_image *leaf, *img;
	int shared, rc;
	unsigned depth = 1;

	pthread_mutex_lock(&chain_lock);
	rc = image_open_one(params, oflags, ctx, NULL, &leaf, &shared, err);
	if (rc < 0) {
		pthread_mutex_unlock(&chain_lock);
		return error_about(err, "", params);
	}
	for (img = leaf; !shared && img->drv->get_parent; img = img->parent) {
		char *pparams = NULL;
		struct td_image *parent;

		rc = img->drv->get_parent(img, &pparams, err);
		if (rc < 0) {
			error_about(err, "", img->params);
			goto fail;
		}
		if (!pparams)
			break;
		if (++depth > TD_CHAIN_MAX_DEPTH) {
			rc = td_error_set(err, ELOOP, "%s: chain deeper than %d images",
					  params, TD_CHAIN_MAX_DEPTH);
			free(pparams);
			goto fail;
		}
		rc = image_open_one(pparams, TD_OPEN_RDONLY | TD_OPEN_PARENT |
				    (oflags & (TD_OPEN_NODIRECT | TD_OPEN_NOFILE)), ctx, leaf, &parent,
				    &shared, err);
		if (rc < 0) {
			error_about(err, "parent ", pparams);
			free(pparams);
			error_about(err, "", img->params);
			goto fail;
		}
		free(pparams);
		if (img->drv->validate_parent) {
			rc = img->drv->validate_parent(img, parent, err);
			if (rc < 0) {
				chain_close_locked(parent);
				error_about(err, "", img->params);
				goto fail;
			}
		}
		img->parent = parent;
	}
	pthread_mutex_unlock(&chain_lock);
	*leafp = leaf;
	return 0;
fail:
	chain_close_locked(leaf);
	pthread_mutex_unlock(&chain_lock);
	return rc;
}

void
td_chain_close(struct td_image *leaf)
{
	pthread_mutex_lock(&chain_lock);
	chain_close_locked(leaf);
	pthread_mutex_unlock(&chain_lock);
}

/* Is the file of img open in another entry of the registry (another loop's)? */
static int
registry_other(const struct td_image *img)
{
	for (const struct td_image *r = registry; r; r = r->reg_next)
		if (r != img && r->key && img->key && strcmp(r->key, img->key) == 0)
			return 1;
	return 0;
}

int
td_image_open_writable(struct td_image *top, struct td_image *base, unsigned oflags,
		       const struct td_open_ctx *ctx, struct td_image **rwp,
		       struct td_error *err)
{
	struct td_image *rw;
	int rc;

	pthread_mutex_lock(&chain_lock);
	for (struct td_image *img = top->parent; img; img = img->parent) {
		if (img->refs > 1 || registry_other(img)) {
			rc = td_error_set(err, EBUSY, "%s is a parent of another open disk too: "
					  "merging into %s would change that disk", img->path,
					  base->path);
			goto out;
		}
		if (img == base)
			break;
	}
	rw = calloc(1, sizeof(*rw));
	if (!rw || !(rw->params = strdup(base->params)) || !(rw->path = strdup(base->path)) ||
	    (base->key && !(rw->key = strdup(base->key)))) {
		if (rw)
			image_free(rw);
		rc = td_error_set(err, ENOMEM, "out of memory");
		goto out;
	}
	rw->drv = base->drv;
	rw->oflags = oflags & ~(TD_OPEN_RDONLY | TD_OPEN_PARENT);
	rw->io = ctx->io;
	rw->sector_size = 512;
	rw->min_io = 1;
	rc = rw->drv->open(rw, ctx, err);
	if (rc < 0) {
		image_free(rw);
		error_about(err, "", base->params);
		goto out;
	}
	rw->refs = 1;
	rw->serial = ++last_serial;
	rw->parent = base->parent;
	if (rw->parent)
		rw->parent->refs++;
	*rwp = rw;
	rc = 0;
out:
	pthread_mutex_unlock(&chain_lock);
	return rc;
}

int
td_chain_rebase(struct td_image *child, struct td_image *rw, int adopt, struct td_error *err)
{
	int rc;

	if (!child->drv->set_parent)
		return td_error_set(err, ENOTSUP, "%s images cannot change their parent here",
				    child->drv->name);
	pthread_mutex_lock(&chain_lock);
	rc = child->drv->set_parent(child, rw, err);
	if (rc == 0) {
		struct td_image *old = child->parent;
		if (!adopt)
			rw->refs++;	/* child's now, as well as old's until it closes */
		child->parent = rw;
		chain_close_locked(old);	/* a commit's read-only base among them */
		if (adopt) {
			rw->reg_next = registry;
			registry = rw;
		}
	}
	pthread_mutex_unlock(&chain_lock);
	return rc;
}

void
td_image_adopt(struct td_image *rw)
{
	pthread_mutex_lock(&chain_lock);
	rw->reg_next = registry;
	registry = rw;
	pthread_mutex_unlock(&chain_lock);
}

int
td_chain_detach(struct td_image *img, struct td_error *err)
{
	int rc;

	if (!img->drv->detach_parent)
		return td_error_set(err, ENOTSUP, "%s images cannot drop their parent here",
				    img->drv->name);
	pthread_mutex_lock(&chain_lock);
	rc = img->drv->detach_parent(img, err);
	if (rc == 0 && img->parent) {
		struct td_image *parent = img->parent;
		img->parent = NULL;
		chain_close_locked(parent);
	}
	pthread_mutex_unlock(&chain_lock);
	return rc;
}

unsigned
td_chain_depth(const struct td_image *leaf)
{
	unsigned n = 0;
	for (; leaf; leaf = leaf->parent)
		n++;
	return n;
}

/* Block status: resolve the extents a driver marked "ask the parent". */
static int
resolve_block_status(struct td_image *img, struct td_request *req)
{
	unsigned i;

	if (req->nr_extents && (req->extents[0].flags & TD_EXTENT_PARENT)) {
		/* a child larger than its parent: past the parent's end is zeros */
		if (img->parent && req->offset < img->parent->size) {
			req->length = req->extents[0].length;
			if (req->length > img->parent->size - req->offset)
				req->length = img->parent->size - req->offset;
			req->nr_extents = 0;
			td_image_submit(img->parent, req);
			return 1;
		}
		for (i = 0; i < req->nr_extents; i++)
			if (req->extents[i].flags & TD_EXTENT_PARENT)
				req->extents[i].flags = TD_EXTENT_HOLE | TD_EXTENT_ZERO;
		return 0;
	}
	for (i = 0; i < req->nr_extents; i++)
		if (req->extents[i].flags & TD_EXTENT_PARENT)
			break;
	req->nr_extents = i;
	return 0;
}

static int
op_is_write(enum td_op op)
{
	return op != TD_OP_READ && op != TD_OP_BLOCK_STATUS && op != TD_OP_CACHE;
}

/*
 * The chain's side of every call into a driver, as nbdkit's backend wraps
 * each layer: td_image_submit counts the request and hands it to img's
 * driver; the driver ends it with td_request_done, which counts a failure,
 * sends what block status left to the parent, and only then calls the
 * submitter's done. req->done is never replaced on the way.
 */
void
td_image_submit(struct td_image *img, struct td_request *req)
{
	img->stats.hits[op_is_write(req->op)]++;
	req->img = img;
	req->nr_extents = 0;
	img->drv->submit(img, req);
}

void
td_request_done(struct td_request *req, int err)
{
	struct td_image *img = req->img;

	if (!err && req->op == TD_OP_BLOCK_STATUS && !(req->flags & TD_REQ_ONE_IMAGE) &&
	    !(req->stop_at && img->parent == req->stop_at) && resolve_block_status(img, req))
		return;
	if (err)
		img->stats.fail[op_is_write(req->op)]++;
	req->done(req, err);
}

static void
complete_deferred(struct io_defer *d)
{
	struct td_request *req = d->arg;
	td_request_done(req, req->deferred_err);
}

void
td_complete_later(struct td_image *img, struct td_request *req, int err)
{
	req->img = img;		/* a driver's own sub-request was never submitted */
	req->deferred_err = err;
	req->defer.fn = complete_deferred;
	req->defer.arg = req;
	io_defer(img->io, &req->defer);
}

void
td_image_read_parent(struct td_image *img, struct td_request *req)
{
	/* whole (the parent's driver ends it for img's) or a driver's sub-request */
	if (img->parent) {
		td_image_submit(img->parent, req);
		return;
	}
	td_iov_zero(req->iov, req->iovcnt);
	td_complete_later(img, req, 0);
}

void
td_image_read_parent_range(struct td_image *img, struct td_request *req,
			   struct td_request *sub, uint64_t off, uint64_t len,
			   struct iovec *iov, int iovcnt,
			   void (*done)(struct td_request *sub, int err))
{
	uint64_t psize = img->parent ? img->parent->size : 0;
	uint64_t keep = off < psize ? (len < psize - off ? len : psize - off) : 0;

	sub->done = done;
	if (keep < len)		/* a child grown past its parent: the tail reads as zeros */
		iovcnt = td_iov_zero_tail(iov, iovcnt, keep);
	if (!keep) {
		td_complete_later(img, sub, 0);
		return;
	}
	sub->op = TD_OP_READ;
	sub->flags = 0;
	sub->offset = off;
	sub->length = keep;
	sub->iov = iov;
	sub->iovcnt = iovcnt;
	td_req_lend(req, sub, td_chain_scratch_size(img->parent));
	td_image_read_parent(img, sub);
}

/* The entries td_req_iov needs, in *out (inl, or a new array). */
static int
req_iov_fill(const struct td_request *req, uint64_t off, uint64_t len, const void *zeros,
	     size_t zeros_len, struct iovec *inl, int ninl, struct iovec **out)
{
	int n;

	*out = inl;
	if (zeros) {
		n = (int)((len + zeros_len - 1) / zeros_len);
		if (n > ninl && !(*out = calloc((size_t)n, sizeof(**out))))
			return -ENOMEM;
		for (int i = 0; i < n; i++) {
			(*out)[i].iov_base = (void *)(uintptr_t)zeros;
			(*out)[i].iov_len = len > zeros_len ? zeros_len : len;
			len -= (*out)[i].iov_len;
		}
		return n;
	}
	n = td_iov_slice(req->iov, req->iovcnt, off - req->offset, len, inl, ninl);
	if (n >= 0)
		return n;
	if (!(*out = calloc((size_t)req->iovcnt, sizeof(**out))))
		return -ENOMEM;
	return td_iov_slice(req->iov, req->iovcnt, off - req->offset, len, *out, req->iovcnt);
}

int
td_req_iov(const struct td_request *req, uint64_t off, uint64_t len, const void *zeros,
	   size_t zeros_len, struct iovec *inl, int ninl, struct iovec **iov, int *iovcnt)
{
	if (*iov && *iov != inl)
		free(*iov);
	int n = req_iov_fill(req, off, len, zeros, zeros_len, inl, ninl, iov);
	if (n < 0) {
		*iov = NULL;
		return n;
	}
	*iovcnt = n;
	return 0;
}

int
td_extent_add(struct td_request *req, uint64_t len, uint32_t flags)
{
	if (req->nr_extents && req->extents[req->nr_extents - 1].flags == flags) {
		req->extents[req->nr_extents - 1].length += len;
		return 1;
	}
	if (req->nr_extents == req->max_extents)
		return 0;
	req->extents[req->nr_extents].length = len;
	req->extents[req->nr_extents].flags = flags;
	req->nr_extents++;
	return 1;
}

int
td_iov_slice(const struct iovec *iov, int iovcnt, uint64_t skip, uint64_t len,
	     struct iovec *out, int max)
{
	int n = 0;
	for (int i = 0; i < iovcnt && len; i++) {
		if (skip >= iov[i].iov_len) {
			skip -= iov[i].iov_len;
			continue;
		}
		if (n == max)
			return -1;
		uint64_t take = iov[i].iov_len - skip;
		if (take > len)
			take = len;
		out[n].iov_base = (char *)iov[i].iov_base + skip;
		out[n].iov_len = take;
		n++;
		len -= take;
		skip = 0;
	}
	return n;
}

int
td_iov_zero_tail(struct iovec *iov, int iovcnt, uint64_t keep)
{
	uint64_t pos = 0;
	for (int i = 0; i < iovcnt; i++) {
		uint64_t l = iov[i].iov_len;
		if (pos + l > keep) {
			uint64_t from = keep > pos ? keep - pos : 0;
			memset((char *)iov[i].iov_base + from, 0, l - from);
		}
		pos += l;
	}
	return td_iov_slice(iov, iovcnt, 0, keep, iov, iovcnt);
}

void
td_iov_zero(const struct iovec *iov, int iovcnt)
{
	for (int i = 0; i < iovcnt; i++)
		memset(iov[i].iov_base, 0, iov[i].iov_len);
}

uint64_t
td_iov_length(const struct iovec *iov, int iovcnt)
{
	uint64_t n = 0;
	for (int i = 0; i < iovcnt; i++)
		n += iov[i].iov_len;
	return n;
}

#define TD_SCRATCH_MAX 4096	/* a deep chain's requests fall back to the heap */

/* size bytes of req's scratch (16-aligned), or NULL when there is no room left. */
static void *
scratch_take(struct td_request *req, size_t size)
{
	size_t at = (req->scratch_used + 15) & ~(size_t)15;

	if (!req->scratch || at > req->scratch_size || size > req->scratch_size - at)
		return NULL;
	req->scratch_used = at + size;
	return (char *)req->scratch + at;
}

void *
td_req_alloc(struct td_request *req, size_t size)
{
	void *p = scratch_take(req, size);

	if (!p)
		return calloc(1, size);
	memset(p, 0, size);
	return p;
}

void
td_req_free(struct td_request *req, void *p)
{
	if (req->scratch && (char *)p >= (char *)req->scratch &&
	    (char *)p < (char *)req->scratch + req->scratch_size)
		return;
	free(p);
}

void
td_req_lend(struct td_request *req, struct td_request *sub, size_t size)
{
	sub->scratch = size ? scratch_take(req, size) : NULL;
	sub->scratch_size = sub->scratch ? size : 0;
	sub->scratch_used = 0;
}

size_t
td_chain_scratch_size(const struct td_image *leaf)
{
	size_t n = 0;
	for (const struct td_image *img = leaf; img; img = img->parent)
		n += (img->drv->ctx_size + 15) & ~(size_t)15;
	return n < TD_SCRATCH_MAX ? n : TD_SCRATCH_MAX;
}

struct td_pieces *
td_pieces_new(struct td_image *img, struct td_request *req, size_t priv_size)
{
	size_t head = TD_CTX_SIZE(struct td_pieces);
	struct td_pieces *ps = td_req_alloc(req, head + priv_size);

	if (ps) {
		ps->req = req;
		ps->img = img;
		ps->pending = 1;
		ps->priv = priv_size ? (char *)ps + head : NULL;
	}
	return ps;
}

/* The last piece is done: the driver's last step, or the completion (later: in submit). */
static void
pieces_last(struct td_pieces *ps, int later)
{
	struct td_request *req = ps->req;
	struct td_image *img = ps->img;
	int err = ps->err;

	if (ps->last && ps->last(ps))
		return;		/* it ends with td_pieces_end */
	td_req_free(req, ps);
	if (later)
		td_complete_later(img, req, err);
	else
		td_request_done(req, err);
}

void
td_pieces_done(struct td_pieces *ps, int err)
{
	if (err && !ps->err)
		ps->err = err;
	if (--ps->pending == 0)
		pieces_last(ps, 0);
}

void
td_pieces_done_later(struct td_pieces *ps, int err)
{
	if (err && !ps->err)
		ps->err = err;
	if (--ps->pending == 0)
		pieces_last(ps, 1);
}

void
td_pieces_issued(struct td_pieces *ps)
{
	/* every piece may be done already (zeros, cached data): not from inside submit */
	if (--ps->pending == 0)
		pieces_last(ps, 1);
}

void
td_pieces_end(struct td_pieces *ps, int err)
{
	struct td_request *req = ps->req;

	td_req_free(req, ps);
	td_request_done(req, err);
}
