/*
 * libFuzzer target: one NBD connection, handshake and transmission, against
 * two ram disks (minor 0: ram:4M read-write, minor 1: ram:1M read-only), with
 * the input as everything the client sends.
 *
 * Input layout:
 *   byte 0  mode
 *     0x01  serve by export name (nbd_serve(..., NULL)); else a per-vbd socket
 *     0x06  canned start, (mode >> 1) & 3:
 *             0  none: the input starts with the client flags
 *             1  flags, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation,
 *                GO asking for name, description and block size
 *             2  flags, EXPORT_NAME (oldest way in)
 *             3  flags, GO without structured replies
 *     0x08  NO_ZEROES in the canned client flags
 *     0x10  deliver the input in chunks of byte 1 + 1 bytes
 *     0x20  slow reader: leave the server's replies unread until the end
 *     0x40  export minor 1 (read-only) instead of minor 0
 *     0x80  both vbds are paused while the input arrives
 *   byte 1  chunk size - 1
 *   byte 2  events
 *     0x01  hang up right after sending (requests may still be in flight)
 *     0x02  close the exported vbd right after the input arrives (as
 *           tap-ctl close would), then reopen it for the next input
 *     0x04  ... with force (in-flight I/O turns the vbd into a zombie)
 *     0x08  canned starts only: first an unknown option with a payload over
 *           the 64 KiB limit, which the server must skip
 *   rest    the client's bytes
 *
 * After the input, the harness drains the replies, half-closes, and demands
 * that the connection is gone, no request is left in flight anywhere and the
 * vbds are back in their initial state. The ram disk is wiped between inputs.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "bufpool.h"
#include "fuzz_common.h"
#include "io.h"
#include "log.h"
#include "nbd.h"
#include "nbd_proto.h"
#include "server.h"
#include "vbd.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define M_BYNAME	0x01
#define M_PREFIX(m)	(((m) >> 1) & 3)
#define M_NOZEROES	0x08
#define M_CHUNKED	0x10
#define M_HOLD		0x20
#define M_READONLY	0x40
#define M_PAUSED	0x80

#define E_EARLY_EOF	0x01
#define E_CLOSE		0x02
#define E_FORCE		0x04
#define E_BIG_OPTION	0x08

#define BIG_OPTION_LEN	(NBD_MAX_OPTION_LEN + 1)

enum { PREFIX_RAW, PREFIX_GO_STRUCTURED, PREFIX_EXPORT_NAME, PREFIX_GO_PLAIN };

#define NR_VBDS 2
static const char *const vbd_params[NR_VBDS] = { "ram:4M", "ram:1M" };
static const unsigned vbd_flags[NR_VBDS] = { 0, VBD_OPEN_READONLY };

static struct server srv;
static char state_dir[] = "/tmp/tapdiskd-fuzz-nbd-XXXXXX";
static int state_dir_made;

/* ---- setup ---- */

static void
cleanup(void)
{
	if (state_dir_made)
		rmdir(state_dir);
}

struct wait {
	int done, err;
	char msg[256];
};

static void
wait_done(void *arg, int err, const char *msg)
{
	struct wait *w = arg;
	w->done = 1;
	w->err = err;
	snprintf(w->msg, sizeof(w->msg), "%s", msg ? msg : "");
}

static void
setup(void)
{
	char err[256];

	log_init("fuzz_nbd", 0, LOG_LVL_ERR);
	signal(SIGPIPE, SIG_IGN);
	if (!mkdtemp(state_dir))
		fz_fail("mkdtemp: %s", strerror(errno));
	state_dir_made = 1;
	atexit(cleanup);

	srv.base = event_base_new();
	if (!srv.base)
		fz_fail("event_base_new failed");
	srv.io = io_engine_new(srv.base, "threads", err, sizeof(err));
	if (!srv.io)
		fz_fail("io_engine_new: %s", err);
	srv.pool = bufpool_new(8u << 20);
	srv.state_dir = state_dir;
	srv.pid = getpid();
	srv.minors = calloc(SERVER_MAX_MINORS, sizeof(*srv.minors));
	srv.started = time(NULL);
	srv.nbd = nbd_server_new(&srv);
	if (!srv.pool || !srv.minors || !srv.nbd)
		fz_fail("out of memory");

	/* vbd_open, not server_open_vbd: no socket in the state directory */
	for (int m = 0; m < NR_VBDS; m++) {
		struct wait w = { 0 };
		int rc = vbd_open(&srv, m, vbd_params[m], vbd_flags[m], wait_done, &w);
		if (rc < 0)
			fz_fail("vbd_open %s: %s", vbd_params[m], strerror(-rc));
		while (!w.done)
			event_base_loop(srv.base, EVLOOP_ONCE);
		if (w.err)
			fz_fail("vbd_open %s: %s", vbd_params[m], w.msg);
	}
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	/* canned GO, then one read: warms up what libevent allocates once */
	static const uint8_t warm[3 + NBD_REQUEST_LEN] = {
		0x02, 0, 0, 0x25, 0x60, 0x95, 0x13, [3 + 27] = 0x10,
	};
	(void)argc;
	(void)argv;
	setup();
	LLVMFuzzerTestOneInput(warm, sizeof(warm));
	return 0;
}

