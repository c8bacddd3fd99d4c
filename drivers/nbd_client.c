/*
 * nbd: an image on an NBD server, reached through libnbd: params
 * `nbd:URI` in the forms libnbd and qemu take (nbd://HOST[:PORT]/EXPORT,
 * nbd+unix:///EXPORT?socket=PATH; over TLS nbds://HOST/EXPORT?tls-psk-file=F
 * and the other TLS forms of libnbd's URIs). The connection and handshake run in
 * open, on a worker; requests then go out with libnbd's asynchronous calls
 * from the loop, which watches the connection's descriptor (armed only
 * while commands are in flight) and lets libnbd read and write when it is
 * ready. Reads, writes (FUA, or a flush after them where the server has no
 * FUA), flush, trim, write-zeroes (fast where offered), cache and block
 * status (base:allocation), as the server advertises them; requests are cut
 * to the server's maximum block size.
 *
 * A server that goes away fails the commands in flight and every later one
 * with EIO (one log line); one that stops answering leaves them to the
 * vbd's timeout. `unpause -a nbd:...` reconnects.
 */
#include "driver.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <libnbd.h>

#include "log.h"

#define NBDC_MAX_REQUEST	(32u << 20)	/* a command's bytes, unless the server says less */
#define NBDC_MAX_RANGE		(1u << 30)	/* trim, zero, cache, block status per command */

struct nbdc {
	struct td_image *img;
	struct nbd_handle *h;
	char *uri;
	struct event_base *base;
	/*
	 * The loop's watches on the connection, made at the first request and
	 * added only while libnbd waits for the socket with commands out: at
	 * close (on a worker, the chain drained) neither is pending.
	 */
	struct event *rd, *wr;
	int fd;
	uint64_t max_req;
	int can_fua, can_flush;
	int dead;		/* the connection is gone: said once, every request EIO */
};

/* ---- the loop's watch ---- */

static void nbdc_rearm(struct nbdc *p);

static void
nbdc_ready(evutil_socket_t fd, short what, void *arg)
{
	struct nbdc *p = arg;
	(void)fd;
	/* completions run inside these calls */
	/* completions run inside these; a failure leaves the handle dead, which rearm sees */
	if (what & EV_READ)
		(void)nbd_aio_notify_read(p->h);
	if ((what & EV_WRITE) && !nbd_aio_is_dead(p->h))
		(void)nbd_aio_notify_write(p->h);
	nbdc_rearm(p);
}

static void
nbdc_lost(struct nbdc *p)
{
	if (!p->dead)
		log_err("nbd: %s: connection lost: %s", p->uri,
			nbd_get_error() ? nbd_get_error() : "closed");
	p->dead = 1;
	p->img->status = "connection lost (unpause -a to reconnect)";
}

static void
watch(struct event *ev, int on)
{
	if (on && !event_pending(ev, EV_READ | EV_WRITE, NULL))
		event_add(ev, NULL);
	else if (!on && event_pending(ev, EV_READ | EV_WRITE, NULL))
		event_del(ev);
}

/* Watch for what libnbd waits for, while it has commands out. */
static void
nbdc_rearm(struct nbdc *p)
{
	unsigned dir = nbd_aio_get_direction(p->h);
	int out = nbd_aio_in_flight(p->h) > 0;

	if (nbd_aio_is_dead(p->h) || nbd_aio_is_closed(p->h)) {
		nbdc_lost(p);
		dir = 0;
	}
	if (!p->rd) {
		p->rd = event_new(p->base, p->fd, EV_READ | EV_PERSIST, nbdc_ready, p);
		p->wr = event_new(p->base, p->fd, EV_WRITE | EV_PERSIST, nbdc_ready, p);
		if (!p->rd || !p->wr) {	/* nothing can be watched: this connection is done */
			log_err("nbd: %s: out of memory", p->uri);
			p->dead = 1;
			p->img->status = "out of memory";
			return;
		}
	}
	/* nothing owed: no watch, even though libnbd would read a server's word */
	watch(p->rd, out && (dir & LIBNBD_AIO_DIRECTION_READ));
	watch(p->wr, (dir & LIBNBD_AIO_DIRECTION_WRITE) != 0);
}

/* ---- open / close (workers) ---- */

static int
nbdc_fail(struct td_error *err, struct nbdc *p, int code, const char *what)
{
	const char *why = nbd_get_error();
	int e = nbd_get_errno();

	td_error_set(err, code ? code : (e > 0 ? e : EIO), "nbd: %s: %s%s%s", p->uri, what,
		     why ? ": " : "", why ? why : "");
	return -err->code;
}

static void
nbdc_free(struct nbdc *p)
{
	if (p->h)
		nbd_close(p->h);
	free(p->uri);
	free(p);
}

