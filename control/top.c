/*
 * tap-ctl top: a live view of every vbd's I/O. Each refresh takes a `stats`
 * sample; rates are the counters' deltas since the previous sample over the
 * time measured between the two (CLOCK_MONOTONIC), and p99 is computed from
 * the deltas of the latency histograms' buckets: it is the last interval's.
 * On a terminal it redraws one screen (plain ANSI) until q or Ctrl-C;
 * otherwise it prints a table per sample, blank-line separated, for scripts.
 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "ctl_client.h"
#include "tap-ctl.h"

#define TOP_USAGE "top [-d SECS] [-n COUNT] [-m MINOR] [-p PID]"
#define MIN_INTERVAL 0.1
#define LE_INF UINT64_MAX	/* the "+Inf" bucket */

/* the columns before PARAMS, which takes the rest of the line */
#define ROW_FMT "%5s %8s %8s %8s %8s %7s %5s %7s %-16s  "
#define ROW_WIDTH 82

struct top {
	struct cli *cli;
	double interval;
	long count;		/* reports to print, or -1: until told to stop */
	long minor;		/* -m, or -1: every vbd */
	long server_pid;
	int tty;		/* stdout is a terminal: redraw a screen */
	int keys;		/* and stdin too: q quits */
};

/* One `stats` reply. */
struct sample {
	json_t *vbds;		/* array of vbd-stats objects */
	double at;		/* CLOCK_MONOTONIC seconds, when it arrived */
};

/* What one vbd did between two samples. Negative: unknown, printed "-". */
struct row {
	long minor;
	const char *params;	/* the current sample's */
	double iops[2], mbps[2];	/* [0] reads, [1] writes */
	double throttled;	/* qos.throttled per second */
	double p99_us;		/* INFINITY: the last bucket */
	long long depth;
	char job[24];		/* "mirror:42%", "mirror:ready", or "-" */
};

/* A histogram being summed: buckets by upper bound (us). */
struct hist {
	struct bucket {
		uint64_t le, n;
	} *b;
	size_t len, cap;
};

static volatile sig_atomic_t quit_signal;
static struct termios saved_tty;
static int tty_raw, screen_taken;
static const char *screen_leave;

/* ---- terminal ---- */

static void
on_quit_signal(int sig)
{
	quit_signal = sig;
}

static void
signals_catch(void)
{
	struct sigaction sa = { .sa_handler = on_quit_signal };	/* no SA_RESTART: wake poll */

	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	/* a server gone must be an error message, not a silent death on write */
	signal(SIGPIPE, SIG_IGN);
}

/* Idempotent: at exit, and before any error line (the alternate screen would hide it). */
static void
term_restore(void)
{
	if (screen_taken) {
		fputs(screen_leave, stdout);
		fflush(stdout);
		screen_taken = 0;
	}
	if (tty_raw) {
		tcsetattr(STDIN_FILENO, TCSANOW, &saved_tty);
		tty_raw = 0;
	}
}

static void
term_setup(struct top *t)
{
	atexit(term_restore);
	if (t->count < 0) {	/* until q: then give the screen back as it was */
		fputs("\033[?1049h\033[?25l", stdout);	/* alternate screen, cursor off */
		screen_leave = "\033[?25h\033[?1049l";
	} else {		/* -n: the last refresh stays on the screen */
		fputs("\033[?25l", stdout);
		screen_leave = "\033[?25h";
	}
	screen_taken = 1;
	if (!t->keys || tcgetattr(STDIN_FILENO, &saved_tty) < 0) {
		t->keys = 0;
		return;
	}
	struct termios raw = saved_tty;
	raw.c_lflag &= ~(tcflag_t)(ICANON | ECHO);	/* keys one by one; ISIG stays: Ctrl-C */
	raw.c_cc[VMIN] = 1;
	raw.c_cc[VTIME] = 0;
	if (tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0)
		tty_raw = 1;
	else
		t->keys = 0;
}

/* The terminal's columns and lines; 80x24 when it will not say. */
static void
term_size(int *cols, int *lines)
{
	struct winsize ws;
	int ok = ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0;

	*cols = ok && ws.ws_col ? ws.ws_col : 80;
	*lines = ok && ws.ws_row ? ws.ws_row : 24;
}

