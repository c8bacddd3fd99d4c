/*
 * libFuzzer target: one blkif ring (server/xen/ring.c) on a guest whose
 * whole memory comes from the input, through the simulated hypervisor the
 * blkif tests run on (server/xen/port_sim.c: the guest's memory is a file,
 * grant reference R its page R, grant copies and ring maps are the port's
 * own; event channels are FIFOs), against a ram vbd. Minor 0 is ram:1M
 * read-write, minor 1 ram:1M read-only. The simulation directory is made on
 * tmpfs at start and removed at exit; the harness only watches the port's
 * calls on their way through (what a copy wrote, whether the channel is
 * bound).
 *
 * Input layout:
 *   byte 0  mode
 *     0x01  x86_32 layout (else x86_64)
 *     0x06  ring order (mode >> 1) & 3: 1, 2, 4 or 8 pages
 *     0x08  the read-only vbd
 *     0x10  disconnect the ring while its requests are in flight
 *     0x20  req_prod comes from the next 4 bytes (else: the entry count)
 *     0x40  a second batch: the guest answers nothing and sends the same
 *           entries again (indices run on past the first batch)
 *   byte 1  entry count N
 *   [4]     req_prod (mode 0x20), little-endian
 *   N entries of the layout's request size, placed from slot 0 on
 *   rest    guest pages from page 8 on (indirect descriptors, data)
 *
 * Checks: every request consumed gets exactly one response, with its id and
 * op, and a status of OKAY, ERROR or EOPNOTSUPP; the ring is dropped only
 * when the guest's index runs ahead; nothing is left in flight in the vbd
 * afterwards; ASan and UBSan see every access. (A guest that reads disk data
 * into its own ring pages rewrites its indices and entries: then only the
 * last two checks hold.)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "blkif_abi.h"
#include "fuzz_common.h"
#include "fuzz_server.h"
#include "port.h"
#include "ring.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define M_X86_32	0x01
#define M_ORDER(m)	(((m) >> 1) & 3)
#define M_READONLY	0x08
#define M_DISCONNECT	0x10
#define M_RAW_PROD	0x20
#define M_TWICE		0x40

#define GUEST_PAGES	64
#define DATA_PAGE	8	/* first page after the largest ring we make */

#define NR_VBDS 2
static const char *const vbd_params[NR_VBDS] = { "ram:1M", "ram:1M" };
static const unsigned vbd_flags[NR_VBDS] = { 0, VBD_OPEN_READONLY };

static struct server *srv;
static char state_dir[] = "/tmp/tapdiskd-fuzz-blkif-XXXXXX";
static uint8_t *guest;		/* GUEST_PAGES pages: domain 7's memory file, mapped */

/* ---- the port: port_sim.c, watched ---- */

#define DOMID		7
#define EVTCHN		3

static struct xport *sim;	/* the real simulated port */
static char sim_dir[64];
static int kick_fd = -1;	/* the guest's end of the backend's channel FIFO */
static int notify_fd = -1;	/* the guest's end of ours: drained, not counted */
static unsigned ring_pages;	/* refs below this are the ring's own pages */
static int clobbered;		/* a read landed on the ring: its contents are the disk's */
static int bound;		/* the ring's event channel, between bind and unbind */

static void *
w_map(struct xport *p, uint32_t domid, const uint32_t *refs, unsigned n)
{
	(void)p;
	return sim->ops->map(sim, domid, refs, n);
}

static void
w_unmap(struct xport *p, uint32_t domid, void *addr, unsigned n)
{
	(void)p;
	sim->ops->unmap(sim, domid, addr, n);
}

static int
w_copy(struct xport *p, uint32_t domid, struct xport_copy *segs, unsigned n)
{
	(void)p;
	int rc = sim->ops->copy(sim, domid, segs, n);
	/* a guest may grant its ring page as a buffer */
	for (unsigned i = 0; rc == 0 && i < n; i++)
		if (segs[i].to_guest && !segs[i].status && segs[i].ref < ring_pages)
			clobbered = 1;
	return rc;
}

