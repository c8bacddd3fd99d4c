/* Live snapshot of a vbd onto a new leaf image. */
#ifndef TD_SNAPSHOT_H
#define TD_SNAPSHOT_H

#include "vbd.h"

/* new_path: absolute path of the new leaf (must not exist). */
void vbd_snapshot(struct vbd *vbd, const char *new_path, vbd_done_fn done, void *arg);

#endif
