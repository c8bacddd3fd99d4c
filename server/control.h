/*
 * The JSON control socket: newline-delimited requests and responses
 * ({"id", "cmd", "args"} -> {"id", "ok", "result"|"error"}), peer
 * credential checks, and dispatch to the command table. Clients live on
 * loop 0; a command about a vbd runs on the vbd's loop (loop.h).
 */
#ifndef TD_CONTROL_H
#define TD_CONTROL_H

#include <stddef.h>

#include <jansson.h>

struct server;
struct control;
struct ctl_req;
struct bufferevent;

#define CONTROL_MAX_LINE (1 << 20)
#define CONTROL_PROTOCOL_VERSION 1

struct control *control_new(struct server *srv, const char *path, char *err, size_t errlen);
void control_free(struct control *ctl);
/* Serves one client on an existing bufferevent (tests, fuzzing). */
void control_serve(struct control *ctl, struct bufferevent *bev);
/* Requests not answered yet, over every client (tests, fuzzing: wait for 0). */
unsigned control_pending(const struct control *ctl);
/*
 * Lowers the limits (tests, fuzzing: short inputs reach them): how many
 * requests one client may have unanswered before its input is left unread
 * (64), and the longest request line (CONTROL_MAX_LINE); each at least 1.
 */
void control_set_limits(struct control *ctl, unsigned max_pending, size_t max_line);

/* ---- for command handlers (control_cmds.c) ---- */

enum ctl_arg_type { ARG_STRING, ARG_INT, ARG_BOOL, ARG_OBJECT };

struct ctl_arg {
	const char *name;
	enum ctl_arg_type type;
	int required;
};

/* The command names a vbd (args.minor): it runs on that vbd's loop. */
#define CTL_ON_VBD_LOOP 0x1

struct ctl_cmd {
	const char *name;
	const struct ctl_arg *args;	/* terminated by a NULL name */
	/*
	 * Must end with exactly one ctl_reply_ok or ctl_reply_error, now or
	 * later, on any loop (the reply finds its way to the client). Runs on
	 * loop 0, or with CTL_ON_VBD_LOOP on the named vbd's loop.
	 */
	void (*fn)(struct ctl_req *req, json_t *args);
	unsigned flags;			/* CTL_* */
};

extern const struct ctl_cmd ctl_cmds[];

/* control_args.c */
extern const struct ctl_arg ctl_args_none[], ctl_args_list[], ctl_args_stats[],
	ctl_args_open[], ctl_args_close[], ctl_args_unpause[],
	ctl_args_snapshot[], ctl_args_qos_get[], ctl_args_qos_set[],
	ctl_args_fault_inject[], ctl_args_mirror[], ctl_args_minor[], ctl_args_job_list[],
	ctl_args_stream[], ctl_args_commit[];

struct server *ctl_req_server(struct ctl_req *req);
struct loop;
/* Runs fn(req, args) on loop l (now, if it is this one or NULL). */
void ctl_req_run_on(struct ctl_req *req, struct loop *l, void (*fn)(struct ctl_req *, json_t *),
		    json_t *args);
/* result: stolen reference (may be NULL for {}). */
void ctl_reply_ok(struct ctl_req *req, json_t *result);
/* err: a positive errno; msg: the sentence the user reads. */
void ctl_reply_error(struct ctl_req *req, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
const char *errno_name(int err);

#endif
