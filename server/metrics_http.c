/*
 * The metrics endpoint: an evhttp server on the loop, read-only, serving
 * GET /stats (every vbd's stats, as `tap-ctl stats` prints them) and GET
 * /metrics (the same document turned into Prometheus text format 0.0.4).
 *
 * It owns the listening socket, every HTTP connection and the renderings,
 * and keeps a slow or hostile client to a few fds and little loop time:
 * small requests, idle timeouts, a deadline per request, one rendering per
 * METRICS_CACHE_MS shared by every client, at most METRICS_MAX_CONNS
 * connections (beyond that the listener pauses and new clients wait in the
 * kernel's backlog).
 */
#include "metrics_http.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <event2/util.h>

#include "backlog.h"
#include "fdlimit.h"
#include "log.h"
#include "server.h"
#include "stats.h"

#define METRICS_MAX_HEADERS 8192
#define METRICS_MAX_CONNS 32
#define METRICS_CACHE_MS 1000	/* a rendering serves every client for this long */

enum route_id { ROUTE_STATS, ROUTE_METRICS, NROUTES };

struct metrics_conn {
	struct metrics_http *m;
	struct bufferevent *bev;		/* a reference we hold until adopted */
	struct evhttp_connection *evcon;	/* NULL until adopted */
	struct event *deadline;
	struct evhttp_request *waiting;		/* for the stats being gathered */
	int waiting_route;
	TAILQ_ENTRY(metrics_conn) link;
};

/* A gather in flight: outlives m if the server stops meanwhile. */
struct metrics_gather {
	struct metrics_http *m;			/* NULL once m is gone */
};

struct metrics_http {
	struct server *srv;
	struct evhttp *http;
	struct evconnlistener *listener;	/* NULL once stopping */
	struct event *adopt;
	struct evbuffer *cache[NROUTES];	/* each route's last rendering */
	struct event *expire;			/* drops them */
	TAILQ_HEAD(, metrics_conn) conns;
	unsigned nconns;
	struct metrics_gather *gathering;	/* the stats are being made, on every loop */
	char address[NI_MAXHOST + NI_MAXSERV + 4];
};

/* ---- the address ---- */

