/*
 * rbd: an image in a Ceph cluster, through librbd's C API: params
 * `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=USER]` (rbd_params.c).
 * This file owns the cluster connection of each image (one rados client per
 * image), its open and close, the requests on librbd's asynchronous calls,
 * block status, the exclusive lock of a writer and the snapshot hook.
 *
 * Threads: connecting (rados_connect, rbd_open, the lock) and closing run
 * on a worker, as every open does. Requests are issued on the loop with
 * rbd_aio_* and a completion without a callback; librbd's own threads
 * (messenger, finisher) write the image's eventfd (rbd_set_image_notification)
 * when one is done, and the loop, watching that fd while requests are out,
 * collects them with rbd_poll_io_events. Block status (rbd_diff_iterate2,
 * synchronous) runs on a worker.
 *
 * A cluster that goes away: librados is given the vbd's timeout as its op
 * timeouts, so a request fails (ETIMEDOUT, answered EIO) when the vbd's own
 * watchdog would answer it; close lowers the op timeout first (rbdi_free),
 * so it takes seconds, not three times the vbd's timeout.
 */
#include "driver.h"
#include "rbd_params.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/event.h>
#include <rados/librados.h>
#include <rbd/librbd.h>

#include "log.h"

#define RBD_DEFAULT_TIMEOUT	30	/* seconds, when no vbd timeout reaches us */
#define RBD_CONNECT_MAX		30	/* an open never waits for the monitors longer */
#define RBD_POLL_BATCH		32
#define RBD_CLOSE_TIMEOUT	5	/* seconds an op of close may take (see rbdi_free) */

struct rbdi {
	struct td_image *img;
	rados_t cluster;
	rados_ioctx_t io;
	rbd_image_t image;
	char *name;		/* pool/[ns/]image[@snap], for messages */
	int efd;		/* librbd's completions are told here */
	struct event_base *base;
	/* made at the first request on the loop; added only while requests are out */
	struct event *ev;
	unsigned inflight;	/* librbd completions out */
	unsigned timeout;	/* the client's op timeout, seconds */
	uint64_t obj_size;	/* whole objects can be dropped; 0: striped, never split */
	int failing;		/* the cluster stopped answering: said once until it answers */
};

/* A request's librbd completions (write-zeroes may take three): each one's arg. */
struct rbd_op {
	struct td_request *req;
	int pending, err;
};

/* Block status on a worker. */
struct rbd_bs {
	struct io_call call;
	struct rbdi *p;
	struct td_request *req;
	uint64_t cursor, end;
};

/* What the request's scratch holds: one or the other. */
union rbd_ctx {
	struct rbd_op op;
	struct rbd_bs bs;
};

/* ---- connecting (workers) ---- */

static unsigned
op_timeout(unsigned vbd_timeout)
{
	return vbd_timeout ? vbd_timeout : RBD_DEFAULT_TIMEOUT;
}

static int
conf_set(rados_t c, const char *key, unsigned val)
{
	char v[16];
	snprintf(v, sizeof(v), "%u", val);
	return rados_conf_set(c, key, v);
}

static void
disconnect(rados_t cluster, rados_ioctx_t io)
{
	if (io)
		rados_ioctx_destroy(io);
	if (cluster)
		rados_shutdown(cluster);
}

