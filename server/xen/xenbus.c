/*
 * The blkif backend's xenstore side. Watches backend/<type>/<domid>/<devid>
 * for each configured type (vbd3 as tapback does; vbd for Xen's
 * `script=block-tap` disks, claimed only when their script names
 * block-tap), writes the features and InitWait, binds a device to the vbd
 * whose NBD socket its physical-device-path names (the hotplug script
 * writes it), and follows the frontend's state: connect the rings when it
 * is Initialised, close when it closes, start over when it comes back.
 * feature-persistent is offered to every frontend and used when the
 * frontend's own feature-persistent says 1 at connect, as blkback does.
 *
 * xenstore calls are synchronous RPCs to the local xenstored, made on the
 * loop thread: control path only, never per request.
 */
#include "xenbus.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/event.h>
#include <xenstore.h>

#include "blkif_link.h"
#include "log.h"
#include "loop.h"
#include "pgrant.h"
#include "port.h"
#include "ring.h"
#include "server.h"
#include "vbd.h"

#define XB_MAX_QUEUES	BLKIF_LINK_MAX_QUEUES
#define XB_MAX_TYPES	4
#define RELEASE_TOKEN	"release"

enum xenbus_state {
	XS_UNKNOWN, XS_INITIALISING, XS_INITWAIT, XS_INITIALISED, XS_CONNECTED,
	XS_CLOSING, XS_CLOSED, XS_RECONFIGURING, XS_RECONFIGURED,
};

/*
 * A device, on loop 0. Its rings live on its vbd's loop, in its link
 * (blkif_link.h): binding, connecting and disconnecting are messages there,
 * and their outcome comes back as notes.
 */
struct xen_dev {
	struct xenbus *xb;
	char *be_path, *fe_path, *type;
	uint32_t fe_domid, devid;
	int state;			/* ours, as written */
	struct blkif_link *link;	/* NULL: not bound (or binding failed) */
	uint64_t gen;			/* of the link: notes for an older one are stale */
	int bound;			/* the link is registered with the vbd */
	int connecting, connected;
	int persistent;			/* the rings keep guest pages mapped */
	unsigned queues, order;		/* of the rings connecting or connected */
	int proto;
	struct blkif_vbd_props props;	/* the vbd's, as of the last note */
	char *unknown_pdp;		/* warned about once */
	LIST_ENTRY(xen_dev) link_entry;
};

struct xenbus {
	struct server *srv;
	struct xs_handle *xs;
	struct xport *port;
	uint32_t domid;
	uint64_t gens;			/* links made so far */
	char *roots[XB_MAX_TYPES];	/* /local/domain/<me>/backend/<type> */
	char *types[XB_MAX_TYPES];
	unsigned nr_types;
	struct event *ev;
	LIST_HEAD(, xen_dev) devs;
	unsigned max_pgrants;		/* per ring; 0: feature-persistent off */
};

static void dev_update(struct xen_dev *d);

/* The one xenbus of this process, for the notes that come back to loop 0. */
static struct xenbus *active;

/* ---- xenstore helpers ---- */

static char *
xread(struct xenbus *xb, const char *fmt, ...)
{
	char path[512];
	va_list ap;
	unsigned len;
	va_start(ap, fmt);
	vsnprintf(path, sizeof(path), fmt, ap);
	va_end(ap);
	return xs_read(xb->xs, XBT_NULL, path, &len);
}

static int
xread_uint(struct xenbus *xb, unsigned long *out, const char *fmt, ...)
{
	char path[512], *v, *end;
	va_list ap;
	unsigned len;
	va_start(ap, fmt);
	vsnprintf(path, sizeof(path), fmt, ap);
	va_end(ap);
	v = xs_read(xb->xs, XBT_NULL, path, &len);
	if (!v)
		return -1;
	errno = 0;
	*out = strtoul(v, &end, 10);
	int bad = errno || end == v || *end;
	free(v);
	return bad ? -1 : 0;
}

