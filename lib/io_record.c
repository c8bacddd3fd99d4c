/* The power-loss recorder: see io_record.h for the log's format. */
#include "io_record.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "byteorder.h"
#include "io_observe.h"

enum { REC_SUBMIT = 1, REC_COMPLETE = 2, REC_MARK = 3 };
#define REC_HDR 48

static pthread_mutex_t rec_lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *rec_out;
static int rec_active;		/* read without the lock: a mark's cheap test */

static int
changes_file(enum io_obs_kind k)
{
	return k != IO_OBS_READ;
}

/* The path an fd was opened by: what the replay rebuilds. */
static size_t
fd_path(int fd, char *buf, size_t len)
{
	char link[64];
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, buf, len);
	return n < 0 ? 0 : (size_t)n;
}

static void
put_record(unsigned type, const struct io_obs_event *ev, long long res, const char *name,
	   size_t name_len)
{
	uint8_t h[REC_HDR];
	put_le32(h, type);
	put_le32(h + 4, ev ? (uint32_t)ev->kind : 0);
	put_le64(h + 8, ev ? ev->id : 0);
	put_le64(h + 16, (uint64_t)res);
	put_le64(h + 24, ev ? ev->offset : 0);
	put_le64(h + 32, ev ? ev->length : 0);
	put_le32(h + 40, ev ? (uint32_t)ev->mode : 0);
	put_le32(h + 44, (uint32_t)name_len);
	fwrite(h, 1, sizeof(h), rec_out);
	if (name_len)
		fwrite(name, 1, name_len, rec_out);
	if (type == REC_SUBMIT && ev->kind == IO_OBS_WRITE)
		for (int i = 0; i < ev->iovcnt; i++)
			fwrite(ev->iov[i].iov_base, 1, ev->iov[i].iov_len, rec_out);
}

static int
rec_begin(struct io_observer *o, const struct io_obs_event *ev)
{
	char path[4096];
	(void)o;
	if (!changes_file(ev->kind))
		return 0;
	size_t n = fd_path(ev->fd, path, sizeof(path));
	pthread_mutex_lock(&rec_lock);
	if (rec_out)
		put_record(REC_SUBMIT, ev, 0, path, n);
	pthread_mutex_unlock(&rec_lock);
	return 0;
}

static void
rec_end(struct io_observer *o, const struct io_obs_event *ev, int res)
{
	(void)o;
	if (!changes_file(ev->kind))
		return;
	pthread_mutex_lock(&rec_lock);
	if (rec_out)
		put_record(REC_COMPLETE, ev, res, NULL, 0);
	pthread_mutex_unlock(&rec_lock);
}

static struct io_observer recorder = { .begin = rec_begin, .end = rec_end };

int
io_record_start(const char *path)
{
	FILE *f = fopen(path, "we");
	if (!f)
		return -errno;
	if (fwrite("TDIOREC1", 1, 8, f) != 8 || io_observer_add(&recorder) < 0) {
		fclose(f);
		return -EIO;
	}
	rec_out = f;
	__atomic_store_n(&rec_active, 1, __ATOMIC_RELAXED);
	return 0;
}

void
io_record_mark(const char *fmt, ...)
{
	char text[256];
	va_list ap;
	if (!__atomic_load_n(&rec_active, __ATOMIC_RELAXED))
		return;
	va_start(ap, fmt);
	int n = vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	pthread_mutex_lock(&rec_lock);
	if (rec_out)
		put_record(REC_MARK, NULL, 0, text, (size_t)n < sizeof(text) ? (size_t)n : sizeof(text) - 1);
	pthread_mutex_unlock(&rec_lock);
}

void
io_record_stop(void)
{
	pthread_mutex_lock(&rec_lock);
	__atomic_store_n(&rec_active, 0, __ATOMIC_RELAXED);
	if (rec_out) {
		fclose(rec_out);
		rec_out = NULL;
	}
	pthread_mutex_unlock(&rec_lock);
}