/* A client of the cluster in spec's conf, connected, with an ioctx on the pool. */
static int
rbd_connect(const struct rbd_spec *spec, const char *name, unsigned timeout, rados_t *cluster,
	    rados_ioctx_t *io, struct td_error *err)
{
	const char *conf = spec->conf ? spec->conf :
			   getenv("CEPH_CONF") ? getenv("CEPH_CONF") : "/etc/ceph/ceph.conf";
	unsigned t = op_timeout(timeout);
	int rc;

	*cluster = NULL;
	*io = NULL;
	if ((rc = rados_create(cluster, spec->id)) < 0) {
		*cluster = NULL;
		return td_error_set(err, -rc, "rbd: %s: cannot make a cluster handle: %s", name,
				    strerror(-rc));
	}
	if ((rc = rados_conf_read_file(*cluster, conf)) < 0) {
		td_error_set(err, -rc, "rbd: %s: cannot read the Ceph configuration %s: %s", name,
			     conf, strerror(-rc));
		goto fail;
	}
	/*
	 * Bounded waits: the monitors at connect, then every monitor and OSD
	 * op (a vanished cluster fails requests instead of keeping them).
	 * No librbd cache: a write is durable when it completes, as a flush
	 * or FUA promises, and two hosts never see stale bytes. A discard
	 * reads as zeros after it, as with every other driver: partial
	 * objects are zeroed, not skipped (librbd skips them by default).
	 */
	if ((rc = conf_set(*cluster, "client_mount_timeout", t < RBD_CONNECT_MAX ? t :
			   RBD_CONNECT_MAX)) < 0 ||
	    (rc = conf_set(*cluster, "rados_mon_op_timeout", t)) < 0 ||
	    (rc = conf_set(*cluster, "rados_osd_op_timeout", t)) < 0 ||
	    (rc = rados_conf_set(*cluster, "rbd_cache", "false")) < 0 ||
	    (rc = rados_conf_set(*cluster, "rbd_skip_partial_discard", "false")) < 0) {
		td_error_set(err, -rc, "rbd: %s: cannot configure the client: %s", name,
			     strerror(-rc));
		goto fail;
	}
	if ((rc = rados_connect(*cluster)) < 0) {
		td_error_set(err, -rc == ETIMEDOUT ? EHOSTUNREACH : -rc,
			     "rbd: %s: cannot reach the cluster's monitors (%s) within %us: %s",
			     name, conf, t < RBD_CONNECT_MAX ? t : RBD_CONNECT_MAX, strerror(-rc));
		goto fail;
	}
	if ((rc = rados_ioctx_create(*cluster, spec->pool, io)) < 0) {
		*io = NULL;
		td_error_set(err, -rc, "rbd: %s: %s", name, rc == -ENOENT ?
			     "no such pool in the cluster" : strerror(-rc));
		goto fail;
	}
	if (spec->ns)
		rados_ioctx_set_namespace(*io, spec->ns);
	return 0;
fail:
	disconnect(*cluster, *io);
	*cluster = NULL;
	*io = NULL;
	return -err->code;
}

static char *
spec_name(const struct rbd_spec *s)
{
	char *n;
	if (asprintf(&n, "%s/%s%s%s%s%s", s->pool, s->ns ? s->ns : "", s->ns ? "/" : "",
		     s->image, s->snap ? "@" : "", s->snap ? s->snap : "") < 0)
		return NULL;
	return n;
}

/* EBUSY naming who holds the exclusive lock of an image we could not take. */
static void
lock_refused(struct rbdi *p, struct td_error *err)
{
	rbd_lock_mode_t mode;
	char *owners[8];
	size_t n = 8;
	char who[256] = "";

	if (rbd_lock_get_owners(p->image, &mode, owners, &n) == 0) {
		for (size_t i = 0; i < n; i++) {
			size_t len = strlen(who);
			snprintf(who + len, sizeof(who) - len, "%s%s", i ? ", " : "", owners[i]);
		}
		rbd_lock_get_owners_cleanup(owners, n);
	}
	td_error_set(err, EBUSY, "rbd: %s is being written by another client (%s holds "
			    "its exclusive lock): open it read-only (-R) or close it there first",
			    p->name, who[0] ? who : "an unknown owner");
}

