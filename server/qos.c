/*
 * QoS scheduling: a vbd's throttled requests, the turns its frontends take,
 * the groups that share limits by weight, and the timers that wake them.
 *
 * A vbd without QoS state never comes here. With it, a request goes at once
 * when nothing of its vbd (or group) is waiting and the buckets admit it;
 * otherwise it joins its frontend's queue ("flow"). Flows are served by
 * start-time fair queueing, so a client with 32 requests waiting and one
 * with 1 get the same share. A group's backlogged members are served by
 * deficit round robin: each turn adds weight x quantum to a member's credit,
 * and it sends requests while its credit covers their cost.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "log.h"
#include "loop.h"
#include "qos.h"
#include "qos_limits.h"
#include "server.h"
#include "vbd.h"

struct qos_flow {
	const void *key;		/* vr->flow */
	TAILQ_HEAD(, vbd_request) reqs;
	double start, finish;		/* fair queueing tags */
	TAILQ_ENTRY(qos_flow) link;
};

struct qos_vbd {
	struct vbd *vbd;
	struct qos_config cfg;
	struct qos_buckets bk;
	TAILQ_HEAD(, qos_flow) flows;	/* backlogged, or idle with a finish tag ahead */
	double vtime;
	unsigned depth;
	struct event *timer;

	struct qos_group *group;
	unsigned weight;
	double deficit;
	int backlogged;			/* on group->active */
	TAILQ_ENTRY(qos_vbd) active_link;
	LIST_ENTRY(qos_vbd) member_link;

	uint64_t throttled, queued_ns_total, queued_ns_max;
};

struct qos_group {
	char *name;
	struct server *srv;
	struct loop *loop;		/* where it and all its members live */
	struct qos_config cfg;
	struct qos_buckets bk;
	LIST_HEAD(, qos_vbd) members;
	TAILQ_HEAD(, qos_vbd) active;
	struct event *timer;
	LIST_ENTRY(qos_group) link;
	uint64_t throttled;
};

/* A group member's share per turn, in cost units, before its weight. */
#define SHARE_BYTES_UNIT 65536.0

static const char *const vbd_extra_keys[] = { "group", "weight", NULL };

static void vbd_pump(struct qos_vbd *q);
static void group_pump(struct qos_group *g);

/* ---- costs ---- */

static void
request_cost(const struct vbd_request *vr, struct qos_cost *cost)
{
	const struct td_request *td = &vr->td;

	switch (td->op) {
	case TD_OP_READ:
	case TD_OP_CACHE:
		cost->is_write = 0;
		cost->bytes = td->length;
		break;
	case TD_OP_WRITE:
		cost->is_write = 1;
		cost->bytes = td->length;
		break;
	case TD_OP_BLOCK_STATUS:
		cost->is_write = 0;
		cost->bytes = 0;
		break;
	default:	/* flush, discard, write-zeroes: work for the disk, no data */
		cost->is_write = 1;
		cost->bytes = 0;
		break;
	}
}

/* ---- timers ---- */

static void
timer_arm(struct event *ev, uint64_t ns)
{
	struct timeval tv = { (time_t)(ns / 1000000000u), (suseconds_t)(ns % 1000000000u / 1000) };
	if (!tv.tv_sec && !tv.tv_usec)
		tv.tv_usec = 1;
	evtimer_add(ev, &tv);
}

static int
vbd_runnable(const struct vbd *vbd)
{
	return !(vbd->state & (VBD_PAUSE_REQUESTED | VBD_PAUSED | VBD_OPENING |
			       VBD_SHUTDOWN_REQUESTED | VBD_CLOSED | VBD_DEAD));
}

/* ---- flows: start-time fair queueing between a vbd's frontends ---- */

/*
 * Each flow's head request carries a start tag: the later of the vbd's
 * virtual time and the flow's last finish tag; the smallest tag goes next.
 * A client that keeps one request waiting thus alternates with one that
 * keeps 32 waiting, instead of queueing behind all of them. An emptied flow
 * is kept until virtual time passes its finish tag, so coming back does not
 * let it jump the line.
 */
