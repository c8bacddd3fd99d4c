/*
 * The blkif ABI decoder against Xen's own definitions: requests are built
 * with the structs of xen/io/blkif.h (libxen-dev; the native layout is
 * x86_64 here), the x86_32 layout with the same fields packed to 4 bytes as
 * an i386 compiler lays them out, and ring sizes from struct blkif_sring.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <xen/xen.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

/* Xen's values, before our header reuses the names */
static const int xen_op[] = { BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
			      BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT };
static const int xen_rsp[] = { BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY };
static const int xen_max_segs = BLKIF_MAX_SEGMENTS_PER_REQUEST;
static const int xen_max_ind_pages = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;
static const int xen_discard_secure = BLKIF_DISCARD_SECURE;
#undef BLKIF_OP_READ
#undef BLKIF_OP_WRITE
#undef BLKIF_OP_WRITE_BARRIER
#undef BLKIF_OP_FLUSH_DISKCACHE
#undef BLKIF_OP_DISCARD
#undef BLKIF_OP_INDIRECT
#undef BLKIF_RSP_EOPNOTSUPP
#undef BLKIF_RSP_ERROR
#undef BLKIF_RSP_OKAY
#undef BLKIF_DISCARD_SECURE

#include "blkif_abi.h"

/* i386 aligns 64-bit fields to 4: the x86_32 ABI's layout */
#pragma pack(push, 4)
struct x86_32_request {
	uint8_t operation, nr_segments;
	uint16_t handle;
	uint64_t id, sector_number;
	struct blkif_request_segment seg[11];
};
struct x86_32_discard {
	uint8_t operation, flag;
	uint16_t handle;
	uint64_t id, sector_number, nr_sectors;
};
struct x86_32_indirect {
	uint8_t operation, indirect_op;
	uint16_t nr_segments;
	uint64_t id, sector_number;
	uint16_t handle;
	uint32_t indirect_grefs[8];
	uint64_t pad;
};
struct x86_32_response {
	uint64_t id;
	uint8_t operation;
	int16_t status;
};
#pragma pack(pop)

static void
test_constants_match_xen(void **state)
{
	(void)state;
	static const int ours[] = { BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
				    BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT };
	for (size_t i = 0; i < sizeof(ours) / sizeof(ours[0]); i++)
		assert_int_equal(ours[i], xen_op[i]);
	assert_int_equal(BLKIF_RSP_EOPNOTSUPP, xen_rsp[0]);
	assert_int_equal(BLKIF_RSP_ERROR, xen_rsp[1]);
	assert_int_equal(BLKIF_RSP_OKAY, xen_rsp[2]);
	assert_int_equal(BLKIF_MAX_SEGMENTS, xen_max_segs);
	assert_int_equal(BLKIF_MAX_INDIRECT_PAGES, xen_max_ind_pages);
	assert_int_equal(BLKIF_DISCARD_SECURE, xen_discard_secure);
	assert_int_equal(BLKIF_SEGS_PER_INDIRECT_PAGE,
			 XEN_PAGE_SIZE / sizeof(struct blkif_request_segment));
	assert_int_equal(BLKIF_RING_HEADER, offsetof(struct blkif_sring, ring));
}

static void
test_entry_sizes_and_ring_entries(void **state)
{
	(void)state;
	assert_int_equal(blkif_entry_size(BLKIF_PROTO_X86_64), sizeof(union blkif_sring_entry));
	assert_int_equal(blkif_entry_size(BLKIF_PROTO_X86_32), sizeof(struct x86_32_request));
	assert_int_equal(sizeof(struct x86_32_request), 108);
	for (unsigned pages = 1; pages <= 16; pages *= 2) {
		size_t room = (size_t)pages * XEN_PAGE_SIZE - offsetof(struct blkif_sring, ring);
		for (int proto = 0; proto < 2; proto++) {
			unsigned n = blkif_ring_entries(proto, pages);
			/* the largest power of two that fits, as __RING_SIZE rounds */
			assert_true((n & (n - 1)) == 0);
			assert_true(n * blkif_entry_size(proto) <= room);
			assert_true(2 * n * blkif_entry_size(proto) > room);
		}
	}
	assert_int_equal(blkif_ring_entries(BLKIF_PROTO_X86_64, 1), 32);
	assert_int_equal(blkif_ring_entries(BLKIF_PROTO_X86_64, 16), 512);
}

