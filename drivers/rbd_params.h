/*
 * The rbd: driver's params, parsed with no librbd and no I/O (the fuzzer
 * and a build without librbd share it): POOL/IMAGE or POOL/NAMESPACE/IMAGE,
 * an optional @SNAP, then :conf=PATH and :id=USER in any order.
 */
#ifndef TD_RBD_PARAMS_H
#define TD_RBD_PARAMS_H

#include "driver.h"

struct rbd_spec {
	const char *pool, *ns, *image;	/* ns: NULL for the default namespace */
	const char *snap;		/* NULL: the image itself */
	const char *conf, *id;		/* NULL: not given */
	char *buf;			/* every string above points into it */
};

/* path: what follows "rbd:". 0, or -errno with err set (the spec then owns nothing). */
int rbd_spec_parse(const char *path, struct rbd_spec *spec, struct td_error *err);
void rbd_spec_free(struct rbd_spec *spec);
/* A name Ceph takes for a snapshot and our params can name again: 0 or -EINVAL with err set. */
int rbd_snap_name_check(const char *name, struct td_error *err);

#endif
