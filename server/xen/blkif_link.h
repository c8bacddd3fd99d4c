/*
 * The part of a blkif device that lives on its vbd's loop: its vbd_frontend
 * registration, its rings and their statistics. The xenstore state machine
 * (xenbus.c) stays on loop 0 and drives a link by posting to the vbd's loop;
 * what the link has to say (bound, connected, a ring died, the vbd went)
 * comes back to loop 0 as a blkif_note.
 *
 * Threads: blkif_link_new, _bind, _connect, _disconnect, _free and
 * _set_state on loop 0 only; everything else on the link's loop. The link
 * is freed on its loop by blkif_link_free, after every message posted to it
 * before (a loop's mailbox is in order).
 */
#ifndef TD_XEN_BLKIF_LINK_H
#define TD_XEN_BLKIF_LINK_H

#include <stdint.h>

#include "mailbox.h"
#include "ring.h"

struct loop;
struct xport;
struct blkif_link;

#define BLKIF_LINK_MAX_QUEUES 4

/* What the device's xenstore nodes say of the disk: read on the vbd's loop. */
struct blkif_vbd_props {
	int minor;
	uint64_t size;
	uint32_t sector_size, min_io;
	unsigned caps;
	int readonly;
};

enum blkif_note_kind {
	BLKIF_BOUND, BLKIF_BIND_FAILED,		/* after blkif_link_bind */
	BLKIF_CONNECTED, BLKIF_CONNECT_FAILED,	/* after blkif_link_connect */
	BLKIF_RING_DEAD,			/* the guest broke a ring: all are down */
	BLKIF_VBD_GONE,				/* the vbd closed under the device */
};

/* A note on its way to loop 0: fn runs there and frees it (blkif_note_free). */
struct blkif_note;
typedef void (*blkif_note_fn)(struct blkif_note *n);
struct blkif_note {
	struct mailbox_msg msg;
	blkif_note_fn fn;
	enum blkif_note_kind kind;
	void *dev;			/* the device's key, compared, never followed */
	uint64_t gen;			/* its generation: a note for an older link is stale */
	struct blkif_vbd_props props;	/* BOUND, CONNECTED */
	char err[256];			/* *_FAILED */
};

struct blkif_link *blkif_link_new(struct loop *home, blkif_note_fn fn, struct xport *port,
				  void *dev, uint64_t gen, const char *be_path,
				  uint32_t domid, uint32_t devid);
/* Registers with minor's vbd on loop (BOUND or BIND_FAILED comes back). -ENOMEM. */
int blkif_link_bind(struct blkif_link *l, struct loop *loop, int minor);
/* Connects the rings (CONNECTED or CONNECT_FAILED comes back). -ENOMEM. */
int blkif_link_connect(struct blkif_link *l, const struct blkif_ring_cfg *cfgs, unsigned n);
/* Disconnects the rings, keeping their counters. -ENOMEM. */
int blkif_link_disconnect(struct blkif_link *l);
/* Unbinds and frees the link on its loop; nothing more may be posted to it. */
void blkif_link_free(struct blkif_link *l);
/* The device's XenbusState, for the statistics. */
void blkif_link_set_state(struct blkif_link *l, int state);
void blkif_note_free(struct blkif_note *n);

#endif
