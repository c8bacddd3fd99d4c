/*
 * Control socket transport: accepts local clients whose uid is root or our
 * own, reads one JSON request per line (bounded), validates the envelope
 * and the arguments against the command's table entry, and writes exactly
 * one response per request, possibly later (pause waits for I/O to drain).
 */
#include "control.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "fdlimit.h"
#include "log.h"
#include "loop.h"
#include "server.h"
#include "unixsock.h"

#define CTL_MAX_PENDING 64	/* per client: stop reading beyond */

struct control {
	struct server *srv;
	struct evconnlistener *lev;
	char *path;
	unsigned max_pending;		/* CTL_MAX_PENDING, or a test's own */
	size_t max_line;		/* CONTROL_MAX_LINE, or a test's own */
	struct log_ratelimit rl;
	LIST_HEAD(, ctl_client) clients;
};

struct ctl_client {
	struct control *ctl;
	struct bufferevent *bev;	/* NULL once gone */
	unsigned pending;		/* requests not answered yet */
	int closing;			/* close once the output is written */
	int paused;
	size_t scanned;			/* input already searched for a newline */
	LIST_ENTRY(ctl_client) link;
};

/*
 * A request: made on loop 0, where its client lives; its handler may run on
 * another loop (a vbd's), and its reply comes back to loop 0 through msg.
 */
struct ctl_req {
	struct mailbox_msg msg;
	struct ctl_client *client;	/* loop 0's only */
	struct server *srv;
	json_t *id;
	const struct ctl_cmd *cmd;
	json_t *reply;			/* on its way back to loop 0 */
	void (*run)(struct ctl_req *req, json_t *args);	/* on its way to another loop */
	json_t *args;
};

static void client_process(struct ctl_client *cl);

static const struct {
	int err;
	const char *name;
} errno_names[] = {
	{ EPERM, "EPERM" }, { ENOENT, "ENOENT" }, { EIO, "EIO" }, { E2BIG, "E2BIG" },
	{ EBADF, "EBADF" }, { EAGAIN, "EAGAIN" }, { ENOMEM, "ENOMEM" },
	{ EACCES, "EACCES" }, { EBUSY, "EBUSY" }, { EEXIST, "EEXIST" },
	{ ENODEV, "ENODEV" }, { ENOTDIR, "ENOTDIR" }, { EISDIR, "EISDIR" },
	{ EINVAL, "EINVAL" }, { ENFILE, "ENFILE" }, { EMFILE, "EMFILE" },
	{ EFBIG, "EFBIG" }, { ENOSPC, "ENOSPC" }, { EROFS, "EROFS" },
	{ ERANGE, "ERANGE" }, { ENAMETOOLONG, "ENAMETOOLONG" }, { ENOSYS, "ENOSYS" },
	{ ELOOP, "ELOOP" }, { ENOTSUP, "ENOTSUP" }, { EOVERFLOW, "EOVERFLOW" },
	{ ESHUTDOWN, "ESHUTDOWN" }, { ETIMEDOUT, "ETIMEDOUT" }, { ENXIO, "ENXIO" },
	{ EPROTO, "EPROTO" }, { ECANCELED, "ECANCELED" }, { ESRCH, "ESRCH" },
	{ EMSGSIZE, "EMSGSIZE" }, { EUCLEAN, "EUCLEAN" }, { EMLINK, "EMLINK" }, { EXDEV, "EXDEV" },
};

const char *
errno_name(int err)
{
	for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++)
		if (errno_names[i].err == err)
			return errno_names[i].name;
	return "EIO";
}

/* ---- clients ---- */

static void
client_maybe_free(struct ctl_client *cl)
{
	if (cl->bev || cl->pending)
		return;
	LIST_REMOVE(cl, link);
	free(cl);
}

static void
client_close(struct ctl_client *cl)
{
	if (cl->bev) {
		bufferevent_free(cl->bev);
		cl->bev = NULL;
	}
	client_maybe_free(cl);
}

/* Closes a client that is closing once it owes nothing more. */
static void
client_maybe_close(struct ctl_client *cl)
{
	if (cl->bev && cl->closing && !cl->pending &&
	    evbuffer_get_length(bufferevent_get_output(cl->bev)) == 0)
		client_close(cl);
}