static void __attribute__((format(printf, 1, 2), noreturn))
top_die(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	term_restore();
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	die("top: %s", msg);
}

static double
mono_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * Sleeps until deadline (monotonic seconds). Returns 1 when told to stop:
 * q on the terminal, or SIGINT (Ctrl-C), SIGTERM, SIGHUP.
 */
static int
wait_until(struct top *t, double deadline)
{
	for (;;) {
		double left = deadline - mono_now();
		struct pollfd pfd = { .fd = STDIN_FILENO, .events = POLLIN };
		char key;

		if (quit_signal)
			return 1;
		if (left <= 0)
			return 0;
		if (poll(&pfd, t->keys ? 1 : 0, (int)(left * 1000) + 1) <= 0)
			continue;	/* time is up, or a signal: checked above */
		ssize_t n = read(STDIN_FILENO, &key, 1);
		if (n == 1 && (key == 'q' || key == 'Q'))
			return 1;
		if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
			t->keys = 0;	/* stdin gone: just sleep */
	}
}

/* ---- samples ---- */

/* The value at a dotted path ("ops.read.reqs"), or NULL. */
static json_t *
jpath(json_t *v, const char *path)
{
	char key[64];

	while (v && *path) {
		size_t n = strcspn(path, ".");
		if (n >= sizeof(key))
			return NULL;
		memcpy(key, path, n);
		key[n] = '\0';
		v = json_object_get(v, key);
		path += n + (path[n] == '.');
	}
	return v;
}

static uint64_t
jcount(json_t *v, const char *path)
{
	json_int_t i = json_integer_value(jpath(v, path));
	return i > 0 ? (uint64_t)i : 0;
}

static int
error_is(json_t *resp, const char *code)
{
	const char *c = json_string_value(jpath(resp, "error.code"));
	return c && !strcmp(c, code);
}

/*
 * Takes a sample. With -m, a vbd gone since gives an empty one; any other
 * error, the server's going away first, ends top.
 */
static void
sample_take(struct top *t, struct sample *s)
{
	char err[512];
	json_t *args = t->minor >= 0 ? json_pack("{s:I}", "minor", (json_int_t)t->minor) : NULL;
	json_t *resp = ctl_call(t->cli->fd, "stats", args, NULL, err, sizeof(err));

	if (!resp)
		top_die("lost tapdiskd: %s", err);
	s->at = mono_now();
	if (json_is_true(json_object_get(resp, "ok"))) {
		json_t *result = json_object_get(resp, "result");
		s->vbds = t->minor >= 0 ? json_pack("[O]", result)
					: json_incref(json_object_get(result, "vbds"));
	} else if (t->minor >= 0 && error_is(resp, "ENOENT")) {
		s->vbds = json_array();
	} else {
		const char *msg = json_string_value(jpath(resp, "error.message"));
		top_die("stats: %s", msg ? msg : "failed");
	}
	json_decref(resp);
	if (!json_is_array(s->vbds))
		top_die("tapdiskd sent stats without vbds");
}

/* The vbd of prev that cur continues: same minor, same params. */
static json_t *
vbd_before(json_t *prev_vbds, json_t *cur)
{
	const char *name = json_string_value(json_object_get(cur, "name"));
	json_int_t minor = json_integer_value(json_object_get(cur, "minor"));
	size_t i;
	json_t *v;

	json_array_foreach(prev_vbds, i, v) {
		const char *pname = json_string_value(json_object_get(v, "name"));
		if (json_integer_value(json_object_get(v, "minor")) == minor &&
		    (name && pname ? !strcmp(name, pname) : name == pname))
			return v;
	}
	return NULL;
}

static const char *const counters[] = {
	"ops.read.reqs", "ops.write.reqs", "ops.read.bytes", "ops.write.bytes",
	"ops.read.latency_us.count", "ops.write.latency_us.count", "qos.throttled",
};

