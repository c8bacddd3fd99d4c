/*
 * blkfront_sim: a guest's blkfront and its hypervisor, for tests and the
 * ring benchmark, against tapdiskd's blkif backend on its simulated port.
 *
 * As the hypervisor of domain D it creates, in the simulation directory,
 * domD.mem (the guest's pages; grant reference R is page R) and a pair of
 * FIFOs per event channel (evtD.P.be towards the backend, .fe back). As
 * the guest it does what Linux's xen-blkfront does on xenstore (waits for
 * InitWait, writes ring-ref[N], event-channel, protocol, queues, goes
 * Initialised, waits for Connected) and drives the rings. Its ABI encoding
 * is written from blkif.h independently of the backend's.
 *
 * usage: blkfront_sim --dir DIR --domid D --devid N --backend PATH MODE [options]
 *   modes:  --verify SECONDS      random I/O, every byte checked
 *           --bench               throughput (--bs, --qd, --rw, --seconds)
 *           --memcpy              no backend: plain memcpy of --bs blocks (the ceiling)
 *           --barrier N           write/barrier/write ordering, N rounds
 *           --malicious CASE      one hostile request (see cases[])
 *           --hold SECONDS        connect, keep QD requests in flight, vanish
 *           --probe               print what the backend advertises, one read, one write
 *   options: --queues Q --order O --proto x86_32|x86_64 --indirect
 *            --persistent (offer feature-persistent; if the backend offers it
 *            too, data and indirect pages come from a pool of grants kept
 *            and reused across requests, as Linux's blkfront does)
 *            --mem-mb M --region-mb R --discard (the disk reads zeros where
 *            discarded) --dump FILE (after --verify: what the region must hold)
 *            --patience S (seconds without a response before failing; default 2)
 *            --gate FILE (once Connected, wait for FILE to exist before the
 *            first request: a test arms something on the backend meanwhile)
 *            --state FILE (--verify: the model lives in FILE, mapped shared, so
 *            that it outlives this process: what the region holds (acknowledged
 *            writes), the data of writes in flight, and which sectors have one.
 *            A new FILE is zeros (the region starts zeroed); an existing one is
 *            the region's content, and the sectors whose write was in flight
 *            when the last guest died are read first and must hold either the
 *            old or the new data: the soak test's guests, killed at random)
 * Prints one JSON line with what happened; exits non-zero on any mismatch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <xenstore.h>

#include "byteorder.h"

#define PAGE 4096u
#define MAX_QUEUES 8
#define MAX_PAGES 16
#define MAX_SEGS 256
#define OP_READ 0
#define OP_WRITE 1
#define OP_BARRIER 2
#define OP_FLUSH 3
#define OP_DISCARD 5
#define OP_INDIRECT 6

static void __attribute__((noreturn, format(printf, 1, 2)))
fail(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "blkfront_sim: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static uint64_t
now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 88172645463325252ull;
static uint64_t
rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* ---- the hypervisor: granted memory ---- */

static struct {
	uint8_t *mem;
	uint32_t pages;
	uint32_t *free;
	uint32_t nfree;
} gnt;

static void
gnt_init(const char *dir, unsigned domid, unsigned mb)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/dom%u.mem", dir, domid);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)mb << 20) < 0)
		fail("%s: %s", path, strerror(errno));
	gnt.pages = (mb << 20) / PAGE;
	gnt.mem = mmap(NULL, (size_t)gnt.pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (gnt.mem == MAP_FAILED)
		fail("mmap: %s", strerror(errno));
	close(fd);
	gnt.free = malloc(gnt.pages * sizeof(*gnt.free));
	/* page 0 stays unused: reference 0 should never be handed out */
	for (uint32_t p = gnt.pages - 1; p >= 1; p--)
		gnt.free[gnt.nfree++] = p;
}

static uint32_t
gnt_get(void)
{
	if (!gnt.nfree)
		fail("out of granted pages");
	return gnt.free[--gnt.nfree];
}

static void
gnt_put(uint32_t ref)
{
	gnt.free[gnt.nfree++] = ref;
}

/*
 * Persistent grants: the refs of data and indirect pages come from a pool
 * that only grows (when every ref in it is in use) and is never given back
 * to the hypervisor, so the backend sees the same refs again and again.
 * Without them, refs come from and go back to the hypervisor's free list.
 */
static int persistent;		/* negotiated */
static struct {
	uint32_t *free;
	uint32_t nfree, total;
} pool;

static uint32_t
data_ref_get(void)
{
	if (!persistent)
		return gnt_get();
	if (pool.nfree)
		return pool.free[--pool.nfree];
	if (!pool.free && !(pool.free = malloc(gnt.pages * sizeof(*pool.free))))
		fail("out of memory");
	pool.total++;
	return gnt_get();
}

static void
data_ref_put(uint32_t ref)
{
	if (persistent)
		pool.free[pool.nfree++] = ref;
	else
		gnt_put(ref);
}

static uint8_t *
page(uint32_t ref)
{
	return gnt.mem + (size_t)ref * PAGE;
}

/* ---- xenstore ---- */

static struct xs_handle *xs;
static char fe[256], be[256];

static char *
xsr(const char *dir, const char *key)
{
	char p[512];
	unsigned len;
	snprintf(p, sizeof(p), "%s/%s", dir, key);
	return xs_read(xs, XBT_NULL, p, &len);
}

static long
xsr_int(const char *dir, const char *key, long dflt)
{
	char *v = xsr(dir, key);
	long r = v ? strtol(v, NULL, 10) : dflt;
	free(v);
	return r;
}

static void
xsw(const char *dir, const char *key, const char *fmt, ...)
{
	char p[512], v[128];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(v, sizeof(v), fmt, ap);
	va_end(ap);
	snprintf(p, sizeof(p), "%s/%s", dir, key);
	if (!xs_write(xs, XBT_NULL, p, v, (unsigned)strlen(v)))
		fail("xenstore write %s: %s", p, strerror(errno));
}

static long
wait_backend(int want, double secs)
{
	uint64_t end = now_ns() + (uint64_t)(secs * 1e9);
	long s = -1;
	while (now_ns() < end) {
		s = xsr_int(be, "state", -1);
		if (s == want)
			return s;
		usleep(2000);
	}
	return s;
}

/* ---- rings ---- */

struct pending {
	int used, op, nsegs, indirect_pages;
	uint64_t sector, sectors;
	uint32_t refs[MAX_SEGS + 8];
	uint8_t first[MAX_SEGS], last[MAX_SEGS];
	uint64_t seq;		/* verify: generation stamp */
};

struct queue {
	uint8_t *sring;
	uint32_t refs[MAX_PAGES];
	unsigned size;
	int to_be, from_be;
	uint32_t req_prod_pvt, rsp_cons;
	struct pending *pend;
	unsigned inflight;
	uint32_t *free_ids;
	unsigned nfree_ids;
};

