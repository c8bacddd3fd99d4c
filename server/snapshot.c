/*
 * Live snapshot of a vbd: pause (I/O waits, clients stay), create a new leaf
 * on top of the current one (the driver's create_child, on a worker
 * thread), and unpause onto it. If the new leaf cannot be made, or made
 * but not opened (it is removed again), the vbd resumes on the old one.
 * A driver that keeps snapshots inside the image (its snapshot op: rbd:)
 * makes one there while paused instead, and the vbd resumes on the same
 * params.
 */
#include "snapshot.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io.h"
#include "io_record.h"
#include "log.h"
#include "loop.h"
#include "server.h"

struct snap {
	struct io_call call;
	struct vbd *vbd;
	const struct td_driver *drv;
	char *leaf_path, *new_path, *new_params;
	char *cbt_log;		/* tracking moves to this log with the new leaf, or NULL */
	int inside;		/* drv->snapshot: new_path is the snapshot's name */
	char *snap_params;	/* inside: what opens the snapshot made */
	struct td_error err;
	vbd_done_fn done;
	void *arg;
};

static void
snap_free(struct snap *s)
{
	free(s->leaf_path);
	free(s->new_path);
	free(s->new_params);
	free(s->cbt_log);
	free(s->snap_params);
	free(s);
}

static void
snap_resumed_after_failure(void *arg, int err, const char *msg)
{
	struct snap *s = arg;
	if (err)
		log_err("minor %d: snapshot failed and the vbd did not resume: %s",
			s->vbd->minor, msg ? msg : strerror(err));
	s->done(s->arg, s->err.code, s->err.msg);
	snap_free(s);
}

/* Worker: a new leaf nothing will use goes, so the snapshot can be tried again. */
static int
snap_remove_child(struct io_call *c)
{
	struct snap *s = (struct snap *)c;
	if (unlink(s->new_path) < 0)
		log_warn("minor %d: snapshot: cannot remove %s: %s", s->vbd->minor, s->new_path,
			 strerror(errno));
	return 0;
}

static void
snap_child_removed(struct io_call *c, int res)
{
	struct snap *s = (struct snap *)c;
	(void)res;
	vbd_unpause(s->vbd, NULL, NULL, snap_resumed_after_failure, s);
}

static void
snap_resumed(void *arg, int err, const char *msg)
{
	struct snap *s = arg;
	if (err && s->inside) {
		/* the snapshot is made; the image itself would not open again */
		s->done(s->arg, err, msg);
		snap_free(s);
		return;
	}
	if (err) {
		/* the child exists but would not open: remove it, back onto the old leaf */
		td_error_set(&s->err, err, "%s", msg ? msg : strerror(err));
		s->call.fn = snap_remove_child;
		s->call.done = snap_child_removed;
		io_call(s->vbd->loop->io, &s->call);
		return;
	}
	if (s->inside) {
		log_info("minor %d: snapshot: %s", s->vbd->minor, s->snap_params);
		s->done(s->arg, 0, s->snap_params);
		snap_free(s);
		return;
	}
	log_info("minor %d: snapshot: new leaf %s", s->vbd->minor, s->new_params);
	io_record_mark("snapshot %d %s", s->vbd->minor, s->new_params);
	s->done(s->arg, 0, NULL);
	snap_free(s);
}

static int
snap_create(struct io_call *c)
{
	struct snap *s = (struct snap *)c;
	if (s->inside)
		return s->drv->snapshot(s->leaf_path, s->new_path, s->vbd->timeout, &s->snap_params,
					&s->err);
	return s->drv->create_child(s->leaf_path, s->new_path, &s->new_params, &s->err);
}

static void
snap_created(struct io_call *c, int res)
{
	struct snap *s = (struct snap *)c;
	if (res < 0) {
		vbd_unpause(s->vbd, NULL, NULL, snap_resumed_after_failure, s);
		return;
	}
	/* inside: the same params (new_params NULL) */
	vbd_unpause(s->vbd, s->new_params, s->cbt_log, snap_resumed, s);
}

static void
snap_paused(void *arg, int err, const char *msg)
{
	struct snap *s = arg;
	if (err) {
		s->done(s->arg, err, msg);
		snap_free(s);
		return;
	}
	s->call.fn = snap_create;
	s->call.done = snap_created;
	io_call(s->vbd->loop->io, &s->call);
}

void
vbd_snapshot(struct vbd *vbd, const char *new_path, const char *cbt_log, vbd_done_fn done,
	     void *arg)
{
	const struct td_driver *drv;
	char *path = NULL;
	struct td_error err;
	struct snap *s;

	if (!vbd->params || vbd->state != 0) {
		done(arg, EBUSY, vbd->params ? "vbd is not running (paused, opening or closing)"
					     : "vbd is not open");
		return;
	}
	if (td_params_parse(vbd->params, &drv, &path, &err) < 0) {
		done(arg, err.code, err.msg);
		return;
	}
	if (!drv->create_child && !drv->snapshot) {
		free(path);
		done(arg, ENOTSUP, "this image type cannot be snapshotted");
		return;
	}
	if (!drv->snapshot && new_path[0] != '/') {
		free(path);
		done(arg, EINVAL, "the new leaf's path must be absolute");
		return;
	}
	s = calloc(1, sizeof(*s));
	if (!s || !(s->new_path = strdup(new_path)) ||
	    (cbt_log && !(s->cbt_log = strdup(cbt_log)))) {
		if (s)
			free(s->new_path);
		free(s);
		free(path);
		done(arg, ENOMEM, "out of memory");
		return;
	}
	s->vbd = vbd;
	s->drv = drv;
	s->inside = drv->snapshot != NULL;
	s->leaf_path = path;
	s->done = done;
	s->arg = arg;
	vbd_pause(vbd, snap_paused, s);
}

int
vbd_snapshot_inside(const struct vbd *vbd)
{
	const struct td_driver *drv;
	char *path = NULL;
	struct td_error err;

	if (!vbd->params || td_params_parse(vbd->params, &drv, &path, &err) < 0)
		return 0;
	free(path);
	return drv->snapshot != NULL;
}