static void
xwrite(struct xenbus *xb, const char *dir, const char *key, const char *fmt, ...)
{
	char path[512], val[128];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(val, sizeof(val), fmt, ap);
	va_end(ap);
	snprintf(path, sizeof(path), "%s/%s", dir, key);
	if (!xs_write(xb->xs, XBT_NULL, path, val, (unsigned)strlen(val)))
		log_warn("xenstore: cannot write %s: %s", path, strerror(errno));
}

/*
 * Writes dir/key only while dir still exists, as Linux's xenbus_switch_state
 * does: a toolstack that removed the directory must not see it come back.
 * 1 if written, 0 if the directory is gone, -1 on error (logged).
 */
static int
xwrite_if_present(struct xenbus *xb, const char *dir, const char *key, const char *fmt, ...)
{
	char path[512], probe[512], val[128];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(val, sizeof(val), fmt, ap);
	va_end(ap);
	snprintf(path, sizeof(path), "%s/%s", dir, key);
	snprintf(probe, sizeof(probe), "%s/frontend", dir);
	for (int tries = 0; tries < 100; tries++) {
		unsigned len;
		xs_transaction_t t = xs_transaction_start(xb->xs);
		if (t == XBT_NULL)
			break;
		char *cur = xs_read(xb->xs, t, probe, &len);
		if (!cur) {
			xs_transaction_end(xb->xs, t, true);
			return 0;
		}
		free(cur);
		if (!xs_write(xb->xs, t, path, val, (unsigned)strlen(val))) {
			xs_transaction_end(xb->xs, t, true);
			break;
		}
		if (xs_transaction_end(xb->xs, t, false))
			return 1;
		if (errno != EAGAIN)
			break;
	}
	log_warn("xenstore: cannot write %s: %s", path, strerror(errno));
	return -1;
}

static void
dev_set_state(struct xen_dev *d, int state)
{
	if (d->state == state)
		return;
	d->state = state;
	if (d->link)
		blkif_link_set_state(d->link, state);
	if (xwrite_if_present(d->xb, d->be_path, "state", "%d", state) == 1)
		log_info("blkif %s: state %d", d->be_path, state);
}

/* ---- rings ---- */

static void
dev_disconnect(struct xen_dev *d)
{
	if ((d->connected || d->connecting) && d->link && blkif_link_disconnect(d->link) < 0)
		log_err("blkif %s: out of memory disconnecting its rings", d->be_path);
	d->connected = d->connecting = 0;
}

/* Reads ring-ref[N]/ring-page-order/event-channel under dir. */
static int
read_ring_cfg(struct xen_dev *d, const char *dir, unsigned order, struct blkif_ring_cfg *cfg,
	      char *err, size_t errlen)
{
	unsigned long v;

	cfg->nr_pages = 1u << order;
	for (unsigned i = 0; i < cfg->nr_pages; i++) {
		int rc = order ? xread_uint(d->xb, &v, "%s/ring-ref%u", dir, i)
			       : xread_uint(d->xb, &v, "%s/ring-ref", dir);
		if (rc < 0 || v > UINT32_MAX) {
			snprintf(err, errlen, "%.200s: no valid ring-ref%s", dir, order ? "N" : "");
			return -1;
		}
		cfg->refs[i] = (uint32_t)v;
	}
	if (xread_uint(d->xb, &v, "%s/event-channel", dir) < 0 || v > UINT32_MAX) {
		snprintf(err, errlen, "%.200s: no valid event-channel", dir);
		return -1;
	}
	cfg->evtchn = (uint32_t)v;
	return 0;
}

/* The frontend's feature-persistent (its directory, not a queue's), read at connect. */
static int
fe_wants_persistent(struct xen_dev *d)
{
	unsigned long v;
	return xread_uint(d->xb, &v, "%s/feature-persistent", d->fe_path) == 0 && v == 1;
}