/* A counter went down: someone reset the stats, count from zero. */
static int
counters_restarted(json_t *cur, json_t *prev)
{
	for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
		if (jcount(cur, counters[i]) < jcount(prev, counters[i]))
			return 1;
	return 0;
}

/* ---- latency ---- */

static uint64_t
bucket_le(json_t *b)
{
	json_t *le = json_object_get(b, "le_us");
	return json_is_integer(le) ? (uint64_t)json_integer_value(le) : LE_INF;
}

/* Requests of the bucket with upper bound le in an op's histogram, or 0. */
static uint64_t
bucket_count(json_t *op, uint64_t le)
{
	size_t i;
	json_t *b;

	json_array_foreach(jpath(op, "latency_us.buckets"), i, b)
		if (bucket_le(b) == le)
			return jcount(b, "count");
	return 0;
}

static int
hist_put(struct hist *h, uint64_t le, uint64_t n)
{
	for (size_t i = 0; i < h->len; i++) {
		if (h->b[i].le == le) {
			h->b[i].n += n;
			return 0;
		}
	}
	if (h->len == h->cap) {
		size_t cap = h->cap ? 2 * h->cap : 128;
		struct bucket *b = realloc(h->b, cap * sizeof(*b));
		if (!b)
			return -ENOMEM;
		h->b = b;
		h->cap = cap;
	}
	h->b[h->len++] = (struct bucket){ le, n };
	return 0;
}

static int
bucket_cmp(const void *a, const void *b)
{
	uint64_t x = ((const struct bucket *)a)->le, y = ((const struct bucket *)b)->le;
	return x < y ? -1 : x > y;
}

/* Adds op's requests since prev_op (NULL: since the start) to h. */
static int
hist_add_delta(struct hist *h, json_t *op, json_t *prev_op)
{
	size_t i;
	json_t *b;

	json_array_foreach(jpath(op, "latency_us.buckets"), i, b) {
		uint64_t le = bucket_le(b), n = jcount(b, "count");
		uint64_t before = prev_op ? bucket_count(prev_op, le) : 0;
		if (n > before && hist_put(h, le, n - before) < 0)
			return -ENOMEM;
	}
	return 0;
}

/* The upper bound of the bucket holding the 99th percentile; -1 if empty. */
static double
hist_p99(struct hist *h)
{
	uint64_t total = 0, seen = 0;

	for (size_t i = 0; i < h->len; i++)
		total += h->b[i].n;
	if (!total)
		return -1;
	uint64_t rank = total - total / 100;	/* ceil(0.99 * total) */
	qsort(h->b, h->len, sizeof(*h->b), bucket_cmp);	/* two ops merged: unsorted */
	for (size_t i = 0; i < h->len; i++) {
		seen += h->b[i].n;
		if (seen >= rank)
			return h->b[i].le == LE_INF ? INFINITY : (double)h->b[i].le;
	}
	return INFINITY;
}

/* p99 of the reads and writes finished since prev (NULL: since the start). */
static double
interval_p99(json_t *cur, json_t *prev)
{
	struct hist h = { 0 };
	double p99 = -1;

	if (!hist_add_delta(&h, jpath(cur, "ops.read"), jpath(prev, "ops.read")) &&
	    !hist_add_delta(&h, jpath(cur, "ops.write"), jpath(prev, "ops.write")))
		p99 = hist_p99(&h);
	free(h.b);
	return p99;
}

/* ---- rows ---- */

/* A running job's progress, else its state; "-" without one. */
static void
job_cell(struct row *r, json_t *job)
{
	const char *type = json_string_value(json_object_get(job, "type"));
	const char *state = json_string_value(json_object_get(job, "state"));
	json_int_t done = json_integer_value(json_object_get(job, "bytes_done"));
	json_int_t total = json_integer_value(json_object_get(job, "bytes_total"));

	if (!type || !state)
		snprintf(r->job, sizeof(r->job), "-");
	else if (!strcmp(state, "running") && total > 0)
		snprintf(r->job, sizeof(r->job), "%.6s:%d%%", type, (int)(done * 100 / total));
	else
		snprintf(r->job, sizeof(r->job), "%.6s:%.9s", type, state);
}

