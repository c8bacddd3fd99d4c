/*
 * libFuzzer target: the qcow2 metadata loader and table walkers on hostile
 * files.
 *
 * Input: the whole image file, read through a memory reader. When
 * qcow2_meta_load() accepts it (read-only, then for writing), the
 * guarantees the driver relies on are asserted: the geometry is in range,
 * every L1 and refcount table entry points at a whole cluster inside the
 * file and outside the header and the fixed tables. Every L2 table is then
 * checked as the driver checks it on load, and what an accepted entry
 * points at must lie inside the file; compressed clusters are inflated.
 * For writable images, references are counted (as the dirty-bit repair
 * does) and fresh refcount structures written into memory must load back
 * and count exactly those references.
 */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2_format.h"
#include "../memfile.h"

#define MAX_INFLATES 8

static void
check_pointer(const struct qcow2_meta *m, uint64_t off)
{
	assert(off % m->cluster_size == 0);
	assert(off + m->cluster_size <= m->file_size);
	assert(!qcow2_overlaps_meta(m, off, m->cluster_size));
}

static void
check_meta(const struct qcow2_meta *m)
{
	assert(m->cluster_bits >= QCOW2_MIN_CLUSTER_BITS && m->cluster_bits <= QCOW2_MAX_CLUSTER_BITS);
	assert(m->cluster_size == 1u << m->cluster_bits);
	assert((uint64_t)m->h.l1_size * 8 <= QCOW2_MAX_L1_BYTES);
	assert(((uint64_t)m->h.l1_size << (m->cluster_bits + m->l2_bits)) >= m->h.size);
	assert((uint64_t)m->reftable_entries * 8 <= QCOW2_MAX_REFTABLE_BYTES);
	assert(m->refcount_bits >= 1 && m->refcount_bits <= 64);
	for (uint32_t i = 0; i < m->h.l1_size; i++)
		if (m->l1[i])
			check_pointer(m, m->l1[i] & QCOW2_OFFSET_MASK);
	for (uint32_t i = 0; i < m->reftable_entries; i++)
		if (m->reftable[i])
			check_pointer(m, m->reftable[i]);
	if (m->backing)
		assert(strlen(m->backing) == m->h.backing_file_size);
}

/* What accepted entries point at lies inside the file; some compressed ones inflate. */
static void
walk_l2(const struct qcow2_meta *m, struct memfile *mem, const uint8_t *t, int *inflates)
{
	char why[160];

	if (qcow2_l2_check(m, t, m->file_size, why, sizeof(why)) < 0) {
		assert(why[0]);
		return;
	}
	for (uint32_t i = 0; i < m->l2_entries; i++) {
		struct qcow2_cluster c;
		assert(qcow2_l2_decode(m, qcow2_be64(t + 8 * (size_t)i), m->file_size, &c, why,
				       sizeof(why)) == 0);
		if (c.kind == QCOW2_DATA || (c.kind == QCOW2_ZERO_CLUSTER && c.host))
			check_pointer(m, c.host);
		if (c.kind != QCOW2_COMPRESSED_DATA)
			continue;
		assert(c.host < m->file_size && c.csize <= m->file_size - c.host);
		if ((*inflates)++ >= MAX_INFLATES)
			continue;
		uint8_t *out = malloc(m->cluster_size);
		assert(out);
		qcow2_inflate(mem->data + c.host, (size_t)c.csize, out, m->cluster_size);
		free(out);
	}
}

/* Counts, rebuilds into a copy, and checks the copy counts the same. */
static void
rebuild(const struct qcow2_meta *m, struct memfile *mem)
{
	uint64_t n = (m->file_size + m->cluster_size - 1) / m->cluster_size, table;
	uint32_t clusters, *counts = calloc(n ? n : 1, sizeof(*counts));
	struct memfile copy = { malloc(mem->size ? mem->size : 1), mem->size };
	struct td_error err;

	assert(counts && copy.data);
	memcpy(copy.data, mem->data, mem->size);
	if (qcow2_count_refs(m, mem_read, mem, counts, n, &err) == 0 &&
	    qcow2_refcounts_write(m, counts, n, n, mem_write, &copy, &table, &clusters, &err) == 0) {
		uint8_t *block = malloc(m->cluster_size);
		assert(block);
		for (uint64_t c = 0; c < n; c++) {
			uint64_t ri = c >> m->rb_bits, e;
			assert(mem_read(&copy, &e, 8, table + ri * 8) == 0);
			e = qcow2_be64((uint8_t *)&e);
			assert(e && mem_read(&copy, block, m->cluster_size, e) == 0);
			assert(qcow2_rc_get(block, c & (m->rb_entries - 1), m->refcount_bits) == counts[c]);
		}
		free(block);
	} else {
		assert(err.code > 0 && err.msg[0]);
	}
	free(copy.data);
	free(counts);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct memfile mem = { (uint8_t *)(uintptr_t)data, size };
	struct qcow2_meta m;
	struct td_error err;
	int inflates = 0;

	for (int rdonly = 1; rdonly >= 0; rdonly--) {
		if (qcow2_meta_load(&m, mem_read, &mem, size, rdonly, &err) < 0) {
			assert(err.code > 0 && err.msg[0]);
			continue;
		}
		check_meta(&m);
		uint8_t *t = malloc(m.cluster_size);
		assert(t);
		for (uint32_t i = 0; rdonly && i < m.h.l1_size; i++)
			if (m.l1[i] && mem_read(&mem, t, m.cluster_size, m.l1[i] & QCOW2_OFFSET_MASK) == 0)
				walk_l2(&m, &mem, t, &inflates);
		free(t);
		if (!rdonly && m.cluster_bits <= 16)
			rebuild(&m, &mem);
		qcow2_meta_free(&m);
	}
	return 0;
}
