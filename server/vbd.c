/*
 * vbd lifecycle and request path. All of it runs on the vbd's loop thread
 * (vbd->loop); the only blocking parts (opening and closing the image
 * chain) run as io_calls on that loop's workers while the vbd is marked
 * busy with that operation. The table (server.h) is changed under
 * srv->lock: a vbd goes in at vbd_new and out when it closes.
 */
#include "vbd.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "blockjob.h"
#include "cbt.h"
#include "io.h"
#include "io_record.h"
#include "fdlimit.h"
#include "freelist.h"
#include "log.h"
#include "loop.h"
#include "qos.h"
#include "server.h"

enum vbd_job_kind { JOB_OPEN, JOB_REOPEN, JOB_CLOSE, JOB_DROP };

/* A chain open or close, run on a worker thread. */
struct vbd_job {
	struct io_call call;
	enum vbd_job_kind kind;
	struct vbd *vbd;
	char *params;			/* OPEN, REOPEN */
	unsigned oflags;
	struct td_image *old_leaf;	/* REOPEN, CLOSE, DROP: closed first */
	struct td_image *leaf;		/* result */
	struct td_image *kept_leaf;	/* REOPEN of the log alone: the chain stays open */
	struct td_image *adopt;		/* DROP: registered once the old chain is closed */
	char *cbt_path;			/* OPEN, REOPEN: a log to open, or NULL */
	int cbt_rdonly;
	struct cbt *cbt;		/* the vbd's log: REOPEN kept (grown), OPEN opened */
	struct cbt *old_cbt;		/* REOPEN onto a new log, CLOSE: closed */
	struct td_error err;
	vbd_done_fn done;
	void *arg;
	struct io_defer start;		/* CLOSE: started on the next loop turn */
};

static void vbd_check_drained(struct vbd *vbd);

static void
waiters_add(struct vbd *vbd, vbd_done_fn fn, void *arg)
{
	struct vbd_waiter *w = calloc(1, sizeof(*w));
	if (!w) {
		fn(arg, ENOMEM, "out of memory");
		return;
	}
	w->fn = fn;
	w->arg = arg;
	w->next = vbd->drain_waiters;
	vbd->drain_waiters = w;
}

static void waiters_run(struct vbd_waiter *w, int err, const char *msg);

static void
waiters_reply(struct vbd *vbd, int err, const char *msg)
{
	struct vbd_waiter *w = vbd->drain_waiters;
	vbd->drain_waiters = NULL;
	waiters_run(w, err, msg);
}

/* ---- chain jobs ---- */

static int
vbd_job_run(struct io_call *c)
{
	struct vbd_job *job = (struct vbd_job *)c;
	struct td_open_ctx ctx = { .io = job->vbd->loop->io, .timeout = job->vbd->timeout };

	int rc;

	if (job->old_leaf)
		td_chain_close(job->old_leaf);
	if (job->kind == JOB_DROP) {
		if (job->adopt)
			td_image_adopt(job->adopt);
		return 0;
	}
	if (job->kind == JOB_CLOSE) {
		cbt_close(job->old_cbt);
		job->old_cbt = NULL;
		return 0;
	}
	if (job->kept_leaf)
		job->leaf = job->kept_leaf;
	else if ((rc = td_chain_open(job->params, job->oflags, &ctx, &job->leaf, &job->err)) < 0)
		return rc;
	if (!job->cbt_path && !job->cbt)
		return 0;
	if (job->cbt_path && (job->oflags & TD_OPEN_NOFILE)) {
		rc = -EACCES;	/* the fuzzers' servers touch no file */
		snprintf(job->err.msg, sizeof(job->err.msg), "CBT logs are not allowed here");
	} else if (job->cbt_path) {
		struct cbt *log;
		rc = cbt_open(job->cbt_path, job->leaf->size, job->cbt_rdonly, &log,
			      job->err.msg, sizeof(job->err.msg));
		if (rc == 0) {
			job->old_cbt = job->cbt;	/* rotated: closed consistent once done */
			job->cbt = log;
		}
	} else {
		rc = cbt_resize(job->cbt, job->leaf->size, job->err.msg, sizeof(job->err.msg));
	}
	if (rc < 0) {
		job->err.code = -rc;
		if (!job->kept_leaf)
			td_chain_close(job->leaf);
		job->leaf = NULL;
		return rc;
	}
	cbt_close(job->old_cbt);
	job->old_cbt = NULL;
	return 0;
}

static void vbd_job_done(struct io_call *c, int res);

static void
vbd_job_start(struct vbd_job *job)
{
	job->call.fn = vbd_job_run;
	job->call.done = vbd_job_done;
	io_call(job->vbd->loop->io, &job->call);
}

static void
vbd_job_start_deferred(struct io_defer *d)
{
	vbd_job_start(d->arg);
}

static struct vbd_job *
vbd_job_new(struct vbd *vbd, enum vbd_job_kind kind, const char *params,
	    vbd_done_fn done, void *arg)
{
	struct vbd_job *job = calloc(1, sizeof(*job));
	if (!job)
		return NULL;
	if ((params && !(job->params = strdup(params))) ||
	    (vbd->cbt_path && kind != JOB_CLOSE && !(job->cbt_path = strdup(vbd->cbt_path)))) {
		free(job->params);
		free(job);
		return NULL;
	}
	job->cbt_rdonly = vbd->readonly;
	job->kind = kind;
	job->vbd = vbd;
	job->done = done;
	job->arg = arg;
	job->oflags = (vbd->readonly ? TD_OPEN_RDONLY : 0) |
		      (vbd->nodirect ? TD_OPEN_NODIRECT : 0) | vbd->srv->open_flags;
	return job;
}

static struct vbd_image_mark *
vbd_mark_find(const struct vbd *vbd, const struct td_image *img)
{
	for (unsigned i = 0; i < vbd->nr_marks; i++)
		if (vbd->marks[i].serial == img->serial)
			return &vbd->marks[i];
	return NULL;
}

