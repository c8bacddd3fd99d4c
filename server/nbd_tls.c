/*
 * TLS for the NBD frontend (nbd_tls.h): credentials, the PSK file parser,
 * and a connection's session pumping records between its socket and a
 * bufferevent pair.
 */
#include "nbd_tls.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "log.h"

#define TLS_RECORD	16384		/* plaintext per record, the TLS maximum */
#define TLS_RX_MAX	(1u << 20)	/* decrypted per pump, and held for a slow reader */
#define PSK_FILE_MAX	(1u << 20)
#define PSK_USER_MAX	255
#define PSK_HEX_MAX	512

/* ---- the PSK file ---- */

static int
hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

void
tls_psk_free(struct tls_psk *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->n; i++) {
		free(p->keys[i].user);
		if (p->keys[i].key)
			explicit_bzero(p->keys[i].key, p->keys[i].keylen);
		free(p->keys[i].key);
	}
	free(p->keys);
	free(p);
}

const struct tls_psk_key *
tls_psk_find(const struct tls_psk *p, const char *user)
{
	for (size_t i = 0; p && i < p->n; i++)
		if (strcmp(p->keys[i].user, user) == 0)
			return &p->keys[i];
	return NULL;
}

/* One line (no newline): 0 and a key added, 1 for nothing, or -EINVAL/-ENOMEM with why. */
static int
psk_line(struct tls_psk *p, const char *s, size_t len, const char **why)
{
	while (len && (s[len - 1] == '\r' || s[len - 1] == ' ' || s[len - 1] == '\t'))
		len--;
	if (!len || s[0] == '#')
		return 1;
	const char *colon = memchr(s, ':', len);
	if (!colon) {
		*why = "no ':' between username and key";
		return -EINVAL;
	}
	size_t ulen = (size_t)(colon - s), hlen = len - ulen - 1;
	const char *hex = colon + 1;
	if (!ulen || ulen > PSK_USER_MAX) {
		*why = "the username must be 1 to 255 bytes";
		return -EINVAL;
	}
	for (size_t i = 0; i < ulen; i++) {
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) {
			*why = "a control character in the username";
			return -EINVAL;
		}
	}
	if (!hlen || hlen > PSK_HEX_MAX || hlen % 2) {
		*why = "the key must be an even number of hex digits, 2 to 512";
		return -EINVAL;
	}
	for (size_t i = 0; i < hlen; i++) {
		if (hexval(hex[i]) < 0) {
			*why = "the key is not hexadecimal";
			return -EINVAL;
		}
	}
	char *user = strndup(s, ulen);
	if (!user)
		return -ENOMEM;
	if (tls_psk_find(p, user)) {
		free(user);
		*why = "the username appears twice";
		return -EINVAL;
	}
	uint8_t *key = malloc(hlen / 2);
	struct tls_psk_key *keys = realloc(p->keys, (p->n + 1) * sizeof(*keys));
	if (!key || !keys) {
		free(user);
		free(key);
		if (keys)
			p->keys = keys;
		return -ENOMEM;
	}
	p->keys = keys;
	for (size_t i = 0; i < hlen / 2; i++)
		key[i] = (uint8_t)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
	p->keys[p->n++] = (struct tls_psk_key){ user, key, hlen / 2 };
	return 0;
}

