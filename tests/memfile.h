/* A file in memory for the format libraries' read and write callbacks
 * (unit tests and fuzz targets): reads past its end fail, writes grow it. */
#ifndef TD_TEST_MEMFILE_H
#define TD_TEST_MEMFILE_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct memfile {
	uint8_t *data;
	size_t size;
};

static inline int
mem_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	const struct memfile *m = ctx;
	if (off > m->size || len > m->size - off)
		return -EIO;
	memcpy(buf, m->data + off, len);
	return 0;
}

static inline int
mem_write(void *ctx, const void *buf, size_t len, uint64_t off)
{
	struct memfile *m = ctx;
	if (off + len > m->size) {
		uint8_t *d = realloc(m->data, off + len);
		if (!d)
			return -ENOMEM;
		memset(d + m->size, 0, off + len - m->size);
		m->data = d;
		m->size = off + len;
	}
	memcpy(m->data + off, buf, len);
	return 0;
}

#endif
