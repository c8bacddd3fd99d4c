/*
 * The control commands: one table entry each (name, arguments, handler);
 * the argument tables are in control_args.c and match
 * schema/<cmd>.args.json (test_control.py checks). The control fuzzer
 * drives this very table, on a server that may open only ram disks.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control.h"
#include "fdlimit.h"
#include "io.h"
#include "io_fault.h"
#include "blockjob.h"
#include "log.h"
#include "loop.h"
#include "metrics_http.h"
#include "mirror.h"
#include "nbd.h"
#include "qos.h"
#include "qos_limits.h"
#include "server.h"
#include "snapshot.h"
#include "vbd.h"

#ifndef TAPDISKD_VERSION
#define TAPDISKD_VERSION "0.1.0"
#endif

/* ---- argument helpers ---- */

/*
 * The vbd named by args.minor, or replies an error and returns NULL. Runs
 * on the vbd's loop (CTL_ON_VBD_LOOP), the one place it may be used.
 */
static struct vbd *
arg_vbd(struct ctl_req *req, json_t *args)
{
	json_int_t m = json_integer_value(json_object_get(args, "minor"));
	struct server *srv = ctl_req_server(req);
	struct vbd *vbd;

	if (m < 0 || m >= SERVER_MAX_MINORS) {
		ctl_reply_error(req, EINVAL, "minor %lld is out of range (0..%d)",
				(long long)m, SERVER_MAX_MINORS - 1);
		return NULL;
	}
	vbd = server_vbd(srv, (int)m);
	if (!vbd) {
		ctl_reply_error(req, ENOENT, "minor %lld: no %svbd", (long long)m,
				server_minor_closed(srv, (int)m) ? "open " : "");
		return NULL;
	}
	if (vbd->loop != loop_current()) {
		/* closed and opened again on another loop since the dispatch */
		ctl_reply_error(req, EAGAIN, "minor %lld moved while the command was on its "
				"way; try again", (long long)m);
		return NULL;
	}
	return vbd;
}

static int
arg_bool(json_t *args, const char *name)
{
	return json_is_true(json_object_get(args, name));
}

static const char *
arg_str(json_t *args, const char *name)
{
	return json_string_value(json_object_get(args, name));
}

/* Replies {} or the error of a vbd state change. */
static void
reply_done(void *arg, int err, const char *msg)
{
	if (err)
		ctl_reply_error(arg, err, "%s", msg ? msg : strerror(err));
	else
		ctl_reply_ok(arg, NULL);
}

/* ---- version ---- */

static void
cmd_version(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	(void)args;
	ctl_reply_ok(req, json_pack("{s:s, s:i, s:i, s:s, s:s, s:i, s:i, s:i, s:s*}",
				    "version", TAPDISKD_VERSION,
				    "protocol", CONTROL_PROTOCOL_VERSION,
				    "pid", (int)srv->pid,
				    "io_engine", io_engine_name(srv->loops[0]->io),
				    "state_dir", srv->state_dir,
				    "vbds", (int)server_vbd_count(srv),
				    "loops", (int)srv->nr_loops,
				    "nbd_connections", (int)nbd_connection_count(srv),
				    "metrics", metrics_http_address(srv->metrics)));
}

/* ---- list ---- */

struct list_filter {
	json_int_t minor;	/* -1: any */
	char *type, *path;
};

/* The description of a closed minor: no loop, no chain. */
static json_t *
closed_info(struct server *srv, int minor)
{
	return json_pack("{s:i, s:i, s:i, s:n, s:n, s:n, s:b, s:i, s:i, s:i, s:n}",
			 "minor", minor, "pid", (int)srv->pid, "state", VBD_CLOSED,
			 "params", "type", "path", "readonly", 0, "size", 0, "sector_size", 0,
			 "chain_depth", 0, "nbd");
}

static int
list_match(const struct list_filter *f, int minor, json_t *info)
{
	const char *t = json_string_value(json_object_get(info, "type"));
	const char *p = json_string_value(json_object_get(info, "path"));

	return (f->minor < 0 || f->minor == minor) && (!f->type || (t && !strcmp(f->type, t))) &&
	       (!f->path || (p && !strcmp(f->path, p)));
}

