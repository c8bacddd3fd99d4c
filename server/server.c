/*
 * The vbd table, the frontend kinds, and opening a vbd for every frontend.
 * (server_new.c builds the server.)
 */
#include "server.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fdlimit.h"
#include "log.h"
#include "service_notify.h"

struct vbd *
server_vbd(struct server *srv, int minor)
{
	if (minor < 0 || minor >= SERVER_MAX_MINORS)
		return NULL;
	return srv->minors[minor];
}

int
server_free_minor(struct server *srv)
{
	for (int m = 0; m < SERVER_MAX_MINORS; m++)
		if (!srv->minors[m])
			return m;
	return -1;
}

unsigned
server_vbd_count(struct server *srv)
{
	unsigned n = 0;
	for (int m = 0; m < SERVER_MAX_MINORS; m++)
		if (srv->minors[m] && srv->minors[m]->params)
			n++;
	return n;
}

void
server_vbds_changed(struct server *srv)
{
	service_notify_status(server_vbd_count(srv));
}

json_t *
server_stats_json(struct server *srv)
{
	json_t *vbds = json_array();

	for (int m = 0; m < SERVER_MAX_MINORS; m++)
		if (srv->minors[m] && srv->minors[m]->params)
			json_array_append_new(vbds, vbd_stats_json(srv->minors[m]));
	return json_pack("{s:o}", "vbds", vbds);
}

int
server_frontend_register(struct server *srv, const struct frontend_class *cls, void *state)
{
	if (srv->nr_frontends == SERVER_MAX_FRONTENDS)
		return -ENOSPC;
	srv->frontends[srv->nr_frontends++] = (struct server_frontend){ cls, state };
	return 0;
}

struct open_ctx {
	struct server *srv;
	int minor;
	int code;		/* why a frontend could not serve it */
	vbd_done_fn done;
	void *arg;
	char err[256];
};

static void
open_close_done(void *arg, int err, const char *msg)
{
	struct open_ctx *oc = arg;
	(void)err;
	(void)msg;
	oc->done(oc->arg, oc->code, oc->err);
	free(oc);
}

static void
open_done(void *arg, int err, const char *msg)
{
	struct open_ctx *oc = arg;
	struct vbd *vbd;
	int rc;

	if (err) {
		oc->done(oc->arg, err, msg);
		free(oc);
		return;
	}
	vbd = oc->srv->minors[oc->minor];
	rc = 0;
	for (unsigned i = 0; rc == 0 && i < oc->srv->nr_frontends; i++) {
		const struct server_frontend *f = &oc->srv->frontends[i];
		if (f->cls->vbd_opened)
			rc = f->cls->vbd_opened(f->state, vbd, oc->err, sizeof(oc->err));
	}
	if (rc < 0) {
		oc->code = -rc;
		if (oc->code == EMFILE || oc->code == ENFILE)
			fdlimit_message(oc->err, sizeof(oc->err), vbd->params);
		/* nothing left behind: the vbd goes again */
		log_err("minor %d: %s", oc->minor, oc->err);
		vbd_close(vbd, 0, 1, open_close_done, oc);
		return;
	}
	oc->done(oc->arg, 0, NULL);
	free(oc);
}

int
server_open_vbd(struct server *srv, int minor, const char *params, unsigned flags,
		vbd_done_fn done, void *arg)
{
	struct open_ctx *oc = calloc(1, sizeof(*oc));
	int rc;

	if (fdlimit_check_open() < 0) {
		free(oc);
		return -EMFILE;
	}
	if (!oc)
		return -ENOMEM;
	oc->srv = srv;
	oc->minor = minor;
	oc->done = done;
	oc->arg = arg;
	rc = vbd_open(srv, minor, params, flags, open_done, oc);
	if (rc < 0)
		free(oc);
	return rc;
}
