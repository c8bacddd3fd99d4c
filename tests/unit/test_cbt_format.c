/* The CBT log format library: the header against bytes laid out by hand at
 * the documented offsets (docs/CBT-LOG.md), its refusals, the bitmap's
 * size and bit order, and the set-bit count and run length against a
 * bit-by-bit model. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cbt_format.h"

/* A header's 48 bytes as the format describes them, built field by field. */
static void
hand_header(uint8_t out[CBT_HEADER_SIZE], uint8_t parent_fill, uint8_t child_fill,
	    uint32_t flag, uint64_t size)
{
	memset(out, 0xee, CBT_HEADER_SIZE);		/* the padding need not be zero */
	for (int i = 0; i < 16; i++) {
		out[i] = (uint8_t)(parent_fill + i);	/* 0..15: parent UUID */
		out[16 + i] = (uint8_t)(child_fill + i);	/* 16..31: child UUID */
	}
	for (int i = 0; i < 4; i++)
		out[32 + i] = (uint8_t)(flag >> (8 * i));	/* 32..35: flag, LE */
	for (int i = 0; i < 8; i++)
		out[40 + i] = (uint8_t)(size >> (8 * i));	/* 40..47: size, LE */
}

static void
test_header_roundtrip(void **state)
{
	uint8_t in[CBT_HEADER_SIZE], out[CBT_HEADER_SIZE];
	struct cbt_header h;
	const char *why = NULL;
	const uint64_t size = 0x0000012345678901ull;	/* every byte of the size differs */
	(void)state;

	hand_header(in, 0x10, 0xa0, 1, size);
	assert_int_equal(cbt_header_decode(in, CBT_HEADER_SIZE + cbt_bitmap_bytes(size), &h, &why), 0);
	for (int i = 0; i < 16; i++) {
		assert_int_equal(h.parent[i], 0x10 + i);
		assert_int_equal(h.child[i], 0xa0 + i);
	}
	assert_int_equal(h.consistent, 1);
	assert_true(h.size == size);

	/* encoding gives the same bytes, with the padding zeroed */
	cbt_header_encode(&h, out);
	memset(in + 36, 0, 4);
	assert_memory_equal(in, out, CBT_HEADER_SIZE);

	/* and a struct encoded then decoded is itself */
	struct cbt_header g = { .consistent = 0, .size = 1 }, back;
	memset(g.parent, 0xff, 16);
	memset(g.child, 0x5a, 16);
	cbt_header_encode(&g, out);
	assert_int_equal(out[0], 0xff);
	assert_int_equal(out[16], 0x5a);
	assert_int_equal(out[40], 1);
	assert_int_equal(cbt_header_decode(out, CBT_HEADER_SIZE + 1, &back, &why), 0);
	assert_memory_equal(&g.parent, &back.parent, 16);
	assert_memory_equal(&g.child, &back.child, 16);
	assert_int_equal(back.consistent, 0);
	assert_true(back.size == 1);
}

/* decode's verdict and reason for one header and file length */
static int
decode(uint32_t flag, uint64_t size, uint64_t file_len, const char **why)
{
	uint8_t in[CBT_HEADER_SIZE];
	struct cbt_header h;

	hand_header(in, 0, 0, flag, size);
	*why = NULL;
	int rc = cbt_header_decode(in, file_len, &h, why);
	if (rc)
		assert_non_null(*why);
	return rc;
}

static void
test_header_refusals(void **state)
{
	const char *why;
	const uint64_t mib = 1 << 20, full = CBT_HEADER_SIZE + cbt_bitmap_bytes(mib);
	(void)state;

	assert_int_equal(decode(0, mib, full, &why), 0);
	assert_int_equal(decode(0, mib, full + 4096, &why), 0);	/* slack after the bitmap */
	assert_int_equal(decode(0, 0, full, &why), -EINVAL);
	assert_non_null(strstr(why, "is 0"));
	assert_int_equal(decode(0, CBT_MAX_DISK + 1, UINT64_MAX, &why), -EINVAL);
	assert_non_null(strstr(why, "too large"));
	assert_int_equal(decode(0, UINT64_MAX, UINT64_MAX, &why), -EINVAL);
	assert_int_equal(decode(0, CBT_MAX_DISK, CBT_HEADER_SIZE + cbt_bitmap_bytes(CBT_MAX_DISK),
				&why), 0);
	assert_int_equal(decode(2, mib, full, &why), -EINVAL);
	assert_non_null(strstr(why, "flag"));
	assert_int_equal(decode(0xffffffffu, mib, full, &why), -EINVAL);
	assert_int_equal(decode(1, mib, full - 1, &why), -EINVAL);	/* one byte short */
	assert_non_null(strstr(why, "shorter"));
	assert_int_equal(decode(1, mib, CBT_HEADER_SIZE, &why), -EINVAL);
	assert_int_equal(decode(1, 1, CBT_HEADER_SIZE, &why), -EINVAL);	/* its one bitmap byte missing */
	assert_int_equal(decode(1, 1, CBT_HEADER_SIZE + 1, &why), 0);
}

