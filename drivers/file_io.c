/* Opening disk files for the drivers: descriptors, alignment, memory files. */
#include "file_io.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#ifdef __linux__
#include <linux/fs.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>

#endif

/*
 * Filesystems whose reads and writes can sleep in io_uring's first,
 * inline attempt (a FUSE server or a network that stopped answering): their
 * ops must never be tried on the loop thread.
 */
static int
fs_may_block_submitter(long type)
{
	switch ((unsigned long)type) {
	case 0x65735546:	/* FUSE */
	case 0x6969:		/* NFS */
	case 0xFF534D42:	/* CIFS */
	case 0xFE534D42:	/* SMB2 */
	case 0x00c36400:	/* Ceph */
	case 0x01021997:	/* 9p */
		return 1;
	}
	return 0;
}

int
td_file_open(struct td_file *f, const char *path, int rdonly, int nodirect,
	     struct td_error *err)
{
	struct stat st;
	int acc = rdonly ? O_RDONLY : O_RDWR;

	memset(f, 0, sizeof(*f));
	f->dfd = -1;
	f->path = path;
	f->fd = open(path, acc | O_CLOEXEC | O_NOCTTY);
	if (f->fd < 0)
		return td_error_set(err, errno, "%s", strerror(errno));
	if (fstat(f->fd, &st) < 0) {
		td_error_set(err, errno, "%s", strerror(errno));
		goto fail;
	}
	if (S_ISDIR(st.st_mode)) {
		td_error_set(err, EISDIR, "%s", strerror(EISDIR));
		goto fail;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		td_error_set(err, EINVAL, "not a regular file or block device");
		goto fail;
	}
	f->is_blk = S_ISBLK(st.st_mode);
#ifdef TMPFS_MAGIC
	/* tmpfs has no device to wait for: its I/O runs inline (see io.h) */
	struct statfs sfs;
	if (fstatfs(f->fd, &sfs) == 0) {
		if (sfs.f_type == TMPFS_MAGIC || sfs.f_type == RAMFS_MAGIC)
			f->io_flags = IO_F_MEMORY;
		else if (fs_may_block_submitter(sfs.f_type))
			f->io_flags = IO_F_MAY_BLOCK;
	}
#endif
	off_t end = lseek(f->fd, 0, SEEK_END);
	if (end < 0) {
		td_error_set(err, errno, "cannot size: %s", strerror(errno));
		goto fail;
	}
	f->size = (uint64_t)end;
	f->sector_size = 512;
#ifdef BLKSSZGET
	int ss;
	if (f->is_blk && ioctl(f->fd, BLKSSZGET, &ss) == 0 && ss >= 512)
		f->sector_size = (uint32_t)ss;
#endif
	f->dio_offset_align = f->dio_mem_align = 4096;
	if (!nodirect) {
		f->dfd = open(path, acc | O_CLOEXEC | O_NOCTTY | O_DIRECT);
#ifdef STATX_DIOALIGN
		struct statx stx;
		if (f->dfd >= 0 && statx(f->dfd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
		    (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align) {
			f->dio_offset_align = stx.stx_dio_offset_align;
			f->dio_mem_align = stx.stx_dio_mem_align ? stx.stx_dio_mem_align : 1;
		}
#endif
		if (f->is_blk && f->sector_size > f->dio_offset_align)
			f->dio_offset_align = f->sector_size;
		/*
		 * Direct transfers must cover whole pages. One that shares a page
		 * with a buffered transfer in flight (other bytes of it) fails to
		 * invalidate that page: the kernel then keeps a stale page and
		 * fails the next fdatasync with EIO.
		 */
		long page = sysconf(_SC_PAGESIZE);
		if (page > 0 && f->dio_offset_align < (uint32_t)page)
			f->dio_offset_align = (uint32_t)page;
	}
	return 0;
fail:
	close(f->fd);
	f->fd = -1;
	return -err->code;
}

void
td_file_close(struct td_file *f, int sync)
{
	if (f->fd < 0)
		return;
	int rc = sync ? fc_fdatasync(f->fd) : 0;
	if (rc < 0)
		log_warn("%s: fdatasync at close failed: %s; writes not flushed before it "
			 "may be lost", f->path, strerror(-rc));
	if (f->dfd >= 0)
		close(f->dfd);
	close(f->fd);
	f->fd = f->dfd = -1;
}

int
td_file_pick_fd(const struct td_file *f, uint64_t offset, const struct iovec *iov,
		int iovcnt)
{
	if (f->dfd < 0 || offset % f->dio_offset_align)
		return f->fd;
	for (int i = 0; i < iovcnt; i++) {
		if ((uintptr_t)iov[i].iov_base % f->dio_mem_align ||
		    iov[i].iov_len % f->dio_offset_align)
			return f->fd;
	}
	return f->dfd;
}

void
td_file_prep(const struct td_file *f, struct io_op *op, enum io_opcode opcode,
	     uint64_t offset)
{
	op->opcode = opcode;
	op->flags = f->io_flags;
	op->offset = offset;
	op->fd = (opcode == IO_OP_READV || opcode == IO_OP_WRITEV) ?
		 td_file_pick_fd(f, offset, op->iov, op->iovcnt) : f->fd;
}

int
td_pread_full(void *fdp, void *buf, size_t len, uint64_t off)
{
	return fc_pread_full(*(int *)fdp, buf, len, off);
}

int
td_pwrite_full(void *fdp, const void *buf, size_t len, uint64_t off)
{
	return fc_pwrite_full(*(int *)fdp, buf, len, off);
}

int
td_file_create(const char *path, int (*fill)(int fd, void *arg, struct td_error *err),
	       void *arg, struct td_error *err)
{
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	int rc;

	if (fd < 0)
		return td_error_set(err, errno, "%s", strerror(errno));
	rc = fill(fd, arg, err);
	if (rc == 0 && (rc = fc_fsync(fd)) < 0)
		rc = td_error_set(err, -rc, "%s", strerror(-rc));
	close(fd);
	if (rc < 0)
		unlink(path);	/* nothing left behind */
	return rc;
}
