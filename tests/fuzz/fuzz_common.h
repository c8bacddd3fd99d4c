/*
 * Helpers shared by the event-loop fuzz targets: a fatal check that libFuzzer
 * reports as a crash, running the loop until it is idle, and a client that
 * swallows what the server says: the far end of a bufferevent pair, or of a
 * UNIX socket pair (socket mode), where the server reads a real descriptor
 * as it does in production (fuzz_nbd: its receive buffer's own reads).
 */
#ifndef TD_FUZZ_COMMON_H
#define TD_FUZZ_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <errno.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

/*
 * For the harness's own byte loops (hashing megabytes of replies): no
 * coverage callbacks per byte, which guide nothing there and cost most of
 * their time (not inlined: inlined, the callbacks come back). AddressSanitizer
 * still checks every access.
 */
#define FZ_NO_COVERAGE __attribute__((no_sanitize("coverage"), noinline))

/* Rounds of the loop one settle may take before we call it a livelock. */
#define FZ_SETTLE_ROUNDS 100000

/*
 * On a harness's checking code (its oracle): no coverage instrumentation.
 * Its branches say nothing about the server, yet libFuzzer would keep
 * inputs for reaching them, and instrumented loops over every response
 * cost fuzz_control as much as parsing them with jansson. ASan and UBSan still check
 * it.
 */
#define FZ_ORACLE __attribute__((no_sanitize("coverage")))

static inline void fz_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* A broken invariant: abort so that libFuzzer saves the input as a crash. */
static inline void
fz_fail(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "==fuzz== harness check failed: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

/* A growing byte buffer the harness builds inputs and collects replies in; a NUL follows its bytes. */
struct fz_buf {
	uint8_t *p;
	size_t len, cap;
};

FZ_ORACLE static inline void
fz_buf_put(struct fz_buf *b, const void *data, size_t len)
{
	if (b->len + len + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + len + 1)
			cap *= 2;
		uint8_t *p = realloc(b->p, cap);
		if (!p)
			fz_fail("out of memory");
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, len);
	b->len += len;
	b->p[b->len] = '\0';
}

/* The fuzzer's end of the connection. */
struct fz_client {
	struct bufferevent *bev;	/* pair mode; NULL in socket mode */
	/*
	 * Socket mode: our end (-1 once closed), and the server's, looked at
	 * (FIONREAD) only while our end shows no POLLHUP and the number still
	 * names the same socket (srv_ino): the server has not closed it, and
	 * the number has not been reused. A server that dup()s its socket and
	 * closes the first number (a hand-off to another loop, STARTTLS: the
	 * harness has one loop and no TLS) would look closed. What the server
	 * has not read yet is sent from unsent.
	 */
	int fd, srv_fd;
	ino_t srv_ino;
	struct fz_buf unsent;
	size_t unsent_off;
	int srv_queued, queued;	/* FIONREAD of both ends at the last pump */
	int eof;		/* the server's end has ended its stream */
	int hold;		/* slow reader: not reading the server's output yet */
	uint64_t received;	/* bytes the server sent */
	short events;		/* BEV_EVENT_* seen on our end */
	/* optional: sees every byte the server sends, in order */
	void (*observe)(const uint8_t *p, size_t len, void *arg);
	void *observe_arg;
	/* hung up, but the server has not looked at its socket since */
	int hangup_pending;
	int hangup_hops;		/* turns to the first try; -1: none scheduled */
	struct event_base *base;
};

/* Open clients, for delivering their hang-ups at the right moment. */
#define FZ_MAX_CLIENTS 4
static struct fz_client *fz_clients[FZ_MAX_CLIENTS];


/* FUZZ_TRACE=1 in the environment: hex-dump what the server sends to stderr. */
static inline int
fz_trace(void)
{
	static int on = -1;
	if (on < 0) {
		const char *e = getenv("FUZZ_TRACE");
		on = e && *e && *e != '0';
	}
	return on;
}

static inline void
fz_client_drain(struct fz_client *cl)
{
	struct evbuffer *in = bufferevent_get_input(cl->bev);
	size_t n = evbuffer_get_length(in);

	if (n && fz_trace()) {
		const unsigned char *p = evbuffer_pullup(in, -1);
		fprintf(stderr, "==fuzz== server sent %zu bytes:", n);
		for (size_t i = 0; i < n && i < 4096; i++)
			fprintf(stderr, "%s%02x", i % 32 ? "" : "\n  ", p[i]);
		fprintf(stderr, "%s\n", n > 4096 ? " ..." : "");
	}
	cl->received += n;
	if (n && cl->observe) {
		/* walk the chain without copying: replies can be many MiB */
		struct evbuffer_iovec v[16];
		size_t left = n;
		while (left) {
			int k = evbuffer_peek(in, -1, NULL, v, 16);
			size_t done = 0;
			for (int i = 0; i < k && i < 16; i++) {
				cl->observe(v[i].iov_base, v[i].iov_len, cl->observe_arg);
				done += v[i].iov_len;
			}
			evbuffer_drain(in, done);
			left -= done;
		}
		return;
	}
	evbuffer_drain(in, n);
}