/* Marks for the chain at vbd->leaf, keeping those of the images still in it. */
static void
vbd_marks_rebuild(struct vbd *vbd)
{
	unsigned n = td_chain_depth(vbd->leaf), i = 0;
	struct vbd_image_mark *marks = calloc(n, sizeof(*marks));

	if (!marks)
		log_warn("minor %d: out of memory: image counters will not reset", vbd->minor);
	for (const struct td_image *img = vbd->leaf; marks && img; img = img->parent, i++) {
		const struct vbd_image_mark *old = vbd_mark_find(vbd, img);
		marks[i].serial = img->serial;
		if (old)
			marks[i].at = old->at;
	}
	free(vbd->marks);
	vbd->marks = marks;
	vbd->nr_marks = marks ? n : 0;
}

static void
vbd_set_chain(struct vbd *vbd, struct td_image *leaf)
{
	vbd->leaf = leaf;
	vbd->size = leaf->size;
	vbd->sector_size = leaf->sector_size;
	vbd->caps = leaf->caps;
	vbd->scratch_size = td_chain_scratch_size(leaf);
	vbd->min_io = 1;
	for (struct td_image *img = leaf; img; img = img->parent)
		if (img->min_io > vbd->min_io)
			vbd->min_io = img->min_io;
	vbd_marks_rebuild(vbd);
}

/* Through QoS when the vbd has any, else straight down the chain. */
static void
vbd_admit(struct vbd *vbd, struct vbd_request *vr)
{
	if (vbd->qos)
		qos_submit(vbd, vr);
	else
		vbd_start(vbd, vr);
}

static void
vbd_resume_queued(struct vbd *vbd)
{
	while (!TAILQ_EMPTY(&vbd->queued) &&
	       !(vbd->state & (VBD_PAUSE_REQUESTED | VBD_PAUSED | VBD_QUIESCED))) {
		struct vbd_request *vr = TAILQ_FIRST(&vbd->queued);
		TAILQ_REMOVE(&vbd->queued, vr, link);
		vbd_admit(vbd, vr);
	}
	qos_vbd_resume(vbd);
}

static void vbd_free(struct vbd *vbd);
static void vbd_unlink(struct vbd *vbd, int keep_closed);
static void vbd_close_finished(struct vbd *vbd);

/* Out of descriptors is the operator's to fix, whichever image hit it: say so. */
static void
job_explain_fd_error(struct vbd_job *job)
{
	if (job->err.code == EMFILE || job->err.code == ENFILE)
		fdlimit_message(job->err.msg, sizeof(job->err.msg), job->params);
}

static void vbd_cbt_resume(struct vbd_request *vr, int err);
static void vbd_retry_due(evutil_socket_t fd, short what, void *arg);
static void vbd_watchdog_run(evutil_socket_t fd, short what, void *arg);

/* The power-loss replay's view: a tracked write leaves for the chain now. */
static void
vbd_cbt_mark(const struct vbd *vbd, const struct td_request *td)
{
	io_record_mark("cbt-write %d %ju %ju", vbd->minor, (uintmax_t)td->offset,
		       (uintmax_t)td->length);
}

/* The job's log (opened, rotated, kept or grown) is the vbd's again. */
static void
vbd_take_cbt(struct vbd *vbd, struct vbd_job *job)
{
	vbd->cbt = job->cbt;
	job->cbt = NULL;
	if (vbd->cbt)
		cbt_attach(vbd->cbt, vbd->loop->io, vbd_cbt_resume);
	if (job->cbt_path) {	/* taken: the next reopen keeps it */
		free(vbd->cbt_path);
		vbd->cbt_path = NULL;
	}
}

/* An open or reopen succeeded: the vbd takes the job's params and chain. */
static void
vbd_take_chain(struct vbd *vbd, struct vbd_job *job)
{
	free(vbd->params);
	vbd->params = job->params;
	job->params = NULL;
	vbd_set_chain(vbd, job->leaf);
	vbd_take_cbt(vbd, job);
}

static void
vbd_job_done(struct io_call *c, int res)
{
	struct vbd_job *job = (struct vbd_job *)c;
	struct vbd *vbd = job->vbd;
	struct server *srv = vbd->srv;

	switch (job->kind) {
	case JOB_OPEN:
		if (res < 0) {
			job_explain_fd_error(job);
			vbd_unlink(vbd, vbd->was_closed);
			vbd_free(vbd);
			job->done(job->arg, job->err.code, job->err.msg);
			break;
		}
		vbd_take_chain(vbd, job);
		vbd->state = 0;
		pthread_mutex_lock(&srv->lock);
		vbd->counted = 1;
		srv->nr_open++;
		pthread_mutex_unlock(&srv->lock);
		vbd->opened_at = time(NULL);
		log_info("minor %d: opened %s (%ju bytes%s)", vbd->minor, vbd->params,
			 (uintmax_t)vbd->size, vbd->readonly ? ", read-only" : "");
		server_vbds_changed(srv);
		job->done(job->arg, 0, NULL);
		break;
	case JOB_REOPEN:
		vbd->state &= ~VBD_OPENING;
		if (res < 0) {
			vbd->leaf = job->kept_leaf;	/* else the old chain was closed first */
			vbd->cbt = job->cbt;	/* the old log stays, unchanged */
			job->cbt = NULL;
			free(vbd->cbt_path);	/* and no switch is pending */
			vbd->cbt_path = NULL;
			job_explain_fd_error(job);
			job->done(job->arg, job->err.code, job->err.msg);
			break;
		}
		vbd_take_chain(vbd, job);
		vbd->state &= ~VBD_PAUSED;
		log_info("minor %d: resumed on %s", vbd->minor, vbd->params);
		job->done(job->arg, 0, NULL);
		vbd_resume_queued(vbd);
		break;
	case JOB_DROP:
		vbd->drops--;
		vbd_check_drained(vbd);	/* a close may wait for it */
		break;
	case JOB_CLOSE:
		vbd->state &= ~VBD_OPENING;
		vbd->leaf = NULL;
		if (vbd->state & VBD_SHUTDOWN_REQUESTED) {
			vbd_close_finished(vbd);
		} else {
			vbd->state = (vbd->state & ~VBD_PAUSE_REQUESTED) | VBD_PAUSED;
			log_info("minor %d: paused", vbd->minor);
			waiters_reply(vbd, 0, NULL);
		}
		break;
	}
	free(job->params);
	free(job->cbt_path);
	free(job);
}