static struct xport_evtchn *
w_bind(struct xport *p, uint32_t domid, uint32_t port)
{
	(void)p;
	struct xport_evtchn *e = sim->ops->bind(sim, domid, port);
	bound += e != NULL;
	return e;
}

static void
w_unbind(struct xport_evtchn *e)
{
	bound--;
	sim->ops->unbind(e);
}

static int
w_fd(struct xport_evtchn *e)
{
	return sim->ops->fd(e);
}

static int
w_pending(struct xport_evtchn *e)
{
	return sim->ops->pending(e);
}

static int
w_notify(struct xport_evtchn *e)
{
	return sim->ops->notify(e);
}

static const struct xport_ops watch_ops = {
	.name = "fuzz (simulated)", .map = w_map, .unmap = w_unmap, .copy = w_copy,
	.bind = w_bind, .unbind = w_unbind, .fd = w_fd, .pending = w_pending,
	.notify = w_notify,
};
static struct xport watch_port = { &watch_ops };

static void
sim_path(char *buf, size_t len, const char *name)
{
	snprintf(buf, len, "%s/%s", sim_dir, name);
}

static void
sim_remove(void)
{
	static const char *const names[] = { "dom7.mem", "evt7.3.be", "evt7.3.fe" };
	char path[128];

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		sim_path(path, sizeof(path), names[i]);
		unlink(path);
	}
	rmdir(sim_dir);
}

/* Domain 7 as blkfront_sim makes it: its memory file and event channel 3's FIFOs. */
static void
sim_setup(void)
{
	char path[128];

	snprintf(sim_dir, sizeof(sim_dir), "/dev/shm/tapdiskd-fuzz-blkif-XXXXXX");
	if (!mkdtemp(sim_dir)) {
		snprintf(sim_dir, sizeof(sim_dir), "/tmp/tapdiskd-fuzz-blkif-XXXXXX");
		if (!mkdtemp(sim_dir))
			fz_fail("mkdtemp: %s", strerror(errno));
	}
	atexit(sim_remove);
	sim_path(path, sizeof(path), "dom7.mem");
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)GUEST_PAGES * XEN_PAGE_SIZE) < 0)
		fz_fail("%s: %s", path, strerror(errno));
	guest = mmap(NULL, (size_t)GUEST_PAGES * XEN_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
		     fd, 0);
	close(fd);
	if (guest == MAP_FAILED)
		fz_fail("mmap: %s", strerror(errno));
	sim_path(path, sizeof(path), "evt7.3.be");
	if (mkfifo(path, 0600) < 0 || (kick_fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)) < 0)
		fz_fail("%s: %s", path, strerror(errno));
	sim_path(path, sizeof(path), "evt7.3.fe");
	if (mkfifo(path, 0600) < 0 ||
	    (notify_fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)) < 0)
		fz_fail("%s: %s", path, strerror(errno));
	char err[256];
	if (!(sim = xport_sim_open(sim_dir, err, sizeof(err))))
		fz_fail("xport_sim_open: %s", err);
	/*
	 * One map of our own, never undone, keeps the simulator's mapping of
	 * the guest's memory file: else it dropped and remade it with every
	 * ring (open, mmap, page faults on every copy, munmap: a third of an
	 * input). The rings' own maps and unmaps still go through it per input.
	 */
	static const uint32_t page0 = 0;
	if (!sim->ops->map(sim, DOMID, &page0, 1))
		fz_fail("mapping the guest's first page: %s", strerror(errno));
}

/* Empties a channel FIFO: nothing from one input reaches the next. */
static void
fifo_drain(int fd)
{
	char buf[256];
	while (read(fd, buf, sizeof(buf)) > 0)
		;
}

/* ---- the guest's side of the ring, written from blkif.h ---- */