int
tls_psk_parse(const char *text, size_t len, struct tls_psk **out, char *err, size_t errlen)
{
	struct tls_psk *p = calloc(1, sizeof(*p));
	size_t pos = 0;
	unsigned line = 0;

	if (!p)
		return -ENOMEM;
	while (pos < len) {
		const char *nl = memchr(text + pos, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
		const char *why = NULL;
		line++;
		if (memchr(text + pos, '\0', n)) {
			snprintf(err, errlen, "line %u: a NUL byte", line);
			tls_psk_free(p);
			return -EINVAL;
		}
		int rc = psk_line(p, text + pos, n, &why);
		if (rc < 0) {
			if (rc == -EINVAL)
				snprintf(err, errlen, "line %u: %s", line, why);
			else
				snprintf(err, errlen, "out of memory");
			tls_psk_free(p);
			return rc;
		}
		pos += n + (nl ? 1 : 0);
	}
	if (!p->n) {
		snprintf(err, errlen, "no keys");
		tls_psk_free(p);
		return -EINVAL;
	}
	*out = p;
	return 0;
}

/* ---- credentials ---- */

struct tls_creds {
	gnutls_certificate_credentials_t x509;	/* one of these two */
	gnutls_psk_server_credentials_t psk;
	struct tls_psk *keys;
	gnutls_priority_t prio;
	int have_ca;		/* x509: client certificates are asked for and verified */
	int verify_peer;	/* and required */
};

const char *
tls_creds_kind(const struct tls_creds *cr)
{
	return cr->psk ? "psk" : "x509";
}

void
tls_creds_free(struct tls_creds *cr)
{
	if (!cr)
		return;
	if (cr->x509)
		gnutls_certificate_free_credentials(cr->x509);
	if (cr->psk)
		gnutls_psk_free_server_credentials(cr->psk);
	if (cr->prio)
		gnutls_priority_deinit(cr->prio);
	tls_psk_free(cr->keys);
	free(cr);
}

/* GnuTLS asks for the key of the username a client offers (on the session's loop). */
static int
psk_lookup(gnutls_session_t s, const char *user, gnutls_datum_t *key);

static int
read_small_file(const char *path, char **text, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > PSK_FILE_MAX) {
		int e = errno;
		close(fd);
		return S_ISREG(st.st_mode) || !e ? -EFBIG : -e;
	}
	char *buf = malloc((size_t)st.st_size + 1);
	size_t got = 0;
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	*text = buf;
	*len = got;
	return 0;
}

static int
load_psk(struct tls_creds *cr, const char *file, char *err, size_t errlen)
{
	char *text = NULL, why[200];
	size_t len = 0;
	int rc = read_small_file(file, &text, &len);

	if (rc < 0) {
		snprintf(err, errlen, "--tls-psk %s: %s", file,
			 rc == -EFBIG ? "not a regular file of at most 1 MiB" : strerror(-rc));
		return rc;
	}
	rc = tls_psk_parse(text, len, &cr->keys, why, sizeof(why));
	explicit_bzero(text, len);
	free(text);
	if (rc < 0) {
		snprintf(err, errlen, "--tls-psk %s: %s", file, why);
		return rc;
	}
	if (gnutls_psk_allocate_server_credentials(&cr->psk) < 0) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	gnutls_psk_set_server_credentials_function(cr->psk, psk_lookup);
	gnutls_psk_set_server_known_dh_params(cr->psk, GNUTLS_SEC_PARAM_MEDIUM);
	return 0;
}

static int
file_exists(const char *dir, const char *name, char *path, size_t len)
{
	snprintf(path, len, "%s/%s", dir, name);
	return access(path, F_OK) == 0;
}