/* Reads the frontend's rings from xenstore and has the link connect them. */
static int
dev_connect(struct xen_dev *d, char *err, size_t errlen)
{
	struct xenbus *xb = d->xb;
	struct blkif_ring_cfg cfgs[XB_MAX_QUEUES];
	unsigned long queues = 1, order = 0;
	char *proto = xread(xb, "%s/protocol", d->fe_path);
	int p = blkif_protocol(proto);

	free(proto);
	if (p < 0) {
		snprintf(err, errlen, "unknown protocol");
		return -1;
	}
	if (xread_uint(xb, &queues, "%s/multi-queue-num-queues", d->fe_path) < 0)
		queues = 1;
	if (queues < 1 || queues > XB_MAX_QUEUES) {
		snprintf(err, errlen, "%lu queues (at most %d)", queues, XB_MAX_QUEUES);
		return -1;
	}
	if (xread_uint(xb, &order, "%s/ring-page-order", d->fe_path) < 0)
		order = 0;
	if (order > BLKIF_MAX_RING_ORDER) {
		snprintf(err, errlen, "ring-page-order %lu (at most %d)", order, BLKIF_MAX_RING_ORDER);
		return -1;
	}
	int persistent = fe_wants_persistent(d);
	for (unsigned q = 0; q < queues; q++) {
		char dir[512];
		if (queues == 1)
			snprintf(dir, sizeof(dir), "%s", d->fe_path);
		else
			snprintf(dir, sizeof(dir), "%s/queue-%u", d->fe_path, q);
		memset(&cfgs[q], 0, sizeof(cfgs[q]));
		cfgs[q].max_pgrants = persistent ? xb->max_pgrants : 0;
		cfgs[q].domid = d->fe_domid;
		cfgs[q].proto = p;
		cfgs[q].index = (int)q;
		if (read_ring_cfg(d, dir, (unsigned)order, &cfgs[q], err, errlen) < 0)
			return -1;
	}
	d->persistent = cfgs[0].max_pgrants != 0;
	d->queues = (unsigned)queues;
	d->order = (unsigned)order;
	d->proto = p;
	if (blkif_link_connect(d->link, cfgs, (unsigned)queues) < 0) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	d->connecting = 1;
	return 0;
}

/* The rings are up on the vbd's loop: tell the guest what the disk is. */
static void
dev_connected(struct xen_dev *d)
{
	struct xenbus *xb = d->xb;
	const struct blkif_vbd_props *v = &d->props;
	int discard = !v->readonly && (v->caps & TD_CAP_DISCARD);

	d->connecting = 0;
	d->connected = 1;
	xwrite(xb, d->be_path, "feature-flush-cache", "1");
	xwrite(xb, d->be_path, "feature-barrier", "1");
	xwrite(xb, d->be_path, "feature-discard", "%d", discard);
	if (discard) {
		xwrite(xb, d->be_path, "discard-granularity", "%u", 4096u);
		xwrite(xb, d->be_path, "discard-alignment", "0");
		xwrite(xb, d->be_path, "discard-secure", "0");
	}
	xwrite(xb, d->be_path, "sectors", "%ju", (uintmax_t)(v->size / 512));
	xwrite(xb, d->be_path, "info", "%d", v->readonly ? 4 : 0);	/* VDISK_READONLY */
	/* the guest must not send what the chain cannot serve (4k-native disks) */
	unsigned lbs = v->sector_size > v->min_io ? v->sector_size : v->min_io;
	lbs = lbs < 512 ? 512 : lbs;
	xwrite(xb, d->be_path, "sector-size", "%u", lbs);
	xwrite(xb, d->be_path, "physical-sector-size", "%u", lbs > 4096 ? lbs : 4096u);
	dev_set_state(d, XS_CONNECTED);
	log_info("blkif %s: connected to minor %d (%u queue%s, %u page%s, protocol %s%s)",
		 d->be_path, v->minor, d->queues, d->queues > 1 ? "s" : "", 1u << d->order,
		 d->order ? "s" : "", d->proto == BLKIF_PROTO_X86_32 ? "x86_32" : "x86_64",
		 d->persistent ? ", persistent grants" : "");
}

/* ---- binding to a vbd ---- */

static void
dev_unbind(struct xen_dev *d)
{
	dev_disconnect(d);
	if (d->link) {
		blkif_link_free(d->link);
		d->link = NULL;
	}
	d->bound = 0;
}