static struct qos_flow *
flow_next(struct qos_vbd *q)
{
	struct qos_flow *f, *tmp, *best = NULL;

	for (f = TAILQ_FIRST(&q->flows); f; f = tmp) {
		tmp = TAILQ_NEXT(f, link);
		if (TAILQ_EMPTY(&f->reqs)) {
			if (f->finish <= q->vtime) {
				TAILQ_REMOVE(&q->flows, f, link);
				free(f);
			}
			continue;
		}
		if (!best || f->start < best->start)
			best = f;
	}
	return best;
}

static struct vbd_request *
vbd_head(struct qos_vbd *q)
{
	struct qos_flow *f = q->depth ? flow_next(q) : NULL;
	return f ? TAILQ_FIRST(&f->reqs) : NULL;
}

/* What a request costs in its flow's virtual time, and against a group member's credit. */
static double
share_cost(const struct qos_config *c, const struct qos_cost *cost)
{
	int iops = c->lim[QOS_IOPS_TOTAL].rate || c->lim[QOS_IOPS_READ].rate ||
		   c->lim[QOS_IOPS_WRITE].rate;

	if (iops || !qos_config_active(c))
		return qos_ops(c, cost->bytes);
	return (cost->bytes ? (double)cost->bytes : 512.0) / SHARE_BYTES_UNIT;
}

static int
flow_enqueue(struct qos_vbd *q, struct vbd_request *vr)
{
	struct qos_flow *f;

	TAILQ_FOREACH(f, &q->flows, link)
		if (f->key == vr->flow)
			break;
	if (!f) {
		f = calloc(1, sizeof(*f));
		if (!f)
			return -ENOMEM;
		f->key = vr->flow;
		TAILQ_INIT(&f->reqs);
		TAILQ_INSERT_TAIL(&q->flows, f, link);
	}
	if (TAILQ_EMPTY(&f->reqs))
		f->start = f->finish > q->vtime ? f->finish : q->vtime;
	TAILQ_INSERT_TAIL(&f->reqs, vr, link);
	q->depth++;
	return 0;
}

/* Takes the request vbd_head returned. */
static struct vbd_request *
flow_dequeue(struct qos_vbd *q)
{
	struct qos_flow *f = flow_next(q);
	struct vbd_request *vr = TAILQ_FIRST(&f->reqs);
	struct qos_cost cost;

	TAILQ_REMOVE(&f->reqs, vr, link);
	request_cost(vr, &cost);
	q->vtime = f->start;
	f->finish = f->start + share_cost(&q->cfg, &cost);
	f->start = f->finish;
	q->depth--;
	return vr;
}

static void
flows_free(struct qos_vbd *q)
{
	while (!TAILQ_EMPTY(&q->flows)) {
		struct qos_flow *f = TAILQ_FIRST(&q->flows);
		TAILQ_REMOVE(&q->flows, f, link);
		free(f);
	}
}

/* ---- sending ---- */

static void
send_request(struct qos_vbd *q, struct vbd_request *vr, const struct qos_cost *cost,
	     uint64_t queued_since, uint64_t now)
{
	qos_buckets_charge(&q->bk, &q->cfg, cost);
	if (q->group)
		qos_buckets_charge(&q->group->bk, &q->group->cfg, cost);
	if (queued_since) {
		uint64_t waited = now > queued_since ? now - queued_since : 0;
		q->queued_ns_total += waited;
		if (waited > q->queued_ns_max)
			q->queued_ns_max = waited;
	}
	vbd_start(q->vbd, vr);
}

static void
vbd_pump(struct qos_vbd *q)
{
	struct vbd_request *vr;
	struct qos_cost cost;

	if (!vbd_runnable(q->vbd))
		return;
	while ((vr = vbd_head(q))) {
		uint64_t now = now_ns();
		request_cost(vr, &cost);
		uint64_t wait = qos_buckets_wait(&q->bk, &q->cfg, &cost, now);
		if (wait) {
			timer_arm(q->timer, wait);
			return;
		}
		flow_dequeue(q);
		send_request(q, vr, &cost, vr->start_ns, now);
	}
}

