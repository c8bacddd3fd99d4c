/*
 * Builds and takes down the server: the one place that names every part
 * (event loop, buffer pool, I/O engine, NBD frontend, control socket,
 * metrics endpoint).
 */
#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <event2/event.h>

#include "bufpool.h"
#include "control.h"
#include "io.h"
#include "metrics_http.h"
#include "nbd.h"
#include "qos.h"

#define DEFAULT_POOL_CACHE (16u << 20)
#define IDLE_TRIM_INTERVAL 5	/* seconds between returns of idle buffers */

static void
on_idle_tick(evutil_socket_t fd, short what, void *arg)
{
	struct server *srv = arg;
	(void)fd;
	(void)what;
	if (bufpool_trim_idle(srv->pool)) {
#ifdef __GLIBC__
		malloc_trim(0);
#endif
	}
}

/* The listeners: each failure names its part as the command line does. */
static int
server_listen(struct server *srv, const struct server_config *cfg, char *err, size_t errlen)
{
	char why[512];

	if (cfg->nbd_listen && nbd_listen_global(srv->nbd, cfg->nbd_listen, why, sizeof(why)) < 0) {
		snprintf(err, errlen, "--nbd-listen %s", why);
		return -1;
	}
	if (cfg->ctl_path && !(srv->ctl = control_new(srv, cfg->ctl_path, why, sizeof(why)))) {
		snprintf(err, errlen, "control socket %s", why);
		return -1;
	}
	if (cfg->metrics_listen &&
	    !(srv->metrics = metrics_http_new(srv, cfg->metrics_listen, cfg->metrics_allow_remote,
					      why, sizeof(why)))) {
		snprintf(err, errlen, "--metrics-listen %s", why);
		return -1;
	}
	return 0;
}

struct server *
server_new(const struct server_config *cfg, char *err, size_t errlen)
{
	struct server *srv = calloc(1, sizeof(*srv));
	struct timeval tick = { IDLE_TRIM_INTERVAL, 0 };

	if (!srv || !(srv->state_dir = strdup(cfg->state_dir)))
		goto nomem;
	srv->pid = getpid();
	srv->started = time(NULL);
	srv->open_flags = cfg->open_flags;
	srv->nbd_handshake_secs = cfg->nbd_handshake_secs ? cfg->nbd_handshake_secs : 30;
	srv->metrics_timeout_secs = cfg->metrics_timeout_secs ? cfg->metrics_timeout_secs : 10;
	LIST_INIT(&srv->qos_groups);
	srv->minors = calloc(SERVER_MAX_MINORS, sizeof(*srv->minors));
	srv->base = event_base_new();
	srv->pool = bufpool_new(cfg->pool_cache ? cfg->pool_cache : DEFAULT_POOL_CACHE);
	if (!srv->minors || !srv->base || !srv->pool)
		goto nomem;
	srv->idle_tick = event_new(srv->base, -1, EV_PERSIST, on_idle_tick, srv);
	if (!srv->idle_tick || event_add(srv->idle_tick, &tick) < 0)
		goto nomem;
	srv->io = io_engine_new(srv->base, cfg->io_engine, err, errlen);
	if (!srv->io)
		goto fail;
	srv->nbd = nbd_server_new(srv);
	if (!srv->nbd)
		goto nomem;
	if (server_listen(srv, cfg, err, errlen) < 0)
		goto fail;
	return srv;
nomem:
	snprintf(err, errlen, "out of memory");
fail:
	server_free(srv);
	return NULL;
}

void
server_free(struct server *srv)
{
	if (!srv)
		return;
	metrics_http_free(srv->metrics);
	control_free(srv->ctl);
	nbd_server_free(srv->nbd);
	if (srv->idle_tick)
		event_free(srv->idle_tick);
	if (srv->io && !srv->zombies)
		io_engine_free(srv->io);
	for (int m = 0; srv->minors && m < SERVER_MAX_MINORS; m++)
		free(srv->minors[m]);
	free(srv->minors);
	qos_groups_free(srv);
	bufpool_free(srv->pool);
	if (srv->base)
		event_base_free(srv->base);
	free(srv->state_dir);
	free(srv);
}

