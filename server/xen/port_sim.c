/*
 * The simulated hypervisor. For a domain D, in the simulation directory:
 *   domD.mem           its granted memory: grant reference R is page R
 *   evtD.P.be, .fe     event channel P: FIFOs towards the backend and
 *                      towards the frontend; a notification is one byte
 * The frontend simulator (tests/xen/blkfront_sim.c) creates them. A grant
 * reference past the end of the memory file is a bad reference, as a
 * revoked or never-granted one is for Xen.
 */
#include "port.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blkif_abi.h"

#define SIM_MAX_DOMAINS 64
#define GNTST_bad_gntref (-4)
#define GNTST_bad_copy_arg (-10)

struct sim_domain {
	uint32_t domid;
	int fd;
	uint8_t *mem;
	size_t pages;
	unsigned maps;		/* rings mapped: the domain is forgotten at 0 */
};

/*
 * Rings on several loops share the domains: a map, an unmap or a remap
 * takes the table for writing; copies share it (reading), so the loops'
 * copies still run side by side.
 */
struct sim {
	struct xport port;
	pthread_rwlock_t lock;
	char *dir;
	struct sim_domain doms[SIM_MAX_DOMAINS];
	unsigned nr;
};

struct sim_evtchn {
	int rd, wr;
};

static void
sim_domain_drop(struct sim *s, struct sim_domain *d)
{
	munmap(d->mem, d->pages * XEN_PAGE_SIZE);
	close(d->fd);
	*d = s->doms[--s->nr];
}

/* Domain domid's memory, mapped again if page `need` lies past what we have. */
static struct sim_domain *
sim_domain(struct sim *s, uint32_t domid, uint64_t need)
{
	char path[4096];
	struct stat st;
	unsigned maps = 0;

	for (unsigned i = 0; i < s->nr; i++) {
		struct sim_domain *d = &s->doms[i];
		if (d->domid != domid)
			continue;
		if (need < d->pages)
			return d;
		/* the frontend may have grown its memory since: look again */
		if (fstat(d->fd, &st) == 0 && (size_t)st.st_size / XEN_PAGE_SIZE == d->pages)
			return d;
		maps = d->maps;
		sim_domain_drop(s, d);
		break;
	}
	if (s->nr == SIM_MAX_DOMAINS) {
		errno = ENOSPC;
		return NULL;
	}
	snprintf(path, sizeof(path), "%s/dom%u.mem", s->dir, domid);
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) < 0 || st.st_size < (off_t)XEN_PAGE_SIZE) {
		close(fd);
		errno = EINVAL;
		return NULL;
	}
	size_t pages = (size_t)st.st_size / XEN_PAGE_SIZE;
	void *mem = mmap(NULL, pages * XEN_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED) {
		close(fd);
		return NULL;
	}
	struct sim_domain *d = &s->doms[s->nr++];
	d->domid = domid;
	d->fd = fd;
	d->mem = mem;
	d->pages = pages;
	d->maps = maps;
	return d;
}