static void
group_backlog(struct qos_group *g, struct qos_vbd *q)
{
	if (!q->backlogged) {
		q->backlogged = 1;
		q->deficit = 0;
		TAILQ_INSERT_TAIL(&g->active, q, active_link);
	}
}

static void
group_idle(struct qos_group *g, struct qos_vbd *q)
{
	if (q->backlogged) {
		q->backlogged = 0;
		q->deficit = 0;
		TAILQ_REMOVE(&g->active, q, active_link);
	}
}

static void
group_pump(struct qos_group *g)
{
	struct qos_vbd *q;
	struct qos_cost cost;

	while ((q = TAILQ_FIRST(&g->active))) {
		struct vbd_request *vr = vbd_head(q);
		uint64_t now = now_ns(), wait;

		if (!vr || !vbd_runnable(q->vbd)) {
			group_idle(g, q);
			continue;
		}
		request_cost(vr, &cost);
		wait = qos_buckets_wait(&q->bk, &q->cfg, &cost, now);
		if (wait) {	/* its own limit: out of the rotation until its timer */
			group_idle(g, q);
			timer_arm(q->timer, wait);
			continue;
		}
		double c = share_cost(&g->cfg, &cost);
		if (q->deficit < c) {
			q->deficit += (double)q->weight;
			TAILQ_REMOVE(&g->active, q, active_link);
			TAILQ_INSERT_TAIL(&g->active, q, active_link);
			continue;
		}
		wait = qos_buckets_wait(&g->bk, &g->cfg, &cost, now);
		if (wait) {
			timer_arm(g->timer, wait);
			return;
		}
		q->deficit -= c;
		flow_dequeue(q);
		send_request(q, vr, &cost, vr->start_ns, now);
	}
}

static void
pump(struct qos_vbd *q)
{
	if (q->group) {
		if (vbd_head(q) && vbd_runnable(q->vbd))
			group_backlog(q->group, q);
		group_pump(q->group);
	} else {
		vbd_pump(q);
	}
}

static void
vbd_timer_fired(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	pump(arg);
}

static void
group_timer_fired(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	group_pump(arg);
}

void
qos_submit(struct vbd *vbd, struct vbd_request *vr)
{
	struct qos_vbd *q = vbd->qos;
	struct qos_group *g = q->group;
	struct qos_cost cost;
	uint64_t now = now_ns();

	/* nothing ahead of it and room in the buckets: it goes now */
	if (!vbd_head(q) && (!g || TAILQ_EMPTY(&g->active))) {
		request_cost(vr, &cost);
		if (!qos_buckets_wait(&q->bk, &q->cfg, &cost, now) &&
		    (!g || !qos_buckets_wait(&g->bk, &g->cfg, &cost, now))) {
			send_request(q, vr, &cost, 0, now);
			return;
		}
	}
	if (flow_enqueue(q, vr) < 0) {
		vbd_fail_request(vbd, vr, ENOMEM);
		return;
	}
	vr->start_ns = now;	/* until it is sent: when it started waiting */
	q->throttled++;
	if (g)
		g->throttled++;
	pump(q);
}

/* ---- groups ---- */

static int
group_name_ok(const char *name)
{
	size_t n = strlen(name);
	if (!n || n > QOS_MAX_GROUP_NAME)
		return 0;
	return strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
			    "0123456789_.-") == n;
}

/* srv->lock held: the list is every loop's; a group itself is its loop's. */
static struct qos_group *
group_find_locked(struct server *srv, const char *name)
{
	struct qos_group *g;
	LIST_FOREACH(g, &srv->qos_groups, link)
		if (!strcmp(g->name, name))
			return g;
	return NULL;
}

