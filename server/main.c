/*
 * tapdiskd: options, the state directory and its lock, daemonizing, signals,
 * and the orderly start and stop of every part of the server.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <dirent.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "fdlimit.h"
#include "io.h"
#include "io_fault.h"
#include "io_record.h"
#include "log.h"
#include "loop.h"
#include "metrics_http.h"
#include "nbd.h"
#include "nbd_tls.h"
#include "server.h"
#include "service_notify.h"
#include "xenbus.h"

#define DEFAULT_STATE_DIR "/run/tapdiskd"
#define SHUTDOWN_GRACE 30		/* seconds before in-flight I/O is abandoned */
#define POOL_CACHE (16u << 20)

struct options {
	const char *state_dir;
	const char *io_engine;
	unsigned loops;			/* 0: one per online CPU, at most SERVER_MAX_LOOPS */
	const char *nbd_listen;
	const char *metrics_listen;
	int metrics_allow_remote;
	const char *tls_creds, *tls_psk;
	int tls_verify_peer;
	int tls_mode;			/* enum tls_mode, or -1: the default */
	int nbd_allow_insecure;
	unsigned handshake_secs, metrics_timeout_secs;
	int foreground;
	int no_direct;
	const char *record_io;		/* --record-io FILE: testing only */
	int fault_injection;		/* --fault-injection: testing only */
	enum log_level level;
	const char **opens;
	int nr_opens;
	struct xenbus_opts xen;
};

static struct server *the_server;	/* for the startup opens' callbacks */
static struct event *grace_ev;

static void
usage(FILE *f)
{
	fprintf(f,
		"usage: tapdiskd [--state-dir DIR] [--foreground] [--io-engine uring|threads]\n"
		"                [--loops N]\n"
		"                [--nbd-listen unix:PATH|tcp:HOST:PORT] [--log-level LEVEL]\n"
		"                [--no-direct] [--open TYPE:PATH]... [--no-xen] [--xen-... ]\n"
		"                [--metrics-listen HOST:PORT [--metrics-allow-remote]]\n"
		"                [--nbd-handshake-timeout S] [--metrics-timeout S]\n"
		"                [--tls-creds DIR|--tls-psk FILE] [--tls require|on|off]\n"
		"                [--tls-verify-peer] [--nbd-allow-insecure]\n"
		"\n"
		"  -s, --state-dir DIR    control socket DIR/ctl.sock, NBD sockets DIR/nbd<pid>.<minor>\n"
		"                         (default %s)\n"
		"  -F, --foreground       stay in the foreground and log to stderr\n"
		"  -e, --io-engine E      uring (default when the kernel has it) or threads\n"
		"      --loops N          event loop threads serving vbds, 1 to 16 (default: one\n"
		"                         per online CPU, at most 16)\n"
		"  -n, --nbd-listen SPEC  also serve every vbd by export name (its minor)\n"
		"      --tls-creds DIR    NBD over TLS with x509: DIR/server-cert.pem,\n"
		"                         DIR/server-key.pem; DIR/ca-cert.pem verifies client\n"
		"                         certificates that are sent\n"
		"      --tls-psk FILE     NBD over TLS with pre-shared keys (username:hexkey lines)\n"
		"      --tls MODE         require (the default with credentials): only STARTTLS\n"
		"                         before TLS on --nbd-listen; on: TLS offered; off\n"
		"      --tls-verify-peer  require a client certificate signed by DIR/ca-cert.pem\n"
		"      --nbd-allow-insecure  let --nbd-listen tcp: take a non-loopback address\n"
		"                         without --tls require\n"
		"  -l, --log-level L      error, warning, info (default) or debug\n"
		"      --no-direct        never open images with O_DIRECT\n"
		"  -o, --open TYPE:PATH   open a vbd at start (minors 0, 1, ... in order)\n"
		"      --no-xen           do not serve Xen guests (blkif)\n"
		"      --xen-backend-types T  backend directories to watch (default vbd3,vbd)\n"
		"      --xen-domid N      our domain (default 0)\n"
		"      --xen-sim DIR      a simulated hypervisor in DIR instead of Xen (tests)\n"
		"      --metrics-listen HOST:PORT  serve GET /stats (JSON) and /metrics (Prometheus)\n"
		"                         over HTTP; loopback only, PORT 0 lets the kernel pick\n"
		"      --metrics-allow-remote  let --metrics-listen take any address\n"
		"      --nbd-handshake-timeout S  cut NBD clients still negotiating after S s (30)\n"
		"      --metrics-timeout S  cut HTTP clients idle, or on one request, for S s (10)\n"
		"      --record-io FILE   log every write and sync made to image files into FILE,\n"
		"                         for the power-loss replay tests (slow; testing only)\n"
		"      --fault-injection  let the control command fault-inject fail chosen I/O\n"
		"                         to image files (testing only)\n"
		"  -h, --help             this text\n"
		"  -V, --version          print the version\n"
		"\nSee tapdiskd(8).\n",
		DEFAULT_STATE_DIR);
}