static int
load_x509(struct tls_creds *cr, const char *dir, int verify_peer, char *err, size_t errlen)
{
	char cert[4096], key[4096], ca[4096], crl[4096];
	int rc;

	if (gnutls_certificate_allocate_credentials(&cr->x509) < 0) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	file_exists(dir, "server-cert.pem", cert, sizeof(cert));
	file_exists(dir, "server-key.pem", key, sizeof(key));
	rc = gnutls_certificate_set_x509_key_file(cr->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (rc < 0) {
		snprintf(err, errlen, "--tls-creds %s: server-cert.pem and server-key.pem: %s", dir,
			 gnutls_strerror(rc));
		return -EINVAL;
	}
	if (file_exists(dir, "ca-cert.pem", ca, sizeof(ca))) {
		rc = gnutls_certificate_set_x509_trust_file(cr->x509, ca, GNUTLS_X509_FMT_PEM);
		if (rc <= 0) {
			snprintf(err, errlen, "--tls-creds %s: ca-cert.pem: %s", dir,
				 rc < 0 ? gnutls_strerror(rc) : "no certificate in it");
			return -EINVAL;
		}
		cr->have_ca = 1;
	}
	if (file_exists(dir, "ca-crl.pem", crl, sizeof(crl))) {
		rc = gnutls_certificate_set_x509_crl_file(cr->x509, crl, GNUTLS_X509_FMT_PEM);
		if (rc < 0) {
			snprintf(err, errlen, "--tls-creds %s: ca-crl.pem: %s", dir,
				 gnutls_strerror(rc));
			return -EINVAL;
		}
	}
	if (verify_peer && !cr->have_ca) {
		snprintf(err, errlen,
			 "--tls-verify-peer: %s has no ca-cert.pem to verify clients with", dir);
		return -EINVAL;
	}
	cr->verify_peer = verify_peer;
	gnutls_certificate_set_known_dh_params(cr->x509, GNUTLS_SEC_PARAM_MEDIUM);
	return 0;
}

int
tls_creds_load(const struct tls_config *cfg, struct tls_creds **out, char *err, size_t errlen)
{
	struct tls_creds *cr = calloc(1, sizeof(*cr));
	const char *prio;
	int rc;

	if (!cr) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	if (!cfg->creds_dir == !cfg->psk_file) {
		snprintf(err, errlen, "--tls-creds and --tls-psk: exactly one");
		rc = -EINVAL;
		goto fail;
	}
	if (cfg->psk_file && cfg->verify_peer) {
		snprintf(err, errlen, "--tls-verify-peer is for --tls-creds (a PSK is verified "
			 "by the handshake)");
		rc = -EINVAL;
		goto fail;
	}
	rc = cfg->psk_file ? load_psk(cr, cfg->psk_file, err, errlen)
			   : load_x509(cr, cfg->creds_dir, cfg->verify_peer, err, errlen);
	if (rc < 0)
		goto fail;
	/* PSK key exchanges are not in NORMAL: ECDHE and DHE for forward secrecy first */
	prio = cr->psk ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL";
	if ((rc = gnutls_priority_init(&cr->prio, prio, NULL)) < 0) {
		snprintf(err, errlen, "TLS priority %s: %s", prio, gnutls_strerror(rc));
		rc = -EINVAL;
		goto fail;
	}
	*out = cr;
	return 0;
fail:
	tls_creds_free(cr);
	return rc;
}

/* ---- a session ---- */

enum tls_state { T_PREFIX, T_HANDSHAKE, T_OPEN, T_DEAD };

struct tls_conn {
	gnutls_session_t s;		/* NULL once detached */
	const struct tls_creds *cr;
	int fd;
	struct event *rd, *wr;		/* the socket's watches, one-shot */
	struct event *kick;		/* runs the pump on the next loop turn */
	struct bufferevent *b;		/* our end of the pair */
	enum tls_state state;
	uint8_t *prefix;
	size_t prefix_len, prefix_off;
	size_t pending;			/* bytes GnuTLS took but could not send yet (E_AGAIN) */
	int unsent;			/* output waiting: say TLS_EV_DRAINED when it has gone */
	int in_cb, doomed;		/* freed from inside the owner's callback */
	unsigned cert_status;		/* the client's certificate, as verified */
	int cert_checked;
	tls_event_fn *cb;
	void *arg;
	struct log_ratelimit *rl;
	char peer[64];
};

/* What a detached session carries across loops. */
struct tls_moving {
	gnutls_session_t s;
	const struct tls_creds *cr;
	size_t pending;
};

static int
psk_lookup(gnutls_session_t s, const char *user, gnutls_datum_t *key)
{
	struct tls_conn *t = gnutls_session_get_ptr(s);
	const struct tls_psk_key *k = tls_psk_find(t->cr->keys, user);

	if (!k) {
		log_limited(t->rl, LOG_LVL_WARN, "nbd client %s: TLS: unknown PSK username", t->peer);
		return -1;
	}
	if (!(key->data = gnutls_malloc(k->keylen)))
		return -1;
	memcpy(key->data, k->key, k->keylen);
	key->size = (unsigned)k->keylen;
	return 0;
}

/* During the handshake: a client certificate, when sent, must chain to ca-cert.pem. */
static int
verify_client(gnutls_session_t s)
{
	struct tls_conn *t = gnutls_session_get_ptr(s);
	unsigned n = 0;

	t->cert_checked = 1;
	if (!gnutls_certificate_get_peers(s, &n) || !n) {
		t->cert_status = t->cr->verify_peer ? GNUTLS_CERT_INVALID : 0;
		return t->cr->verify_peer ? -1 : 0;
	}
	if (gnutls_certificate_verify_peers2(s, &t->cert_status) < 0)
		t->cert_status |= GNUTLS_CERT_INVALID;
	return t->cert_status ? -1 : 0;
}

static ssize_t
tls_push(gnutls_transport_ptr_t p, const giovec_t *iov, int n)
{
	struct tls_conn *t = p;
	struct msghdr msg = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
	ssize_t r = sendmsg(t->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);

	if (r < 0)
		gnutls_transport_set_errno(t->s, errno == EWOULDBLOCK ? EAGAIN : errno);
	return r;
}

static ssize_t
tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
	struct tls_conn *t = p;
	ssize_t r = recv(t->fd, buf, len, MSG_DONTWAIT);

	if (r < 0)
		gnutls_transport_set_errno(t->s, errno == EWOULDBLOCK ? EAGAIN : errno);
	return r;
}

