/* Live snapshot of a vbd onto a new leaf image. */
#ifndef TD_SNAPSHOT_H
#define TD_SNAPSHOT_H

#include "vbd.h"

/*
 * new_path: absolute path of the new leaf (must not exist), or, for an image
 * that keeps its snapshots inside itself (vbd_snapshot_inside), the
 * snapshot's name; done's msg on success is then the params that open the
 * snapshot (else NULL). cbt_log: the
 * vbd tracks changed blocks in this (existing) log from the new leaf on,
 * and its old log, closed consistent, describes what changed in the now
 * frozen leaf; NULL keeps the log as it is.
 */
void vbd_snapshot(struct vbd *vbd, const char *new_path, const char *cbt_log, vbd_done_fn done,
		  void *arg);
/* 1 if the vbd's leaf makes snapshots inside itself (its driver's snapshot op: rbd:). */
int vbd_snapshot_inside(const struct vbd *vbd);

#endif
