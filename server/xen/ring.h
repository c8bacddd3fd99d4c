/*
 * One blkif ring of a connected device: consumes the guest's requests,
 * serves them through the vbd, responds. The guest is not trusted with
 * anything: each entry is copied out once and checked before use.
 */
#ifndef TD_XEN_RING_H
#define TD_XEN_RING_H

#include <stdint.h>

#include <jansson.h>

#include "blkif_abi.h"

struct server;
struct vbd;
struct xport;
struct blkif_ring;

struct blkif_ring_cfg {
	uint32_t domid;
	uint32_t refs[1u << BLKIF_MAX_RING_ORDER];
	unsigned nr_pages;
	uint32_t evtchn;
	int proto;
	int index;		/* queue number */
	unsigned max_pgrants;	/* persistent grants negotiated: their bound; 0: grant copy */
};

struct blkif_ring_stats {
	uint64_t reqs_in, reqs_out, kicks_in, kicks_out;
	uint64_t errors_msg;	/* malformed requests */
	uint64_t errors_map;	/* grant copies that failed */
	uint64_t errors_vbd;	/* I/O errors from the vbd */
	uint64_t indirect, barriers, flushes, discards;
	uint64_t max_segments;	/* largest request seen, in segments */
	uint64_t pgrants;	/* persistent grants mapped now (not a counter) */
	uint64_t pgrant_evictions;	/* persistent grants unmapped to stay in the bound */
	uint64_t pgrant_overflow;	/* segments grant-copied: the table was full */
};

/*
 * Maps the ring and binds its event channel, on the vbd's loop, where the
 * ring then lives (every call here runs there). dead(arg) is called once if
 * the ring disconnects itself (a misbehaving guest).
 */
struct blkif_ring *blkif_ring_connect(struct xport *port, struct vbd *vbd,
				      const struct blkif_ring_cfg *cfg,
				      void (*dead)(void *arg), void *arg,
				      char *err, size_t errlen);
/* Stops using the ring; it is freed once its requests are back from the vbd. */
void blkif_ring_disconnect(struct blkif_ring *r);
void blkif_ring_get_stats(const struct blkif_ring *r, struct blkif_ring_stats *st);
json_t *blkif_ring_stats_json(const struct blkif_ring *r);
void blkif_ring_reset_stats(struct blkif_ring *r);

#endif
