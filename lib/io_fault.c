/* Fault injection: the observer that fails chosen I/O (io_fault.h). */
#include "io_fault.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "io_observe.h"

static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static struct io_fault_status st;	/* under fault_lock */
static int fault_armed;			/* read without the lock: the unarmed fast path */

static const char *const kind_names[] = { "read", "write", "sync", "fallocate", "truncate" };

const char *
io_fault_kind_name(unsigned kind)
{
	for (unsigned i = 0; i < sizeof(kind_names) / sizeof(kind_names[0]); i++)
		if (kind == 1u << i)
			return kind_names[i];
	return "?";
}

int
io_fault_parse_kinds(const char *list, unsigned *kinds)
{
	char buf[128], *save = NULL;

	if (snprintf(buf, sizeof(buf), "%s", list) >= (int)sizeof(buf))
		return -EINVAL;
	*kinds = 0;
	for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		unsigned i = 0;
		while (i < sizeof(kind_names) / sizeof(kind_names[0]) && strcmp(tok, kind_names[i]))
			i++;
		if (i == sizeof(kind_names) / sizeof(kind_names[0]))
			return -EINVAL;
		*kinds |= 1u << i;
	}
	return *kinds ? 0 : -EINVAL;
}

static unsigned
event_kind(enum io_obs_kind k)
{
	switch (k) {
	case IO_OBS_READ: return IO_FAULT_READ;
	case IO_OBS_WRITE: return IO_FAULT_WRITE;
	case IO_OBS_FDATASYNC:
	case IO_OBS_FSYNC: return IO_FAULT_SYNC;
	case IO_OBS_FALLOCATE: return IO_FAULT_FALLOCATE;
	case IO_OBS_TRUNCATE: return IO_FAULT_TRUNCATE;
	}
	return 0;
}

static void
fd_path(int fd, char *buf, size_t len)
{
	char link[64];
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, buf, len - 1);
	buf[n < 0 ? 0 : n] = 0;
}

/*
 * How much of a write lands before the disk is "full": half of it, in
 * whole sectors (pages for O_DIRECT, which takes nothing less); 0 when that
 * is nothing, and the write fails whole.
 */
static int
short_length(const struct io_obs_event *ev)
{
	int fl = fcntl(ev->fd, F_GETFL);
	uint64_t align = fl >= 0 && (fl & O_DIRECT) ? 4096 : 512;
	uint64_t n = ev->length / 2 / align * align;
	return n > (1u << 30) ? 1 << 30 : (int)n;
}

static int
fault_begin(struct io_observer *o, const struct io_obs_event *ev)
{
	unsigned kind = event_kind(ev->kind);
	char path[IO_FAULT_PATH_MAX];
	int rc = 0;
	(void)o;

	if (!__atomic_load_n(&fault_armed, __ATOMIC_ACQUIRE))
		return 0;
	pthread_mutex_lock(&fault_lock);
	const struct io_fault_spec *sp = &st.spec;
	if (!st.armed || (sp->kinds && !(sp->kinds & kind)))
		goto out;
	path[0] = 0;
	if (sp->path[0]) {
		fd_path(ev->fd, path, sizeof(path));
		if (!strstr(path, sp->path))
			goto out;
	}
	if (++st.seen < sp->nth)
		goto out;
	/* this one fails */
	if (!path[0])
		fd_path(ev->fd, path, sizeof(path));
	st.injected++;
	st.total++;
	st.last_kind = kind;
	st.last_offset = ev->offset;
	st.last_length = ev->length;
	snprintf(st.last_path, sizeof(st.last_path), "%s", path);
	if (st.seen >= sp->nth + sp->count - 1) {
		st.armed = 0;
		__atomic_store_n(&fault_armed, 0, __ATOMIC_RELEASE);
	}
	if (!sp->short_write)
		rc = -sp->err;
	else if (ev->kind == IO_OBS_WRITE && (rc = short_length(ev)) > 0)
		;	/* the first rc bytes land */
	else
		rc = -ENOSPC;
out:
	pthread_mutex_unlock(&fault_lock);
	return rc;
}

static struct io_observer injector = { .begin = fault_begin };

int
io_fault_enable(void)
{
	int rc = io_observer_add(&injector);
	if (rc == 0)
		st.enabled = 1;
	return rc;
}

int
io_fault_arm(const struct io_fault_spec *spec)
{
	pthread_mutex_lock(&fault_lock);
	if (!st.enabled) {
		pthread_mutex_unlock(&fault_lock);
		return -EINVAL;
	}
	st.spec = *spec;
	if (!st.spec.count)
		st.spec.count = 1;
	st.seen = st.injected = 0;
	st.armed = spec->nth > 0;
	__atomic_store_n(&fault_armed, st.armed, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&fault_lock);
	return 0;
}

void
io_fault_disarm(void)
{
	pthread_mutex_lock(&fault_lock);
	st.armed = 0;
	__atomic_store_n(&fault_armed, 0, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&fault_lock);
}

void
io_fault_get_status(struct io_fault_status *out)
{
	pthread_mutex_lock(&fault_lock);
	*out = st;
	pthread_mutex_unlock(&fault_lock);
}
