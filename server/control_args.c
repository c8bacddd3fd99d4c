/*
 * The arguments of every control command: name, JSON type, required.
 * The command table (control_cmds.c) names them; each matches
 * schema/<cmd>.args.json (tests/integration/test_control.py checks).
 */
#include "control.h"

const struct ctl_arg ctl_args_none[] = { { NULL, 0, 0 } };

const struct ctl_arg ctl_args_list[] = {
	{ "minor", ARG_INT, 0 },
	{ "type", ARG_STRING, 0 },
	{ "path", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_stats[] = {
	{ "minor", ARG_INT, 0 },
	{ "reset", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_open[] = {
	{ "params", ARG_STRING, 1 },
	{ "minor", ARG_INT, 0 },
	{ "readonly", ARG_BOOL, 0 },
	{ "nodirect", ARG_BOOL, 0 },
	{ "qos", ARG_OBJECT, 0 },
	{ "cwd", ARG_STRING, 0 },	/* the client's, for a relative path */
	{ "loop", ARG_INT, 0 },		/* pinned there; else placed */
	{ "timeout", ARG_INT, 0 },	/* seconds a request may take */
	{ "cbt_log", ARG_STRING, 0 },	/* track changed blocks there */
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_close[] = {
	{ "minor", ARG_INT, 1 },
	{ "force", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_unpause[] = {
	{ "minor", ARG_INT, 1 },
	{ "params", ARG_STRING, 0 },
	{ "cbt_log", ARG_STRING, 0 },
	{ "cwd", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_snapshot[] = {
	{ "minor", ARG_INT, 1 },
	{ "path", ARG_STRING, 1 },
	{ "cbt_log", ARG_STRING, 0 },
	{ "cwd", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

/* exactly one of minor and group (the handler checks) */
const struct ctl_arg ctl_args_qos_get[] = {
	{ "minor", ARG_INT, 0 },
	{ "group", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_qos_set[] = {
	{ "minor", ARG_INT, 0 },
	{ "group", ARG_STRING, 0 },
	{ "limits", ARG_OBJECT, 1 },
	{ NULL, 0, 0 },
};

/* no nth: only the status; disarm: nothing armed any more */
const struct ctl_arg ctl_args_fault_inject[] = {
	{ "nth", ARG_INT, 0 },
	{ "count", ARG_INT, 0 },
	{ "error", ARG_STRING, 0 },
	{ "kinds", ARG_STRING, 0 },
	{ "path", ARG_STRING, 0 },
	{ "disarm", ARG_BOOL, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_mirror[] = {
	{ "minor", ARG_INT, 1 },
	{ "dest", ARG_STRING, 1 },	/* params of an existing image of the disk's size */
	{ "sync", ARG_STRING, 0 },	/* full (default) or top */
	{ "speed", ARG_INT, 0 },	/* bytes/s; 0 or absent: no limit */
	{ "cwd", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};

/* pause, job-pivot, job-cancel: a vbd and nothing else */
const struct ctl_arg ctl_args_minor[] = {
	{ "minor", ARG_INT, 1 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_job_list[] = {
	{ "minor", ARG_INT, 0 },
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_stream[] = {
	{ "minor", ARG_INT, 1 },
	{ "base", ARG_STRING, 0 },	/* the leaf's parent at the end; default none */
	{ "cwd", ARG_STRING, 0 },
	{ "speed", ARG_INT, 0 },	/* bytes/s; 0 or absent: no limit */
	{ NULL, 0, 0 },
};

const struct ctl_arg ctl_args_commit[] = {
	{ "minor", ARG_INT, 1 },
	{ "top", ARG_STRING, 0 },	/* the image merged: default the leaf */
	{ "base", ARG_STRING, 0 },	/* merged into; default the top's parent */
	{ "speed", ARG_INT, 0 },
	{ "cwd", ARG_STRING, 0 },
	{ NULL, 0, 0 },
};
