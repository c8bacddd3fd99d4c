/*
 * libFuzzer target: one NBD connection, handshake and transmission, against
 * two ram disks (minor 0: ram:512K read-write, minor 1: ram:256K read-only),
 * with the input as everything the client sends.
 *
 * Small disks and low per-connection limits (nbd_set_limits) keep every
 * execution cheap: with 4 MiB disks and the real 32 MiB output budget, the
 * inputs libFuzzer kept drifted to 4 MiB reads of unwritten chunks (zero-fill
 * was 88% of the time, 100 executions/s by 7 million) because only reads that
 * large reached the back-pressure code.
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
 *     0x10  a second client on the same export, reading while the first
 *           one's input arrives (and closed with it, or by the vbd close)
 *     0x20  clients hang up with a connection reset, not a half-close
 *     0x40  the first client is a UNIX socket, not a bufferevent pair:
 *           in transmission the server reads it into its own receive
 *           buffer (rxbuf) and write payloads from 1 KiB straight into the
 *           request, as with every real client; the receive buffer then
 *           holds 5 KiB, so inputs fill it. A reset is then an abrupt
 *           close: the server sees a reset if replies were left unread,
 *           else EOF after what was sent
 *     0x80  ... with the real in-place size (64 KiB, a 68 KiB buffer):
 *           payloads below it go through the receive buffer
 *   rest    the client's bytes
 *
 * After the input, the harness drains the replies, half-closes, and demands
 * that the connection is gone, no request is left in flight anywhere and the
 * vbds are back in their initial state. The ram disk is wiped between inputs.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
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
#include "fuzz_server.h"
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
#define E_SECOND	0x10
#define E_RESET		0x20
#define E_SOCKET	0x40
#define E_BUFFERED	0x80

#define BIG_OPTION_LEN	(NBD_MAX_OPTION_LEN + 1)

enum { PREFIX_RAW, PREFIX_GO_STRUCTURED, PREFIX_EXPORT_NAME, PREFIX_GO_PLAIN };

#define NR_VBDS 2
#define LARGEST_DISK (512u << 10)	/* minor 0's, the oracle's shadow copy */
static const char *const vbd_params[NR_VBDS] = { "ram:512K", "ram:256K" };
static const unsigned vbd_flags[NR_VBDS] = { 0, VBD_OPEN_READONLY };

static struct server *srv;
static char state_dir[] = "/tmp/tapdiskd-fuzz-nbd-XXXXXX";

/* ---- setup ---- */

/*
 * 8 requests, 128 KiB of replies, 4 KiB of option replies, write payloads
 * of direct bytes and more read in place (real: 128, 32 MiB, 1 MiB, 64 KiB).
 */
static void
set_limits(size_t direct)
{
	nbd_set_limits(srv->loops[0]->nbd, 8, 128 << 10, 4 << 10, direct);
}