/* A bad or non-loopback --metrics-listen is refused before anything starts. */
static int
check_metrics_listen(const struct options *o)
{
	char err[256];

	if (!o->metrics_listen ||
	    metrics_http_check(o->metrics_listen, o->metrics_allow_remote, err, sizeof(err)) == 0)
		return 0;
	fprintf(stderr, "tapdiskd: --metrics-listen %s\n", err);
	return -1;
}

static int
parse_seconds(const char *s, unsigned *out)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);
	if (!*s || *end || v < 1 || v > 3600)
		return -1;
	*out = (unsigned)v;
	return 0;
}

static int
parse_options(int argc, char **argv, struct options *o)
{
	static const struct option longopts[] = {
		{ "state-dir", required_argument, NULL, 's' },
		{ "foreground", no_argument, NULL, 'F' },
		{ "io-engine", required_argument, NULL, 'e' },
		{ "loops", required_argument, NULL, 'L' },
		{ "nbd-listen", required_argument, NULL, 'n' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "no-direct", no_argument, NULL, 'D' },
		{ "open", required_argument, NULL, 'o' },
		{ "no-xen", no_argument, NULL, 'X' },
		{ "xen-backend-types", required_argument, NULL, 'T' },
		{ "xen-domid", required_argument, NULL, 'd' },
		{ "xen-sim", required_argument, NULL, 'Y' },
		{ "metrics-listen", required_argument, NULL, 'M' },
		{ "metrics-allow-remote", no_argument, NULL, 'A' },
		{ "nbd-handshake-timeout", required_argument, NULL, 'H' },
		{ "metrics-timeout", required_argument, NULL, 'W' },
		{ "record-io", required_argument, NULL, 'R' },
		{ "fault-injection", no_argument, NULL, 'J' },
		{ "tls-creds", required_argument, NULL, 'C' },
		{ "tls-psk", required_argument, NULL, 'P' },
		{ "tls", required_argument, NULL, 't' },
		{ "tls-verify-peer", no_argument, NULL, 'v' },
		{ "nbd-allow-insecure", no_argument, NULL, 'I' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	o->state_dir = DEFAULT_STATE_DIR;
	o->level = LOG_LVL_INFO;
	o->handshake_secs = 30;
	o->metrics_timeout_secs = 10;
	o->tls_mode = -1;
	o->opens = calloc((size_t)argc, sizeof(*o->opens));
	while ((c = getopt_long(argc, argv, "s:Fe:n:l:o:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 's': o->state_dir = optarg; break;
		case 'F': o->foreground = 1; break;
		case 'e':
			if (strcmp(optarg, "uring") && strcmp(optarg, "threads")) {
				fprintf(stderr, "tapdiskd: --io-engine must be uring or threads\n");
				return -1;
			}
			o->io_engine = optarg;
			break;
		case 'n': o->nbd_listen = optarg; break;
		case 'L': {
			char *end;
			unsigned long v = strtoul(optarg, &end, 10);
			if (!*optarg || *end || v < 1 || v > SERVER_MAX_LOOPS) {
				fprintf(stderr, "tapdiskd: --loops must be 1 to %d\n", SERVER_MAX_LOOPS);
				return -1;
			}
			o->loops = (unsigned)v;
			break;
		}
		case 'l':
			if (log_parse_level(optarg, &o->level) < 0) {
				fprintf(stderr, "tapdiskd: unknown log level '%s'\n", optarg);
				return -1;
			}
			break;
		case 'D': o->no_direct = 1; break;
		case 'o': o->opens[o->nr_opens++] = optarg; break;
		case 'X': o->xen.disabled = 1; break;
		case 'T': o->xen.types = optarg; break;
		case 'Y': o->xen.sim_dir = optarg; break;
		case 'M': o->metrics_listen = optarg; break;
		case 'A': o->metrics_allow_remote = 1; break;
		case 'R': o->record_io = optarg; break;
		case 'C': o->tls_creds = optarg; break;
		case 'P': o->tls_psk = optarg; break;
		case 'v': o->tls_verify_peer = 1; break;
		case 'I': o->nbd_allow_insecure = 1; break;
		case 't':
			if (strcmp(optarg, "require") == 0)
				o->tls_mode = TLS_REQUIRE;
			else if (strcmp(optarg, "on") == 0)
				o->tls_mode = TLS_ON;
			else if (strcmp(optarg, "off") == 0)
				o->tls_mode = TLS_OFF;
			else {
				fprintf(stderr, "tapdiskd: --tls must be require, on or off\n");
				return -1;
			}
			break;
		case 'J': o->fault_injection = 1; break;
		case 'H':
		case 'W':
			if (parse_seconds(optarg, c == 'H' ? &o->handshake_secs
							   : &o->metrics_timeout_secs) < 0) {
				fprintf(stderr, "tapdiskd: --%s must be 1 to 3600 seconds\n",
					c == 'H' ? "nbd-handshake-timeout" : "metrics-timeout");
				return -1;
			}
			break;
		case 'd': {
			char *end;
			unsigned long v = strtoul(optarg, &end, 10);
			if (!*optarg || *end || v > 0x7fef) {
				fprintf(stderr, "tapdiskd: --xen-domid must be a domain number\n");
				return -1;
			}
			o->xen.domid = (uint32_t)v;
			break;
		}
		case 'h': usage(stdout); free(o->opens); exit(0);
		case 'V': printf("tapdiskd %s\n", TAPDISKD_VERSION); free(o->opens); exit(0);
		default: usage(stderr); return -1;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "tapdiskd: unexpected argument '%s'\n", argv[optind]);
		return -1;
	}
	return check_metrics_listen(o);
}

/* Creates the state dir if needed and takes its lock; returns the lock fd. */
static int
state_dir_lock(const char *dir)
{
	char path[PATH_MAX];
	int fd;

	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		fprintf(stderr, "tapdiskd: cannot create state dir %s: %s\n", dir, strerror(errno));
		return -1;
	}
	snprintf(path, sizeof(path), "%s/tapdiskd.lock", dir);
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(stderr, "tapdiskd: %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		char pid[32] = "";
		ssize_t n = pread(fd, pid, sizeof(pid) - 1, 0);
		if (n > 0)
			pid[strcspn(pid, "\n")] = '\0';
		fprintf(stderr, "tapdiskd: another tapdiskd%s%s%s is already serving %s\n",
			*pid ? " (pid " : "", pid, *pid ? ")" : "", dir);
		close(fd);
		return -1;
	}
	return fd;
}

static void
lock_write_pid(int fd)
{
	char buf[32];
	int n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
	if (ftruncate(fd, 0) < 0 || pwrite(fd, buf, (size_t)n, 0) < 0)
		log_warn("cannot record pid in the lock file: %s", strerror(errno));
}

/* Sockets left by a server that died: nobody else can own them, we hold the lock. */
static void
remove_stale_sockets(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;

	if (!d)
		return;
	while ((de = readdir(d))) {
		if (strcmp(de->d_name, "ctl.sock") && strncmp(de->d_name, "nbd", 3))
			continue;
		if (unlinkat(dirfd(d), de->d_name, 0) == 0)
			log_info("removed stale socket %s/%s", dir, de->d_name);
	}
	closedir(d);
}

/* Forks; the parent exits once the child reports ready (0) or failed. */
static int
daemonize(int *ready_fd)
{
	int p[2];
	if (pipe(p) < 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid > 0) {
		char c = 1;
		close(p[1]);
		if (read(p[0], &c, 1) != 1)
			c = 1;
		_exit(c ? 1 : 0);
	}
	close(p[0]);
	setsid();
	if (chdir("/") < 0)
		return -1;
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0);
		dup2(null, 1);
		dup2(null, 2);
		if (null > 2)
			close(null);
	}
	*ready_fd = p[1];
	return 0;
}