/* ---- open ---- */

int
vbd_new(struct server *srv, int minor, struct loop *loop, struct vbd **out)
{
	struct vbd *vbd = calloc(1, sizeof(*vbd));

	if (!vbd)
		return -ENOMEM;
	vbd->srv = srv;
	vbd->loop = loop;
	vbd->minor = minor;
	vbd->state = VBD_OPENING;
	vbd->timeout = VBD_DEFAULT_TIMEOUT;
	TAILQ_INIT(&vbd->queued);
	TAILQ_INIT(&vbd->inflight);
	TAILQ_INIT(&vbd->retry);
	LIST_INIT(&vbd->frontends);
	pthread_mutex_lock(&srv->lock);
	if (srv->minors[minor]) {
		pthread_mutex_unlock(&srv->lock);
		free(vbd);
		return -EBUSY;
	}
	vbd->was_closed = srv->closed[minor];
	srv->closed[minor] = 0;
	srv->minors[minor] = vbd;
	server_minor_used_locked(srv, minor);
	loop->nr_vbds++;
	pthread_mutex_unlock(&srv->lock);
	*out = vbd;
	return 0;
}

void
vbd_set_timeout(struct vbd *vbd, unsigned secs)
{
	vbd->timeout = secs;
}

/* Out of the table; the minor stays a closed one if keep_closed. */
static void
vbd_unlink(struct vbd *vbd, int keep_closed)
{
	struct server *srv = vbd->srv;

	pthread_mutex_lock(&srv->lock);
	if (srv->minors[vbd->minor] == vbd) {
		srv->minors[vbd->minor] = NULL;
		srv->closed[vbd->minor] = (unsigned char)(keep_closed != 0);
		server_minor_freed_locked(srv);
		vbd->loop->nr_vbds--;
	}
	if (vbd->counted)
		srv->nr_open--;
	vbd->counted = 0;
	pthread_mutex_unlock(&srv->lock);
}

int
vbd_set_cbt_log(struct vbd *vbd, const char *path)
{
	char *p = strdup(path);
	if (!p)
		return -ENOMEM;
	free(vbd->cbt_path);
	vbd->cbt_path = p;
	return 0;
}

void
vbd_open(struct vbd *vbd, const char *params, unsigned flags, vbd_done_fn done, void *arg)
{
	vbd->readonly = (flags & VBD_OPEN_READONLY) != 0;
	vbd->nodirect = (flags & VBD_OPEN_NODIRECT) != 0;
	/* made now, on the vbd's loop: a request retried for want of memory needs none */
	vbd->retry_ev = evtimer_new(vbd->loop->base, vbd_retry_due, vbd);
	vbd->watchdog = evtimer_new(vbd->loop->base, vbd_watchdog_run, vbd);
	struct vbd_job *job = vbd->retry_ev && vbd->watchdog ?
			      vbd_job_new(vbd, JOB_OPEN, params, done, arg) : NULL;
	if (!job) {
		vbd_unlink(vbd, vbd->was_closed);
		vbd_free(vbd);
		done(arg, ENOMEM, "out of memory");
		return;
	}
	vbd_job_start(job);
}

/* ---- pause / unpause ---- */

void
vbd_pause(struct vbd *vbd, vbd_done_fn done, void *arg)
{
	if (vbd->state & VBD_PAUSED) {
		done(arg, 0, NULL);
		return;
	}
	if (vbd->state & VBD_PAUSE_REQUESTED) {
		waiters_add(vbd, done, arg);
		return;
	}
	if (vbd->state & (VBD_CLOSED | VBD_SHUTDOWN_REQUESTED | VBD_OPENING)) {
		done(arg, EBUSY, (vbd->state & VBD_CLOSED) ? "vbd is not open"
			       : "vbd is busy (opening or closing)");
		return;
	}
	if (vbd->job_starting || blockjob_busy(vbd->job)) {
		char msg[160];
		snprintf(msg, sizeof(msg), "minor %d has a %s job %s: cancel it (tap-ctl "
			 "job-cancel) or let it finish first", vbd->minor,
			 vbd->job ? vbd->job->type : "block",
			 vbd->job_starting ? "starting" : blockjob_state_name(vbd->job->state));
		done(arg, EBUSY, msg);
		return;
	}
	vbd->state |= VBD_PAUSE_REQUESTED;
	qos_vbd_requeue(vbd);	/* throttled requests wait for the unpause too */
	waiters_add(vbd, done, arg);
	vbd_check_drained(vbd);
}

void
vbd_unpause(struct vbd *vbd, const char *params, const char *cbt_log, vbd_done_fn done,
	    void *arg)
{
	if (!(vbd->state & VBD_PAUSED) || (vbd->state & VBD_OPENING)) {
		done(arg, EINVAL, (vbd->state & VBD_OPENING) ? "vbd is busy (reopening)"
			       : "vbd is not paused");
		return;
	}
	if (cbt_log && vbd_set_cbt_log(vbd, cbt_log) < 0) {
		done(arg, ENOMEM, "out of memory");
		return;
	}
	if (!params && !cbt_log && vbd->leaf) {	/* nothing was closed */
		vbd->state &= ~VBD_PAUSED;
		log_info("minor %d: resumed", vbd->minor);
		done(arg, 0, NULL);
		vbd_resume_queued(vbd);
		return;
	}
	struct vbd_job *job = vbd_job_new(vbd, JOB_REOPEN, params ? params : vbd->params,
					  done, arg);
	if (!job) {
		done(arg, ENOMEM, "out of memory");
		return;
	}
	if (!params && vbd->leaf)
		job->kept_leaf = vbd->leaf;	/* only the log changes: a ram disk keeps its data */
	else
		job->old_leaf = vbd->leaf;
	vbd->leaf = NULL;
	job->cbt = vbd->cbt;	/* the job's until it is done */
	vbd->cbt = NULL;
	vbd->state |= VBD_OPENING;
	vbd_job_start(job);
}

