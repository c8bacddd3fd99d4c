/* Parsers for NBD client messages: bounds-checked, no allocation. */
#include "nbd_proto.h"

#include <errno.h>
#include <string.h>

int
nbd_parse_request(const uint8_t *p, struct nbd_request *req)
{
	if (get_be32(p) != NBD_REQUEST_MAGIC)
		return -1;
	req->flags = get_be16(p + 4);
	req->type = get_be16(p + 6);
	req->cookie = get_be64(p + 8);
	req->offset = get_be64(p + 16);
	req->length = get_be32(p + 24);
	return 0;
}

/* Reads a u32-length-prefixed name into out (NUL-terminated). */
static uint32_t
parse_name(const uint8_t *p, uint32_t len, uint32_t *pos, char *out)
{
	if (len - *pos < 4)
		return NBD_REP_ERR_INVALID;
	uint32_t n = get_be32(p + *pos);
	*pos += 4;
	if (n > NBD_MAX_STRING)
		return NBD_REP_ERR_TOO_BIG;
	if (len - *pos < n)
		return NBD_REP_ERR_INVALID;
	memcpy(out, p + *pos, n);
	out[n] = '\0';
	if (strlen(out) != n)	/* embedded NUL */
		return NBD_REP_ERR_INVALID;
	*pos += n;
	return 0;
}

uint32_t
nbd_parse_opt_go(const uint8_t *p, uint32_t len, struct nbd_opt_go *out)
{
	uint32_t pos = 0, rc;

	memset(out, 0, sizeof(*out));
	rc = parse_name(p, len, &pos, out->name);
	if (rc)
		return rc;
	if (len - pos < 2)
		return NBD_REP_ERR_INVALID;
	out->nr_info = get_be16(p + pos);
	pos += 2;
	if ((uint32_t)out->nr_info * 2 != len - pos)
		return NBD_REP_ERR_INVALID;
	for (uint16_t i = 0; i < out->nr_info; i++, pos += 2) {
		switch (get_be16(p + pos)) {
		case NBD_INFO_NAME: out->want_name = 1; break;
		case NBD_INFO_DESCRIPTION: out->want_description = 1; break;
		case NBD_INFO_BLOCK_SIZE: out->want_block_size = 1; break;
		default: break;	/* unknown requests are ignored */
		}
	}
	return 0;
}

uint32_t
nbd_parse_opt_meta(const uint8_t *p, uint32_t len, char *name,
		   void (*each)(const char *q, uint32_t qlen, void *arg), void *arg,
		   uint32_t *nr_queries)
{
	uint32_t pos = 0, rc;
	char query[NBD_MAX_STRING + 1];

	rc = parse_name(p, len, &pos, name);
	if (rc)
		return rc;
	if (len - pos < 4)
		return NBD_REP_ERR_INVALID;
	*nr_queries = get_be32(p + pos);
	pos += 4;
	/* each query takes at least its 4-byte length */
	if (*nr_queries > (len - pos) / 4)
		return NBD_REP_ERR_INVALID;
	/* validate everything before acting on any of it */
	uint32_t check = pos;
	for (uint32_t i = 0; i < *nr_queries; i++) {
		rc = parse_name(p, len, &check, query);
		if (rc)
			return rc;
	}
	if (check != len)
		return NBD_REP_ERR_INVALID;
	for (uint32_t i = 0; each && i < *nr_queries; i++) {
		parse_name(p, len, &pos, query);
		each(query, (uint32_t)strlen(query), arg);
	}
	return 0;
}

uint32_t
nbd_errno_to_wire(int err)
{
	switch (err) {
	case 0: return 0;
	case EPERM: case EROFS: case EACCES: return NBD_EPERM;
	case ENOMEM: return NBD_ENOMEM;
	case EINVAL: return NBD_EINVAL;
	case ENOSPC: case EFBIG: case EDQUOT: return NBD_ENOSPC;
	case EOVERFLOW: return NBD_EOVERFLOW;
	case ENOTSUP: return NBD_ENOTSUP;
	case ESHUTDOWN: return NBD_ESHUTDOWN;
	default: return NBD_EIO;
	}
}
