/* A CBT log file as a whole: see cbt_file.h. */
#include "cbt_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "file_calls.h"

static int __attribute__((format(printf, 4, 5)))
fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
	va_list ap;

	if (err) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return rc;
}

/*
 * Opens path as a regular file only (-EINVAL for anything else), without
 * waiting on it (a FIFO's open would block for a writer) or making it the
 * controlling terminal. O_NONBLOCK is cleared again once the file is known
 * to be regular: io_uring would fail a request on it with EAGAIN rather
 * than wait.
 */
static int
open_file(const char *path, int flags, const char **why)
{
	struct stat st;
	int fd = open(path, flags | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0644), fl, rc = 0;

	if (fd < 0) {
		*why = strerror(errno);
		return -errno;
	}
	if (fstat(fd, &st) < 0)
		rc = -errno;
	else if (!S_ISREG(st.st_mode))
		rc = -EINVAL;
	else if ((fl = fcntl(fd, F_GETFL)) < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
		rc = -errno;
	if (rc) {
		*why = rc == -EINVAL ? "not a regular file" : strerror(-rc);
		close(fd);
		return rc;
	}
	return fd;
}

int
cbt_file_create(const char *path, uint64_t size, char *err, size_t errlen)
{
	struct cbt_header h = { .size = size };
	uint8_t hdr[CBT_HEADER_SIZE];
	const char *why = NULL;
	int fd, rc;

	if (!size || size > CBT_MAX_DISK)
		return fail(err, errlen, -EINVAL, "%s: %s", path,
			    size ? "disk size too large for a CBT log" : "disk size must not be 0");
	if ((fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC, &why)) < 0)
		return fail(err, errlen, fd, "%s: %s", path, why);
	cbt_header_encode(&h, hdr);
	rc = fc_pwrite_full(fd, hdr, sizeof(hdr), 0);
	/* the bitmap's bytes: zeros, as a sparse tail */
	if (!rc)
		rc = fc_ftruncate(fd, CBT_HEADER_SIZE + cbt_bitmap_bytes(size));
	if (!rc)
		rc = fc_fsync(fd);
	close(fd);
	if (rc)
		return fail(err, errlen, rc, "%s: %s", path, strerror(-rc));
	return 0;
}

int
cbt_file_open(const char *path, int rdonly, struct cbt_file *f, char *err, size_t errlen)
{
	uint8_t hdr[CBT_HEADER_SIZE];
	const char *why = NULL;
	struct stat st;
	int rc;

	memset(f, 0, sizeof(*f));
	f->rdonly = rdonly;
	if ((f->fd = open_file(path, rdonly ? O_RDONLY : O_RDWR, &why)) < 0)
		return fail(err, errlen, f->fd, "CBT log %s: %s", path, why);
	if (fstat(f->fd, &st) < 0) {
		rc = -errno;
		goto out;
	}
	if ((uint64_t)st.st_size < CBT_HEADER_SIZE) {
		cbt_file_close(f);
		return fail(err, errlen, -EINVAL, "CBT log %s: %s", path,
			    "shorter than its 48-byte header (not a CBT log, or truncated)");
	}
	if ((rc = fc_pread_full(f->fd, hdr, sizeof(hdr), 0)))
		goto out;
	if (cbt_header_decode(hdr, (uint64_t)st.st_size, &f->h, &why) < 0) {
		cbt_file_close(f);
		return fail(err, errlen, -EINVAL, "CBT log %s: %s", path, why);
	}
	uint64_t n = cbt_bitmap_bytes(f->h.size);
	if (!(f->bitmap = calloc(1, n))) {
		rc = -ENOMEM;
		goto out;
	}
	if ((rc = fc_pread_full(f->fd, f->bitmap, n, CBT_HEADER_SIZE)))
		goto out;
	return 0;
out:
	cbt_file_close(f);
	return fail(err, errlen, rc, "CBT log %s: %s", path, strerror(-rc));
}

int
cbt_file_write_header(struct cbt_file *f)
{
	uint8_t hdr[CBT_HEADER_SIZE];

	cbt_header_encode(&f->h, hdr);
	return fc_pwrite_full(f->fd, hdr, sizeof(hdr), 0);
}

int
cbt_file_write_bitmap(struct cbt_file *f, uint64_t off, uint64_t len)
{
	return fc_pwrite_full(f->fd, f->bitmap + off, len, CBT_HEADER_SIZE + off);
}

int
cbt_file_sync(struct cbt_file *f)
{
	return fc_fdatasync(f->fd);
}

int
cbt_file_grow(struct cbt_file *f, uint64_t size, char *err, size_t errlen)
{
	uint64_t old = cbt_bitmap_bytes(f->h.size), n = cbt_bitmap_bytes(size);
	uint8_t *bm;
	int rc;

	if (size < f->h.size)
		return fail(err, errlen, -EINVAL, "%s",
			    "a CBT log cannot shrink (size smaller than the log's)");
	if (size > CBT_MAX_DISK)
		return fail(err, errlen, -EINVAL, "%s", "disk size too large for a CBT log");
	if (!(bm = realloc(f->bitmap, n ? n : 1)))
		return -ENOMEM;
	f->bitmap = bm;
	memset(bm + old, 0, n - old);
	/*
	 * The last old byte may hold bits past the old end (a tool's slack):
	 * blocks that now exist must not inherit them.
	 */
	uint64_t old_blocks = cbt_blocks(f->h.size);
	if (old && old_blocks % 8)
		bm[old - 1] &= (uint8_t)((1u << (old_blocks % 8)) - 1);
	if ((rc = cbt_file_write_bitmap(f, old ? old - 1 : 0, n - (old ? old - 1 : 0))) ||
	    (rc = cbt_file_sync(f)))
		return fail(err, errlen, rc, "%s", strerror(-rc));
	f->h.size = size;
	if ((rc = cbt_file_write_header(f)) || (rc = cbt_file_sync(f)))
		return fail(err, errlen, rc, "%s", strerror(-rc));
	return 0;
}

void
cbt_file_close(struct cbt_file *f)
{
	if (f->fd >= 0)
		close(f->fd);
	f->fd = -1;
	free(f->bitmap);
	f->bitmap = NULL;
}