/* HOST:PORT into a sockaddr: libevent parses HOST, we the port (it refuses 0). */
static int
parse_listen(const char *spec, struct sockaddr_storage *ss, int *len)
{
	const char *colon = strrchr(spec, ':');
	char host[128], *end;
	unsigned long port;

	if (!colon || !colon[1] || (size_t)(colon - spec) >= sizeof(host))
		return -1;
	port = strtoul(colon + 1, &end, 10);
	if (*end || port > 65535 || strspn(colon + 1, "0123456789") != strlen(colon + 1))
		return -1;
	/* an IPv6 address takes brackets, or its last group reads as the port */
	if (memchr(spec, ':', (size_t)(colon - spec)) && colon[-1] != ']')
		return -1;
	snprintf(host, sizeof(host), "%.*s", (int)(colon - spec), spec);
	if (!strcmp(host, "localhost"))
		snprintf(host, sizeof(host), "127.0.0.1");
	*len = (int)sizeof(*ss);
	if (evutil_parse_sockaddr_port(host, (struct sockaddr *)ss, len) < 0)
		return -1;
	if (ss->ss_family == AF_INET)
		((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
	else
		((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
	return 0;
}

static int
is_loopback(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
		return (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
	}
	const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
	return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
}

static int
check_listen(const char *spec, int allow_remote, struct sockaddr_storage *ss, int *len,
	     char *err, size_t errlen)
{
	if (parse_listen(spec, ss, len) < 0) {
		snprintf(err, errlen, "%s: want HOST:PORT, HOST an IP address "
			 "([ADDR] for IPv6) or localhost", spec);
		return -1;
	}
	if (!allow_remote && !is_loopback(ss)) {
		snprintf(err, errlen, "%s: not a loopback address (other hosts would "
			 "see every disk's statistics; --metrics-allow-remote allows it)", spec);
		return -1;
	}
	return 0;
}

int
metrics_http_check(const char *spec, int allow_remote, char *err, size_t errlen)
{
	struct sockaddr_storage ss;
	int len;

	return check_listen(spec, allow_remote, &ss, &len, err, errlen);
}

/* A listening socket; -errno on failure. */
static int
listen_on(const struct sockaddr_storage *ss, int len)
{
	int one = 1, fd, err;

	fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (ss->ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (evutil_make_listen_socket_reuseable(fd) < 0 ||
	    bind(fd, (const struct sockaddr *)ss, (socklen_t)len) < 0 ||
	    listen(fd, listen_backlog()) < 0) {
		err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/* What we are bound to, port included, for the log and `version`. */
static void
format_address(int fd, char *out, size_t outlen)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	char host[NI_MAXHOST], port[NI_MAXSERV];

	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0 ||
	    getnameinfo((struct sockaddr *)&ss, len, host, sizeof(host), port, sizeof(port),
			NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(out, outlen, "?");
		return;
	}
	snprintf(out, outlen, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
}

/* ---- connections ---- */

/*
 * libevent 2.1's evhttp has no connection limit and no callback when a
 * connection opens: it only asks us for each one's bufferevent. We keep a
 * reference to that until the loop turns (on_adopt), then find the
 * connection through the callbacks evhttp set on it and watch it close.
 */

static void
conn_forget(struct metrics_conn *c)
{
	struct metrics_http *m = c->m;

	TAILQ_REMOVE(&m->conns, c, link);
	if (m->nconns-- == METRICS_MAX_CONNS && m->listener)
		evconnlistener_enable(m->listener);
	event_free(c->deadline);
	free(c);
}

static void
conn_arm(struct metrics_conn *c)
{
	struct timeval tv = { (time_t)c->m->srv->metrics_timeout_secs, 0 };
	evtimer_add(c->deadline, &tv);
}

static void
on_conn_close(struct evhttp_connection *evcon, void *arg)
{
	(void)evcon;
	conn_forget(arg);
}

/* The client took too long over one request (a slowloris, a stalled reader). */
static void
on_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct metrics_conn *c = arg;
	struct evhttp_connection *evcon = c->evcon;
	(void)fd;
	(void)what;

	log_debug("metrics: dropping a client that took over %d s for one request",
		  c->m->srv->metrics_timeout_secs);
	evhttp_connection_set_closecb(evcon, NULL, NULL);
	conn_forget(c);
	evhttp_connection_free(evcon);
}

static void
conn_adopt(struct metrics_conn *c)
{
	struct evhttp_connection *evcon;
	void *cbarg = NULL;

	/* evhttp's callbacks carry its connection; bufferevent_free clears them */
	bufferevent_getcb(c->bev, NULL, NULL, NULL, &cbarg);
	evcon = cbarg;
	if (evcon && evhttp_connection_get_bufferevent(evcon) != c->bev)
		evcon = NULL;
	bufferevent_decref(c->bev);
	c->bev = NULL;
	if (!evcon) {
		conn_forget(c);		/* gone already */
		return;
	}
	c->evcon = evcon;
	evhttp_connection_set_closecb(evcon, on_conn_close, c);
	conn_arm(c);
}

static void
on_adopt(evutil_socket_t fd, short what, void *arg)
{
	struct metrics_http *m = arg;
	struct metrics_conn *c, *next;
	(void)fd;
	(void)what;

	for (c = TAILQ_FIRST(&m->conns); c; c = next) {
		next = TAILQ_NEXT(c, link);
		if (c->bev)
			conn_adopt(c);
	}
}

static struct bufferevent *
on_accept(struct event_base *base, void *arg)
{
	struct metrics_http *m = arg;
	struct metrics_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;	/* evhttp makes its own: served, not counted */
	c->m = m;
	c->bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
	c->deadline = evtimer_new(base, on_deadline, c);
	if (!c->bev || !c->deadline) {
		if (c->bev)
			bufferevent_free(c->bev);
		if (c->deadline)
			event_free(c->deadline);
		free(c);
		return NULL;
	}
	bufferevent_incref(c->bev);
	TAILQ_INSERT_TAIL(&m->conns, c, link);
	/* the listener stops accepting at once: its loop checks after each client */
	if (++m->nconns == METRICS_MAX_CONNS)
		evconnlistener_disable(m->listener);
	event_active(m->adopt, EV_TIMEOUT, 0);
	return c->bev;
}

static struct metrics_conn *
conn_of(struct metrics_http *m, struct evhttp_connection *evcon)
{
	struct metrics_conn *c;

	TAILQ_FOREACH(c, &m->conns, link)
		if (c->evcon == evcon)
			return c;
	return NULL;
}

/* The response is out: a kept-alive connection has a new deadline for the next. */
static void
on_response_sent(struct evhttp_request *req, void *arg)
{
	(void)req;
	conn_arm(arg);
}

/* ---- Prometheus text format ---- */

/* One scrape: the stats document and each vbd's labels, formatted once. */
struct scrape {
	struct evbuffer *out;
	json_t *vbds;
	char **labels;	/* minor="M",params="..." */
};

struct family {
	const char *name, *type, *help;
	const char *key;	/* in each op's stats, or the vbd's */
};

static const struct family op_families[] = {
	{ "tapdiskd_requests_total", "counter", "Requests completed.", "reqs" },
	{ "tapdiskd_bytes_total", "counter", "Bytes covered by requests that succeeded.", "bytes" },
	{ "tapdiskd_errors_total", "counter", "Requests that failed.", "errors" },
	{ "tapdiskd_inflight", "gauge", "Requests being served.", "inflight" },
};

static const struct family vbd_families[] = {
	{ "tapdiskd_reqs_outstanding", "gauge", "Requests in the image chain.",
	  "reqs_outstanding" },
	{ "tapdiskd_reqs_queued", "gauge", "Requests waiting for the vbd to unpause.",
	  "reqs_queued" },
	{ "tapdiskd_retries_total", "counter",
	  "Requests sent again after a transient error (EAGAIN, EBUSY, EINTR).", "retries" },
	{ "tapdiskd_timeouts_total", "counter",
	  "Requests failed with EIO for outlasting the vbd's timeout.", "timeouts" },
};

/* A label value as the format wants it: backslash, quote and newline escaped. */
static char *
label_escape(const char *s)
{
	char *out = malloc(2 * strlen(s) + 1), *p = out;

	if (!out)
		return NULL;
	for (; *s; s++) {
		if (*s == '\\' || *s == '"' || *s == '\n')
			*p++ = '\\';
		*p++ = *s == '\n' ? 'n' : *s;
	}
	*p = '\0';
	return out;
}

static char *
vbd_labels(json_t *vbd)
{
	const char *params = json_string_value(json_object_get(vbd, "name"));
	char *esc = label_escape(params ? params : ""), *labels;

	if (!esc)
		return NULL;
	if (asprintf(&labels, "minor=\"%" JSON_INTEGER_FORMAT "\",params=\"%s\"",
		     json_integer_value(json_object_get(vbd, "minor")), esc) < 0)
		labels = NULL;
	free(esc);
	return labels;
}

static void
put_header(struct evbuffer *out, const char *name, const char *type, const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{labels[,op="OP"]} value */
static void
put_sample(struct evbuffer *out, const char *name, const char *labels, const char *op,
	   json_t *value)
{
	evbuffer_add_printf(out, "%s{%s", name, labels);
	if (op)
		evbuffer_add_printf(out, ",op=\"%s\"", op);
	if (json_is_integer(value))
		evbuffer_add_printf(out, "} %" JSON_INTEGER_FORMAT "\n", json_integer_value(value));
	else
		evbuffer_add_printf(out, "} %.17g\n", json_number_value(value));
}

static void
op_family(struct scrape *s, const struct family *f)
{
	const char *op;
	json_t *st;

	put_header(s->out, f->name, f->type, f->help);
	for (size_t i = 0; i < json_array_size(s->vbds); i++)
		json_object_foreach(json_object_get(json_array_get(s->vbds, i), "ops"), op, st)
			put_sample(s->out, f->name, s->labels[i], op, json_object_get(st, f->key));
}

static void
vbd_family(struct scrape *s, const struct family *f)
{
	put_header(s->out, f->name, f->type, f->help);
	for (size_t i = 0; i < json_array_size(s->vbds); i++)
		put_sample(s->out, f->name, s->labels[i], NULL,
			   json_object_get(json_array_get(s->vbds, i), f->key));
}

static uint64_t
json_u64(json_t *obj, const char *key)
{
	json_int_t v = json_integer_value(json_object_get(obj, key));
	return v > 0 ? (uint64_t)v : 0;
}

/* Whole microseconds as seconds, exactly. */
static void
put_seconds(struct evbuffer *out, uint64_t us)
{
	evbuffer_add_printf(out, "%" PRIu64 ".%06" PRIu64, us / 1000000, us % 1000000);
}

/*
 * One op's latency histogram. Its log-linear buckets are merged into
 * powers of two (le = 1 us ... 2^27 us, all boundaries of theirs): exact,
 * and few enough lines per scrape. A bucket's le_us is the largest whole
 * microsecond it holds and latencies are truncated to whole microseconds,
 * so it counts times below le_us + 1.
 */
static void
latency_series(struct evbuffer *out, const char *labels, const char *op, json_t *lat)
{
	json_t *buckets = json_object_get(lat, "buckets");
	size_t i = 0, n = json_array_size(buckets);
	uint64_t below = 0;

	for (unsigned k = 0; k <= HIST_MAX_EXP + 1; k++) {
		uint64_t le = (uint64_t)1 << k;
		for (; i < n; i++) {
			json_t *b = json_array_get(buckets, i), *upper = json_object_get(b, "le_us");
			if (!json_is_integer(upper) || (uint64_t)json_integer_value(upper) >= le)
				break;
			below += json_u64(b, "count");
		}
		evbuffer_add_printf(out, "tapdiskd_latency_seconds_bucket{%s,op=\"%s\",le=\"",
				    labels, op);
		put_seconds(out, le);
		evbuffer_add_printf(out, "\"} %" PRIu64 "\n", below);
	}
	evbuffer_add_printf(out, "tapdiskd_latency_seconds_bucket{%s,op=\"%s\",le=\"+Inf\"} %"
			    PRIu64 "\n", labels, op, json_u64(lat, "count"));
	evbuffer_add_printf(out, "tapdiskd_latency_seconds_sum{%s,op=\"%s\"} ", labels, op);
	put_seconds(out, json_u64(lat, "sum"));
	evbuffer_add_printf(out, "\ntapdiskd_latency_seconds_count{%s,op=\"%s\"} %" PRIu64 "\n",
			    labels, op, json_u64(lat, "count"));
}

static void
latency_family(struct scrape *s)
{
	const char *op;
	json_t *st;

	put_header(s->out, "tapdiskd_latency_seconds", "histogram",
		   "Request latency, from submission to completion.");
	for (size_t i = 0; i < json_array_size(s->vbds); i++)
		json_object_foreach(json_object_get(json_array_get(s->vbds, i), "ops"), op, st)
			latency_series(s->out, s->labels[i], op, json_object_get(st, "latency_us"));
}

/* A qos key makes a metric name as it is; anything else is skipped. */
static int
qos_key_ok(const char *key)
{
	size_t n = strlen(key);
	return n && n < 64 && strspn(key, "abcdefghijklmnopqrstuvwxyz"
				     "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") == n;
}

static int
ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);
	return n >= k && !strcmp(s + n - k, suffix);
}

/* qos.KEY of every vbd that has it: a counter (named ..._total) or a gauge. */
static void
qos_family(struct scrape *s, const char *key)
{
	int counter = ends_with(key, "_total") || !strcmp(key, "throttled");
	char name[128], help[128];

	snprintf(name, sizeof(name), "tapdiskd_qos_%s%s", key,
		 counter && !ends_with(key, "_total") ? "_total" : "");
	snprintf(help, sizeof(help), "The vbd's qos.%s in its stats.", key);
	put_header(s->out, name, counter ? "counter" : "gauge", help);
	for (size_t i = 0; i < json_array_size(s->vbds); i++) {
		json_t *qos = json_object_get(json_array_get(s->vbds, i), "qos");
		json_t *v = json_object_get(qos, key);
		if (json_is_number(v))
			put_sample(s->out, name, s->labels[i], NULL, v);
	}
}

/* Whatever numbers the vbds' "qos" objects hold, in the order first seen. */
static int
qos_families(struct scrape *s)
{
	json_t *keys = json_object(), *v;
	const char *key;

	if (!keys)
		return -ENOMEM;
	for (size_t i = 0; i < json_array_size(s->vbds); i++)
		json_object_foreach(json_object_get(json_array_get(s->vbds, i), "qos"), key, v)
			if (json_is_number(v) && qos_key_ok(key))
				json_object_set(keys, key, json_true());
	json_object_foreach(keys, key, v)
		qos_family(s, key);
	json_decref(keys);
	return 0;
}

static int
scrape_labels(struct scrape *s)
{
	size_t n = json_array_size(s->vbds);

	s->labels = calloc(n + 1, sizeof(*s->labels));
	if (!s->labels)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++)
		if (!(s->labels[i] = vbd_labels(json_array_get(s->vbds, i))))
			return -ENOMEM;
	return 0;
}

int
metrics_prometheus(json_t *stats, struct evbuffer *out)
{
	struct scrape s = { out, json_object_get(stats, "vbds"), NULL };
	int rc = scrape_labels(&s);

	if (rc == 0) {
		for (size_t f = 0; f < sizeof(op_families) / sizeof(op_families[0]); f++)
			op_family(&s, &op_families[f]);
		latency_family(&s);
		for (size_t f = 0; f < sizeof(vbd_families) / sizeof(vbd_families[0]); f++)
			vbd_family(&s, &vbd_families[f]);
		rc = qos_families(&s);
	}
	for (size_t i = 0; s.labels && s.labels[i]; i++)
		free(s.labels[i]);
	free(s.labels);
	return rc;
}

/* ---- /stats ---- */

static int
dump_to_evbuffer(const char *data, size_t size, void *out)
{
	return evbuffer_add(out, data, size);
}

static int
render_stats(json_t *stats, struct evbuffer *out)
{
	if (json_dump_callback(stats, dump_to_evbuffer, out, JSON_COMPACT) < 0 ||
	    evbuffer_add(out, "\n", 1) < 0)
		return -ENOMEM;
	return 0;
}

/* ---- requests ---- */

struct route {
	const char *path;
	const char *content_type;
	int (*render)(json_t *stats, struct evbuffer *out);	/* {"vbds": [...]} */
};

static const struct route routes[NROUTES] = {
	[ROUTE_STATS] = { "/stats", "application/json", render_stats },
	[ROUTE_METRICS] = { "/metrics", "text/plain; version=0.0.4; charset=utf-8",
			    metrics_prometheus },
};

static int
route_of(const char *path)
{
	for (int i = 0; path && i < NROUTES; i++)
		if (!strcmp(path, routes[i].path))
			return i;
	return -1;
}

static void
drop_cache(struct metrics_http *m)
{
	for (int i = 0; i < NROUTES; i++) {
		if (m->cache[i])
			evbuffer_free(m->cache[i]);	/* responses still sending hold a reference */
		m->cache[i] = NULL;
	}
}

static void
on_cache_expired(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	drop_cache(arg);
}

/*
 * Each route's document from stats, kept for METRICS_CACHE_MS: clients
 * asking in a loop cost the loops nothing more, and share one copy.
 */
static void
render_all(struct metrics_http *m, json_t *stats)
{
	struct timeval tv = { METRICS_CACHE_MS / 1000, METRICS_CACHE_MS % 1000 * 1000 };

	for (int r = 0; stats && r < NROUTES; r++) {
		struct evbuffer *body = evbuffer_new();
		if (!body || routes[r].render(stats, body) < 0) {
			if (body)
				evbuffer_free(body);
			continue;
		}
		if (m->cache[r])
			evbuffer_free(m->cache[r]);
		m->cache[r] = body;
	}
	if (!evtimer_pending(m->expire, NULL))
		evtimer_add(m->expire, &tv);
}

static void send_status(struct evhttp_request *req, int code, const char *reason);

static void
send_body(struct metrics_http *m, struct evhttp_request *req, int r)
{
	struct evbuffer *body = m->cache[r];

	if (!body || evbuffer_add_buffer_reference(evhttp_request_get_output_buffer(req), body) < 0) {
		send_status(req, HTTP_INTERNAL, "Internal Server Error");
		return;
	}
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
			  routes[r].content_type);
	evhttp_send_reply(req, HTTP_OK, "OK", NULL);
}

/* Every vbd's stats made on its own loop: the waiting clients get them. */
static void
stats_gathered(json_t *stats, void *arg)
{
	struct metrics_gather *g = arg;
	struct metrics_http *m = g->m;
	struct metrics_conn *c;

	free(g);
	if (!m) {
		json_decref(stats);
		return;
	}
	m->gathering = NULL;
	render_all(m, stats);
	json_decref(stats);
	TAILQ_FOREACH(c, &m->conns, link) {
		struct evhttp_request *req = c->waiting;
		if (req) {
			c->waiting = NULL;
			send_body(m, req, c->waiting_route);
		}
	}
}

/* 0, or -ENOMEM: the stats are on their way (or were). */
static int
stats_gather(struct metrics_http *m)
{
	struct metrics_gather *g;

	if (m->gathering)
		return 0;
	if (!(g = calloc(1, sizeof(*g))))
		return -ENOMEM;
	g->m = m;
	if (server_gather(m->srv, server_stats_doc, NULL, stats_gathered, g) < 0) {
		free(g);
		return -ENOMEM;
	}
	m->gathering = g;
	return 0;
}

/* A status with a one-line body; evhttp_send_error would drop our headers (Allow). */
static void
send_status(struct evhttp_request *req, int code, const char *reason)
{
	struct evbuffer *body = evbuffer_new();

	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
			  "text/plain; charset=utf-8");
	if (body)
		evbuffer_add_printf(body, "%d %s\n", code, reason);
	evhttp_send_reply(req, code, reason, body);
	if (body)
		evbuffer_free(body);
}

static void
on_request(struct evhttp_request *req, void *arg)
{
	struct metrics_http *m = arg;
	struct metrics_conn *c = conn_of(m, evhttp_request_get_connection(req));
	struct evkeyvalq *headers = evhttp_request_get_output_headers(req);
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
	int r = route_of(evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req)));
	if (c)
		evhttp_request_set_on_complete_cb(req, on_response_sent, c);
	if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
		evhttp_add_header(headers, "Allow", "GET, HEAD");
		send_status(req, HTTP_BADMETHOD, "Method Not Allowed");
		return;
	}
	if (r < 0) {
		send_status(req, HTTP_NOTFOUND, "Not Found");
		return;
	}
	if (m->cache[r]) {
		send_body(m, req, r);
		return;
	}
	/* only a connection we watch can wait: its close forgets the request */
	if (!c || stats_gather(m) < 0) {
		send_status(req, HTTP_SERVUNAVAIL, "Service Unavailable");
		return;
	}
	c->waiting = req;
	c->waiting_route = r;
}