/* ---- canned handshakes ---- */

struct buf {
	uint8_t *p;
	size_t len, cap;
};

static void
buf_put(struct buf *b, const void *data, size_t len)
{
	if (b->len + len > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + len)
			cap *= 2;
		uint8_t *p = realloc(b->p, cap);
		if (!p)
			fz_fail("out of memory");
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, len);
	b->len += len;
}

static void
put32(struct buf *b, uint32_t v)
{
	uint8_t x[4];
	wr32(x, v);
	buf_put(b, x, 4);
}

static void
put16(struct buf *b, uint16_t v)
{
	uint8_t x[2];
	wr16(x, v);
	buf_put(b, x, 2);
}

static void
put_opt(struct buf *b, uint32_t opt, uint32_t len)
{
	uint8_t x[8];
	wr64(x, NBD_IHAVEOPT);
	buf_put(b, x, 8);
	put32(b, opt);
	put32(b, len);
}

static void
put_string(struct buf *b, const char *s)
{
	put32(b, (uint32_t)strlen(s));
	buf_put(b, s, strlen(s));
}

static void
put_go(struct buf *b, const char *name, int infos)
{
	uint32_t n = (uint32_t)strlen(name);
	put_opt(b, NBD_OPT_GO, 4 + n + 2 + (infos ? 6 : 0));
	put_string(b, name);
	put16(b, infos ? 3 : 0);
	if (infos) {
		put16(b, NBD_INFO_NAME);
		put16(b, NBD_INFO_DESCRIPTION);
		put16(b, NBD_INFO_BLOCK_SIZE);
	}
}

static void
build_prefix(struct buf *b, uint8_t mode, uint8_t events, const char *name)
{
	int kind = M_PREFIX(mode);

	if (kind == PREFIX_RAW)
		return;
	put32(b, NBD_FLAG_C_FIXED_NEWSTYLE | ((mode & M_NOZEROES) ? NBD_FLAG_C_NO_ZEROES : 0));
	if (events & E_BIG_OPTION) {
		static const uint8_t zeros[BIG_OPTION_LEN];
		put_opt(b, 0x7f, BIG_OPTION_LEN);
		buf_put(b, zeros, sizeof(zeros));
	}
	switch (kind) {
	case PREFIX_GO_STRUCTURED:
		put_opt(b, NBD_OPT_STRUCTURED_REPLY, 0);
		put_opt(b, NBD_OPT_SET_META_CONTEXT,
			(uint32_t)(4 + strlen(name) + 4 + 4 + strlen(NBD_META_BASE_ALLOCATION)));
		put_string(b, name);
		put32(b, 1);
		put_string(b, NBD_META_BASE_ALLOCATION);
		put_go(b, name, 1);
		break;
	case PREFIX_EXPORT_NAME:
		put_opt(b, NBD_OPT_EXPORT_NAME, (uint32_t)strlen(name));
		buf_put(b, name, strlen(name));
		break;
	case PREFIX_GO_PLAIN:
		put_go(b, name, 0);
		break;
	}
}

/* ---- per input ---- */

static void
set_paused(int paused)
{
	for (int m = 0; m < NR_VBDS; m++) {
		struct wait w = { 0 };
		if (paused)
			vbd_pause(srv.minors[m], wait_done, &w);
		else if (srv.minors[m]->state & VBD_PAUSED)
			vbd_unpause(srv.minors[m], NULL, wait_done, &w);
		else
			continue;	/* closed and reopened meanwhile */
		fz_settle(srv.base);
		if (!w.done || w.err)
			fz_fail("%s minor %d: %s", paused ? "pause" : "unpause", m,
				w.done ? w.msg : "no answer");
	}
}

static int wipe_done;

static void
wipe_complete(struct vbd_request *vr, int err)
{
	(void)vr;
	if (err)
		fz_fail("wiping the ram disk failed: %s", strerror(err));
	wipe_done = 1;
}

/* Gives the writable ram disk back its initial contents: all holes. */
static void
wipe_disk(void)
{
	static struct vbd_request vr;
	struct vbd *vbd = srv.minors[0];

	memset(&vr, 0, sizeof(vr));
	vr.td.op = TD_OP_DISCARD;
	vr.td.offset = 0;
	vr.td.length = vbd->size;
	vr.complete = wipe_complete;
	wipe_done = 0;
	vbd_submit(vbd, &vr);
	fz_settle(srv.base);
	if (!wipe_done)
		fz_fail("the wipe request never completed");
}

