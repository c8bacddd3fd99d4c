/*
 * libFuzzer target: the pure NBD message parsers (nbd_proto.c), each fed an
 * exactly-sized heap copy so that AddressSanitizer sees any over-read, and
 * each result checked against what the protocol says it must be.
 *
 * Input layout: byte 0 picks the parser (mod 4), the rest is the message.
 *   0  nbd_parse_request   (28-byte request header; shorter inputs padded)
 *   1  nbd_parse_opt_go    (NBD_OPT_INFO / NBD_OPT_GO payload)
 *   2  nbd_parse_opt_meta  (NBD_OPT_{LIST,SET}_META_CONTEXT payload)
 *   3  nbd_errno_to_wire   (first 4 bytes as an errno)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "nbd_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint8_t *
dup_exact(const uint8_t *data, size_t len)
{
	/* malloc(0) may return NULL; the parsers must not touch a byte then */
	uint8_t *p = malloc(len ? len : 1);
	if (!p)
		fz_fail("out of memory");
	if (len)
		memcpy(p, data, len);
	return p;
}

static int
is_rep_err(uint32_t rc)
{
	return rc == NBD_REP_ERR_INVALID || rc == NBD_REP_ERR_TOO_BIG;
}

/* ---- request ---- */

static void
fuzz_request(const uint8_t *data, size_t size)
{
	uint8_t hdr[NBD_REQUEST_LEN] = { 0 };
	struct nbd_request req;
	uint8_t *p;

	memcpy(hdr, data, size < sizeof(hdr) ? size : sizeof(hdr));
	p = dup_exact(hdr, sizeof(hdr));
	memset(&req, 0xa5, sizeof(req));
	int rc = nbd_parse_request(p, &req);
	if (get_be32(hdr) != NBD_REQUEST_MAGIC) {
		if (rc != -1)
			fz_fail("bad magic accepted");
	} else {
		if (rc != 0)
			fz_fail("good magic refused");
		/* the parse must be lossless: encode it back */
		uint8_t back[NBD_REQUEST_LEN];
		put_be32(back, NBD_REQUEST_MAGIC);
		put_be16(back + 4, req.flags);
		put_be16(back + 6, req.type);
		put_be64(back + 8, req.cookie);
		put_be64(back + 16, req.offset);
		put_be32(back + 24, req.length);
		if (memcmp(back, hdr, sizeof(hdr)) != 0)
			fz_fail("request header does not round-trip");
	}
	free(p);
}

/* ---- NBD_OPT_GO ---- */

/* What the protocol says an OPT_GO payload is, written independently. */
static uint32_t
model_go(const uint8_t *p, size_t len, size_t *name_len)
{
	if (len < 4)
		return NBD_REP_ERR_INVALID;
	uint32_t n = get_be32(p);
	if (n > NBD_MAX_STRING)
		return NBD_REP_ERR_TOO_BIG;
	if (len - 4 < n)
		return NBD_REP_ERR_INVALID;
	if (memchr(p + 4, 0, n))
		return NBD_REP_ERR_INVALID;
	*name_len = n;
	size_t rest = len - 4 - n;
	if (rest < 2)
		return NBD_REP_ERR_INVALID;
	if ((size_t)get_be16(p + 4 + n) * 2 != rest - 2)
		return NBD_REP_ERR_INVALID;
	return 0;
}

static void
fuzz_go(const uint8_t *data, size_t size)
{
	struct nbd_opt_go *go = malloc(sizeof(*go));
	uint8_t *p = dup_exact(data, size);
	size_t name_len = 0;

	if (!go)
		fz_fail("out of memory");
	memset(go, 0x5a, sizeof(*go));
	uint32_t rc = nbd_parse_opt_go(p, (uint32_t)size, go);
	uint32_t want = model_go(data, size, &name_len);
	if (rc != want)
		fz_fail("nbd_parse_opt_go returned %#x, the protocol says %#x", rc, want);
	if (rc == 0) {
		if (strlen(go->name) != name_len || memcmp(go->name, data + 4, name_len))
			fz_fail("GO: export name parsed wrong");
		if (go->nr_info != get_be16(data + 4 + name_len))
			fz_fail("GO: nr_info wrong");
		int want_name = 0, want_desc = 0, want_bs = 0;
		for (size_t i = 0; i < go->nr_info; i++) {
			uint16_t t = get_be16(data + 4 + name_len + 2 + 2 * i);
			want_name |= t == NBD_INFO_NAME;
			want_desc |= t == NBD_INFO_DESCRIPTION;
			want_bs |= t == NBD_INFO_BLOCK_SIZE;
		}
		if (go->want_name != want_name || go->want_description != want_desc ||
		    go->want_block_size != want_bs)
			fz_fail("GO: info requests parsed wrong");
	} else if (!is_rep_err(rc)) {
		fz_fail("GO: unexpected error %#x", rc);
	}
	free(p);
	free(go);
}