/* server_gather's doc: on the vbd's loop. */
static json_t *
list_doc(struct vbd *vbd, void *arg)
{
	json_t *info = vbd_info_json(vbd);

	if (!list_match(arg, vbd->minor, info)) {
		json_decref(info);
		return NULL;
	}
	return info;
}

struct list_req {
	struct ctl_req *req;
	struct list_filter f;
};

static void
list_gathered(json_t *all, void *arg)
{
	struct list_req *l = arg;
	struct server *srv = ctl_req_server(l->req);
	json_t *vbds = json_array(), *v;
	size_t i = 0;

	/* the open vbds and the closed minors, in minor order */
	json_t *open = json_object_get(all, "vbds");
	int end = (int)srv->minor_end;
	v = json_array_get(open, json_array_size(open) - 1);
	if (v && json_integer_value(json_object_get(v, "minor")) >= end)	/* gone since */
		end = (int)json_integer_value(json_object_get(v, "minor")) + 1;
	for (int m = 0; m < end; m++) {
		v = json_array_get(open, i);
		if (v && json_integer_value(json_object_get(v, "minor")) == m) {
			json_array_append(vbds, v);
			i++;
		} else if (server_minor_closed(srv, m)) {
			json_t *info = closed_info(srv, m);
			if (list_match(&l->f, m, info))
				json_array_append(vbds, info);
			json_decref(info);
		}
	}
	json_decref(all);
	ctl_reply_ok(l->req, json_pack("{s:o}", "vbds", vbds));
	free(l->f.type);
	free(l->f.path);
	free(l);
}

static void
cmd_list(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	json_t *minor = json_object_get(args, "minor");
	const char *type = arg_str(args, "type"), *path = arg_str(args, "path");
	struct list_req *l = calloc(1, sizeof(*l));

	if (!l || (type && !(l->f.type = strdup(type))) || (path && !(l->f.path = strdup(path))) ||
	    (l->req = req, l->f.minor = minor ? json_integer_value(minor) : -1,
	     server_gather(srv, list_doc, &l->f, list_gathered, l) < 0)) {
		if (l) {
			free(l->f.type);
			free(l->f.path);
		}
		free(l);
		ctl_reply_error(req, ENOMEM, "out of memory");
	}
}

/* ---- stats ---- */

static void
stats_gathered(json_t *all, void *arg)
{
	ctl_reply_ok(arg, all);
}

/* With a minor, on its loop (CTL_ON_VBD_LOOP); without, every vbd on its own. */
static void
cmd_stats(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	void *reset = arg_bool(args, "reset") ? srv : NULL;

	if (json_object_get(args, "minor")) {
		struct vbd *vbd = arg_vbd(req, args);
		if (vbd) {
			json_t *st = vbd_stats_json(vbd);
			if (reset)	/* nothing completes in between */
				vbd_stats_reset(vbd);
			ctl_reply_ok(req, st);
		}
		return;
	}
	if (server_gather(srv, server_stats_doc, reset, stats_gathered, req) < 0)
		ctl_reply_error(req, ENOMEM, "out of memory");
}

/* ---- open / create ---- */

struct open_req {
	struct ctl_req *req;
	int minor;
	json_t *qos;	/* checked before opening, applied once open */
};

static void
open_done(void *arg, int err, const char *msg)
{
	struct open_req *o = arg;
	struct ctl_req *req = o->req;
	struct vbd *vbd = server_vbd(ctl_req_server(req), o->minor);	/* on its loop */

	if (!err && o->qos) {
		char why[256];
		if (qos_vbd_set(vbd, o->qos, why, sizeof(why)) < 0)	/* only ENOMEM now */
			log_warn("minor %d: qos not set: %s", vbd->minor, why);
	}
	json_decref(o->qos);
	if (err) {
		ctl_reply_error(req, err, "%s", msg ? msg : strerror(err));
	} else {
		json_t *info = vbd_info_json(vbd);
		json_t *nbd = json_object_get(info, "nbd");
		ctl_reply_ok(req, json_pack("{s:i, s:s, s:I, s:i, s:b, s:s}",
					    "minor", vbd->minor, "params", vbd->params,
					    "size", (json_int_t)vbd->size,
					    "sector_size", (int)vbd->sector_size,
					    "readonly", vbd->readonly,
					    "nbd", json_is_string(nbd) ? json_string_value(nbd) : ""));
		json_decref(info);
	}
	free(o);
}