static uint32_t
rd32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t
rd64(const uint8_t *p)
{
	return rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

struct want {
	uint64_t id;
	uint8_t op;
	unsigned taken;		/* first of its (id, op) run: how many of the run are answered */
};

static int
want_cmp(const void *a, const void *b)
{
	const struct want *x = a, *y = b;
	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	return (x->op > y->op) - (x->op < y->op);
}

/* The first want of (id, op) in the sorted array, or nw. */
static unsigned
want_find(const struct want *w, unsigned nw, uint64_t id, uint8_t op)
{
	const struct want key = { id, op, 0 };
	unsigned lo = 0, hi = nw;
	while (lo < hi) {
		unsigned mid = lo + (hi - lo) / 2;
		if (want_cmp(&w[mid], &key) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < nw && !want_cmp(&w[lo], &key) ? lo : nw;
}

static struct blkif_ring *ring;	/* connected, not yet disconnected */
static int ring_died;

/* As xenbus does: a broken ring is disconnected at once. */
static void
ring_dead(void *arg)
{
	(void)arg;
	ring_died = 1;
	blkif_ring_disconnect(ring);
	ring = NULL;
}

static void
kick(void)
{
	char one = 1;
	if (!bound || write(kick_fd, &one, 1) != 1)
		fz_fail("kick: %s", bound ? strerror(errno) : "no event channel bound");
	event_base_loop(srv->base, EVLOOP_NONBLOCK);	/* the loop sees the fd */
}

static void
store_idx(int which, uint32_t v)
{
	__atomic_store_n((uint32_t *)(guest + 4 * which), v, __ATOMIC_RELEASE);
}

static uint32_t
load_idx(int which)
{
	return __atomic_load_n((uint32_t *)(guest + 4 * which), __ATOMIC_ACQUIRE);
}

enum { REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT };

/*
 * Matches the responses in slots [from, to) against the requests the
 * backend consumed (w, sorted): each request answered once, with its id
 * and op. Requests alike are interchangeable, so a run of them only counts
 * its answers (a ring of zero entries is hundreds of alike requests: a
 * search per response was quadratic). (Both layouts put id at 0, op at 8,
 * status at 10 in a response.)
 */
static void
check_responses(uint32_t from, uint32_t to, unsigned size, size_t entry, struct want *w,
		unsigned nw)
{
	for (uint32_t i = from; i != to; i++) {
		const uint8_t *e = guest + BLKIF_RING_HEADER + (i & (size - 1)) * entry;
		uint64_t id = rd64(e);
		uint8_t op = e[8];
		int16_t st = (int16_t)(e[10] | e[11] << 8);
		if (st != BLKIF_RSP_OKAY && st != BLKIF_RSP_ERROR && st != BLKIF_RSP_EOPNOTSUPP)
			fz_fail("response %u: status %d", i, st);
		unsigned k = want_find(w, nw, id, op);
		if (k == nw || k + w[k].taken >= nw || want_cmp(&w[k + w[k].taken], &w[k]))
			fz_fail("response %u: id %ju op %u answers no outstanding request", i,
				(uintmax_t)id, op);
		w[k].taken++;
	}
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	srv = fz_server_setup("fuzz_blkif", state_dir, vbd_params, vbd_flags, NR_VBDS);
	sim_setup();
	return 0;
}

/* One batch: entries[0..n) go into slots base.., req_prod moves to base + count. */
static void
send_batch(const uint8_t *entries, unsigned n, uint32_t base, uint32_t count, unsigned size,
	   size_t entry, int proto, struct want *w, unsigned *nw)
{
	size_t id_off = proto == BLKIF_PROTO_X86_32 ? 4 : 8;
	for (uint32_t i = 0; i < count && i < size; i++) {
		uint8_t *slot = guest + BLKIF_RING_HEADER + ((base + i) & (size - 1)) * entry;
		if (i < n)
			memcpy(slot, entries + i * entry, entry);
		else
			memset(slot, 0, entry);	/* a zero entry: a READ of no segments */
		w[*nw].id = rd64(slot + id_off);
		/* an indirect request is answered with its inner op, as blkback does */
		w[*nw].op = slot[0] == BLKIF_OP_INDIRECT ? slot[1] : slot[0];
		w[*nw].taken = 0;
		(*nw)++;
	}
	qsort(w, *nw, sizeof(*w), want_cmp);
	store_idx(REQ_PROD, base + count);
	kick();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[256];

	if (size < 2)
		return 0;
	uint8_t mode = data[0];
	unsigned n = data[1];
	int proto = mode & M_X86_32 ? BLKIF_PROTO_X86_32 : BLKIF_PROTO_X86_64;
	unsigned pages = 1u << M_ORDER(mode);
	size_t entry = blkif_entry_size(proto);
	unsigned rsize = blkif_ring_entries(proto, pages);
	size_t off = 2;
	uint32_t count = n;

	if (mode & M_RAW_PROD) {
		if (size < off + 4)
			return 0;
		count = rd32(data + off);
		off += 4;
	}
	unsigned have = (unsigned)((size - off) / entry);
	if (n > have)
		n = have;
	const uint8_t *entries = data + off;
	off += (size_t)n * entry;
	memset(guest, 0, (size_t)GUEST_PAGES * XEN_PAGE_SIZE);
	if (off < size) {
		size_t left = size - off, room = (size_t)(GUEST_PAGES - DATA_PAGE) * XEN_PAGE_SIZE;
		memcpy(guest + (size_t)DATA_PAGE * XEN_PAGE_SIZE, data + off,
		       left < room ? left : room);
	}
	store_idx(RSP_EVENT, 1);	/* the guest wants to hear of responses */

	fifo_drain(kick_fd);
	fifo_drain(notify_fd);
	struct blkif_ring_cfg cfg = { .domid = DOMID, .nr_pages = pages, .evtchn = EVTCHN,
				      .proto = proto, .index = 0 };
	for (unsigned i = 0; i < pages; i++)
		cfg.refs[i] = i;
	struct vbd *vbd = srv->minors[mode & M_READONLY ? 1 : 0];
	ring_died = 0;
	clobbered = 0;
	ring_pages = pages;
	ring = blkif_ring_connect(&watch_port, vbd, &cfg, ring_dead, NULL, err, sizeof(err));
	if (!ring)
		fz_fail("blkif_ring_connect: %s", err);

	/* two batches of the largest ring (8 pages) at most; kept, not allocated per input */
	static struct want w[2 * 512];
	unsigned nw = 0;
	if (2 * rsize > sizeof(w) / sizeof(w[0]))
		fz_fail("a %u-entry ring: the harness keeps room for 512", rsize);
	send_batch(entries, n, 0, count, rsize, entry, proto, w, &nw);
	if ((mode & M_DISCONNECT) && ring) {
		event_base_loop(srv->base, EVLOOP_NONBLOCK);	/* requests now in flight */
		blkif_ring_disconnect(ring);
		ring = NULL;
	}
	fz_settle(srv->base);
	uint32_t rsp = load_idx(RSP_PROD);
	int ahead = count > rsize;
	if (ahead && !ring_died && !(mode & M_DISCONNECT))
		fz_fail("req_prod %u ahead of a %u-entry ring, and the ring lives on", count, rsize);
	if (!clobbered) {
		if (!ahead && ring_died)
			fz_fail("the ring was dropped for %u requests on a %u-entry ring", count,
				rsize);
		if (!ring_died && !(mode & M_DISCONNECT) && rsp != count)
			fz_fail("%u requests, %u responses", count, rsp);
		check_responses(0, rsp, rsize, entry, w, nw);
	}

	if (ring && !clobbered && (mode & M_TWICE)) {
		/* the guest takes its answers and sends the same again */
		uint32_t base = rsp;
		nw = 0;
		memset(w, 0, 2 * (size_t)rsize * sizeof(w[0]));
		send_batch(entries, n, base, count, rsize, entry, proto, w, &nw);
		fz_settle(srv->base);
		uint32_t rsp2 = load_idx(RSP_PROD);
		if (!clobbered) {
			if (ring_died || rsp2 != base + count)
				fz_fail("second batch: %u requests, %u responses", count, rsp2 - base);
			check_responses(base, rsp2, rsize, entry, w, nw);
		}
	}
	if (ring) {
		blkif_ring_disconnect(ring);
		ring = NULL;
	}
	fz_settle(srv->base);
	for (int m = 0; m < NR_VBDS; m++)
		if (srv->minors[m]->nr_inflight)
			fz_fail("minor %d: %u requests still in flight", m, srv->minors[m]->nr_inflight);
	if (bound)
		fz_fail("the event channel is still bound");
	return 0;
}
