/*
 * A disk file (or block device) as drivers use it: a buffered descriptor
 * and, where the file system allows, an O_DIRECT one; which of the two can
 * take a given transfer; and whether the file lives in memory (tmpfs).
 */
#ifndef TD_FILE_IO_H
#define TD_FILE_IO_H

#include <stdint.h>
#include <sys/uio.h>

#include "driver.h"
#include "file_calls.h"

struct td_file {
	int fd;			/* buffered: metadata, unaligned I/O, sync */
	int dfd;		/* O_DIRECT, or -1 */
	uint32_t dio_offset_align, dio_mem_align;
	uint32_t sector_size;	/* logical block size (block devices), else 512 */
	int is_blk;
	unsigned io_flags;	/* IO_F_MEMORY on tmpfs/ramfs */
	uint64_t size;		/* at open */
	const char *path;	/* td_file_open's, which must outlive f: for messages */
};

/* Blocking. 0, or -errno with err set (the path is not in the message). */
int td_file_open(struct td_file *f, const char *path, int rdonly, int nodirect,
		 struct td_error *err);
/*
 * Blocking: fdatasync (if sync) and close both descriptors. A failed sync
 * is logged (close has no error to return): writes never flushed may be
 * lost.
 */
void td_file_close(struct td_file *f, int sync);
/* The descriptor that can take this transfer (O_DIRECT needs alignment). */
int td_file_pick_fd(const struct td_file *f, uint64_t offset, const struct iovec *iov,
		    int iovcnt);
/* Fills the descriptor and flags of op for a transfer at offset. */
void td_file_prep(const struct td_file *f, struct io_op *op, enum io_opcode opcode,
		  uint64_t offset);

/*
 * Blocking whole transfers for the offline tools and open paths; ctx is an
 * int * (the descriptor). 0 or -errno; reading past the end is -EIO.
 */
int td_pread_full(void *fdp, void *buf, size_t len, uint64_t off);
int td_pwrite_full(void *fdp, const void *buf, size_t len, uint64_t off);

/*
 * Blocking: creates path (it must not exist), lets fill write it, syncs it;
 * removes it again if anything failed. 0, or -errno with err set.
 */
int td_file_create(const char *path, int (*fill)(int fd, void *arg, struct td_error *err),
		   void *arg, struct td_error *err);

#endif