/*
 * Thousands of vbds need thousands of descriptors: take what the hard limit
 * allows. The figure is logged once the server is up (log_fd_limit), so a
 * failed start still says one line.
 */
static unsigned long fd_limit_before, fd_limit_after;

static void
raise_fd_limit(void)
{
	int rc = fdlimit_init(&fd_limit_before, &fd_limit_after);

	if (rc < 0)
		log_warn("file descriptors: cannot raise the limit of %lu: %s", fd_limit_before,
			 strerror(-rc));
}

static void
log_fd_limit(void)
{
	if (fd_limit_after != fd_limit_before)
		log_info("file descriptors: limit raised from %lu to %lu", fd_limit_before,
			 fd_limit_after);
	else
		log_info("file descriptors: limit %lu", fd_limit_after);
}

/* ---- shutdown ---- */

/* Every vbd closed (its minor let go), no zombie left: loop 0 stops. */
static void
maybe_exit(struct server *srv)
{
	if (server_vbds_left(srv) || srv->nr_zombies)
		return;
	event_base_loopexit(srv->base, NULL);
}

static void
shutdown_vbd_done(void *arg, int err, const char *msg)
{
	struct server *srv = arg;
	if (err && err != ENOENT)
		log_warn("shutdown: %s", msg ? msg : strerror(err));
	maybe_exit(srv);
}