static int proto64 = 1;			/* x86_64 layout, else x86_32 */
static unsigned nq = 1, order, max_indirect;
static struct queue q[MAX_QUEUES];
static uint64_t disk_sectors;

static size_t req_size(void) { return proto64 ? 112 : 108; }
static size_t rsp_size(void) { return proto64 ? 16 : 12; }
static size_t entry_size(void) { return req_size() > rsp_size() ? req_size() : rsp_size(); }

static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

static volatile uint32_t *
ix(struct queue *qq, int i)
{
	return (volatile uint32_t *)(qq->sring + 4 * i);	/* req_prod, req_event, rsp_prod, rsp_event */
}

static void
queue_setup(const char *dir, unsigned domid, unsigned qi)
{
	struct queue *qq = &q[qi];
	unsigned pages = 1u << order;

	qq->sring = mmap(NULL, (size_t)pages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char path[4096];
	snprintf(path, sizeof(path), "%s/dom%u.mem", dir, domid);
	int fd = open(path, O_RDWR);
	for (unsigned i = 0; i < pages; i++) {
		qq->refs[i] = gnt_get();
		mmap(qq->sring + (size_t)i * PAGE, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
		     fd, (off_t)qq->refs[i] * PAGE);
	}
	close(fd);
	memset(qq->sring, 0, (size_t)pages * PAGE);
	*ix(qq, 1) = 1;	/* req_event */
	*ix(qq, 3) = 1;	/* rsp_event */
	size_t n = ((size_t)pages * PAGE - 64) / entry_size();
	qq->size = 1;
	while (qq->size * 2 <= n)
		qq->size *= 2;
	qq->pend = calloc(qq->size, sizeof(*qq->pend));
	qq->free_ids = calloc(qq->size, sizeof(*qq->free_ids));
	for (unsigned i = 0; i < qq->size; i++)
		qq->free_ids[qq->nfree_ids++] = qq->size - 1 - i;
	/* event channel = 10 + queue */
	unsigned port = 10 + qi;
	char a[4096], b[4096];
	snprintf(a, sizeof(a), "%s/evt%u.%u.be", dir, domid, port);
	snprintf(b, sizeof(b), "%s/evt%u.%u.fe", dir, domid, port);
	unlink(a);
	unlink(b);
	if (mkfifo(a, 0600) < 0 || mkfifo(b, 0600) < 0)
		fail("mkfifo: %s", strerror(errno));
	qq->to_be = open(a, O_RDWR | O_NONBLOCK);
	qq->from_be = open(b, O_RDWR | O_NONBLOCK);
	char qdir[512];
	if (nq == 1)
		snprintf(qdir, sizeof(qdir), "%s", fe);
	else
		snprintf(qdir, sizeof(qdir), "%s/queue-%u", fe, qi);
	for (unsigned i = 0; i < pages; i++) {
		char key[32];
		if (order)
			snprintf(key, sizeof(key), "ring-ref%u", i);
		else
			snprintf(key, sizeof(key), "ring-ref");
		xsw(qdir, key, "%u", qq->refs[i]);
	}
	xsw(qdir, "event-channel", "%u", port);
}

static uint8_t *
req_slot(struct queue *qq)
{
	return qq->sring + 64 + (qq->req_prod_pvt & (qq->size - 1)) * entry_size();
}

static void
kick(struct queue *qq)
{
	uint32_t old = *ix(qq, 0), now = qq->req_prod_pvt;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	*ix(qq, 0) = now;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	uint32_t ev = *ix(qq, 1);
	if ((uint32_t)(now - ev) < (uint32_t)(now - old)) {
		char c = 1;
		if (write(qq->to_be, &c, 1) < 0 && errno != EAGAIN)
			fail("notify: %s", strerror(errno));
	}
}

/* Encodes a read/write/barrier/flush request with direct segments. */
static void
enc_rw(uint8_t *e, int op, unsigned nsegs, uint64_t id, uint64_t sector, const struct pending *p)
{
	memset(e, 0, req_size());
	e[0] = (uint8_t)op;
	e[1] = (uint8_t)nsegs;
	put_le16(e + 2, 0);
	put_le64(e + (proto64 ? 8 : 4), id);
	put_le64(e + (proto64 ? 16 : 12), sector);
	uint8_t *s = e + (proto64 ? 24 : 20);
	for (unsigned i = 0; i < nsegs; i++, s += 8) {
		put_le32(s, p->refs[i]);
		s[4] = p->first[i];
		s[5] = p->last[i];
	}
}

static void
enc_indirect(uint8_t *e, int op, unsigned nsegs, uint64_t id, uint64_t sector, struct pending *p)
{
	unsigned pages = (nsegs + 511) / 512;
	memset(e, 0, req_size());
	e[0] = OP_INDIRECT;
	e[1] = (uint8_t)op;
	put_le16(e + 2, (uint16_t)nsegs);
	put_le64(e + (proto64 ? 8 : 4), id);
	put_le64(e + (proto64 ? 16 : 12), sector);
	for (unsigned i = 0; i < pages; i++) {
		uint32_t ref = data_ref_get();
		p->refs[MAX_SEGS + i] = ref;
		put_le32(e + (proto64 ? 28 : 24) + 4 * i, ref);
		uint8_t *d = page(ref);
		for (unsigned k = i * 512; k < nsegs && k < (i + 1) * 512; k++) {
			uint8_t *s = d + 8 * (k - i * 512);
			memset(s, 0, 8);
			put_le32(s, p->refs[k]);
			s[4] = p->first[k];
			s[5] = p->last[k];
		}
	}
	p->indirect_pages = (int)pages;
}

static void
enc_discard(uint8_t *e, uint64_t id, uint64_t sector, uint64_t nr, int secure)
{
	memset(e, 0, req_size());
	e[0] = OP_DISCARD;
	e[1] = (uint8_t)secure;
	put_le64(e + (proto64 ? 8 : 4), id);
	put_le64(e + (proto64 ? 16 : 12), sector);
	put_le64(e + (proto64 ? 24 : 20), nr);
}

struct response {
	uint64_t id;
	int op, status;
};

/* Takes the responses that are there; returns how many. */
static unsigned
take_responses(struct queue *qq, struct response *out, unsigned max)
{
	unsigned n = 0;
	for (;;) {
		uint32_t prod = *ix(qq, 2);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		while (qq->rsp_cons != prod && n < max) {
			const uint8_t *e = qq->sring + 64 + (qq->rsp_cons & (qq->size - 1)) * entry_size();
			out[n].id = get64(e);
			out[n].op = e[8];
			out[n].status = (int16_t)(e[10] | e[11] << 8);
			n++;
			qq->rsp_cons++;
		}
		if (n == max)
			return n;
		*ix(qq, 3) = qq->rsp_cons + 1;	/* rsp_event: tell me of the next */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (*ix(qq, 2) == qq->rsp_cons)
			return n;
	}
}

/* Waits until some queue has responses (or timeout ms); returns 0 on timeout. */
static int
wait_events(int timeout_ms)
{
	struct pollfd pf[MAX_QUEUES];
	char buf[256];
	for (unsigned i = 0; i < nq; i++) {
		if (*ix(&q[i], 2) != q[i].rsp_cons)
			return 1;
		pf[i].fd = q[i].from_be;
		pf[i].events = POLLIN;
	}
	int r = poll(pf, nq, timeout_ms);
	for (unsigned i = 0; i < nq; i++)
		if (pf[i].revents & POLLIN)
			while (read(q[i].from_be, buf, sizeof(buf)) > 0)
				;
	return r > 0;
}

/* ---- connecting ---- */

static const char *gate_path;	/* --gate: no request before this file exists */
static int want_persistent;	/* --persistent */

static void
connect_frontend(const char *dir, unsigned domid, const char *proto)
{
	if (wait_backend(2, 10) != 2)
		fail("backend never reached InitWait (state %ld)", xsr_int(be, "state", -1));
	long max_order = xsr_int(be, "max-ring-page-order", 0);
	long max_q = xsr_int(be, "multi-queue-max-queues", 1);
	long ind = xsr_int(be, "feature-max-indirect-segments", 0);
	if ((long)order > max_order || (long)nq > max_q)
		fail("backend offers order %ld, %ld queues", max_order, max_q);
	max_indirect = (unsigned)(max_indirect ? (ind < (long)max_indirect ? ind : (long)max_indirect) : 0);
	if (want_persistent)
		xsw(fe, "feature-persistent", "1");	/* blkfront's node, read at connect */
	if (order)
		xsw(fe, "ring-page-order", "%u", order);
	if (nq > 1)
		xsw(fe, "multi-queue-num-queues", "%u", nq);
	for (unsigned i = 0; i < nq; i++)
		queue_setup(dir, domid, i);
	xsw(fe, "protocol", "%s", proto);
	xsw(fe, "state", "3");
	if (wait_backend(4, 10) != 4)
		fail("backend never reached Connected (state %ld)", xsr_int(be, "state", -1));
	char *s = xsr(be, "sectors");
	disk_sectors = s ? strtoull(s, NULL, 10) : 0;
	free(s);
	/* as blkfront: on only if the backend offers it too, known once Connected */
	persistent = want_persistent && xsr_int(be, "feature-persistent", 0) == 1;
	xsw(fe, "state", "4");
	for (int i = 0; gate_path && access(gate_path, F_OK) != 0; i++) {
		if (i == 6000)
			fail("gate %s never opened", gate_path);
		usleep(10000);
	}
}

static void
disconnect_frontend(void)
{
	xsw(fe, "state", "5");
	if (wait_backend(5, 10) != 5)
		fail("backend never reached Closing (state %ld)", xsr_int(be, "state", -1));
	xsw(fe, "state", "6");
	if (wait_backend(6, 10) != 6)
		fail("backend never reached Closed (state %ld)", xsr_int(be, "state", -1));
}

/* ---- requests ---- */

static struct pending *
take_slot(struct queue *qq, uint64_t *id)
{
	if (!qq->nfree_ids)
		fail("no free request slot");
	uint32_t i = qq->free_ids[--qq->nfree_ids];
	struct pending *p = &qq->pend[i];
	memset(p, 0, sizeof(*p));
	p->used = 1;
	*id = i;
	qq->inflight++;
	return p;
}

static void
give_slot(struct queue *qq, uint64_t id)
{
	struct pending *p = &qq->pend[id];
	for (int i = 0; i < p->nsegs; i++)
		data_ref_put(p->refs[i]);
	for (int i = 0; i < p->indirect_pages; i++)
		data_ref_put(p->refs[MAX_SEGS + i]);
	p->used = 0;
	qq->free_ids[qq->nfree_ids++] = (uint32_t)id;
	qq->inflight--;
}

/* Lays a request of `sectors` over segments: random spans when `random_layout`. */
static void
layout(struct pending *p, uint64_t sectors, int random_layout)
{
	p->nsegs = 0;
	while (sectors) {
		unsigned first = random_layout ? (unsigned)(rnd() % 8) : 0;
		unsigned room = 8 - first;
		unsigned n = sectors < room ? (unsigned)sectors : room;
		if (random_layout && n > 1)
			n = 1 + (unsigned)(rnd() % n);
		p->refs[p->nsegs] = data_ref_get();
		p->first[p->nsegs] = (uint8_t)first;
		p->last[p->nsegs] = (uint8_t)(first + n - 1);
		p->nsegs++;
		sectors -= n;
	}
}

/* Copies between a request's segments and a flat buffer. */
static void
seg_copy(struct pending *p, uint8_t *flat, int to_segs)
{
	size_t off = 0;
	for (int i = 0; i < p->nsegs; i++) {
		uint8_t *g = page(p->refs[i]) + p->first[i] * 512u;
		size_t len = (size_t)(p->last[i] - p->first[i] + 1) * 512;
		if (to_segs)
			memcpy(g, flat + off, len);
		else
			memcpy(flat + off, g, len);
		off += len;
	}
}

static void
submit(struct queue *qq, int op, uint64_t id, struct pending *p)
{
	uint8_t *e = req_slot(qq);
	p->op = op;
	if (p->nsegs > 11)
		enc_indirect(e, op, (unsigned)p->nsegs, id, p->sector, p);
	else
		enc_rw(e, op, (unsigned)p->nsegs, id, p->sector, p);
	qq->req_prod_pvt++;
}

/* ---- verify ---- */

/*
 * The model: shadow is what the region holds (acknowledged writes only),
 * pending the data of each write or discard in flight, busy what is in
 * flight per sector (B_READ, or B_WRITE: the sector holds shadow or
 * pending, either is right). With --state all three are one shared mapping
 * of a file, so a guest killed mid-run leaves its model behind.
 */
enum { B_FREE, B_READ, B_WRITE };
static uint8_t *shadow;		/* what the disk's region must hold */
static uint8_t *pending_data;	/* writes in flight: their data */
static uint8_t *busy;		/* sectors with a request in flight */
static uint64_t region;		/* sectors */

static const char *dump_path;
static const char *state_path;
static double patience = 2;	/* seconds without any response before giving up */
static unsigned max_inflight;

static int
range_free(uint64_t s, uint64_t n)
{
	for (uint64_t i = s; i < s + n; i++)
		if (busy[i])
			return 0;
	return 1;
}

static void
model_init(void)
{
	size_t bytes = (size_t)region * 512;
	if (!state_path) {
		shadow = calloc(region, 512);
		pending_data = calloc(region, 512);
		busy = calloc(region, 1);
		if (!shadow || !pending_data || !busy)
			fail("out of memory");
		return;
	}
	size_t want = 2 * bytes + region;
	int fd = open(state_path, O_RDWR | O_CREAT, 0600);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		fail("%s: %s", state_path, strerror(errno));
	if (st.st_size == 0 && ftruncate(fd, (off_t)want) < 0)
		fail("%s: %s", state_path, strerror(errno));
	else if (st.st_size != 0 && (size_t)st.st_size != want)
		fail("%s: %ju bytes, not the %zu of a %ju-sector region", state_path,
		     (uintmax_t)st.st_size, want, (uintmax_t)region);
	uint8_t *m = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		fail("mmap %s: %s", state_path, strerror(errno));
	close(fd);
	shadow = m;
	pending_data = m + bytes;
	busy = m + 2 * bytes;
}

/* One read of up to 8 sectors on queue 0, waited for; returns its status. */
static int
read_sync(uint64_t s, unsigned n, uint8_t *out)
{
	struct queue *qq = &q[0];
	struct response rs[1];
	uint64_t id;
	struct pending *p = take_slot(qq, &id);
	p->sector = s;
	p->sectors = n;
	layout(p, n, 0);
	submit(qq, OP_READ, id, p);
	kick(qq);
	while (!take_responses(qq, rs, 1))
		if (!wait_events((int)(patience * 1000)))
			fail("no response for %.0f s to a read at sector %ju", patience, (uintmax_t)s);
	if (rs[0].id != id)
		fail("response for unknown id %ju", (uintmax_t)rs[0].id);
	if (!rs[0].status)
		seg_copy(p, out, 0);
	give_slot(qq, id);
	return rs[0].status;
}

/*
 * A model left by a guest that died: sectors whose write was in flight hold
 * the old or the new data (per sector: a request is not atomic); read them,
 * keep what is there if it is either, count a mismatch if it is neither.
 */
static uint64_t
model_resolve(uint64_t *resolved)
{
	uint64_t mismatches = 0;
	uint8_t buf[8 * 512];
	for (uint64_t s = 0; s < region; s++) {
		if (busy[s] == B_READ)
			busy[s] = B_FREE;
		if (busy[s] != B_WRITE)
			continue;
		unsigned n = 1;
		while (n < 8 && s + n < region && busy[s + n] == B_WRITE)
			n++;
		if (read_sync(s, n, buf))
			fail("read of in-doubt sectors %ju+%u failed", (uintmax_t)s, n);
		for (unsigned i = 0; i < n; i++) {
			uint8_t *got = buf + i * 512;
			if (!memcmp(got, pending_data + (s + i) * 512, 512))
				memcpy(shadow + (s + i) * 512, got, 512);
			else if (memcmp(got, shadow + (s + i) * 512, 512)) {
				if (mismatches++ < 8)
					fprintf(stderr, "blkfront_sim: in-doubt sector %ju holds neither "
						"its old nor its new data\n", (uintmax_t)(s + i));
			}
			busy[s + i] = B_FREE;
			(*resolved)++;
		}
		s += n - 1;
	}
	return mismatches;
}

static int
run_verify(double secs, int use_discard, unsigned max_sectors)
{
	uint64_t reads = 0, writes = 0, discards = 0, flushes = 0, errors = 0, mismatches = 0, indirect = 0;
	uint64_t resolved = 0;
	uint8_t *flat = malloc((size_t)MAX_SEGS * 8 * 512);
	struct response rs[512];

	model_init();
	mismatches = model_resolve(&resolved);
	uint64_t end = now_ns() + (uint64_t)(secs * 1e9);
	for (;;) {
		int submitted = 0;
		for (unsigned qi = 0; qi < nq && now_ns() < end; qi++) {
			struct queue *qq = &q[qi];
			for (int tries = 0; tries < 64; tries++) {
				uint64_t id;
				if (!qq->nfree_ids)
					break;
				unsigned maxs = max_sectors;
				uint64_t n = 1 + rnd() % maxs;
				uint64_t s = rnd() % (region - n);
				if (!range_free(s, n))
					continue;
				struct pending *p = take_slot(qq, &id);
				p->sector = s;
				p->sectors = n;
				int kind = (int)(rnd() % 10);
				if (kind == 9 && rnd() % 4 == 0) {
					p->nsegs = 0;
					submit(qq, OP_FLUSH, id, p);
					continue;	/* touches no sector */
				} else if (use_discard && kind == 0) {
					/* ram, raw and dynamic VHDs read zeros where discarded */
					memset(pending_data + s * 512, 0, n * 512);
					memset(busy + s, B_WRITE, n);
					enc_discard(req_slot(qq), id, s, n, 0);
					qq->req_prod_pvt++;
					p->op = OP_DISCARD;
				} else {
					layout(p, n, 1);
					if (p->nsegs > 11 && (!max_indirect || (unsigned)p->nsegs > max_indirect)) {
						give_slot(qq, id);
						continue;
					}
					if (kind < 5) {
						for (uint64_t i = 0; i < n * 512; i++)
							flat[i] = (uint8_t)rnd();
						seg_copy(p, flat, 1);
						/* the data first, then the mark that it is in flight */
						memcpy(pending_data + s * 512, flat, n * 512);
						__atomic_thread_fence(__ATOMIC_SEQ_CST);
						memset(busy + s, B_WRITE, n);
						submit(qq, OP_WRITE, id, p);
					} else {
						memset(busy + s, B_READ, n);
						submit(qq, OP_READ, id, p);
					}
					indirect += p->nsegs > 11;
				}
				submitted++;
			}
			kick(qq);
		}
		int any = 0;
		for (unsigned qi = 0; qi < nq; qi++) {
			struct queue *qq = &q[qi];
			unsigned n = take_responses(qq, rs, 512);
			for (unsigned k = 0; k < n; k++) {
				any = 1;
				if (rs[k].id >= qq->size || !qq->pend[rs[k].id].used)
					fail("response for unknown id %ju", (uintmax_t)rs[k].id);
				struct pending *p = &qq->pend[rs[k].id];
				/* blkback answers an indirect request with its inner op */
				if (rs[k].op != p->op)
					fail("response to a request of op %d names op %d", p->op, rs[k].op);
				int wrote = p->op == OP_WRITE || p->op == OP_DISCARD;
				if (rs[k].status != 0) {
					errors++;
				} else if (p->op == OP_READ) {
					seg_copy(p, flat, 0);
					if (memcmp(flat, shadow + p->sector * 512, p->sectors * 512)) {
						if (mismatches < 8)
							fprintf(stderr, "blkfront_sim: read of sectors %ju+%ju "
								"does not match\n", (uintmax_t)p->sector,
								(uintmax_t)p->sectors);
						mismatches++;
					}
					reads++;
				} else if (p->op == OP_DISCARD) {
					discards++;
				} else if (p->op == OP_FLUSH) {
					flushes++;
				} else {
					writes++;
				}
				if (wrote && rs[k].status == 0) {
					memcpy(shadow + p->sector * 512, pending_data + p->sector * 512,
					       p->sectors * 512);
					__atomic_thread_fence(__ATOMIC_SEQ_CST);
				}
				/* a failed write leaves its sectors in doubt (B_WRITE) for good */
				if (p->op != OP_FLUSH && (!wrote || rs[k].status == 0))
					memset(busy + p->sector, B_FREE, p->sectors);
				give_slot(qq, rs[k].id);
			}
		}
		unsigned inflight = 0;
		for (unsigned qi = 0; qi < nq; qi++)
			inflight += q[qi].inflight;
		max_inflight = inflight > max_inflight ? inflight : max_inflight;
		if (now_ns() >= end && !inflight)
			break;
		if (!any && !submitted)
			if (!wait_events((int)(patience * 1000)) && inflight)
				fail("no response for %.0f s with %u requests in flight", patience,
				     inflight);
	}
	printf("{\"reads\": %ju, \"writes\": %ju, \"discards\": %ju, \"flushes\": %ju, "
	       "\"indirect\": %ju, \"errors\": %ju, \"mismatches\": %ju, \"max_inflight\": %u, "
	       "\"persistent\": %d, \"grants\": %u, \"resolved\": %ju}\n",
	       (uintmax_t)reads, (uintmax_t)writes, (uintmax_t)discards, (uintmax_t)flushes,
	       (uintmax_t)indirect, (uintmax_t)errors, (uintmax_t)mismatches, max_inflight,
	       persistent, pool.total, (uintmax_t)resolved);
	if (dump_path) {
		/* what the disk must now hold, for the tests to check with other tools */
		FILE *f = fopen(dump_path, "wb");
		if (!f || fwrite(shadow, 512, region, f) != region || fclose(f))
			fail("cannot write %s", dump_path);
	}
	free(flat);
	return errors || mismatches;
}

/* ---- barrier ordering ---- */

static int
run_barrier(unsigned rounds)
{
	struct queue *qq = &q[0];
	struct response rs[8];
	unsigned violations = 0;

	for (unsigned r = 0; r < rounds; r++) {
		uint64_t s = rnd() % (region - 8);
		uint64_t ids[3];
		struct pending *w1 = take_slot(qq, &ids[0]);
		w1->sector = s;
		w1->sectors = 8;
		layout(w1, 8, 0);
		memset(page(w1->refs[0]), 0x11, PAGE);
		submit(qq, OP_WRITE, ids[0], w1);
		struct pending *bar = take_slot(qq, &ids[1]);
		bar->nsegs = 0;
		submit(qq, OP_BARRIER, ids[1], bar);
		struct pending *w2 = take_slot(qq, &ids[2]);
		w2->sector = s;
		w2->sectors = 8;
		layout(w2, 8, 0);
		memset(page(w2->refs[0]), 0x22, PAGE);
		submit(qq, OP_WRITE, ids[2], w2);
		kick(qq);
		unsigned got = 0;
		uint64_t order_seen[3];
		while (got < 3) {
			unsigned n = take_responses(qq, rs, 8);
			for (unsigned k = 0; k < n; k++) {
				if (rs[k].status)
					fail("barrier round %u: request %ju failed", r, (uintmax_t)rs[k].id);
				order_seen[got++] = rs[k].id;
			}
			if (!n && !wait_events(2000))
				fail("barrier round %u: stuck", r);
		}
		/* the barrier answers after the first write, the second after the barrier */
		if (order_seen[0] != ids[0] || order_seen[1] != ids[1] || order_seen[2] != ids[2])
			violations++;
		for (int i = 0; i < 3; i++)
			give_slot(qq, ids[i]);
		uint64_t id;
		struct pending *rd = take_slot(qq, &id);
		rd->sector = s;
		rd->sectors = 8;
		layout(rd, 8, 0);
		submit(qq, OP_READ, id, rd);
		kick(qq);
		while (!take_responses(qq, rs, 1))
			wait_events(2000);
		if (page(rd->refs[0])[0] != 0x22 || page(rd->refs[0])[PAGE - 1] != 0x22)
			violations++;
		give_slot(qq, id);
	}
	printf("{\"rounds\": %u, \"violations\": %u}\n", rounds, violations);
	return violations != 0;
}

/* ---- benchmark ---- */

/*
 * Keeps qd ring requests in flight for secs. An I/O of bs bytes is one
 * request with indirect descriptors; without them it is split, as Linux's
 * blkfront splits, into requests of at most 11 pages.
 */
static int
run_bench(double secs, unsigned bs, unsigned qd, int write, int seq)
{
	uint64_t done = 0, bytes = 0, errors = 0;
	unsigned sectors = bs / 512;
	unsigned max_part = max_indirect ? sectors : 11 * 8;
	uint64_t pos = 0, cur = 0, left = 0;
	struct response rs[1024];
	uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9);
	unsigned per_q = (qd + nq - 1) / nq;

	if (!sectors || (max_indirect && sectors > max_indirect * 8) || sectors >= region)
		fail("--bs %u: out of range", bs);
	while (now_ns() < end) {
		for (unsigned qi = 0; qi < nq; qi++) {
			struct queue *qq = &q[qi];
			int n = 0;
			/* answers first: their slots go straight back to work */
			unsigned got = take_responses(qq, rs, 1024);
			for (unsigned k = 0; k < got; k++) {
				if (rs[k].status)
					errors++;
				done++;
				bytes += qq->pend[rs[k].id].sectors * 512;
				give_slot(qq, rs[k].id);
			}
			while (qq->inflight < per_q && qq->inflight < qq->size) {
				if (!left) {	/* the next I/O */
					if (seq) {
						cur = pos;
						pos = (pos + sectors) % (region - sectors);
					} else {
						cur = (rnd() % (region / sectors)) * sectors;
					}
					left = sectors;
				}
				unsigned part = left < max_part ? (unsigned)left : max_part;
				uint64_t id = 0;
				struct pending *p = take_slot(qq, &id);
				p->sector = cur;
				p->sectors = part;
				layout(p, part, 0);
				submit(qq, write ? OP_WRITE : OP_READ, id, p);
				cur += part;
				left -= part;
				n++;
			}
			if (n)
				kick(qq);
		}
		wait_events(1);
	}
	double t = (double)(now_ns() - t0) / 1e9;
	printf("{\"requests\": %ju, \"seconds\": %.3f, \"iops\": %.0f, \"gbps\": %.3f, "
	       "\"errors\": %ju, \"persistent\": %d, \"grants\": %u}\n",
	       (uintmax_t)done, t, (double)done / t, (double)bytes / t / 1e9, (uintmax_t)errors,
	       persistent, pool.total);
	return errors != 0;
}

