/*
 * tap-ctl: the command-line client of tapdiskd's control socket, with
 * blktap's command names, option letters and output formats.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "ctl_client.h"
#include "tap-ctl.h"

void
die(const char *fmt, ...)
{
	va_list ap;
	fputs("tap-ctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

void
usage_die(const char *usage)
{
	fprintf(stderr, "usage: tap-ctl %s\n", usage);
	exit(2);
}

long
parse_int(const char *s, const char *what)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || !*s || *end || v < 0 || v > INT_MAX)
		die("%s must be a non-negative integer, not '%s'", what, s);
	return v;
}

/*
 * Our working directory goes with every path we send ("cwd"): the server
 * does not share it, and resolves relative paths against it (it alone
 * knows which image types name files).
 */
static void
add_cwd(json_t *args)
{
	char cwd[PATH_MAX];
	if (!getcwd(cwd, sizeof(cwd)))
		die("getcwd: %s", strerror(errno));
	json_object_set_new(args, "cwd", json_string(cwd));
}

void
cli_connect(struct cli *cli)
{
	char err[512];
	cli->fd = ctl_connect(cli->state_dir, err, sizeof(err));
	if (cli->fd < 0)
		die("%s", err);
}

/*
 * Runs one command; on error prints its message and exits. Returns the
 * result object (a reference the caller drops), after printing the raw
 * response if --json was given.
 */
json_t *
cli_call(struct cli *cli, const char *cmd, json_t *args)
{
	char err[512], *raw = NULL;
	json_t *resp = ctl_call(cli->fd, cmd, args, &raw, err, sizeof(err));

	if (!resp)
		die("%s: %s", cmd, err);
	if (cli->json)
		printf("%s\n", raw);
	free(raw);
	if (!json_is_true(json_object_get(resp, "ok"))) {
		json_t *e = json_object_get(resp, "error");
		const char *msg = json_string_value(json_object_get(e, "message"));
		if (cli->json)
			exit(1);
		die("%s: %s", cmd, msg ? msg : "failed");	/* exits: resp needs no release */
	}
	json_t *result = json_incref(json_object_get(resp, "result"));
	json_decref(resp);
	return result ? result : json_object();
}

void
check_pid(struct cli *cli)
{
	if (cli->pid < 0)
		return;
	int saved = cli->json;
	cli->json = 0;
	json_t *v = cli_call(cli, "version", NULL);
	cli->json = saved;
	long pid = (long)json_integer_value(json_object_get(v, "pid"));
	json_decref(v);
	if (pid != cli->pid)
		die("no tapdiskd with pid %ld serves %s (its server is pid %ld)", cli->pid,
		    cli->state_dir, pid);
}

int
next_opt(struct cli *cli, int argc, char **argv, const char *opts,
	 const struct option *longopts)
{
	int c;
	while ((c = getopt_long(argc, argv, opts, longopts, NULL)) == 'p')
		cli->pid = parse_int(optarg, "-p PID");
	return c;
}

static void
print_json(json_t *v)
{
	char *s = json_dumps(v, isatty(STDOUT_FILENO) ? JSON_INDENT(2) : JSON_COMPACT);
	if (s)
		printf("%s\n", s);
	free(s);
}

/* ---- QoS settings: k=v[,k=v...] ---- */

/* An integer with an optional K, M, G or T suffix (powers of 1024). */
static json_int_t
parse_amount(const char *key, const char *s)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	int shift = 0;

	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	}
	if (errno || end == s || *end || v < 0 || v > (LLONG_MAX >> shift))
		die("qos: %s: '%s' is not a number (suffixes K, M, G, T allowed)", key, s);
	return (json_int_t)v << shift;
}

/* Adds each k=v of a comma-separated list to obj. */
static void
parse_qos_list(json_t *obj, const char *list)
{
	char *copy = strdup(list), *save = NULL;
	if (!copy)
		die("out of memory");
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		if (!eq || eq == tok)
			die("qos: '%s' is not NAME=VALUE", tok);
		*eq = '\0';
		if (!strcmp(tok, "group"))
			json_object_set_new(obj, tok, json_string(eq + 1));
		else
			json_object_set_new(obj, tok, json_integer(parse_amount(tok, eq + 1)));
	}
	free(copy);
}

