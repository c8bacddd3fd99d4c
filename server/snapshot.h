/* Live snapshot of a vbd onto a new leaf image. */
#ifndef TD_SNAPSHOT_H
#define TD_SNAPSHOT_H

#include "vbd.h"

/*
 * new_path: absolute path of the new leaf (must not exist). cbt_log: the
 * vbd tracks changed blocks in this (existing) log from the new leaf on,
 * and its old log, closed consistent, describes what changed in the now
 * frozen leaf; NULL keeps the log as it is.
 */
void vbd_snapshot(struct vbd *vbd, const char *new_path, const char *cbt_log, vbd_done_fn done,
		  void *arg);

#endif
