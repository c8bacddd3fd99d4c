/* The Xen blkif backend: xenstore watches, the XenbusState machine, binding to vbds. */
#ifndef TD_XEN_XENBUS_H
#define TD_XEN_XENBUS_H

#include <stdint.h>

struct server;
struct xenbus;

struct xenbus_opts {
	const char *types;	/* "vbd3,vbd" */
	uint32_t domid;		/* ours: backends live under /local/domain/<domid> */
	const char *sim_dir;	/* simulated hypervisor (tests), or NULL for Xen */
	int disabled;		/* --no-xen */
};

/* NULL when disabled or unavailable (one log line says why). */
struct xenbus *xenbus_start(struct server *srv, const struct xenbus_opts *o);
/* Disconnects every device (state Closed) and releases xenstore. */
void xenbus_stop(struct xenbus *xb);

#endif