/* ---- lifetime ---- */

/* Out of descriptors: the waiting client is let go (fdlimit.h). */
static void
on_accept_error(struct evconnlistener *lev, void *arg)
{
	(void)arg;
	(void)fdlimit_shed(evconnlistener_get_fd(lev), EVUTIL_SOCKET_ERROR(), NULL);
}

static int
http_setup(struct metrics_http *m, int fd)
{
	struct evhttp_bound_socket *bound;

	evhttp_set_timeout(m->http, (int)m->srv->metrics_timeout_secs);
	evhttp_set_max_headers_size(m->http, METRICS_MAX_HEADERS);
	evhttp_set_max_body_size(m->http, 0);
	/* every method reaches on_request, which answers 405 with Allow */
	evhttp_set_allowed_methods(m->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
				   EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
				   EVHTTP_REQ_TRACE | EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
	evhttp_set_gencb(m->http, on_request, m);
	evhttp_set_bevcb(m->http, on_accept, m);
	bound = evhttp_accept_socket_with_handle(m->http, fd);
	if (!bound)
		return -ENOMEM;
	m->listener = evhttp_bound_socket_get_listener(bound);
	evconnlistener_set_error_cb(m->listener, on_accept_error);
	return 0;
}

struct metrics_http *
metrics_http_new(struct server *srv, const char *spec, int allow_remote, char *err,
		 size_t errlen)
{
	struct metrics_http *m;
	struct sockaddr_storage ss;
	int len, fd;

	if (check_listen(spec, allow_remote, &ss, &len, err, errlen) < 0)
		return NULL;
	fd = listen_on(&ss, len);
	if (fd < 0) {
		snprintf(err, errlen, "%s: %s", spec, strerror(-fd));
		return NULL;
	}
	m = calloc(1, sizeof(*m));
	if (m) {
		m->srv = srv;
		TAILQ_INIT(&m->conns);
		format_address(fd, m->address, sizeof(m->address));
		m->http = evhttp_new(srv->base);
		m->adopt = event_new(srv->base, -1, 0, on_adopt, m);
		m->expire = evtimer_new(srv->base, on_cache_expired, m);
	}
	if (!m || !m->http || !m->adopt || !m->expire || http_setup(m, fd) < 0) {
		snprintf(err, errlen, "%s: out of memory", spec);
		if (!m || !m->listener)
			close(fd);
		metrics_http_free(m);
		return NULL;
	}
	log_info("metrics: listening on %s", m->address);
	return m;
}

const char *
metrics_http_address(const struct metrics_http *m)
{
	return m ? m->address : NULL;
}

void
metrics_http_free(struct metrics_http *m)
{
	struct metrics_conn *c;

	if (!m)
		return;
	m->listener = NULL;	/* evhttp_free frees it before the connections */
	if (m->http)
		evhttp_free(m->http);	/* each adopted connection's closecb forgets it */
	while ((c = TAILQ_FIRST(&m->conns))) {
		if (c->bev)
			bufferevent_decref(c->bev);
		conn_forget(c);
	}
	if (m->adopt)
		event_free(m->adopt);
	if (m->gathering)
		m->gathering->m = NULL;	/* its reply frees it */
	drop_cache(m);
	if (m->expire)
		event_free(m->expire);
	free(m);
}