static void *
sim_map_locked(struct xport *p, uint32_t domid, const uint32_t *refs, unsigned n)
{
	struct sim *s = (struct sim *)p;
	uint32_t top = 0;
	for (unsigned i = 0; i < n; i++)
		top = refs[i] > top ? refs[i] : top;
	struct sim_domain *d = sim_domain(s, domid, top);

	if (!d)
		return NULL;
	/* reserve the range, then put each granted page in its place */
	uint8_t *base = mmap(NULL, (size_t)n * XEN_PAGE_SIZE, PROT_NONE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		return NULL;
	for (unsigned i = 0; i < n; i++) {
		if (refs[i] >= d->pages ||
		    mmap(base + (size_t)i * XEN_PAGE_SIZE, XEN_PAGE_SIZE, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_FIXED, d->fd, (off_t)refs[i] * XEN_PAGE_SIZE) == MAP_FAILED) {
			munmap(base, (size_t)n * XEN_PAGE_SIZE);
			if (!d->maps)
				sim_domain_drop(s, d);
			errno = EINVAL;
			return NULL;
		}
	}
	d->maps++;
	return base;
}

static void *
sim_map(struct xport *p, uint32_t domid, const uint32_t *refs, unsigned n)
{
	struct sim *s = (struct sim *)p;
	pthread_rwlock_wrlock(&s->lock);
	void *r = sim_map_locked(p, domid, refs, n);
	int e = errno;
	pthread_rwlock_unlock(&s->lock);
	errno = e;
	return r;
}

static void
sim_unmap(struct xport *p, uint32_t domid, void *addr, unsigned n)
{
	struct sim *s = (struct sim *)p;

	munmap(addr, (size_t)n * XEN_PAGE_SIZE);
	pthread_rwlock_wrlock(&s->lock);
	for (unsigned i = 0; i < s->nr; i++)
		if (s->doms[i].domid == domid && s->doms[i].maps && !--s->doms[i].maps)
			sim_domain_drop(s, &s->doms[i]);	/* a guest's memory is not ours to keep */
	pthread_rwlock_unlock(&s->lock);
}

/* Domain domid with page top, found under the read lock (which is then held). */
static struct sim_domain *
sim_domain_shared(struct sim *s, uint32_t domid, uint64_t top)
{
	pthread_rwlock_rdlock(&s->lock);
	for (unsigned i = 0; i < s->nr; i++)
		if (s->doms[i].domid == domid && top < s->doms[i].pages)
			return &s->doms[i];
	pthread_rwlock_unlock(&s->lock);
	/* not mapped yet, or grown since: (re)map under the write lock, then look again */
	pthread_rwlock_wrlock(&s->lock);
	struct sim_domain *d = sim_domain(s, domid, top);
	pthread_rwlock_unlock(&s->lock);
	if (!d)
		return NULL;
	pthread_rwlock_rdlock(&s->lock);
	for (unsigned i = 0; i < s->nr; i++)
		if (s->doms[i].domid == domid)
			return &s->doms[i];
	pthread_rwlock_unlock(&s->lock);
	errno = ENOENT;
	return NULL;
}

static int
sim_copy(struct xport *p, uint32_t domid, struct xport_copy *segs, unsigned n)
{
	struct sim *s = (struct sim *)p;
	uint32_t top = 0;
	for (unsigned i = 0; i < n; i++)
		top = segs[i].ref > top ? segs[i].ref : top;
	struct sim_domain *d = sim_domain_shared(s, domid, top);

	if (!d)
		return -errno;
	for (unsigned i = 0; i < n; i++) {
		struct xport_copy *c = &segs[i];
		if (c->ref >= d->pages) {
			c->status = GNTST_bad_gntref;
			continue;
		}
		if ((unsigned)c->offset + c->len > XEN_PAGE_SIZE) {
			c->status = GNTST_bad_copy_arg;
			continue;
		}
		uint8_t *g = d->mem + (size_t)c->ref * XEN_PAGE_SIZE + c->offset;
		if (c->to_guest)
			memcpy(g, c->buf, c->len);
		else
			memcpy(c->buf, g, c->len);
		c->status = 0;
	}
	pthread_rwlock_unlock(&s->lock);
	return 0;
}

static struct xport_evtchn *
sim_bind(struct xport *p, uint32_t domid, uint32_t remote_port)
{
	struct sim *s = (struct sim *)p;
	char be[4096], fe[4096];
	struct sim_evtchn *e = calloc(1, sizeof(*e));

	if (!e)
		return NULL;
	snprintf(be, sizeof(be), "%s/evt%u.%u.be", s->dir, domid, remote_port);
	snprintf(fe, sizeof(fe), "%s/evt%u.%u.fe", s->dir, domid, remote_port);
	e->rd = open(be, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	/* read-write: a FIFO write end opens even before the reader */
	e->wr = open(fe, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	if (e->rd < 0 || e->wr < 0) {
		int saved = errno;
		if (e->rd >= 0)
			close(e->rd);
		if (e->wr >= 0)
			close(e->wr);
		free(e);
		errno = saved;
		return NULL;
	}
	return (struct xport_evtchn *)e;
}

static void
sim_unbind(struct xport_evtchn *xe)
{
	struct sim_evtchn *e = (struct sim_evtchn *)xe;
	close(e->rd);
	close(e->wr);
	free(e);
}

static int
sim_fd(struct xport_evtchn *xe)
{
	return ((struct sim_evtchn *)xe)->rd;
}

static int
sim_pending(struct xport_evtchn *xe)
{
	struct sim_evtchn *e = (struct sim_evtchn *)xe;
	char buf[256];
	int got = 0;
	ssize_t n;
	while ((n = read(e->rd, buf, sizeof(buf))) > 0)
		got = 1;
	return got;
}

static int
sim_notify(struct xport_evtchn *xe)
{
	struct sim_evtchn *e = (struct sim_evtchn *)xe;
	char c = 1;
	/* a full FIFO already holds a notification: that is enough */
	if (write(e->wr, &c, 1) < 0 && errno != EAGAIN)
		return -errno;
	return 0;
}

static void
sim_free(struct xport *p)
{
	struct sim *s = (struct sim *)p;
	for (unsigned i = 0; i < s->nr; i++) {
		munmap(s->doms[i].mem, s->doms[i].pages * XEN_PAGE_SIZE);
		close(s->doms[i].fd);
	}
	pthread_rwlock_destroy(&s->lock);
	free(s->dir);
	free(s);
}

static const struct xport_ops sim_ops = {
	.name = "simulated",
	.map = sim_map,
	.unmap = sim_unmap,
	.copy = sim_copy,
	.bind = sim_bind,
	.unbind = sim_unbind,
	.fd = sim_fd,
	.pending = sim_pending,
	.notify = sim_notify,
	.free = sim_free,
};

struct xport *
xport_sim_open(const char *dir, char *err, size_t errlen)
{
	struct sim *s = calloc(1, sizeof(*s));
	if (!s || !(s->dir = strdup(dir))) {
		free(s);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	pthread_rwlock_init(&s->lock, NULL);
	s->port.ops = &sim_ops;
	return &s->port;
}