/*
 * The ceiling of a bounce-buffer design: plain memcpy of bs-byte blocks,
 * from a 256 MiB source (bigger than any cache here) to a 64 MiB target.
 */
static int
run_memcpy(double secs, unsigned bs)
{
	size_t src_len = 256u << 20, dst_len = 64u << 20;
	uint8_t *src = malloc(src_len), *dst = malloc(dst_len);
	uint64_t copies = 0, so = 0, dof = 0;

	if (!src || !dst || !bs || bs > dst_len)
		fail("--memcpy: bad size or out of memory");
	memset(src, 0x5a, src_len);
	memset(dst, 0, dst_len);
	uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9);
	while (now_ns() < end) {
		for (int i = 0; i < 64; i++) {
			memcpy(dst + dof, src + so, bs);
			so = so + 2 * bs > src_len ? 0 : so + bs;
			dof = dof + 2 * bs > dst_len ? 0 : dof + bs;
			copies++;
		}
	}
	double t = (double)(now_ns() - t0) / 1e9;
	/* read the target, so that the copies cannot be optimised away */
	unsigned sum = 0;
	for (size_t i = 0; i < dst_len; i += 4096)
		sum += dst[i];
	printf("{\"copies\": %ju, \"seconds\": %.3f, \"per_sec\": %.0f, \"gbps\": %.3f, "
	       "\"check\": %u}\n", (uintmax_t)copies, t, (double)copies / t,
	       (double)copies * bs / t / 1e9, sum);
	free(src);
	free(dst);
	return 0;
}

