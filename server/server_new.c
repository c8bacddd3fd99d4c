/*
 * Builds and takes down the server: the one place that names every part
 * (loops, NBD frontend, control socket, metrics endpoint).
 */
#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "control.h"
#include "loop.h"
#include "metrics_http.h"
#include "nbd.h"
#include "nbd_tls.h"
#include "qos.h"

#define DEFAULT_POOL_CACHE (16u << 20)

/*
 * The TLS credentials, loaded once for every loop, and the mode: given
 * credentials, --tls defaults to require; --tls on or require needs them.
 */
static int
server_tls(struct server *srv, const struct server_config *cfg, char *err, size_t errlen)
{
	int have = cfg->tls_creds || cfg->tls_psk;

	srv->nbd_allow_insecure = cfg->nbd_allow_insecure;
	srv->tls_mode = cfg->tls_mode < 0 ? (have ? TLS_REQUIRE : TLS_OFF) : cfg->tls_mode;
	if (!have) {
		if (srv->tls_mode != TLS_OFF) {
			snprintf(err, errlen, "--tls %s needs --tls-creds DIR or --tls-psk FILE",
				 srv->tls_mode == TLS_ON ? "on" : "require");
			return -1;
		}
		if (cfg->tls_verify_peer) {
			snprintf(err, errlen, "--tls-verify-peer needs --tls-creds DIR");
			return -1;
		}
		return 0;
	}
	struct tls_config tc = { cfg->tls_creds, cfg->tls_psk, cfg->tls_verify_peer };
	return tls_creds_load(&tc, &srv->tls, err, errlen) < 0 ? -1 : 0;
}

/* The listeners (all on loop 0): each failure names its part as the command line does. */
static int
server_listen(struct server *srv, const struct server_config *cfg, char *err, size_t errlen)
{
	char why[512];

	if (cfg->nbd_listen &&
	    nbd_listen_global(srv->loops[0]->nbd, cfg->nbd_listen, why, sizeof(why)) < 0) {
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

static int
server_make_loops(struct server *srv, const struct server_config *cfg, char *err, size_t errlen)
{
	unsigned n = cfg->loops ? cfg->loops : 1;
	size_t cache = cfg->pool_cache ? cfg->pool_cache : DEFAULT_POOL_CACHE;

	if (n > SERVER_MAX_LOOPS) {
		snprintf(err, errlen, "--loops %u: at most %d", n, SERVER_MAX_LOOPS);
		return -1;
	}
	for (unsigned i = 0; i < n; i++) {
		srv->loops[i] = loop_new(srv, i, cfg->io_engine, cache, err, errlen);
		if (!srv->loops[i])
			return -1;
		srv->nr_loops = i + 1;
	}
	srv->base = srv->loops[0]->base;
	loop_set_current(srv->loops[0]);
	return 0;
}

static int
server_start_loops(struct server *srv, char *err, size_t errlen)
{
	for (unsigned i = 1; i < srv->nr_loops; i++) {
		char why[300];
		if (loop_start(srv->loops[i], why, sizeof(why)) < 0) {
			snprintf(err, errlen, "loop %u: %s", i, why);
			return -1;
		}
	}
	return 0;
}

struct server *
server_new(const struct server_config *cfg, char *err, size_t errlen)
{
	struct server *srv = calloc(1, sizeof(*srv));

	if (!srv || !(srv->state_dir = strdup(cfg->state_dir))) {
		free(srv);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	pthread_mutex_init(&srv->lock, NULL);
	srv->pid = getpid();
	srv->started = time(NULL);
	srv->open_flags = cfg->open_flags;
	srv->nbd_handshake_secs = cfg->nbd_handshake_secs ? cfg->nbd_handshake_secs : 30;
	srv->metrics_timeout_secs = cfg->metrics_timeout_secs ? cfg->metrics_timeout_secs : 10;
	LIST_INIT(&srv->qos_groups);
	srv->minors = calloc(SERVER_MAX_MINORS, sizeof(*srv->minors));
	srv->closed = calloc(SERVER_MAX_MINORS, 1);
	if (!srv->minors || !srv->closed) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if (server_tls(srv, cfg, err, errlen) < 0 ||
	    server_make_loops(srv, cfg, err, errlen) < 0 ||
	    server_listen(srv, cfg, err, errlen) < 0 ||
	    server_start_loops(srv, err, errlen) < 0)
		goto fail;
	return srv;
fail:
	server_free(srv);
	return NULL;
}

static void
loop_free_vbds(void *arg)
{
	struct loop *l = arg;
	struct server *srv = l->srv;

	for (int m = 0; srv->minors && m < SERVER_MAX_MINORS; m++) {
		if (srv->minors[m] && srv->minors[m]->loop == l) {
			vbd_forget(srv->minors[m]);
			srv->minors[m] = NULL;
		}
	}
}

void
server_free(struct server *srv)
{
	if (!srv)
		return;
	/*
	 * The threads first: nothing runs on a loop while its parts are freed.
	 * What they still owed loop 0 (a reply, a gather) runs next, while the
	 * control clients and the metrics endpoint it is for are still here.
	 */
	for (unsigned i = 1; i < srv->nr_loops; i++)
		loop_stop(srv->loops[i]);
	if (srv->nr_loops)
		loop_drain(srv->loops[0]);
	metrics_http_free(srv->metrics);
	control_free(srv->ctl);
	for (unsigned i = 0; i < srv->nr_loops; i++) {
		loop_free_vbds(srv->loops[i]);
		loop_free(srv->loops[i]);
	}
	loop_set_current(NULL);
	free(srv->minors);
	free(srv->closed);
	qos_groups_free(srv);
	tls_creds_free(srv->tls);
	pthread_mutex_destroy(&srv->lock);
	free(srv->state_dir);
	free(srv);
}