static void
session_bind(struct tls_conn *t)
{
	gnutls_session_set_ptr(t->s, t);
	gnutls_transport_set_ptr(t->s, t);
	gnutls_transport_set_vec_push_function(t->s, tls_push);
	gnutls_transport_set_pull_function(t->s, tls_pull);
}

static void tls_destroy(struct tls_conn *t);

/* The owner hears of it last: it may free t from inside. */
static void
tls_notify(struct tls_conn *t, int what)
{
	if (!t->cb)
		return;
	t->in_cb = 1;
	t->cb(t->arg, what);
	t->in_cb = 0;
	if (t->doomed)
		tls_destroy(t);
}

static int
tls_fail(struct tls_conn *t, const char *what, int rc)
{
	char cert[200] = "";

	if (t->cert_checked && t->cert_status) {
		gnutls_datum_t d = { NULL, 0 };
		if (gnutls_certificate_verification_status_print(t->cert_status,
								 GNUTLS_CRT_X509, &d, 0) == 0) {
			snprintf(cert, sizeof(cert), " (client certificate: %s)", (char *)d.data);
			gnutls_free(d.data);
		}
	}
	/* a client leaving without close_notify is common: worth a line only mid-handshake */
	if (rc == 0 || rc == GNUTLS_E_PREMATURE_TERMINATION)
		log_limited(t->rl, t->state == T_OPEN ? LOG_LVL_DEBUG : LOG_LVL_INFO,
			    "nbd client %s: TLS: %s: connection closed", t->peer, what);
	else
		log_limited(t->rl, LOG_LVL_WARN, "nbd client %s: TLS: %s: %s%s", t->peer, what,
			    rc < 0 ? gnutls_strerror(rc) : strerror(rc), cert);
	t->state = T_DEAD;
	return TLS_EV_CLOSED;
}

/*
 * The client closed its side: what it sent before goes to the owner
 * first, then an end of stream on the pair (BEV_EVENT_EOF, after the read
 * callback), as a socket bufferevent reports it. No TLS_EV_CLOSED.
 */
static int
tls_eof(struct tls_conn *t)
{
	log_limited(t->rl, LOG_LVL_DEBUG, "nbd client %s: TLS: end of stream", t->peer);
	t->state = T_DEAD;
	event_del(t->rd);
	event_del(t->wr);
	bufferevent_flush(t->b, EV_WRITE, BEV_FINISHED);
	return 0;
}