static void
rbdi_free(struct rbdi *p)
{
	if (p->ev)
		event_free(p->ev);
	/*
	 * rbd_close releases a writer's lock and the image's watch: OSD ops,
	 * three in a row that each wait the whole op timeout when the cluster
	 * is gone (9 s at -t 3, 6 minutes at the default 120). librados takes
	 * a new op timeout at run time, so close waits less: 1 s an op when
	 * requests already time out, 5 s otherwise (a healthy cluster answers
	 * in milliseconds; a lock left behind is broken by its next taker,
	 * once our client is gone).
	 */
	if (p->cluster)
		conf_set(p->cluster, "rados_osd_op_timeout", p->failing ? 1 :
			 p->timeout < RBD_CLOSE_TIMEOUT ? p->timeout : RBD_CLOSE_TIMEOUT);
	if (p->image)
		rbd_close(p->image);
	disconnect(p->cluster, p->io);
	if (p->efd >= 0)
		close(p->efd);
	free(p->name);
	free(p);
}

static int
rbdi_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct rbd_spec spec;
	struct rbdi *p;
	int ro = (img->oflags & TD_OPEN_RDONLY) != 0, locked = 0;
	int rc;

	if ((rc = rbd_spec_parse(img->path, &spec, err)) < 0)
		return rc;
	if (!(p = calloc(1, sizeof(*p))) || !(p->name = spec_name(&spec))) {
		free(p);
		rbd_spec_free(&spec);
		return td_error_set(err, ENOMEM, "out of memory");
	}
	p->efd = -1;
	p->img = img;
	p->base = io_engine_base(ctx->io);
	if (spec.snap && !ro) {
		rc = td_error_set(err, EROFS, "rbd: %s is a snapshot, which is read-only: open it "
				  "with -R", p->name);
		goto fail;
	}
	p->timeout = op_timeout(ctx->timeout);
	if ((rc = rbd_connect(&spec, p->name, ctx->timeout, &p->cluster, &p->io, err)) < 0)
		goto fail;
	rc = ro ? rbd_open_read_only(p->io, spec.image, &p->image, spec.snap) :
		  rbd_open(p->io, spec.image, &p->image, NULL);
	if (rc < 0) {
		p->image = NULL;
		td_error_set(err, -rc, "rbd: %s: %s", p->name, rc != -ENOENT ? strerror(-rc) :
			     spec.snap ? "no such image or snapshot" : "no such image in the pool");
		goto fail;
	}
	if (!ro) {
		uint64_t features = 0;
		rbd_get_features(p->image, &features);
		if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK))
			log_warn("rbd: %s has no exclusive-lock feature: nothing stops a second "
				 "writer (rbd feature enable %s exclusive-lock)", p->name, p->name);
		else if ((rc = rbd_lock_acquire(p->image, RBD_LOCK_MODE_EXCLUSIVE)) < 0) {
			/* EROFS: another client holds it and will not let it go */
			if (rc == -EROFS || rc == -EBUSY)
				lock_refused(p, err);
			else
				td_error_set(err, -rc, "rbd: %s: cannot take the exclusive lock: %s",
					     p->name, strerror(-rc));
			goto fail;
		} else {
			locked = 1;
		}
	}
	uint64_t size;
	if ((rc = rbd_get_size(p->image, &size)) < 0) {
		td_error_set(err, -rc, "rbd: %s: no size: %s", p->name, strerror(-rc));
		goto fail;
	}
	rbd_image_info_t info;
	uint64_t stripe_count = 1;
	if (rbd_stat(p->image, &info, sizeof(info)) == 0 &&
	    rbd_get_stripe_count(p->image, &stripe_count) == 0 && stripe_count == 1)
		p->obj_size = info.obj_size;
	p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (p->efd < 0) {
		rc = td_error_set(err, errno, "rbd: %s: eventfd: %s", p->name, strerror(errno));
		goto fail;
	}
	if ((rc = rbd_set_image_notification(p->image, p->efd, EVENT_TYPE_EVENTFD)) < 0) {
		td_error_set(err, -rc, "rbd: %s: cannot have completions told: %s", p->name,
			     strerror(-rc));
		goto fail;
	}
	img->size = size;
	img->sector_size = 512;
	img->min_io = 1;
	img->caps = TD_CAP_FLUSH | TD_CAP_DISCARD | TD_CAP_WRITE_ZEROES | TD_CAP_FAST_ZERO |
		    TD_CAP_BLOCK_STATUS;
	img->priv = p;
	img->status = "connected";
	rbd_spec_free(&spec);
	log_info("rbd: %s: open, %" PRIu64 " bytes%s", p->name, size, ro ? ", read-only" :
		 locked ? ", exclusive lock held" : "");
	return 0;