static void
client_send(struct ctl_client *cl, json_t *msg)
{
	char *s = json_dumps(msg, JSON_COMPACT);
	if (s && cl->bev) {
		struct evbuffer *out = bufferevent_get_output(cl->bev);
		evbuffer_add(out, s, strlen(s));
		evbuffer_add(out, "\n", 1);
	}
	free(s);
}

static json_t *error_msg(json_t *id, int err, const char *msg);

static void req_finish(struct ctl_req *req, json_t *msg);

static void
req_reply_arrived(struct mailbox_msg *m)
{
	struct ctl_req *req = (struct ctl_req *)m;
	req_finish(req, req->reply);
}

static void
req_finish(struct ctl_req *req, json_t *msg)
{
	struct ctl_client *cl = req->client;

	if (loop_current() != req->srv->loops[0]) {
		/* the handler ran on a vbd's loop: the client is loop 0's */
		req->reply = msg;
		req->msg.fn = req_reply_arrived;
		loop_post(req->srv->loops[0], &req->msg);
		return;
	}

	/* every request gets its line, even when its answer cannot be encoded */
	if (!msg)
		msg = error_msg(req->id, EIO, "the response could not be encoded");
	client_send(cl, msg);
	json_decref(msg);
	json_decref(req->id);
	free(req);
	cl->pending--;
	if (!cl->bev) {
		client_maybe_free(cl);
		return;
	}
	if (cl->closing) {
		/* the write callback closes it once this reply is out */
		bufferevent_enable(cl->bev, EV_WRITE);
		return;
	}
	if (cl->paused && cl->pending < cl->ctl->max_pending) {
		cl->paused = 0;
		bufferevent_enable(cl->bev, EV_READ);
		client_process(cl);
	}
}

struct server *
ctl_req_server(struct ctl_req *req)
{
	return req->srv;
}

static void
req_run_arrived(struct mailbox_msg *m)
{
	struct ctl_req *req = (struct ctl_req *)m;
	json_t *args = req->args;

	req->args = NULL;
	req->run(req, args);
	json_decref(args);
}

void
ctl_req_run_on(struct ctl_req *req, struct loop *l, void (*fn)(struct ctl_req *, json_t *),
	       json_t *args)
{
	if (!l || l == loop_current()) {
		fn(req, args);
		return;
	}
	/* a copy of its own: jansson's reference counts are no thread's to share */
	if (!(req->args = json_deep_copy(args))) {
		ctl_reply_error(req, ENOMEM, "out of memory");
		return;
	}
	req->run = fn;
	req->msg.fn = req_run_arrived;
	loop_post(l, &req->msg);
}

/* The loop a command runs on: its vbd's, when it names one that lives elsewhere. */
static struct loop *
cmd_loop(struct server *srv, const struct ctl_cmd *cmd, json_t *args)
{
	json_t *m = json_object_get(args, "minor");

	if (!(cmd->flags & CTL_ON_VBD_LOOP) || !m)
		return NULL;
	return server_vbd_loop(srv, (int)json_integer_value(m));
}

void
ctl_reply_ok(struct ctl_req *req, json_t *result)
{
	req_finish(req, json_pack("{s:O, s:b, s:o}", "id", req->id, "ok", 1,
				  "result", result ? result : json_object()));
}

/* Length of the valid UTF-8 sequence at p (at most n bytes), or 0. */
static size_t
utf8_seq_len(const unsigned char *p, size_t n)
{
	size_t len;
	uint32_t cp;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf) {
		len = 2;
		cp = p[0] & 0x1f;
	} else if (p[0] >= 0xe0 && p[0] <= 0xef) {
		len = 3;
		cp = p[0] & 0x0f;
	} else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
		len = 4;
		cp = p[0] & 0x07;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (p[i] & 0x3f);
	}
	if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return len;
}

/*
 * Messages quote what clients sent and may be cut anywhere: replace every
 * byte that is not part of valid UTF-8 so the response can always be encoded.
 */
