/*
 * blkif links: a device's rings on its vbd's loop, and the messages that
 * drive them from loop 0 and report back to it.
 */
#include "blkif_link.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "container_of.h"
#include "log.h"
#include "loop.h"
#include "server.h"
#include "vbd.h"

struct blkif_link {
	struct vbd_frontend fe;
	struct loop *home;		/* loop 0: notes go there */
	struct loop *loop;		/* the vbd's, once bound */
	blkif_note_fn note_fn;
	struct xport *port;
	void *dev;
	uint64_t gen;
	char *be_path;
	uint32_t domid, devid;
	_Atomic int state;		/* the device's XenbusState (loop 0 writes) */
	struct vbd *vbd;		/* NULL until bound, and once the vbd went */
	struct blkif_ring *rings[BLKIF_LINK_MAX_QUEUES];
	unsigned nr_rings;
	struct blkif_ring_stats past;	/* rings gone: counters stay monotonic */
	struct mailbox_msg free_msg;
};

/* A command for the link's loop. */
struct link_cmd {
	struct mailbox_msg msg;
	struct blkif_link *l;
	int minor;
	unsigned n;
	struct blkif_ring_cfg cfgs[BLKIF_LINK_MAX_QUEUES];
};

/* ---- notes to loop 0 ---- */

void
blkif_note_free(struct blkif_note *n)
{
	free(n);
}

static void
note_run(struct mailbox_msg *m)
{
	struct blkif_note *n = (struct blkif_note *)m;
	n->fn(n);
}

static void
link_props(const struct vbd *vbd, struct blkif_vbd_props *p)
{
	p->minor = vbd->minor;
	p->size = vbd->size;
	p->sector_size = vbd->sector_size;
	p->min_io = vbd->min_io;
	p->caps = vbd->caps;
	p->readonly = vbd->readonly;
}

static void
link_note(struct blkif_link *l, enum blkif_note_kind kind, const char *err)
{
	struct blkif_note *n = calloc(1, sizeof(*n));

	if (!n) {
		log_err("blkif %s: out of memory telling the xenstore side", l->be_path);
		return;
	}
	n->kind = kind;
	n->dev = l->dev;
	n->gen = l->gen;
	if (l->vbd)
		link_props(l->vbd, &n->props);
	if (err)
		snprintf(n->err, sizeof(n->err), "%s", err);
	n->fn = l->note_fn;
	n->msg.fn = note_run;
	loop_post(l->home, &n->msg);
}

/* ---- rings ---- */

static void
stats_add(struct blkif_ring_stats *sum, const struct blkif_ring_stats *s)
{
	sum->reqs_in += s->reqs_in;
	sum->reqs_out += s->reqs_out;
	sum->kicks_in += s->kicks_in;
	sum->kicks_out += s->kicks_out;
	sum->errors_msg += s->errors_msg;
	sum->errors_map += s->errors_map;
	sum->errors_vbd += s->errors_vbd;
	sum->pgrant_evictions += s->pgrant_evictions;
	sum->pgrant_overflow += s->pgrant_overflow;
}

static void
link_disconnect_rings(struct blkif_link *l)
{
	for (unsigned i = 0; i < l->nr_rings; i++) {
		struct blkif_ring_stats s;
		blkif_ring_get_stats(l->rings[i], &s);	/* the ring may be freed below */
		stats_add(&l->past, &s);
		blkif_ring_disconnect(l->rings[i]);
	}
	l->nr_rings = 0;
}

static void
link_ring_dead(void *arg)
{
	struct blkif_link *l = arg;
	/* a guest that breaks its ring loses its device: it must reconnect */
	link_disconnect_rings(l);
	link_note(l, BLKIF_RING_DEAD, NULL);
}

/* ---- the vbd's frontend ---- */

static void
link_unbind(struct blkif_link *l)
{
	link_disconnect_rings(l);
	if (l->vbd) {
		vbd_frontend_remove(&l->fe);
		l->vbd = NULL;
	}
}

static void
link_fe_shutdown(struct vbd_frontend *fe)
{
	struct blkif_link *l = container_of(fe, struct blkif_link, fe);
	/* the vbd is closing under the guest: loop 0 tells it the disk is going */
	link_unbind(l);
	link_note(l, BLKIF_VBD_GONE, NULL);
}

static json_t *
link_fe_stats(struct vbd_frontend *fe)
{
	struct blkif_link *l = container_of(fe, struct blkif_link, fe);
	struct blkif_ring_stats sum = l->past, s;
	json_t *rings = json_array();
	uint64_t pgrants = 0;		/* mapped now: only live rings have any */

	for (unsigned i = 0; i < l->nr_rings; i++) {
		blkif_ring_get_stats(l->rings[i], &s);
		stats_add(&sum, &s);
		pgrants += s.pgrants;
		json_array_append_new(rings, blkif_ring_stats_json(l->rings[i]));
	}
	/* tapdisk's keys (domid, devid, reqs, kicks, errors), then ours */
	return json_pack("{s:i, s:i, s:s, s:i, s:[I,I], s:[I,I], s:{s:I, s:I, s:I}, s:o, "
			 "s:I, s:I, s:I}",
			 "domid", (int)l->domid, "devid", (int)l->devid, "path", l->be_path,
			 "state", (int)l->state,
			 "reqs", (json_int_t)sum.reqs_in, (json_int_t)sum.reqs_out,
			 "kicks", (json_int_t)sum.kicks_in, (json_int_t)sum.kicks_out,
			 "errors", "msg", (json_int_t)sum.errors_msg, "map", (json_int_t)sum.errors_map,
			 "vbd", (json_int_t)sum.errors_vbd, "rings", rings,
			 "persistent_grants", (json_int_t)pgrants,
			 "persistent_evictions", (json_int_t)sum.pgrant_evictions,
			 "persistent_overflow", (json_int_t)sum.pgrant_overflow);
}

