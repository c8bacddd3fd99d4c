/*
 * The metrics endpoint (--metrics-listen HOST:PORT): an HTTP server on the
 * loop answering GET /stats (every vbd's `stats` document, JSON) and GET
 * /metrics (the same numbers in Prometheus text format 0.0.4). It owns its
 * listening socket, its HTTP connections and their limits.
 */
#ifndef TD_METRICS_HTTP_H
#define TD_METRICS_HTTP_H

#include <stddef.h>

#include <jansson.h>

struct evbuffer;
struct server;
struct metrics_http;

/*
 * Checks a HOST:PORT spec without binding: HOST an IPv4 address, an IPv6
 * one in brackets, or localhost; loopback unless allow_remote. 0, or -1
 * with the reason in err.
 */
int metrics_http_check(const char *spec, int allow_remote, char *err, size_t errlen);

/* Binds and serves; NULL with the reason in err. PORT 0: the kernel picks. */
struct metrics_http *metrics_http_new(struct server *srv, const char *spec,
				      int allow_remote, char *err, size_t errlen);

/* The bound address, "127.0.0.1:PORT" or "[::1]:PORT"; NULL for NULL. */
const char *metrics_http_address(const struct metrics_http *m);

/*
 * The Prometheus text of a stats document ({"vbds": [...]}, as
 * server_stats_json() makes it) appended to out: GET /metrics. 0 or -errno.
 */
int metrics_prometheus(json_t *stats, struct evbuffer *out);

/* Closes the socket and every connection. NULL is fine. */
void metrics_http_free(struct metrics_http *m);

#endif
