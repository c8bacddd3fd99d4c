/* Blocking file calls, each reported to the I/O observers. */
#include "file_calls.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "io_observe.h"

static int
pread_all(int fd, void *buf, size_t len, uint64_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		done += (size_t)n;
	}
	return 0;
}

static int
pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		done += (size_t)n;
	}
	return 0;
}

static int
run_call(struct io_obs_event *ev, const void *wbuf, void *rbuf)
{
	switch (ev->kind) {
	case IO_OBS_READ:
		return pread_all(ev->fd, rbuf, ev->length, ev->offset);
	case IO_OBS_WRITE:
		return pwrite_all(ev->fd, wbuf, ev->length, ev->offset);
	case IO_OBS_FDATASYNC:
		return fdatasync(ev->fd) < 0 ? -errno : 0;
	case IO_OBS_FSYNC:
		return fsync(ev->fd) < 0 ? -errno : 0;
	case IO_OBS_TRUNCATE:
		return ftruncate(ev->fd, (off_t)ev->length) < 0 ? -errno : 0;
	case IO_OBS_FALLOCATE:
		return fallocate(ev->fd, ev->mode, (off_t)ev->offset, (off_t)ev->length) < 0 ?
		       -errno : 0;
	}
	return -EINVAL;
}

/* Runs one call, told to the observers around it when there are any. */
static int
observed_call(struct io_obs_event *ev, const void *wbuf, void *rbuf)
{
	if (!io_observed)
		return run_call(ev, wbuf, rbuf);
	struct iovec iov = { (void *)(wbuf ? wbuf : rbuf), (size_t)ev->length };
	if (ev->kind == IO_OBS_READ || ev->kind == IO_OBS_WRITE) {
		ev->iov = &iov;
		ev->iovcnt = 1;
	}
	int rc = io_obs_begin(ev);
	if (rc < 0)
		return rc;
	if (rc > 0) {
		/* a short write (io_observe.h): its first rc bytes land, then ENOSPC */
		struct io_obs_event part = *ev;
		part.length = (uint64_t)rc;
		rc = run_call(&part, wbuf, rbuf);
		if (rc == 0)
			rc = -ENOSPC;
	} else {
		rc = run_call(ev, wbuf, rbuf);
	}
	io_obs_end(ev, rc);
	return rc;
}

int
fc_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	struct io_obs_event ev = { .kind = IO_OBS_READ, .fd = fd, .offset = off, .length = len };
	return observed_call(&ev, NULL, buf);
}

int
fc_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
	struct io_obs_event ev = { .kind = IO_OBS_WRITE, .fd = fd, .offset = off, .length = len };
	return observed_call(&ev, buf, NULL);
}

int
fc_fdatasync(int fd)
{
	struct io_obs_event ev = { .kind = IO_OBS_FDATASYNC, .fd = fd };
	return observed_call(&ev, NULL, NULL);
}

int
fc_fsync(int fd)
{
	struct io_obs_event ev = { .kind = IO_OBS_FSYNC, .fd = fd };
	return observed_call(&ev, NULL, NULL);
}

int
fc_ftruncate(int fd, uint64_t size)
{
	struct io_obs_event ev = { .kind = IO_OBS_TRUNCATE, .fd = fd, .length = size };
	return observed_call(&ev, NULL, NULL);
}

int
fc_fallocate(int fd, int mode, uint64_t off, uint64_t len)
{
	struct io_obs_event ev = { .kind = IO_OBS_FALLOCATE, .fd = fd, .mode = mode,
				   .offset = off, .length = len };
	return observed_call(&ev, NULL, NULL);
}