static void
utf8_repair(char *s)
{
	unsigned char *p = (unsigned char *)s;
	size_t n = strlen(s);

	while (n) {
		size_t len = utf8_seq_len(p, n);
		if (!len) {
			*p = '?';
			len = 1;
		}
		p += len;
		n -= len;
	}
}

static json_t *
error_msg(json_t *id, int err, const char *msg)
{
	char text[1024];

	snprintf(text, sizeof(text), "%s", msg);
	utf8_repair(text);
	return json_pack("{s:O, s:b, s:{s:s, s:s}}", "id", id ? id : json_null(), "ok", 0,
			 "error", "code", errno_name(err), "message", text);
}

void
ctl_reply_error(struct ctl_req *req, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	req_finish(req, error_msg(req->id, err, msg));
}

/* An error to a request that never became a ctl_req. */
static void
client_error(struct ctl_client *cl, json_t *id, int err, const char *msg)
{
	json_t *m = error_msg(id, err, msg);
	client_send(cl, m);
	json_decref(m);
}

/* ---- validation and dispatch ---- */

static const struct ctl_cmd *
cmd_find(const char *name)
{
	for (const struct ctl_cmd *c = ctl_cmds; c->name; c++)
		if (strcmp(c->name, name) == 0)
			return c;
	return NULL;
}

static const char *const type_names[] = { "a string", "an integer", "a boolean", "an object" };

static int
arg_type_ok(const json_t *v, enum ctl_arg_type t)
{
	switch (t) {
	case ARG_STRING: return json_is_string(v);
	case ARG_INT: return json_is_integer(v);
	case ARG_BOOL: return json_is_boolean(v);
	case ARG_OBJECT: return json_is_object(v);
	}
	return 0;
}

/* 0, or fills msg with what is wrong, naming the field. */
static int
args_check(const struct ctl_cmd *cmd, json_t *args, char *msg, size_t len)
{
	const char *key;
	json_t *v;

	json_object_foreach(args, key, v) {
		const struct ctl_arg *a;
		for (a = cmd->args; a->name; a++)
			if (strcmp(a->name, key) == 0)
				break;
		if (!a->name) {
			snprintf(msg, len, "%s: unknown argument '%s'", cmd->name, key);
			return -1;
		}
		if (!arg_type_ok(v, a->type)) {
			snprintf(msg, len, "%s: argument '%s' must be %s", cmd->name, key,
				 type_names[a->type]);
			return -1;
		}
	}
	for (const struct ctl_arg *a = cmd->args; a->name; a++) {
		if (a->required && !json_object_get(args, a->name)) {
			snprintf(msg, len, "%s: missing argument '%s'", cmd->name, a->name);
			return -1;
		}
	}
	return 0;
}

static void
client_line(struct ctl_client *cl, const char *line, size_t len)
{
	json_error_t jerr;
	json_t *msg = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
	json_t *id = NULL, *args;
	const char *key, *cmdname;
	json_t *v;
	char why[256];

	if (!msg) {
		snprintf(why, sizeof(why), "request is not valid JSON: %s", jerr.text);
		client_error(cl, NULL, EINVAL, why);
		return;
	}
	if (!json_is_object(msg)) {
		client_error(cl, NULL, EINVAL, "request must be a JSON object");
		goto out;
	}
	id = json_object_get(msg, "id");
	if (id && !json_is_integer(id) && !json_is_string(id) && !json_is_null(id)) {
		client_error(cl, NULL, EINVAL, "field 'id' must be an integer or a string");
		goto out;
	}
	json_object_foreach(msg, key, v) {
		if (strcmp(key, "id") && strcmp(key, "cmd") && strcmp(key, "args")) {
			snprintf(why, sizeof(why), "unknown field '%s'", key);
			client_error(cl, id, EINVAL, why);
			goto out;
		}
	}
	v = json_object_get(msg, "cmd");
	if (!json_is_string(v)) {
		client_error(cl, id, EINVAL, v ? "field 'cmd' must be a string"
					       : "missing field 'cmd'");
		goto out;
	}
	cmdname = json_string_value(v);
	const struct ctl_cmd *cmd = cmd_find(cmdname);
	if (!cmd) {
		snprintf(why, sizeof(why), "unknown command '%.64s'", cmdname);
		client_error(cl, id, EINVAL, why);
		goto out;
	}
	args = json_object_get(msg, "args");
	if (args && !json_is_object(args)) {
		client_error(cl, id, EINVAL, "field 'args' must be an object");
		goto out;
	}
	if (!args)
		args = json_object();
	else
		json_incref(args);
	if (args_check(cmd, args, why, sizeof(why)) < 0) {
		client_error(cl, id, EINVAL, why);
		json_decref(args);
		goto out;
	}
	struct ctl_req *req = calloc(1, sizeof(*req));
	if (!req) {
		client_error(cl, id, ENOMEM, "out of memory");
		json_decref(args);
		goto out;
	}
	req->client = cl;
	req->srv = cl->ctl->srv;
	/* the request's own copy: its reply may be made on another loop */
	req->id = id ? json_deep_copy(id) : json_null();
	if (!req->id) {
		free(req);
		client_error(cl, id, ENOMEM, "out of memory");
		json_decref(args);
		goto out;
	}
	req->cmd = cmd;
	cl->pending++;
	log_debug("control: %s", cmd->name);
	ctl_req_run_on(req, cmd_loop(req->srv, cmd, args), cmd->fn, args);
	json_decref(args);
out:
	json_decref(msg);
}