/* ---- hostile requests ---- */

/* Puts one raw entry on queue 0, waits for its response; returns its status. */
static int
one_raw(void (*fill)(uint8_t *e, uint64_t id, struct pending *p))
{
	struct queue *qq = &q[0];
	struct response rs[4];
	uint64_t id;
	struct pending *p = take_slot(qq, &id);
	fill(req_slot(qq), id, p);
	qq->req_prod_pvt++;
	kick(qq);
	uint64_t end = now_ns() + 3000000000ull;
	while (now_ns() < end) {
		unsigned n = take_responses(qq, rs, 4);
		for (unsigned k = 0; k < n; k++) {
			if (rs[k].id != id)
				fail("response for id %ju, expected %ju", (uintmax_t)rs[k].id, (uintmax_t)id);
			give_slot(qq, id);
			return rs[k].status;
		}
		wait_events(100);
	}
	return 1000;	/* no response */
}

static void f_zero_segs(uint8_t *e, uint64_t id, struct pending *p) { enc_rw(e, OP_READ, 0, id, 0, p); }
static void
f_twelve_segs(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 8, 0);
	enc_rw(e, OP_READ, 1, id, 0, p);
	e[1] = 12;
}
static void
f_first_after_last(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 1, 0);
	p->first[0] = 5;
	p->last[0] = 2;
	enc_rw(e, OP_READ, 1, id, 0, p);
}
static void
f_last_past_page(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 1, 0);
	p->last[0] = 8;
	enc_rw(e, OP_READ, 1, id, 0, p);
}
static void
f_past_end(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 8, 0);
	enc_rw(e, OP_READ, 1, id, disk_sectors - 4, p);
}
static void
f_huge_sector(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 8, 0);
	enc_rw(e, OP_WRITE, 1, id, UINT64_MAX - 3, p);
}
static void
f_bad_gref(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 8, 0);
	data_ref_put(p->refs[0]);
	p->refs[0] = gnt.pages + 1000;	/* never granted */
	p->nsegs = 0;
	struct pending tmp = *p;
	tmp.nsegs = 1;
	enc_rw(e, OP_WRITE, 1, id, 0, &tmp);
}
/* A read whose second page was never granted: under persistent grants it cannot be mapped. */
static void
f_bad_gref_read(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 16, 0);
	data_ref_put(p->refs[1]);
	p->refs[1] = gnt.pages + 3;
	enc_rw(e, OP_READ, 2, id, 0, p);
	p->nsegs = 1;		/* only the first is ours to give back */
}
/*
 * One page named many ways in one request: every data segment is the same
 * ref, which is also the request's indirect descriptor page (read into
 * after it was parsed). Legal, if silly: the backend must serve it.
 */