static void
test_bitmap_sizes(void **state)
{
	const uint64_t B = CBT_BLOCK_SIZE;
	(void)state;

	assert_int_equal(B, 65536);
	assert_int_equal(cbt_blocks(1), 1);
	assert_int_equal(cbt_bitmap_bytes(1), 1);
	assert_int_equal(cbt_blocks(B), 1);
	assert_int_equal(cbt_bitmap_bytes(B), 1);
	assert_int_equal(cbt_blocks(B + 1), 2);
	assert_int_equal(cbt_bitmap_bytes(B + 1), 1);
	assert_int_equal(cbt_blocks(8 * B), 8);
	assert_int_equal(cbt_bitmap_bytes(8 * B), 1);
	assert_int_equal(cbt_blocks(8 * B + 1), 9);
	assert_int_equal(cbt_bitmap_bytes(8 * B + 1), 2);
	assert_int_equal(cbt_bitmap_bytes(16 * B), 2);
	assert_true(cbt_bitmap_bytes(10ull << 30) == 20480);		/* 10 GiB: 163840 blocks */
	assert_true(cbt_bitmap_bytes(CBT_MAX_DISK) == 1ull << 33);	/* 8 GiB at the limit */
}

static void
test_bit_order(void **state)
{
	uint8_t bm[3] = { 0 };
	(void)state;

	cbt_bit_set(bm, 0);
	assert_int_equal(bm[0], 0x01);		/* least significant first */
	cbt_bit_set(bm, 7);
	assert_int_equal(bm[0], 0x81);
	cbt_bit_set(bm, 9);
	assert_int_equal(bm[1], 0x02);		/* block 9: byte 1, bit 1 */
	cbt_bit_set(bm, 23);
	assert_int_equal(bm[2], 0x80);
	for (uint64_t b = 0; b < 24; b++)
		assert_int_equal(cbt_bit(bm, b), b == 0 || b == 7 || b == 9 || b == 23);
}

static uint64_t
model_count(const uint8_t *bm, uint64_t nbits)
{
	uint64_t n = 0;
	for (uint64_t b = 0; b < nbits; b++)
		n += (bm[b / 8] >> (b % 8)) & 1;
	return n;
}

static uint64_t
model_run(const uint8_t *bm, uint64_t first, uint64_t limit)
{
	int v = (bm[first / 8] >> (first % 8)) & 1;
	uint64_t n = 1;
	while (n < limit && ((bm[(first + n) / 8] >> ((first + n) % 8)) & 1) == v)
		n++;
	return n;
}

/* Every start and limit over bm's bits against the model. */
static void
check_all(const uint8_t *bm, uint64_t nbits)
{
	for (uint64_t n = 0; n <= nbits; n++)
		assert_true(cbt_count_set(bm, n) == model_count(bm, n));
	for (uint64_t first = 0; first < nbits; first++)
		for (uint64_t limit = 1; first + limit <= nbits; limit++)
			assert_true(cbt_run_length(bm, first, limit) == model_run(bm, first, limit));
}

static void
test_count_and_runs(void **state)
{
	(void)state;

	/* runs crossing byte boundaries: bits 5..20 set, then 29..47 */
	uint8_t a[6] = { 0xe0, 0xff, 0x1f, 0xe0, 0xff, 0xff };
	assert_int_equal(cbt_count_set(a, 48), 16 + 19);
	assert_int_equal(cbt_run_length(a, 0, 48), 5);
	assert_int_equal(cbt_run_length(a, 5, 48), 16);
	assert_int_equal(cbt_run_length(a, 21, 48), 8);
	assert_int_equal(cbt_run_length(a, 29, 19), 19);	/* to the end */
	assert_int_equal(cbt_run_length(a, 8, 8), 8);		/* the limit cuts a run at a byte's end */
	assert_int_equal(cbt_run_length(a, 8, 7), 7);		/* and inside one */
	assert_int_equal(cbt_run_length(a, 5, 1), 1);
	check_all(a, 48);

	/* bits past nbits are not counted */
	uint8_t b[2] = { 0xff, 0xff };
	assert_int_equal(cbt_count_set(b, 9), 9);
	assert_int_equal(cbt_count_set(b, 0), 0);
	assert_int_equal(cbt_run_length(b, 0, 9), 9);
	check_all(b, 16);

	/* whole clear and whole set bytes, then a lone bit */
	uint8_t c[8] = { 0, 0, 0, 0x01, 0xff, 0xff, 0xfe, 0x00 };
	assert_int_equal(cbt_run_length(c, 0, 64), 24);
	assert_int_equal(cbt_run_length(c, 24, 40), 1);
	assert_int_equal(cbt_run_length(c, 25, 39), 7);
	assert_int_equal(cbt_run_length(c, 32, 32), 16);
	assert_int_equal(cbt_run_length(c, 48, 16), 1);
	assert_int_equal(cbt_run_length(c, 49, 15), 7);
	check_all(c, 64);

	/* patterns: alternating, and a fixed pseudo-random sequence */
	uint8_t d[9];
	memset(d, 0x55, sizeof(d));
	assert_int_equal(cbt_count_set(d, 72), 36);
	check_all(d, 72);
	uint32_t x = 2463534242u;
	for (int round = 0; round < 64; round++) {
		for (size_t i = 0; i < sizeof(d); i++) {
			x ^= x << 13;
			x ^= x >> 17;
			x ^= x << 5;
			/* long runs as well as short ones */
			d[i] = (x & 0x300) == 0 ? 0 : (x & 0x300) == 0x100 ? 0xff : (uint8_t)x;
		}
		check_all(d, 72 - (uint64_t)(round % 8));
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_header_roundtrip),
		cmocka_unit_test(test_header_refusals),
		cmocka_unit_test(test_bitmap_sizes),
		cmocka_unit_test(test_bit_order),
		cmocka_unit_test(test_count_and_runs),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