/* ---- close ---- */

void
vbd_forget(struct vbd *vbd)
{
	if (vbd->retry_ev)
		event_free(vbd->retry_ev);
	if (vbd->watchdog)
		event_free(vbd->watchdog);
	free(vbd);
}

static void
vbd_free(struct vbd *vbd)
{
	qos_vbd_close(vbd);
	blockjob_free(vbd->job);
	free(vbd->marks);
	free(vbd->params);
	free(vbd->cbt_path);
	vbd_forget(vbd);
}

static void
vbd_shutdown_frontends(struct vbd *vbd)
{
	while (!LIST_EMPTY(&vbd->frontends)) {
		struct vbd_frontend *fe = LIST_FIRST(&vbd->frontends);
		fe->ops->shutdown(fe);
		/* shutdown must detach it; make sure the loop ends regardless */
		if (!LIST_EMPTY(&vbd->frontends) && LIST_FIRST(&vbd->frontends) == fe)
			vbd_frontend_remove(fe);
	}
}

static void
vbd_fail_deferred(struct io_defer *d)
{
	struct vbd_request *vr = d->arg;
	vr->complete(vr, vr->err);
}

/* Ends a request that never reached the chain, on the loop's next turn. */
void
vbd_fail_request(struct vbd *vbd, struct vbd_request *vr, int err)
{
	struct op_stats *s = &vbd->stats.op[vr->td.op];
	s->reqs++;
	if (err)
		s->errors++;
	vr->err = err;
	vr->defer.fn = vbd_fail_deferred;
	vr->defer.arg = vr;
	io_defer(vbd->loop->io, &vr->defer);
}

static void vbd_td_done(struct td_request *td, int err);

/* Requests waiting to be sent again: none of their I/O is out, they end now. */
static void
vbd_fail_retrying(struct vbd *vbd, int err)
{
	while (!TAILQ_EMPTY(&vbd->retry)) {
		struct vbd_request *vr = TAILQ_FIRST(&vbd->retry);
		TAILQ_REMOVE(&vbd->retry, vr, retry_link);
		vr->retry_at_ns = 0;
		vbd_td_done(&vr->td, err);
	}
}

static void
vbd_fail_queued(struct vbd *vbd)
{
	while (!TAILQ_EMPTY(&vbd->queued)) {
		struct vbd_request *vr = TAILQ_FIRST(&vbd->queued);
		TAILQ_REMOVE(&vbd->queued, vr, link);
		vbd_fail_request(vbd, vr, ESHUTDOWN);
	}
}

/* Replies to everyone waiting on w; the vbd may already be gone. */
static void
waiters_run(struct vbd_waiter *w, int err, const char *msg)
{
	while (w) {
		struct vbd_waiter *next = w->next;
		w->fn(w->arg, err, msg);
		free(w);
		w = next;
	}
}

static void
vbd_close_finished(struct vbd *vbd)
{
	struct server *srv = vbd->srv;
	struct vbd_waiter *w = vbd->drain_waiters;

	vbd->drain_waiters = NULL;
	log_info("minor %d: closed %s", vbd->minor, vbd->params ? vbd->params : "");
	if (vbd->state & VBD_DEAD) {	/* a zombie: its minor is already free */
		for (struct vbd **p = &vbd->loop->zombies; *p; p = &(*p)->zombie_next) {
			if (*p == vbd) {
				*p = vbd->zombie_next;
				srv->nr_zombies--;
				break;
			}
		}
	} else {
		vbd_unlink(vbd, !vbd->release_on_close);
	}
	vbd_free(vbd);
	server_vbds_changed(srv);
	/* last: a waiter may look at the vbd table (shutdown does) */
	waiters_run(w, 0, NULL);
}

void
vbd_close(struct vbd *vbd, int force, int release, vbd_done_fn done, void *arg)
{
	struct server *srv = vbd->srv;

	if (vbd->state & VBD_OPENING) {
		done(arg, EBUSY, "vbd is busy (opening); try again");
		return;
	}
	if ((vbd->state & VBD_PAUSE_REQUESTED) && !(vbd->state & VBD_SHUTDOWN_REQUESTED))
		waiters_reply(vbd, ESHUTDOWN, "vbd is closing");
	vbd->state |= VBD_SHUTDOWN_REQUESTED;
	vbd->state &= ~(VBD_PAUSE_REQUESTED);
	if (release)
		vbd->release_on_close = 1;
	if (blockjob_active(vbd->job))	/* its destination is dropped; the close waits */
		vbd->job->ops->cancel(vbd->job);
	qos_vbd_close(vbd);
	vbd_fail_queued(vbd);
	if (force)
		vbd_fail_retrying(vbd, ESHUTDOWN);

	if (force && vbd->nr_inflight) {
		/*
		 * Cut the frontends off now; the vbd lives on as a zombie until the
		 * kernel returns the I/O it owns, then closes its images.
		 */
		log_warn("minor %d: force-closing with %u requests in flight",
			 vbd->minor, vbd->nr_inflight);
		vbd->state |= VBD_DEAD;	/* frontends see it: cut, do not drain */
		vbd_shutdown_frontends(vbd);
		vbd_unlink(vbd, !release);
		waiters_reply(vbd, 0, NULL);
		vbd->zombie_next = vbd->loop->zombies;
		vbd->loop->zombies = vbd;
		srv->nr_zombies++;
		server_vbds_changed(srv);
		done(arg, 0, NULL);
		return;
	}
	waiters_add(vbd, done, arg);
	vbd_check_drained(vbd);
}

