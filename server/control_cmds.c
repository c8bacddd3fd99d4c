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
#include "log.h"
#include "metrics_http.h"
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

/* The vbd named by args.minor, or replies an error and returns NULL. */
static struct vbd *
arg_vbd(struct ctl_req *req, json_t *args, int want_open)
{
	json_int_t m = json_integer_value(json_object_get(args, "minor"));
	struct vbd *vbd = server_vbd(ctl_req_server(req), (int)m);

	if (m < 0 || m >= SERVER_MAX_MINORS) {
		ctl_reply_error(req, EINVAL, "minor %lld is out of range (0..%d)",
				(long long)m, SERVER_MAX_MINORS - 1);
		return NULL;
	}
	if (!vbd || (want_open && (vbd->state & VBD_CLOSED))) {
		ctl_reply_error(req, ENOENT, "minor %lld: no %svbd", (long long)m,
				vbd ? "open " : "");
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
	ctl_reply_ok(req, json_pack("{s:s, s:i, s:i, s:s, s:s, s:i, s:i, s:s*}",
				    "version", TAPDISKD_VERSION,
				    "protocol", CONTROL_PROTOCOL_VERSION,
				    "pid", (int)srv->pid,
				    "io_engine", io_engine_name(srv->io),
				    "state_dir", srv->state_dir,
				    "vbds", (int)server_vbd_count(srv),
				    "nbd_connections", (int)nbd_connection_count(srv->nbd),
				    "metrics", metrics_http_address(srv->metrics)));
}

/* ---- list ---- */

static void
cmd_list(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	json_t *minor = json_object_get(args, "minor");
	const char *type = arg_str(args, "type"), *path = arg_str(args, "path");
	json_t *vbds = json_array();

	for (int m = 0; m < SERVER_MAX_MINORS; m++) {
		struct vbd *vbd = srv->minors[m];
		if (!vbd || (minor && json_integer_value(minor) != m))
			continue;
		json_t *info = vbd_info_json(vbd);
		const char *t = json_string_value(json_object_get(info, "type"));
		const char *p = json_string_value(json_object_get(info, "path"));
		if ((type && (!t || strcmp(type, t))) || (path && (!p || strcmp(path, p)))) {
			json_decref(info);
			continue;
		}
		json_array_append_new(vbds, info);
	}
	ctl_reply_ok(req, json_pack("{s:o}", "vbds", vbds));
}

/* ---- stats ---- */

/* The stats as they are; with reset, the vbd's counters start again from zero. */
static json_t *
stats_take(struct vbd *vbd, int reset)
{
	json_t *st = vbd_stats_json(vbd);

	if (reset)
		vbd_stats_reset(vbd);
	return st;
}

static void
cmd_stats(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	int reset = arg_bool(args, "reset");

	if (json_object_get(args, "minor")) {
		struct vbd *vbd = arg_vbd(req, args, 1);
		if (vbd)
			ctl_reply_ok(req, stats_take(vbd, reset));
		return;
	}
	json_t *all = server_stats_json(srv);
	if (reset)	/* same loop turn: nothing completes in between */
		for (int m = 0; m < SERVER_MAX_MINORS; m++)
			if (srv->minors[m] && srv->minors[m]->params)
				vbd_stats_reset(srv->minors[m]);
	ctl_reply_ok(req, all);
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
	struct vbd *vbd = server_vbd(ctl_req_server(req), o->minor);

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
	json_t *qos = json_object_get(args, "qos");
	char why[256];
	if (qos && qos_vbd_check(qos, why, sizeof(why)) < 0) {
		ctl_reply_error(req, EINVAL, "qos: %s", why);
		return;
	}
	char *params = arg_absolute(req, args, "params", 0);
	if (!params)
		return;
	o = calloc(1, sizeof(*o));
	if (!o) {
		free(params);
		ctl_reply_error(req, ENOMEM, "out of memory");
		return;
	}
	o->req = req;
	o->minor = (int)m;
	o->qos = json_incref(qos);
	rc = server_open_vbd(srv, (int)m, params,
			     (arg_bool(args, "readonly") ? VBD_OPEN_READONLY : 0) |
			     (arg_bool(args, "nodirect") ? VBD_OPEN_NODIRECT : 0), open_done, o);
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
	struct vbd *vbd = arg_vbd(req, args, 1);
	if (vbd)
		vbd_close(vbd, arg_bool(args, "force"), 0, reply_done, req);
}

static void
cmd_destroy(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args, 0);
	if (vbd)
		vbd_close(vbd, arg_bool(args, "force"), 1, reply_done, req);
}

/* ---- pause / unpause ---- */

static void
cmd_pause(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args, 1);
	if (vbd)
		vbd_pause(vbd, reply_done, req);
}

static void
cmd_unpause(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args, 1);
	char *params = NULL;

	if (!vbd || (arg_str(args, "params") && !(params = arg_absolute(req, args, "params", 0))))
		return;
	vbd_unpause(vbd, params, reply_done, req);
	free(params);
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
	else
		ctl_reply_ok(sr->req, json_pack("{s:s?}", "params", vbd ? vbd->params : NULL));
	free(sr);
}

static void
cmd_snapshot(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args, 1);
	struct snap_req *sr;

	char *path;

	if (!vbd || !(path = arg_absolute(req, args, "path", 1)))
		return;
	sr = calloc(1, sizeof(*sr));
	if (!sr) {
		free(path);
		ctl_reply_error(req, ENOMEM, "out of memory");
		return;
	}
	sr->req = req;
	sr->minor = vbd->minor;
	vbd_snapshot(vbd, path, snapshot_done, sr);
	free(path);
}

/* ---- qos ---- */

/* Exactly one of minor and group; replies an error otherwise. */
static int
qos_target(struct ctl_req *req, json_t *args, struct vbd **vbd, const char **group)
{
	*vbd = NULL;
	*group = arg_str(args, "group");
	if (!json_object_get(args, "minor") == !*group) {
		ctl_reply_error(req, EINVAL, "name either a minor or a group");
		return -1;
	}
	if (!*group && !(*vbd = arg_vbd(req, args, 1)))
		return -1;
	return 0;
}

static void
cmd_qos_get(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd;
	const char *group;

	if (qos_target(req, args, &vbd, &group) < 0)
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

	if (qos_target(req, args, &vbd, &group) < 0)
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

const struct ctl_cmd ctl_cmds[] = {
	{ "version", ctl_args_none, cmd_version },
	{ "list", ctl_args_list, cmd_list },
	{ "stats", ctl_args_stats, cmd_stats },
	{ "open", ctl_args_open, cmd_open },
	{ "create", ctl_args_open, cmd_open },
	{ "close", ctl_args_close, cmd_close },
	{ "destroy", ctl_args_close, cmd_destroy },
	{ "pause", ctl_args_pause, cmd_pause },
	{ "unpause", ctl_args_unpause, cmd_unpause },
	{ "snapshot", ctl_args_snapshot, cmd_snapshot },
	{ "qos-get", ctl_args_qos_get, cmd_qos_get },
	{ "qos-set", ctl_args_qos_set, cmd_qos_set },
	{ NULL, NULL, NULL },
};