/* ---- NBD_OPT_{LIST,SET}_META_CONTEXT ---- */

struct meta_seen {
	const uint8_t *data;
	size_t len;
	size_t pos;		/* where the model expects the next query */
	uint32_t calls;
};

static void
meta_each(const char *q, uint32_t qlen, void *arg)
{
	struct meta_seen *s = arg;

	if (strlen(q) != qlen || qlen > NBD_MAX_STRING)
		fz_fail("META: query length %u does not match the string", qlen);
	if (s->pos + 4 > s->len || get_be32(s->data + s->pos) != qlen ||
	    s->pos + 4 + qlen > s->len || memcmp(s->data + s->pos + 4, q, qlen))
		fz_fail("META: query %u is not the one in the payload", s->calls);
	s->pos += 4 + qlen;
	s->calls++;
}

static uint32_t
model_string(const uint8_t *p, size_t len, size_t *pos)
{
	if (len - *pos < 4)
		return NBD_REP_ERR_INVALID;
	uint32_t n = get_be32(p + *pos);
	*pos += 4;
	if (n > NBD_MAX_STRING)
		return NBD_REP_ERR_TOO_BIG;
	if (len - *pos < n || memchr(p + *pos, 0, n))
		return NBD_REP_ERR_INVALID;
	*pos += n;
	return 0;
}

static uint32_t
model_meta(const uint8_t *p, size_t len, size_t *queries_at, uint32_t *nq)
{
	size_t pos = 0;
	uint32_t rc = model_string(p, len, &pos);
	if (rc)
		return rc;
	if (len - pos < 4)
		return NBD_REP_ERR_INVALID;
	*nq = get_be32(p + pos);
	pos += 4;
	*queries_at = pos;
	if (*nq > (len - pos) / 4)
		return NBD_REP_ERR_INVALID;
	for (uint32_t i = 0; i < *nq; i++)
		if ((rc = model_string(p, len, &pos)))
			return rc;
	return pos == len ? 0 : NBD_REP_ERR_INVALID;
}

static void
fuzz_meta(const uint8_t *data, size_t size)
{
	char *name = malloc(NBD_MAX_STRING + 1);
	uint8_t *p = dup_exact(data, size);
	uint32_t nq = 0, nq2 = 0, want_nq = 0;
	size_t queries_at = 0;

	if (!name)
		fz_fail("out of memory");
	uint32_t rc = nbd_parse_opt_meta(p, (uint32_t)size, name, NULL, NULL, &nq);
	uint32_t want = model_meta(data, size, &queries_at, &want_nq);
	if (rc != want)
		fz_fail("nbd_parse_opt_meta returned %#x, the protocol says %#x", rc, want);
	if (rc && !is_rep_err(rc))
		fz_fail("META: unexpected error %#x", rc);
	if (rc == 0) {
		size_t n = get_be32(data);
		if (strlen(name) != n || memcmp(name, data + 4, n))
			fz_fail("META: export name parsed wrong");
		if (nq != want_nq)
			fz_fail("META: %u queries counted, payload has %u", nq, want_nq);
	}

	/* with a callback: the same answer, and every query exactly once */
	struct meta_seen seen = { data, size, queries_at, 0 };
	uint32_t rc2 = nbd_parse_opt_meta(p, (uint32_t)size, name, meta_each, &seen, &nq2);
	if (rc2 != rc)
		fz_fail("META: %#x with a callback, %#x without", rc2, rc);
	if (rc2 == 0 && (seen.calls != nq2 || nq2 != nq || seen.pos != size))
		fz_fail("META: callback saw %u of %u queries", seen.calls, nq2);
	if (rc2 != 0 && seen.calls)
		fz_fail("META: callback ran for an invalid payload");
	free(p);
	free(name);
}

/* ---- errno ---- */

static void
fuzz_errno(const uint8_t *data, size_t size)
{
	uint8_t b[4] = { 0 };
	memcpy(b, data, size < 4 ? size : 4);
	int err = (int)get_be32(b);
	uint32_t w = nbd_errno_to_wire(err);
	if ((err == 0) != (w == 0))
		fz_fail("errno %d maps to wire error %u", err, w);
	switch (w) {
	case 0: case NBD_EPERM: case NBD_EIO: case NBD_ENOMEM: case NBD_EINVAL:
	case NBD_ENOSPC: case NBD_EOVERFLOW: case NBD_ENOTSUP: case NBD_ESHUTDOWN:
		break;
	default:
		fz_fail("errno %d maps to %u, which is no NBD error", err, w);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	uint8_t which = data[0] & 3;
	data++;
	size--;
	if (size > NBD_MAX_OPTION_LEN)
		return 0;	/* the server never hands the parsers more */
	switch (which) {
	case 0: fuzz_request(data, size); break;
	case 1: fuzz_go(data, size); break;
	case 2: fuzz_meta(data, size); break;
	case 3: fuzz_errno(data, size); break;
	}
	return 0;
}