static void
vbd_check_drained(struct vbd *vbd)
{
	if (vbd->nr_inflight || (vbd->state & VBD_OPENING))
		return;
	if (vbd->quiesce_fn && !(vbd->state & VBD_SHUTDOWN_REQUESTED)) {
		void (*fn)(void *) = vbd->quiesce_fn;
		vbd->quiesce_fn = NULL;
		fn(vbd->quiesce_arg);
		return;
	}
	if (vbd->state & VBD_SHUTDOWN_REQUESTED) {
		/* a block job's destination and a pivot's old chain close first */
		if (vbd->job_starting || blockjob_busy(vbd->job) || vbd->drops)
			return;
		if (!(vbd->state & VBD_DEAD))
			vbd_shutdown_frontends(vbd);
		if (!vbd->leaf && !vbd->cbt) {
			vbd_close_finished(vbd);
			return;
		}
	} else if (vbd->state & VBD_PAUSE_REQUESTED) {
		if (!vbd->leaf || (vbd->leaf->drv->flags & TD_DRV_KEEP_ON_PAUSE)) {
			vbd->state = (vbd->state & ~VBD_PAUSE_REQUESTED) | VBD_PAUSED;
			log_info("minor %d: paused", vbd->minor);
			waiters_reply(vbd, 0, NULL);
			return;
		}
	} else {
		return;
	}
	struct vbd_job *job = vbd_job_new(vbd, JOB_CLOSE, NULL, NULL, NULL);
	if (!job) {
		log_err("minor %d: out of memory closing images", vbd->minor);
		return;
	}
	/*
	 * The worker closes and frees the chain: the vbd lets go of it now, as
	 * unpause does. Until the job is done the loop may still be asked for
	 * the vbd's stats or description (the gathers: stats, list, metrics),
	 * which walk vbd->leaf.
	 *
	 * And the worker starts on the next loop turn, not now: the last
	 * request usually drains the vbd from inside its driver's completion,
	 * and a driver may still touch its image after it ends a request, until
	 * it returns to the loop (a batch that acknowledges its jobs, then takes
	 * them off its lists). Nothing can close or free the vbd meanwhile: it
	 * is VBD_OPENING.
	 */
	job->old_leaf = vbd->leaf;
	vbd->leaf = NULL;
	if (vbd->state & VBD_SHUTDOWN_REQUESTED) {	/* a pause keeps tracking */
		job->old_cbt = vbd->cbt;
		vbd->cbt = NULL;
	}
	vbd->state |= VBD_OPENING;	/* busy until the chain is closed */
	job->start.fn = vbd_job_start_deferred;
	job->start.arg = job;
	io_defer(vbd->loop->io, &job->start);
}

/* ---- requests ---- */

static int
op_writes(enum td_op op)
{
	return op == TD_OP_WRITE || op == TD_OP_DISCARD || op == TD_OP_WRITE_ZEROES;
}

/* ---- retries and timeouts ---- */

#define RETRY_FIRST_NS	1000000ULL	/* 1 ms, doubling */
#define RETRY_MAX_NS	1000000000ULL	/* 1 s */
#define NS		1000000000ULL

/* Worth sending again: the storage's hiccups, and memory that may come back. */
static int
transient(int err)
{
	return err == EAGAIN || err == EBUSY || err == EINTR || err == ENOMEM;
}

/* 0, or -1 if libevent could not grow its timer heap. */
static int
arm_in(struct event *ev, uint64_t ns)
{
	struct timeval tv = { (time_t)(ns / NS), (suseconds_t)(ns % NS / 1000) };
	return evtimer_add(ev, &tv);
}

/* The due ones of vbd->retry go down the chain again, as new. */
static void
vbd_retry_due(evutil_socket_t fd, short what, void *arg)
{
	struct vbd *vbd = arg;
	uint64_t now = now_ns();
	struct vbd_request *vr;
	(void)fd;
	(void)what;

	while ((vr = TAILQ_FIRST(&vbd->retry)) && vr->retry_at_ns <= now) {
		TAILQ_REMOVE(&vbd->retry, vr, retry_link);
		vr->retry_at_ns = 0;
		vr->td.scratch_used = 0;	/* the drivers' state of the last try is gone */
		vbd->retries++;
		td_image_submit(vbd->leaf, &vr->td);
	}
	if (vr)
		arm_in(vbd->retry_ev, vr->retry_at_ns - now);
}

/*
 * vr failed with a transient error: 0 if it waits to be sent again (in
 * vbd->retry, still in flight), -ETIMEDOUT if its time is up, -ENOMEM if
 * the timer could not be set. The last try is at the timeout.
 */
static int
vbd_retry_later(struct vbd *vbd, struct vbd_request *vr, int err, uint64_t now)
{
	uint64_t wait = vr->retries < 10 ? RETRY_FIRST_NS << vr->retries : RETRY_MAX_NS;
	uint64_t deadline = vr->start_ns + (uint64_t)vbd->timeout * NS;
	struct vbd_request *at;

	if (now >= deadline)
		return -ETIMEDOUT;
	if (wait > RETRY_MAX_NS)
		wait = RETRY_MAX_NS;
	if (wait > deadline - now)
		wait = deadline - now;
	vr->retries++;
	vr->retry_at_ns = now + wait;
	/* by due time; the newest usually go last */
	for (at = TAILQ_LAST(&vbd->retry, vbd_request_list); at && at->retry_at_ns > vr->retry_at_ns;
	     at = TAILQ_PREV(at, vbd_request_list, retry_link))
		;
	if (at)
		TAILQ_INSERT_AFTER(&vbd->retry, at, vr, retry_link);
	else
		TAILQ_INSERT_HEAD(&vbd->retry, vr, retry_link);
	if (TAILQ_FIRST(&vbd->retry) == vr && arm_in(vbd->retry_ev, wait) < 0) {
		TAILQ_REMOVE(&vbd->retry, vr, retry_link);
		vr->retry_at_ns = 0;
		return -ENOMEM;
	}
	log_debug("minor %d: request at %ju failed (%s): sent again in %ju ms", vbd->minor,
		  (uintmax_t)vr->td.offset, strerror(err), (uintmax_t)(wait / 1000000));
	return 0;
}