/* Waits for the socket in the direction GnuTLS needs. */
static void
wait_socket(struct tls_conn *t, int dir_write)
{
	event_add(dir_write ? t->wr : t->rd, NULL);
}

static int
pump_prefix(struct tls_conn *t)
{
	while (t->prefix_off < t->prefix_len) {
		ssize_t n = send(t->fd, t->prefix + t->prefix_off, t->prefix_len - t->prefix_off,
				 MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			wait_socket(t, 1);
			return 0;
		}
		if (n < 0)
			return tls_fail(t, "sending the STARTTLS reply", errno);
		t->prefix_off += (size_t)n;
	}
	free(t->prefix);
	t->prefix = NULL;
	t->state = T_HANDSHAKE;
	return 0;
}

static int
pump_handshake(struct tls_conn *t)
{
	for (;;) {
		int rc = gnutls_handshake(t->s);
		if (rc == GNUTLS_E_SUCCESS) {
			t->state = T_OPEN;
			char *desc = gnutls_session_get_desc(t->s);
			log_limited(t->rl, LOG_LVL_DEBUG, "nbd client %s: TLS %s", t->peer,
				    desc ? desc : "established");
			gnutls_free(desc);
			return 0;
		}
		if (rc == GNUTLS_E_AGAIN) {
			wait_socket(t, gnutls_record_get_direction(t->s));
			return 0;
		}
		if (rc == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal(rc))
			continue;
		return tls_fail(t, "handshake", rc);
	}
}

/* Plaintext the owner wrote, to the socket. 0, TLS_EV_DRAINED, or TLS_EV_CLOSED. */
static int
pump_send(struct tls_conn *t)
{
	struct evbuffer *in = bufferevent_get_input(t->b);
	size_t len = 0;

	while (t->pending || (len = evbuffer_get_length(in))) {
		ssize_t r;
		if (t->pending) {
			r = gnutls_record_send(t->s, NULL, 0);
		} else {
			size_t n = len < TLS_RECORD ? len : TLS_RECORD;
			const unsigned char *p = evbuffer_pullup(in, (ev_ssize_t)n);
			if (!p)
				return tls_fail(t, "sending", ENOMEM);
			r = gnutls_record_send(t->s, p, n);
			if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
				t->pending = n;
		}
		if (r == GNUTLS_E_INTERRUPTED)
			continue;
		if (r == GNUTLS_E_AGAIN) {
			t->unsent = 1;
			wait_socket(t, 1);
			return 0;
		}
		if (r < 0)
			return tls_fail(t, "sending", (int)r);
		evbuffer_drain(in, (size_t)r);
		t->pending = 0;
		t->unsent = 1;
	}
	if (t->unsent) {
		t->unsent = 0;
		return TLS_EV_DRAINED;
	}
	return 0;
}

/* Records from the socket, decrypted, to the owner. 0 or TLS_EV_CLOSED. */
static int
pump_recv(struct tls_conn *t)
{
	struct evbuffer *out = bufferevent_get_output(t->b);
	size_t got = 0;

	/* a reader that does not keep up: wait for the pair's write callback */
	while (evbuffer_get_length(out) < TLS_RX_MAX) {
		struct evbuffer_iovec v;
		if (got >= TLS_RX_MAX) {
			/* enough for one turn; what GnuTLS holds makes no socket event */
			if (gnutls_record_check_pending(t->s))
				event_active(t->kick, EV_TIMEOUT, 1);
			else
				wait_socket(t, 0);
			return 0;
		}
		if (evbuffer_reserve_space(out, TLS_RECORD, &v, 1) < 1)
			return tls_fail(t, "receiving", ENOMEM);
		ssize_t r = gnutls_record_recv(t->s, v.iov_base, v.iov_len);
		if (r > 0) {
			v.iov_len = (size_t)r;
			evbuffer_commit_space(out, &v, 1);
			got += (size_t)r;
			continue;
		}
		if (r == 0 || r == GNUTLS_E_PREMATURE_TERMINATION)
			return tls_eof(t);
		if (r == GNUTLS_E_AGAIN) {
			wait_socket(t, gnutls_record_get_direction(t->s));
			return 0;
		}
		if (r == GNUTLS_E_INTERRUPTED || !gnutls_error_is_fatal((int)r))
			continue;
		return tls_fail(t, "receiving", (int)r);
	}
	return 0;
}