/* The vbd behind the socket block-tap wrote: <state-dir>/nbd<pid>.<minor>. */
static int
minor_by_socket(struct server *srv, const char *path)
{
	char prefix[4200];
	int n = snprintf(prefix, sizeof(prefix), "%s/nbd%d.", srv->state_dir, (int)srv->pid);
	size_t digits;

	if (n < 0 || (size_t)n >= sizeof(prefix) || strncmp(path, prefix, (size_t)n))
		return -1;
	path += n;
	digits = strspn(path, "0123456789");
	if (!digits || digits > 4 || path[digits] || (path[0] == '0' && digits > 1))
		return -1;
	return atoi(path) < SERVER_MAX_MINORS ? atoi(path) : -1;
}

static void dev_note(struct blkif_note *n);

/* Starts binding d to the vbd behind pdp; 0 if it is on its way. */
static int
dev_bind(struct xen_dev *d, const char *pdp)
{
	struct xenbus *xb = d->xb;
	int minor = minor_by_socket(xb->srv, pdp);
	struct loop *l = minor < 0 ? NULL : server_vbd_loop(xb->srv, minor);

	if (!l)
		return -1;
	d->link = blkif_link_new(xb->srv->loops[0], dev_note, xb->port, d, ++xb->gens,
				 d->be_path, d->fe_domid, d->devid);
	if (!d->link)
		return -1;
	d->gen = xb->gens;
	blkif_link_set_state(d->link, d->state);
	if (blkif_link_bind(d->link, l, minor) < 0) {
		blkif_link_free(d->link);
		d->link = NULL;
		return -1;
	}
	return 0;
}

static struct xen_dev *
dev_of_note(const struct blkif_note *n)
{
	struct xen_dev *d;

	if (!active)
		return NULL;
	LIST_FOREACH(d, &active->devs, link_entry)
		if (d == n->dev && d->link && d->gen == n->gen)
			return d;
	return NULL;
}

/* What a link said, on loop 0. */
static void
dev_note(struct blkif_note *n)
{
	struct xen_dev *d = dev_of_note(n);

	if (d) {
		d->props = n->props;
		switch (n->kind) {
		case BLKIF_BOUND:
			d->bound = 1;
			log_info("blkif %s: bound to minor %d", d->be_path, n->props.minor);
			dev_update(d);	/* the frontend may be waiting already */
			break;
		case BLKIF_BIND_FAILED:
			dev_unbind(d);
			break;
		case BLKIF_CONNECTED:
			if (d->connecting)
				dev_connected(d);
			break;
		case BLKIF_CONNECT_FAILED:
			if (!d->connecting)
				break;
			d->connecting = 0;
			log_warn("blkif %s: cannot connect: %s", d->be_path, n->err);
			xwrite(d->xb, d->be_path, "error", "%s", n->err);
			dev_set_state(d, XS_CLOSING);
			break;
		case BLKIF_RING_DEAD:
			d->connected = d->connecting = 0;
			dev_set_state(d, XS_CLOSING);
			break;
		case BLKIF_VBD_GONE:
			/* the vbd is closing under the guest: tell it the disk is going */
			dev_unbind(d);
			if (d->state != XS_CLOSED) {
				dev_set_state(d, XS_CLOSING);
				dev_set_state(d, XS_CLOSED);
			}
			break;
		}
	}
	blkif_note_free(n);
}

/* ---- devices ---- */

static void
dev_free(struct xen_dev *d)
{
	dev_unbind(d);
	LIST_REMOVE(d, link_entry);
	char token[600];
	snprintf(token, sizeof(token), "fe:%s", d->be_path);
	if (d->fe_path) {
		char path[512];
		snprintf(path, sizeof(path), "%s/state", d->fe_path);
		xs_unwatch(d->xb->xs, path, token);
	}
	free(d->be_path);
	free(d->fe_path);
	free(d->type);
	free(d->unknown_pdp);
	free(d);
}