static void
test_native_read_write(void **state)
{
	(void)state;
	union blkif_sring_entry e;
	struct blkif_raw_req r;

	memset(&e, 0xee, sizeof(e));
	e.req.operation = BLKIF_OP_WRITE;
	e.req.nr_segments = 11;
	e.req.handle = 51712;
	e.req.id = 0x0123456789abcdefULL;
	e.req.sector_number = 0xfedcba9876543210ULL;
	for (int i = 0; i < 11; i++) {
		e.req.seg[i].gref = 0x10000000u + (uint32_t)i;
		e.req.seg[i].first_sect = (uint8_t)(i % 8);
		e.req.seg[i].last_sect = 7;
	}
	blkif_decode(BLKIF_PROTO_X86_64, (const uint8_t *)&e, &r);
	assert_int_equal(r.op, BLKIF_OP_WRITE);
	assert_int_equal(r.nr_segments, 11);
	assert_true(r.id == 0x0123456789abcdefULL);
	assert_true(r.sector == 0xfedcba9876543210ULL);
	for (int i = 0; i < 11; i++) {
		assert_int_equal(r.seg[i].gref, 0x10000000u + (uint32_t)i);
		assert_int_equal(r.seg[i].first_sect, i % 8);
		assert_int_equal(r.seg[i].last_sect, 7);
	}
}

static void
test_native_discard_and_indirect(void **state)
{
	(void)state;
	union blkif_sring_entry e;
	struct blkif_raw_req r;
	struct blkif_request_discard *d = (struct blkif_request_discard *)&e.req;
	struct blkif_request_indirect *ind = (struct blkif_request_indirect *)&e.req;

	memset(&e, 0, sizeof(e));
	d->operation = BLKIF_OP_DISCARD;
	d->flag = BLKIF_DISCARD_SECURE;
	d->id = 77;
	d->sector_number = 1u << 30;
	d->nr_sectors = 4096;
	blkif_decode(BLKIF_PROTO_X86_64, (const uint8_t *)&e, &r);
	assert_int_equal(r.op, BLKIF_OP_DISCARD);
	assert_int_equal(r.discard_flag, BLKIF_DISCARD_SECURE);
	assert_int_equal(r.id, 77);
	assert_true(r.sector == 1u << 30 && r.nr_sectors == 4096);

	memset(&e, 0, sizeof(e));
	ind->operation = BLKIF_OP_INDIRECT;
	ind->indirect_op = BLKIF_OP_READ;
	ind->nr_segments = 256;
	ind->id = 99;
	ind->sector_number = 12345;
	ind->handle = 768;
	for (int i = 0; i < 8; i++)
		ind->indirect_grefs[i] = 500u + (uint32_t)i;
	blkif_decode(BLKIF_PROTO_X86_64, (const uint8_t *)&e, &r);
	assert_int_equal(r.op, BLKIF_OP_INDIRECT);
	assert_int_equal(r.indirect_op, BLKIF_OP_READ);
	assert_int_equal(r.indirect_nr_segments, 256);
	assert_true(r.id == 99 && r.sector == 12345);
	for (int i = 0; i < 8; i++)
		assert_int_equal(r.indirect_grefs[i], 500 + i);
}

static void
test_x86_32_layouts(void **state)
{
	(void)state;
	uint8_t buf[128];
	struct blkif_raw_req r;
	struct x86_32_request q = { .operation = BLKIF_OP_READ, .nr_segments = 2,
				    .id = 0x1122334455667788ULL, .sector_number = 4242 };
	q.seg[0] = (struct blkif_request_segment){ 7, 0, 7 };
	q.seg[1] = (struct blkif_request_segment){ 8, 1, 3 };
	memcpy(buf, &q, sizeof(q));
	blkif_decode(BLKIF_PROTO_X86_32, buf, &r);
	assert_true(r.op == BLKIF_OP_READ && r.nr_segments == 2);
	assert_true(r.id == 0x1122334455667788ULL && r.sector == 4242);
	assert_true(r.seg[1].gref == 8 && r.seg[1].first_sect == 1 && r.seg[1].last_sect == 3);

	struct x86_32_discard d = { .operation = BLKIF_OP_DISCARD, .id = 5,
				    .sector_number = 6, .nr_sectors = 7 };
	memcpy(buf, &d, sizeof(d));
	blkif_decode(BLKIF_PROTO_X86_32, buf, &r);
	assert_true(r.id == 5 && r.sector == 6 && r.nr_sectors == 7);

	struct x86_32_indirect ind = { .operation = BLKIF_OP_INDIRECT,
				       .indirect_op = BLKIF_OP_WRITE, .nr_segments = 17,
				       .id = 9, .sector_number = 10 };
	ind.indirect_grefs[0] = 31;
	ind.indirect_grefs[7] = 38;
	memcpy(buf, &ind, sizeof(ind));
	blkif_decode(BLKIF_PROTO_X86_32, buf, &r);
	assert_true(r.indirect_op == BLKIF_OP_WRITE && r.indirect_nr_segments == 17);
	assert_true(r.id == 9 && r.sector == 10);
	assert_true(r.indirect_grefs[0] == 31 && r.indirect_grefs[7] == 38);
}