static void
f_alias_refs(uint8_t *e, uint64_t id, struct pending *p)
{
	uint32_t ref = data_ref_get();
	p->nsegs = 16;
	for (int i = 0; i < p->nsegs; i++) {
		p->refs[i] = ref;
		p->first[i] = (uint8_t)(i % 8);
		p->last[i] = (uint8_t)(i % 8);
	}
	enc_indirect(e, OP_READ, 16, id, 0, p);
	uint32_t desc = p->refs[MAX_SEGS];
	put_le32(page(desc) + 8 * 3, desc);	/* segment 3: the descriptor page itself */
	p->nsegs = 1;		/* ref once; the descriptor page is given back with the request */
}
static void f_unknown_op(uint8_t *e, uint64_t id, struct pending *p) { enc_rw(e, 42, 0, id, 0, p); }
static void
f_indirect_zero(uint8_t *e, uint64_t id, struct pending *p)
{
	(void)p;
	memset(e, 0, req_size());
	e[0] = OP_INDIRECT;
	e[1] = OP_READ;
	put_le64(e + (proto64 ? 8 : 4), id);
}
static void
f_indirect_too_many(uint8_t *e, uint64_t id, struct pending *p)
{
	f_indirect_zero(e, id, p);
	put_le16(e + 2, 4097);
}
static void
f_indirect_bad_op(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 8, 0);
	enc_indirect(e, 7, 1, id, 0, p);
}
static void
f_indirect_bad_page(uint8_t *e, uint64_t id, struct pending *p)
{
	layout(p, 8, 0);
	enc_indirect(e, OP_READ, 1, id, 0, p);
	put_le32(e + (proto64 ? 28 : 24), gnt.pages + 7);
}
static void f_discard_secure(uint8_t *e, uint64_t id, struct pending *p) { (void)p; enc_discard(e, id, 0, 8, 1); }
static void
f_discard_past_end(uint8_t *e, uint64_t id, struct pending *p)
{
	(void)p;
	enc_discard(e, id, disk_sectors - 2, 8, 0);
}