/* On the vbd's loop: closes it, letting its minor go; force cuts its clients off. */
static void
shutdown_op(struct vbd *vbd, void *op_arg, vbd_done_fn done, void *arg)
{
	int force = op_arg != NULL;

	if (((vbd->state & VBD_SHUTDOWN_REQUESTED) && !force) || (vbd->state & VBD_OPENING)) {
		done(arg, 0, NULL);	/* closing already; or closed when its open completes */
		return;
	}
	vbd_close(vbd, force, 1, done, arg);
}

static void
shutdown_vbds(struct server *srv, int force)
{
	for (int m = 0; m < SERVER_MAX_MINORS; m++) {
		if (server_vbd_loop(srv, m) &&
		    server_vbd_op(srv, m, shutdown_op, force ? srv : NULL, shutdown_vbd_done,
				  srv) < 0)
			log_err("shutdown: out of memory closing minor %d", m);
	}
	maybe_exit(srv);
}

static void
on_grace_expired(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;
	(void)fd;
	(void)what;
	log_warn("shutdown: in-flight I/O did not finish in %d s; forcing", SHUTDOWN_GRACE);
	shutdown_vbds(srv, 1);
	if (srv->nr_zombies) {
		log_warn("shutdown: abandoning I/O the kernel still holds");
		event_base_loopexit(srv->base, NULL);
	}
}

static void
stop_listening(void *arg)
{
	struct loop *l = arg;
	nbd_stop_listening(l->nbd);
}

