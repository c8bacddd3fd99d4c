/*
 * TLS for the NBD frontend, on GnuTLS (NBD_OPT_STARTTLS, as qemu and
 * nbdkit do it).
 *
 * Owns:
 *  - struct tls_creds: the server's credentials, x509 (--tls-creds DIR:
 *    DIR/server-cert.pem, DIR/server-key.pem, optionally DIR/ca-cert.pem to
 *    verify client certificates and DIR/ca-crl.pem) or PSK (--tls-psk FILE,
 *    `username:hexkey` lines, parsed once here), and the priority string's
 *    cache. Loaded once at start, before the loops run; read-only after that
 *    and shared by every loop (GnuTLS allows credentials to be shared
 *    between sessions on different threads); freed after the loops stop.
 *  - struct tls_conn: one connection's TLS session, the socket under it
 *    (the descriptor, closed with it), the loop's two watches on that
 *    socket, and one end of a bufferevent pair. The other end, the
 *    "plaintext" bufferevent, is what the NBD connection reads its
 *    decrypted input from and writes its replies to, as it would a socket's
 *    bufferevent: every byte goes through gnutls_record_recv/send here.
 *    The handshake and every record run non-blocking, driven by the
 *    socket's readiness and the pair's callbacks; data GnuTLS holds already
 *    decrypted (gnutls_record_check_pending) is drained without waiting for
 *    the socket, and a send GnuTLS could not finish (GNUTLS_E_AGAIN) is
 *    resumed when the socket is writable.
 *
 * Threading: a tls_conn is used on one loop at a time. tls_conn_detach
 * leaves a struct tls_moving (the session, owning it) that the caller hands
 * through a loop's mailbox (which orders memory) to tls_conn_attach on the
 * other loop; GnuTLS sessions are not thread-safe but may change threads
 * when only one uses them at a time.
 *
 * Events to the owner (the NBD connection), always from a loop callback,
 * never from inside a call the owner made: TLS_EV_CLOSED (the handshake or
 * a record failed, or the socket did: logged here, one rate-limited line;
 * the owner frees the tls_conn) and TLS_EV_DRAINED (everything written to
 * the plaintext bufferevent has gone to the socket, as a socket
 * bufferevent's write callback says). tls_conn_free may be called from
 * inside the event callback. The client's end of stream comes as a socket
 * bufferevent's does: on the plaintext bufferevent, its data read first,
 * then BEV_EVENT_EOF to its event callback.
 *
 * Errors: negative errnos; loading reports one line in err.
 */
#ifndef TD_NBD_TLS_H
#define TD_NBD_TLS_H

#include <stddef.h>
#include <stdint.h>

struct bufferevent;
struct event_base;
struct log_ratelimit;

/* --tls: what the shared NBD listener asks of its clients. */
enum tls_mode {
	TLS_OFF,	/* STARTTLS refused (NBD_REP_ERR_UNSUP) */
	TLS_ON,		/* STARTTLS offered, plaintext allowed */
	TLS_REQUIRE,	/* every option but STARTTLS and ABORT: NBD_REP_ERR_TLS_REQD */
};

struct tls_config {
	const char *creds_dir;	/* --tls-creds DIR (x509) */
	const char *psk_file;	/* --tls-psk FILE */
	int verify_peer;	/* --tls-verify-peer: a client certificate is required */
};

struct tls_creds;

/* 0 and *out, or a negative errno with one line in err. Exactly one of creds_dir, psk_file. */
int tls_creds_load(const struct tls_config *cfg, struct tls_creds **out, char *err,
		   size_t errlen);
void tls_creds_free(struct tls_creds *cr);
/* "x509" or "psk", for logs. */
const char *tls_creds_kind(const struct tls_creds *cr);

/*
 * The PSK file (the format nbdkit and qemu share, gnutls-psktool's):
 * one `username:hexkey` per line; the key an even number of hex digits,
 * 1 to 512 of them; blank lines and lines starting with '#' ignored; a
 * username is 1 to 255 bytes, no ':' nor control characters; a username
 * twice is an error.
 */
struct tls_psk_key {
	char *user;
	uint8_t *key;
	size_t keylen;
};
struct tls_psk {
	struct tls_psk_key *keys;
	size_t n;
};
/* Parses len bytes of text (no NUL needed). 0 and *out; -EINVAL (err: the line and why) or -ENOMEM. */
int tls_psk_parse(const char *text, size_t len, struct tls_psk **out, char *err, size_t errlen);
const struct tls_psk_key *tls_psk_find(const struct tls_psk *p, const char *user);
void tls_psk_free(struct tls_psk *p);

enum { TLS_EV_CLOSED = 1, TLS_EV_DRAINED = 2 };
typedef void tls_event_fn(void *arg, int what);

struct tls_conn;
struct tls_moving;

/*
 * A server session on fd (taken: closed by tls_conn_free, even on failure),
 * first sending prefix raw (the part of the STARTTLS reply the socket has
 * not taken yet), then the handshake. *plain: the owner's end of the pair
 * (the owner sets its callbacks and frees it before the tls_conn). peer
 * names the client in log lines; rl limits them. NULL and *err set
 * (-ENOMEM, or GnuTLS's failure as -EPROTO) on failure.
 */
struct tls_conn *tls_conn_new(struct event_base *base, const struct tls_creds *cr, int fd,
			      const void *prefix, size_t prefix_len, const char *peer,
			      struct log_ratelimit *rl, tls_event_fn *cb, void *arg,
			      struct bufferevent **plain, int *err);
/* Plaintext written but not yet taken by GnuTLS: counts against the owner's output budget. */
size_t tls_conn_unsent(const struct tls_conn *t);
/* Sends close_notify if it can without waiting; closes the socket; frees all but *plain. */
void tls_conn_free(struct tls_conn *t);

/*
 * Hand-off to another loop. Moves what the pair holds to where it belongs
 * (decrypted input into the owner's input, pending output into ours), takes
 * the session out of t and returns it in *out with the plaintext not yet
 * sent (malloc'd, *unsent_len bytes: the owner queues it first on the
 * other side). t is then freed as usual (its socket closed, the session
 * not touched). 0, or -ENOMEM (t unchanged).
 */
int tls_conn_detach(struct tls_conn *t, struct tls_moving **out, void **unsent,
		    size_t *unsent_len);
/*
 * The session carried on, on base, over fd (taken), as tls_conn_new; mv is
 * consumed. The owner, made on *plain, is named with tls_conn_set_owner
 * before the loop runs again.
 */
struct tls_conn *tls_conn_attach(struct event_base *base, struct tls_moving *mv, int fd,
				 const char *peer, struct log_ratelimit *rl,
				 struct bufferevent **plain, int *err);
void tls_conn_set_owner(struct tls_conn *t, tls_event_fn *cb, void *arg);
/* The socket under the session. */
int tls_conn_fd(const struct tls_conn *t);
/* Frees a session that never arrived (the target loop was stopping). */
void tls_moving_free(struct tls_moving *mv);

#endif