static int
nbdc_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct nbdc *p = calloc(1, sizeof(*p));
	int rc;

	if (!p || !(p->uri = strdup(img->path))) {
		free(p);
		return td_error_set(err, ENOMEM, "out of memory");
	}
	p->base = io_engine_base(ctx->io);
	if (!(p->h = nbd_create())) {
		rc = nbdc_fail(err, p, ENOMEM, "cannot make a handle");
		goto fail;
	}
	if (nbd_supports_uri(p->h) != 1) {
		rc = nbdc_fail(err, p, ENOTSUP, "this libnbd takes no URIs");
		goto fail;
	}
	/*
	 * TLS comes in the URI, as libnbd takes it: nbds:// or nbds+unix://
	 * (TLS required), tls-psk-file=FILE with tls-username=, or
	 * tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem).
	 * Those name local files, which params may: they come from the
	 * toolstack over the control socket, never from a peer.
	 */
	nbd_set_uri_allow_local_file(p->h, true);
	nbd_add_meta_context(p->h, LIBNBD_CONTEXT_BASE_ALLOCATION);
	if (nbd_connect_uri(p->h, p->uri) < 0) {
		rc = nbdc_fail(err, p, 0, "cannot connect");
		goto fail;
	}
	int64_t size = nbd_get_size(p->h);
	if (size < 0) {
		rc = nbdc_fail(err, p, 0, "no size");
		goto fail;
	}
	if (!(img->oflags & TD_OPEN_RDONLY) && nbd_is_read_only(p->h) == 1) {
		rc = td_error_set(err, EROFS, "nbd: %s: the export is read-only (open it with -R)",
				  p->uri);
		goto fail;
	}
	int64_t min = nbd_get_block_size(p->h, LIBNBD_SIZE_MINIMUM);
	int64_t max = nbd_get_block_size(p->h, LIBNBD_SIZE_MAXIMUM);
	p->max_req = max > 0 && (uint64_t)max < NBDC_MAX_REQUEST ? (uint64_t)max : NBDC_MAX_REQUEST;
	if (min > 0 && p->max_req % (uint64_t)min)
		p->max_req -= p->max_req % (uint64_t)min;
	p->can_fua = nbd_can_fua(p->h) == 1;
	p->can_flush = nbd_can_flush(p->h) == 1;
	p->fd = nbd_aio_get_fd(p->h);
	img->size = (uint64_t)size;
	img->sector_size = 512;
	img->min_io = min > 1 ? (uint32_t)min : 1;
	img->caps = (p->can_flush ? TD_CAP_FLUSH : 0) |
		    (nbd_can_trim(p->h) == 1 ? TD_CAP_DISCARD : 0) |
		    (nbd_can_zero(p->h) == 1 ? TD_CAP_WRITE_ZEROES : 0) |
		    (nbd_can_fast_zero(p->h) == 1 ? TD_CAP_FAST_ZERO : 0) |
		    (nbd_can_cache(p->h) == 1 ? TD_CAP_CACHE : 0) |
		    (nbd_can_meta_context(p->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1 ?
		     TD_CAP_BLOCK_STATUS : 0);
	img->priv = p;
	p->img = img;
	img->status = "connected";
	log_info("nbd: %s: connected, %" PRId64 " bytes%s", p->uri, size,
		 nbd_is_read_only(p->h) == 1 ? ", read-only" : "");
	return 0;
fail:
	nbdc_free(p);
	return rc;
}

/* Nothing is in flight (the chain drained), so no watch is armed. */
static void
nbdc_close(struct td_image *img)
{
	struct nbdc *p = img->priv;

	if (!p)
		return;
	if (!p->dead && p->can_flush && !(img->oflags & TD_OPEN_RDONLY))
		nbd_flush(p->h, 0);	/* everything durable, as a close promises */
	if (!p->dead)
		nbd_shutdown(p->h, 0);
	if (p->rd)
		event_free(p->rd);
	if (p->wr)
		event_free(p->wr);
	nbdc_free(p);
	img->priv = NULL;
}

/* ---- requests ---- */

/* libnbd's completion callback, under the handle's lock: a new submit must wait. */
static int
piece_done(void *arg, int *error)
{
	td_pieces_done_later(arg, *error);
	return 1;
}

static int
extents_seen(void *arg, const char *context, uint64_t offset, uint32_t *entries,
	     size_t nr, int *error)
{
	struct td_pieces *ps = arg;
	struct td_request *req = ps->req;
	uint64_t covered = 0;

	(void)offset;
	if (*error || strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION))
		return 0;
	for (unsigned i = 0; i < req->nr_extents; i++)
		covered += req->extents[i].length;
	/* one reply: keep what fits, in order, inside the request */
	for (size_t i = 0; i + 1 < nr && req->nr_extents < req->max_extents &&
	     covered < req->length; i += 2) {
		uint64_t len = entries[i];
		if (!len)
			break;
		if (len > req->length - covered)
			len = req->length - covered;
		req->extents[req->nr_extents].length = len;
		req->extents[req->nr_extents].flags =
			((entries[i + 1] & LIBNBD_STATE_HOLE) ? TD_EXTENT_HOLE : 0) |
			((entries[i + 1] & LIBNBD_STATE_ZERO) ? TD_EXTENT_ZERO : 0);
		req->nr_extents++;
		covered += len;
	}
	return 0;
}