/*
 * The oldest requests against the timeout: one waiting to be sent again
 * ends with EIO; one whose I/O is out is answered EIO (its frontend's
 * timed_out) and ends when the I/O comes back, its buffers kept till then.
 */
static void
vbd_watchdog_run(evutil_socket_t fd, short what, void *arg)
{
	struct vbd *vbd = arg;
	uint64_t now = now_ns(), limit = (uint64_t)vbd->timeout * NS;
	unsigned n = 0;
	(void)fd;
	(void)what;

	vbd->watchdog_armed = 0;
	for (;;) {
		struct vbd_request *vr;
		TAILQ_FOREACH(vr, &vbd->inflight, link)
			if (!vr->late)
				break;
		if (!vr)
			break;
		if (now - vr->start_ns < limit) {
			vbd->watchdog_armed = arm_in(vbd->watchdog, vr->start_ns + limit - now) == 0;
			break;
		}
		vbd->timeouts++;
		n++;
		if (vr->retry_at_ns) {
			TAILQ_REMOVE(&vbd->retry, vr, retry_link);
			vr->retry_at_ns = 0;
			vbd_td_done(&vr->td, EIO);	/* out of inflight */
			continue;
		}
		vr->late = 1;
		if (vr->timed_out)
			vr->timed_out(vr, EIO);
	}
	if (n)
		log_warn("minor %d: %u request%s not done in %u s: failed (EIO)", vbd->minor, n,
			 n == 1 ? "" : "s", vbd->timeout);
}

static void
vbd_watchdog_arm(struct vbd *vbd)
{
	if (vbd->watchdog_armed)
		return;
	/* not armed: the next request tries again */
	vbd->watchdog_armed = arm_in(vbd->watchdog, (uint64_t)vbd->timeout * NS) == 0;
}

static void
vbd_td_done(struct td_request *td, int err)
{
	struct vbd_request *vr = (struct vbd_request *)td;
	struct vbd *vbd = vr->vbd;

	if (transient(err) && !vr->late && !(vbd->state & VBD_DEAD)) {
		int rc = vbd_retry_later(vbd, vr, err, now_ns());
		if (rc == 0)
			return;
		if (rc == -ETIMEDOUT) {
			vbd->timeouts++;
			log_warn("minor %d: request at %ju still failing (%s) after %u s: failed "
				 "(EIO)", vbd->minor, (uintmax_t)td->offset, strerror(err),
				 vbd->timeout);
			err = EIO;
		}
	}
	if (vr->job_write && vbd->job->ops->guest_write_done(vbd->job, vr, err))
		return;	/* the job ends it: vbd_request_end */
	vbd_request_end(vr, err);
}

void
vbd_request_end(struct vbd_request *vr, int err)
{
	struct vbd *vbd = vr->vbd;
	struct td_request *td = &vr->td;
	uint64_t now = now_ns();

	if (vr->late)
		err = EIO;	/* what its client was told */
	uint64_t us = (now - vr->start_ns) / 1000;

	TAILQ_REMOVE(&vbd->inflight, vr, link);
	vbd->nr_inflight--;
	op_stats_end(&vbd->stats.op[td->op], td->length, err, us);
	if (!err && td->op == TD_OP_READ)
		vbd->stats.secs[0] += td->length >> 9;
	else if (!err && td->op == TD_OP_WRITE)
		vbd->stats.secs[1] += td->length >> 9;
	if (err && !(vbd->state & VBD_DEAD))
		log_debug("minor %d: %s request at %ju failed: %s", vbd->minor,
			  td->op == TD_OP_READ ? "read" : "write", (uintmax_t)td->offset,
			  strerror(err));
	/* the power-loss replay's view of what a client was promised */
	if (!err && td->op == TD_OP_FLUSH)
		io_record_mark("flush %d", vbd->minor);
	else if (!err && td->op == TD_OP_WRITE && (td->flags & TD_REQ_FUA))
		io_record_mark("fua %d %ju %ju", vbd->minor, (uintmax_t)td->offset,
			       (uintmax_t)td->length);
	vr->complete(vr, err);
	if (!vbd->nr_inflight)
		vbd_check_drained(vbd);
}

void
vbd_start(struct vbd *vbd, struct vbd_request *vr)
{
	struct td_request *td = &vr->td;

	/*
	 * The one check of a request against the disk, for every frontend;
	 * below this, drivers assert what it guarantees. Read-only first: a
	 * write past the end of a read-only disk is refused as a write.
	 */
	if (vbd->readonly && op_writes(td->op)) {
		vbd_fail_request(vbd, vr, EROFS);
		return;
	}
	if (td->offset > vbd->size || td->length > vbd->size - td->offset) {
		/* NBD's convention: data written past the end is ENOSPC */
		vbd_fail_request(vbd, vr, td->op == TD_OP_WRITE || td->op == TD_OP_WRITE_ZEROES ?
				ENOSPC : EINVAL);
		return;
	}
	if (td->op != TD_OP_FLUSH &&
	    (td->offset % vbd->min_io || td->length % vbd->min_io)) {
		vbd_fail_request(vbd, vr, EINVAL);	/* the format works in sectors */
		return;
	}
	/* nothing to do: drivers never see an empty range */
	if (!td->length && td->op != TD_OP_FLUSH) {
		td->nr_extents = 0;
		vbd_fail_request(vbd, vr, 0);
		return;
	}
	switch (td->op) {
	case TD_OP_FLUSH:
		if (!(vbd->caps & TD_CAP_FLUSH)) {
			vbd_fail_request(vbd, vr, 0);
			return;
		}
		break;
	case TD_OP_DISCARD:
	case TD_OP_CACHE:
		/* both are hints: without support they succeed doing nothing */
		if (!(vbd->caps & (td->op == TD_OP_DISCARD ? TD_CAP_DISCARD : TD_CAP_CACHE))) {
			vbd_fail_request(vbd, vr, 0);
			return;
		}
		break;
	case TD_OP_WRITE_ZEROES:
		if (!(vbd->caps & TD_CAP_WRITE_ZEROES)) {
			vbd_fail_request(vbd, vr, ENOTSUP);
			return;
		}
		break;
	case TD_OP_BLOCK_STATUS:
		if (!(vbd->caps & TD_CAP_BLOCK_STATUS)) {	/* all data, then */
			td->nr_extents = 1;
			td->extents[0].length = td->length;
			td->extents[0].flags = 0;
			vbd_fail_request(vbd, vr, 0);
			return;
		}
		break;
	default:
		break;
	}
	vr->start_ns = now_ns();
	vr->retries = 0;
	vr->late = 0;
	op_stats_start(&vbd->stats.op[td->op]);
	TAILQ_INSERT_TAIL(&vbd->inflight, vr, link);
	vbd->nr_inflight++;
	vbd_watchdog_arm(vbd);
	td->done = vbd_td_done;
	vr->job_write = NULL;
	if (vbd->cbt && op_writes(td->op) &&
	    cbt_before_write(vbd->cbt, vr, td->offset, td->length))
		return;	/* vbd_cbt_resume sends it on */
	vbd_request_send(vbd, vr);
}