static const struct {
	const char *name;
	void (*fill)(uint8_t *, uint64_t, struct pending *);
	int expect;
} cases[] = {
	{ "zero-segments", f_zero_segs, -1 },
	{ "twelve-segments", f_twelve_segs, -1 },
	{ "first-after-last", f_first_after_last, -1 },
	{ "last-past-page", f_last_past_page, -1 },
	{ "past-end", f_past_end, -1 },
	{ "huge-sector", f_huge_sector, -1 },
	{ "bad-gref", f_bad_gref, -1 },
	{ "bad-gref-read", f_bad_gref_read, -1 },
	{ "alias-refs", f_alias_refs, 0 },
	{ "unknown-op", f_unknown_op, -2 },
	{ "indirect-zero", f_indirect_zero, -1 },
	{ "indirect-too-many", f_indirect_too_many, -1 },
	{ "indirect-bad-op", f_indirect_bad_op, -1 },
	{ "indirect-bad-page", f_indirect_bad_page, -1 },
	{ "discard-secure", f_discard_secure, -2 },
	{ "discard-past-end", f_discard_past_end, -1 },
};

#define FLOOD_REQS 320		/* of 8 pages: 2560 refs each way, past blkback's 1056 */

static struct {
	uint32_t refs[FLOOD_REQS][8];
} flood[2];			/* the writes' pages, the reads' */