/* ---- commands ---- */

static int
cmd_open_like(struct cli *cli, int argc, char **argv, int create)
{
	static const struct option longopts[] = {
		{ "loop", required_argument, NULL, 'L' },
		{ "qos", required_argument, NULL, 'q' },
		{ NULL, 0, NULL, 0 },
	};
	const char *usage = create ? "create -a TYPE:PATH [-R] [-D] [-m MINOR] [-t SECS] "
				     "[-C CBT_LOG] [--qos K=V,...] [--loop L] [-p PID]"
				   : "open -m MINOR -a TYPE:PATH [-R] [-D] [-t SECS] [-C CBT_LOG] "
				     "[--qos K=V,...] [--loop L] [-p PID]";
	const char *params = NULL, *cbt_log = NULL;
	long minor = -1, loop = -1, timeout = -1;
	int ro = 0, nodirect = 0, c;
	json_t *qos = NULL;

	while ((c = next_opt(cli, argc, argv, "a:Rm:p:Dd:q:L:t:C:h", longopts)) != -1) {
		switch (c) {
		case 'a': params = optarg; break;
		case 'C': cbt_log = optarg; break;
		case 't': timeout = parse_int(optarg, "-t SECS"); break;
		case 'L': loop = parse_int(optarg, "--loop L"); break;
		case 'q':
			if (!qos)
				qos = json_object();
			parse_qos_list(qos, optarg);
			break;
		case 'R': ro = 1; break;
		case 'D': nodirect = 1; break;
		case 'd': break;	/* blktap's device name: not used */
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		default: usage_die(usage);
		}
	}
	if (!params || (!create && minor < 0) || optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = json_pack("{s:s, s:b}", "params", params, "readonly", ro);
	add_cwd(args);
	if (minor >= 0)
		json_object_set_new(args, "minor", json_integer(minor));
	if (nodirect)
		json_object_set_new(args, "nodirect", json_true());
	if (loop >= 0)
		json_object_set_new(args, "loop", json_integer(loop));
	if (timeout >= 0)
		json_object_set_new(args, "timeout", json_integer(timeout));
	if (cbt_log)
		json_object_set_new(args, "cbt_log", json_string(cbt_log));
	if (qos)
		json_object_set_new(args, "qos", qos);
	json_t *r = cli_call(cli, create ? "create" : "open", args);
	if (create && !cli->json)
		printf("%s\n", json_string_value(json_object_get(r, "nbd")));
	json_decref(r);
	return 0;
}

static int
cmd_create(struct cli *cli, int argc, char **argv)
{
	return cmd_open_like(cli, argc, argv, 1);
}

static int
cmd_open(struct cli *cli, int argc, char **argv)
{
	return cmd_open_like(cli, argc, argv, 0);
}

/* close, destroy, pause: -m MINOR [-f] */
static int
cmd_minor_only(struct cli *cli, int argc, char **argv, const char *cmd, int allow_force)
{
	char usage[128];
	long minor = -1;
	int force = 0, c;

	snprintf(usage, sizeof(usage), "%s -m MINOR%s [-p PID]", cmd,
		 allow_force ? " [-f]" : "");
	while ((c = next_opt(cli, argc, argv, allow_force ? "m:p:ft:h" : "m:p:t:h", NULL)) != -1) {
		switch (c) {
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		case 'f': force = 1; break;
		case 't': break;	/* blktap's timeout: the server decides */
		default: usage_die(usage);
		}
	}
	if (minor < 0 || optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = json_pack("{s:I}", "minor", (json_int_t)minor);
	if (force)
		json_object_set_new(args, "force", json_true());
	json_decref(cli_call(cli, cmd, args));
	return 0;
}

static int
cmd_close(struct cli *cli, int argc, char **argv)
{
	return cmd_minor_only(cli, argc, argv, "close", 1);
}

static int
cmd_destroy(struct cli *cli, int argc, char **argv)
{
	return cmd_minor_only(cli, argc, argv, "destroy", 1);
}

static int
cmd_pause(struct cli *cli, int argc, char **argv)
{
	return cmd_minor_only(cli, argc, argv, "pause", 0);
}

static int
cmd_unpause(struct cli *cli, int argc, char **argv)
{
	const char *usage = "unpause -m MINOR [-a TYPE:PATH] [-c CBT_LOG] [-p PID]";
	const char *params = NULL, *cbt_log = NULL;
	long minor = -1;
	int c;

	while ((c = next_opt(cli, argc, argv, "m:p:a:c:h", NULL)) != -1) {
		switch (c) {
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		case 'a': params = optarg; break;
		case 'c': cbt_log = optarg; break;
		default: usage_die(usage);
		}
	}
	if (minor < 0 || optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = json_pack("{s:I}", "minor", (json_int_t)minor);
	if (params)
		json_object_set_new(args, "params", json_string(params));
	if (cbt_log)
		json_object_set_new(args, "cbt_log", json_string(cbt_log));
	if (params || cbt_log)
		add_cwd(args);
	json_decref(cli_call(cli, "unpause", args));
	return 0;
}

static int
cmd_snapshot(struct cli *cli, int argc, char **argv)
{
	const char *usage = "snapshot -m MINOR -n NEWLEAF|NAME [-C CBT_LOG] [-p PID]";
	const char *leaf = NULL, *cbt_log = NULL;
	long minor = -1;
	int c;

	while ((c = next_opt(cli, argc, argv, "m:n:p:C:h", NULL)) != -1) {
		switch (c) {
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		case 'n': leaf = optarg; break;
		case 'C': cbt_log = optarg; break;
		default: usage_die(usage);
		}
	}
	if (minor < 0 || !leaf || optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = json_pack("{s:I, s:s}", "minor", (json_int_t)minor, "path", leaf);
	if (cbt_log)
		json_object_set_new(args, "cbt_log", json_string(cbt_log));
	add_cwd(args);
	json_t *r = cli_call(cli, "snapshot", args);
	/* rbd: a snapshot inside the image, named NAME: what opens it */
	json_t *snap = json_object_get(r, "snapshot");
	if (!cli->json)
		printf("%s\n", json_string_value(json_is_string(snap) ? snap :
						  json_object_get(r, "params")));
	json_decref(r);
	return 0;
}

/* mirror -m M -d DEST [--sync full|top] [--speed BYTES/s] | -m M --pivot | -m M --cancel */
static int
cmd_mirror(struct cli *cli, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "sync", required_argument, NULL, 's' },
		{ "speed", required_argument, NULL, 'S' },
		{ "pivot", no_argument, NULL, 'P' },
		{ "cancel", no_argument, NULL, 'X' },
		{ NULL, 0, NULL, 0 },
	};
	const char *usage = "mirror -m MINOR -d TYPE:PATH [--sync full|top] [--speed BYTES_PER_S] "
			    "[-p PID]\n       tap-ctl mirror -m MINOR --pivot | --cancel [-p PID]";
	const char *dest = NULL, *sync = NULL, *cmd = "mirror";
	long minor = -1, speed = -1;
	int c;

	while ((c = next_opt(cli, argc, argv, "m:d:p:h", longopts)) != -1) {
		switch (c) {
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		case 'd': dest = optarg; break;
		case 's': sync = optarg; break;
		case 'S': speed = parse_int(optarg, "--speed BYTES_PER_S"); break;
		case 'P': cmd = "job-pivot"; break;
		case 'X': cmd = "job-cancel"; break;
		default: usage_die(usage);
		}
	}
	if (minor < 0 || optind != argc || (!strcmp(cmd, "mirror") != !!dest) ||
	    (strcmp(cmd, "mirror") && (sync || speed >= 0)))
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = json_pack("{s:I}", "minor", (json_int_t)minor);
	if (dest) {
		json_object_set_new(args, "dest", json_string(dest));
		add_cwd(args);
	}
	if (sync)
		json_object_set_new(args, "sync", json_string(sync));
	if (speed >= 0)
		json_object_set_new(args, "speed", json_integer(speed));
	json_decref(cli_call(cli, cmd, args));
	return 0;
}

/*
 * stream -m M [--base IMAGE] [--speed BYTES/s]
 * commit -m M [--top IMAGE] [--base IMAGE] [--speed BYTES/s]
 */
static int
chain_job(struct cli *cli, int argc, char **argv, const char *cmd)
{
	static const struct option longopts[] = {
		{ "top", required_argument, NULL, 'T' },
		{ "base", required_argument, NULL, 'B' },
		{ "speed", required_argument, NULL, 'S' },
		{ NULL, 0, NULL, 0 },
	};
	char usage[160];
	const char *top = NULL, *base = NULL;
	long minor = -1, speed = -1;
	int c;

	snprintf(usage, sizeof(usage), "%s -m MINOR%s [--base IMAGE] [--speed BYTES_PER_S] "
		 "[-p PID]", cmd, strcmp(cmd, "commit") ? "" : " [--top IMAGE]");
	while ((c = next_opt(cli, argc, argv, "m:p:h", longopts)) != -1) {
		switch (c) {
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		case 'T': top = optarg; break;
		case 'B': base = optarg; break;
		case 'S': speed = parse_int(optarg, "--speed BYTES_PER_S"); break;
		default: usage_die(usage);
		}
	}
	if (minor < 0 || optind != argc || (top && strcmp(cmd, "commit")))
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = json_pack("{s:I}", "minor", (json_int_t)minor);
	if (top)
		json_object_set_new(args, "top", json_string(top));
	if (base)
		json_object_set_new(args, "base", json_string(base));
	if (top || base)
		add_cwd(args);
	if (speed >= 0)
		json_object_set_new(args, "speed", json_integer(speed));
	json_decref(cli_call(cli, cmd, args));
	return 0;
}

static int
cmd_stream(struct cli *cli, int argc, char **argv)
{
	return chain_job(cli, argc, argv, "stream");
}

static int
cmd_commit(struct cli *cli, int argc, char **argv)
{
	return chain_job(cli, argc, argv, "commit");
}

static int
cmd_job_cancel(struct cli *cli, int argc, char **argv)
{
	return cmd_minor_only(cli, argc, argv, "job-cancel", 0);
}

static void
job_print(json_t *j)
{
	json_t *err = json_object_get(j, "error"), *dest = json_object_get(j, "dest");

	printf("minor=%lld type=%s state=%s done=%lld total=%lld rate=%.0f",
	       (long long)json_integer_value(json_object_get(j, "minor")),
	       json_string_value(json_object_get(j, "type")),
	       json_string_value(json_object_get(j, "state")),
	       (long long)json_integer_value(json_object_get(j, "bytes_done")),
	       (long long)json_integer_value(json_object_get(j, "bytes_total")),
	       json_number_value(json_object_get(j, "rate")));
	if (dest)
		printf(" dest=%s", json_string_value(dest));
	if (err)
		printf(" error=\"%s\"", json_string_value(err));
	putchar('\n');
}

/* -m MINOR into a request's arguments */
static void
arg_minor(json_t *args, const char *value)
{
	json_object_set_new(args, "minor", json_integer(parse_int(value, "-m MINOR")));
}

static void
list_print(json_t *vbd, int tty)
{
	long pid = (long)json_integer_value(json_object_get(vbd, "pid"));
	long minor = (long)json_integer_value(json_object_get(vbd, "minor"));
	long state = (long)json_integer_value(json_object_get(vbd, "state"));
	const char *type = json_string_value(json_object_get(vbd, "type"));
	const char *path = json_string_value(json_object_get(vbd, "path"));

	if (tty) {
		char pids[16], minors[16], states[16];
		snprintf(pids, sizeof(pids), "%ld", pid);
		snprintf(minors, sizeof(minors), "%ld", minor);
		snprintf(states, sizeof(states), "%#lx", state);
		printf("%8s %4s %4s %10s %s\n", pids, minors, states, type ? type : "-",
		       path ? path : "-");
		return;
	}
	printf("pid=%ld minor=%ld state=%#lx", pid, minor, state);
	if (type && path)
		printf(" args=%s:%s", type, path);
	putchar('\n');
}

static int
cmd_list(struct cli *cli, int argc, char **argv)
{
	const char *usage = "list [-m MINOR] [-t TYPE] [-f FILE] [-p PID]";
	json_t *args = json_object();
	int c;

	while ((c = next_opt(cli, argc, argv, "m:p:t:f:h", NULL)) != -1) {
		switch (c) {
		case 'm': arg_minor(args, optarg); break;
		case 't': json_object_set_new(args, "type", json_string(optarg)); break;
		case 'f': json_object_set_new(args, "path", json_string(optarg)); break;
		default: usage_die(usage);
		}
	}
	if (optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *r = cli_call(cli, "list", args);
	if (!cli->json) {
		int tty = isatty(STDOUT_FILENO);
		size_t i;
		json_t *v;
		if (tty)
			printf("%8s %4s %4s %10s %s\n", "pid", "minor", "state", "type", "file");
		json_array_foreach(json_object_get(r, "vbds"), i, v)
			list_print(v, tty);
	}
	json_decref(r);
	return 0;
}

static int
cmd_jobs(struct cli *cli, int argc, char **argv)
{
	const char *usage = "jobs [-m MINOR] [-p PID]";
	json_t *args = json_object(), *j;
	size_t i;
	int c;

	while ((c = next_opt(cli, argc, argv, "m:p:h", NULL)) != -1) {
		switch (c) {
		case 'm': arg_minor(args, optarg); break;
		default: usage_die(usage);
		}
	}
	if (optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *r = cli_call(cli, "job-list", args);
	if (!cli->json)
		json_array_foreach(json_object_get(r, "jobs"), i, j)
			job_print(j);
	json_decref(r);
	return 0;
}

static int
cmd_stats(struct cli *cli, int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "reset", no_argument, NULL, 'r' },
		{ NULL, 0, NULL, 0 },
	};
	const char *usage = "stats [-m MINOR] [-r|--reset] [-p PID]";
	json_t *args = json_object();
	int c;

	while ((c = next_opt(cli, argc, argv, "m:rp:h", longopts)) != -1) {
		switch (c) {
		case 'm': arg_minor(args, optarg); break;
		case 'r': json_object_set_new(args, "reset", json_true()); break;
		default: usage_die(usage);
		}
	}
	if (optind != argc)
		usage_die(usage);
	cli_connect(cli);
	check_pid(cli);
	json_t *r = cli_call(cli, "stats", args);
	if (!cli->json)
		print_json(r);
	json_decref(r);
	return 0;
}

/* "k=v k=v" of the non-zero members of a limits object, or "none" */
static void
print_limits(json_t *limits)
{
	const char *key;
	json_t *v;
	int any = 0;

	printf("limits:");
	json_object_foreach(limits, key, v) {
		if (json_integer_value(v)) {
			printf(" %s=%lld", key, (long long)json_integer_value(v));
			any = 1;
		}
	}
	printf("%s\n", any ? "" : " none");
}

static void
print_qos(json_t *r)
{
	json_t *members = json_object_get(r, "members"), *m;
	size_t i;

	if (members) {
		printf("group=%s\n", json_string_value(json_object_get(r, "group")));
		print_limits(json_object_get(r, "limits"));
		printf("members:");
		json_array_foreach(members, i, m)
			printf(" %lld(weight %lld)",
			       (long long)json_integer_value(json_object_get(m, "minor")),
			       (long long)json_integer_value(json_object_get(m, "weight")));
		printf("%s\nthrottled=%lld\n", json_array_size(members) ? "" : " none",
		       (long long)json_integer_value(json_object_get(r, "throttled")));
		return;
	}
	json_t *group = json_object_get(r, "group"), *st = json_object_get(r, "stats");
	printf("minor=%lld group=%s weight=%lld\n",
	       (long long)json_integer_value(json_object_get(r, "minor")),
	       json_is_string(group) ? json_string_value(group) : "-",
	       (long long)json_integer_value(json_object_get(r, "weight")));
	print_limits(json_object_get(r, "limits"));
	printf("stats: throttled=%lld queued_us_total=%lld queued_us_max=%lld queue_depth=%lld\n",
	       (long long)json_integer_value(json_object_get(st, "throttled")),
	       (long long)json_integer_value(json_object_get(st, "queued_us_total")),
	       (long long)json_integer_value(json_object_get(st, "queued_us_max")),
	       (long long)json_integer_value(json_object_get(st, "queue_depth")));
}

/* qos -m MINOR | -g GROUP [K=V ...]: without settings, prints them */
static int
cmd_qos(struct cli *cli, int argc, char **argv)
{
	const char *usage = "qos {-m MINOR | -g GROUP} [K=V[,K=V...] ...] [-p PID]";
	const char *group = NULL;
	long minor = -1;
	int c;

	while ((c = next_opt(cli, argc, argv, "m:g:p:h", NULL)) != -1) {
		switch (c) {
		case 'm': minor = parse_int(optarg, "-m MINOR"); break;
		case 'g': group = optarg; break;
		default: usage_die(usage);
		}
	}
	if ((minor < 0) == !group)
		usage_die(usage);
	json_t *limits = optind < argc ? json_object() : NULL;
	for (int i = optind; i < argc; i++)
		parse_qos_list(limits, argv[i]);
	cli_connect(cli);
	check_pid(cli);
	json_t *args = group ? json_pack("{s:s}", "group", group)
			     : json_pack("{s:I}", "minor", (json_int_t)minor);
	if (limits)
		json_object_set_new(args, "limits", limits);
	json_t *r = cli_call(cli, limits ? "qos-set" : "qos-get", args);
	if (!cli->json)
		print_qos(r);
	json_decref(r);
	return 0;
}

/* fault-inject [-k NTH ...] | -d: arms, disarms or (neither) shows; testing only */
static int
cmd_fault_inject(struct cli *cli, int argc, char **argv)
{
	const char *usage = "fault-inject [-k NTH [-c COUNT] [-e ERROR] [-t KINDS] "
			    "[-P PATHPART] | -d] [-p PID]";
	json_t *args = json_object();
	int c, disarm = 0;

	while ((c = next_opt(cli, argc, argv, "k:c:e:t:P:dp:h", NULL)) != -1) {
		switch (c) {
		case 'k': json_object_set_new(args, "nth", json_integer(parse_int(optarg, "-k NTH")));
			  break;
		case 'c': json_object_set_new(args, "count",
					      json_integer(parse_int(optarg, "-c COUNT")));
			  break;
		case 'e': json_object_set_new(args, "error", json_string(optarg)); break;
		case 't': json_object_set_new(args, "kinds", json_string(optarg)); break;
		case 'P': json_object_set_new(args, "path", json_string(optarg)); break;
		case 'd': disarm = 1; break;
		default: usage_die(usage);
		}
	}
	if (optind != argc || (disarm && json_object_size(args)) ||
	    (!json_object_get(args, "nth") && json_object_size(args)))
		usage_die(usage);
	if (disarm)
		json_object_set_new(args, "disarm", json_true());
	cli_connect(cli);
	check_pid(cli);
	json_t *r = cli_call(cli, "fault-inject", args);
	if (!cli->json) {
		json_t *last = json_object_get(r, "last");
		printf("armed=%d nth=%lld count=%lld error=%s seen=%lld injected=%lld total=%lld",
		       json_is_true(json_object_get(r, "armed")),
		       (long long)json_integer_value(json_object_get(r, "nth")),
		       (long long)json_integer_value(json_object_get(r, "count")),
		       json_string_value(json_object_get(r, "error")),
		       (long long)json_integer_value(json_object_get(r, "seen")),
		       (long long)json_integer_value(json_object_get(r, "injected")),
		       (long long)json_integer_value(json_object_get(r, "total")));
		if (last)
			printf(" last=%s:%s@%lld+%lld",
			       json_string_value(json_object_get(last, "kind")),
			       json_string_value(json_object_get(last, "path")),
			       (long long)json_integer_value(json_object_get(last, "offset")),
			       (long long)json_integer_value(json_object_get(last, "length")));
		printf("\n");
	}
	json_decref(r);
	return 0;
}

static int
cmd_version(struct cli *cli, int argc, char **argv)
{
	int c;
	while ((c = next_opt(cli, argc, argv, "p:h", NULL)) != -1)
		usage_die("version [-p PID]");
	cli_connect(cli);
	check_pid(cli);
	json_t *r = cli_call(cli, "version", NULL);
	if (!cli->json)
		printf("tapdiskd %s (pid %lld, io engine %s, protocol %lld)\n",
		       json_string_value(json_object_get(r, "version")),
		       (long long)json_integer_value(json_object_get(r, "pid")),
		       json_string_value(json_object_get(r, "io_engine")),
		       (long long)json_integer_value(json_object_get(r, "protocol")));
	json_decref(r);
	return 0;
}

static const struct {
	const char *name;
	int (*fn)(struct cli *cli, int argc, char **argv);
	const char *help;
} commands[] = {
	{ "create", cmd_create, "open a new vbd; prints its NBD socket" },
	{ "destroy", cmd_destroy, "close a vbd and free its minor" },
	{ "open", cmd_open, "open an image at a given minor" },
	{ "close", cmd_close, "close a vbd's image, keeping the minor" },
	{ "pause", cmd_pause, "drain I/O and close the images" },
	{ "unpause", cmd_unpause, "reopen (optionally another image) and resume" },
	{ "snapshot", cmd_snapshot, "live snapshot: a new leaf on top of the current one" },
	{ "list", cmd_list, "list vbds" },
	{ "stats", cmd_stats, "statistics as JSON, one vbd (-m) or all; -r/--reset zeroes counters" },
	{ "top", cmd_top, "live per-vbd IOPS, MB/s, p99 latency, queue depth (-d, -n, -m)" },
	{ "qos", cmd_qos, "show or change a vbd's or a group's I/O limits" },
	{ "version", cmd_version, "print the server's version" },
	{ "fault-inject", cmd_fault_inject, "fail chosen I/O (tapdiskd --fault-injection; testing only)" },
	{ "mirror", cmd_mirror, "copy a running vbd to another image, then --pivot onto it or --cancel" },
	{ "stream", cmd_stream, "copy the parents' data into the leaf, then drop the parents" },
	{ "commit", cmd_commit, "merge the leaf into an image below it, then serve that image" },
	{ "jobs", cmd_jobs, "block jobs (mirror, stream, commit): state, progress, rate" },
	{ "job-cancel", cmd_job_cancel, "cancel a vbd's block job" },
};

static void
usage(FILE *f)
{
	fprintf(f, "usage: tap-ctl [-S STATE_DIR] [--json] COMMAND [OPTIONS]\n\ncommands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].help);
	fprintf(f, "\nThe state dir is -S, else $TAPDISKD_STATE_DIR, else %s.\n"
		"`tap-ctl COMMAND -h` shows a command's options.\n", CTL_DEFAULT_STATE_DIR);
}

int
main(int argc, char **argv)
{
	struct cli cli = { .pid = -1, .fd = -1 };
	const char *dir = NULL;
	int i;

	/* --json may stand anywhere; strip it before getopt sees it */
	int n = 1;
	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0)
			cli.json = 1;
		else if (strcmp(argv[i], "--qos") == 0)	/* create/open's -q */
			argv[n++] = (char *)"-q";
		else
			argv[n++] = argv[i];
	}
	argc = n;
	argv[argc] = NULL;

	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (strcmp(argv[i], "-S") == 0 && i + 1 < argc) {
			dir = argv[++i];
		} else if (strncmp(argv[i], "-S", 2) == 0 && argv[i][2]) {
			dir = argv[i] + 2;
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else {
			usage(stderr);
			return 2;
		}
	}
	if (i >= argc) {
		usage(stderr);
		return 2;
	}
	cli.state_dir = ctl_state_dir(dir);
	for (size_t c = 0; c < sizeof(commands) / sizeof(commands[0]); c++) {
		if (strcmp(argv[i], commands[c].name) == 0) {
			optind = 1;
			int rc = commands[c].fn(&cli, argc - i, argv + i);
			if (cli.fd >= 0)
				close(cli.fd);
			return rc;
		}
	}
	fprintf(stderr, "tap-ctl: unknown command '%s'\n", argv[i]);
	usage(stderr);
	return 2;
}