static void
dev_update(struct xen_dev *d)
{
	struct xenbus *xb = d->xb;
	char err[256];
	unsigned long fe_state;

	if (!d->link) {
		char *pdp = xread(xb, "%s/physical-device-path", d->be_path);
		if (pdp && dev_bind(d, pdp) == 0) {
			free(d->unknown_pdp);
			d->unknown_pdp = NULL;
		} else if (pdp && (!d->unknown_pdp || strcmp(d->unknown_pdp, pdp))) {
			log_warn("blkif %s: physical-device-path %s names no open vbd", d->be_path, pdp);
			free(d->unknown_pdp);
			d->unknown_pdp = pdp;
			pdp = NULL;
		}
		free(pdp);
	}
	if (xread_uint(xb, &fe_state, "%s/state", d->fe_path) < 0) {
		/*
		 * No frontend yet (wait for it), or it went away under a live
		 * ring (the guest died: let go of its memory), or while it was
		 * closing: a guest powering off leaves its frontend in Closing
		 * (Linux's xenbus shutdown) and the toolstack, once the domain
		 * is gone, waits for our Closed before it runs the hotplug remove.
		 */
		if (d->connected || d->connecting || d->state == XS_CONNECTED ||
		    d->state == XS_CLOSING) {
			dev_disconnect(d);
			dev_set_state(d, XS_CLOSED);
		}
		return;
	}
	switch (fe_state) {
	case XS_INITIALISED:
	case XS_CONNECTED:
		if (d->bound && !d->connected && !d->connecting && d->state == XS_INITWAIT) {
			if (dev_connect(d, err, sizeof(err)) < 0) {
				log_warn("blkif %s: cannot connect: %s", d->be_path, err);
				xwrite(xb, d->be_path, "error", "%s", err);
				dev_set_state(d, XS_CLOSING);
			}
		}
		break;
	case XS_CLOSING:
		/* blkback's order: Closing answers Closing, Closed answers Closed */
		dev_disconnect(d);
		if (d->state != XS_CLOSED)
			dev_set_state(d, XS_CLOSING);
		break;
	case XS_CLOSED:
		dev_disconnect(d);
		dev_set_state(d, XS_CLOSED);
		break;
	case XS_INITIALISING:
	case XS_UNKNOWN:
		if (d->state == XS_CLOSED || d->state == XS_CLOSING) {
			dev_disconnect(d);	/* the guest rebooted: start again */
			dev_set_state(d, XS_INITWAIT);
		}
		break;
	default:
		break;
	}
}

/* A new backend directory: claim it (or not), announce, watch the frontend. */
static void
dev_new(struct xenbus *xb, const char *type, const char *be_path, uint32_t devid)
{
	unsigned long fe_domid;
	char *fe_path = xread(xb, "%s/frontend", be_path);

	if (!fe_path || xread_uint(xb, &fe_domid, "%s/frontend-id", be_path) < 0) {
		free(fe_path);
		return;	/* the toolstack has not finished writing it */
	}
	if (!strcmp(type, "vbd")) {
		/* Xen's own vbd directories: only those our hotplug script serves */
		char *script = xread(xb, "%s/script", be_path);
		const char *base = script ? strrchr(script, '/') : NULL;
		base = base ? base + 1 : script;
		int ours = base && !strcmp(base, "block-tap");
		free(script);
		if (!ours) {
			free(fe_path);
			return;
		}
	}
	struct xen_dev *d = calloc(1, sizeof(*d));
	if (!d || !(d->be_path = strdup(be_path)) || !(d->type = strdup(type))) {
		if (d)
			free(d->be_path);
		free(d);
		free(fe_path);
		return;
	}
	d->xb = xb;
	d->fe_path = fe_path;
	d->fe_domid = (uint32_t)fe_domid;
	d->devid = devid;
	d->state = -1;
	LIST_INSERT_HEAD(&xb->devs, d, link_entry);
	xwrite(xb, be_path, "max-ring-page-order", "%d", BLKIF_MAX_RING_ORDER);
	xwrite(xb, be_path, "multi-queue-max-queues", "%d", XB_MAX_QUEUES);
	xwrite(xb, be_path, "feature-max-indirect-segments", "%d", BLKIF_MAX_INDIRECT_SEGMENTS);
	xwrite(xb, be_path, "feature-persistent", "%d", xb->max_pgrants ? 1 : 0);
	dev_set_state(d, XS_INITWAIT);
	char path[512], token[600];
	snprintf(path, sizeof(path), "%s/state", fe_path);
	snprintf(token, sizeof(token), "fe:%s", be_path);
	if (!xs_watch(xb->xs, path, token))
		log_warn("xenstore: cannot watch %s: %s", path, strerror(errno));
	log_info("blkif %s: claimed (frontend %s, domain %u)", be_path, fe_path, d->fe_domid);
}

