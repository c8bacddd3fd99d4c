/*
 * NBD server frontend: listeners, the fixed-newstyle handshake and the
 * transmission phase. The handshake runs on a bufferevent; in transmission
 * a connection reads its socket into its own receive buffer and sends the
 * replies of each loop turn as one batch (lib/rxbuf, lib/txbatch), so that
 * steady-state requests cost no heap calls; the bufferevent's output takes
 * what the socket cannot yet. A connection reads nothing it has no room for
 * (in-flight and output limits), answers every malformed message with the
 * protocol's error or a clean disconnect, and outlives its socket until its
 * in-flight requests have come back.
 */
#include "nbd.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "backlog.h"
#include "bufpool.h"
#include "cbt.h"
#include "container_of.h"
#include "fdlimit.h"
#include "freelist.h"
#include "log.h"
#include "loop.h"
#include "nbd_proto.h"
#include "nbd_tls.h"
#include "rxbuf.h"
#include "server.h"
#include "txbatch.h"
#include "unixsock.h"
#include "vbd.h"

#define NBD_MAX_REQUEST		BUFPOOL_MAX_SIZE	/* 32 MiB */
#define NBD_PREFERRED_BLOCK	4096
#define NBD_MAX_INFLIGHT	128		/* per connection */
#define NBD_MAX_OUTPUT		(32u << 20)	/* data buffers per connection: unsent
						   replies plus requests in flight */
#define NBD_MAX_EXTENTS		1024
/* the contexts a connection chose (NBD_OPT_SET_META_CONTEXT) */
#define META_BASE	0x1	/* base:allocation */
#define META_DIRTY	0x2	/* qemu:dirty-bitmap:cbt */
#define NBD_MAX_HS_OUTPUT	(1u << 20)	/* unread option replies */
#define NBD_MAX_CONNECTIONS	4096
#define NBD_DISCARD_LIMIT	(16u << 20)	/* larger option payloads: disconnect */
#define NBD_DIRECT_PAYLOAD	(64u << 10)	/* larger write payloads skip the input buffer */
#define NBD_RX_SLACK		4096	/* the receive buffer: a header and a smaller payload */
/*
 * A UNIX socket's send buffer (capped by net.core.wmem_max): the default
 * 208 KiB splits every large read reply into several wake-ups of both sides.
 */
#define NBD_UNIX_SNDBUF		(4 << 20)
/* A connection follows its export to that export's loop at most this often. */
#define NBD_MAX_HOPS		4

struct nbd_listener {
	struct nbd_server *ns;
	struct evconnlistener *lev;
	char *path;			/* UNIX socket to unlink, or NULL */
	struct vbd *vbd;		/* per-vbd socket; NULL: by export name */
	struct vbd_frontend fe;
	LIST_ENTRY(nbd_listener) link;
};

/* One per loop: that loop's listeners and connections. */
struct nbd_server {
	struct server *srv;
	struct loop *loop;
	LIST_HEAD(, nbd_listener) listeners;
	LIST_HEAD(, nbd_conn) conns;
	uint64_t conn_serial;
	struct log_ratelimit rl;
	/* per connection; NBD_MAX_* unless nbd_set_limits lowered them */
	unsigned max_inflight;
	size_t max_output, max_hs_output, direct_payload;
};

enum conn_state {
	CS_CLIENT_FLAGS,
	CS_OPT_HEADER,
	CS_OPT_DATA,
	CS_OPT_DISCARD,
	CS_REQ_HEADER,
	CS_REQ_PAYLOAD,
	CS_REQ_DISCARD,
	CS_REQ_READY,			/* c->cur waits for memory to become a request */
	CS_REQ_MEMWAIT,			/* out of memory: reading stopped, mem_ev retries */
};

struct nbd_conn {
	struct nbd_server *ns;
	struct bufferevent *bev;	/* NULL once the socket is gone */
	struct vbd *default_vbd;	/* per-vbd socket: the export */
	struct vbd *vbd;		/* bound export, registered as frontend */
	struct vbd_frontend fe;
	enum conn_state state;
	uint32_t cflags;
	int structured;
	unsigned meta;			/* contexts selected: META_* */
	char *meta_export;		/* export the contexts were set for */
	uint32_t opt, opt_len;
	uint64_t discard_left;
	int discard_err;		/* reply for a discarded write payload */
	struct nbd_req *payload;	/* a large write, its payload arriving in place */
	size_t payload_got;
	struct rxbuf rx;		/* transmission on a socket: its input */
	size_t direct_payload;		/* ... and the payload size that bypasses rx */
	struct event *rx_ev;		/* the socket is readable, when rx is set up */
	int rx_drained;			/* the last recv emptied the socket: wait for rx_ev */
	struct txbatch txb;		/* replies of this loop turn */
	struct event *flush_ev;		/* sends txb when the turn ends */
	int flush_pending;
	int tx_err;			/* sending failed: cut at the next flush */
	struct nbd_request cur;
	unsigned inflight;
	unsigned answered;		/* of those, answered already (timed out): the I/O is out */
	size_t inflight_bytes;		/* data buffers held by requests in flight */
	int reading_paused;
	int in_process;
	int closing;			/* DISC or vbd shutdown: finish, then close */
	int listing;			/* NBD_OPT_LIST gathering from every loop */
	unsigned hops;			/* hand-offs to other loops so far */
	struct timespec started;	/* accepted: the handshake deadline counts from here */
	struct event *deadline;		/* handshake: a slow client cannot stretch it */
	struct freelist reqs;		/* nbd_reqs with their scratch, for reuse */
	struct event *mem_ev;		/* out of memory: retry (or a completion does) */
	enum conn_state mem_resume;	/* the state to retry in */
	LIST_ENTRY(nbd_conn) link;
	char peer[64];
	enum tls_mode tls_mode;		/* what this connection's listener asks */
	struct tls_conn *tls;		/* after STARTTLS: bev is its plaintext end */
	int tls_start;			/* STARTTLS answered: switch once the option is consumed */
};

struct nbd_req {
	struct vbd_request vr;
	struct nbd_conn *conn;
	uint64_t cookie;
	uint16_t type, flags;
	uint64_t offset;	/* as the client asked: drivers may move td's along */
	uint32_t length;
	int answered;		/* timed out: the client has its error, the I/O is still out */
	void *buf;
	size_t buflen;
	struct iovec iov;
	struct td_extent *extents;
};


static void conn_process(struct nbd_conn *c);
static void nbd_req_free(struct nbd_conn *c, struct nbd_req *nr);
static void conn_finish(struct nbd_conn *c);
static void conn_read_enable(struct nbd_conn *c, int on);
static void conn_mem_resume(struct nbd_conn *c);

/* ---- connection lifetime ---- */

/* Frees c once it has no socket and no requests; never mid-processing. */
static void
conn_maybe_free(struct nbd_conn *c)
{
	if (c->bev || c->inflight || c->in_process || c->listing)
		return;
	LIST_REMOVE(c, link);
	c->ns->srv->nr_conns--;
	freelist_drain(&c->reqs);
	free(c->meta_export);
	free(c);
}

/* Drops the socket now; the conn itself goes when its requests are back. */
static void
conn_cut(struct nbd_conn *c)
{
	if (c->bev) {
		bufferevent_free(c->bev);
		c->bev = NULL;
	}
	if (c->tls) {
		tls_conn_free(c->tls);
		c->tls = NULL;
	}
	if (c->rx_ev) {
		event_free(c->rx_ev);
		c->rx_ev = NULL;
	}
	rxbuf_free(&c->rx);
	txb_drop(&c->txb);
	if (c->flush_ev) {
		event_free(c->flush_ev);
		c->flush_ev = NULL;
	}
	if (c->mem_ev) {
		event_free(c->mem_ev);
		c->mem_ev = NULL;
	}
	if (c->payload) {
		nbd_req_free(c, c->payload);
		c->payload = NULL;
	}
	if (c->deadline) {
		event_free(c->deadline);
		c->deadline = NULL;
	}
	if (c->vbd) {
		vbd_frontend_remove(&c->fe);
		c->vbd = NULL;
	}
	conn_maybe_free(c);
}

static void
conn_protocol_error(struct nbd_conn *c, const char *what)
{
	log_limited(&c->ns->rl, LOG_LVL_WARN, "nbd client %s: %s; disconnecting",
		    c->peer, what);
	conn_cut(c);
}

static void
conn_fe_shutdown(struct vbd_frontend *fe)
{
	struct nbd_conn *c = container_of(fe, struct nbd_conn, fe);
	int force = fe->vbd && (fe->vbd->state & VBD_DEAD);

	vbd_frontend_remove(fe);
	c->vbd = NULL;
	c->default_vbd = NULL;
	if (force || !c->bev)
		conn_cut(c);
	else
		conn_finish(c);
}

static const struct vbd_frontend_ops conn_fe_ops = {
	.kind = "nbd",
	.shutdown = conn_fe_shutdown,
};

static void
conn_bind(struct nbd_conn *c, struct vbd *vbd)
{
	if (c->vbd == vbd)
		return;
	if (c->vbd)
		vbd_frontend_remove(&c->fe);
	c->vbd = vbd;
	vbd_frontend_add(vbd, &c->fe, &conn_fe_ops);
}

