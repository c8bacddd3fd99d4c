/*
 * libFuzzer target: the VHD metadata loader and checker on hostile files.
 *
 * Input: the whole image file. vhd_meta_load() reads it through a memory
 * reader (no file system: parent locators are decoded but not looked up).
 * When it accepts an image, the guarantees the driver relies on are
 * asserted: every allocated block lies inside the file, before the footer,
 * overlapping nothing; the batmap never marks an unallocated block full.
 * Then the deep check (bitmaps against the batmap) runs over the same bytes.
 */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../memfile.h"
#include "vhd_format.h"

static void
check_invariants(const struct vhd_meta *m, size_t size)
{
	assert(m->footer_offset + VHD_FOOTER_SIZE == size);
	assert(m->size <= VHD_MAX_SIZE && m->size % VHD_SECTOR == 0);
	if (m->footer.type == VHD_TYPE_FIXED) {
		assert(m->footer.curr_size <= m->footer_offset);
		return;
	}
	const struct vhd_header *h = &m->header;
	assert(h->block_size >= VHD_BLOCK_MIN && h->block_size <= VHD_BLOCK_MAX);
	assert((h->block_size & (h->block_size - 1)) == 0);
	assert(m->nr_blocks <= h->max_bat);
	assert((uint64_t)m->nr_blocks * h->block_size >= m->footer.curr_size);
	uint64_t span = m->bitmap_bytes + (uint64_t)h->block_size;
	for (uint32_t i = 0; i < h->max_bat; i++) {
		if (m->bat[i] == VHD_BAT_UNUSED) {
			assert(!vhd_batmap_test(m, i));
			continue;
		}
		assert(i < m->nr_blocks);
		uint64_t start = vhd_block_offset(m, i);
		assert(start + span <= m->footer_offset);
		assert(start >= h->table_offset + (uint64_t)h->max_bat * 4 ||
		       start + span <= h->table_offset);
	}
	if (m->footer.type == VHD_TYPE_DIFF)
		assert(m->parent_path != NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct memfile mem = { (uint8_t *)(uintptr_t)data, size };
	struct vhd_meta m;
	struct td_error err;
	char out[2048];

	if (vhd_meta_load(&m, mem_read, &mem, size, "/nonexistent", NULL, &err) < 0) {
		assert(err.code > 0 && err.msg[0]);
		return 0;
	}
	check_invariants(&m, size);
	vhd_meta_check_blocks(&m, mem_read, &mem, out, sizeof(out));
	vhd_meta_free(&m);
	return 0;
}
