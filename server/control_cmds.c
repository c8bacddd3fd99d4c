/*
 * The control commands: one table entry each (name, arguments, handler).
 * The arguments here and the request schemas in schema/ describe the same
 * thing; tests check every schema'd field against this table's answers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control.h"
#include "io.h"
#include "nbd.h"
#include "server.h"
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

static const struct ctl_arg no_args[] = { { NULL, 0, 0 } };

static void
cmd_version(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);
	(void)args;
	ctl_reply_ok(req, json_pack("{s:s, s:i, s:i, s:s, s:s, s:i, s:i}",
				    "version", TAPDISKD_VERSION,
				    "protocol", CONTROL_PROTOCOL_VERSION,
				    "pid", (int)srv->pid,
				    "io_engine", io_engine_name(srv->io),
				    "state_dir", srv->state_dir,
				    "vbds", (int)server_vbd_count(srv),
				    "nbd_connections", (int)nbd_connection_count(srv->nbd)));
}

/* ---- list ---- */

static const struct ctl_arg list_args[] = {
	{ "minor", ARG_INT, 0 },
	{ "type", ARG_STRING, 0 },
	{ "path", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

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

static const struct ctl_arg stats_args[] = {
	{ "minor", ARG_INT, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_stats(struct ctl_req *req, json_t *args)
{
	struct server *srv = ctl_req_server(req);

	if (json_object_get(args, "minor")) {
		struct vbd *vbd = arg_vbd(req, args, 1);
		if (vbd)
			ctl_reply_ok(req, vbd_stats_json(vbd));
		return;
	}
	json_t *vbds = json_array();
	for (int m = 0; m < SERVER_MAX_MINORS; m++)
		if (srv->minors[m] && srv->minors[m]->params)
			json_array_append_new(vbds, vbd_stats_json(srv->minors[m]));
	ctl_reply_ok(req, json_pack("{s:o}", "vbds", vbds));
}

/* ---- open / create ---- */

static const struct ctl_arg open_args[] = {
	{ "params", ARG_STRING, 1 },
	{ "minor", ARG_INT, 0 },
	{ "readonly", ARG_BOOL, 0 },
	{ "nodirect", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

struct open_req {
	struct ctl_req *req;
	int minor;
};

static void
open_done(void *arg, int err, const char *msg)
{
	struct open_req *o = arg;
	struct ctl_req *req = o->req;
	struct vbd *vbd = server_vbd(ctl_req_server(req), o->minor);

	if (err) {
		ctl_reply_error(req, err, "%s", msg ? msg : strerror(err));
	} else {
		char *nbd = server_nbd_path(vbd->srv, vbd->minor);
		ctl_reply_ok(req, json_pack("{s:i, s:s, s:I, s:i, s:b, s:s}",
					    "minor", vbd->minor, "params", vbd->params,
					    "size", (json_int_t)vbd->size,
					    "sector_size", (int)vbd->sector_size,
					    "readonly", vbd->readonly, "nbd", nbd ? nbd : ""));
		free(nbd);
	}
	free(o);
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
	o = calloc(1, sizeof(*o));
	if (!o) {
		ctl_reply_error(req, ENOMEM, "out of memory");
		return;
	}
	o->req = req;
	o->minor = (int)m;
	rc = server_open_vbd(srv, (int)m, arg_str(args, "params"),
			     (arg_bool(args, "readonly") ? VBD_OPEN_READONLY : 0) |
			     (arg_bool(args, "nodirect") ? VBD_OPEN_NODIRECT : 0), open_done, o);
	if (rc < 0) {
		free(o);
		if (rc == -EBUSY)
			ctl_reply_error(req, EBUSY, "minor %lld is in use", (long long)m);
		else
			ctl_reply_error(req, -rc, "%s", strerror(-rc));
	}
}

/* ---- close / destroy ---- */

static const struct ctl_arg close_args[] = {
	{ "minor", ARG_INT, 1 },
	{ "force", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

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

static const struct ctl_arg pause_args[] = {
	{ "minor", ARG_INT, 1 },
	{ NULL, 0, 0 },
};

static void
cmd_pause(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args, 1);
	if (vbd)
		vbd_pause(vbd, reply_done, req);
}

static const struct ctl_arg unpause_args[] = {
	{ "minor", ARG_INT, 1 },
	{ "params", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_unpause(struct ctl_req *req, json_t *args)
{
	struct vbd *vbd = arg_vbd(req, args, 1);
	if (vbd)
		vbd_unpause(vbd, arg_str(args, "params"), reply_done, req);
}

const struct ctl_cmd ctl_cmds[] = {
	{ "version", no_args, cmd_version },
	{ "list", list_args, cmd_list },
	{ "stats", stats_args, cmd_stats },
	{ "open", open_args, cmd_open },
	{ "create", open_args, cmd_open },
	{ "close", close_args, cmd_close },
	{ "destroy", close_args, cmd_destroy },
	{ "pause", pause_args, cmd_pause },
	{ "unpause", unpause_args, cmd_unpause },
	{ NULL, NULL, NULL },
};
