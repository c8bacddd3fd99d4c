/*
 * The copying block jobs. The mirror copies what a vbd's chain holds to a destination
 * image (any params tapdiskd opens, nbd: included) while the guest runs,
 * then switches the vbd onto it (pivot) or drops it (cancel).
 *
 * Design: guest writes go to both sides from the start and are
 * acknowledged when both are done (a failing destination fails the job,
 * never the guest's write: the guest gets the source's result). The copy
 * walks a bitmap of 64 KiB blocks still to copy (all of them at the start;
 * a guest discard, or write-zeroes the destination cannot do, marks its
 * blocks again), at most MIRROR_COPIES ranges of at most 1 MiB at a time.
 * A guest write never overlaps a range being copied: it waits for that
 * copy, and a copy never starts over a guest write in flight, so what a
 * copy reads is what the destination must hold. A guest write overlapping
 * an earlier one in flight waits for it too, so that both sides see them
 * in one order. Once the bitmap is empty
 * the job is ready and stays so: a pivot then only drains the requests in
 * flight, flushes the destination and swaps the chain.
 *
 * Threading: the vbd's loop; opening and closing the destination run on
 * the loop's workers.
 */
#ifndef TD_MIRROR_H
#define TD_MIRROR_H

#include <stdint.h>

#include "vbd.h"

struct blockjob;

/*
 * Starts mirroring vbd to dest (params; created beforehand with the disk's
 * size). top: copy only what the leaf holds (dest already has the parents).
 * speed: bytes/s, 0 for no limit. done(arg, 0, NULL) once the destination
 * is open and the job runs, or an error with its sentence.
 */
void mirror_start(struct vbd *vbd, const char *dest, int top, uint64_t speed,
		  vbd_done_fn done, void *arg);
/* Switches the vbd onto the destination: the job must be ready. */
void mirror_pivot(struct blockjob *job, vbd_done_fn done, void *arg);
/*
 * Starts a stream: the parents' data is copied up into the leaf (what the
 * leaf holds stays), guest writes kept off the ranges being copied; then,
 * quiesced, the leaf drops its parents (td_chain_detach) and the vbd goes
 * on with the leaf alone. With base (a path of an image below the leaf's
 * parent), only what the images above base hold is copied, and the leaf
 * is pointed at base instead (td_chain_rebase). The job ends by itself.
 */
void stream_start(struct vbd *vbd, const char *base, uint64_t speed, vbd_done_fn done,
		  void *arg);
/*
 * Starts a commit: what the images from top (the leaf: active) down to base
 * (exclusive; NULL: the leaf's parent) hold is copied into base, opened
 * writable for it (td_image_open_writable: refused when another disk shares
 * any of them), guest writes going to both; once converged the vbd switches
 * onto base as a mirror's pivot does, and the images above it are let go
 * of (the toolstack deletes them). top: NULL (the leaf) or the path of an
 * image below it: then guest writes are not the job's, and at the end the
 * top's child is pointed at base (td_chain_rebase). The job ends by itself.
 */
void commit_start(struct vbd *vbd, const char *top, const char *base, uint64_t speed,
		  vbd_done_fn done, void *arg);


#endif