/*
 * The args' params (or path, when is_path) made absolute against their
 * cwd: a malloc'd string, or NULL with the error replied.
 */
static char *
arg_absolute(struct ctl_req *req, json_t *args, const char *key, int is_path)
{
	const char *v = arg_str(args, key), *cwd = arg_str(args, "cwd");
	struct td_error err;
	char *out;
	int rc = is_path ? td_path_absolute(v, cwd, &out, &err)
			 : td_params_absolute(v, cwd, &out, &err);

	if (rc < 0) {
		ctl_reply_error(req, err.code, "%s", err.msg);
		return NULL;
	}
	return out;
}

/*
 * Where a new vbd goes: the loop asked for, else its QoS group's loop (a
 * group's members share one), else the least loaded. NULL once replied.
 */
static struct loop *
open_loop(struct ctl_req *req, json_t *args, json_t *qos)
{
	struct server *srv = ctl_req_server(req);
	json_t *jl = json_object_get(args, "loop");
	const char *group = qos ? json_string_value(json_object_get(qos, "group")) : NULL;
	struct loop *gl = group && *group ? qos_group_loop(srv, group) : NULL;

	if (jl) {
		json_int_t i = json_integer_value(jl);
		struct loop *l = server_loop(srv, i < 0 || i > SERVER_MAX_LOOPS ? -1 : (int)i);
		if (!l) {
			ctl_reply_error(req, EINVAL, "loop %lld: this server runs loops 0..%u "
					"(tapdiskd --loops)", (long long)i, srv->nr_loops - 1);
			return NULL;
		}
		if (gl && gl != l) {
			ctl_reply_error(req, EXDEV, "qos group %s lives on loop %u, not %u: a "
					"group's members share one loop", group, gl->index,
					l->index);
			return NULL;
		}
		return l;
	}
	return gl ? gl : server_place(srv);
}

static void
cmd_open(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	json_t *jminor = json_object_get(args, "minor");
	json_int_t m = jminor ? json_integer_value(jminor) : server_free_minor(srv);
	struct open_req *o;
	int rc;

	if (srv->stopping) {
		ctl_reply_error(req, ESHUTDOWN, "the server is shutting down");
		return;
	}
	if (m < 0 || m >= SERVER_MAX_MINORS) {
		if (jminor)
			ctl_reply_error(req, EINVAL, "minor %lld is out of range (0..%d)",
					(long long)m, SERVER_MAX_MINORS - 1);
		else
			ctl_reply_error(req, ENOSPC, "all %d minors are in use",
					SERVER_MAX_MINORS);
		return;
	}
	json_t *jt = json_object_get(args, "timeout");
	json_int_t timeout = jt ? json_integer_value(jt) : 0;
	if (jt && (timeout < 1 || timeout > VBD_MAX_TIMEOUT)) {
		ctl_reply_error(req, EINVAL, "timeout %lld: 1 to %d seconds", (long long)timeout,
				VBD_MAX_TIMEOUT);
		return;
	}
	json_t *qos = json_object_get(args, "qos");
	char why[256];
	if (qos && qos_vbd_check(qos, why, sizeof(why)) < 0) {
		ctl_reply_error(req, EINVAL, "qos: %s", why);
		return;
	}
	char *params = arg_absolute(req, args, "params", 0);
	if (!params)
		return;
	char *cbt_log = NULL;
	if (arg_str(args, "cbt_log") && !(cbt_log = arg_absolute(req, args, "cbt_log", 1))) {
		free(params);
		return;
	}
	o = calloc(1, sizeof(*o));
	if (!o) {
		free(params);
		free(cbt_log);
		ctl_reply_error(req, ENOMEM, "out of memory");
		return;
	}
	struct loop *loop = open_loop(req, args, qos);
	if (!loop) {
		free(params);
		free(cbt_log);
		free(o);
		return;
	}
	o->req = req;
	o->minor = (int)m;
	o->qos = json_incref(qos);
	struct vbd_open_opts opts = {
		.flags = (arg_bool(args, "readonly") ? VBD_OPEN_READONLY : 0) |
			 (arg_bool(args, "nodirect") ? VBD_OPEN_NODIRECT : 0),
		.timeout = (unsigned)timeout,
		.cbt_log = cbt_log,
	};
	rc = server_open_vbd(srv, (int)m, loop, params, &opts, open_done, o);
	free(cbt_log);
	if (rc < 0) {
		json_decref(o->qos);
		free(o);
		if (rc == -EBUSY) {
			ctl_reply_error(req, EBUSY, "minor %lld is in use", (long long)m);
		} else if (rc == -EMFILE) {
			char msg[256];
			fdlimit_message(msg, sizeof(msg), params);
			ctl_reply_error(req, EMFILE, "%s", msg);
		} else {
			ctl_reply_error(req, -rc, "%s", strerror(-rc));
		}
	}
	free(params);
}