static void
row_compute(struct row *r, json_t *cur, json_t *prev, double dt)
{
	static const char *const ops[2][2] = {
		{ "ops.read.reqs", "ops.read.bytes" }, { "ops.write.reqs", "ops.write.bytes" },
	};

	r->minor = (long)json_integer_value(json_object_get(cur, "minor"));
	r->params = json_string_value(json_object_get(cur, "name"));
	r->depth = (long long)(jcount(cur, "reqs_outstanding") + jcount(cur, "reqs_queued") +
			       jcount(cur, "qos.queue_depth"));
	r->throttled = r->p99_us = -1;
	job_cell(r, json_object_get(cur, "job"));
	for (int rw = 0; rw < 2; rw++)
		r->iops[rw] = r->mbps[rw] = -1;
	if (!prev || dt <= 0)
		return;		/* new since the last sample: no rates yet */
	json_t *base = counters_restarted(cur, prev) ? NULL : prev;
	for (int rw = 0; rw < 2; rw++) {
		r->iops[rw] = (double)(jcount(cur, ops[rw][0]) - jcount(base, ops[rw][0])) / dt;
		r->mbps[rw] = (double)(jcount(cur, ops[rw][1]) - jcount(base, ops[rw][1])) / dt / 1e6;
	}
	if (jpath(cur, "qos.throttled"))
		r->throttled = (double)(jcount(cur, "qos.throttled") -
					jcount(base, "qos.throttled")) / dt;
	r->p99_us = interval_p99(cur, base);
}

static const char *
cell_rate(char *buf, size_t len, double v, int decimals)
{
	if (v < 0)
		return "-";
	snprintf(buf, len, "%.*f", decimals, v);
	return buf;
}

static const char *
cell_p99(char *buf, size_t len, double us)
{
	if (us < 0)
		return "-";
	if (isinf(us))
		return "inf";
	snprintf(buf, len, "%.0f", us);
	return buf;
}

/* params cut to width: TYPE: kept when it fits, the path's end rather than its start */
static void
print_params(const char *params, int width)
{
	size_t len = strlen(params);

	if (width <= 0 || len <= (size_t)width) {
		fputs(params, stdout);
		return;
	}
	if (width < 6) {
		printf("%.*s", width, params);
		return;
	}
	const char *colon = strchr(params, ':');
	int head = colon && colon - params + 1 <= width / 2 ? (int)(colon - params + 1) : 0;
	int tail = width - head - 2;
	printf("%.*s..%s", head, params, params + len - (size_t)tail);
}

static void
row_print(const struct row *r, int params_width, const char *eol)
{
	char minor[24], depth[24], cell[6][32];

	snprintf(minor, sizeof(minor), "%ld", r->minor);
	snprintf(depth, sizeof(depth), "%lld", r->depth);
	printf(ROW_FMT, minor,
	       cell_rate(cell[0], sizeof(cell[0]), r->iops[0], 1),
	       cell_rate(cell[1], sizeof(cell[1]), r->iops[1], 1),
	       cell_rate(cell[2], sizeof(cell[2]), r->mbps[0], 2),
	       cell_rate(cell[3], sizeof(cell[3]), r->mbps[1], 2),
	       cell_p99(cell[4], sizeof(cell[4]), r->p99_us), depth,
	       cell_rate(cell[5], sizeof(cell[5]), r->throttled, 1), r->job);
	print_params(r->params ? r->params : "-", params_width);
	fputs(eol, stdout);
}

static void
header_print(const char *eol)
{
	printf(ROW_FMT "PARAMS%s", "MINOR", "R_IOPS", "W_IOPS", "R_MB/s", "W_MB/s", "P99_US",
	       "QD", "THROT/s", "JOB", eol);
}

/* ---- reports ---- */