/* Issues FLOOD_REQS requests of 8 whole pages on queue 0, at most a ring at a time. */
static unsigned
flood_batch(uint32_t (*refs)[8], int op)
{
	struct queue *qq = &q[0];
	struct response rs[64];
	unsigned failed = 0, sent = 0, got = 0;
	while (got < FLOOD_REQS) {
		while (sent < FLOOD_REQS && qq->inflight < qq->size) {
			uint64_t id;
			struct pending *p = take_slot(qq, &id);
			p->op = op;
			p->nsegs = 8;
			for (unsigned i = 0; i < 8; i++) {
				p->refs[i] = refs[sent][i];
				p->last[i] = 7;
			}
			enc_rw(req_slot(qq), op, 8, id, (uint64_t)sent * 64, p);
			p->nsegs = 0;	/* its refs are never given back: never reused */
			qq->req_prod_pvt++;
			sent++;
		}
		kick(qq);
		unsigned k = take_responses(qq, rs, 64);
		for (unsigned i = 0; i < k; i++) {
			failed += rs[i].status != 0;
			give_slot(qq, rs[i].id);
		}
		got += k;
		if (!k && !wait_events(3000))
			fail("flood: no response");
	}
	return failed;
}

/*
 * More distinct refs than any bound: every request's pages are fresh grants,
 * none ever reused. The backend must keep its table bounded, and every byte
 * must still come back right.
 */
static int
run_flood(void)
{
	unsigned failed = 0, mismatches = 0;

	if ((uint64_t)FLOOD_REQS * 64 > disk_sectors)
		fail("flood: the disk is too small");
	for (unsigned pass = 0; pass < 2; pass++) {
		for (unsigned r = 0; r < FLOOD_REQS; r++) {
			for (unsigned i = 0; i < 8; i++) {
				uint32_t ref = flood[pass].refs[r][i] = gnt_get();
				memset(page(ref), pass ? 0 : (int)((r * 8 + i) % 251 + 1), PAGE);
			}
		}
		failed += flood_batch(flood[pass].refs, pass ? OP_READ : OP_WRITE);
	}
	for (unsigned r = 0; r < FLOOD_REQS; r++)
		for (unsigned i = 0; i < 8; i++)
			mismatches += memcmp(page(flood[0].refs[r][i]), page(flood[1].refs[r][i]),
					     PAGE) != 0;
	printf("{\"case\": \"persistent-flood\", \"refs\": %u, \"failed\": %u, "
	       "\"mismatches\": %u, \"persistent\": %d}\n", 2 * FLOOD_REQS * 8, failed, mismatches,
	       persistent);
	return failed || mismatches;
}

static int
run_malicious(const char *name)
{
	if (!strcmp(name, "producer-ahead")) {
		/* a req_prod more than a ring ahead: the backend must drop the ring */
		struct queue *qq = &q[0];
		qq->req_prod_pvt += qq->size + 5;
		*ix(qq, 0) = qq->req_prod_pvt;
		char c = 1;
		if (write(qq->to_be, &c, 1) < 0)
			fail("notify");
		long s = wait_backend(5, 5);
		if (s != 5)
			s = wait_backend(6, 1);
		printf("{\"case\": \"%s\", \"backend_state\": %ld}\n", name, s);
		return s != 5 && s != 6;
	}
	if (!strcmp(name, "persistent-flood"))
		return run_flood();
	if (!strcmp(name, "garbage")) {
		/* every entry random bytes: each must get some answer, none may hang */
		struct queue *qq = &q[0];
		struct response rs[64];
		unsigned answered = 0, sent = 0;
		for (unsigned round = 0; round < 50; round++) {
			unsigned n = qq->size / 2;
			for (unsigned i = 0; i < n; i++) {
				uint8_t *e = req_slot(qq);
				for (size_t b = 0; b < req_size(); b++)
					e[b] = (uint8_t)rnd();
				if (e[0] == OP_READ || e[0] == OP_WRITE || e[0] == OP_INDIRECT)
					e[1] = (uint8_t)(e[1] % 16);	/* some valid-looking */
				put_le64(e + (proto64 ? 8 : 4), 1000000 + sent);
				qq->req_prod_pvt++;
				sent++;
			}
			kick(qq);
			uint64_t end = now_ns() + 3000000000ull;
			while (answered < sent && now_ns() < end) {
				unsigned k = take_responses(qq, rs, 64);
				answered += k;
				if (!k)
					wait_events(50);
			}
		}
		printf("{\"case\": \"garbage\", \"sent\": %u, \"answered\": %u}\n", sent, answered);
		return answered != sent;
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (strcmp(cases[i].name, name))
			continue;
		int st = one_raw(cases[i].fill);
		/* the ring still serves a good request afterwards */
		struct pending *p;
		uint64_t id;
		struct response rs[2];
		p = take_slot(&q[0], &id);
		p->sector = 0;
		p->sectors = 8;
		layout(p, 8, 0);
		submit(&q[0], OP_READ, id, p);
		kick(&q[0]);
		int good = 0;
		for (int t = 0; t < 30 && !good; t++) {
			if (take_responses(&q[0], rs, 1))
				good = rs[0].status == 0 ? 1 : -1;
			else
				wait_events(100);
		}
		printf("{\"case\": \"%s\", \"status\": %d, \"expected\": %d, \"after\": %d, "
		       "\"persistent\": %d}\n", name, st, cases[i].expect, good, persistent);
		return st != cases[i].expect || good != 1;
	}
	fail("unknown case %s", name);
}

/* ---- probing: what the backend advertises, one read, one write ---- */

static int
one_io(int op)
{
	struct pending *p;
	uint64_t id;
	struct response rs[1];
	p = take_slot(&q[0], &id);
	p->sector = 8;
	p->sectors = 8;
	layout(p, 8, 0);
	submit(&q[0], op, id, p);
	kick(&q[0]);
	for (int t = 0; t < 50; t++) {
		if (take_responses(&q[0], rs, 1)) {
			give_slot(&q[0], id);
			return rs[0].status;
		}
		wait_events(100);
	}
	fail("probe: no answer");
}

