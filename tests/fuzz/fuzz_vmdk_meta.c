/*
 * libFuzzer target: the VMDK metadata parsers on hostile files.
 *
 * Input: a whole file. A sparse extent (KDMV magic) goes through
 * vmdk_sparse_load(); when it loads, the guarantees the driver relies on
 * are asserted (the directory covers the capacity, every grain table lies
 * inside the file), its embedded descriptor is parsed, and its grain
 * tables are walked as the driver would: every entry decoded, what a
 * data grain's read would touch asserted inside the file, and the first
 * compressed grains inflated. Any other input is parsed as a text
 * descriptor, and what it accepts is checked against the limits and the
 * extent path rules.
 */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../memfile.h"
#include "vmdk_format.h"

#define MAX_TABLES	64	/* grain tables walked per input */
#define MAX_INFLATES	8	/* compressed grains inflated per input */

static void
check_desc(const struct vmdk_desc *d)
{
	uint64_t sum = 0;
	char why[256];

	assert(d->create_type[0]);
	assert(d->nr_ext <= VMDK_MAX_EXTENTS);
	for (unsigned i = 0; i < d->nr_ext; i++) {
		const struct vmdk_desc_extent *e = &d->ext[i];
		assert(e->sectors > 0);
		sum += e->sectors;
		assert((e->file == NULL) == (e->type == VMDK_EXT_ZERO));
		if (e->file)
			assert(vmdk_name_check(e->file, why, sizeof(why)) == 0);
		assert(e->offset <= (uint64_t)INT64_MAX / VMDK_SECTOR - e->sectors);
	}
	assert(sum == d->sectors && sum <= VMDK_MAX_SIZE / VMDK_SECTOR);
}

static void
parse_desc(const char *text, size_t len)
{
	struct vmdk_desc d;
	struct td_error err;

	if (vmdk_desc_parse(text, len, &d, &err) < 0) {
		assert(err.code > 0 && err.msg[0]);
		return;
	}
	check_desc(&d);
	vmdk_desc_free(&d);
}

/* Decodes one grain table entry as a read would, inflating if allowed. */
static void
walk_grain(const struct vmdk_sparse *s, struct memfile *mem, uint64_t grain, uint32_t gte,
	   uint8_t *out, int *inflates)
{
	uint64_t off = 0;
	char why[256];
	int kind = vmdk_grain_decode(s, grain, gte, &off, why, sizeof(why));

	if (kind < 0) {
		assert(kind == -EUCLEAN && why[0]);
		return;
	}
	if (kind == VMDK_GRAIN_DATA)
		assert(off + vmdk_grain_need(s, grain) <= mem->size);
	if (kind != VMDK_GRAIN_COMPRESSED || (*inflates)++ >= MAX_INFLATES)
		return;
	uint32_t len = vmdk_grain_zread_len(s, off);
	assert(len > 0 && len <= s->zread_max && off + len <= mem->size);
	vmdk_grain_inflate(s, grain, mem->data + off, len, out, why, sizeof(why));
}

static void
walk_tables(const struct vmdk_sparse *s, struct memfile *mem)
{
	uint32_t *gt = malloc(s->gt_bytes);
	uint8_t *out = malloc(s->grain_bytes);
	int inflates = 0;

	assert(gt && out);
	for (uint32_t t = 0, walked = 0; t < s->nr_gdes && walked < MAX_TABLES; t++) {
		if (!s->gd[t])
			continue;
		walked++;
		assert(mem_read(mem, gt, s->gt_bytes, (uint64_t)s->gd[t] * VMDK_SECTOR) == 0);
		vmdk_gt_decode(gt, s->gtes);
		for (uint32_t i = 0; i < s->gtes; i++)
			walk_grain(s, mem, (uint64_t)t * s->gtes + i, gt[i], out, &inflates);
	}
	free(gt);
	free(out);
}

static void
check_sparse(const struct vmdk_sparse *s, size_t size)
{
	assert(s->grain_bytes && s->grain_bytes <= VMDK_MAX_GRAIN &&
	       (s->grain_bytes & (s->grain_bytes - 1)) == 0);
	assert(s->gtes >= 1 && s->gtes <= VMDK_MAX_GTES && s->gt_bytes == s->gtes * 4);
	assert(s->capacity && s->capacity <= VMDK_MAX_SIZE / VMDK_SECTOR);
	assert(s->nr_gdes <= VMDK_MAX_GD_ENTRIES);
	assert((uint64_t)s->nr_gdes * s->gtes * (s->grain_bytes / VMDK_SECTOR) >= s->capacity);
	for (uint32_t t = 0; t < s->nr_gdes; t++)
		assert(!s->gd[t] || (uint64_t)s->gd[t] * VMDK_SECTOR + s->gt_bytes <= size);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct memfile mem = { (uint8_t *)(uintptr_t)data, size };
	struct vmdk_sparse s;
	struct td_error err;
	char *text;

	if (vmdk_probe(data, size) != VMDK_FILE_SPARSE) {
		parse_desc((const char *)data, size);
		return 0;
	}
	if (vmdk_sparse_load(&s, mem_read, &mem, size, &err) < 0) {
		assert(err.code > 0 && err.msg[0]);
		return 0;
	}
	check_sparse(&s, size);
	if (vmdk_sparse_descriptor(&s, mem_read, &mem, &text, &err) == 0 && text) {
		parse_desc(text, strlen(text));
		free(text);
	}
	walk_tables(&s, &mem);
	vmdk_sparse_free(&s);
	return 0;
}