static void
check_idle(void)
{
	unsigned n = nbd_connection_count(srv.nbd);
	if (n)
		fz_fail("%u NBD connection(s) still alive after the client hung up", n);
	for (int m = 0; m < NR_VBDS; m++) {
		struct vbd *vbd = srv.minors[m];
		if (!vbd || !vbd->params)
			fz_fail("minor %d is gone", m);
		if (vbd->state)
			fz_fail("minor %d: state %#x after the connection", m, vbd->state);
		if (vbd->nr_inflight || !TAILQ_EMPTY(&vbd->inflight))
			fz_fail("minor %d: %u request(s) still in flight", m, vbd->nr_inflight);
		if (!TAILQ_EMPTY(&vbd->queued))
			fz_fail("minor %d: requests still queued", m);
		if (vbd_frontend_count(vbd, "nbd"))
			fz_fail("minor %d: %u NBD frontend(s) still attached", m,
				vbd_frontend_count(vbd, "nbd"));
	}
	if (srv.zombies)
		fz_fail("a zombie vbd appeared");
}

/* Runs the loop, blocking, until *flag is set (a worker thread may be involved). */
static void
wait_for(const int *flag)
{
	while (!*flag)
		event_base_loop(srv.base, EVLOOP_ONCE);
}

struct closer {
	int minor, force;
	struct wait w;
};

static void
close_cb(evutil_socket_t fd, short what, void *arg)
{
	struct closer *c = arg;
	(void)fd;
	(void)what;
	vbd_close(srv.minors[c->minor], c->force, 0, wait_done, &c->w);
}

/*
 * Closes a vbd the way the control socket does, from the loop, queued behind
 * whatever the server is about to do with the input just sent; then opens it
 * again as it was.
 */
static void
close_and_reopen(int minor, int force)
{
	struct closer c = { minor, force, { 0 } };
	struct wait w = { 0 };

	if (event_base_once(srv.base, -1, EV_TIMEOUT, close_cb, &c, NULL) < 0)
		fz_fail("event_base_once failed");
	wait_for(&c.w.done);
	if (c.w.err)
		fz_fail("closing minor %d: %s", minor, c.w.msg);
	/* a force-closed vbd with I/O out lives on as a zombie until it is back */
	while (srv.zombies)
		event_base_loop(srv.base, EVLOOP_ONCE);
	fz_settle(srv.base);
	if (!srv.minors[minor] || !(srv.minors[minor]->state & VBD_CLOSED))
		fz_fail("minor %d: not closed after close", minor);
	int rc = vbd_open(&srv, minor, vbd_params[minor], vbd_flags[minor], wait_done, &w);
	if (rc < 0)
		fz_fail("reopening minor %d: %s", minor, strerror(-rc));
	wait_for(&w.done);
	if (w.err)
		fz_fail("reopening minor %d: %s", minor, w.msg);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_client cl;
	struct bufferevent *sbev;
	struct buf prefix = { 0 };
	uint8_t mode, chunk_byte, events;

	if (size < 3)
		return 0;
	mode = data[0];
	chunk_byte = data[1];
	events = data[2];
	data += 3;
	size -= 3;

	int minor = (mode & M_READONLY) ? 1 : 0;
	struct vbd *exp = (mode & M_BYNAME) ? NULL : srv.minors[minor];
	/* the default export answers to "" too; by name it must be the minor */
	build_prefix(&prefix, mode, events, exp ? "" : (minor ? "1" : "0"));

	if (mode & M_PAUSED)
		set_paused(1);

	fz_client_open(srv.base, &cl, (mode & M_HOLD) != 0, &sbev);
	nbd_serve(srv.nbd, sbev, exp);
	fz_settle(srv.base);

	size_t chunk = (mode & M_CHUNKED) ? (size_t)chunk_byte + 1 : 0;
	int closing = (events & E_CLOSE) != 0;
	fz_client_send(srv.base, &cl, prefix.p, prefix.len, 0, 1);
	fz_client_send(srv.base, &cl, data, size, chunk, !closing);
	free(prefix.p);
	if (closing)
		close_and_reopen(minor, (events & E_FORCE) != 0);

	if (events & E_EARLY_EOF) {
		fz_client_shutdown(&cl);
		fz_settle(srv.base);
	}
	if (mode & M_PAUSED) {
		set_paused(0);
		fz_settle(srv.base);
	}
	fz_client_release(srv.base, &cl);

	/*
	 * With every reply read and no request in flight, a server still
	 * connected must be reading: unread client bytes now mean it stalled.
	 */
	if (fz_client_connected(&cl)) {
		size_t unread = evbuffer_get_length(bufferevent_get_output(cl.bev));
		if (unread && !(events & E_EARLY_EOF))
			fz_fail("the server stopped reading with %zu client bytes pending "
				"and nothing in flight", unread);
	}
	fz_client_shutdown(&cl);
	fz_settle(srv.base);
	fz_client_release(srv.base, &cl);
	if (fz_client_connected(&cl))
		fz_fail("the server kept its end open after EOF");
	fz_client_close(&cl);
	fz_settle(srv.base);

	check_idle();
	wipe_disk();
	bufpool_trim(srv.pool);
	return 0;
}