static int
run_probe(void)
{
	static const char *keys[] = {
		"sectors", "info", "sector-size", "physical-sector-size", "feature-flush-cache",
		"feature-barrier", "feature-discard", "discard-granularity",
		"feature-max-indirect-segments", "max-ring-page-order", "multi-queue-max-queues",
		"feature-persistent",
	};
	printf("{");
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		printf("\"%s\": %ld, ", keys[i], xsr_int(be, keys[i], -1));
	int r = one_io(OP_READ);
	int w = one_io(OP_WRITE);
	printf("\"read\": %d, \"write\": %d, \"persistent\": %d}\n", r, w, persistent);
	return 0;
}

/* ---- holding requests, then vanishing ---- */

static int
run_hold(double secs, unsigned qd)
{
	struct queue *qq = &q[0];
	unsigned n = 0;
	while (qq->inflight < qd && qq->inflight < qq->size) {
		uint64_t id;
		struct pending *p = take_slot(qq, &id);
		p->sector = (rnd() % (region / 8)) * 8;
		p->sectors = 8;
		layout(p, 8, 0);
		submit(qq, rnd() & 1 ? OP_WRITE : OP_READ, id, p);
		n++;
	}
	kick(qq);
	usleep((useconds_t)(secs * 1e6));
	printf("{\"submitted\": %u, \"persistent\": %d, \"grants\": %u}\n", n, persistent,
	       pool.total);
	return 0;	/* exit without answering anything: the guest is gone */
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "dir", 1, 0, 'D' }, { "domid", 1, 0, 'd' }, { "devid", 1, 0, 'v' },
		{ "backend", 1, 0, 'b' }, { "verify", 1, 0, 'V' }, { "bench", 0, 0, 'B' },
		{ "barrier", 1, 0, 'R' }, { "malicious", 1, 0, 'M' }, { "hold", 1, 0, 'H' },
		{ "queues", 1, 0, 'q' }, { "order", 1, 0, 'o' }, { "proto", 1, 0, 'p' },
		{ "indirect", 0, 0, 'i' }, { "mem-mb", 1, 0, 'm' }, { "region-mb", 1, 0, 'r' },
		{ "discard", 0, 0, 'x' }, { "bs", 1, 0, 's' }, { "qd", 1, 0, 'Q' },
		{ "rw", 1, 0, 'w' }, { "seconds", 1, 0, 'S' }, { "seed", 1, 0, 'e' },
		{ "max-sectors", 1, 0, 'X' }, { "probe", 0, 0, 'P' },
		{ "dump", 1, 0, 'U' }, { "memcpy", 0, 0, 'C' },
		{ "patience", 1, 0, 'T' }, { "gate", 1, 0, 'G' }, { "persistent", 0, 0, 'K' },
		{ "state", 1, 0, 'Y' },
		{ 0, 0, 0, 0 },
	};
	const char *dir = NULL, *bpath = NULL, *proto = "x86_64-abi", *mal = NULL, *rw = "randread";
	unsigned domid = 1, devid = 51712, mem_mb = 64, region_mb = 16, bs = 4096, qd = 32;
	unsigned barrier = 0, max_sectors = 64;
	double verify = 0, hold = 0, secs = 5;
	int bench = 0, discard = 0, probe = 0, copy = 0, c;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'D': dir = optarg; break;
		case 'd': domid = (unsigned)atoi(optarg); break;
		case 'v': devid = (unsigned)atoi(optarg); break;
		case 'b': bpath = optarg; break;
		case 'V': verify = atof(optarg); break;
		case 'B': bench = 1; break;
		case 'R': barrier = (unsigned)atoi(optarg); break;
		case 'M': mal = optarg; break;
		case 'H': hold = atof(optarg); break;
		case 'q': nq = (unsigned)atoi(optarg); break;
		case 'o': order = (unsigned)atoi(optarg); break;
		case 'p': proto = !strcmp(optarg, "x86_32") ? "x86_32-abi" : "x86_64-abi"; break;
		case 'i': max_indirect = MAX_SEGS; break;
		case 'm': mem_mb = (unsigned)atoi(optarg); break;
		case 'r': region_mb = (unsigned)atoi(optarg); break;
		case 'x': discard = 1; break;
		case 's': bs = (unsigned)atoi(optarg); break;
		case 'Q': qd = (unsigned)atoi(optarg); break;
		case 'w': rw = optarg; break;
		case 'S': secs = atof(optarg); break;
		case 'e': rng_state = strtoull(optarg, NULL, 10) | 1; break;
		case 'X': max_sectors = (unsigned)atoi(optarg); break;
		case 'P': probe = 1; break;
		case 'U': dump_path = optarg; break;
		case 'C': copy = 1; break;
		case 'T': patience = atof(optarg); break;
		case 'G': gate_path = optarg; break;
		case 'K': want_persistent = 1; break;
		case 'Y': state_path = optarg; break;
		default: fail("bad option");
		}
	}
	if (copy)
		return run_memcpy(secs, bs);
	if (!dir || !bpath || nq < 1 || nq > MAX_QUEUES || order > 4)
		fail("usage: see the header of blkfront_sim.c");
	/* a random layout may give every sector a segment of its own */
	if (max_sectors < 1 || max_sectors > MAX_SEGS)
		fail("--max-sectors must be 1 to %u", MAX_SEGS);
	proto64 = strcmp(proto, "x86_32-abi") != 0;
	snprintf(be, sizeof(be), "%s", bpath);
	snprintf(fe, sizeof(fe), "/local/domain/%u/device/vbd/%u", domid, devid);
	xs = xs_open(0);
	if (!xs)
		fail("xs_open: %s", strerror(errno));
	gnt_init(dir, domid, mem_mb);
	xsw(fe, "backend", "%s", be);
	xsw(fe, "backend-id", "0");
	xsw(fe, "state", "1");
	connect_frontend(dir, domid, proto);
	region = (uint64_t)region_mb << 11;
	if (region > disk_sectors)
		region = disk_sectors;
	int rc;
	if (verify > 0)
		rc = run_verify(verify, discard, max_sectors);
	else if (bench)
		rc = run_bench(secs, bs, qd, strstr(rw, "write") != NULL, strncmp(rw, "rand", 4) != 0);
	else if (barrier)
		rc = run_barrier(barrier);
	else if (mal)
		rc = run_malicious(mal);
	else if (hold > 0)
		return run_hold(hold, qd);
	else if (probe)
		rc = run_probe();
	else
		rc = 0;
	if (!mal || strcmp(mal, "producer-ahead"))
		disconnect_frontend();
	xs_close(xs);
	return rc;
}