static struct xen_dev *
dev_find(struct xenbus *xb, const char *be_path)
{
	struct xen_dev *d;
	LIST_FOREACH(d, &xb->devs, link_entry)
		if (!strcmp(d->be_path, be_path))
			return d;
	return NULL;
}

/* Something changed at or below backend/<type>/<domid>/<devid>. */
static void
backend_event(struct xenbus *xb, unsigned t, const char *path)
{
	size_t rl = strlen(xb->roots[t]);
	unsigned long domid, devid;
	char be_path[512], *end;

	if (strncmp(path, xb->roots[t], rl) || path[rl] != '/')
		return;
	const char *p = path + rl + 1;
	domid = strtoul(p, &end, 10);
	if (end == p || *end != '/')
		return;
	p = end + 1;
	devid = strtoul(p, &end, 10);
	if (end == p || (*end && *end != '/'))
		return;
	snprintf(be_path, sizeof(be_path), "%s/%lu/%lu", xb->roots[t], domid, devid);
	struct xen_dev *d = dev_find(xb, be_path);
	unsigned n = 0;
	char **ents = xs_directory(xb->xs, XBT_NULL, be_path, &n);
	free(ents);
	if (!ents) {			/* the directory went: so does the device */
		if (d) {
			log_info("blkif %s: backend directory removed", be_path);
			dev_free(d);
		}
		return;
	}
	if (!d) {
		dev_new(xb, xb->types[t], be_path, (uint32_t)devid);
		d = dev_find(xb, be_path);
	}
	if (d)
		dev_update(d);
}

/*
 * A domain was released (@releaseDomain: it died). Its toolstack normally
 * removes its backend directories; if the toolstack crashed, nothing will,
 * and rings left mapped would pin the dead domain's memory: let go of the
 * rings of every device whose frontend's domain no longer exists.
 */
static void
domains_released(struct xenbus *xb)
{
	struct xen_dev *d;
	LIST_FOREACH(d, &xb->devs, link_entry) {
		if (d->state == XS_CLOSED || d->fe_domid == xb->domid ||
		    xs_is_domain_introduced(xb->xs, d->fe_domid))
			continue;
		log_info("blkif %s: domain %u is gone; its rings are freed", d->be_path,
			 d->fe_domid);
		dev_disconnect(d);
		dev_set_state(d, XS_CLOSED);
	}
}

static void
xenbus_on_watch(evutil_socket_t fd, short what, void *arg)
{
	struct xenbus *xb = arg;
	char **w;
	(void)fd;
	(void)what;

	while ((w = xs_check_watch(xb->xs))) {
		const char *path = w[XS_WATCH_PATH], *token = w[XS_WATCH_TOKEN];
		if (!strncmp(token, "fe:", 3)) {
			struct xen_dev *d = dev_find(xb, token + 3);
			if (d)
				dev_update(d);
		} else if (!strcmp(token, RELEASE_TOKEN)) {
			domains_released(xb);
		} else if (!strncmp(token, "be:", 3)) {
			unsigned t = (unsigned)atoi(token + 3);
			if (t < xb->nr_types)
				backend_event(xb, t, path);
		}
		free(w);
	}
}

/*
 * The bound of persistent grants per ring: Linux blkback's default, or
 * TAPDISKD_MAX_PERSISTENT_GRANTS (tests lower it to see the bound at work;
 * 0 stops offering feature-persistent).
 */