static inline void
fz_client_read_cb(struct bufferevent *bev, void *arg)
{
	(void)bev;
	fz_client_drain(arg);
}

static inline void
fz_client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct fz_client *cl = arg;
	(void)bev;
	cl->events |= what;
}

static inline void
fz_client_init(struct fz_client *cl, struct event_base *base, int hold)
{
	memset(cl, 0, sizeof(*cl));
	cl->fd = cl->srv_fd = -1;
	cl->hold = hold;
	cl->hangup_hops = -1;
	cl->base = base;
	for (int i = 0; i < FZ_MAX_CLIENTS; i++) {
		if (!fz_clients[i]) {
			fz_clients[i] = cl;
			return;
		}
	}
	fz_fail("too many clients");
}

/*
 * Makes a connected pair: *server_bev goes to the code under test, the
 * other end stays with cl. Deferred callbacks make the pair behave like a
 * socket: nothing the server writes runs our callbacks inside its own call.
 */
static inline void
fz_client_open(struct event_base *base, struct fz_client *cl, int hold,
	       struct bufferevent **server_bev)
{
	struct bufferevent *pair[2];

	if (bufferevent_pair_new(base, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS,
				 pair) < 0)
		fz_fail("bufferevent_pair_new failed");
	fz_client_init(cl, base, hold);
	cl->bev = pair[1];
	bufferevent_setcb(cl->bev, fz_client_read_cb, NULL, fz_client_event_cb, cl);
	/*
	 * A slow reader does not read at all: the pair then leaves what the
	 * server writes in the server's output buffer, as a full socket would.
	 */
	bufferevent_enable(cl->bev, hold ? EV_WRITE : EV_READ | EV_WRITE);
	*server_bev = pair[0];
}

/*
 * Socket mode: a UNIX socket pair, with small send buffers so that a
 * reader that holds back fills them within a few KiB. The server's end is
 * a socket bufferevent, as an accepted connection's is.
 */
static inline void
fz_client_open_socket(struct event_base *base, struct fz_client *cl, int hold,
		      struct bufferevent **server_bev)
{
	int sv[2], small = 4096;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		fz_fail("socketpair: %s", strerror(errno));
	for (int i = 0; i < 2; i++)
		if (setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) < 0)
			fz_fail("SO_SNDBUF: %s", strerror(errno));
	*server_bev = bufferevent_socket_new(base, sv[0], BEV_OPT_CLOSE_ON_FREE);
	if (!*server_bev)
		fz_fail("bufferevent_socket_new failed");
	struct stat st;
	if (fstat(sv[0], &st) < 0)
		fz_fail("fstat: %s", strerror(errno));
	fz_client_init(cl, base, hold);
	cl->fd = sv[1];
	cl->srv_fd = sv[0];
	cl->srv_ino = st.st_ino;
}

/* Socket mode: the server's end, or -1 once it has closed it. */
static inline int
fz_client_srv_fd(struct fz_client *cl)
{
	struct pollfd pfd = { .fd = cl->fd, .events = POLLIN };
	struct stat st;

	if (cl->srv_fd < 0)
		return -1;
	if (cl->fd < 0 || (poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLHUP)) ||
	    fstat(cl->srv_fd, &st) < 0 || st.st_ino != cl->srv_ino)
		cl->srv_fd = -1;
	return cl->srv_fd;
}

static inline int
fz_fionread(int fd)
{
	int n = 0;
	if (fd >= 0 && ioctl(fd, FIONREAD, &n) < 0)
		fz_fail("FIONREAD: %s", strerror(errno));
	return n;
}

/*
 * A client wrote to, shut down or closed its socket outside a pump (where
 * its queues' snapshot would not show it): the server learns of it only
 * in a turn of its loop, so the next settle takes one.
 */
static int fz_socket_kicked;

/* Socket mode: sends what it can of unsent, then our EOF if one waits for that. */
static inline int
fz_sock_write(struct fz_client *cl)
{
	int moved = 0;

	while (cl->unsent_off < cl->unsent.len) {
		ssize_t n = send(cl->fd, cl->unsent.p + cl->unsent_off,
				 cl->unsent.len - cl->unsent_off, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n > 0) {
			cl->unsent_off += (size_t)n;
			moved = 1;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			break;
		} else {	/* the server closed its end: what it never read is gone */
			cl->unsent_off = cl->unsent.len;
			moved = 1;
		}
	}
	if (cl->unsent_off == cl->unsent.len)
		cl->unsent_off = cl->unsent.len = 0;
	if (cl->hangup_pending && !cl->unsent.len) {
		shutdown(cl->fd, SHUT_WR);
		cl->hangup_pending = 0;
		moved = 1;
	}
	fz_socket_kicked |= moved;
	return moved;
}