static void
on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct server *srv = arg;
	(void)what;

	if (srv->stopping) {
		log_info("second signal: stopping now");
		on_grace_expired(-1, 0, srv);
		return;
	}
	log_info("%s: shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
	service_notify_stopping();
	srv->stopping = 1;
	for (unsigned i = 0; i < srv->nr_loops; i++) {
		if (i == 0)
			stop_listening(srv->loops[0]);
		else if (loop_call(srv->loops[i], stop_listening, srv->loops[i]) < 0)
			log_warn("shutdown: out of memory: loop %u keeps listening", i);
	}
	struct timeval tv = { SHUTDOWN_GRACE, 0 };
	grace_ev = evtimer_new(srv->base, on_grace_expired, srv);
	if (grace_ev)
		evtimer_add(grace_ev, &tv);
	shutdown_vbds(srv, 0);
}

/* ---- startup opens (--open) ---- */

static char **startup_params;	/* --open's, made absolute; minor i is startup_params[i] */

/* On the vbd's loop. */
static void
startup_open_done(void *arg, int err, const char *msg)
{
	int m = (int)(intptr_t)arg;
	if (err) {
		log_err("--open %s: %s", startup_params[m], msg ? msg : strerror(err));
		return;
	}
	char *nbd = nbd_vbd_path(the_server, m);
	log_info("minor %d: NBD URI nbd+unix:///?socket=%s", m, nbd);
	free(nbd);
}

/*
 * The --open params, a relative path meaning relative to where we were
 * started; NULL after saying why not.
 */
static char **
absolute_opens(const char *const *params, int n)
{
	char **out = calloc((size_t)n + 1, sizeof(*out)), cwd[PATH_MAX];
	struct td_error err;

	if (!out || !getcwd(cwd, sizeof(cwd))) {
		fprintf(stderr, "tapdiskd: %s\n", strerror(errno));
		free(out);
		return NULL;
	}
	for (int i = 0; i < n; i++) {
		if (td_params_absolute(params[i], cwd, &out[i], &err) < 0) {
			fprintf(stderr, "tapdiskd: --open: %s\n", err.msg);
			while (i--)
				free(out[i]);
			free(out);
			return NULL;
		}
	}
	return out;
}

static int
startup_opens(struct server *srv, char **opens, int n)
{
	startup_params = opens;
	for (int i = 0; i < n; i++) {
		int rc = server_open_vbd(srv, i, NULL, opens[i], NULL, startup_open_done,
					 (void *)(intptr_t)i);
		if (rc < 0) {
			log_err("--open %s: %s", opens[i], strerror(-rc));
			return -1;
		}
	}
	return 0;
}

/* Signals: SIGINT and SIGTERM shut down, through the loop. */
static int
add_signals(struct server *srv, struct event **sigint_ev, struct event **sigterm_ev)
{
	*sigint_ev = evsignal_new(srv->base, SIGINT, on_signal, srv);
	*sigterm_ev = evsignal_new(srv->base, SIGTERM, on_signal, srv);
	return *sigint_ev && *sigterm_ev && evsignal_add(*sigint_ev, NULL) == 0 &&
	       evsignal_add(*sigterm_ev, NULL) == 0 ? 0 : -1;
}

/* Tells the parent of a daemonized server whether it started (0) or not. */
static void
report_ready(int *ready_fd, char ok)
{
	if (*ready_fd < 0)
		return;
	if (ok == 0 && write(*ready_fd, &ok, 1) < 0)
		log_warn("cannot tell the parent we are ready");
	close(*ready_fd);	/* EOF without a byte: failure */
	*ready_fd = -1;
}

/* One loop per online CPU, at most SERVER_MAX_LOOPS. */
static unsigned
default_loops(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n < 1 ? 1 : n > SERVER_MAX_LOOPS ? SERVER_MAX_LOOPS : (unsigned)n;
}

