/*
 * A server for the fuzz targets that drive whole frontends (NBD, blkif):
 * the event loop, the thread I/O engine, the buffer pool and a few vbds
 * opened directly (no NBD sockets, so nothing is created on disk).
 */
#ifndef TD_FUZZ_SERVER_H
#define TD_FUZZ_SERVER_H

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bufpool.h"
#include "fuzz_common.h"
#include "io.h"
#include "log.h"
#include "server.h"
#include "vbd.h"

struct fz_wait {
	int done, err;
	char msg[256];
};

static inline void
fz_wait_done(void *arg, int err, const char *msg)
{
	struct fz_wait *w = arg;
	w->done = 1;
	w->err = err;
	snprintf(w->msg, sizeof(w->msg), "%s", msg ? msg : "");
}

/*
 * Sets srv up and opens params[i] (with flags[i]) as minor i. state_dir is
 * a mkdtemp template: the name is made and removed at once, as the server
 * only ever prints it, and nothing is left behind even after a crash.
 */
static inline void
fz_server_setup(struct server *srv, const char *name, char *state_dir,
		const char *const params[], const unsigned flags[], int n)
{
	char err[256];

	log_init(name, 0, LOG_LVL_ERR);
	signal(SIGPIPE, SIG_IGN);
	if (!mkdtemp(state_dir))
		fz_fail("mkdtemp: %s", strerror(errno));
	rmdir(state_dir);

	srv->base = event_base_new();
	srv->nbd_handshake_secs = 30;
	srv->metrics_timeout_secs = 10;
	if (!srv->base)
		fz_fail("event_base_new failed");
	srv->io = io_engine_new(srv->base, "threads", err, sizeof(err));
	if (!srv->io)
		fz_fail("io_engine_new: %s", err);
	srv->pool = bufpool_new(8u << 20);
	srv->state_dir = state_dir;
	srv->pid = getpid();
	srv->minors = calloc(SERVER_MAX_MINORS, sizeof(*srv->minors));
	srv->started = time(NULL);
	if (!srv->pool || !srv->minors)
		fz_fail("out of memory");

	/* vbd_open, not server_open_vbd: no socket in the state directory */
	for (int m = 0; m < n; m++) {
		struct fz_wait w = { 0 };
		int rc = vbd_open(srv, m, params[m], flags[m], fz_wait_done, &w);
		if (rc < 0)
			fz_fail("vbd_open %s: %s", params[m], strerror(-rc));
		while (!w.done)
			event_base_loop(srv->base, EVLOOP_ONCE);
		if (w.err)
			fz_fail("vbd_open %s: %s", params[m], w.msg);
	}
}

#endif