/* ---- close / destroy ---- */

static void
cmd_close(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	if (vbd)
		vbd_close(vbd, arg_bool(args, "force"), 0, reply_done, req);
}

static void
cmd_destroy(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	json_int_t m = json_integer_value(json_object_get(args, "minor"));

	/* a closed minor has no vbd and no loop: it is only let go */
	if (m >= 0 && m < SERVER_MAX_MINORS && server_release_closed(srv, (int)m) == 0) {
		ctl_reply_ok(req, NULL);
		return;
	}
	struct vbd *vbd = arg_vbd(req, args);
	if (vbd)
		vbd_close(vbd, arg_bool(args, "force"), 1, reply_done, req);
}

/* ---- pause / unpause ---- */

static void
cmd_pause(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	if (vbd)
		vbd_pause(vbd, reply_done, req);
}

static void
cmd_unpause(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	char *params = NULL, *cbt_log = NULL;

	if (!vbd || (arg_str(args, "params") && !(params = arg_absolute(req, args, "params", 0))))
		return;
	if (arg_str(args, "cbt_log") && !(cbt_log = arg_absolute(req, args, "cbt_log", 1))) {
		free(params);
		return;
	}
	vbd_unpause(vbd, params, cbt_log, reply_done, req);
	free(params);
	free(cbt_log);
}

/* ---- snapshot ---- */

struct snap_req {
	struct ctl_req *req;
	int minor;
};

static void
snapshot_done(void *arg, int err, const char *msg)
{
	struct snap_req *sr = arg;
	struct vbd *vbd = server_vbd(ctl_req_server(sr->req), sr->minor);
	if (err)
		ctl_reply_error(sr->req, err, "%s", msg ? msg : strerror(err));
	else	/* msg: the params of a snapshot made inside the image (rbd:) */
		ctl_reply_ok(sr->req, json_pack("{s:s?, s:s*}", "params", vbd ? vbd->params : NULL,
						"snapshot", msg));
	free(sr);
}

static void
cmd_snapshot(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	struct snap_req *sr;
	char *path, *cbt_log = NULL;

	if (!vbd)
		return;
	/* a snapshot inside the image (rbd:) has a name, not a path */
	if (vbd_snapshot_inside(vbd)) {
		if (!(path = strdup(arg_str(args, "path")))) {
			ctl_reply_error(req, ENOMEM, "out of memory");
			return;
		}
	} else if (!(path = arg_absolute(req, args, "path", 1))) {
		return;
	}
	if (arg_str(args, "cbt_log") && !(cbt_log = arg_absolute(req, args, "cbt_log", 1))) {
		free(path);
		return;
	}
	sr = calloc(1, sizeof(*sr));
	if (!sr) {
		free(path);
		free(cbt_log);
		ctl_reply_error(req, ENOMEM, "out of memory");
		return;
	}
	sr->req = req;
	sr->minor = vbd->minor;
	vbd_snapshot(vbd, path, cbt_log, snapshot_done, sr);
	free(path);
	free(cbt_log);
}

/* ---- block jobs ---- */

