/*
 * The vbd table, placement on loops, the frontend kinds, opening a vbd for
 * every frontend, and the two ways work reaches a vbd on another loop: an
 * operation with a reply (server_vbd_op) and a gather over every vbd
 * (server_gather). (server_new.c builds the server.)
 */
#include "server.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fdlimit.h"
#include "log.h"
#include "loop.h"
#include "service_notify.h"

/* ---- the table ---- */

struct vbd *
server_vbd(struct server *srv, int minor)
{
	struct vbd *vbd;

	if (minor < 0 || minor >= SERVER_MAX_MINORS)
		return NULL;
	pthread_mutex_lock(&srv->lock);
	vbd = srv->minors[minor];
	pthread_mutex_unlock(&srv->lock);
	return vbd;
}

struct loop *
server_vbd_loop(struct server *srv, int minor)
{
	struct loop *l = NULL;

	if (minor < 0 || minor >= SERVER_MAX_MINORS)
		return NULL;
	pthread_mutex_lock(&srv->lock);
	if (srv->minors[minor])
		l = srv->minors[minor]->loop;	/* set before it is in the table, never changed */
	pthread_mutex_unlock(&srv->lock);
	return l;
}

int
server_minor_closed(struct server *srv, int minor)
{
	int closed;

	pthread_mutex_lock(&srv->lock);
	closed = !srv->minors[minor] && srv->closed[minor];
	pthread_mutex_unlock(&srv->lock);
	return closed;
}

int
server_free_minor(struct server *srv)
{
	int found = -1;
	unsigned end;

	pthread_mutex_lock(&srv->lock);
	end = srv->minor_end;
	for (unsigned m = 0; m < end && found < 0; m++)
		if (!srv->minors[m] && !srv->closed[m])
			found = (int)m;
	if (found < 0 && end < SERVER_MAX_MINORS)
		found = (int)end;
	pthread_mutex_unlock(&srv->lock);
	return found;
}

/*
 * minor_end bounds every scan of the table (gathers, list, the lowest free
 * minor): 4096 slots scanned per list or stats cost more than the command
 * itself, and the fuzzers ran them by the million.
 */
void
server_minor_used_locked(struct server *srv, int minor)
{
	if ((unsigned)minor >= srv->minor_end)
		srv->minor_end = (unsigned)minor + 1;
}

void
server_minor_freed_locked(struct server *srv)
{
	unsigned end = srv->minor_end;

	while (end && !srv->minors[end - 1] && !srv->closed[end - 1])
		end--;
	srv->minor_end = end;
}

unsigned
server_vbd_count(struct server *srv)
{
	unsigned n;

	pthread_mutex_lock(&srv->lock);
	n = srv->nr_open;
	pthread_mutex_unlock(&srv->lock);
	return n;
}

unsigned
server_vbds_left(struct server *srv)
{
	unsigned n = 0;

	pthread_mutex_lock(&srv->lock);
	for (unsigned i = 0; i < srv->nr_loops; i++)
		n += srv->loops[i]->nr_vbds;
	pthread_mutex_unlock(&srv->lock);
	return n;
}

struct loop *
server_loop(struct server *srv, int index)
{
	return index >= 0 && (unsigned)index < srv->nr_loops ? srv->loops[index] : NULL;
}

struct loop *
server_place(struct server *srv)
{
	struct loop *best = srv->loops[0];

	pthread_mutex_lock(&srv->lock);
	for (unsigned i = 1; i < srv->nr_loops; i++)
		if (srv->loops[i]->nr_vbds < best->nr_vbds)
			best = srv->loops[i];
	pthread_mutex_unlock(&srv->lock);
	return best;
}

/* The service manager's STATUS follows the count; sent from loop 0 only. */
static void
notify_status(void *arg)
{
	service_notify_status(server_vbd_count(arg));
}

void
server_vbds_changed(struct server *srv)
{
	if (loop_current() == srv->loops[0])
		notify_status(srv);
	else if (loop_call(srv->loops[0], notify_status, srv) < 0)
		log_warn("out of memory: the service manager's status is not updated");
}

int
server_frontend_register(struct server *srv, const struct frontend_class *cls, void *state)
{
	if (srv->nr_frontends == SERVER_MAX_FRONTENDS)
		return -ENOSPC;
	srv->frontends[srv->nr_frontends++] = (struct server_frontend){ cls, state };
	return 0;
}

/* ---- opening ---- */

struct open_ctx {
	struct mailbox_msg msg;		/* the open, posted to the vbd's loop */
	struct server *srv;
	int minor;
	char *params;
	unsigned flags;
	unsigned timeout;	/* seconds, or 0: the default */
	char *cbt_log;
	int code;		/* why a frontend could not serve it */
	vbd_done_fn done;
	void *arg;
	char err[256];
};