struct loop *
qos_group_loop(struct server *srv, const char *name)
{
	pthread_mutex_lock(&srv->lock);
	struct qos_group *g = group_find_locked(srv, name);
	struct loop *l = g ? g->loop : NULL;
	pthread_mutex_unlock(&srv->lock);
	return l;
}

/* The group if it lives on this loop; NULL with *elsewhere set if on another. */
static struct qos_group *
group_find(struct server *srv, const char *name, struct loop **elsewhere)
{
	pthread_mutex_lock(&srv->lock);
	struct qos_group *g = group_find_locked(srv, name);
	pthread_mutex_unlock(&srv->lock);
	*elsewhere = g && g->loop != loop_current() ? g->loop : NULL;
	return *elsewhere ? NULL : g;
}

/* The group on this loop, made if there is none; NULL: out of memory or elsewhere. */
static struct qos_group *
group_get(struct server *srv, const char *name, struct loop **elsewhere)
{
	struct qos_group *g = group_find(srv, name, elsewhere);
	if (g || *elsewhere)
		return g;
	g = calloc(1, sizeof(*g));
	if (!g)
		return NULL;
	g->name = strdup(name);
	g->loop = loop_current();
	g->timer = evtimer_new(g->loop->base, group_timer_fired, g);
	if (!g->name || !g->timer) {
		free(g->name);
		if (g->timer)
			event_free(g->timer);
		free(g);
		return NULL;
	}
	g->srv = srv;
	LIST_INIT(&g->members);
	TAILQ_INIT(&g->active);
	qos_buckets_configure(&g->bk, &g->cfg, now_ns());
	pthread_mutex_lock(&srv->lock);
	struct qos_group *raced = group_find_locked(srv, name);
	if (!raced)
		LIST_INSERT_HEAD(&srv->qos_groups, g, link);
	pthread_mutex_unlock(&srv->lock);
	if (raced) {	/* made on another loop meanwhile */
		event_free(g->timer);
		free(g->name);
		free(g);
		*elsewhere = raced->loop;
		return NULL;
	}
	return g;
}

static void
group_free(struct qos_group *g)
{
	pthread_mutex_lock(&g->srv->lock);
	LIST_REMOVE(g, link);
	pthread_mutex_unlock(&g->srv->lock);
	event_free(g->timer);
	free(g->name);
	free(g);
}

/* A group with no members and no limits is forgotten. */
static void
group_maybe_free(struct qos_group *g)
{
	if (LIST_EMPTY(&g->members) && !qos_config_active(&g->cfg))
		group_free(g);
}

static void
group_leave(struct qos_vbd *q)
{
	struct qos_group *g = q->group;

	if (!g)
		return;
	group_idle(g, q);
	LIST_REMOVE(q, member_link);
	q->group = NULL;
	group_pump(g);		/* the others may have waited behind it */
	group_maybe_free(g);
}

static void
group_join(struct qos_vbd *q, struct qos_group *g)
{
	q->group = g;
	LIST_INSERT_HEAD(&g->members, q, member_link);
}

int
qos_group_set(struct server *srv, const char *name, json_t *obj, char *err, size_t errlen)
{
	struct qos_config cfg;
	struct qos_group *g;
	int rc;

	if (!group_name_ok(name)) {
		snprintf(err, errlen, "group: a name of 1 to %d letters, digits, '_', '.', '-'",
			 QOS_MAX_GROUP_NAME);
		return -EINVAL;
	}
	struct loop *elsewhere;
	g = group_find(srv, name, &elsewhere);
	if (elsewhere) {
		snprintf(err, errlen, "qos group %s moved to loop %u meanwhile; try again", name,
			 elsewhere->index);
		return -EAGAIN;
	}
	memset(&cfg, 0, sizeof(cfg));
	if (g)
		cfg = g->cfg;
	rc = qos_config_update(&cfg, obj, NULL, err, errlen);
	if (rc < 0)
		return rc;
	if (!g && !qos_config_active(&cfg))
		return 0;	/* nothing to remember */
	if (!g && !(g = group_get(srv, name, &elsewhere))) {
		if (elsewhere)
			snprintf(err, errlen, "qos group %s was made on loop %u meanwhile; try "
				 "again", name, elsewhere->index);
		else
			snprintf(err, errlen, "out of memory");
		return elsewhere ? -EAGAIN : -ENOMEM;
	}
	g->cfg = cfg;
	qos_buckets_configure(&g->bk, &g->cfg, now_ns());
	log_info("qos group %s: limits set", name);
	group_pump(g);
	group_maybe_free(g);
	return 0;
}