static unsigned
max_pgrants_from_env(void)
{
	const char *v = getenv("TAPDISKD_MAX_PERSISTENT_GRANTS");
	char *end;
	if (!v || !*v)
		return PGRANT_DEFAULT_MAX;
	errno = 0;
	unsigned long n = strtoul(v, &end, 10);
	if (errno || *end || n > PGRANT_LIMIT) {
		log_warn("TAPDISKD_MAX_PERSISTENT_GRANTS=%s: not 0..%u; using %u", v, PGRANT_LIMIT,
			 PGRANT_DEFAULT_MAX);
		return PGRANT_DEFAULT_MAX;
	}
	return (unsigned)n;
}

struct xenbus *
xenbus_start(struct server *srv, const struct xenbus_opts *o)
{
	char err[256];
	struct xenbus *xb;

	if (o->disabled) {
		log_info("Xen backend disabled (--no-xen)");
		return NULL;
	}
	xb = calloc(1, sizeof(*xb));
	if (!xb)
		return NULL;
	xb->srv = srv;
	xb->domid = o->domid;
	active = xb;
	xb->max_pgrants = max_pgrants_from_env();
	LIST_INIT(&xb->devs);
	xb->port = o->sim_dir ? xport_sim_open(o->sim_dir, err, sizeof(err))
			      : xport_xen_open(err, sizeof(err));
	if (!xb->port) {
		log_info("Xen backend disabled: %s", err);
		free(xb);
		return NULL;
	}
	xb->xs = xs_open(0);
	if (!xb->xs) {
		log_info("Xen backend disabled: cannot reach xenstore: %s", strerror(errno));
		goto fail;
	}
	char types[128];
	snprintf(types, sizeof(types), "%s", o->types ? o->types : "vbd3,vbd");
	for (char *save, *t = strtok_r(types, ",", &save); t && xb->nr_types < XB_MAX_TYPES;
	     t = strtok_r(NULL, ",", &save)) {
		char token[32];
		if (asprintf(&xb->roots[xb->nr_types], "/local/domain/%u/backend/%s", o->domid, t) < 0)
			goto fail;
		xb->types[xb->nr_types] = strdup(t);
		snprintf(token, sizeof(token), "be:%u", xb->nr_types);
		if (!xs_watch(xb->xs, xb->roots[xb->nr_types], token)) {
			log_info("Xen backend disabled: cannot watch %s: %s", xb->roots[xb->nr_types],
				 strerror(errno));
			xb->nr_types++;
			goto fail;
		}
		xb->nr_types++;
	}
	if (!xs_watch(xb->xs, "@releaseDomain", RELEASE_TOKEN))
		log_warn("xenstore: cannot watch @releaseDomain (rings of guests that die "
			 "without their toolstack stay mapped): %s", strerror(errno));
	xb->ev = event_new(srv->base, xs_fileno(xb->xs), EV_READ | EV_PERSIST, xenbus_on_watch, xb);
	if (!xb->ev || event_add(xb->ev, NULL) < 0)
		goto fail;
	log_info("Xen backend: watching %s (domain %u, %s port, %u persistent grants per ring)",
		 o->types ? o->types : "vbd3,vbd", o->domid, xb->port->ops->name, xb->max_pgrants);
	return xb;
fail:
	xenbus_stop(xb);
	return NULL;
}

void
xenbus_stop(struct xenbus *xb)
{
	if (!xb)
		return;
	active = NULL;	/* notes still on their way are dropped */
	while (!LIST_EMPTY(&xb->devs)) {
		struct xen_dev *d = LIST_FIRST(&xb->devs);
		dev_unbind(d);
		dev_set_state(d, XS_CLOSED);
		dev_free(d);
	}
	if (xb->ev)
		event_free(xb->ev);
	for (unsigned i = 0; i < xb->nr_types; i++) {
		char token[32];
		snprintf(token, sizeof(token), "be:%u", i);
		if (xb->xs)
			xs_unwatch(xb->xs, xb->roots[i], token);
		free(xb->roots[i]);
		free(xb->types[i]);
	}
	if (xb->xs) {
		xs_unwatch(xb->xs, "@releaseDomain", RELEASE_TOKEN);
		xs_close(xb->xs);
	}
	if (xb->port)
		xb->port->ops->free(xb->port);
	free(xb);
}
