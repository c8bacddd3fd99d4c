/*
 * libFuzzer target: one control-socket client (control.c): line framing,
 * the JSON envelope, argument validation against the command table, the
 * pending-request limit and replies sent now or later.
 *
 * The real command handlers (control_cmds.c) open, create and destroy
 * images on the host, so they are not linked: this file defines ctl_cmds[]
 * with the same names and argument tables, and handlers that touch nothing
 * but reply the way the real ones do: at once with a result or an error,
 * or a few loop turns later (as open, close and pause do).
 *
 * Input layout:
 *   byte 0  mode
 *     0x01  deliver the input in chunks of ((mode >> 3) + 1) bytes
 *     0x02  slow reader: leave the server's replies unread until the end
 *     0x04  hang up right after sending (replies still owed)
 *   rest    the client's bytes (newline-delimited JSON requests)
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <jansson.h>

#include "control.h"
#include "fuzz_common.h"
#include "log.h"
#include "server.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define M_CHUNKED	0x01
#define M_HOLD		0x02
#define M_EARLY_EOF	0x04
#define M_CHUNK(m)	((size_t)((m) >> 3) + 1)

static struct server srv;
static struct control *ctl;
static unsigned later_pending;	/* deferred replies not sent yet */

/* ---- the command table ---- */

/* Replies after `turns` more loop turns, like a handler waiting for I/O. */
struct later {
	struct ctl_req *req;
	int turns;
	int err;
	json_t *result;
	char msg[64];
};

static void later_cb(evutil_socket_t fd, short what, void *arg);

static void
later_schedule(struct later *l)
{
	/* no timeout: active at once, yet run from the loop, not from here */
	if (event_base_once(srv.base, -1, EV_TIMEOUT, later_cb, l, NULL) < 0)
		fz_fail("event_base_once failed");
}

static void
later_cb(evutil_socket_t fd, short what, void *arg)
{
	struct later *l = arg;
	(void)fd;
	(void)what;

	if (l->turns-- > 0) {
		later_schedule(l);
		return;
	}
	later_pending--;
	if (l->err)
		ctl_reply_error(l->req, l->err, "%s", l->msg);
	else
		ctl_reply_ok(l->req, l->result);
	free(l);
}

static void
reply_later(struct ctl_req *req, int turns, int err, const char *msg, json_t *result)
{
	struct later *l = calloc(1, sizeof(*l));
	if (!l)
		fz_fail("out of memory");
	l->req = req;
	l->turns = turns;
	l->err = err;
	l->result = result;
	snprintf(l->msg, sizeof(l->msg), "%s", msg ? msg : "");
	later_pending++;
	later_schedule(l);
}

/* The minor argument as the real handlers read it, and a turn count from it. */
static json_int_t
arg_minor(json_t *args, int *present)
{
	json_t *m = json_object_get(args, "minor");
	*present = m != NULL;
	return json_integer_value(m);
}

static int
turns_of(json_int_t m)
{
	return (int)((uint64_t)m % 4);
}

static const struct ctl_arg no_args[] = { { NULL, 0, 0 } };

static void
cmd_version(struct ctl_req *req, json_t *args)
{
	struct server *s = ctl_req_server(req);
	(void)args;
	ctl_reply_ok(req, json_pack("{s:s, s:i, s:i, s:s, s:s, s:i, s:i}",
				    "version", "fuzz", "protocol", CONTROL_PROTOCOL_VERSION,
				    "pid", (int)s->pid, "io_engine", "none",
				    "state_dir", s->state_dir, "vbds", 0, "nbd_connections", 0));
}