fail:
	rbd_spec_free(&spec);
	rc = -err->code;
	rbdi_free(p);
	return rc;
}

/* The chain drained: nothing is in flight, the event is not pending. */
static void
rbdi_close(struct td_image *img)
{
	struct rbdi *p = img->priv;

	if (!p)
		return;
	rbdi_free(p);
	img->priv = NULL;
}

/* ---- requests (the loop) ---- */

static int
rbd_errno(struct rbdi *p, int rc)
{
	if (rc >= 0)
		return 0;
	if (rc == -ETIMEDOUT || rc == -ESHUTDOWN || rc == -ENOTCONN) {
		/* ESHUTDOWN: librados's word for a client the cluster blocklisted */
		if (!p->failing)
			log_err("rbd: %s: the cluster does not answer (%s): requests fail with EIO",
				p->name, strerror(-rc));
		p->failing = 1;
		p->img->status = rc == -ESHUTDOWN ? "blocklisted by the cluster" :
				 "cluster not answering (requests time out)";
		return EIO;
	}
	return -rc;
}

static void
watch(struct rbdi *p, int on)
{
	if (on && !event_pending(p->ev, EV_READ, NULL))
		event_add(p->ev, NULL);
	else if (!on && event_pending(p->ev, EV_READ, NULL))
		event_del(p->ev);
}

static void
rbd_ready(evutil_socket_t fd, short what, void *arg)
{
	struct rbdi *p = arg;
	rbd_completion_t comps[RBD_POLL_BATCH];
	uint64_t n;
	int got;

	(void)what;
	/* read first: a completion after this writes the fd again */
	if (read(fd, &n, sizeof(n)) < 0 && errno != EAGAIN)
		log_warn("rbd: %s: eventfd: %s", p->name, strerror(errno));
	while ((got = rbd_poll_io_events(p->image, comps, RBD_POLL_BATCH)) > 0) {
		for (int i = 0; i < got; i++) {
			struct rbd_op *op = rbd_aio_get_arg(comps[i]);
			struct td_request *req = op->req;
			ssize_t rc = rbd_aio_get_return_value(comps[i]);
			int err;

			rbd_aio_release(comps[i]);
			p->inflight--;
			err = rbd_errno(p, rc < 0 ? (int)rc : 0);
			/* a flush with no cache never reaches the cluster: proves nothing */
			if (!err && p->failing && req->op != TD_OP_FLUSH) {
				log_info("rbd: %s: the cluster answers again", p->name);
				p->failing = 0;
				p->img->status = "connected";
			}
			if (!err && req->op == TD_OP_READ && (uint64_t)rc < req->length)
				td_iov_zero_tail(req->iov, req->iovcnt, (uint64_t)rc);
			if (err && !op->err)
				op->err = err;
			if (--op->pending == 0) {
				err = op->err;
				td_req_free(req, op);
				td_request_done(req, err);
			}
		}
	}
	if (!p->inflight)
		watch(p, 0);
}

static int
bs_extent(struct rbd_bs *b, uint64_t len, uint32_t flags)
{
	if (!len)
		return 1;
	if (!td_extent_add(b->req, len, flags))
		return 0;
	b->cursor += len;
	return 1;
}

#define BS_FULL (-ECANCELED)	/* stops the iteration: the request's extents are full */

static int
bs_seen(uint64_t off, size_t len, int exists, void *arg)
{
	struct rbd_bs *b = arg;
	uint64_t end = off + len;

	if (end > b->end)
		end = b->end;
	if (off < b->cursor)
		off = b->cursor;
	if (end <= off)
		return 0;
	if (!bs_extent(b, off - b->cursor, TD_EXTENT_HOLE | TD_EXTENT_ZERO) ||
	    !bs_extent(b, end - off, exists ? 0 : TD_EXTENT_HOLE | TD_EXTENT_ZERO))
		return BS_FULL;
	return 0;
}