static void
tls_pump(struct tls_conn *t)
{
	int ev = 0;

	if (t->state == T_PREFIX)
		ev = pump_prefix(t);
	if (!ev && t->state == T_HANDSHAKE)
		ev = pump_handshake(t);
	if (!ev && t->state == T_OPEN) {
		ev = pump_send(t);
		if (ev != TLS_EV_CLOSED) {
			int r = pump_recv(t);
			if (r)
				ev = r;
		}
	}
	if (ev == TLS_EV_CLOSED) {
		event_del(t->rd);
		event_del(t->wr);
	}
	if (ev)
		tls_notify(t, ev);
}

static void
socket_ready(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	tls_pump(arg);
}

static void
pair_data(struct bufferevent *b, void *arg)
{
	(void)b;
	struct tls_conn *t = arg;
	if (t->state != T_DEAD)
		tls_pump(t);
}

static struct tls_conn *
conn_alloc(struct event_base *base, const struct tls_creds *cr, int fd, const char *peer,
	   struct log_ratelimit *rl, tls_event_fn *cb, void *arg, struct bufferevent **plain)
{
	struct tls_conn *t = calloc(1, sizeof(*t));
	struct bufferevent *pair[2];

	if (!t) {
		close(fd);
		return NULL;
	}
	t->fd = fd;
	t->cr = cr;
	t->cb = cb;
	t->arg = arg;
	t->rl = rl;
	snprintf(t->peer, sizeof(t->peer), "%s", peer);
	t->rd = event_new(base, fd, EV_READ, socket_ready, t);
	t->wr = event_new(base, fd, EV_WRITE, socket_ready, t);
	t->kick = event_new(base, -1, 0, socket_ready, t);
	if (!t->rd || !t->wr || !t->kick || bufferevent_pair_new(base, 0, pair) < 0) {
		tls_destroy(t);
		return NULL;
	}
	t->b = pair[1];
	*plain = pair[0];
	bufferevent_setcb(t->b, pair_data, pair_data, NULL, t);
	bufferevent_enable(t->b, EV_READ | EV_WRITE);
	return t;
}