/* ---- output ---- */

static struct evbuffer *
conn_output(struct nbd_conn *c)
{
	return bufferevent_get_output(c->bev);
}

/* The batch goes out when this loop turn ends (conn_flush_cb). */
static void
conn_flush_soon(struct nbd_conn *c)
{
	if (!c->flush_pending && c->flush_ev) {
		c->flush_pending = 1;
		event_active(c->flush_ev, EV_TIMEOUT, 1);
	}
}

static void
conn_flush(struct nbd_conn *c)
{
	int err = txb_flush(&c->txb, bufferevent_getfd(c->bev), conn_output(c));
	if (err && !c->tx_err)
		c->tx_err = err;
}

static int
batch_add(struct nbd_conn *c, const void *data, size_t len, txb_release_fn *release, void *arg)
{
	return release ? txb_add_ref(&c->txb, data, len, release, arg)
		       : txb_add(&c->txb, data, len);
}

/*
 * Queues len bytes for the client: copied, or (release set) referenced
 * until sent and then released. Into the batch while the bufferevent's
 * output is empty, else behind what it holds (the order txbatch.h asks).
 */
static void
conn_send(struct nbd_conn *c, const void *data, size_t len, txb_release_fn *release, void *arg)
{
	if (!c->bev) {
		if (release)
			release(data, len, arg);
		return;
	}
	struct evbuffer *out = conn_output(c);
	if (!evbuffer_get_length(out)) {
		int r = batch_add(c, data, len, release, arg);
		if (r == -ENOSPC) {
			conn_flush(c);
			if (!evbuffer_get_length(out))
				r = batch_add(c, data, len, release, arg);
		}
		if (r == 0) {
			conn_flush_soon(c);
			return;
		}
	}
	int r = release ? evbuffer_add_reference(out, data, len, release, arg)
			: txb_evbuffer_add(out, data, len);
	if (r < 0) {
		if (release)
			release(data, len, arg);
		c->tx_err = -ENOMEM;
		conn_flush_soon(c);
	}
}

static void
conn_write(struct nbd_conn *c, const void *data, size_t len)
{
	conn_send(c, data, len, NULL, NULL);
}

static void
opt_reply(struct nbd_conn *c, uint32_t type, const void *data, uint32_t len)
{
	uint8_t h[20];
	put_be64(h, NBD_REP_MAGIC);
	put_be32(h + 8, c->opt);
	put_be32(h + 12, type);
	put_be32(h + 16, len);
	conn_write(c, h, sizeof(h));
	if (len)
		conn_write(c, data, len);
}

static void
simple_reply(struct nbd_conn *c, uint64_t cookie, uint32_t err)
{
	uint8_t h[16];
	put_be32(h, NBD_SIMPLE_REPLY_MAGIC);
	put_be32(h + 4, err);
	put_be64(h + 8, cookie);
	conn_write(c, h, sizeof(h));
}

static void
chunk_header(struct nbd_conn *c, uint64_t cookie, uint16_t flags, uint16_t type,
	     uint32_t len)
{
	uint8_t h[20];
	put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
	put_be16(h + 4, flags);
	put_be16(h + 6, type);
	put_be64(h + 8, cookie);
	put_be32(h + 16, len);
	conn_write(c, h, sizeof(h));
}

/* An error reply, in the form the command requires. */
static void
reply_error(struct nbd_conn *c, uint64_t cookie, uint16_t type, int err)
{
	uint32_t wire = nbd_errno_to_wire(err);
	if (c->structured && (type == NBD_CMD_READ || type == NBD_CMD_BLOCK_STATUS)) {
		uint8_t p[6];
		put_be32(p, wire);
		put_be16(p + 4, 0);
		chunk_header(c, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, sizeof(p));
		conn_write(c, p, sizeof(p));
		return;
	}
	simple_reply(c, cookie, wire);
}

static void
pool_release(const void *data, size_t len, void *arg)
{
	bufpool_put(arg, (void *)data, len);
}