/* Runs the server until a signal has shut every vbd down. 0, or 1 if it could not start. */
static int
serve(const struct options *opts, char *dir, char **opens, int *ready_fd)
{
	char err[512], path[PATH_MAX];
	struct event *sigint_ev = NULL, *sigterm_ev = NULL;
	struct xenbus *xb = NULL;
	struct server *srv;
	int rc = 1;

	snprintf(path, sizeof(path), "%s/ctl.sock", dir);
	struct server_config cfg = {
		.state_dir = dir,
		.io_engine = opts->io_engine,
		.loops = opts->loops ? opts->loops : default_loops(),
		.open_flags = opts->no_direct ? TD_OPEN_NODIRECT : 0,
		.pool_cache = POOL_CACHE,
		.nbd_handshake_secs = opts->handshake_secs,
		.metrics_timeout_secs = opts->metrics_timeout_secs,
		.ctl_path = path,
		.nbd_listen = opts->nbd_listen,
		.metrics_listen = opts->metrics_listen,
		.metrics_allow_remote = opts->metrics_allow_remote,
		.tls_creds = opts->tls_creds,
		.tls_psk = opts->tls_psk,
		.tls_verify_peer = opts->tls_verify_peer,
		.tls_mode = opts->tls_mode,
		.nbd_allow_insecure = opts->nbd_allow_insecure,
	};
	remove_stale_sockets(dir);
	srv = the_server = server_new(&cfg, err, sizeof(err));
	if (!srv) {
		log_err("%s", err);
		return 1;
	}
	if (add_signals(srv, &sigint_ev, &sigterm_ev) < 0) {
		log_err("cannot set up signal handling");
		goto out;
	}
	if (startup_opens(srv, opens, opts->nr_opens) < 0)
		goto out;
	xb = xenbus_start(srv, &opts->xen);

	log_info("serving on %s (pid %d, io engine %s, %u loop%s)", path, (int)srv->pid,
		 io_engine_name(srv->loops[0]->io), srv->nr_loops, srv->nr_loops > 1 ? "s" : "");
	log_fd_limit();
	service_notify_ready(server_vbd_count(srv));
	report_ready(ready_fd, 0);
	event_base_dispatch(srv->base);
	log_info("stopped");
	rc = 0;
out:
	xenbus_stop(xb);
	if (grace_ev)
		event_free(grace_ev);
	if (sigint_ev)
		event_free(sigint_ev);
	if (sigterm_ev)
		event_free(sigterm_ev);
	server_free(srv);
	the_server = NULL;
	return rc;
}

int
main(int argc, char **argv)
{
	struct options opts = { 0 };
	int lock_fd = -1, ready_fd = -1, rc = 1;
	char **opens = NULL, *dir = NULL;

	if (parse_options(argc, argv, &opts) < 0) {
		free(opts.opens);
		return 2;
	}
	opens = absolute_opens(opts.opens, opts.nr_opens);
	if (!opens)
		goto out;
	dir = realpath(opts.state_dir, NULL);
	if (!dir && errno == ENOENT && mkdir(opts.state_dir, 0700) == 0)
		dir = realpath(opts.state_dir, NULL);
	if (!dir) {
		fprintf(stderr, "tapdiskd: state dir %s: %s\n", opts.state_dir, strerror(errno));
		goto out;
	}
	lock_fd = state_dir_lock(dir);
	if (lock_fd < 0)
		goto out;
	if (!opts.foreground && daemonize(&ready_fd) < 0) {
		fprintf(stderr, "tapdiskd: cannot daemonize: %s\n", strerror(errno));
		goto out;
	}
	log_init("tapdiskd", !opts.foreground, opts.level);
	lock_write_pid(lock_fd);
	if (opts.record_io && (rc = io_record_start(opts.record_io)) < 0) {
		log_err("--record-io %s: %s", opts.record_io, strerror(-rc));
		rc = 1;
		goto out;
	}
	if (opts.fault_injection) {
		if ((rc = io_fault_enable()) < 0) {
			log_err("--fault-injection: %s", strerror(-rc));
			rc = 1;
			goto out;
		}
		log_warn("fault injection is on: a control client can fail any I/O (testing only)");
	}
	raise_fd_limit();
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	rc = serve(&opts, dir, opens, &ready_fd);
	report_ready(&ready_fd, 1);
	goto out;
out:
	for (int i = 0; opens && i < opts.nr_opens; i++)
		free(opens[i]);
	free(opens);
	free(opts.opens);
	free(dir);
	io_record_stop();
	if (lock_fd >= 0)
		close(lock_fd);
	fdlimit_fini();
	return rc;
}
