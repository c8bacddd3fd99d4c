/*
 * A file held in memory, read through the callback the format libraries
 * take (vhd_read_fn, vmdk_read_fn): for unit tests and fuzz targets.
 */
#ifndef TD_TEST_MEM_FILE_H
#define TD_TEST_MEM_FILE_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct mem_file {
	uint8_t *data;
	size_t size;
};

/* 0, or -EIO for bytes past the end (as a short read of a real file). */
static inline int
mem_file_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	const struct mem_file *m = ctx;
	if (off > m->size || len > m->size - off)
		return -EIO;
	memcpy(buf, m->data + off, len);
	return 0;
}

#endif