static void
cmd_mirror(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	const char *sync = arg_str(args, "sync");
	json_int_t speed = json_integer_value(json_object_get(args, "speed"));
	char *dest;

	if (!vbd)
		return;
	if (sync && strcmp(sync, "full") && strcmp(sync, "top")) {
		ctl_reply_error(req, EINVAL, "sync is full or top, not '%s'", sync);
		return;
	}
	if (speed < 0) {
		ctl_reply_error(req, EINVAL, "speed is bytes per second, 0 or more");
		return;
	}
	if (!(dest = arg_absolute(req, args, "dest", 0)))
		return;
	mirror_start(vbd, dest, sync && !strcmp(sync, "top"), (uint64_t)speed, reply_done, req);
	free(dest);
}

static void
cmd_stream(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	json_int_t speed = json_integer_value(json_object_get(args, "speed"));

	if (!vbd)
		return;
	char *base = NULL;

	if (speed < 0) {
		ctl_reply_error(req, EINVAL, "speed is bytes per second, 0 or more");
		return;
	}
	if (arg_str(args, "base") && !(base = arg_absolute(req, args, "base", 1)))
		return;
	stream_start(vbd, base, (uint64_t)speed, reply_done, req);
	free(base);
}

static void
cmd_commit(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	json_int_t speed = json_integer_value(json_object_get(args, "speed"));
	char *top = NULL, *base = NULL;

	if (!vbd)
		return;
	if (speed < 0) {
		ctl_reply_error(req, EINVAL, "speed is bytes per second, 0 or more");
		return;
	}
	if ((arg_str(args, "top") && !(top = arg_absolute(req, args, "top", 1))) ||
	    (arg_str(args, "base") && !(base = arg_absolute(req, args, "base", 1)))) {
		free(top);
		return;
	}
	commit_start(vbd, top, base, (uint64_t)speed, reply_done, req);
	free(top);
	free(base);
}

static void
cmd_job_pivot(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	if (vbd)
		mirror_pivot(vbd->job, reply_done, req);
}

static void
cmd_job_cancel(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args);
	if (vbd)
		blockjob_cancel(vbd->job, reply_done, req);
}

/* server_gather's doc: the vbd's job, running or the last one; on its loop. */
static json_t *
job_doc(struct vbd *vbd, void *arg)
{
	json_int_t minor = *(json_int_t *)arg;
	if (!vbd->job || (minor >= 0 && vbd->minor != minor))
		return NULL;
	return blockjob_json(vbd->job);
}

struct job_list_req {
	struct ctl_req *req;
	json_int_t minor;
};

static void
job_list_gathered(json_t *all, void *arg)
{
	struct job_list_req *l = arg;

	ctl_reply_ok(l->req, json_pack("{s:O}", "jobs", json_object_get(all, "vbds")));
	json_decref(all);
	free(l);
}

static void
cmd_job_list(struct ctl_req *req, json_t *args)
{
	struct job_list_req *l = calloc(1, sizeof(*l));
	json_t *minor = json_object_get(args, "minor");

	if (!l || (l->req = req, l->minor = minor ? json_integer_value(minor) : -1,
		   server_gather(ctl_req_server(req), job_doc, &l->minor, job_list_gathered,
				 l) < 0)) {
		free(l);
		ctl_reply_error(req, ENOMEM, "out of memory");
	}
}

/* ---- qos ---- */

/*
 * Exactly one of minor and group; replies an error otherwise. A group's
 * command runs on the group's loop (a group made here, before it has any
 * member, lives on loop 0): 1 when fn was sent there.
 */
static int
qos_target(struct ctl_req *req, json_t *args, struct vbd **vbd, const char **group,
	   void (*fn)(struct ctl_req *, json_t *))
{
	struct server *srv = ctl_req_server(req);

	*vbd = NULL;
	*group = arg_str(args, "group");
	if (!json_object_get(args, "minor") == !*group) {
		ctl_reply_error(req, EINVAL, "name either a minor or a group");
		return -1;
	}
	if (*group) {
		struct loop *l = qos_group_loop(srv, *group);
		if (loop_current() == srv->loops[0] && l && l != loop_current()) {
			ctl_req_run_on(req, l, fn, args);
			return 1;
		}
		return 0;
	}
	if (!(*vbd = arg_vbd(req, args)))
		return -1;
	return 0;
}