json_t *
qos_group_get(struct server *srv, const char *name)
{
	struct loop *elsewhere;
	struct qos_group *g = group_find(srv, name, &elsewhere);
	const struct qos_vbd *q;

	if (!g)
		return NULL;
	json_t *members = json_array();
	LIST_FOREACH(q, &g->members, member_link)
		json_array_append_new(members, json_pack("{s:i, s:i, s:i}",
				"minor", q->vbd->minor, "weight", (int)q->weight,
				"queue_depth", (int)q->depth));
	return json_pack("{s:s, s:o, s:o, s:I}", "group", g->name,
			 "limits", qos_config_json(&g->cfg), "members", members,
			 "throttled", (json_int_t)g->throttled);
}

void
qos_groups_free(struct server *srv)
{
	while (!LIST_EMPTY(&srv->qos_groups))
		group_free(LIST_FIRST(&srv->qos_groups));
}

/* ---- a vbd's settings ---- */

/* group and weight from obj: *name NULL if absent, "" to leave. */
static int
parse_membership(json_t *obj, const char **name, long *weight, char *err, size_t errlen)
{
	json_t *jg = json_object_get(obj, "group"), *jw = json_object_get(obj, "weight");

	*name = NULL;
	*weight = 0;
	if (jg) {
		if (!json_is_string(jg) ||
		    (*json_string_value(jg) && !group_name_ok(json_string_value(jg)))) {
			snprintf(err, errlen, "group: a name of 1 to %d letters, digits, "
				 "'_', '.', '-' (\"\" to leave the group)", QOS_MAX_GROUP_NAME);
			return -EINVAL;
		}
		*name = json_string_value(jg);
	}
	if (jw) {
		if (!json_is_integer(jw) || json_integer_value(jw) < 1 ||
		    json_integer_value(jw) > QOS_MAX_WEIGHT) {
			snprintf(err, errlen, "weight: must be an integer from 1 to %d",
				 QOS_MAX_WEIGHT);
			return -EINVAL;
		}
		*weight = (long)json_integer_value(jw);
	}
	return 0;
}

int
qos_vbd_check(json_t *obj, char *err, size_t errlen)
{
	struct qos_config cfg;
	const char *name;
	long weight;

	memset(&cfg, 0, sizeof(cfg));
	int rc = qos_config_update(&cfg, obj, vbd_extra_keys, err, errlen);
	return rc < 0 ? rc : parse_membership(obj, &name, &weight, err, errlen);
}

static struct qos_vbd *
qos_vbd_new(struct vbd *vbd)
{
	struct qos_vbd *q = calloc(1, sizeof(*q));
	if (!q)
		return NULL;
	q->timer = evtimer_new(vbd->loop->base, vbd_timer_fired, q);
	if (!q->timer) {
		free(q);
		return NULL;
	}
	q->vbd = vbd;
	q->weight = 1;
	TAILQ_INIT(&q->flows);
	qos_buckets_configure(&q->bk, &q->cfg, now_ns());
	return q;
}

static void
qos_vbd_free(struct qos_vbd *q)
{
	group_leave(q);
	flows_free(q);
	event_free(q->timer);
	free(q);
}