static void
client_process(struct ctl_client *cl)
{
	while (cl->bev && !cl->closing) {
		struct evbuffer *in = bufferevent_get_input(cl->bev);
		if (cl->pending >= cl->ctl->max_pending) {
			cl->paused = 1;
			bufferevent_disable(cl->bev, EV_READ);
			return;
		}
		/* search only what arrived since the last look: no rescans */
		struct evbuffer_ptr start, eol;
		size_t eol_len, len;
		evbuffer_ptr_set(in, &start, cl->scanned, EVBUFFER_PTR_SET);
		eol = evbuffer_search_eol(in, &start, &eol_len, EVBUFFER_EOL_LF);
		if (eol.pos < 0) {
			cl->scanned = evbuffer_get_length(in);
			if (cl->scanned > cl->ctl->max_line) {
				log_limited(&cl->ctl->rl, LOG_LVL_WARN,
					    "control: request longer than %zu bytes; disconnecting",
					    cl->ctl->max_line);
				client_error(cl, NULL, E2BIG, "request line too long");
				cl->closing = 1;
				bufferevent_disable(cl->bev, EV_READ);
			}
			return;
		}
		len = (size_t)eol.pos;
		cl->scanned = 0;
		char *line = len <= cl->ctl->max_line ? malloc(len + 1) : NULL;
		if (line) {
			evbuffer_remove(in, line, len);
			line[len] = '\0';
		} else {
			evbuffer_drain(in, len);
		}
		evbuffer_drain(in, eol_len);
		if (!line) {
			client_error(cl, NULL, E2BIG, "request line too long");
		} else if (len && !(len == 1 && line[0] == '\r')) {
			/* hold a reference: a handler may answer at once */
			cl->pending++;
			client_line(cl, line, len);
			cl->pending--;
		}
		free(line);
	}
}

static void
client_read_cb(struct bufferevent *bev, void *arg)
{
	(void)bev;
	client_process(arg);
}

static void
client_write_cb(struct bufferevent *bev, void *arg)
{
	(void)bev;
	client_maybe_close(arg);
}

static void
client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct ctl_client *cl = arg;

	if (what & BEV_EVENT_EOF) {
		/* the peer may have shut down only its side: answer, then close */
		if (evbuffer_get_length(bufferevent_get_input(bev)))
			client_error(cl, NULL, EINVAL,
				     "truncated request: no newline before end of input");
		cl->closing = 1;
		bufferevent_disable(bev, EV_READ);
		bufferevent_enable(bev, EV_WRITE);
		client_maybe_close(cl);
		return;
	}
	client_close(cl);
}

void
control_serve(struct control *ctl, struct bufferevent *bev)
{
	struct ctl_client *cl = calloc(1, sizeof(*cl));
	if (!cl) {
		bufferevent_free(bev);
		return;
	}
	cl->ctl = ctl;
	cl->bev = bev;
	LIST_INSERT_HEAD(&ctl->clients, cl, link);
	bufferevent_setcb(bev, client_read_cb, client_write_cb, client_event_cb, cl);
	bufferevent_enable(bev, EV_READ | EV_WRITE);
}