static void
cmd_qos_get(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd;
	const char *group;

	if (qos_target(req, args, &vbd, &group, cmd_qos_get))
		return;
	if (vbd) {
		ctl_reply_ok(req, qos_vbd_get(vbd));
		return;
	}
	json_t *g = qos_group_get(ctl_req_server(req), group);
	if (g)
		ctl_reply_ok(req, g);
	else
		ctl_reply_error(req, ENOENT, "qos group %s: no such group", group);
}

static void
cmd_qos_set(struct ctl_req *req, json_t *args)
{
	json_t *limits = json_object_get(args, "limits");
	struct vbd *vbd;
	const char *group;
	char why[256];
	int rc;

	if (qos_target(req, args, &vbd, &group, cmd_qos_set))
		return;
	if (vbd)
		rc = qos_vbd_set(vbd, limits, why, sizeof(why));
	else
		rc = qos_group_set(ctl_req_server(req), group, limits, why, sizeof(why));
	if (rc < 0) {
		ctl_reply_error(req, -rc, "%s", why);
		return;
	}
	if (vbd) {
		ctl_reply_ok(req, qos_vbd_get(vbd));
		return;
	}
	/* a group without limits or members is not kept: say so as zeros */
	json_t *g = qos_group_get(ctl_req_server(req), group);
	struct qos_config none = { 0 };
	ctl_reply_ok(req, g ? g : json_pack("{s:s, s:o, s:[], s:i}", "group", group,
					    "limits", qos_config_json(&none), "members",
					    "throttled", 0));
}

/* ---- fault-inject (tapdiskd --fault-injection: testing only) ---- */

static const struct {
	const char *name;
	int err;	/* 0: a short write */
} fault_errors[] = {
	{ "EIO", EIO }, { "ENOSPC", ENOSPC }, { "short-write", 0 },
	{ "EAGAIN", EAGAIN }, { "EBUSY", EBUSY }, { "EINTR", EINTR },
};

static const char *
fault_error_name(const struct io_fault_spec *sp)
{
	for (size_t i = 0; i < sizeof(fault_errors) / sizeof(fault_errors[0]); i++)
		if (sp->short_write ? !fault_errors[i].err
				    : fault_errors[i].err && fault_errors[i].err == sp->err)
			return fault_errors[i].name;
	return "EIO";
}

static json_t *
fault_kinds_json(unsigned kinds)
{
	json_t *a = json_array();
	for (unsigned k = 1; k <= IO_FAULT_TRUNCATE; k <<= 1)
		if (kinds & k)
			json_array_append_new(a, json_string(io_fault_kind_name(k)));
	return a;
}

/* The spec the args describe, or -1 with the error replied. */
static int
fault_spec(struct ctl_req *req, json_t *args, struct io_fault_spec *sp)
{
	json_int_t nth = json_integer_value(json_object_get(args, "nth"));
	json_t *jc = json_object_get(args, "count");
	json_int_t count = jc ? json_integer_value(jc) : 1;
	const char *error = arg_str(args, "error"), *kinds = arg_str(args, "kinds");
	const char *path = arg_str(args, "path");
	size_t i = 0;

	memset(sp, 0, sizeof(*sp));
	if (nth < 1 || count < 1 || count > 1000000) {
		ctl_reply_error(req, EINVAL, nth < 1 ? "nth counts from 1 (the next I/O)"
					      : "count must be 1 to 1000000");
		return -1;
	}
	while (error && i < sizeof(fault_errors) / sizeof(fault_errors[0]) &&
	       strcmp(error, fault_errors[i].name))
		i++;
	if (i == sizeof(fault_errors) / sizeof(fault_errors[0])) {
		ctl_reply_error(req, EINVAL, "error %s: not one of EIO, ENOSPC, short-write, "
				"EAGAIN, EBUSY, EINTR", error);
		return -1;
	}
	if (kinds && io_fault_parse_kinds(kinds, &sp->kinds) < 0) {
		ctl_reply_error(req, EINVAL, "kinds %s: a comma-separated list of read, write, "
				"sync, fallocate, truncate", kinds);
		return -1;
	}
	if (path && strlen(path) >= sizeof(sp->path)) {
		ctl_reply_error(req, EINVAL, "path: at most %zu bytes", sizeof(sp->path) - 1);
		return -1;
	}
	snprintf(sp->path, sizeof(sp->path), "%s", path ? path : "");
	sp->nth = (uint64_t)nth;
	sp->count = (unsigned)count;
	sp->err = error ? fault_errors[i].err : EIO;
	sp->short_write = error && !fault_errors[i].err;
	return 0;
}

