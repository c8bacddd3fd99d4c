/* The qcow2 format library: entries of every refcount width, L2 entry
 * decoding, creating into memory and loading back, refusals by feature,
 * damage detection, counting references, refcount layouts, inflate. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <cmocka.h>

#include "qcow2_format.h"
#include "../memfile.h"

static struct memfile
make(uint64_t size, unsigned cbits, const char *backing)
{
	struct qcow2_create c = { .size = size, .cluster_bits = cbits, .backing = backing,
				  .backing_fmt = "raw" };
	struct memfile f = { NULL, 0 };
	struct td_error err;
	assert_int_equal(qcow2_create_write(&c, mem_write, &f, &err), 0);
	return f;
}

static int
load(struct memfile *f, struct qcow2_meta *m, int rdonly, struct td_error *err)
{
	return qcow2_meta_load(m, mem_read, f, f->size, rdonly, err);
}

/* Loads f (expecting failure) and checks the message names the problem. */
static void
refused(struct memfile *f, int rdonly, const char *needle)
{
	struct qcow2_meta m;
	struct td_error err;
	assert_true(load(f, &m, rdonly, &err) < 0);
	if (!strstr(err.msg, needle))
		fail_msg("'%s' does not say '%s'", err.msg, needle);
}

static void
test_refcount_widths(void **state)
{
	uint8_t block[512];
	(void)state;
	for (unsigned bits = 1; bits <= 64; bits *= 2) {
		uint64_t max = bits == 64 ? UINT64_MAX : (1ULL << bits) - 1;
		uint64_t n = 512 * 8 / bits;
		memset(block, 0, sizeof(block));
		for (uint64_t i = 0; i < n; i++)
			qcow2_rc_set(block, i, bits, (i * 7) & max);
		for (uint64_t i = 0; i < n; i++)
			assert_true(qcow2_rc_get(block, i, bits) == ((i * 7) & max));
		qcow2_rc_set(block, 3, bits, max);
		assert_true(qcow2_rc_get(block, 3, bits) == max);
		assert_true(qcow2_rc_get(block, 2, bits) == (14 & max));	/* neighbours kept */
		assert_true(qcow2_rc_get(block, 4, bits) == (28 & max));
	}
	memset(block, 0, sizeof(block));
	qcow2_rc_set(block, 0, 1, 1);		/* bit 0 is the least significant */
	qcow2_rc_set(block, 9, 1, 1);
	assert_int_equal(block[0], 0x01);
	assert_int_equal(block[1], 0x02);
	qcow2_rc_set(block, 1, 16, 0x1234);	/* wider ones are big-endian */
	assert_int_equal(block[2], 0x12);
	assert_int_equal(block[3], 0x34);
	uint64_t off, len;
	qcow2_rc_bytes(3, 5, 4, &off, &len);
	assert_int_equal(off, 1);
	assert_int_equal(len, 2);
	qcow2_rc_bytes(8, 8, 16, &off, &len);
	assert_int_equal(off, 16);
	assert_int_equal(len, 2);
}