/* Socket mode: takes everything the server has sent (unless holding back). */
static inline int
fz_sock_read(struct fz_client *cl)
{
	static uint8_t buf[64 << 10];
	int moved = 0;

	while (!cl->hold && !cl->eof) {
		ssize_t n = recv(cl->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		moved = 1;
		if (n <= 0) {	/* end of stream, or reset */
			cl->eof = 1;
			cl->events |= BEV_EVENT_EOF;
			break;
		}
		cl->received += (uint64_t)n;
		if (cl->observe)
			cl->observe(buf, (size_t)n, cl->observe_arg);
	}
	return moved;
}

/*
 * Socket mode: moves bytes both ways. Returns 1 if anything moved since
 * the last pump, in our hands or in either end's receive queue: the
 * server's progress shows there, between turns of its loop.
 */
static inline int
fz_sock_pump(struct fz_client *cl)
{
	if (cl->fd < 0)
		return 0;
	int moved = fz_sock_write(cl);
	moved |= fz_sock_read(cl);
	int srv_queued = fz_fionread(fz_client_srv_fd(cl)), queued = fz_fionread(cl->fd);
	if (srv_queued != cl->srv_queued || queued != cl->queued)
		moved = 1;
	cl->srv_queued = srv_queued;
	cl->queued = queued;
	return moved;
}

static inline void
fz_sock_close(struct fz_client *cl)
{
	if (cl->fd < 0)
		return;
	close(cl->fd);
	cl->fd = cl->srv_fd = -1;
	fz_socket_kicked = 1;
}

static inline int
fz_pump_sockets(void)
{
	int moved = fz_socket_kicked;

	fz_socket_kicked = 0;
	for (int i = 0; i < FZ_MAX_CLIENTS; i++)
		if (fz_clients[i])
			moved |= fz_sock_pump(fz_clients[i]);
	return moved;
}

/*
 * Runs the loop until no callback is active. Everything the targets drive
 * (bufferevent pairs with deferred callbacks, io_defer completions of the
 * ram driver, blocking calls run on the loop, one-shot events) shows up as
 * an active callback, so an idle loop means the server waits for its peer,
 * or for a message through a mailbox's eventfd (fz_wait_owed waits for
 * that). Timers that are not due (the NBD handshake timeout) are not
 * waited for.
 */
static inline int fz_deliver_hangups(void);

/*
 * Optional, for a target whose server owes work done off the loop (opens
 * and closes on worker threads, replies that wait for them): blocks in the
 * loop until one more piece of it is done and returns 1, or returns 0 at
 * once when nothing is owed. An idle loop then means idle only once it is 0.
 */
static int (*fz_wait_owed)(struct event_base *base);

static inline void
fz_settle(struct event_base *base)
{
	for (int i = 0; i < FZ_SETTLE_ROUNDS; i++) {
		/* sockets: the loop learns of their bytes only by polling, in a turn */
		int moved = fz_pump_sockets();
		if (!moved && event_base_get_num_events(base, EVENT_BASE_COUNT_ACTIVE) == 0 &&
		    !fz_deliver_hangups() && (!fz_wait_owed || !fz_wait_owed(base)))
			return;
		event_base_loop(base, EVLOOP_NONBLOCK);
	}
	fz_fail("the event loop is still busy after %d rounds (livelock)", FZ_SETTLE_ROUNDS);
}

/* Is the server's end still there? */
static inline int
fz_client_connected(struct fz_client *cl)
{
	if (!cl->bev)
		return fz_client_srv_fd(cl) >= 0;
	return bufferevent_pair_get_partner(cl->bev) != NULL;
}

/* Bytes sent that the server has not read (yet). */
static inline size_t
fz_client_unread(struct fz_client *cl)
{
	if (!cl->bev)
		return cl->unsent.len - cl->unsent_off + (size_t)fz_fionread(fz_client_srv_fd(cl));
	return evbuffer_get_length(bufferevent_get_output(cl->bev));
}

/*
 * At most this many pieces per send: a bigger input is cut in pieces of
 * len / FZ_MAX_PIECES, so that cuts still fall all through it. Every piece
 * costs a few turns of the loop (a system call each); byte by byte, a
 * 4 KiB input cost 20 ms and chunked inputs took two thirds of the time.
 */
#define FZ_MAX_PIECES 32

/*
 * Writes data in pieces of chunk bytes (0: all at once), letting the server
 * run in between; after the last piece only if settle_last is set. The
 * bytes are passed by reference, not copied: data must stay valid until the
 * client and the server's end of it are gone (the end of the input).
 */
static inline void
fz_client_send(struct event_base *base, struct fz_client *cl, const uint8_t *data,
	       size_t len, size_t chunk, int settle_last)
{
	if (!chunk || chunk > len)
		chunk = len ? len : 1;
	if (len / chunk >= FZ_MAX_PIECES)
		chunk = (len + FZ_MAX_PIECES - 1) / FZ_MAX_PIECES;
	while (len && fz_client_connected(cl)) {
		size_t n = len < chunk ? len : chunk;
		if (!cl->bev) {
			fz_buf_put(&cl->unsent, data, n);
			fz_sock_write(cl);
		} else if (evbuffer_add_reference(bufferevent_get_output(cl->bev), data, n,
						  NULL, NULL) < 0) {
			fz_fail("evbuffer_add_reference failed");
		}
		data += n;
		len -= n;
		if (len || settle_last)
			fz_settle(base);
	}
}

/* Becomes a fast reader again and takes everything the server has sent. */
static inline void
fz_client_release(struct event_base *base, struct fz_client *cl)
{
	if (!cl->hold)
		return;
	cl->hold = 0;
	if (!cl->bev) {
		fz_settle(base);	/* its pumps read */
		return;
	}
	bufferevent_enable(cl->bev, EV_READ);
	fz_settle(base);
	fz_client_drain(cl);
}

/*
 * A socket shows the server an EOF only when it reads, after the data before
 * it, and it reads only with EV_READ enabled. The pair would deliver it at
 * once, whatever the server's state; so an EOF waits here until the server's
 * end is reading and has taken all we sent.
 */
static inline int
fz_deliver_hangups(void)
{
	int did = 0;

	for (int i = 0; i < FZ_MAX_CLIENTS; i++) {
		struct fz_client *cl = fz_clients[i];
		if (!cl || !cl->hangup_pending || !cl->bev)
			continue;	/* a socket's EOF goes with its pumps */
		struct bufferevent *peer = bufferevent_pair_get_partner(cl->bev);
		if (!peer) {
			cl->hangup_pending = 0;
			continue;
		}
		if (cl->hangup_hops >= 0)
			continue;	/* its first try is still to come */
		if (!(bufferevent_get_enabled(peer) & EV_READ) ||
		    evbuffer_get_length(bufferevent_get_output(cl->bev)))
			continue;
		cl->hangup_pending = 0;
		bufferevent_flush(cl->bev, EV_WRITE, BEV_FINISHED);
		did = 1;
	}
	return did;
}

static inline void
fz_hangup_cb(evutil_socket_t fd, short what, void *arg)
{
	struct fz_client *cl = arg;
	(void)fd;
	(void)what;
	if (cl->hangup_hops-- > 0) {
		if (event_base_once(cl->base, -1, EV_TIMEOUT, fz_hangup_cb, cl, NULL) < 0)
			fz_fail("event_base_once failed");
		return;
	}
	fz_deliver_hangups();
}

/*
 * Hangs up. A reset reaches the server at once (its socket fails, unread
 * data or not). An EOF is first tried two loop turns from now, once the
 * server has had the turn in which it reads what was sent before (a socket
 * reads the EOF on its next turn), while its requests may still be in
 * flight; else whenever it reads again.
 */
static inline void
fz_client_hangup(struct fz_client *cl, int reset)
{
	if (!cl->bev) {
		if (cl->fd < 0)
			return;
		if (reset) {	/* unread replies make it a reset for the server */
			fz_sock_close(cl);
			return;
		}
		cl->hangup_pending = 1;
		fz_sock_write(cl);
		return;
	}
	struct bufferevent *peer = bufferevent_pair_get_partner(cl->bev);

	if (!peer)
		return;
	if (reset) {
		bufferevent_trigger_event(peer, BEV_EVENT_ERROR | BEV_EVENT_READING, 0);
		return;
	}
	cl->hangup_pending = 1;
	cl->hangup_hops = 1;
	if (event_base_once(cl->base, -1, EV_TIMEOUT, fz_hangup_cb, cl, NULL) < 0)
		fz_fail("event_base_once failed");
}

/* Our EOF never reached the server: it stopped reading for good. */
static inline int
fz_client_hangup_stuck(struct fz_client *cl)
{
	return cl->hangup_pending && fz_client_connected(cl);
}

static inline void
fz_client_close(struct fz_client *cl)
{
	if (cl->hangup_hops >= 0)
		fz_fail("harness: closing a client whose hang-up is still scheduled");
	for (int i = 0; i < FZ_MAX_CLIENTS; i++)
		if (fz_clients[i] == cl)
			fz_clients[i] = NULL;
	if (cl->bev)
		bufferevent_free(cl->bev);
	cl->bev = NULL;
	fz_sock_close(cl);
	free(cl->unsent.p);
	cl->unsent = (struct fz_buf){ 0 };
}

#endif