/* Worker: allocated objects in the range, from the object map where there is one. */
static int
bs_run(struct io_call *c)
{
	struct rbd_bs *b = (struct rbd_bs *)c;
	struct td_request *req = b->req;
	int rc;

	b->cursor = req->offset;
	b->end = req->offset + req->length;
	req->nr_extents = 0;
	rc = rbd_diff_iterate2(b->p->image, NULL, req->offset, req->length, 1, 1, bs_seen, b);
	if (rc == BS_FULL)
		return 0;	/* what follows is the next request's (a hole here could merge over data) */
	if (rc < 0)
		return rc;
	if (b->cursor < b->end)
		bs_extent(b, b->end - b->cursor, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
	return 0;
}

static void
bs_done(struct io_call *c, int res)
{
	struct rbd_bs *b = (struct rbd_bs *)c;
	struct td_request *req = b->req;
	struct rbdi *p = b->p;
	int err = rbd_errno(p, res);

	if (!err && !req->nr_extents)
		err = EIO;	/* cannot be: a range always gets one extent */
	td_req_free(req, b);
	td_request_done(req, err);
}

enum rbd_call { RBD_READ, RBD_WRITE, RBD_FLUSH, RBD_DISCARD, RBD_ZERO };

/* One librbd call for op; one refused at once sets op->err. */
static void
issue(struct rbdi *p, struct rbd_op *op, enum rbd_call call, uint64_t off, uint64_t len,
      int zero_flags)
{
	struct td_request *req = op->req;
	rbd_completion_t c;
	int rc;

	if ((rc = rbd_aio_create_completion(op, NULL, &c)) < 0) {
		op->err = op->err ? op->err : -rc;
		return;
	}
	switch (call) {
	case RBD_READ:
		rc = rbd_aio_readv(p->image, req->iov, req->iovcnt, off, c);
		break;
	case RBD_WRITE:
		rc = rbd_aio_writev(p->image, req->iov, req->iovcnt, off, c);
		break;
	case RBD_FLUSH:
		rc = rbd_aio_flush(p->image, c);
		break;
	case RBD_DISCARD:
		rc = rbd_aio_discard(p->image, off, len, c);
		break;
	case RBD_ZERO:
		rc = rbd_aio_write_zeroes(p->image, off, len, c, zero_flags, 0);
		break;
	}
	if (rc < 0) {
		rbd_aio_release(c);
		op->err = op->err ? op->err : rbd_errno(p, rc);
		return;
	}
	op->pending++;
	p->inflight++;
	watch(p, 1);
}

static void
rbdi_submit(struct td_image *img, struct td_request *req)
{
	struct rbdi *p = img->priv;
	if (req->op == TD_OP_BLOCK_STATUS) {
		struct rbd_bs *b = td_req_alloc(req, sizeof(*b));
		if (!b) {
			td_complete_later(img, req, ENOMEM);
			return;
		}
		b->p = p;
		b->req = req;
		b->call.fn = bs_run;
		b->call.done = bs_done;
		io_call(img->io, &b->call);
		return;
	}
	if (req->op == TD_OP_CACHE || (req->op == TD_OP_WRITE_ZEROES &&
	    (req->flags & TD_REQ_NO_HOLE) && (req->flags & TD_REQ_FAST_ZERO))) {
		/* no cache op; thick zeroes are written, not fast */
		td_complete_later(img, req, ENOTSUP);
		return;
	}
	if (!p->ev && !(p->ev = event_new(p->base, p->efd, EV_READ | EV_PERSIST, rbd_ready, p))) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	struct rbd_op *op = td_req_alloc(req, sizeof(*op));
	if (!op) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	op->req = req;
	op->pending = 1;	/* while submit issues */
	if (req->op == TD_OP_WRITE_ZEROES && !(req->flags & TD_REQ_NO_HOLE) && p->obj_size) {
		/*
		 * librbd's write-zeroes keeps whole objects (zeroed); a discard
		 * of a whole object removes it, and it reads as zeros: the
		 * objects inside the range are discarded, the ends zeroed.
		 */
		uint64_t o = p->obj_size, end = req->offset + req->length;
		uint64_t a = (req->offset + o - 1) / o * o, b = end / o * o;
		if (a < b) {
			if (req->offset < a)
				issue(p, op, RBD_ZERO, req->offset, a - req->offset, 0);
			issue(p, op, RBD_DISCARD, a, b - a, 0);
			if (b < end)
				issue(p, op, RBD_ZERO, b, end - b, 0);
			goto issued;
		}
	}
	switch (req->op) {
	case TD_OP_READ:
		issue(p, op, RBD_READ, req->offset, req->length, 0);
		break;
	case TD_OP_WRITE:
		/* no cache: a completed write is on every replica, FUA or not */
		issue(p, op, RBD_WRITE, req->offset, req->length, 0);
		break;
	case TD_OP_FLUSH:
		issue(p, op, RBD_FLUSH, 0, 0, 0);
		break;
	case TD_OP_DISCARD:
		issue(p, op, RBD_DISCARD, req->offset, req->length, 0);
		break;
	case TD_OP_WRITE_ZEROES:
		issue(p, op, RBD_ZERO, req->offset, req->length, (req->flags & TD_REQ_NO_HOLE) ?
		      RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0);
		break;
	default:
		op->err = ENOTSUP;
		break;
	}
issued:
	if (--op->pending == 0) {	/* every call refused at once */
		int err = op->err;
		td_req_free(req, op);
		td_complete_later(img, req, err);
	}
}

/* ---- snapshot (a worker, the vbd paused and this image closed) ---- */

static int
rbdi_snapshot(const char *path, const char *snap, unsigned timeout, char **snap_params,
	      struct td_error *err)
{
	struct rbd_spec spec;
	rados_t cluster;
	rados_ioctx_t io;
	rbd_image_t image;
	char *name;
	int rc;

	if ((rc = rbd_snap_name_check(snap, err)) < 0)
		return rc;
	if ((rc = rbd_spec_parse(path, &spec, err)) < 0)
		return rc;
	if (spec.snap || !(name = spec_name(&spec))) {
		rc = spec.snap ? td_error_set(err, EROFS, "rbd: a snapshot cannot be snapshotted") :
				 td_error_set(err, ENOMEM, "out of memory");
		rbd_spec_free(&spec);
		return rc;
	}
	if ((rc = rbd_connect(&spec, name, timeout, &cluster, &io, err)) < 0)
		goto out;
	if ((rc = rbd_open(io, spec.image, &image, NULL)) < 0) {
		rc = td_error_set(err, -rc, "rbd: %s: %s", name, strerror(-rc));
	} else {
		if ((rc = rbd_snap_create(image, snap)) < 0)
			rc = td_error_set(err, -rc, "rbd: %s: cannot make snapshot '%s': %s", name,
					  snap, rc == -EEXIST ? "there is one of that name" :
					  strerror(-rc));
		rbd_close(image);
	}
	disconnect(cluster, io);
	if (rc == 0) {
		/* path is what followed "rbd:": the snapshot goes before the options */
		size_t at = strcspn(path, ":");
		if (asprintf(snap_params, "rbd:%.*s@%s%s", (int)at, path, snap, path + at) < 0) {
			*snap_params = NULL;
			rc = td_error_set(err, ENOMEM, "out of memory");
		}
	}
out:
	free(name);
	rbd_spec_free(&spec);
	return rc;
}

const struct td_driver td_driver_rbd = {
	.name = "rbd",
	.flags = TD_DRV_URI,
	.ctx_size = TD_CTX_SIZE(union rbd_ctx),
	.open = rbdi_open,
	.close = rbdi_close,
	.submit = rbdi_submit,
	.snapshot = rbdi_snapshot,
};
