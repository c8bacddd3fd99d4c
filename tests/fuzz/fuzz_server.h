/*
 * A server for the fuzz targets that drive whole frontends (NBD, blkif):
 * the server as server_new() builds it (thread I/O engine, no listeners)
 * and a few vbds opened directly (no NBD sockets: nothing is created on disk).
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

#include "fuzz_common.h"
#include "log.h"
#include "loop.h"
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
 * Opens minor on loop 0 (the harness's one loop) through vbd_new/vbd_open,
 * not server_open_vbd: no socket in the state directory. w is told.
 */
static int
fz_vbd_open(struct server *s, int minor, const char *params, unsigned flags, struct fz_wait *w)
{
	struct vbd *vbd;
	int rc = vbd_new(s, minor, s->loops[0], &vbd);
	if (rc < 0)
		return rc;
	vbd_open(vbd, params, flags, fz_wait_done, w);
	return 0;
}

/*
 * Builds the server (server_new, as tapdiskd does, with the thread engine
 * and no listeners) and opens params[i] (with flags[i]) as minor i.
 * state_dir is a mkdtemp template: the name is made and removed at once, as
 * the server only ever prints it, and nothing is left behind even after a
 * crash.
 */
static inline struct server *
fz_server_setup(const char *name, char *state_dir, const char *const params[],
		const unsigned flags[], int n)
{
	/*
	 * The pool stays warm across inputs (a fresh buffer costs page faults
	 * and sanitizer shadow by the megabyte): room for what two clients may
	 * hold at once, each up to its 32 MiB budget plus one 32 MiB request.
	 */
	struct server_config cfg = { .io_engine = "threads", .pool_cache = 160u << 20 };
	struct server *srv;
	char err[256];

	log_init(name, 0, LOG_LVL_ERR);
	signal(SIGPIPE, SIG_IGN);
	if (!mkdtemp(state_dir))
		fz_fail("mkdtemp: %s", strerror(errno));
	rmdir(state_dir);
	cfg.state_dir = state_dir;
	srv = server_new(&cfg, err, sizeof(err));
	if (!srv)
		fz_fail("server_new: %s", err);

	for (int m = 0; m < n; m++) {
		struct fz_wait w = { 0 };
		int rc = fz_vbd_open(srv, m, params[m], flags[m], &w);
		if (rc < 0)
			fz_fail("vbd_open %s: %s", params[m], strerror(-rc));
		while (!w.done)
			event_base_loop(srv->base, EVLOOP_ONCE);
		if (w.err)
			fz_fail("vbd_open %s: %s", params[m], w.msg);
	}
	return srv;
}

#endif
