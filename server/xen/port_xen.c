/* The real port: grant tables through libxengnttab, event channels through libxenevtchn. */
#include "port.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xenevtchn.h>
#include <xengnttab.h>

#include "blkif_abi.h"

#define XEN_COPY_BATCH 256

struct xen_port {
	struct xport port;
	xengnttab_handle *gnt;
};

struct xen_evtchn {
	xenevtchn_handle *xce;
	evtchn_port_t local;
};

static void *
xen_map(struct xport *p, uint32_t domid, const uint32_t *refs, unsigned n)
{
	struct xen_port *x = (struct xen_port *)p;
	return xengnttab_map_domain_grant_refs(x->gnt, n, domid, (uint32_t *)refs,
					       PROT_READ | PROT_WRITE);
}

static void
xen_unmap(struct xport *p, uint32_t domid, void *addr, unsigned n)
{
	(void)domid;
	xengnttab_unmap(((struct xen_port *)p)->gnt, addr, n);
}

static int
xen_copy(struct xport *p, uint32_t domid, struct xport_copy *segs, unsigned n)
{
	struct xen_port *x = (struct xen_port *)p;
	xengnttab_grant_copy_segment_t g[XEN_COPY_BATCH];

	for (unsigned done = 0; done < n;) {
		unsigned k = n - done < XEN_COPY_BATCH ? n - done : XEN_COPY_BATCH;
		for (unsigned i = 0; i < k; i++) {
			const struct xport_copy *c = &segs[done + i];
			memset(&g[i], 0, sizeof(g[i]));
			g[i].len = c->len;
			if (c->to_guest) {
				g[i].source.virt = c->buf;
				g[i].dest.foreign.ref = c->ref;
				g[i].dest.foreign.offset = c->offset;
				g[i].dest.foreign.domid = (uint16_t)domid;
				g[i].flags = GNTCOPY_dest_gref;
			} else {
				g[i].dest.virt = c->buf;
				g[i].source.foreign.ref = c->ref;
				g[i].source.foreign.offset = c->offset;
				g[i].source.foreign.domid = (uint16_t)domid;
				g[i].flags = GNTCOPY_source_gref;
			}
		}
		if (xengnttab_grant_copy(x->gnt, k, g) < 0)
			return -errno;
		for (unsigned i = 0; i < k; i++)
			segs[done + i].status = g[i].status;
		done += k;
	}
	return 0;
}

static struct xport_evtchn *
xen_bind(struct xport *p, uint32_t domid, uint32_t remote_port)
{
	struct xen_evtchn *e = calloc(1, sizeof(*e));
	(void)p;
	if (!e)
		return NULL;
	e->xce = xenevtchn_open(NULL, 0);
	if (!e->xce) {
		free(e);
		return NULL;
	}
	xenevtchn_port_or_error_t lp = xenevtchn_bind_interdomain(e->xce, domid, remote_port);
	if (lp < 0) {
		int saved = errno;
		xenevtchn_close(e->xce);
		free(e);
		errno = saved;
		return NULL;
	}
	e->local = (evtchn_port_t)lp;
	return (struct xport_evtchn *)e;
}

static void
xen_unbind(struct xport_evtchn *xe)
{
	struct xen_evtchn *e = (struct xen_evtchn *)xe;
	xenevtchn_unbind(e->xce, e->local);
	xenevtchn_close(e->xce);
	free(e);
}

static int
xen_fd(struct xport_evtchn *xe)
{
	return xenevtchn_fd(((struct xen_evtchn *)xe)->xce);
}

static int
xen_pending(struct xport_evtchn *xe)
{
	struct xen_evtchn *e = (struct xen_evtchn *)xe;
	xenevtchn_port_or_error_t port = xenevtchn_pending(e->xce);
	if (port < 0)
		return 0;
	xenevtchn_unmask(e->xce, (evtchn_port_t)port);
	return (evtchn_port_t)port == e->local;
}

static int
xen_notify(struct xport_evtchn *xe)
{
	struct xen_evtchn *e = (struct xen_evtchn *)xe;
	return xenevtchn_notify(e->xce, e->local) < 0 ? -errno : 0;
}

static void
xen_free(struct xport *p)
{
	struct xen_port *x = (struct xen_port *)p;
	xengnttab_close(x->gnt);
	free(x);
}

static const struct xport_ops xen_ops = {
	.name = "xen",
	.map = xen_map,
	.unmap = xen_unmap,
	.copy = xen_copy,
	.bind = xen_bind,
	.unbind = xen_unbind,
	.fd = xen_fd,
	.pending = xen_pending,
	.notify = xen_notify,
	.free = xen_free,
};

struct xport *
xport_xen_open(char *err, size_t errlen)
{
	if (access("/dev/xen/gntdev", R_OK | W_OK) < 0 || access("/dev/xen/evtchn", R_OK | W_OK) < 0) {
		snprintf(err, errlen, "no /dev/xen/gntdev or /dev/xen/evtchn (not a Xen dom0?)");
		return NULL;
	}
	struct xen_port *x = calloc(1, sizeof(*x));
	if (!x) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	x->gnt = xengnttab_open(NULL, 0);
	if (!x->gnt) {
		snprintf(err, errlen, "xengnttab_open: %s", strerror(errno));
		free(x);
		return NULL;
	}
	x->port.ops = &xen_ops;
	return &x->port;
}