/* Started, its changes durable in the CBT log: to the block job, then the chain. */
void
vbd_request_send(struct vbd *vbd, struct vbd_request *vr)
{
	struct td_request *td = &vr->td;

	if (!op_writes(td->op)) {
		td_image_submit(vbd->leaf, td);
		return;
	}
	if (blockjob_active(vbd->job) && vbd->job->ops->guest_write &&
	    vbd->job->ops->guest_write(vbd->job, vr))
		return;	/* the job sends it on */
	if (vbd->cbt)
		vbd_cbt_mark(vbd, td);
	td_image_submit(vbd->leaf, td);
}

/* The bits of vr's blocks are durable in the CBT log (or could not be made so). */
static void
vbd_cbt_resume(struct vbd_request *vr, int err)
{
	struct vbd *vbd = vr->vbd;

	if (!err && (vbd->state & VBD_DEAD))
		err = ESHUTDOWN;	/* force-closed meanwhile */
	if (err) {
		vbd_td_done(&vr->td, err);
		return;
	}
	vbd_request_send(vbd, vr);
}

void
vbd_submit(struct vbd *vbd, struct vbd_request *vr)
{
	vr->vbd = vbd;
	vr->err = 0;
	if (vbd->state & (VBD_SHUTDOWN_REQUESTED | VBD_CLOSED | VBD_DEAD)) {
		vbd_fail_request(vbd, vr, ESHUTDOWN);
		return;
	}
	if ((vbd->state & (VBD_PAUSE_REQUESTED | VBD_PAUSED | VBD_OPENING | VBD_QUIESCED)) ||
	    !TAILQ_EMPTY(&vbd->queued)) {
		TAILQ_INSERT_TAIL(&vbd->queued, vr, link);
		return;
	}
	vbd_admit(vbd, vr);
}

/* ---- block jobs ---- */

void
vbd_quiesce(struct vbd *vbd, void (*fn)(void *arg), void *arg)
{
	vbd->state |= VBD_QUIESCED;
	vbd->quiesce_fn = fn;
	vbd->quiesce_arg = arg;
	qos_vbd_requeue(vbd);	/* throttled requests wait too */
	vbd_check_drained(vbd);
}

void
vbd_resume(struct vbd *vbd)
{
	vbd->state &= ~VBD_QUIESCED;
	vbd->quiesce_fn = NULL;
	vbd_resume_queued(vbd);
}

void
vbd_swap_chain(struct vbd *vbd, struct td_image *leaf, char *params, int adopt)
{
	struct vbd_job *job = vbd_job_new(vbd, JOB_DROP, NULL, NULL, NULL);

	if (job) {
		job->old_leaf = vbd->leaf;
		job->adopt = adopt ? leaf : NULL;
		vbd->drops++;
		vbd_job_start(job);
	} else {	/* left open: a leak, not a crash */
		log_err("minor %d: out of memory closing %s", vbd->minor, vbd->params);
	}
	free(vbd->params);
	vbd->params = params;
	vbd_set_chain(vbd, leaf);
	server_vbds_changed(vbd->srv);
}

void
vbd_chain_changed(struct vbd *vbd)
{
	vbd_set_chain(vbd, vbd->leaf);
	server_vbds_changed(vbd->srv);
}

void
vbd_job_stopped(struct vbd *vbd)
{
	vbd_check_drained(vbd);
}

/* ---- frontends ---- */

void
vbd_frontend_add(struct vbd *vbd, struct vbd_frontend *fe,
		 const struct vbd_frontend_ops *ops)
{
	fe->ops = ops;
	fe->vbd = vbd;
	LIST_INSERT_HEAD(&vbd->frontends, fe, link);
}

void
vbd_frontend_remove(struct vbd_frontend *fe)
{
	if (!fe->vbd)
		return;
	LIST_REMOVE(fe, link);
	fe->vbd = NULL;
}

unsigned
vbd_frontend_count(const struct vbd *vbd, const char *kind)
{
	unsigned n = 0;
	const struct vbd_frontend *fe;
	LIST_FOREACH(fe, &vbd->frontends, link)
		if (strcmp(fe->ops->kind, kind) == 0)
			n++;
	return n;
}

/* ---- reporting ---- */

/* "aio", "vhd", ...: params up to ':', into type (n bytes). */
static const char *
vbd_type(const struct vbd *vbd, char *type, size_t n)
{
	const char *colon = vbd->params ? strchr(vbd->params, ':') : NULL;
	size_t len = colon ? (size_t)(colon - vbd->params) : 0;
	snprintf(type, n, "%.*s", (int)len, vbd->params ? vbd->params : "");
	return type;
}

static const char *const op_names[TD_OP_COUNT] = {
	"read", "write", "flush", "discard", "write_zeroes", "block_status", "cache",
};