static void
test_responses(void **state)
{
	(void)state;
	union blkif_sring_entry e;
	uint8_t buf[128];

	memset(&e, 0xaa, sizeof(e));
	blkif_encode_response(BLKIF_PROTO_X86_64, (uint8_t *)&e, 0xdeadbeefcafeULL,
			      BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_EOPNOTSUPP);
	assert_true(e.rsp.id == 0xdeadbeefcafeULL);
	assert_int_equal(e.rsp.operation, BLKIF_OP_FLUSH_DISKCACHE);
	assert_int_equal(e.rsp.status, BLKIF_RSP_EOPNOTSUPP);

	struct x86_32_response r32;
	memset(buf, 0xaa, sizeof(buf));
	blkif_encode_response(BLKIF_PROTO_X86_32, buf, 3, BLKIF_OP_READ, BLKIF_RSP_ERROR);
	memcpy(&r32, buf, sizeof(r32));
	assert_true(r32.id == 3 && r32.operation == BLKIF_OP_READ);
	assert_int_equal(r32.status, BLKIF_RSP_ERROR);
	assert_int_equal(buf[sizeof(r32)], 0xaa);	/* nothing past the response */
}

static void
test_indirect_segments(void **state)
{
	(void)state;
	struct blkif_request_segment page[BLKIF_SEGS_PER_INDIRECT_PAGE * 2];
	struct blkif_seg s;
	for (unsigned i = 0; i < BLKIF_SEGS_PER_INDIRECT_PAGE * 2; i++)
		page[i] = (struct blkif_request_segment){ 1000 + i, (uint8_t)(i % 8), 7 };
	blkif_indirect_seg((const uint8_t *)page, 511, &s);
	assert_true(s.gref == 1511 && s.first_sect == 7 && s.last_sect == 7);
	blkif_indirect_seg((const uint8_t *)page, 512, &s);	/* the second page */
	assert_true(s.gref == 1512 && s.first_sect == 0);
}

static void
test_segment_checks(void **state)
{
	(void)state;
	struct blkif_seg seg[3] = { { 1, 0, 7 }, { 2, 0, 7 }, { 3, 2, 3 } };
	uint64_t bytes = 0;

	assert_null(blkif_check_segments(seg, 3, 0, 100, &bytes));
	assert_int_equal(bytes, (8 + 8 + 2) * 512);
	/* exactly to the end, and one past it */
	assert_null(blkif_check_segments(seg, 3, 82, 100, &bytes));
	assert_non_null(blkif_check_segments(seg, 3, 83, 100, &bytes));
	/* a sector that overflows when the length is added */
	assert_non_null(blkif_check_segments(seg, 3, UINT64_MAX - 5, 100, &bytes));
	assert_non_null(blkif_check_segments(seg, 1, UINT64_MAX, UINT64_MAX, &bytes));
	/* first after last; last past the page */
	seg[1].first_sect = 5;
	seg[1].last_sect = 4;
	assert_non_null(blkif_check_segments(seg, 3, 0, 100, &bytes));
	seg[1].first_sect = 0;
	seg[1].last_sect = 8;
	assert_non_null(blkif_check_segments(seg, 3, 0, 100, &bytes));
	seg[1].last_sect = 255;
	assert_non_null(blkif_check_segments(seg, 3, 0, 100, &bytes));
}

static void
test_protocol_names(void **state)
{
	(void)state;
	assert_int_equal(blkif_protocol(XEN_IO_PROTO_ABI_X86_32), BLKIF_PROTO_X86_32);
	assert_int_equal(blkif_protocol(XEN_IO_PROTO_ABI_X86_64), BLKIF_PROTO_X86_64);
	assert_int_equal(blkif_protocol(XEN_IO_PROTO_ABI_NATIVE), BLKIF_PROTO_X86_64);
	assert_int_equal(blkif_protocol(NULL), BLKIF_PROTO_X86_64);
	assert_int_equal(blkif_protocol(""), BLKIF_PROTO_X86_64);
	assert_int_equal(blkif_protocol(XEN_IO_PROTO_ABI_ARM), -1);
	assert_int_equal(blkif_protocol("x86_32-abiX"), -1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_constants_match_xen),
		cmocka_unit_test(test_entry_sizes_and_ring_entries),
		cmocka_unit_test(test_native_read_write),
		cmocka_unit_test(test_native_discard_and_indirect),
		cmocka_unit_test(test_x86_32_layouts),
		cmocka_unit_test(test_responses),
		cmocka_unit_test(test_indirect_segments),
		cmocka_unit_test(test_segment_checks),
		cmocka_unit_test(test_protocol_names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