static void
link_fe_reset_stats(struct vbd_frontend *fe)
{
	struct blkif_link *l = container_of(fe, struct blkif_link, fe);

	memset(&l->past, 0, sizeof(l->past));
	for (unsigned i = 0; i < l->nr_rings; i++)
		blkif_ring_reset_stats(l->rings[i]);
}

static const struct vbd_frontend_ops link_fe_ops = {
	.kind = "blkif",
	.shutdown = link_fe_shutdown,
	.stats = link_fe_stats,
	.reset_stats = link_fe_reset_stats,
};

/* ---- commands, on the link's loop ---- */

static void
cmd_bind(struct mailbox_msg *m)
{
	struct link_cmd *c = (struct link_cmd *)m;
	struct blkif_link *l = c->l;
	struct vbd *vbd = server_vbd(l->loop->srv, c->minor);

	free(c);
	if (!vbd || vbd->loop != l->loop || !vbd->params ||
	    (vbd->state & (VBD_CLOSED | VBD_SHUTDOWN_REQUESTED | VBD_DEAD))) {
		link_note(l, BLKIF_BIND_FAILED, "no open vbd");
		return;
	}
	l->vbd = vbd;
	vbd_frontend_add(vbd, &l->fe, &link_fe_ops);
	link_note(l, BLKIF_BOUND, NULL);
}

static void
cmd_connect(struct mailbox_msg *m)
{
	struct link_cmd *c = (struct link_cmd *)m;
	struct blkif_link *l = c->l;
	char err[256] = "the vbd is gone";

	for (unsigned q = 0; l->vbd && q < c->n; q++) {
		l->rings[q] = blkif_ring_connect(l->port, l->vbd, &c->cfgs[q], link_ring_dead, l,
						 err, sizeof(err));
		if (!l->rings[q]) {
			link_disconnect_rings(l);
			break;
		}
		l->nr_rings = q + 1;
	}
	if (l->nr_rings == c->n && l->vbd)
		link_note(l, BLKIF_CONNECTED, NULL);
	else
		link_note(l, BLKIF_CONNECT_FAILED, err);
	free(c);
}

static void
cmd_disconnect(struct mailbox_msg *m)
{
	struct link_cmd *c = (struct link_cmd *)m;
	link_disconnect_rings(c->l);
	free(c);
}

static void
cmd_free(struct mailbox_msg *m)
{
	struct blkif_link *l = container_of(m, struct blkif_link, free_msg);

	link_unbind(l);
	free(l->be_path);
	free(l);
}

static int
link_post(struct blkif_link *l, void (*fn)(struct mailbox_msg *), int minor,
	  const struct blkif_ring_cfg *cfgs, unsigned n)
{
	struct link_cmd *c = calloc(1, sizeof(*c));

	if (!c)
		return -ENOMEM;
	c->msg.fn = fn;
	c->l = l;
	c->minor = minor;
	c->n = n;
	if (n)
		memcpy(c->cfgs, cfgs, n * sizeof(*cfgs));
	loop_post(l->loop, &c->msg);
	return 0;
}

/* ---- loop 0's side ---- */

struct blkif_link *
blkif_link_new(struct loop *home, blkif_note_fn fn, struct xport *port, void *dev,
	       uint64_t gen, const char *be_path, uint32_t domid, uint32_t devid)
{
	struct blkif_link *l = calloc(1, sizeof(*l));

	if (!l || !(l->be_path = strdup(be_path))) {
		free(l);
		return NULL;
	}
	l->home = home;
	l->note_fn = fn;
	l->port = port;
	l->dev = dev;
	l->gen = gen;
	l->domid = domid;
	l->devid = devid;
	l->loop = home;
	return l;
}

int
blkif_link_bind(struct blkif_link *l, struct loop *loop, int minor)
{
	l->loop = loop;		/* before any message: fixed from here on */
	return link_post(l, cmd_bind, minor, NULL, 0);
}

int
blkif_link_connect(struct blkif_link *l, const struct blkif_ring_cfg *cfgs, unsigned n)
{
	if (n > BLKIF_LINK_MAX_QUEUES)
		return -EINVAL;
	return link_post(l, cmd_connect, 0, cfgs, n);
}

int
blkif_link_disconnect(struct blkif_link *l)
{
	return link_post(l, cmd_disconnect, 0, NULL, 0);
}

void
blkif_link_free(struct blkif_link *l)
{
	l->free_msg.fn = cmd_free;
	loop_post(l->loop, &l->free_msg);
}

void
blkif_link_set_state(struct blkif_link *l, int state)
{
	l->state = state;
}