int
qos_vbd_set(struct vbd *vbd, json_t *obj, char *err, size_t errlen)
{
	struct qos_vbd *q = vbd->qos;
	struct qos_config cfg;
	const char *name;
	long weight;
	int rc;

	memset(&cfg, 0, sizeof(cfg));
	if (q)
		cfg = q->cfg;
	rc = qos_config_update(&cfg, obj, vbd_extra_keys, err, errlen);
	if (rc < 0 || (rc = parse_membership(obj, &name, &weight, err, errlen)) < 0)
		return rc;
	if (!q && !(q = qos_vbd_new(vbd))) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	struct loop *elsewhere = NULL;
	struct qos_group *g = name && *name ? group_get(vbd->srv, name, &elsewhere) : NULL;
	if (name && *name && !g) {
		if (!vbd->qos)
			qos_vbd_free(q);
		if (!elsewhere) {
			snprintf(err, errlen, "out of memory");
			return -ENOMEM;
		}
		/* group scheduling runs on one thread: members cannot span loops */
		snprintf(err, errlen, "qos group %s lives on loop %u and minor %d on loop %u: "
			 "a group's members share one loop; open the vbd with the group "
			 "(open --qos) or on loop %u", name, elsewhere->index, vbd->minor,
			 vbd->loop->index, elsewhere->index);
		return -EXDEV;
	}
	vbd->qos = q;
	q->cfg = cfg;
	qos_buckets_configure(&q->bk, &q->cfg, now_ns());
	if (weight)
		q->weight = (unsigned)weight;
	if (name && q->group != g) {
		group_leave(q);
		if (g)
			group_join(q, g);
	}
	log_info("minor %d: qos limits set%s%s", vbd->minor, q->group ? ", group " : "",
		 q->group ? q->group->name : "");
	pump(q);
	return 0;
}

json_t *
qos_vbd_get(const struct vbd *vbd)
{
	const struct qos_vbd *q = vbd->qos;
	struct qos_config none;

	memset(&none, 0, sizeof(none));
	json_t *out = json_pack("{s:i, s:o, s:s?, s:i, s:o}", "minor", vbd->minor,
				"limits", qos_config_json(q ? &q->cfg : &none),
				"group", q && q->group ? q->group->name : NULL,
				"weight", q ? (int)q->weight : 1,
				"stats", qos_vbd_stats_json(vbd));
	return out;
}

json_t *
qos_vbd_stats_json(const struct vbd *vbd)
{
	const struct qos_vbd *q = vbd->qos;
	return json_pack("{s:I, s:I, s:I, s:i}",
			 "throttled", (json_int_t)(q ? q->throttled : 0),
			 "queued_us_total", (json_int_t)(q ? q->queued_ns_total / 1000 : 0),
			 "queued_us_max", (json_int_t)(q ? q->queued_ns_max / 1000 : 0),
			 "queue_depth", q ? (int)q->depth : 0);
}

void
qos_vbd_stats_reset(struct vbd *vbd)
{
	struct qos_vbd *q = vbd->qos;
	if (q)
		q->throttled = q->queued_ns_total = q->queued_ns_max = 0;
}

void
qos_vbd_requeue(struct vbd *vbd)
{
	struct qos_vbd *q = vbd->qos;
	TAILQ_HEAD(, vbd_request) taken = TAILQ_HEAD_INITIALIZER(taken);

	if (!q)
		return;
	if (q->group)
		group_idle(q->group, q);
	evtimer_del(q->timer);
	while (vbd_head(q)) {
		struct vbd_request *vr = flow_dequeue(q);
		TAILQ_INSERT_TAIL(&taken, vr, link);
	}
	/* they came before anything the pause queue holds */
	TAILQ_CONCAT(&taken, &vbd->queued, link);
	TAILQ_CONCAT(&vbd->queued, &taken, link);
}

void
qos_vbd_close(struct vbd *vbd)
{
	if (!vbd->qos)
		return;
	qos_vbd_requeue(vbd);
	qos_vbd_free(vbd->qos);
	vbd->qos = NULL;
}

void
qos_vbd_resume(struct vbd *vbd)
{
	if (vbd->qos)
		pump(vbd->qos);
}
