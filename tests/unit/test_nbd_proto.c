/* NBD message parsers: valid messages, every truncation, hostile lengths. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "nbd_proto.h"

static size_t
put_name(uint8_t *p, const char *s)
{
	size_t n = strlen(s);
	put_be32(p, (uint32_t)n);
	memcpy(p + 4, s, n);
	return 4 + n;
}

static void
test_request(void **state)
{
	uint8_t b[28];
	struct nbd_request r;
	(void)state;
	put_be32(b, NBD_REQUEST_MAGIC);
	put_be16(b + 4, NBD_CMD_FLAG_FUA);
	put_be16(b + 6, NBD_CMD_WRITE);
	put_be64(b + 8, 0x1122334455667788ULL);
	put_be64(b + 16, 1ULL << 40);
	put_be32(b + 24, 4096);
	assert_int_equal(nbd_parse_request(b, &r), 0);
	assert_int_equal(r.flags, NBD_CMD_FLAG_FUA);
	assert_int_equal(r.type, NBD_CMD_WRITE);
	assert_true(r.cookie == 0x1122334455667788ULL);
	assert_true(r.offset == 1ULL << 40);
	assert_int_equal(r.length, 4096);
	b[0] ^= 1;
	assert_int_equal(nbd_parse_request(b, &r), -1);
}

static void
test_opt_go(void **state)
{
	uint8_t b[64];
	struct nbd_opt_go go;
	(void)state;
	size_t n = put_name(b, "vm1");
	put_be16(b + n, 2);
	put_be16(b + n + 2, NBD_INFO_BLOCK_SIZE);
	put_be16(b + n + 4, 77);	/* unknown: ignored */
	assert_int_equal(nbd_parse_opt_go(b, (uint32_t)n + 6, &go), 0);
	assert_string_equal(go.name, "vm1");
	assert_true(go.want_block_size);
	assert_false(go.want_name);
	/* every truncation is invalid */
	for (uint32_t len = 0; len < n + 6; len++)
		assert_int_equal(nbd_parse_opt_go(b, len, &go), NBD_REP_ERR_INVALID);
	/* trailing junk too */
	assert_int_equal(nbd_parse_opt_go(b, (uint32_t)n + 7, &go), NBD_REP_ERR_INVALID);
	/* a name longer than the payload */
	put_be32(b, 0xffffffff);
	assert_int_equal(nbd_parse_opt_go(b, (uint32_t)n + 6, &go), NBD_REP_ERR_TOO_BIG);
	put_be32(b, 100);
	assert_int_equal(nbd_parse_opt_go(b, (uint32_t)n + 6, &go), NBD_REP_ERR_INVALID);
	/* an embedded NUL in the name */
	memcpy(b, "\0\0\0\3a\0b", 7);
	put_be16(b + 7, 0);
	assert_int_equal(nbd_parse_opt_go(b, 9, &go), NBD_REP_ERR_INVALID);
}

struct seen {
	int n;
	char last[64];
};

static void
each(const char *q, uint32_t len, void *arg)
{
	struct seen *s = arg;
	(void)len;
	s->n++;
	strncpy(s->last, q, sizeof(s->last) - 1);
}

static void
test_opt_meta(void **state)
{
	uint8_t b[256];
	char name[NBD_MAX_STRING + 1];
	struct seen s = { 0 };
	uint32_t nq;
	(void)state;
	size_t n = put_name(b, "");
	put_be32(b + n, 2);
	n += 4;
	n += put_name(b + n, "base:allocation");
	n += put_name(b + n, "qemu:dirty-bitmap:x");
	assert_int_equal(nbd_parse_opt_meta(b, (uint32_t)n, name, each, &s, &nq), 0);
	assert_int_equal(nq, 2);
	assert_int_equal(s.n, 2);
	assert_string_equal(s.last, "qemu:dirty-bitmap:x");
	/* truncations: invalid, and no query reported before validation */
	for (uint32_t len = 0; len < n; len++) {
		s.n = 0;
		assert_int_not_equal(nbd_parse_opt_meta(b, len, name, each, &s, &nq), 0);
		assert_int_equal(s.n, 0);
	}
	/* a huge query count cannot make it loop or read past the end */
	put_be32(b + 4, 0x7fffffff);
	assert_int_equal(nbd_parse_opt_meta(b, (uint32_t)n, name, each, &s, &nq),
			 NBD_REP_ERR_INVALID);
}

static void
test_errno_mapping(void **state)
{
	(void)state;
	assert_int_equal(nbd_errno_to_wire(0), 0);
	assert_int_equal(nbd_errno_to_wire(EROFS), NBD_EPERM);
	assert_int_equal(nbd_errno_to_wire(ENOSPC), NBD_ENOSPC);
	assert_int_equal(nbd_errno_to_wire(ENOTSUP), NBD_ENOTSUP);
	assert_int_equal(nbd_errno_to_wire(ESHUTDOWN), NBD_ESHUTDOWN);
	assert_int_equal(nbd_errno_to_wire(ELOOP), NBD_EIO);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_request),
		cmocka_unit_test(test_opt_go),
		cmocka_unit_test(test_opt_meta),
		cmocka_unit_test(test_errno_mapping),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
