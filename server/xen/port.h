/*
 * The port: everything the blkif backend needs from the hypervisor, behind
 * one small interface. port_xen.c is the real one (gntdev, evtchn through
 * libxengnttab and libxenevtchn); port_sim.c stands in for a hypervisor in
 * tests and benchmarks (a shared memory file is the guest's granted pages,
 * FIFOs are the event channels), so the whole ring path runs without Xen.
 */
#ifndef TD_XEN_PORT_H
#define TD_XEN_PORT_H

#include <stddef.h>
#include <stdint.h>

struct xport;
struct xport_evtchn;

/* One grant copy: len bytes between buf and (ref, offset) of the guest. */
struct xport_copy {
	uint32_t ref;
	uint16_t offset, len;
	void *buf;
	int to_guest;
	int16_t status;		/* 0 or an error for this segment */
};

struct xport_ops {
	const char *name;
	/* Maps n granted pages contiguously, read-write. NULL with errno. */
	void *(*map)(struct xport *p, uint32_t domid, const uint32_t *refs, unsigned n);
	void (*unmap)(struct xport *p, uint32_t domid, void *addr, unsigned n);
	/* 0 if the call was made (look at each status), -errno if not. */
	int (*copy)(struct xport *p, uint32_t domid, struct xport_copy *segs, unsigned n);
	struct xport_evtchn *(*bind)(struct xport *p, uint32_t domid, uint32_t remote_port);
	void (*unbind)(struct xport_evtchn *e);
	int (*fd)(struct xport_evtchn *e);
	/* After the fd became readable: consume and unmask; 1 if it was ours. */
	int (*pending)(struct xport_evtchn *e);
	int (*notify)(struct xport_evtchn *e);
	void (*free)(struct xport *p);
};

struct xport {
	const struct xport_ops *ops;
};

/* NULL (err set) when this host has no Xen. */
struct xport *xport_xen_open(char *err, size_t errlen);
/* A simulated hypervisor whose domains live in dir (see port_sim.c). */
struct xport *xport_sim_open(const char *dir, char *err, size_t errlen);

#endif