static void
cmd_fault_inject(struct ctl_req *req, json_t *args)
{
	struct io_fault_status st;
	struct io_fault_spec sp = { 0 };

	io_fault_get_status(&st);
	if (!st.enabled) {
		ctl_reply_error(req, ENOTSUP, "fault injection is off: start tapdiskd with "
				"--fault-injection (testing only)");
		return;
	}
	if (json_object_get(args, "nth") && arg_bool(args, "disarm")) {
		ctl_reply_error(req, EINVAL, "either arm (nth) or disarm, not both");
		return;
	}
	if (json_object_get(args, "nth") && fault_spec(req, args, &sp) < 0)
		return;
	if (json_object_get(args, "nth") || arg_bool(args, "disarm")) {
		if (json_object_get(args, "nth"))
			io_fault_arm(&sp);
		else
			io_fault_disarm();
		io_fault_get_status(&st);
	}
	json_t *r = json_pack("{s:b, s:I, s:i, s:s, s:o, s:s, s:I, s:I, s:I}",
			      "armed", st.armed, "nth", (json_int_t)st.spec.nth,
			      "count", (int)st.spec.count, "error", fault_error_name(&st.spec),
			      "kinds", fault_kinds_json(st.spec.kinds), "path", st.spec.path,
			      "seen", (json_int_t)st.seen, "injected", (json_int_t)st.injected,
			      "total", (json_int_t)st.total);
	if (st.total)
		json_object_set_new(r, "last", json_pack("{s:s, s:s, s:I, s:I}",
			"kind", io_fault_kind_name(st.last_kind), "path", st.last_path,
			"offset", (json_int_t)st.last_offset, "length", (json_int_t)st.last_length));
	ctl_reply_ok(req, r);
}

const struct ctl_cmd ctl_cmds[] = {
	{ "version", ctl_args_none, cmd_version, 0 },
	{ "list", ctl_args_list, cmd_list, 0 },
	{ "stats", ctl_args_stats, cmd_stats, CTL_ON_VBD_LOOP },
	{ "open", ctl_args_open, cmd_open, 0 },
	{ "create", ctl_args_open, cmd_open, 0 },
	{ "close", ctl_args_close, cmd_close, CTL_ON_VBD_LOOP },
	{ "destroy", ctl_args_close, cmd_destroy, CTL_ON_VBD_LOOP },
	{ "pause", ctl_args_minor, cmd_pause, CTL_ON_VBD_LOOP },
	{ "unpause", ctl_args_unpause, cmd_unpause, CTL_ON_VBD_LOOP },
	{ "snapshot", ctl_args_snapshot, cmd_snapshot, CTL_ON_VBD_LOOP },
	{ "qos-get", ctl_args_qos_get, cmd_qos_get, CTL_ON_VBD_LOOP },
	{ "qos-set", ctl_args_qos_set, cmd_qos_set, CTL_ON_VBD_LOOP },
	{ "fault-inject", ctl_args_fault_inject, cmd_fault_inject, 0 },
	{ "mirror", ctl_args_mirror, cmd_mirror, CTL_ON_VBD_LOOP },
	{ "stream", ctl_args_stream, cmd_stream, CTL_ON_VBD_LOOP },
	{ "commit", ctl_args_commit, cmd_commit, CTL_ON_VBD_LOOP },
	{ "job-pivot", ctl_args_minor, cmd_job_pivot, CTL_ON_VBD_LOOP },
	{ "job-cancel", ctl_args_minor, cmd_job_cancel, CTL_ON_VBD_LOOP },
	{ "job-list", ctl_args_job_list, cmd_job_list, 0 },
	{ NULL, NULL, NULL, 0 },
};