static const struct ctl_arg list_args[] = {
	{ "minor", ARG_INT, 0 },
	{ "type", ARG_STRING, 0 },
	{ "path", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_list(struct ctl_req *req, json_t *args)
{
	/* echo the filters: client strings go back out through the encoder */
	ctl_reply_ok(req, json_pack("{s:[], s:O}", "vbds", "filter", args));
}

static const struct ctl_arg stats_args[] = {
	{ "minor", ARG_INT, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_stats(struct ctl_req *req, json_t *args)
{
	int has;
	json_int_t m = arg_minor(args, &has);

	if (!has) {
		ctl_reply_ok(req, json_pack("{s:[]}", "vbds"));
		return;
	}
	if (m < 0 || m >= SERVER_MAX_MINORS)
		ctl_reply_error(req, EINVAL, "minor %lld is out of range (0..%d)",
				(long long)m, SERVER_MAX_MINORS - 1);
	else
		ctl_reply_error(req, ENOENT, "minor %lld: no vbd", (long long)m);
}

static const struct ctl_arg open_args[] = {
	{ "params", ARG_STRING, 1 },
	{ "minor", ARG_INT, 0 },
	{ "readonly", ARG_BOOL, 0 },
	{ "nodirect", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_open(struct ctl_req *req, json_t *args)
{
	const char *params = json_string_value(json_object_get(args, "params"));
	int has;
	json_int_t m = arg_minor(args, &has);

	if (has && (m < 0 || m >= SERVER_MAX_MINORS)) {
		ctl_reply_error(req, EINVAL, "minor %lld is out of range (0..%d)",
				(long long)m, SERVER_MAX_MINORS - 1);
		return;
	}
	if (!strchr(params, ':')) {
		/* the real one quotes the whole parameter string back */
		ctl_reply_error(req, EINVAL, "'%s' is not TYPE:PATH (e.g. aio:/srv/disk.img)",
				params);
		return;
	}
	if (strncmp(params, "ram:", 4) != 0) {
		reply_later(req, turns_of(m), ENOENT, "No such file or directory", NULL);
		return;
	}
	reply_later(req, turns_of(m), 0, NULL,
		    json_pack("{s:I, s:s, s:I, s:i, s:b, s:s}", "minor", has ? m : 0,
			      "params", params, "size", (json_int_t)4 << 20,
			      "sector_size", 512,
			      "readonly", json_is_true(json_object_get(args, "readonly")),
			      "nbd", ""));
}

static const struct ctl_arg close_args[] = {
	{ "minor", ARG_INT, 1 },
	{ "force", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_close(struct ctl_req *req, json_t *args)
{
	int has;
	json_int_t m = arg_minor(args, &has);

	if (m < 0 || m >= SERVER_MAX_MINORS)
		ctl_reply_error(req, EINVAL, "minor %lld is out of range (0..%d)",
				(long long)m, SERVER_MAX_MINORS - 1);
	else if (m % 2)
		ctl_reply_error(req, ENOENT, "minor %lld: no open vbd", (long long)m);
	else	/* a close that drains I/O first: {} some turns later */
		reply_later(req, turns_of(m / 2), 0, NULL, NULL);
}

static const struct ctl_arg pause_args[] = {
	{ "minor", ARG_INT, 1 },
	{ NULL, 0, 0 },
};

static void
cmd_pause(struct ctl_req *req, json_t *args)
{
	int has;
	json_int_t m = arg_minor(args, &has);
	if (m < 0 || m >= SERVER_MAX_MINORS)
		ctl_reply_error(req, EINVAL, "minor %lld is out of range", (long long)m);
	else
		reply_later(req, turns_of(m), 0, NULL, NULL);
}

static const struct ctl_arg unpause_args[] = {
	{ "minor", ARG_INT, 1 },
	{ "params", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

static void
cmd_unpause(struct ctl_req *req, json_t *args)
{
	int has;
	json_int_t m = arg_minor(args, &has);
	if (json_object_get(args, "params"))
		reply_later(req, turns_of(m), 0, NULL, NULL);
	else
		reply_later(req, turns_of(m), EINVAL, "vbd is not paused", NULL);
}

const struct ctl_cmd ctl_cmds[] = {
	{ "version", no_args, cmd_version },
	{ "list", list_args, cmd_list },
	{ "stats", stats_args, cmd_stats },
	{ "open", open_args, cmd_open },
	{ "create", open_args, cmd_open },
	{ "close", close_args, cmd_close },
	{ "destroy", close_args, cmd_close },
	{ "pause", pause_args, cmd_pause },
	{ "unpause", unpause_args, cmd_unpause },
	{ NULL, NULL, NULL },
};

/* ---- setup ---- */

static void
setup(void)
{
	char dir[] = "/tmp/tapdiskd-fuzz-ctl-XXXXXX";
	char path[sizeof(dir) + 16];
	char err[256];

	log_init("fuzz_control", 0, LOG_LVL_ERR);
	signal(SIGPIPE, SIG_IGN);
	srv.base = event_base_new();
	if (!srv.base)
		fz_fail("event_base_new failed");
	srv.pid = getpid();
	srv.state_dir = "/nonexistent/fuzz";	/* only ever printed */
	srv.started = time(NULL);

	/*
	 * control_new() insists on a listening socket. Make it in a private
	 * directory and remove both at once: the listener stays open but no
	 * one can reach it, and nothing is left on the host.
	 */
	if (!mkdtemp(dir))
		fz_fail("mkdtemp: %s", strerror(errno));
	snprintf(path, sizeof(path), "%s/ctl", dir);
	ctl = control_new(&srv, path, err, sizeof(err));
	unlink(path);
	rmdir(dir);
	if (!ctl)
		fz_fail("control_new: %s", err);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	static const char warm[] = "\0{\"id\":1,\"cmd\":\"pause\",\"args\":{\"minor\":1}}\n";
	(void)argc;
	(void)argv;
	setup();
	/* warms up what libevent and jansson allocate once */
	LLVMFuzzerTestOneInput((const uint8_t *)warm, sizeof(warm) - 1);
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_client cl;
	struct bufferevent *sbev;

	if (size < 1)
		return 0;
	uint8_t mode = data[0];
	data++;
	size--;

	fz_client_open(srv.base, &cl, (mode & M_HOLD) != 0, &sbev);
	control_serve(ctl, sbev);
	fz_settle(srv.base);
	fz_client_send(srv.base, &cl, data, size, (mode & M_CHUNKED) ? M_CHUNK(mode) : 0, 1);
	if (mode & M_EARLY_EOF)
		fz_client_shutdown(&cl);
	fz_settle(srv.base);
	fz_client_release(srv.base, &cl);
	if (fz_client_connected(&cl)) {
		size_t unread = evbuffer_get_length(bufferevent_get_output(cl.bev));
		if (unread && !(mode & M_EARLY_EOF))
			fz_fail("the server stopped reading with %zu client bytes pending "
				"and no reply owed", unread);
	}
	if (!(mode & M_EARLY_EOF))
		fz_client_shutdown(&cl);
	fz_settle(srv.base);
	fz_client_release(srv.base, &cl);
	if (later_pending)
		fz_fail("%u deferred replies never ran", later_pending);
	if (fz_client_connected(&cl))
		fz_fail("the server kept its end open after EOF with no reply owed");
	fz_client_close(&cl);
	fz_settle(srv.base);
	return 0;
}
