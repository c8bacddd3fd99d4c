/*
 * The blocking file calls drivers and offline tools make outside the I/O
 * engine (opening and closing images, metadata at open, making a child at
 * snapshot): whole-buffer pread/pwrite, the syncs, truncate and fallocate.
 * Every one goes through here so that the I/O observers (io_observe.h) see
 * it as they see the engine's ops.
 *
 * Threading: any thread (they block; call them on workers, not on a loop).
 * Errors: 0 or -errno; fc_pread_full gives -EIO at end of file.
 */
#ifndef TD_FILE_CALLS_H
#define TD_FILE_CALLS_H

#include <stddef.h>
#include <stdint.h>

int fc_pread_full(int fd, void *buf, size_t len, uint64_t off);
int fc_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int fc_fdatasync(int fd);
int fc_fsync(int fd);
int fc_ftruncate(int fd, uint64_t size);
int fc_fallocate(int fd, int mode, uint64_t off, uint64_t len);

#endif