static void
setup(void)
{
	srv = fz_server_setup("fuzz_nbd", state_dir, vbd_params, vbd_flags, NR_VBDS);
	for (int i = 0; i < NR_VBDS; i++)
		if (srv->minors[i]->size > LARGEST_DISK)
			fz_fail("minor %d: larger than LARGEST_DISK", i);
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

static void
put32(struct fz_buf *b, uint32_t v)
{
	uint8_t x[4];
	put_be32(x, v);
	fz_buf_put(b, x, 4);
}

static void
put16(struct fz_buf *b, uint16_t v)
{
	uint8_t x[2];
	put_be16(x, v);
	fz_buf_put(b, x, 2);
}

static void
put_opt(struct fz_buf *b, uint32_t opt, uint32_t len)
{
	uint8_t x[8];
	put_be64(x, NBD_IHAVEOPT);
	fz_buf_put(b, x, 8);
	put32(b, opt);
	put32(b, len);
}

static void
put_string(struct fz_buf *b, const char *s)
{
	put32(b, (uint32_t)strlen(s));
	fz_buf_put(b, s, strlen(s));
}

static void
put_go(struct fz_buf *b, const char *name, int infos)
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
build_prefix(struct fz_buf *b, uint8_t mode, uint8_t events, const char *name)
{
	int kind = M_PREFIX(mode);

	if (kind == PREFIX_RAW)
		return;
	put32(b, NBD_FLAG_C_FIXED_NEWSTYLE | ((mode & M_NOZEROES) ? NBD_FLAG_C_NO_ZEROES : 0));
	if (events & E_BIG_OPTION) {
		static const uint8_t zeros[BIG_OPTION_LEN];
		put_opt(b, 0x7f, BIG_OPTION_LEN);
		fz_buf_put(b, zeros, sizeof(zeros));
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
		fz_buf_put(b, name, strlen(name));
		break;
	case PREFIX_GO_PLAIN:
		put_go(b, name, 0);
		break;
	}
}

/* ---- the reply-stream oracle ----
 *
 * With a canned start the harness knows what the client says, so it checks
 * what the server answers, independently of the server's code:
 *  - the handshake replies are the ones the protocol prescribes;
 *  - in transmission, every reply is well-formed (magic, chunk types and
 *    lengths), answers a request that was sent and not answered yet, in the
 *    form the negotiated mode requires (simple or structured);
 *  - when nothing cut the connection short, every request got its answer;
 *  - with distinct cookies, reads return what earlier writes stored (and
 *    zeros where write-zeroes, trim or nothing wrote) and block status
 *    never calls data zero that is not.
 * Requests run on the ram disk in the order they arrive (ram completes
 * synchronously at submission, a paused vbd queues in order), which is what
 * lets a replay of the client's stream predict every read.
 */

#define ORACLE_MAX_PAYLOAD 9000		/* largest reply payload kept whole */

struct whash {
	uint64_t h, w;		/* the hash; the partial word's bytes */
	unsigned n;		/* bytes in w */
};
#define WHASH_INIT 0xcbf29ce484222325ULL

struct oreq {
	uint64_t cookie, offset;
	uint32_t length;
	uint16_t type, flags;
	const uint8_t *payload;		/* WRITE: in the input */
	int answered;
	uint32_t err;
	struct whash hash;		/* READ: data received */
	uint64_t got;
	int data_bad;			/* READ: not one sequential chunk */
	uint32_t *ext;			/* BLOCK_STATUS: length, flags pairs */
	uint32_t next;
};

enum ostate {
	O_OFF,			/* not validating (raw start or given up) */
	O_GREETING, O_OPT_HDR, O_OPT_PAYLOAD, O_EXPORT_NAME,
	O_TX, O_SIMPLE, O_CHUNK, O_CHUNK_PAYLOAD, O_READ_DATA,
};

struct oracle {
	enum ostate st;
	uint8_t hdr[ORACLE_MAX_PAYLOAD];
	size_t have, need;
	/* handshake */
	uint32_t opts[4];		/* options sent, in order */
	int nopts, cur;
	int export_name;		/* EXPORT_NAME after the options */
	int no_zeroes, readonly, structured, meta_seen;
	uint64_t size;
	uint32_t rep_type, rep_len;
	/* transmission */
	struct oreq *reqs;
	size_t nreqs;
	int canned, in_tx;		/* canned start; transmission reached */
	int unique;			/* no cookie twice */
	int exact;			/* nothing cuts the connection short */
	struct oreq *cur_req;
	uint16_t chunk_flags, chunk_type;
	uint32_t chunk_len;
	uint64_t data_left;
};

static struct oracle orc;

static void oracle_chunk_end(void);

static void oracle_fail(const char *what, ...) __attribute__((format(printf, 1, 2), noreturn));

static void
oracle_fail(const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fz_fail("NBD reply stream: %s", msg);
}

/*
 * An FNV-style hash of a byte stream, 8 bytes a step (reads bring megabytes),
 * fed in pieces cut anywhere: a partial word waits for the next piece.
 */
#define WHASH_PRIME 0x100000001b3ULL

FZ_NO_COVERAGE static void
whash_add(struct whash *s, const uint8_t *p, size_t n)
{
	for (; n && s->n; n--, p++) {
		s->w |= (uint64_t)*p << (8 * s->n);
		if (++s->n == 8) {
			s->h = (s->h ^ s->w) * WHASH_PRIME;
			s->w = s->n = 0;
		}
	}
	for (; n >= 8; n -= 8, p += 8) {
		uint64_t w;
		memcpy(&w, p, 8);	/* little-endian: the bytes' order as above */
		s->h = (s->h ^ w) * WHASH_PRIME;
	}
	for (; n; n--, p++)
		s->w |= (uint64_t)*p << (8 * s->n++);
}

static uint64_t
whash_end(const struct whash *s)
{
	return (((s->h ^ s->w) * WHASH_PRIME) ^ s->n) * WHASH_PRIME;
}

static uint64_t
whash_of(const uint8_t *p, size_t n)
{
	struct whash s = { WHASH_INIT, 0, 0 };
	whash_add(&s, p, n);
	return whash_end(&s);
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Splits the client's transmission bytes the way the protocol does. */
static void
oracle_parse_requests(const uint8_t *p, size_t len)
{
	size_t pos = 0, cap = 0;

	orc.exact = 1;
	while (len - pos >= NBD_REQUEST_LEN) {
		struct nbd_request r;
		if (get_be32(p + pos) != NBD_REQUEST_MAGIC) {
			orc.exact = 0;	/* the server hangs up, dropping replies */
			break;
		}
		r.flags = get_be16(p + pos + 4);
		r.type = get_be16(p + pos + 6);
		r.cookie = get_be64(p + pos + 8);
		r.offset = get_be64(p + pos + 16);
		r.length = get_be32(p + pos + 24);
		pos += NBD_REQUEST_LEN;
		if (r.type == NBD_CMD_DISC)
			break;		/* nothing after it is read */
		if (r.type == NBD_CMD_WRITE && len - pos < r.length)
			break;		/* its payload never completes */
		if (orc.nreqs == cap) {
			cap = cap ? 2 * cap : 64;
			struct oreq *n = realloc(orc.reqs, cap * sizeof(*n));
			if (!n)
				fz_fail("out of memory");
			orc.reqs = n;
		}
		struct oreq *q = &orc.reqs[orc.nreqs++];
		memset(q, 0, sizeof(*q));
		q->cookie = r.cookie;
		q->offset = r.offset;
		q->length = r.length;
		q->type = r.type;
		q->flags = r.flags;
		q->hash = (struct whash){ WHASH_INIT, 0, 0 };
		if (r.type == NBD_CMD_WRITE) {
			q->payload = p + pos;
			pos += r.length;
		}
	}
	orc.unique = 1;
	if (orc.nreqs) {
		uint64_t *c = malloc(orc.nreqs * sizeof(*c));
		if (!c)
			fz_fail("out of memory");
		for (size_t i = 0; i < orc.nreqs; i++)
			c[i] = orc.reqs[i].cookie;
		qsort(c, orc.nreqs, sizeof(*c), cmp_u64);
		for (size_t i = 1; i < orc.nreqs; i++)
			if (c[i] == c[i - 1])
				orc.unique = 0;
		free(c);
	}
}

static void
oracle_end(void)
{
	for (size_t i = 0; i < orc.nreqs; i++)
		free(orc.reqs[i].ext);
	free(orc.reqs);
	memset(&orc, 0, sizeof(orc));
}

static void
oracle_start(uint8_t mode, uint8_t events, int minor, const uint8_t *data, size_t size)
{
	int kind = M_PREFIX(mode);

	oracle_end();
	if (kind == PREFIX_RAW) {
		orc.st = O_OFF;
		return;
	}
	orc.st = O_GREETING;
	orc.need = 18;
	orc.canned = 1;
	orc.no_zeroes = (mode & M_NOZEROES) != 0;
	orc.readonly = minor == 1;
	orc.size = srv->minors[minor]->size;
	if (events & E_BIG_OPTION)
		orc.opts[orc.nopts++] = 0x7f;
	switch (kind) {
	case PREFIX_GO_STRUCTURED:
		orc.opts[orc.nopts++] = NBD_OPT_STRUCTURED_REPLY;
		orc.opts[orc.nopts++] = NBD_OPT_SET_META_CONTEXT;
		orc.opts[orc.nopts++] = NBD_OPT_GO;
		break;
	case PREFIX_EXPORT_NAME:
		orc.export_name = 1;
		break;
	case PREFIX_GO_PLAIN:
		orc.opts[orc.nopts++] = NBD_OPT_GO;
		break;
	}
	oracle_parse_requests(data, size);
	/* the harness itself cuts these connections short */
	if (events & (E_EARLY_EOF | E_CLOSE | E_RESET))
		orc.exact = 0;
}

static void
oracle_after_options(void)
{
	if (orc.export_name) {
		orc.st = O_EXPORT_NAME;
		orc.need = orc.no_zeroes ? 10 : 134;
	} else {
		orc.st = O_OPT_HDR;
		orc.need = 20;
	}
}

static void
oracle_start_tx(void)
{
	orc.in_tx = 1;
	/* simple replies to reads carry data only the cookie can size */
	if (!orc.structured && !orc.unique) {
		orc.st = O_OFF;
		return;
	}
	orc.st = O_TX;
	orc.need = 4;
}

static void
check_export_flags(uint16_t f)
{
	if (!(f & NBD_FLAG_HAS_FLAGS))
		oracle_fail("export flags %#x lack HAS_FLAGS", f);
	if (!!(f & NBD_FLAG_READ_ONLY) != orc.readonly)
		oracle_fail("export flags %#x: READ_ONLY wrong for this export", f);
	if (orc.readonly && (f & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES)))
		oracle_fail("read-only export offers trim or write-zeroes (%#x)", f);
	if (!!(f & NBD_FLAG_SEND_DF) != orc.structured)
		oracle_fail("export flags %#x: SEND_DF without structured replies or "
			    "the other way round", f);
}

/* An option reply header (20 bytes) for orc.opts[orc.cur]. */
static void
oracle_opt_header(void)
{
	uint32_t opt = orc.opts[orc.cur];

	if (get_be64(orc.hdr) != NBD_REP_MAGIC)
		oracle_fail("bad option reply magic");
	if (get_be32(orc.hdr + 8) != opt)
		oracle_fail("reply for option %u while option %u was pending",
			    get_be32(orc.hdr + 8), opt);
	orc.rep_type = get_be32(orc.hdr + 12);
	orc.rep_len = get_be32(orc.hdr + 16);
	if (orc.rep_len > ORACLE_MAX_PAYLOAD)
		oracle_fail("option reply of %u bytes", orc.rep_len);
	if (orc.rep_type & (1u << 31)) {
		if (opt == 0x7f && orc.rep_type == NBD_REP_ERR_TOO_BIG)
			goto next;
		oracle_fail("the canned option %u got error %#x", opt, orc.rep_type);
	}
	if (orc.rep_type == NBD_REP_ACK) {
		if (orc.rep_len)
			oracle_fail("ACK with a %u-byte payload", orc.rep_len);
		if (opt == NBD_OPT_STRUCTURED_REPLY)
			orc.structured = 1;
		if (opt == NBD_OPT_SET_META_CONTEXT && !orc.meta_seen)
			oracle_fail("SET_META_CONTEXT base:allocation acknowledged without "
				    "the context");
		if (opt == NBD_OPT_GO) {
			oracle_start_tx();
			return;
		}
		goto next;
	}
	if ((orc.rep_type == NBD_REP_META_CONTEXT && opt == NBD_OPT_SET_META_CONTEXT) ||
	    (orc.rep_type == NBD_REP_INFO && opt == NBD_OPT_GO)) {
		orc.st = O_OPT_PAYLOAD;
		orc.need = orc.rep_len;
		if (!orc.need)
			oracle_fail("empty reply payload for option %u", opt);
		return;
	}
	oracle_fail("reply type %#x to option %u", orc.rep_type, opt);
next:
	if (++orc.cur == orc.nopts) {
		oracle_after_options();
		return;
	}
	orc.st = O_OPT_HDR;
	orc.need = 20;
}

static void
oracle_opt_payload(void)
{
	const uint8_t *p = orc.hdr;
	uint32_t len = orc.rep_len;

	if (orc.rep_type == NBD_REP_META_CONTEXT) {
		if (len != 4 + strlen(NBD_META_BASE_ALLOCATION) ||
		    get_be32(p) != NBD_META_ID_BASE_ALLOCATION ||
		    memcmp(p + 4, NBD_META_BASE_ALLOCATION, len - 4))
			oracle_fail("bad META_CONTEXT reply");
		if (orc.meta_seen++)
			oracle_fail("base:allocation selected twice");
	} else {
		if (len < 2)
			oracle_fail("INFO reply of %u bytes", len);
		switch (get_be16(p)) {
		case NBD_INFO_EXPORT:
			if (len != 12)
				oracle_fail("INFO_EXPORT of %u bytes", len);
			if (get_be64(p + 2) != orc.size)
				oracle_fail("export size %ju, the vbd has %ju",
					    (uintmax_t)get_be64(p + 2), (uintmax_t)orc.size);
			check_export_flags(get_be16(p + 10));
			break;
		case NBD_INFO_BLOCK_SIZE:
			if (len != 14)
				oracle_fail("INFO_BLOCK_SIZE of %u bytes", len);
			uint32_t mn = get_be32(p + 2), pref = get_be32(p + 6), mx = get_be32(p + 10);
			if (!mn || (mn & (mn - 1)) || mn > 65536 || pref < mn ||
			    (pref & (pref - 1)) || mx < pref)
				oracle_fail("block sizes %u/%u/%u break the protocol's rules",
					    mn, pref, mx);
			break;
		case NBD_INFO_NAME:
		case NBD_INFO_DESCRIPTION:
			break;
		default:
			oracle_fail("INFO type %u", get_be16(p));
		}
	}
	orc.st = O_OPT_HDR;
	orc.need = 20;
}

static struct oreq *
oracle_find(uint64_t cookie)
{
	for (size_t i = 0; i < orc.nreqs; i++)
		if (!orc.reqs[i].answered && orc.reqs[i].cookie == cookie)
			return &orc.reqs[i];
	oracle_fail("reply for cookie %#jx, which no pending request has",
		    (uintmax_t)cookie);
}

static int
wire_error_ok(uint32_t e)
{
	switch (e) {
	case NBD_EPERM: case NBD_EIO: case NBD_ENOMEM: case NBD_EINVAL:
	case NBD_ENOSPC: case NBD_EOVERFLOW: case NBD_ENOTSUP: case NBD_ESHUTDOWN:
		return 1;
	}
	return 0;
}

static void
oracle_simple(void)
{
	uint32_t err = get_be32(orc.hdr + 4);
	struct oreq *q = oracle_find(get_be64(orc.hdr + 8));

	if (err && !wire_error_ok(err))
		oracle_fail("simple reply error %u is no NBD error", err);
	q->answered = 1;
	q->err = err;
	orc.st = O_TX;
	orc.need = 4;
	if (!orc.unique)
		return;
	if (orc.structured && (q->type == NBD_CMD_READ || q->type == NBD_CMD_BLOCK_STATUS))
		oracle_fail("simple reply to a %s with structured replies on",
			    q->type == NBD_CMD_READ ? "read" : "block status");
	if (q->type == NBD_CMD_READ && !err && q->length) {
		orc.cur_req = q;
		orc.data_left = q->length;
		orc.st = O_READ_DATA;
	}
}

static void
oracle_chunk_header(void)
{
	orc.chunk_flags = get_be16(orc.hdr + 4);
	orc.chunk_type = get_be16(orc.hdr + 6);
	orc.chunk_len = get_be32(orc.hdr + 16);
	if (!orc.structured)
		oracle_fail("structured reply chunk without structured replies negotiated");
	if (orc.chunk_flags & ~NBD_REPLY_FLAG_DONE)
		oracle_fail("chunk flags %#x", orc.chunk_flags);
	orc.cur_req = oracle_find(get_be64(orc.hdr + 8));
	struct oreq *q = orc.unique ? orc.cur_req : NULL;

	switch (orc.chunk_type) {
	case NBD_REPLY_TYPE_NONE:
		if (orc.chunk_len || !(orc.chunk_flags & NBD_REPLY_FLAG_DONE))
			oracle_fail("NONE chunk with %u bytes or without DONE", orc.chunk_len);
		break;
	case NBD_REPLY_TYPE_OFFSET_DATA:
		if (orc.chunk_len < 9)
			oracle_fail("OFFSET_DATA chunk of %u bytes", orc.chunk_len);
		if (q && q->type != NBD_CMD_READ)
			oracle_fail("OFFSET_DATA chunk for a command %u", q->type);
		orc.st = O_CHUNK_PAYLOAD;
		orc.need = 8;	/* the offset; the data streams after it */
		return;
	case NBD_REPLY_TYPE_BLOCK_STATUS:
		if (q && q->type != NBD_CMD_BLOCK_STATUS)
			oracle_fail("BLOCK_STATUS chunk for a command %u", q->type);
		/* fall through */
	case NBD_REPLY_TYPE_ERROR:
		if (orc.chunk_len > ORACLE_MAX_PAYLOAD)
			oracle_fail("chunk type %u of %u bytes", orc.chunk_type, orc.chunk_len);
		orc.st = O_CHUNK_PAYLOAD;
		orc.need = orc.chunk_len;
		if (!orc.need)
			oracle_fail("empty chunk of type %u", orc.chunk_type);
		return;
	default:
		oracle_fail("chunk type %#x", orc.chunk_type);
	}
	oracle_chunk_end();
}

static void
oracle_chunk_end(void)
{
	struct oreq *q = orc.unique ? orc.cur_req : NULL;
	if (orc.chunk_flags & NBD_REPLY_FLAG_DONE) {
		orc.cur_req->answered = 1;
		if (q && q->type == NBD_CMD_READ && !q->err && q->got != q->length)
			oracle_fail("read of %u bytes ended after %ju bytes", q->length,
				    (uintmax_t)q->got);
	}
	orc.st = O_TX;
	orc.need = 4;
}

static void
oracle_chunk_payload(void)
{
	struct oreq *q = orc.unique ? orc.cur_req : NULL;
	const uint8_t *p = orc.hdr;

	switch (orc.chunk_type) {
	case NBD_REPLY_TYPE_OFFSET_DATA: {
		uint64_t off = get_be64(p), n = orc.chunk_len - 8;
		if (q) {
			if (off < q->offset || n > q->length || off - q->offset > q->length - n)
				oracle_fail("OFFSET_DATA %ju+%ju outside the read %ju+%u",
					    (uintmax_t)off, (uintmax_t)n,
					    (uintmax_t)q->offset, q->length);
			if (off != q->offset + q->got)
				q->data_bad = 1;
		}
		orc.data_left = n;
		orc.st = O_READ_DATA;
		return;
	}
	case NBD_REPLY_TYPE_ERROR: {
		uint32_t err = get_be32(p);
		if (orc.chunk_len < 6 || get_be16(p + 4) != orc.chunk_len - 6)
			oracle_fail("ERROR chunk of %u bytes, message length %u", orc.chunk_len,
				    orc.chunk_len >= 6 ? get_be16(p + 4) : 0);
		if (!wire_error_ok(err))
			oracle_fail("ERROR chunk with error %u", err);
		orc.cur_req->err = err;
		break;
	}
	case NBD_REPLY_TYPE_BLOCK_STATUS: {
		uint32_t n = (orc.chunk_len - 4) / 8;
		if (orc.chunk_len < 12 || (orc.chunk_len - 4) % 8)
			oracle_fail("BLOCK_STATUS chunk of %u bytes", orc.chunk_len);
		if (get_be32(p) != NBD_META_ID_BASE_ALLOCATION)
			oracle_fail("BLOCK_STATUS for context %u, not base:allocation", get_be32(p));
		if (!q)
			break;
		if ((q->flags & NBD_CMD_FLAG_REQ_ONE) && n != 1)
			oracle_fail("REQ_ONE block status answered with %u extents", n);
		uint64_t sum = 0;
		for (uint32_t i = 0; i < n; i++) {
			uint32_t l = get_be32(p + 4 + 8 * i), f = get_be32(p + 8 + 8 * i);
			if (!l)
				oracle_fail("zero-length extent %u", i);
			if (f & ~(NBD_STATE_HOLE | NBD_STATE_ZERO))
				oracle_fail("extent flags %#x", f);
			sum += l;
		}
		if (sum > q->length)
			oracle_fail("extents cover %ju bytes of a %u-byte query",
				    (uintmax_t)sum, q->length);
		if (q->ext)
			oracle_fail("second BLOCK_STATUS chunk for one request");
		q->ext = malloc(2 * sizeof(uint32_t) * n);
		if (!q->ext)
			fz_fail("out of memory");
		for (uint32_t i = 0; i < 2 * n; i++)
			q->ext[i] = get_be32(p + 4 + 4 * i);
		q->next = n;
		break;
	}
	}
	oracle_chunk_end();
}

static void
oracle_header_done(void)
{
	orc.have = 0;
	switch (orc.st) {
	case O_GREETING:
		if (get_be64(orc.hdr) != NBD_MAGIC || get_be64(orc.hdr + 8) != NBD_IHAVEOPT ||
		    get_be16(orc.hdr + 16) != (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
			oracle_fail("bad greeting");
		if (orc.nopts) {
			orc.st = O_OPT_HDR;
			orc.need = 20;
		} else {
			oracle_after_options();
		}
		break;
	case O_OPT_HDR:
		oracle_opt_header();
		break;
	case O_OPT_PAYLOAD:
		oracle_opt_payload();
		break;
	case O_EXPORT_NAME:
		if (get_be64(orc.hdr) != orc.size)
			oracle_fail("EXPORT_NAME: size %ju, the vbd has %ju",
				    (uintmax_t)get_be64(orc.hdr), (uintmax_t)orc.size);
		check_export_flags(get_be16(orc.hdr + 8));
		for (size_t i = 10; i < orc.need; i++)
			if (orc.hdr[i])
				oracle_fail("EXPORT_NAME: reserved bytes not zero");
		oracle_start_tx();
		break;
	case O_TX: {
		uint32_t magic = get_be32(orc.hdr);
		orc.have = 4;	/* keep the magic: the header goes on */
		if (magic == NBD_SIMPLE_REPLY_MAGIC) {
			orc.st = O_SIMPLE;
			orc.need = 16;
		} else if (magic == NBD_STRUCTURED_REPLY_MAGIC) {
			orc.st = O_CHUNK;
			orc.need = 20;
		} else {
			oracle_fail("reply magic %#x", magic);
		}
		break;
	}
	case O_SIMPLE:
		oracle_simple();
		break;
	case O_CHUNK:
		oracle_chunk_header();
		break;
	case O_CHUNK_PAYLOAD:
		oracle_chunk_payload();
		break;
	default:
		fz_fail("oracle state %d", orc.st);
	}
}

static void
oracle_feed(const uint8_t *p, size_t n, void *arg)
{
	(void)arg;
	while (n && orc.st != O_OFF) {
		if (orc.st == O_READ_DATA) {
			size_t k = n < orc.data_left ? n : (size_t)orc.data_left;
			struct oreq *q = orc.unique ? orc.cur_req : NULL;
			if (q) {
				whash_add(&q->hash, p, k);
				q->got += k;
			}
			p += k;
			n -= k;
			orc.data_left -= k;
			if (!orc.data_left) {
				if (orc.structured)
					oracle_chunk_end();
				else {
					orc.st = O_TX;
					orc.need = 4;
				}
			}
			continue;
		}
		size_t k = orc.need - orc.have;
		if (k > n)
			k = n;
		memcpy(orc.hdr + orc.have, p, k);
		orc.have += k;
		p += k;
		n -= k;
		if (orc.have == orc.need)
			oracle_header_done();
	}
}

/* The disk as the client's requests left it, replayed in arrival order. */
static uint8_t *shadow;
static uint64_t shadow_lo, shadow_hi;	/* what the last replay wrote: all else is zeros */

static void
shadow_dirty(uint64_t off, uint64_t len)
{
	if (!len)
		return;
	if (shadow_hi <= shadow_lo || off < shadow_lo)
		shadow_lo = off;
	if (off + len > shadow_hi)
		shadow_hi = off + len;
}

FZ_NO_COVERAGE static int
shadow_zero(uint64_t off, uint64_t len)
{
	for (uint64_t i = 0; i < len; i++)
		if (shadow[off + i])
			return 0;
	return 1;
}

static void
oracle_finish(void)
{
	/* a slow reader that hangs up early may never see it, though */
	if (orc.canned && !orc.in_tx && orc.exact)
		oracle_fail("the canned handshake never completed (state %d, %zu of %zu "
			    "bytes)", orc.st, orc.have, orc.need);
	if (fz_trace()) {
		size_t answered = 0;
		for (size_t i = 0; i < orc.nreqs; i++)
			answered += orc.reqs[i].answered != 0;
		fprintf(stderr, "==fuzz== oracle: canned %d, state %d, structured %d, %zu "
			"requests, %zu answered, cookies %s, %s\n", orc.canned, orc.st,
			orc.structured, orc.nreqs, answered, orc.unique ? "unique" : "repeat",
			orc.exact ? "exact (all answered, data replayed)" : "framing only");
	}
	if (orc.st == O_OFF || !orc.exact)
		return;
	if (orc.st != O_TX || orc.have)
		oracle_fail("the reply stream ends inside a reply (state %d)", orc.st);
	for (size_t i = 0; i < orc.nreqs; i++)
		if (!orc.reqs[i].answered)
			oracle_fail("request %zu (command %u, cookie %#jx) never got an answer",
				    i, orc.reqs[i].type, (uintmax_t)orc.reqs[i].cookie);
	if (!orc.unique)
		return;

	if (!shadow && !(shadow = calloc(1, LARGEST_DISK)))
		fz_fail("out of memory");
	/* zeros again where the last replay wrote (all of it each time cost more than the rest) */
	if (shadow_hi > shadow_lo)
		memset(shadow + shadow_lo, 0, shadow_hi - shadow_lo);
	shadow_lo = shadow_hi = 0;
	for (size_t i = 0; i < orc.nreqs; i++) {
		struct oreq *q = &orc.reqs[i];
		if (q->err)
			continue;
		if (q->offset > orc.size || q->length > orc.size - q->offset)
			oracle_fail("command %u beyond the end (%ju+%u) succeeded", q->type,
				    (uintmax_t)q->offset, q->length);
		switch (q->type) {
		case NBD_CMD_WRITE:
			if (orc.readonly)
				oracle_fail("a write to the read-only export succeeded");
			memcpy(shadow + q->offset, q->payload, q->length);
			shadow_dirty(q->offset, q->length);
			break;
		case NBD_CMD_TRIM:
		case NBD_CMD_WRITE_ZEROES:
			if (orc.readonly)
				oracle_fail("command %u on the read-only export succeeded", q->type);
			memset(shadow + q->offset, 0, q->length);
			break;
		case NBD_CMD_READ:
			if (q->data_bad)
				break;
			if (whash_of(shadow + q->offset, q->length) != whash_end(&q->hash))
				oracle_fail("read %ju+%u (cookie %#jx) returned other data than "
					    "the requests before it stored", (uintmax_t)q->offset,
					    q->length, (uintmax_t)q->cookie);
			break;
		case NBD_CMD_BLOCK_STATUS: {
			uint64_t off = q->offset;
			for (uint32_t e = 0; e < q->next; e++) {
				uint32_t l = q->ext[2 * e], f = q->ext[2 * e + 1];
				if ((f & NBD_STATE_ZERO) && !shadow_zero(off, l))
					oracle_fail("block status says %ju+%u reads as zeros; it "
						    "does not", (uintmax_t)off, l);
				off += l;
			}
			break;
		}
		}
	}
}

/* ---- per input ---- */

/* The second client's bytes: GO, then reads spread over the export. */
static void
build_reader(struct fz_buf *b, const char *name, uint64_t size)
{
	put32(b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	put_go(b, name, 0);
	for (unsigned i = 0; i < 8; i++) {
		uint8_t r[NBD_REQUEST_LEN];
		put_be32(r, NBD_REQUEST_MAGIC);
		put_be16(r + 4, 0);
		put_be16(r + 6, i == 7 ? NBD_CMD_FLUSH : NBD_CMD_READ);
		put_be64(r + 8, 0x5ec0000u + i);
		put_be64(r + 16, i == 7 ? 0 : (size / 8) * i);
		put_be32(r + 24, i == 7 ? 0 : 65536);
		fz_buf_put(b, r, sizeof(r));
	}
}

static void
set_paused(int paused)
{
	for (int m = 0; m < NR_VBDS; m++) {
		struct fz_wait w = { 0 };
		if (paused)
			vbd_pause(srv->minors[m], fz_wait_done, &w);
		else if (srv->minors[m]->state & VBD_PAUSED)
			vbd_unpause(srv->minors[m], NULL, NULL, fz_wait_done, &w);
		else
			continue;	/* closed and reopened meanwhile */
		fz_settle(srv->base);
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

/* Requests that may have changed the disk, as the vbd counts them. */
static uint64_t
disk_changes(const struct vbd *vbd)
{
	return vbd->stats.op[TD_OP_WRITE].reqs + vbd->stats.op[TD_OP_DISCARD].reqs +
	       vbd->stats.op[TD_OP_WRITE_ZEROES].reqs;
}

/*
 * Gives the writable ram disk back its initial contents: all holes. Only
 * when a request may have changed it: a discard of the whole disk gives its
 * pages back, and the next input's writes fault them in again.
 */
static void
wipe_disk(void)
{
	static struct vbd_request vr;
	static const struct vbd *wiped;
	static uint64_t changes;
	struct vbd *vbd = srv->minors[0];

	if (vbd == wiped && disk_changes(vbd) == changes)
		return;
	memset(&vr, 0, sizeof(vr));
	vr.td.op = TD_OP_DISCARD;
	vr.td.offset = 0;
	vr.td.length = vbd->size;
	vr.complete = wipe_complete;
	wipe_done = 0;
	vbd_submit(vbd, &vr);
	fz_settle(srv->base);
	if (!wipe_done)
		fz_fail("the wipe request never completed");
	wiped = vbd;
	changes = disk_changes(vbd);
}

static void
check_idle(void)
{
	unsigned n = nbd_connection_count(srv);
	if (n)
		fz_fail("%u NBD connection(s) still alive after the client hung up", n);
	for (int m = 0; m < NR_VBDS; m++) {
		struct vbd *vbd = srv->minors[m];
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
	if (srv->nr_zombies)
		fz_fail("a zombie vbd appeared");
}

/* Runs the loop, blocking, until *flag is set (a gather's message may be involved). */
static void
wait_for(const int *flag)
{
	while (!*flag)
		event_base_loop(srv->base, EVLOOP_ONCE);
}

struct closer {
	int minor, force;
	struct fz_wait w;
};

static void
close_cb(evutil_socket_t fd, short what, void *arg)
{
	struct closer *c = arg;
	(void)fd;
	(void)what;
	vbd_close(srv->minors[c->minor], c->force, 0, fz_wait_done, &c->w);
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
	struct fz_wait w = { 0 };

	if (event_base_once(srv->base, -1, EV_TIMEOUT, close_cb, &c, NULL) < 0)
		fz_fail("event_base_once failed");
	wait_for(&c.w.done);
	if (c.w.err)
		fz_fail("closing minor %d: %s", minor, c.w.msg);
	/* a force-closed vbd with I/O out lives on as a zombie until it is back */
	while (srv->nr_zombies)
		event_base_loop(srv->base, EVLOOP_ONCE);
	fz_settle(srv->base);
	if (!server_minor_closed(srv, minor))
		fz_fail("minor %d: not closed after close", minor);
	int rc = fz_vbd_open(srv, minor, vbd_params[minor], vbd_flags[minor], &w);
	if (rc < 0)
		fz_fail("reopening minor %d: %s", minor, strerror(-rc));
	wait_for(&w.done);
	if (w.err)
		fz_fail("reopening minor %d: %s", minor, w.msg);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_client cl, cl2;
	struct bufferevent *sbev;
	struct fz_buf prefix = { 0 }, reader = { 0 };
	uint8_t mode, chunk_byte, events;

	if (size < 3)
		return 0;
	mode = data[0];
	chunk_byte = data[1];
	events = data[2];
	data += 3;
	size -= 3;

	int minor = (mode & M_READONLY) ? 1 : 0;
	struct vbd *exp = (mode & M_BYNAME) ? NULL : srv->minors[minor];
	/* the default export answers to "" too; by name it must be the minor */
	build_prefix(&prefix, mode, events, exp ? "" : (minor ? "1" : "0"));

	if (mode & M_PAUSED)
		set_paused(1);

	set_limits((events & E_BUFFERED) ? 64 << 10 : 1 << 10);
	if (events & E_SOCKET)
		fz_client_open_socket(srv->base, &cl, (mode & M_HOLD) != 0, &sbev);
	else
		fz_client_open(srv->base, &cl, (mode & M_HOLD) != 0, &sbev);
	oracle_start(mode, events, minor, data, size);
	cl.observe = oracle_feed;
	nbd_serve(srv->loops[0]->nbd, sbev, exp);
	fz_settle(srv->base);

	int second = (events & E_SECOND) != 0;
	if (second) {
		/* queued now, served while the first client's input arrives */
		fz_client_open(srv->base, &cl2, 0, &sbev);
		nbd_serve(srv->loops[0]->nbd, sbev, exp);
		build_reader(&reader, exp ? "" : (minor ? "1" : "0"), srv->minors[minor]->size);
		bufferevent_write(cl2.bev, reader.p, reader.len);
		free(reader.p);
	}

	size_t chunk = (mode & M_CHUNKED) ? (size_t)chunk_byte + 1 : 0;
	int closing = (events & E_CLOSE) != 0;
	fz_client_send(srv->base, &cl, prefix.p, prefix.len, 0, 1);
	fz_client_send(srv->base, &cl, data, size, chunk, !closing);
	if (closing)
		close_and_reopen(minor, (events & E_FORCE) != 0);

	int reset = (events & E_RESET) != 0;
	if (events & E_EARLY_EOF) {
		fz_client_hangup(&cl, reset);
		if (second)
			fz_client_hangup(&cl2, reset);
		fz_settle(srv->base);
	}
	if (mode & M_PAUSED) {
		set_paused(0);
		fz_settle(srv->base);
	}
	fz_client_release(srv->base, &cl);

	/*
	 * With every reply read and no request in flight, a server still
	 * connected must be reading: unread client bytes now mean it stalled.
	 */
	if (fz_client_connected(&cl)) {
		size_t unread = fz_client_unread(&cl);
		if (unread && !(events & E_EARLY_EOF))
			fz_fail("the server stopped reading with %zu client bytes pending "
				"and nothing in flight", unread);
	}
	fz_client_hangup(&cl, reset);
	if (second)
		fz_client_hangup(&cl2, reset);
	fz_settle(srv->base);
	fz_client_release(srv->base, &cl);
	if (fz_client_hangup_stuck(&cl) || (second && fz_client_hangup_stuck(&cl2)))
		fz_fail("the server stopped reading for good: the client's hang-up never "
			"reached it");
	if (fz_client_connected(&cl) || (second && fz_client_connected(&cl2)))
		fz_fail("the server kept its end open after EOF");
	fz_client_close(&cl);
	if (second)
		fz_client_close(&cl2);
	fz_settle(srv->base);
	free(prefix.p);		/* sent by reference: only now is it no one's */

	oracle_finish();
	oracle_end();
	check_idle();
	wipe_disk();
	/*
	 * The pool stays warm across inputs, as a busy server's does: fresh
	 * buffers cost page faults and sanitizer bookkeeping by the megabyte.
	 * Buffers it caches are poisoned (lib/bufpool.c): a use after a put is
	 * still caught, at once rather than at the end of the input.
	 */
	return 0;
}