/* One screen: the server, the time, then as many rows as fit. */
static void
screen_draw(struct top *t, json_t *vbds, json_t *prev_vbds, double dt)
{
	int cols, lines;
	char now[16], title[256];
	time_t wall = time(NULL);
	size_t i;
	json_t *v;

	term_size(&cols, &lines);
	lines -= 3;	/* the header, the column names, "(N more)" */
	strftime(now, sizeof(now), "%H:%M:%S", localtime(&wall));
	snprintf(title, sizeof(title), "tapdiskd pid %ld  %s  %zu vbd%s  every %gs"
		 "  p99: last interval  q quits", t->server_pid, now, json_array_size(vbds),
		 json_array_size(vbds) == 1 ? "" : "s", t->interval);
	fputs("\033[H\033[2J", stdout);
	printf("%.*s\n", cols - 1, title);	/* a wrapped line would push the rows down */
	fputs("\033[7m", stdout);	/* reverse video */
	header_print("\033[K\033[0m\n");
	json_array_foreach(vbds, i, v) {
		struct row r;
		if ((int)i >= lines) {
			printf("(%zu more)\n", json_array_size(vbds) - i);
			break;
		}
		row_compute(&r, v, prev_vbds ? vbd_before(prev_vbds, v) : NULL, dt);
		row_print(&r, cols - ROW_WIDTH - 1, "\n");
	}
}

/* For scripts: a header, a row per vbd, a blank line; no escape codes. */
static void
table_print(json_t *vbds, json_t *prev_vbds, double dt)
{
	size_t i;
	json_t *v;

	header_print("\n");
	json_array_foreach(vbds, i, v) {
		struct row r;
		row_compute(&r, v, vbd_before(prev_vbds, v), dt);
		row_print(&r, 0, "\n");
	}
	putchar('\n');
}

static void
output_flush(void)
{
	if (fflush(stdout) == 0)
		return;
	if (errno == EPIPE)
		exit(0);	/* the reader is gone: a pipeline's normal end */
	top_die("stdout: %s", strerror(errno));
}

static void
top_run(struct top *t)
{
	struct sample prev, cur;
	double next;

	sample_take(t, &prev);
	if (t->minor >= 0 && !json_array_size(prev.vbds))
		top_die("minor %ld: no open vbd", t->minor);
	if (t->tty) {
		term_setup(t);
		screen_draw(t, prev.vbds, NULL, 0);	/* at once; rates from the next one */
		output_flush();
	}
	next = prev.at + t->interval;
	for (long done = 0; t->count < 0 || done < t->count; done++) {
		if (wait_until(t, next))
			break;
		sample_take(t, &cur);
		if (t->tty)
			screen_draw(t, cur.vbds, prev.vbds, cur.at - prev.at);
		else
			table_print(cur.vbds, prev.vbds, cur.at - prev.at);
		output_flush();
		json_decref(prev.vbds);
		prev = cur;
		/* keep the cadence; after a stall, start again from now */
		next += t->interval;
		if (next < prev.at)
			next = prev.at + t->interval;
	}
	json_decref(prev.vbds);
	term_restore();
}

static double
parse_interval(const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || !*s || *end || !isfinite(v) || v < MIN_INTERVAL || v > 86400)
		die("-d SECS must be a number of seconds from %g to 86400, not '%s'",
		    MIN_INTERVAL, s);
	return v;
}

int
cmd_top(struct cli *cli, int argc, char **argv)
{
	struct top t = { .cli = cli, .interval = 1, .count = -1, .minor = -1 };
	int c;

	while ((c = next_opt(cli, argc, argv, "d:n:m:p:h", NULL)) != -1) {
		switch (c) {
		case 'd': t.interval = parse_interval(optarg); break;
		case 'n': t.count = parse_int(optarg, "-n COUNT"); break;
		case 'm': t.minor = parse_int(optarg, "-m MINOR"); break;
		default: usage_die(TOP_USAGE);
		}
	}
	if (optind != argc || t.count == 0)
		usage_die(TOP_USAGE);
	if (cli->json)
		die("top has no --json output: `tap-ctl stats` gives the counters as JSON");
	cli_connect(cli);
	check_pid(cli);
	json_t *v = cli_call(cli, "version", NULL);
	t.server_pid = (long)json_integer_value(json_object_get(v, "pid"));
	json_decref(v);
	t.tty = isatty(STDOUT_FILENO);
	t.keys = t.tty && isatty(STDIN_FILENO);
	signals_catch();
	top_run(&t);
	return 0;
}