static void
open_ctx_free(struct open_ctx *oc)
{
	free(oc->params);
	free(oc->cbt_log);
	free(oc);
}

static void
open_close_done(void *arg, int err, const char *msg)
{
	struct open_ctx *oc = arg;
	(void)err;
	(void)msg;
	oc->done(oc->arg, oc->code, oc->err);
	open_ctx_free(oc);
}

static void
open_done(void *arg, int err, const char *msg)
{
	struct open_ctx *oc = arg;
	struct vbd *vbd;
	int rc;

	if (err) {
		oc->done(oc->arg, err, msg);
		open_ctx_free(oc);
		return;
	}
	vbd = server_vbd(oc->srv, oc->minor);
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
	open_ctx_free(oc);
}

/* On the vbd's loop: the chain opens. */
static void
open_on_loop(struct mailbox_msg *m)
{
	struct open_ctx *oc = (struct open_ctx *)m;
	struct vbd *vbd = server_vbd(oc->srv, oc->minor);

	if (oc->timeout)
		vbd_set_timeout(vbd, oc->timeout);
	if (oc->cbt_log && vbd_set_cbt_log(vbd, oc->cbt_log) < 0) {
		vbd_open(vbd, "", 0, open_done, oc);	/* fails, and takes the vbd out */
		return;
	}
	vbd_open(vbd, oc->params, oc->flags, open_done, oc);
}

int
server_open_vbd(struct server *srv, int minor, struct loop *loop, const char *params,
		const struct vbd_open_opts *opts, vbd_done_fn done, void *arg)
{
	static const struct vbd_open_opts defaults;
	struct open_ctx *oc;
	struct vbd *vbd;

	if (fdlimit_check_open() < 0)
		return -EMFILE;
	if (!opts)
		opts = &defaults;
	if (!(oc = calloc(1, sizeof(*oc))) || !(oc->params = strdup(params)) ||
	    (opts->cbt_log && !(oc->cbt_log = strdup(opts->cbt_log)))) {
		if (oc)
			free(oc->params);
		free(oc);
		return -ENOMEM;
	}
	if (!loop)
		loop = server_place(srv);
	/* in the table now (minor taken, counted on its loop); opened there */
	int rc = vbd_new(srv, minor, loop, &vbd);
	if (rc < 0) {
		open_ctx_free(oc);
		return rc;
	}
	oc->srv = srv;
	oc->minor = minor;
	oc->flags = opts->flags;
	oc->timeout = opts->timeout;
	oc->done = done;
	oc->arg = arg;
	oc->msg.fn = open_on_loop;
	loop_post(loop, &oc->msg);
	return 0;
}

/* ---- an operation on a vbd's loop ---- */

struct vbd_op {
	struct mailbox_msg msg;
	struct server *srv;
	struct loop *home;	/* where done runs */
	int minor;
	server_vbd_op_fn op;
	void *op_arg;
	vbd_done_fn done;
	void *arg;
	int err;
	char text[256];
	int has_text;
};

static void
vbd_op_reply(struct mailbox_msg *m)
{
	struct vbd_op *o = (struct vbd_op *)m;

	o->done(o->arg, o->err, o->has_text ? o->text : NULL);
	free(o);
}

static void
vbd_op_done(void *arg, int err, const char *msg)
{
	struct vbd_op *o = arg;

	o->err = err;
	o->has_text = msg != NULL;
	if (msg)
		snprintf(o->text, sizeof(o->text), "%s", msg);
	o->msg.fn = vbd_op_reply;
	loop_post(o->home, &o->msg);
}

static void
vbd_op_run(struct mailbox_msg *m)
{
	struct vbd_op *o = (struct vbd_op *)m;
	struct vbd *vbd = server_vbd(o->srv, o->minor);

	if (!vbd || vbd->loop != loop_current()) {
		/* closed meanwhile (or gone and opened again elsewhere) */
		vbd_op_done(o, ENOENT, "no open vbd");
		return;
	}
	o->op(vbd, o->op_arg, vbd_op_done, o);
}

int
server_vbd_op(struct server *srv, int minor, server_vbd_op_fn op, void *op_arg,
	      vbd_done_fn done, void *arg)
{
	struct loop *l = server_vbd_loop(srv, minor);
	struct vbd_op *o;

	if (!l) {
		done(arg, ENOENT, "no open vbd");
		return 0;
	}
	if (!(o = calloc(1, sizeof(*o))))
		return -ENOMEM;
	o->srv = srv;
	o->home = loop_current();
	o->minor = minor;
	o->op = op;
	o->op_arg = op_arg;
	o->done = done;
	o->arg = arg;
	o->msg.fn = vbd_op_run;
	loop_post(l, &o->msg);
	return 0;
}