static void
test_l2_entries(void **state)
{
	struct memfile f = make(64ULL << 20, 16, NULL);
	struct qcow2_meta m;
	struct qcow2_cluster c;
	struct td_error err;
	char why[128];
	uint64_t limit = 1ULL << 30;
	(void)state;

	assert_int_equal(load(&f, &m, 0, &err), 0);
	assert_int_equal(qcow2_l2_decode(&m, 0, limit, &c, why, sizeof(why)), 0);
	assert_int_equal(c.kind, QCOW2_UNALLOCATED);
	assert_int_equal(qcow2_l2_decode(&m, QCOW2_COPIED | 0x50000, limit, &c, why, sizeof(why)), 0);
	assert_int_equal(c.kind, QCOW2_DATA);
	assert_int_equal(c.host, 0x50000);
	assert_int_equal(qcow2_l2_decode(&m, QCOW2_ZERO, limit, &c, why, sizeof(why)), 0);
	assert_int_equal(c.kind, QCOW2_ZERO_CLUSTER);
	assert_int_equal(c.host, 0);
	assert_int_equal(qcow2_l2_decode(&m, QCOW2_ZERO | 0x60000 | QCOW2_COPIED, limit, &c, why,
					 sizeof(why)), 0);
	assert_int_equal(c.host, 0x60000);
	/* compressed, 64 KiB clusters: offset in bits 0..53, extra sectors above */
	uint64_t e = QCOW2_COMPRESSED | (3ULL << 54) | 0x70123;
	assert_int_equal(qcow2_l2_decode(&m, e, limit, &c, why, sizeof(why)), 0);
	assert_int_equal(c.kind, QCOW2_COMPRESSED_DATA);
	assert_int_equal(c.host, 0x70123);
	assert_int_equal(c.rc_start, 0x70000);
	assert_int_equal(c.rc_len, 4 * 512);
	assert_int_equal(c.csize, 4 * 512 - 0x123);
	assert_int_equal(qcow2_l2_decode(&m, e, 0x70200, &c, why, sizeof(why)), 0);
	assert_int_equal(c.csize, 0x70200 - 0x70123);	/* clipped at the end */
	struct { uint64_t e; const char *needle; } bad[] = {
		{ 0x50200 | QCOW2_COPIED, "not aligned" },
		{ 0x50000 | 2, "reserved bits" },
		{ QCOW2_COPIED, "without an offset" },
		{ (1ULL << 40) | QCOW2_COPIED, "past the end" },
		{ 0x10000 | QCOW2_COPIED, "L1 table" },	/* qcow2_create_write's layout */
		{ 0x30000 | QCOW2_COPIED, "refcount table" },
		{ 0x0 | QCOW2_COPIED | QCOW2_ZERO, NULL },
		{ e | QCOW2_COPIED, "marked copied" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = qcow2_l2_decode(&m, bad[i].e, limit, &c, why, sizeof(why));
		if (!bad[i].needle) {
			assert_int_equal(rc, 0);
			continue;
		}
		assert_int_equal(rc, -EUCLEAN);
		if (!strstr(why, bad[i].needle))
			fail_msg("entry %zu: '%s'", i, why);
	}
	m.h.version = 2;
	assert_int_equal(qcow2_l2_decode(&m, QCOW2_ZERO, limit, &c, why, sizeof(why)), -EUCLEAN);
	qcow2_meta_free(&m);
	free(f.data);
}

static void
test_create_and_load(void **state)
{
	static const unsigned cbits[] = { 9, 12, 16, 21 };
	(void)state;
	for (size_t k = 0; k < sizeof(cbits) / sizeof(cbits[0]); k++) {
		struct memfile f = make(100ULL << 20, cbits[k], "../base.raw");
		struct qcow2_meta m;
		struct td_error err;
		assert_int_equal(load(&f, &m, 0, &err), 0);
		assert_int_equal(m.h.version, 3);
		assert_int_equal(m.h.size, 100ULL << 20);
		assert_int_equal(m.cluster_size, 1u << cbits[k]);
		assert_int_equal(m.refcount_bits, 16);
		assert_string_equal(m.backing, "../base.raw");
		assert_string_equal(m.backing_fmt, "raw");
		assert_true(cbits[k] == 9 || m.nr_features >= 5);	/* no room at 512 B */
		assert_false(qcow2_meta_dirty(&m));
		/* every cluster of the file is counted once, by itself or the tables */
		uint64_t n = f.size >> cbits[k];
		uint32_t *counts = calloc(n, sizeof(*counts));
		assert_int_equal(qcow2_count_refs(&m, mem_read, &f, counts, n, &err), 0);
		uint8_t *block = malloc(m.cluster_size);
		for (uint64_t c = 0; c < n; c++) {
			uint64_t host = m.reftable[c >> m.rb_bits];
			assert_true(host != 0);
			assert_int_equal(mem_read(&f, block, m.cluster_size, host), 0);
			uint64_t rc = qcow2_rc_get(block, c & (m.rb_entries - 1), 16);
			assert_int_equal(rc, 1);
			/* the refcount structures are not references: not counted */
			int meta = host >> cbits[k] == c ||
				   (c >= m.h.refcount_table_offset >> cbits[k] &&
				    c < (m.h.refcount_table_offset >> cbits[k]) + m.h.refcount_table_clusters);
			assert_int_equal(counts[c], !meta);
		}
		free(block);
		free(counts);
		qcow2_meta_free(&m);
		free(f.data);
	}
}

static void
test_features_refused_by_name(void **state)
{
	struct memfile f = make(8 << 20, 16, NULL);
	uint8_t saved[QCOW2_V3_HEADER];
	(void)state;

	memcpy(saved, f.data, sizeof(saved));
	struct { unsigned off; uint64_t v; int rdonly; const char *needle; } cases[] = {
		{ 32, 1, 1, "encryption (AES)" },
		{ 32, 2, 1, "encryption (LUKS)" },
		{ 32, 7, 1, "unknown encryption method 7" },
		{ 72, QCOW2_INCOMPAT_DATA_FILE, 1, "external data files" },
		{ 72, QCOW2_INCOMPAT_EXTL2, 1, "extended L2 entries" },
		{ 72, QCOW2_INCOMPAT_COMPRESSION, 1, "compression type 0 is invalid" },
		{ 72, 1ULL << 33, 1, "unknown incompatible feature (bit 33)" },
		{ 72, QCOW2_INCOMPAT_CORRUPT, 0, "marked corrupt" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		memcpy(f.data, saved, sizeof(saved));
		if (cases[i].off == 32)
			qcow2_put32(f.data + 32, (uint32_t)cases[i].v);
		else
			qcow2_put64(f.data + cases[i].off, cases[i].v);
		refused(&f, cases[i].rdonly, cases[i].needle);
	}
	/* the corrupt bit: read-only is fine */
	struct qcow2_meta m;
	struct td_error err;
	assert_int_equal(load(&f, &m, 1, &err), 0);
	qcow2_meta_free(&m);
	/* an unknown bit named by the feature table: rename the dirty bit's entry */
	memcpy(f.data, saved, sizeof(saved));
	for (size_t off = QCOW2_V3_HEADER; off + 48 < 65536; off++) {
		if (!memcmp(f.data + off, "dirty bit", 9)) {
			f.data[off - 1] = 12;
			break;
		}
	}
	qcow2_put64(f.data + 72, 1ULL << 12);
	refused(&f, 1, "unknown incompatible feature 'dirty bit' (bit 12)");
	free(f.data);
}

static void
test_damage_refused(void **state)
{
	struct memfile f = make(8 << 20, 16, NULL);
	uint8_t *saved = malloc(f.size);
	(void)state;

	memcpy(saved, f.data, f.size);
	struct { unsigned off, width; uint64_t v; const char *needle; } cases[] = {
		{ 0, 4, 0x51464900, "bad magic" },
		{ 4, 4, 1, "version 1" },
		{ 20, 4, 8, "not between 512 B and 2 MiB" },
		{ 20, 4, 22, "not between 512 B and 2 MiB" },
		{ 24, 8, 1ULL << 62, "too large" },
		{ 24, 8, 1ULL << 40, "too small for the virtual size" },
		{ 36, 4, 1u << 23, "too large" },
		{ 40, 8, 0x10200, "L1 table offset" },
		{ 40, 8, 1ULL << 40, "past the end" },
		{ 48, 8, 0, "refcount table offset" },
		{ 56, 4, 0, "refcount table of 0 clusters" },
		{ 56, 4, 1u << 20, "refcount table of" },
		{ 60, 4, 70000, "too many" },
		{ 96, 4, 7, "refcount order 7" },
		{ 100, 4, 96, "header length 96" },
		{ 100, 4, 108, "header length 108" },
		{ 8, 8, 65000, "backing file name" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		memcpy(f.data, saved, f.size);
		if (cases[i].width == 4)
			qcow2_put32(f.data + cases[i].off, (uint32_t)cases[i].v);
		else
			qcow2_put64(f.data + cases[i].off, cases[i].v);
		if (cases[i].off == 8)
			qcow2_put32(f.data + 16, 1000);	/* a name running off the cluster */
		refused(&f, 1, cases[i].needle);
	}
	/* table entries: the L1 table at cluster 1, the refcount table after it */
	memcpy(f.data, saved, f.size);
	qcow2_put64(f.data + 65536, 0x30200);
	refused(&f, 1, "L1 entry 0 is not cluster aligned");
	qcow2_put64(f.data + 65536, 0x100000000ULL);
	refused(&f, 1, "L1 entry 0 points past the end of the file");
	qcow2_put64(f.data + 65536, 65536);
	refused(&f, 1, "L1 entry 0 points into the L1 table");
	qcow2_put64(f.data + 65536, 1ULL << 60);
	refused(&f, 1, "L1 entry 0 has reserved bits set");
	memcpy(f.data, saved, f.size);
	struct qcow2_meta m;
	struct td_error err;
	assert_int_equal(load(&f, &m, 1, &err), 0);
	uint64_t rt = m.h.refcount_table_offset;
	qcow2_meta_free(&m);
	qcow2_put64(f.data + rt, 0x12345);
	refused(&f, 1, "refcount table entry 0 is not cluster aligned");
	free(saved);
	free(f.data);
}

static void
test_refcount_layout_counts_itself(void **state)
{
	(void)state;
	/* 512-byte clusters, 16-bit: a block counts 256 clusters, a table cluster 64 blocks */
	for (uint64_t n = 1; n < 20000; n = n * 3 + 7) {
		struct memfile f = make(1 << 20, 9, NULL);
		struct qcow2_meta m;
		struct td_error err;
		assert_int_equal(load(&f, &m, 0, &err), 0);
		uint32_t *counts = calloc(n, sizeof(*counts));
		for (uint64_t c = 0; c < n; c++)
			counts[c] = (uint32_t)(c % 3);
		uint64_t table;
		uint32_t clusters;
		free(f.data);			/* only its geometry counts: write into a new file */
		f.data = NULL;
		f.size = 0;
		assert_int_equal(qcow2_refcounts_write(&m, counts, n, n, mem_write, &f, &table,
						       &clusters, &err), 0);
		assert_int_equal(f.size % 512, 0);
		uint64_t end = f.size / 512;
		assert_true(table / 512 + clusters == end);	/* the table is last */
		uint8_t block[512];
		for (uint64_t c = 0; c < end; c++) {
			uint8_t e[8];
			assert_int_equal(mem_read(&f, e, 8, table + (c >> 8) * 8), 0);
			assert_int_equal(mem_read(&f, block, 512, qcow2_be64(e)), 0);
			uint64_t want = c < n ? counts[c] : 1;
			assert_int_equal(qcow2_rc_get(block, c & 255, 16), want);
		}
		free(counts);
		qcow2_meta_free(&m);
		free(f.data);
	}
}

static void
test_refcount_overflow_refused(void **state)
{
	struct memfile f = make(1 << 20, 12, NULL);
	struct qcow2_meta m;
	struct td_error err;
	uint32_t counts[4] = { 1, 1, 70000, 1 };
	uint64_t table;
	uint32_t clusters;
	(void)state;

	assert_int_equal(load(&f, &m, 0, &err), 0);
	assert_int_equal(qcow2_refcounts_write(&m, counts, 4, 8, mem_write, &f, &table, &clusters,
					       &err), -EUCLEAN);
	assert_non_null(strstr(err.msg, "referenced 70000 times"));
	qcow2_meta_free(&m);
	free(f.data);
}

static void
test_inflate(void **state)
{
	uint8_t in[4096], comp[8192], out[4096];
	z_stream s;
	(void)state;

	for (int i = 0; i < 4096; i++)
		in[i] = (uint8_t)(i / 100);
	memset(&s, 0, sizeof(s));
	/* as qemu writes them: raw deflate, a 4 KiB window */
	assert_int_equal(deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
				      Z_DEFAULT_STRATEGY), Z_OK);
	s.next_in = in;
	s.avail_in = sizeof(in);
	s.next_out = comp;
	s.avail_out = sizeof(comp);
	assert_int_equal(deflate(&s, Z_FINISH), Z_STREAM_END);
	size_t len = sizeof(comp) - s.avail_out;
	deflateEnd(&s);
	memset(comp + len, 0xee, 600);	/* the rest of the last sector: not data */
	assert_int_equal(qcow2_inflate(comp, len + 600, out, sizeof(out)), 0);
	assert_memory_equal(in, out, sizeof(in));
	assert_int_equal(qcow2_inflate(comp, len / 2, out, sizeof(out)), -EIO);	/* truncated */
	memset(comp, 0xff, 64);
	assert_int_equal(qcow2_inflate(comp, len, out, sizeof(out)), -EIO);	/* garbage */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_refcount_widths),
		cmocka_unit_test(test_l2_entries),
		cmocka_unit_test(test_create_and_load),
		cmocka_unit_test(test_features_refused_by_name),
		cmocka_unit_test(test_damage_refused),
		cmocka_unit_test(test_refcount_layout_counts_itself),
		cmocka_unit_test(test_refcount_overflow_refused),
		cmocka_unit_test(test_inflate),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