struct tls_conn *
tls_conn_new(struct event_base *base, const struct tls_creds *cr, int fd, const void *prefix,
	     size_t prefix_len, const char *peer, struct log_ratelimit *rl, tls_event_fn *cb,
	     void *arg, struct bufferevent **plain, int *err)
{
	struct tls_conn *t = conn_alloc(base, cr, fd, peer, rl, cb, arg, plain);
	int rc;

	*err = -ENOMEM;
	if (!t)
		return NULL;
	if (prefix_len) {
		if (!(t->prefix = malloc(prefix_len)))
			goto fail;
		memcpy(t->prefix, prefix, prefix_len);
		t->prefix_len = prefix_len;
	}
	rc = gnutls_init(&t->s, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
	if (rc < 0) {
		t->s = NULL;
		goto fail;
	}
	session_bind(t);
	if ((rc = gnutls_priority_set(t->s, cr->prio)) < 0 ||
	    (rc = gnutls_credentials_set(t->s, cr->psk ? GNUTLS_CRD_PSK : GNUTLS_CRD_CERTIFICATE,
					 cr->psk ? (void *)cr->psk : (void *)cr->x509)) < 0) {
		*err = -EPROTO;
		goto fail;
	}
	if (cr->x509 && cr->have_ca) {
		gnutls_certificate_server_set_request(t->s, cr->verify_peer ? GNUTLS_CERT_REQUIRE
									    : GNUTLS_CERT_REQUEST);
		gnutls_session_set_verify_function(t->s, verify_client);
		/*
		 * No list of acceptable CAs: a client sends the certificate it
		 * has, and one from another CA is refused, rather than left out
		 * by the client and the connection taken as anonymous.
		 */
		gnutls_certificate_send_x509_rdn_sequence(t->s, 1);
	}
	gnutls_handshake_set_timeout(t->s, 0);	/* the NBD handshake's deadline covers it */
	t->state = T_PREFIX;
	event_active(t->kick, EV_TIMEOUT, 1);
	*err = 0;
	return t;
fail:
	bufferevent_free(*plain);
	*plain = NULL;
	tls_destroy(t);
	return NULL;
}

size_t
tls_conn_unsent(const struct tls_conn *t)
{
	return evbuffer_get_length(bufferevent_get_input(t->b));
}

static void
tls_destroy(struct tls_conn *t)
{
	if (t->s) {
		/* close_notify, if the socket takes it now; a client that waits for it is rare */
		if (t->state == T_OPEN && !t->pending)
			gnutls_bye(t->s, GNUTLS_SHUT_WR);
		gnutls_deinit(t->s);
	}
	if (t->rd)
		event_free(t->rd);
	if (t->wr)
		event_free(t->wr);
	if (t->kick)
		event_free(t->kick);
	if (t->b)
		bufferevent_free(t->b);
	if (t->fd >= 0)
		close(t->fd);
	free(t->prefix);
	free(t);
}

void
tls_conn_free(struct tls_conn *t)
{
	if (!t)
		return;
	if (t->in_cb) {
		t->doomed = 1;
		return;
	}
	tls_destroy(t);
}

int
tls_conn_detach(struct tls_conn *t, struct tls_moving **out, void **unsent, size_t *unsent_len)
{
	struct tls_moving *mv = calloc(1, sizeof(*mv));
	struct evbuffer *in = bufferevent_get_input(t->b);

	if (!mv)
		return -ENOMEM;
	/* the owner's output into ours, our decrypted input into the owner's */
	bufferevent_flush(t->b, EV_READ | EV_WRITE, BEV_FLUSH);
	*unsent_len = evbuffer_get_length(in);
	*unsent = NULL;
	if (*unsent_len) {
		if (!(*unsent = malloc(*unsent_len))) {
			free(mv);
			return -ENOMEM;
		}
		evbuffer_remove(in, *unsent, *unsent_len);
	}
	mv->s = t->s;
	mv->cr = t->cr;
	mv->pending = t->pending;
	t->s = NULL;
	*out = mv;
	return 0;
}

void
tls_conn_set_owner(struct tls_conn *t, tls_event_fn *cb, void *arg)
{
	t->cb = cb;
	t->arg = arg;
}

int
tls_conn_fd(const struct tls_conn *t)
{
	return t->fd;
}

struct tls_conn *
tls_conn_attach(struct event_base *base, struct tls_moving *mv, int fd, const char *peer,
		struct log_ratelimit *rl, struct bufferevent **plain, int *err)
{
	struct tls_conn *t = conn_alloc(base, mv->cr, fd, peer, rl, NULL, NULL, plain);

	if (!t) {
		tls_moving_free(mv);
		*err = -ENOMEM;
		return NULL;
	}
	t->s = mv->s;
	t->pending = mv->pending;
	t->state = T_OPEN;
	free(mv);
	session_bind(t);
	/* GnuTLS may hold decrypted records already: they make no socket event */
	event_active(t->kick, EV_TIMEOUT, 1);
	*err = 0;
	return t;
}

void
tls_moving_free(struct tls_moving *mv)
{
	if (!mv)
		return;
	gnutls_deinit(mv->s);
	free(mv);
}