static void
reply_read(struct nbd_conn *c, struct nbd_req *nr)
{
	struct bufpool *pool = c->ns->loop->pool;
	size_t len = nr->vr.td.length;

	if (c->structured) {
		uint8_t off[8];
		if (!len) {
			chunk_header(c, nr->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
			return;
		}
		chunk_header(c, nr->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
			     (uint32_t)(8 + len));
		put_be64(off, nr->vr.td.offset);
		conn_write(c, off, sizeof(off));
	} else {
		simple_reply(c, nr->cookie, 0);
	}
	if (len && c->bev) {
		/* the socket takes the buffer itself; the pool gets it back after */
		void *buf = nr->buf;
		nr->buf = NULL;
		conn_send(c, buf, len, pool_release, pool);
	}
}

/*
 * The dirty bitmap's extents over the range asked, at most max, in p (after its
 * context id): runs of 64 KiB blocks, clipped to the range asked. No log
 * (a reopen holds it this instant): all dirty, a backup copies more, never less.
 */
static uint32_t
dirty_extents(const struct vbd *vbd, const struct nbd_req *nr, uint32_t max, uint8_t *p)
{
	uint64_t at = nr->offset, end = nr->offset + nr->length;
	uint32_t n = 0;

	while (at < end && n < max) {
		uint64_t len = end - at;
		int dirty = 1;
		if (vbd->cbt) {
			uint64_t block = at / CBT_BLOCK_SIZE;
			uint64_t limit = (end - 1) / CBT_BLOCK_SIZE - block + 1;
			uint64_t run = cbt_run_length(vbd->cbt->want, block, limit);
			dirty = cbt_block_dirty(vbd->cbt, block);
			uint64_t run_end = (block + run) * CBT_BLOCK_SIZE;
			if (run_end < end)
				len = run_end - at;
		}
		if (len > UINT32_MAX - (CBT_BLOCK_SIZE - 1))	/* lengths are 32-bit on the wire */
			len = (UINT32_MAX / CBT_BLOCK_SIZE) * CBT_BLOCK_SIZE - at % CBT_BLOCK_SIZE;
		put_be32(p + 8 * n, (uint32_t)len);
		put_be32(p + 8 * n + 4, dirty ? NBD_STATE_DIRTY : 0);
		n++;
		at += len;
	}
	return n;
}

/* One chunk per context the client chose, the last one done. */
static void
reply_block_status(struct nbd_conn *c, struct nbd_req *nr)
{
	const struct td_request *td = &nr->vr.td;
	uint32_t n = td->nr_extents, max = (nr->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
	size_t room = 4 + 8 * (size_t)(n > max ? n : max);
	uint8_t *p = malloc(room);

	if (!p) {
		reply_error(c, nr->cookie, nr->type, ENOMEM);
		return;
	}
	if (c->meta & META_BASE) {
		put_be32(p, NBD_META_ID_BASE_ALLOCATION);
		for (uint32_t i = 0; i < n; i++) {
			uint32_t fl = 0;
			if (td->extents[i].flags & TD_EXTENT_HOLE)
				fl |= NBD_STATE_HOLE;
			if (td->extents[i].flags & TD_EXTENT_ZERO)
				fl |= NBD_STATE_ZERO;
			put_be32(p + 4 + 8 * i, (uint32_t)td->extents[i].length);
			put_be32(p + 8 + 8 * i, fl);
		}
		chunk_header(c, nr->cookie, (c->meta & META_DIRTY) ? 0 : NBD_REPLY_FLAG_DONE,
			     NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
		conn_write(c, p, 4 + 8 * n);
	}
	if (c->meta & META_DIRTY) {
		put_be32(p, NBD_META_ID_DIRTY_CBT);
		n = dirty_extents(nr->vr.vbd, nr, max, p + 4);
		chunk_header(c, nr->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
			     4 + 8 * n);
		conn_write(c, p, 4 + 8 * n);
	}
	free(p);
}

/* ---- transmission ---- */

static void
nbd_req_free(struct nbd_conn *c, struct nbd_req *nr)
{
	if (nr->buf)
		bufpool_put(c->ns->loop->pool, nr->buf, nr->buflen);
	free(nr->extents);
	vbd_request_put(&c->reqs, &nr->vr);
}

/*
 * Whether c may take no more input now: too many requests in flight, or too
 * much memory held for it (replies not yet sent, buffers of requests in
 * flight). Bounds what one client can make the server hold.
 */
static int
conn_over_budget(struct nbd_conn *c)
{
	size_t out = evbuffer_get_length(conn_output(c)) + txb_length(&c->txb);
	if (c->tls)
		out += tls_conn_unsent(c->tls);
	if (c->state == CS_OPT_HEADER)
		return out >= c->ns->max_hs_output;
	return c->inflight >= c->ns->max_inflight ||
	       out + c->inflight_bytes >= c->ns->max_output;
}

static void
conn_maybe_resume(struct nbd_conn *c)
{
	if (!c->bev)
		return;
	if (c->closing) {
		conn_finish(c);
		return;
	}
	if (c->state == CS_REQ_MEMWAIT) {
		conn_mem_resume(c);	/* a request came back: try now */
		return;
	}
	if (c->reading_paused && !conn_over_budget(c)) {
		c->reading_paused = 0;
		conn_read_enable(c, 1);
		conn_process(c);
	}
}

static void
nbd_req_complete(struct vbd_request *vr, int err)
{
	struct nbd_req *nr = (struct nbd_req *)vr;
	struct nbd_conn *c = nr->conn;

	c->inflight--;
	c->inflight_bytes -= nr->buflen;
	if (nr->answered)
		c->answered--;
	if (c->bev && !nr->answered) {
		if (err)
			reply_error(c, nr->cookie, nr->type, err);
		else if (nr->type == NBD_CMD_READ)
			reply_read(c, nr);
		else if (nr->type == NBD_CMD_BLOCK_STATUS)
			reply_block_status(c, nr);
		else
			simple_reply(c, nr->cookie, 0);
	}
	nbd_req_free(c, nr);
	if (!c->bev) {
		conn_maybe_free(c);
		return;
	}
	conn_maybe_resume(c);
}

/* The vbd's timeout: the client hears now; buffer and slot stay till the I/O is back. */
static void
nbd_req_timed_out(struct vbd_request *vr, int err)
{
	struct nbd_req *nr = (struct nbd_req *)vr;

	nr->answered = 1;
	nr->conn->answered++;
	if (nr->conn->bev)
		reply_error(nr->conn, nr->cookie, nr->type, err);
}

static enum td_op
cmd_to_op(uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ: return TD_OP_READ;
	case NBD_CMD_WRITE: return TD_OP_WRITE;
	case NBD_CMD_FLUSH: return TD_OP_FLUSH;
	case NBD_CMD_TRIM: return TD_OP_DISCARD;
	case NBD_CMD_WRITE_ZEROES: return TD_OP_WRITE_ZEROES;
	case NBD_CMD_BLOCK_STATUS: return TD_OP_BLOCK_STATUS;
	default: return TD_OP_CACHE;
	}
}

static struct nbd_req *
nbd_req_new(struct nbd_conn *c)
{
	struct nbd_req *nr = (struct nbd_req *)vbd_request_get(c->vbd, &c->reqs, sizeof(*nr));
	if (!nr)
		return NULL;
	nr->conn = c;
	nr->cookie = c->cur.cookie;
	nr->type = c->cur.type;
	nr->flags = c->cur.flags;
	nr->offset = c->cur.offset;
	nr->length = c->cur.length;
	nr->vr.td.op = cmd_to_op(c->cur.type);
	nr->vr.td.offset = c->cur.offset;
	nr->vr.td.length = c->cur.length;
	if (c->cur.flags & NBD_CMD_FLAG_FUA)
		nr->vr.td.flags |= TD_REQ_FUA;
	if (c->cur.flags & NBD_CMD_FLAG_NO_HOLE)
		nr->vr.td.flags |= TD_REQ_NO_HOLE;
	if (c->cur.flags & NBD_CMD_FLAG_FAST_ZERO)
		nr->vr.td.flags |= TD_REQ_FAST_ZERO;
	nr->vr.complete = nbd_req_complete;
	nr->vr.timed_out = nbd_req_timed_out;
	nr->vr.flow = c;
	return nr;
}

/* Gives nr a data buffer of its length, as its one iovec; 0, or -1 when out of memory. */
static int
nbd_req_attach_buf(struct nbd_conn *c, struct nbd_req *nr)
{
	size_t len = nr->vr.td.length;

	if (len) {
		nr->buf = bufpool_get(c->ns->loop->pool, len);
		if (!nr->buf)
			return -1;
		nr->buflen = len;
	}
	nr->iov.iov_base = nr->buf;
	nr->iov.iov_len = len;
	nr->vr.td.iov = &nr->iov;
	nr->vr.td.iovcnt = 1;
	return 0;
}

static void
conn_submit(struct nbd_conn *c, struct nbd_req *nr)
{
	c->inflight++;
	c->inflight_bytes += nr->buflen;
	vbd_submit(c->vbd, &nr->vr);
}

/* Checks a request against the export; 0 or the errno to answer. */
static int
request_check(struct nbd_conn *c, const struct nbd_request *r)
{
	const uint16_t known = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF |
			       NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;

	if (r->flags & ~known)
		return EINVAL;
	if ((r->flags & NBD_CMD_FLAG_DF) && (!c->structured || r->type != NBD_CMD_READ))
		return EINVAL;
	if ((r->flags & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) &&
	    r->type != NBD_CMD_WRITE_ZEROES)
		return EINVAL;
	switch (r->type) {
	case NBD_CMD_READ:
	case NBD_CMD_WRITE:
		if (r->length > NBD_MAX_REQUEST)
			return EINVAL;
		break;
	case NBD_CMD_FLUSH:
		if (r->offset || r->length)
			return EINVAL;
		return 0;
	case NBD_CMD_BLOCK_STATUS:
		if (!c->structured || !c->meta || !r->length)
			return EINVAL;
		break;
	case NBD_CMD_TRIM:
	case NBD_CMD_WRITE_ZEROES:
	case NBD_CMD_CACHE:
		break;
	default:
		return EINVAL;
	}
	/* bounds, alignment and read-only are the vbd's to check (vbd_start) */
	return 0;
}

/*
 * c->cur as a request with the memory it needs (its context, its data
 * buffer, its extents), or NULL when memory is short: the caller waits
 * (conn_mem_wait) instead of failing the request.
 */
static struct nbd_req *
nbd_req_prepare(struct nbd_conn *c)
{
	const struct nbd_request *r = &c->cur;
	struct nbd_req *nr = nbd_req_new(c);

	if (!nr)
		return NULL;
	if (r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) {
		if (nbd_req_attach_buf(c, nr) < 0)
			goto short_of_memory;
	} else if (r->type == NBD_CMD_BLOCK_STATUS) {
		unsigned max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
		nr->extents = calloc(max, sizeof(*nr->extents));
		if (!nr->extents)
			goto short_of_memory;
		nr->vr.td.extents = nr->extents;
		nr->vr.td.max_extents = max;
	}
	return nr;
short_of_memory:
	nbd_req_free(c, nr);
	return NULL;
}

#define NBD_MEM_RETRY_MS 10

/*
 * Out of memory for c->cur: stop reading and try again in resume when a
 * request of c comes back or after a moment. Back-pressure, as the client
 * sees it: its request waits, and never fails for want of memory here.
 */
static int
conn_mem_wait(struct nbd_conn *c, enum conn_state resume)
{
	struct timeval tv = { 0, NBD_MEM_RETRY_MS * 1000 };

	log_limited(&c->ns->rl, LOG_LVL_WARN, "nbd client %s: out of memory; its requests wait",
		    c->peer);
	c->mem_resume = resume;
	c->state = CS_REQ_MEMWAIT;
	conn_read_enable(c, 0);
	evtimer_add(c->mem_ev, &tv);
	return 0;
}

/* Memory may be there again: retry where conn_mem_wait stopped. */
static void
conn_mem_resume(struct nbd_conn *c)
{
	event_del(c->mem_ev);
	c->state = c->mem_resume;
	if (!c->reading_paused && !c->closing)
		conn_read_enable(c, 1);
	conn_process(c);
}

static void
conn_mem_retry(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	(void)fd;
	(void)what;
	if (c->state == CS_REQ_MEMWAIT)
		conn_mem_resume(c);
}

/* A request header has arrived. Returns 0 to continue, -1 if c is gone. */
static int
conn_request(struct nbd_conn *c)
{
	struct nbd_request *r = &c->cur;
	int err;

	if (r->type == NBD_CMD_DISC) {
		conn_finish(c);
		return -1;
	}
	if (!c->vbd) {
		conn_finish(c);
		return -1;
	}
	err = request_check(c, r);
	if (r->type == NBD_CMD_WRITE) {
		if (err) {
			/* the payload still arrives: swallow it, then answer */
			c->discard_left = r->length;
			c->discard_err = err;
			c->state = CS_REQ_DISCARD;
			return 0;
		}
		c->state = CS_REQ_PAYLOAD;
		return 0;
	}
	if (err) {
		reply_error(c, r->cookie, r->type, err);
		return 0;
	}
	struct nbd_req *nr = nbd_req_prepare(c);
	if (!nr)
		return conn_mem_wait(c, CS_REQ_READY);
	conn_submit(c, nr);
	return 0;
}

/* ---- transmission input ---- */

static void
conn_read_enable(struct nbd_conn *c, int on)
{
	if (c->rx_ev) {
		if (on)
			event_add(c->rx_ev, NULL);
		else
			event_del(c->rx_ev);
	} else if (on) {
		bufferevent_enable(c->bev, EV_READ);
	} else {
		bufferevent_disable(c->bev, EV_READ);
	}
}

static void
conn_rx_readable(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	(void)fd;
	(void)what;
	c->rx_drained = 0;
	conn_process(c);
}

/*
 * Transmission on a socket reads into c's own buffer from here on (what
 * the bufferevent has read already moves over). Without a socket (a
 * bufferevent pair), or short of memory, the bufferevent goes on reading.
 */
static void
conn_rx_start(struct nbd_conn *c)
{
	int fd = bufferevent_getfd(c->bev);
	struct evbuffer *in = bufferevent_get_input(c->bev);
	size_t room, cap = c->ns->direct_payload + NBD_RX_SLACK;

	if (fd < 0 || evbuffer_get_length(in) > cap || rxbuf_init(&c->rx, cap) < 0)
		return;
	c->direct_payload = c->ns->direct_payload;
	c->rx_ev = event_new(bufferevent_get_base(c->bev), fd, EV_READ | EV_PERSIST,
			     conn_rx_readable, c);
	if (!c->rx_ev) {
		rxbuf_free(&c->rx);
		return;
	}
	uint8_t *p = rxbuf_space(&c->rx, &room);
	int got = evbuffer_remove(in, p, room);
	rxbuf_commit(&c->rx, got > 0 ? (size_t)got : 0);
	bufferevent_disable(c->bev, EV_READ);
	if (!c->reading_paused && !c->closing)
		event_add(c->rx_ev, NULL);
}

/* The socket ended or failed (err: a negative errno, 0 for end of stream). */
static void
conn_rx_failed(struct nbd_conn *c, int err)
{
	if (err && err != -ECONNRESET)
		log_limited(&c->ns->rl, LOG_LVL_INFO, "nbd client %s: %s", c->peer,
			    strerror(-err));
	conn_cut(c);
}

/* Whether want bytes of input are there: 1, 0 to wait, -1 if c is gone. */
static int
in_have(struct nbd_conn *c, size_t want)
{
	if (!c->rx.data)
		return evbuffer_get_length(bufferevent_get_input(c->bev)) >= want;
	while (rxbuf_len(&c->rx) < want) {
		/* a short read emptied the socket: epoll says when there is more */
		if (c->rx_drained)
			return 0;
		ssize_t n = rxbuf_fill(&c->rx, bufferevent_getfd(c->bev));
		if (n == -EAGAIN) {
			c->rx_drained = 1;
			return 0;
		}
		if (n <= 0) {
			conn_rx_failed(c, (int)n);
			return -1;
		}
		c->rx_drained = c->rx.tail < c->rx.cap;
	}
	return 1;
}

static size_t
in_length(struct nbd_conn *c)
{
	return c->rx.data ? rxbuf_len(&c->rx) : evbuffer_get_length(bufferevent_get_input(c->bev));
}

/* Takes n bytes (that in_have found) into dst, or drops them (dst NULL). */
static void
in_take(struct nbd_conn *c, void *dst, size_t n)
{
	struct evbuffer *in = c->rx.data ? NULL : bufferevent_get_input(c->bev);

	if (!dst && in)
		evbuffer_drain(in, n);
	else if (!dst)
		rxbuf_consume(&c->rx, n);
	else if (in)
		evbuffer_remove(in, dst, n);
	else
		rxbuf_take(&c->rx, dst, n);
}

/* The whole write payload is in the input buffer; it stays there while memory is short. */
static int
conn_write_payload(struct nbd_conn *c)
{
	struct nbd_req *nr = nbd_req_prepare(c);

	if (!nr)
		return conn_mem_wait(c, CS_REQ_PAYLOAD);
	c->state = CS_REQ_HEADER;
	in_take(c, nr->buf, c->cur.length);
	conn_submit(c, nr);
	return 1;
}

/*
 * A large write payload goes from the socket straight into the request's
 * buffer (only what the receive buffer already holds is copied). Returns 1
 * when it is complete or being discarded, 0 to wait for the socket, -1 if
 * c is gone.
 */
static int
conn_recv_payload(struct nbd_conn *c)
{
	size_t len = c->cur.length;

	if (!c->payload) {
		if (!(c->payload = nbd_req_prepare(c)))
			return conn_mem_wait(c, CS_REQ_PAYLOAD);
		c->payload_got = 0;
	}
	char *buf = c->payload->buf;
	c->payload_got += rxbuf_take(&c->rx, buf + c->payload_got, len - c->payload_got);
	while (c->payload_got < len) {
		ssize_t n = recv(bufferevent_getfd(c->bev), buf + c->payload_got,
				 len - c->payload_got, MSG_DONTWAIT);
		if (n > 0)
			c->payload_got += (size_t)n;
		else if (n < 0 && errno == EINTR)
			continue;
		else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		else {
			conn_rx_failed(c, n < 0 ? -errno : 0);
			return -1;
		}
	}
	struct nbd_req *nr = c->payload;
	c->payload = NULL;
	c->state = CS_REQ_HEADER;
	conn_submit(c, nr);
	return 1;
}

/* ---- handshake ---- */

static struct vbd *
export_find(struct nbd_conn *c, const char *name)
{
	struct vbd *vbd = NULL;

	if (c->default_vbd) {
		char own[16];
		snprintf(own, sizeof(own), "%d", c->default_vbd->minor);
		if (!*name || strcmp(name, own) == 0)
			vbd = c->default_vbd;
	} else {
		/* canonical decimal only: "07", "+7" or " 7" name nothing */
		size_t n = strspn(name, "0123456789");
		if (n && n <= 4 && !name[n] && (name[0] != '0' || n == 1))
			vbd = server_vbd(c->ns->srv, atoi(name));
	}
	/* another loop's vbd is not ours to look at: conn_step hands c over first */
	if (vbd && vbd->loop != c->ns->loop)
		return NULL;
	/* a paused vbd is still an export: its requests just wait */
	if (vbd && ((vbd->state & (VBD_CLOSED | VBD_SHUTDOWN_REQUESTED | VBD_DEAD)) ||
		    !vbd->params))
		return NULL;
	return vbd;
}

static uint16_t
export_flags(const struct nbd_conn *c, const struct vbd *vbd)
{
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
		     NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
	if (c->structured)
		f |= NBD_FLAG_SEND_DF;
	if (vbd->readonly)
		f |= NBD_FLAG_READ_ONLY;
	else
		f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
	return f;
}

static void
info_reply(struct nbd_conn *c, const uint8_t *p, uint32_t len)
{
	opt_reply(c, NBD_REP_INFO, p, len);
}

static void
info_string(struct nbd_conn *c, uint16_t type, const char *s)
{
	size_t n = strlen(s);
	uint8_t *p = malloc(2 + n);
	if (!p)
		return;
	put_be16(p, type);
	memcpy(p + 2, s, n);
	info_reply(c, p, (uint32_t)(2 + n));
	free(p);
}

static void
start_transmission(struct nbd_conn *c, struct vbd *vbd)
{
	conn_bind(c, vbd);
	c->state = CS_REQ_HEADER;
	/* contexts chosen for another export do not carry over */
	if (c->meta_export && export_find(c, c->meta_export) != vbd)
		c->meta = 0;
	/* a vbd that tracks no changes has no dirty bitmap to report */
	if (!vbd->cbt)
		c->meta &= ~META_DIRTY;
	if (c->deadline) {
		event_free(c->deadline);
		c->deadline = NULL;
	}
}

static void
opt_go(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	struct nbd_opt_go go;
	uint32_t rc = nbd_parse_opt_go(data, len, &go);
	uint8_t buf[14];

	if (rc) {
		opt_reply(c, rc, NULL, 0);
		return;
	}
	struct vbd *vbd = export_find(c, go.name);
	if (!vbd) {
		opt_reply(c, NBD_REP_ERR_UNKNOWN, NULL, 0);
		return;
	}
	put_be16(buf, NBD_INFO_EXPORT);
	put_be64(buf + 2, vbd->size);
	put_be16(buf + 10, export_flags(c, vbd));
	info_reply(c, buf, 12);

	put_be16(buf, NBD_INFO_BLOCK_SIZE);
	put_be32(buf + 2, vbd->min_io);
	put_be32(buf + 6, NBD_PREFERRED_BLOCK);
	put_be32(buf + 10, NBD_MAX_REQUEST);
	info_reply(c, buf, 14);

	if (go.want_name)
		info_string(c, NBD_INFO_NAME, go.name);
	if (go.want_description)
		info_string(c, NBD_INFO_DESCRIPTION, vbd->params);
	opt_reply(c, NBD_REP_ACK, NULL, 0);
	if (c->opt == NBD_OPT_GO)
		start_transmission(c, vbd);
}

static void
opt_export_name(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	char name[NBD_MAX_STRING + 1];
	uint8_t buf[10 + 124] = { 0 };

	if (len > NBD_MAX_STRING || memchr(data, 0, len)) {
		conn_protocol_error(c, "bad export name");
		return;
	}
	memcpy(name, data, len);
	name[len] = '\0';
	struct vbd *vbd = export_find(c, name);
	if (!vbd) {
		/* no way to report an error to EXPORT_NAME but hanging up */
		conn_protocol_error(c, "unknown export");
		return;
	}
	put_be64(buf, vbd->size);
	put_be16(buf + 8, export_flags(c, vbd));
	conn_write(c, buf, (c->cflags & NBD_FLAG_C_NO_ZEROES) ? 10 : sizeof(buf));
	start_transmission(c, vbd);
}

/* One NBD_REP_SERVER: the export's name (its minor) and its params as description. */
static void
list_reply_one(struct nbd_conn *c, int minor, const char *params)
{
	char name[16];
	int n = snprintf(name, sizeof(name), "%d", minor);
	size_t dlen = strlen(params);
	uint8_t *p = malloc(4 + (size_t)n + dlen);

	if (!p)
		return;
	put_be32(p, (uint32_t)n);
	memcpy(p + 4, name, (size_t)n);
	memcpy(p + 4 + n, params, dlen);
	opt_reply(c, NBD_REP_SERVER, p, (uint32_t)(4 + (size_t)n + dlen));
	free(p);
}

/* server_gather's doc, on each vbd's loop: what LIST says of it. */
static json_t *
list_doc(struct vbd *vbd, void *arg)
{
	(void)arg;
	if (!vbd->params || (vbd->state & (VBD_CLOSED | VBD_SHUTDOWN_REQUESTED | VBD_DEAD)))
		return NULL;
	return json_pack("{s:i, s:s}", "minor", vbd->minor, "params", vbd->params);
}

static void
list_gathered(json_t *all, void *arg)
{
	struct nbd_conn *c = arg;
	json_t *v;
	size_t i;

	c->listing = 0;
	if (c->bev) {
		json_array_foreach(json_object_get(all, "vbds"), i, v)
			list_reply_one(c, (int)json_integer_value(json_object_get(v, "minor")),
				       json_string_value(json_object_get(v, "params")));
		opt_reply(c, NBD_REP_ACK, NULL, 0);
	}
	json_decref(all);
	if (!c->bev) {
		conn_maybe_free(c);
		return;
	}
	conn_read_enable(c, 1);
	conn_process(c);	/* the options that came after LIST; may free c */
}

static void
opt_list(struct nbd_conn *c, uint32_t len)
{
	if (len) {
		opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
		return;
	}
	if (c->default_vbd) {	/* ours, on this loop */
		list_reply_one(c, c->default_vbd->minor, c->default_vbd->params);
		opt_reply(c, NBD_REP_ACK, NULL, 0);
		return;
	}
	/* every loop's vbds, each described on its own loop; c waits meanwhile */
	if (server_gather(c->ns->srv, list_doc, NULL, list_gathered, c) < 0) {
		opt_reply(c, NBD_REP_ERR_PLATFORM, NULL, 0);	/* out of memory, for now */
		return;
	}
	c->listing = 1;
	conn_read_enable(c, 0);
}

struct meta_walk {
	struct nbd_conn *c;
	int list;
	unsigned offered;	/* META_*: what the export has */
	unsigned matched;
};

static void
meta_reply(struct meta_walk *w, unsigned bit, uint32_t id, const char *name)
{
	uint8_t p[4 + NBD_MAX_STRING];
	size_t len = strlen(name);

	if (!(w->offered & bit) || (w->matched & bit))
		return;
	w->matched |= bit;
	put_be32(p, id);
	memcpy(p + 4, name, len);
	opt_reply(w->c, NBD_REP_META_CONTEXT, p, (uint32_t)(4 + len));
}

/*
 * SET names a context exactly; LIST may also name a namespace ("base:",
 * "qemu:") or, in qemu's, a family ("qemu:dirty-bitmap:") for all it holds.
 */
static void
meta_query(const char *q, uint32_t qlen, void *arg)
{
	struct meta_walk *w = arg;
	(void)qlen;
	if (strcmp(q, NBD_META_BASE_ALLOCATION) == 0 || (w->list && strcmp(q, "base:") == 0))
		meta_reply(w, META_BASE, NBD_META_ID_BASE_ALLOCATION, NBD_META_BASE_ALLOCATION);
	if (strcmp(q, NBD_META_DIRTY_CBT) == 0 ||
	    (w->list && (strcmp(q, "qemu:") == 0 || strcmp(q, "qemu:dirty-bitmap:") == 0)))
		meta_reply(w, META_DIRTY, NBD_META_ID_DIRTY_CBT, NBD_META_DIRTY_CBT);
}

static void
opt_meta(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	char name[NBD_MAX_STRING + 1];
	struct meta_walk w = { c, c->opt == NBD_OPT_LIST_META_CONTEXT, META_BASE, 0 };
	struct vbd *vbd;
	uint32_t nq = 0, rc;

	if (!w.list && !c->structured) {
		opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
		return;
	}
	/* parse fully first: a bad query must not leave half the replies sent */
	rc = nbd_parse_opt_meta(data, len, name, NULL, NULL, &nq);
	if (rc == 0 && !(vbd = export_find(c, name)))
		rc = NBD_REP_ERR_UNKNOWN;
	if (rc) {
		opt_reply(c, rc, NULL, 0);
		return;
	}
	if (vbd->cbt)
		w.offered |= META_DIRTY;
	if (w.list && nq == 0) {
		meta_query(NBD_META_BASE_ALLOCATION, 0, &w);
		meta_query(NBD_META_DIRTY_CBT, 0, &w);
	} else
		nbd_parse_opt_meta(data, len, name, meta_query, &w, &nq);
	if (!w.list) {
		c->meta = w.matched;
		free(c->meta_export);
		c->meta_export = strdup(name);
	}
	opt_reply(c, NBD_REP_ACK, NULL, 0);
}

/*
 * STARTTLS: acknowledged in plaintext; the TLS handshake starts once the
 * option is consumed (conn_starttls). What was negotiated before it does
 * not carry over (the NBD spec: a client negotiates again under TLS).
 */
static void
opt_starttls(struct nbd_conn *c, uint32_t len)
{
	if (c->tls_mode == TLS_OFF) {
		opt_reply(c, NBD_REP_ERR_UNSUP, NULL, 0);
		return;
	}
	if (c->tls || len) {
		opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
		return;
	}
	c->structured = 0;
	c->meta = 0;
	free(c->meta_export);
	c->meta_export = NULL;
	opt_reply(c, NBD_REP_ACK, NULL, 0);
	c->tls_start = 1;
}

/*
 * Under --tls require, before TLS: every option but STARTTLS (and ABORT,
 * which grants nothing) is refused, and EXPORT_NAME, which has no error
 * reply, closes the connection. 1 if the option was refused here.
 */
static int
option_needs_tls(struct nbd_conn *c)
{
	if (c->tls_mode != TLS_REQUIRE || c->tls || c->opt == NBD_OPT_STARTTLS ||
	    c->opt == NBD_OPT_ABORT)
		return 0;
	if (c->opt == NBD_OPT_EXPORT_NAME)
		conn_protocol_error(c, "NBD_OPT_EXPORT_NAME before TLS (--tls require)");
	else
		opt_reply(c, NBD_REP_ERR_TLS_REQD, NULL, 0);
	return 1;
}

/* A whole option has arrived; it may end the handshake or the connection. */
static void
conn_option(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	switch (c->opt) {
	case NBD_OPT_EXPORT_NAME:
		opt_export_name(c, data, len);
		break;
	case NBD_OPT_ABORT:
		opt_reply(c, NBD_REP_ACK, NULL, 0);
		conn_finish(c);
		break;
	case NBD_OPT_LIST:
		opt_list(c, len);
		break;
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		opt_go(c, data, len);
		break;
	case NBD_OPT_STRUCTURED_REPLY:
		if (len) {
			opt_reply(c, NBD_REP_ERR_INVALID, NULL, 0);
			break;
		}
		c->structured = 1;
		opt_reply(c, NBD_REP_ACK, NULL, 0);
		break;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		opt_meta(c, data, len);
		break;
	case NBD_OPT_STARTTLS:
		opt_starttls(c, len);
		break;
	default:	/* EXTENDED_HEADERS and unknown ones */
		opt_reply(c, NBD_REP_ERR_UNSUP, NULL, 0);
		break;
	}
}

/* ---- input state machine ---- */

/* Transmission: as conn_step. */
static int
conn_step_transmission(struct nbd_conn *c)
{
	uint8_t hdr[NBD_REQUEST_LEN];
	int r;

	if (!c->rx.data)
		conn_rx_start(c);
	switch (c->state) {
	case CS_REQ_DISCARD: {
		/* a refused WRITE of length 0 has nothing to swallow: answer now, not on the next byte */
		if (c->discard_left) {
			if ((r = in_have(c, 1)) <= 0)
				return r;
			size_t n = in_length(c);
			n = n < c->discard_left ? n : c->discard_left;
			in_take(c, NULL, n);
			c->discard_left -= n;
			if (c->discard_left)
				return 0;
		}
		reply_error(c, c->cur.cookie, c->cur.type, c->discard_err);
		c->state = CS_REQ_HEADER;
		return 1;
	}
	case CS_REQ_HEADER:
		if (conn_over_budget(c)) {
			c->reading_paused = 1;
			conn_read_enable(c, 0);
			return 0;
		}
		if ((r = in_have(c, NBD_REQUEST_LEN)) <= 0)
			return r;
		in_take(c, hdr, NBD_REQUEST_LEN);
		if (nbd_parse_request(hdr, &c->cur) < 0) {
			conn_protocol_error(c, "bad request magic");
			return -1;
		}
		return conn_request(c) < 0 ? -1 : 1;
	case CS_REQ_PAYLOAD:
		if (c->cur.length >= c->direct_payload && c->rx.data)
			return conn_recv_payload(c);
		if ((r = in_have(c, c->cur.length)) <= 0)
			return r;
		return conn_write_payload(c);
	case CS_REQ_READY:
		c->state = CS_REQ_HEADER;
		return conn_request(c) < 0 ? -1 : 1;
	default:
		return 0;
	}
}

/* ---- hand-off to the loop of the chosen export ---- */

/*
 * A connection on the shared listener moves to the loop of the export an
 * option names, before the option is processed there: the socket (a dup),
 * the handshake's state, and the bytes read but not processed or queued
 * but not sent travel in one message.
 */
struct nbd_handoff {
	struct mailbox_msg msg;
	struct nbd_server *to;
	int fd;
	uint32_t cflags, opt, opt_len;
	int structured;
	unsigned meta;
	char *meta_export;
	unsigned hops;
	struct timespec started;
	char peer[64];
	void *in, *out;
	size_t in_len, out_len;
	enum tls_mode tls_mode;
	struct tls_moving *tls;		/* the session, when c had one */
};

/* The loop of the export named by the option c is about to process, or NULL. */
static struct loop *
option_export_loop(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	char name[NBD_MAX_STRING + 1];
	struct nbd_opt_go go;
	uint32_t nq;
	const char *n = NULL;

	switch (c->opt) {
	case NBD_OPT_EXPORT_NAME:
		if (len > NBD_MAX_STRING || memchr(data, 0, len))
			return NULL;
		memcpy(name, data, len);
		name[len] = '\0';
		n = name;
		break;
	case NBD_OPT_GO:
	case NBD_OPT_INFO:
		if (nbd_parse_opt_go(data, len, &go) == 0) {
			memcpy(name, go.name, sizeof(name));
			n = name;
		}
		break;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		if (nbd_parse_opt_meta(data, len, name, NULL, NULL, &nq) == 0)
			n = name;
		break;
	default:
		break;
	}
	size_t digits = n ? strspn(n, "0123456789") : 0;
	if (!digits || digits > 4 || n[digits] || (n[0] == '0' && digits > 1))
		return NULL;
	return server_vbd_loop(c->ns->srv, atoi(n));
}

static void *
evbuffer_take_all(struct evbuffer *b, size_t *len)
{
	void *p;

	*len = evbuffer_get_length(b);
	if (!*len)
		return NULL;
	if ((p = malloc(*len)))
		evbuffer_remove(b, p, *len);
	return p;
}

static void nbd_adopt(struct mailbox_msg *m);

/* 0: c is gone (its socket travels to l); -1: it stays here. */
static int
conn_handoff(struct nbd_conn *c, struct loop *l)
{
	struct nbd_handoff *h = calloc(1, sizeof(*h));

	conn_flush(c);	/* the batch behind what the bufferevent holds */
	if (!h || c->tx_err || (h->fd = dup(c->tls ? tls_conn_fd(c->tls)
						  : bufferevent_getfd(c->bev))) < 0) {
		free(h);
		return -1;
	}
	/* TLS: the session travels; its unsent plaintext goes first on the other side */
	if (c->tls && tls_conn_detach(c->tls, &h->tls, &h->out, &h->out_len) < 0) {
		close(h->fd);
		free(h);
		return -1;
	}
	h->in = evbuffer_take_all(bufferevent_get_input(c->bev), &h->in_len);
	if (!h->tls)
		h->out = evbuffer_take_all(conn_output(c), &h->out_len);
	if ((h->in_len && !h->in) || (h->out_len && !h->out)) {
		/* cannot be undone: the bytes are gone from the buffers */
		close(h->fd);
		free(h->in);
		free(h->out);
		tls_moving_free(h->tls);
		free(h);
		conn_protocol_error(c, "out of memory handing the connection over");
		return 0;
	}
	h->to = l->nbd;
	h->cflags = c->cflags;
	h->opt = c->opt;
	h->opt_len = c->opt_len;
	h->structured = c->structured;
	h->meta = c->meta;
	h->meta_export = c->meta_export;
	c->meta_export = NULL;
	h->hops = c->hops + 1;
	h->tls_mode = c->tls_mode;
	h->started = c->started;
	memcpy(h->peer, c->peer, sizeof(h->peer));
	conn_cut(c);
	h->msg.fn = nbd_adopt;
	loop_post(l, &h->msg);
	return 0;
}

/* ---- TLS (nbd_tls.c): the session between the socket and c->bev ---- */

static void conn_bev_setup(struct nbd_conn *c);

/* The session's news: it failed or the peer left, or what c wrote has gone out. */
static void
conn_tls_event(void *arg, int what)
{
	struct nbd_conn *c = arg;

	if (what == TLS_EV_CLOSED)
		conn_cut(c);
	else
		conn_maybe_resume(c);	/* as a socket bufferevent's write callback */
}

/*
 * After STARTTLS's reply: the socket goes under a TLS session and c reads
 * and writes its plaintext end from here on. 1 to go on (the handshake
 * runs from the loop), -1 if c is gone.
 */
static int
conn_starttls(struct nbd_conn *c)
{
	struct nbd_server *ns = c->ns;
	struct bufferevent *plain;
	size_t plen;
	int fd, err;

	c->tls_start = 0;
	if (evbuffer_get_length(bufferevent_get_input(c->bev))) {
		conn_protocol_error(c, "data sent before the TLS handshake");
		return -1;
	}
	conn_flush(c);		/* the reply, in plaintext */
	if (c->tx_err) {
		conn_cut(c);
		return -1;
	}
	void *prefix = evbuffer_take_all(conn_output(c), &plen);
	if ((plen && !prefix) || (fd = dup(bufferevent_getfd(c->bev))) < 0) {
		free(prefix);
		conn_protocol_error(c, "cannot start TLS (out of memory or descriptors)");
		return -1;
	}
	struct tls_conn *t = tls_conn_new(ns->loop->base, ns->srv->tls, fd, prefix, plen, c->peer,
					  &ns->rl, conn_tls_event, c, &plain, &err);
	free(prefix);
	if (!t) {
		conn_protocol_error(c, err == -ENOMEM ? "out of memory starting TLS"
						      : "cannot start a TLS session");
		return -1;
	}
	bufferevent_free(c->bev);
	c->bev = plain;
	c->tls = t;
	conn_bev_setup(c);
	return 1;
}

/* Advances by one message; returns 1 to go on, 0 to wait for input, -1 if c is gone. */
static int
conn_step(struct nbd_conn *c)
{
	struct evbuffer *in = bufferevent_get_input(c->bev);	/* the handshake's */
	size_t avail = evbuffer_get_length(in);
	uint8_t hdr[NBD_OPT_HEADER_LEN];

	switch (c->state) {
	case CS_CLIENT_FLAGS:
		if (avail < 4)
			return 0;
		evbuffer_remove(in, hdr, 4);
		c->cflags = get_be32(hdr);
		if (c->cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
			conn_protocol_error(c, "unknown client flags");
			return -1;
		}
		c->state = CS_OPT_HEADER;
		return 1;
	case CS_OPT_HEADER:
		if (conn_over_budget(c)) {
			/* the client is not reading its replies: stop reading options */
			c->reading_paused = 1;
			bufferevent_disable(c->bev, EV_READ);
			return 0;
		}
		if (avail < NBD_OPT_HEADER_LEN)
			return 0;
		evbuffer_remove(in, hdr, NBD_OPT_HEADER_LEN);
		if (get_be64(hdr) != NBD_IHAVEOPT) {
			conn_protocol_error(c, "bad option magic");
			return -1;
		}
		c->opt = get_be32(hdr + 8);
		c->opt_len = get_be32(hdr + 12);
		if (c->opt_len > NBD_MAX_OPTION_LEN) {
			if (c->opt_len > NBD_DISCARD_LIMIT || c->opt == NBD_OPT_EXPORT_NAME) {
				conn_protocol_error(c, "oversized option");
				return -1;
			}
			c->discard_left = c->opt_len;
			c->state = CS_OPT_DISCARD;
			return 1;
		}
		c->state = CS_OPT_DATA;
		return 1;
	case CS_OPT_DATA: {
		if (avail < c->opt_len)
			return 0;
		const uint8_t *data = evbuffer_pullup(in, c->opt_len);
		if (c->tls_mode == TLS_REQUIRE && !c->tls && option_needs_tls(c)) {
			if (!c->bev)
				return -1;
			c->state = CS_OPT_HEADER;
			evbuffer_drain(in, c->opt_len);
			return 1;
		}
		if (!c->default_vbd && c->hops < NBD_MAX_HOPS) {
			struct loop *l = option_export_loop(c, data ? data : (const uint8_t *)"",
							    c->opt_len);
			if (l && l != c->ns->loop && conn_handoff(c, l) == 0)
				return -1;
		}
		c->state = CS_OPT_HEADER;
		conn_option(c, data ? data : (const uint8_t *)"", c->opt_len);
		if (!c->bev)
			return -1;	/* and in went with it */
		evbuffer_drain(in, c->opt_len);
		if (c->tls_start)
			return conn_starttls(c);
		return c->closing ? -1 : 1;
	}
	case CS_OPT_DISCARD: {
		size_t n = avail < c->discard_left ? avail : c->discard_left;
		evbuffer_drain(in, n);
		c->discard_left -= n;
		if (c->discard_left)
			return 0;
		opt_reply(c, NBD_REP_ERR_TOO_BIG, NULL, 0);
		c->state = CS_OPT_HEADER;
		return 1;
	}
	default:
		return conn_step_transmission(c);
	}
	return 0;
}

static void
conn_process(struct nbd_conn *c)
{
	if (c->in_process || !c->bev)
		return;
	c->in_process = 1;
	/* a LIST gathering from the loops answers first: the options after it wait */
	while (c->bev && !c->closing && !c->listing && conn_step(c) > 0)
		;
	c->in_process = 0;
	conn_maybe_free(c);
}

static void
conn_read_cb(struct bufferevent *bev, void *arg)
{
	(void)bev;
	conn_process(arg);
}

static void
conn_write_cb(struct bufferevent *bev, void *arg)
{
	struct nbd_conn *c = arg;
	(void)bev;
	conn_maybe_resume(c);
}

/* The loop turn is over: its replies go out together. */
static void
conn_flush_cb(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	(void)fd;
	(void)what;

	c->flush_pending = 0;
	if (!c->bev)
		return;
	conn_flush(c);
	if (c->tx_err) {
		if (c->tx_err != -EPIPE && c->tx_err != -ECONNRESET)
			log_limited(&c->ns->rl, LOG_LVL_INFO, "nbd client %s: %s", c->peer,
				    strerror(-c->tx_err));
		conn_cut(c);
		return;
	}
	conn_maybe_resume(c);
}

static void
conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct nbd_conn *c = arg;
	(void)bev;

	if ((what & BEV_EVENT_ERROR) && EVUTIL_SOCKET_ERROR() != ECONNRESET &&
		 EVUTIL_SOCKET_ERROR() != EPIPE)
		log_limited(&c->ns->rl, LOG_LVL_INFO, "nbd client %s: %s", c->peer,
			    strerror(EVUTIL_SOCKET_ERROR()));
	conn_cut(c);
}

static void
conn_handshake_expired(evutil_socket_t fd, short what, void *arg)
{
	struct nbd_conn *c = arg;
	(void)fd;
	(void)what;
	conn_protocol_error(c, "handshake not finished in time");
}

/* Stop reading; close once every reply has been handed to the socket. */
static void
conn_finish(struct nbd_conn *c)
{
	c->closing = 1;
	if (!c->bev) {
		conn_maybe_free(c);
		return;
	}
	conn_read_enable(c, 0);
	/* the client waits for no answered request: the socket can go before their I/O */
	if (c->inflight > c->answered)
		return;
	conn_flush(c);
	if (c->tx_err) {
		conn_cut(c);
		return;
	}
	if (evbuffer_get_length(conn_output(c)) == 0 && !(c->tls && tls_conn_unsent(c->tls))) {
		conn_cut(c);
		return;
	}
	/* conn_write_cb (TLS: conn_tls_event) fires when the output has drained */
	bufferevent_enable(c->bev, EV_WRITE);
}

/* A connection on bev (taken), its handshake due within secs. NULL if it could not be made. */
static struct nbd_conn *
conn_new(struct nbd_server *ns, struct bufferevent *bev, struct vbd *vbd, time_t secs)
{
	struct nbd_conn *c = calloc(1, sizeof(*c));

	if (!c) {
		bufferevent_free(bev);
		return NULL;
	}
	c->ns = ns;
	c->bev = bev;
	c->default_vbd = vbd;
	c->reqs = (struct freelist)FREELIST_INIT(ns->max_inflight);
	snprintf(c->peer, sizeof(c->peer), "#%u.%ju", ns->loop->index,
		 (uintmax_t)++ns->conn_serial);
	clock_gettime(CLOCK_MONOTONIC, &c->started);
	LIST_INSERT_HEAD(&ns->conns, c, link);
	ns->srv->nr_conns++;
	if (vbd)
		conn_bind(c, vbd);

	struct timeval tv = { secs, 0 };
	c->deadline = evtimer_new(bufferevent_get_base(bev), conn_handshake_expired, c);
	if (c->deadline)
		evtimer_add(c->deadline, &tv);
	c->flush_ev = event_new(bufferevent_get_base(bev), -1, 0, conn_flush_cb, c);
	c->mem_ev = evtimer_new(bufferevent_get_base(bev), conn_mem_retry, c);
	if (!c->flush_ev || !c->mem_ev) {
		conn_cut(c);
		return NULL;
	}
	c->tls_mode = vbd ? (ns->srv->tls ? TLS_ON : TLS_OFF) : ns->srv->tls_mode;
	conn_bev_setup(c);
	return c;
}

/* c reads and writes c->bev: a socket's, or the plaintext end of its TLS session. */
static void
conn_bev_setup(struct nbd_conn *c)
{
	bufferevent_setcb(c->bev, conn_read_cb, conn_write_cb, conn_event_cb, c);
	bufferevent_set_max_single_read(c->bev, 1 << 20);
	/* libevent writes 16 KiB per loop turn otherwise */
	bufferevent_set_max_single_write(c->bev, NBD_UNIX_SNDBUF);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

void
nbd_serve(struct nbd_server *ns, struct bufferevent *bev, struct vbd *vbd)
{
	struct nbd_conn *c = conn_new(ns, bev, vbd, (time_t)ns->srv->nbd_handshake_secs);
	uint8_t greet[18];

	if (!c)
		return;
	put_be64(greet, NBD_MAGIC);
	put_be64(greet + 8, NBD_IHAVEOPT);
	put_be16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	conn_write(c, greet, sizeof(greet));
}

static void
handoff_free(struct nbd_handoff *h)
{
	free(h->meta_export);
	free(h->in);
	free(h->out);
	tls_moving_free(h->tls);
	free(h);
}

/* On the export's loop: the connection goes on where it was cut. */
static void
nbd_adopt(struct mailbox_msg *m)
{
	struct nbd_handoff *h = (struct nbd_handoff *)m;
	struct nbd_server *ns = h->to;
	struct timespec now;
	struct bufferevent *bev;
	struct nbd_conn *c;

	clock_gettime(CLOCK_MONOTONIC, &now);
	time_t left = h->started.tv_sec + (time_t)ns->srv->nbd_handshake_secs - now.tv_sec;
	struct tls_conn *t = NULL;
	int err;

	if (ns->srv->stopping) {
		close(h->fd);
		handoff_free(h);
		return;
	}
	if (h->tls) {
		t = tls_conn_attach(ns->loop->base, h->tls, h->fd, h->peer, &ns->rl, &bev, &err);
		h->tls = NULL;	/* consumed, and the descriptor with it */
		if (!t) {
			handoff_free(h);
			return;
		}
	} else if (!(bev = bufferevent_socket_new(ns->loop->base, h->fd, BEV_OPT_CLOSE_ON_FREE))) {
		close(h->fd);
		handoff_free(h);
		return;
	}
	if (!(c = conn_new(ns, bev, NULL, left > 0 ? left : 0))) {
		tls_conn_free(t);
		handoff_free(h);
		return;
	}
	if (t) {
		c->tls = t;
		tls_conn_set_owner(t, conn_tls_event, c);
	}
	c->tls_mode = h->tls_mode;
	c->cflags = h->cflags;
	c->opt = h->opt;
	c->opt_len = h->opt_len;
	c->structured = h->structured;
	c->meta = h->meta;
	c->meta_export = h->meta_export;
	h->meta_export = NULL;
	c->hops = h->hops;
	c->started = h->started;
	memcpy(c->peer, h->peer, sizeof(c->peer));
	c->state = CS_OPT_DATA;
	/* a bufferevent's input is closed to adding at its end (only the socket adds) */
	struct evbuffer *in = bufferevent_get_input(bev);
	evbuffer_unfreeze(in, 0);
	int rc = h->in_len ? evbuffer_add(in, h->in, h->in_len) : 0;
	evbuffer_freeze(in, 0);
	if (rc < 0 || (h->out_len && evbuffer_add(conn_output(c), h->out, h->out_len) < 0)) {
		conn_protocol_error(c, "out of memory taking the connection over");
		handoff_free(h);
		return;
	}
	handoff_free(h);
	conn_process(c);
}

/* ---- listeners ---- */

static void
listener_accept(struct evconnlistener *lev, evutil_socket_t fd,
		struct sockaddr *sa, int salen, void *arg)
{
	struct nbd_listener *l = arg;
	struct nbd_server *ns = l->ns;
	(void)lev;
	(void)salen;

	if (ns->srv->nr_conns >= NBD_MAX_CONNECTIONS || ns->srv->stopping) {
		log_limited(&ns->rl, LOG_LVL_WARN, "nbd: refusing a connection (%s)",
			    ns->srv->stopping ? "shutting down" : "too many connections");
		close(fd);
		return;
	}
	if (sa->sa_family == AF_UNIX) {
		int sndbuf = NBD_UNIX_SNDBUF;
		/* best effort: the kernel caps it, and the default works too */
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	}
	struct bufferevent *bev = bufferevent_socket_new(ns->loop->base, fd,
							 BEV_OPT_CLOSE_ON_FREE);
	if (!bev) {
		close(fd);
		return;
	}
	nbd_serve(ns, bev, l->vbd);
}

/* Out of descriptors: the waiting client is let go (fdlimit.h). */
static void
listener_accept_error(struct evconnlistener *lev, void *arg)
{
	struct nbd_listener *l = arg;
	char msg[256];
	int rc = fdlimit_shed(evconnlistener_get_fd(lev), EVUTIL_SOCKET_ERROR(), NULL);

	if (rc < 0) {
		log_limited(&l->ns->rl, LOG_LVL_WARN, "nbd: accept: %s", strerror(-rc));
		return;
	}
	fdlimit_message(msg, sizeof(msg), "nbd: refused a connection");
	log_limited(&l->ns->rl, LOG_LVL_WARN, "%s", msg);
}

static void
listener_free(struct nbd_listener *l)
{
	LIST_REMOVE(l, link);
	if (l->vbd)
		vbd_frontend_remove(&l->fe);
	if (l->lev)
		evconnlistener_free(l->lev);
	if (l->path) {
		unlink(l->path);
		free(l->path);
	}
	free(l);
}

static void
listener_fe_shutdown(struct vbd_frontend *fe)
{
	listener_free(container_of(fe, struct nbd_listener, fe));
}

static const struct vbd_frontend_ops listener_fe_ops = {
	.kind = "nbd-listener",
	.shutdown = listener_fe_shutdown,
};

static struct nbd_listener *
listener_alloc(struct nbd_server *ns, const char *path, struct vbd *vbd)
{
	struct nbd_listener *l = calloc(1, sizeof(*l));
	if (!l)
		return NULL;
	l->ns = ns;
	l->vbd = vbd;
	if (path && !(l->path = strdup(path))) {
		free(l);
		return NULL;
	}
	return l;
}

/* Takes over a listening socket (l->lev set) and links l in. */
static void
listener_link(struct nbd_listener *l)
{
	evconnlistener_set_error_cb(l->lev, listener_accept_error);
	LIST_INSERT_HEAD(&l->ns->listeners, l, link);
	if (l->vbd)
		vbd_frontend_add(l->vbd, &l->fe, &listener_fe_ops);
}

static struct nbd_listener *
listener_new(struct nbd_server *ns, evutil_socket_t fd, const char *path,
	     struct vbd *vbd)
{
	struct nbd_listener *l = listener_alloc(ns, path, vbd);
	if (!l)
		return NULL;
	/* backlog 0: fd already listens (with the system's backlog); -1 meant listen(128) again */
	l->lev = evconnlistener_new(ns->loop->base, listener_accept, l,
				    LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, fd);
	if (!l->lev) {
		free(l->path);
		free(l);
		return NULL;
	}
	listener_link(l);
	return l;
}

int
nbd_export_vbd(struct nbd_server *ns, struct vbd *vbd, char *err, size_t errlen)
{
	char *path = nbd_vbd_path(ns->srv, vbd->minor);
	int fd;

	if (!path) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	fd = unixsock_listen(path, 0600, err, errlen);
	if (fd < 0) {
		free(path);
		return fd;
	}
	if (!listener_new(ns, fd, path, vbd)) {
		close(fd);
		unlink(path);
		free(path);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	free(path);
	return 0;
}

/* 127.0.0.0/8, ::1, or ::ffff:127.x.y.z. */
static int
addr_is_loopback(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
	if (sa->sa_family == AF_INET6) {
		const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
		return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
	}
	return 0;
}

static int
listen_tcp(struct nbd_server *ns, const char *hostport, char *err, size_t errlen)
{
	char host[256];
	const char *colon = strrchr(hostport, ':');
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *ai;
	size_t hl;

	if (!colon || colon == hostport || !colon[1]) {
		snprintf(err, errlen, "tcp:%s: want tcp:HOST:PORT", hostport);
		return -EINVAL;
	}
	hl = (size_t)(colon - hostport);
	if (hostport[0] == '[' && hl >= 2 && hostport[hl - 1] == ']') {
		hostport++;
		hl -= 2;
	}
	if (hl >= sizeof(host)) {
		snprintf(err, errlen, "tcp: host name too long");
		return -EINVAL;
	}
	memcpy(host, hostport, hl);
	host[hl] = '\0';
	int rc = getaddrinfo(host, colon + 1, &hints, &ai);
	if (rc) {
		snprintf(err, errlen, "tcp:%s: %s", hostport, gai_strerror(rc));
		return -EINVAL;
	}
	if (!addr_is_loopback(ai->ai_addr) && ns->srv->tls_mode != TLS_REQUIRE &&
	    !ns->srv->nbd_allow_insecure) {
		freeaddrinfo(ai);
		snprintf(err, errlen, "tcp:%s is not a loopback address: anyone who reaches it could "
			 "read and write the disks; add --tls require with --tls-creds or "
			 "--tls-psk (or --nbd-allow-insecure)", hostport);
		return -EPERM;
	}
	struct nbd_listener *l = listener_alloc(ns, NULL, NULL);
	if (!l) {
		freeaddrinfo(ai);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	l->lev = evconnlistener_new_bind(ns->loop->base, listener_accept, l,
					 LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC |
					 LEV_OPT_REUSEABLE, listen_backlog(), ai->ai_addr,
					 (int)ai->ai_addrlen);
	freeaddrinfo(ai);
	if (!l->lev) {
		rc = -errno;
		snprintf(err, errlen, "tcp:%s: %s", hostport, strerror(errno));
		free(l);
		return rc;
	}
	listener_link(l);
	return 0;
}

int
nbd_listen_global(struct nbd_server *ns, const char *spec, char *err, size_t errlen)
{
	if (strncmp(spec, "unix:", 5) == 0) {
		int fd = unixsock_listen(spec + 5, 0600, err, errlen);
		if (fd < 0)
			return fd;
		if (!listener_new(ns, fd, spec + 5, NULL)) {
			close(fd);
			snprintf(err, errlen, "out of memory");
			return -ENOMEM;
		}
		return 0;
	}
	if (strncmp(spec, "tcp:", 4) == 0)
		return listen_tcp(ns, spec + 4, err, errlen);
	snprintf(err, errlen, "'%s': want unix:PATH or tcp:HOST:PORT", spec);
	return -EINVAL;
}

char *
nbd_vbd_path(const struct server *srv, int minor)
{
	char *p;
	if (asprintf(&p, "%s/nbd%d.%d", srv->state_dir, (int)srv->pid, minor) < 0)
		return NULL;
	return p;
}

/* The frontend kind: every vbd gets its socket; its path is in the vbd's description. */
static int
nbd_vbd_opened(void *state, struct vbd *vbd, char *err, size_t errlen)
{
	(void)state;
	return nbd_export_vbd(vbd->loop->nbd, vbd, err, errlen);
}

static void
nbd_vbd_info(void *state, const struct vbd *vbd, json_t *info)
{
	(void)state;
	char *path = (vbd->state & VBD_CLOSED) ? NULL : nbd_vbd_path(vbd->srv, vbd->minor);
	json_object_set_new(info, "nbd", path ? json_string(path) : json_null());
	free(path);
}

static const struct frontend_class nbd_frontend_class = {
	.name = "nbd",
	.vbd_opened = nbd_vbd_opened,
	.vbd_info = nbd_vbd_info,
};

struct nbd_server *
nbd_server_new(struct server *srv, struct loop *loop)
{
	struct nbd_server *ns = calloc(1, sizeof(*ns));
	if (!ns)
		return NULL;
	ns->srv = srv;
	ns->loop = loop;
	LIST_INIT(&ns->listeners);
	LIST_INIT(&ns->conns);
	ns->rl = (struct log_ratelimit)LOG_RATELIMIT_INIT;
	ns->max_inflight = NBD_MAX_INFLIGHT;
	ns->max_output = NBD_MAX_OUTPUT;
	ns->max_hs_output = NBD_MAX_HS_OUTPUT;
	ns->direct_payload = NBD_DIRECT_PAYLOAD;
	/* one frontend kind for every loop: it finds the vbd's loop's state */
	if (loop->index == 0 && server_frontend_register(srv, &nbd_frontend_class, NULL) < 0) {
		free(ns);
		return NULL;
	}
	return ns;
}

void
nbd_set_limits(struct nbd_server *ns, unsigned max_inflight, size_t max_output,
	       size_t max_hs_output, size_t direct_payload)
{
	ns->max_inflight = max_inflight ? max_inflight : 1;
	ns->max_output = max_output ? max_output : 1;
	ns->max_hs_output = max_hs_output ? max_hs_output : 1;
	/* never above the default: each connection's receive buffer grows with it */
	if (!direct_payload)
		direct_payload = 1;
	ns->direct_payload = direct_payload < NBD_DIRECT_PAYLOAD ? direct_payload : NBD_DIRECT_PAYLOAD;
}

void
nbd_stop_listening(struct nbd_server *ns)
{
	struct nbd_listener *l, *next;
	for (l = LIST_FIRST(&ns->listeners); l; l = next) {
		next = LIST_NEXT(l, link);
		if (!l->vbd)
			listener_free(l);
		else
			evconnlistener_disable(l->lev);
	}
}

unsigned
nbd_connection_count(struct server *srv)
{
	return srv->nr_conns;
}

void
nbd_server_free(struct nbd_server *ns)
{
	if (!ns)
		return;
	while (!LIST_EMPTY(&ns->listeners))
		listener_free(LIST_FIRST(&ns->listeners));
	/* connections still here have requests in flight: drop their sockets */
	struct nbd_conn *c, *next;
	for (c = LIST_FIRST(&ns->conns); c; c = next) {
		next = LIST_NEXT(c, link);
		conn_cut(c);
	}
	free(ns);
}