/* Issues one command; a command refused at once fails its piece. */
static void
issue(struct nbdc *p, struct td_pieces *ps, int64_t cookie)
{
	if (cookie < 0) {
		int e = nbd_get_errno();
		if (nbd_aio_is_dead(p->h) || nbd_aio_is_closed(p->h))
			nbdc_lost(p);
		/* not inside submit: td_pieces_issued completes later if it is the last */
		ps->err = ps->err ? ps->err : (p->dead || e <= 0 ? EIO : e);
		ps->pending--;
	}
}

static int
flush_done(void *arg, int *error)
{
	td_pieces_end(arg, *error);
	return 1;
}

/* A FUA write to a server without FUA: durable once a flush after it is. */
static int
flush_after_writes(struct td_pieces *ps)
{
	struct nbdc *p = ps->img->priv;
	nbd_completion_callback cb = { .callback = flush_done, .user_data = ps };

	if (ps->err || !p->can_flush || p->dead)
		return 0;
	if (nbd_aio_flush(p->h, cb, 0) < 0) {
		ps->err = EIO;
		return 0;
	}
	nbdc_rearm(p);
	return 1;
}

/* A server may answer block status with nothing we can use: then it is all data. */
static int
status_last(struct td_pieces *ps)
{
	struct td_request *req = ps->req;

	if (!ps->err && !req->nr_extents) {
		req->extents[0].length = req->length > NBDC_MAX_RANGE ? NBDC_MAX_RANGE : req->length;
		req->extents[0].flags = 0;
		req->nr_extents = 1;
	}
	return 0;
}

static void
nbdc_submit(struct td_image *img, struct td_request *req)
{
	struct nbdc *p = img->priv;
	struct td_pieces *ps = td_pieces_new(img, req, 0);

	if (!ps) {
		td_complete_later(img, req, ENOMEM);
		return;
	}
	if (p->dead) {
		ps->err = EIO;
		td_pieces_issued(ps);
		return;
	}
	nbd_completion_callback cb = { .callback = piece_done, .user_data = ps };
	uint32_t fua = (req->flags & TD_REQ_FUA) && p->can_fua ? LIBNBD_CMD_FLAG_FUA : 0;
	uint64_t off = req->offset;

	switch (req->op) {
	case TD_OP_READ:
	case TD_OP_WRITE:
		for (int i = 0; i < req->iovcnt; i++) {
			char *buf = req->iov[i].iov_base;
			for (uint64_t at = 0; at < req->iov[i].iov_len; ) {
				uint64_t n = req->iov[i].iov_len - at;
				if (n > p->max_req)
					n = p->max_req;
				td_pieces_add(ps);
				issue(p, ps, req->op == TD_OP_READ ?
				      nbd_aio_pread(p->h, buf + at, n, off, cb, 0) :
				      nbd_aio_pwrite(p->h, buf + at, n, off, cb, fua));
				at += n;
				off += n;
			}
		}
		if (req->op == TD_OP_WRITE && (req->flags & TD_REQ_FUA) && !p->can_fua)
			ps->last = flush_after_writes;
		break;
	case TD_OP_FLUSH:
		td_pieces_add(ps);
		issue(p, ps, nbd_aio_flush(p->h, cb, 0));
		break;
	case TD_OP_DISCARD:
	case TD_OP_WRITE_ZEROES:
	case TD_OP_CACHE:
		for (uint64_t end = req->offset + req->length; off < end; ) {
			uint64_t n = end - off > NBDC_MAX_RANGE ? NBDC_MAX_RANGE : end - off;
			uint32_t zf = fua | ((req->flags & TD_REQ_NO_HOLE) ? LIBNBD_CMD_FLAG_NO_HOLE : 0) |
				      ((req->flags & TD_REQ_FAST_ZERO) ? LIBNBD_CMD_FLAG_FAST_ZERO : 0);
			td_pieces_add(ps);
			issue(p, ps, req->op == TD_OP_DISCARD ? nbd_aio_trim(p->h, n, off, cb, fua) :
				     req->op == TD_OP_CACHE ? nbd_aio_cache(p->h, n, off, cb, 0) :
				     nbd_aio_zero(p->h, n, off, cb, zf));
			off += n;
		}
		break;
	case TD_OP_BLOCK_STATUS: {
		uint64_t n = req->length > NBDC_MAX_RANGE ? NBDC_MAX_RANGE : req->length;
		nbd_extent_callback ecb = { .callback = extents_seen, .user_data = ps };
		req->nr_extents = 0;
		td_pieces_add(ps);
		ps->last = status_last;
		issue(p, ps, nbd_aio_block_status(p->h, n, off, ecb, cb,
						  req->max_extents == 1 ? LIBNBD_CMD_FLAG_REQ_ONE : 0));
		break;
	}
	}
	td_pieces_issued(ps);
	nbdc_rearm(p);
}

const struct td_driver td_driver_nbd = {
	.name = "nbd",
	.flags = TD_DRV_URI,
	.ctx_size = TD_PIECES_CTX_SIZE(0),
	.open = nbdc_open,
	.close = nbdc_close,
	.submit = nbdc_submit,
};