unsigned
control_pending(const struct control *ctl)
{
	const struct ctl_client *cl;
	unsigned n = 0;

	LIST_FOREACH(cl, &ctl->clients, link)
		n += cl->pending;
	return n;
}

void
control_set_limits(struct control *ctl, unsigned max_pending, size_t max_line)
{
	ctl->max_pending = max_pending ? max_pending : 1;
	ctl->max_line = max_line ? max_line : 1;
}

static void
control_accept(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa,
	       int salen, void *arg)
{
	struct control *ctl = arg;
	uid_t uid;
	pid_t pid;
	(void)lev;
	(void)sa;
	(void)salen;

	if (unixsock_peer_uid(fd, &uid, &pid) < 0 || (uid != 0 && uid != geteuid())) {
		static const char denied[] =
			"{\"id\":null,\"ok\":false,\"error\":{\"code\":\"EACCES\","
			"\"message\":\"permission denied\"}}\n";
		log_limited(&ctl->rl, LOG_LVL_WARN, "control: refused uid %u (pid %d)",
			    (unsigned)uid, (int)pid);
		/* best effort: the peer is being refused anyway */
		ssize_t w = write(fd, denied, sizeof(denied) - 1);
		(void)w;
		close(fd);
		return;
	}
	struct bufferevent *bev = bufferevent_socket_new(ctl->srv->base, fd,
							 BEV_OPT_CLOSE_ON_FREE);
	if (!bev) {
		close(fd);
		return;
	}
	control_serve(ctl, bev);
}

/* Out of descriptors: the waiting client is told why and let go (fdlimit.h). */
static void
control_accept_error(struct evconnlistener *lev, void *arg)
{
	struct control *ctl = arg;
	char msg[256], line[512];

	fdlimit_message(msg, sizeof(msg), "control");
	snprintf(line, sizeof(line), "{\"id\":null,\"ok\":false,\"error\":"
		 "{\"code\":\"EMFILE\",\"message\":\"%s\"}}\n", msg);
	int rc = fdlimit_shed(evconnlistener_get_fd(lev), EVUTIL_SOCKET_ERROR(), line);
	if (rc < 0)
		log_limited(&ctl->rl, LOG_LVL_WARN, "control: accept: %s", strerror(-rc));
	else
		log_limited(&ctl->rl, LOG_LVL_WARN, "%s", msg);
}

struct control *
control_new(struct server *srv, const char *path, char *err, size_t errlen)
{
	struct control *ctl = calloc(1, sizeof(*ctl));
	int fd;

	if (!ctl || !(ctl->path = strdup(path))) {
		free(ctl);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	ctl->srv = srv;
	ctl->max_pending = CTL_MAX_PENDING;
	ctl->max_line = CONTROL_MAX_LINE;
	ctl->rl = (struct log_ratelimit)LOG_RATELIMIT_INIT;
	LIST_INIT(&ctl->clients);
	fd = unixsock_listen(path, 0600, err, errlen);
	if (fd < 0)
		goto fail;
	/* backlog 0: fd already listens (with the system's backlog); -1 meant listen(128) again */
	ctl->lev = evconnlistener_new(srv->base, control_accept, ctl,
				      LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, fd);
	if (!ctl->lev) {
		close(fd);
		unlink(path);
		snprintf(err, errlen, "%s: cannot listen", path);
		goto fail;
	}
	evconnlistener_set_error_cb(ctl->lev, control_accept_error);
	return ctl;
fail:
	free(ctl->path);
	free(ctl);
	return NULL;
}

void
control_free(struct control *ctl)
{
	if (!ctl)
		return;
	if (ctl->lev)
		evconnlistener_free(ctl->lev);
	/* at exit: requests still pending belong to vbds that are gone too */
	while (!LIST_EMPTY(&ctl->clients)) {
		struct ctl_client *cl = LIST_FIRST(&ctl->clients);
		cl->pending = 0;
		client_close(cl);
	}
	unlink(ctl->path);
	free(ctl->path);
	free(ctl);
}