/* ---- gathering a document from every vbd ---- */

struct gather {
	struct server *srv;
	struct loop *home;
	server_doc_fn doc;
	void *doc_arg;
	void (*done)(json_t *all, void *arg);
	void *arg;
	json_t **docs;		/* by minor */
	unsigned nr;		/* minors looked at: those below minor_end at the start */
	unsigned pending;	/* loops not back yet (home's thread only) */
};

struct gather_part {
	struct mailbox_msg msg;
	struct gather *g;
	struct loop *loop;
	json_t **docs;		/* by minor, this loop's */
};

static void
gather_part_back(struct mailbox_msg *m)
{
	struct gather_part *p = (struct gather_part *)m;
	struct gather *g = p->g;

	for (unsigned i = 0; i < g->nr; i++)
		if (p->docs[i])
			g->docs[i] = p->docs[i];
	free(p->docs);
	free(p);
	if (--g->pending)
		return;
	json_t *vbds = json_array();
	for (unsigned i = 0; i < g->nr; i++)
		if (g->docs[i])
			json_array_append_new(vbds, g->docs[i]);
	free(g->docs);
	g->done(json_pack("{s:o}", "vbds", vbds), g->arg);
	free(g);
}

/* On one loop, in one turn: each of its vbds' documents. */
static void
gather_part_run(struct mailbox_msg *m)
{
	struct gather_part *p = (struct gather_part *)m;
	struct gather *g = p->g;

	/* this loop's vbds, found in one pass under the lock; only this loop frees them */
	static _Thread_local struct vbd *mine[SERVER_MAX_MINORS];
	pthread_mutex_lock(&g->srv->lock);
	for (unsigned i = 0; i < g->nr; i++) {
		struct vbd *vbd = g->srv->minors[i];
		mine[i] = vbd && vbd->loop == p->loop ? vbd : NULL;
	}
	pthread_mutex_unlock(&g->srv->lock);
	for (unsigned i = 0; i < g->nr; i++)
		if (mine[i])
			p->docs[i] = g->doc(mine[i], g->doc_arg);
	p->msg.fn = gather_part_back;
	loop_post(g->home, &p->msg);
}

int
server_gather(struct server *srv, server_doc_fn doc, void *doc_arg,
	      void (*done)(json_t *all, void *arg), void *arg)
{
	struct gather *g = calloc(1, sizeof(*g));
	struct gather_part *parts[SERVER_MAX_LOOPS] = { 0 };
	/* a vbd opened past it from now on is not there yet for this gather */
	unsigned i, nr = srv->minor_end ? srv->minor_end : 1;

	if (!g || !(g->docs = calloc(nr, sizeof(*g->docs))))
		goto nomem;
	g->nr = nr;
	for (i = 0; i < srv->nr_loops; i++) {
		if (!(parts[i] = calloc(1, sizeof(*parts[i]))) ||
		    !(parts[i]->docs = calloc(nr, sizeof(json_t *))))
			goto nomem;
	}
	g->srv = srv;
	g->home = loop_current();
	g->doc = doc;
	g->doc_arg = doc_arg;
	g->done = done;
	g->arg = arg;
	g->pending = srv->nr_loops;
	for (i = 0; i < srv->nr_loops; i++) {
		parts[i]->g = g;
		parts[i]->loop = srv->loops[i];
		parts[i]->msg.fn = gather_part_run;
		loop_post(srv->loops[i], &parts[i]->msg);
	}
	return 0;
nomem:
	for (i = 0; i < srv->nr_loops; i++) {
		if (parts[i])
			free(parts[i]->docs);
		free(parts[i]);
	}
	if (g)
		free(g->docs);
	free(g);
	return -ENOMEM;
}

json_t *
server_stats_doc(struct vbd *vbd, void *arg)
{
	json_t *st;

	if (!vbd->params)
		return NULL;
	st = vbd_stats_json(vbd);
	if (arg)	/* same loop turn: nothing completes in between */
		vbd_stats_reset(vbd);
	return st;
}

int
server_release_closed(struct server *srv, int minor)
{
	int rc = -ENOENT;

	pthread_mutex_lock(&srv->lock);
	if (!srv->minors[minor] && srv->closed[minor]) {
		srv->closed[minor] = 0;
		server_minor_freed_locked(srv);
		rc = 0;
	}
	pthread_mutex_unlock(&srv->lock);
	return rc;
}