/* The image's counters as this vbd reports them: since its last reset. */
static struct td_image_stats
image_stats_since_reset(const struct vbd *vbd, const struct td_image *img)
{
	struct td_image_stats st = img->stats;
	const struct vbd_image_mark *m = vbd_mark_find(vbd, img);

	for (int rw = 0; m && rw < 2; rw++) {
		st.hits[rw] -= m->at.hits[rw];
		st.fail[rw] -= m->at.fail[rw];
	}
	return st;
}

json_t *
vbd_stats_json(const struct vbd *vbd)
{
	json_t *images = json_array(), *ops = json_object();
	unsigned queued = 0;
	const struct vbd_request *vr;

	for (const struct td_image *img = vbd->leaf; img; img = img->parent) {
		struct td_image_stats st = image_stats_since_reset(vbd, img);
		json_t *o = json_pack(
			"{s:s, s:s, s:I, s:[I,I], s:[I,I]}",
			"name", img->params, "driver", img->drv->name,
			"size", (json_int_t)img->size,
			"hits", (json_int_t)st.hits[0], (json_int_t)st.hits[1],
			"fail", (json_int_t)st.fail[0], (json_int_t)st.fail[1]);
		if (o && img->status)
			json_object_set_new(o, "status", json_string(img->status));
		json_array_append_new(images, o);
	}
	for (int op = 0; op < TD_OP_COUNT; op++)
		json_object_set_new(ops, op_names[op], op_stats_json(&vbd->stats.op[op]));
	TAILQ_FOREACH(vr, &vbd->queued, link)
		queued++;
	/* tapdisk reports its (one) blkif frontend as "xenbus" */
	json_t *xenbus = NULL;
	struct vbd_frontend *fe;
	LIST_FOREACH(fe, &vbd->frontends, link) {
		if (fe->ops->stats && !strcmp(fe->ops->kind, "blkif")) {
			xenbus = fe->ops->stats(fe);
			break;
		}
	}
	json_t *out = json_pack("{s:s?, s:i, s:i, s:i, s:[I,I], s:o, s:i, s:i, s:o, s:{s:i, s:i}}",
			 "name", vbd->params,
			 "minor", vbd->minor, "loop", (int)vbd->loop->index,
			 "state", (int)vbd->state,
			 "secs", (json_int_t)vbd->stats.secs[0], (json_int_t)vbd->stats.secs[1],
			 "images", images,
			 "reqs_outstanding", (int)vbd->nr_inflight,
			 "reqs_queued", (int)queued,
			 "ops", ops,
			 "frontends",
			 "nbd", (int)vbd_frontend_count(vbd, "nbd"),
			 "blkif", (int)vbd_frontend_count(vbd, "blkif"));
	json_object_set_new(out, "qos", qos_vbd_stats_json(vbd));
	json_object_set_new(out, "timeout", json_integer(vbd->timeout));
	json_object_set_new(out, "retries", json_integer((json_int_t)vbd->retries));
	json_object_set_new(out, "timeouts", json_integer((json_int_t)vbd->timeouts));
	if (vbd->cbt)
		json_object_set_new(out, "cbt", cbt_stats_json(vbd->cbt));
	if (vbd->job)
		json_object_set_new(out, "job", blockjob_json(vbd->job));
	if (xenbus)
		json_object_set_new(out, "xenbus", xenbus);
	return out;
}

/*
 * The one list of what a reset zeroes: a new cumulative counter in the
 * stats belongs here too. Gauges (in flight, queued, frontends) stay.
 */
void
vbd_stats_reset(struct vbd *vbd)
{
	struct vbd_frontend *fe;

	for (int op = 0; op < TD_OP_COUNT; op++)
		op_stats_reset(&vbd->stats.op[op]);
	vbd->stats.secs[0] = vbd->stats.secs[1] = 0;
	vbd->retries = vbd->timeouts = 0;
	qos_vbd_stats_reset(vbd);
	for (const struct td_image *img = vbd->leaf; img; img = img->parent) {
		struct vbd_image_mark *m = vbd_mark_find(vbd, img);
		if (m)
			m->at = img->stats;
	}
	LIST_FOREACH(fe, &vbd->frontends, link)
		if (fe->ops->reset_stats)
			fe->ops->reset_stats(fe);
}

json_t *
vbd_info_json(const struct vbd *vbd)
{
	const char *colon = vbd->params ? strchr(vbd->params, ':') : NULL;
	char type[16];
	json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:s?, s:s?, s:s?, s:b, s:I, s:i, s:i}",
			      "minor", vbd->minor, "loop", (int)vbd->loop->index,
			      "pid", (int)vbd->srv->pid,
			      "state", (int)vbd->state,
			      "params", vbd->params,
			      "type", vbd->params ? vbd_type(vbd, type, sizeof(type)) : NULL,
			      "path", colon ? colon + 1 : NULL,
			      "readonly", vbd->readonly,
			      "size", (json_int_t)(vbd->params ? vbd->size : 0),
			      "sector_size", (int)(vbd->params ? vbd->sector_size : 0),
			      "chain_depth", (int)td_chain_depth(vbd->leaf));
	if (o && vbd->cbt)
		json_object_set_new(o, "cbt_log", json_string(vbd->cbt->path));

	for (unsigned i = 0; o && i < vbd->srv->nr_frontends; i++) {
		const struct server_frontend *f = &vbd->srv->frontends[i];
		if (f->cls->vbd_info)
			f->cls->vbd_info(f->state, vbd, o);
	}
	return o;
}

/* ---- frontends' requests ---- */

struct vbd_request *
vbd_request_get(const struct vbd *vbd, struct freelist *fl, size_t head)
{
	/* one allocation for the request and its drivers' state, reused */
	size_t at = (head + 15) & ~(size_t)15, scratch = vbd ? vbd->scratch_size : 0;
	struct vbd_request *vr = freelist_get(fl, at + scratch);

	if (!vr)
		return NULL;
	vr->alloc_size = at + scratch;
	vr->td.scratch = scratch ? (char *)vr + at : NULL;
	vr->td.scratch_size = scratch;
	return vr;
}

void
vbd_request_put(struct freelist *fl, struct vbd_request *vr)
{
	freelist_put(fl, vr, vr->alloc_size);
}
