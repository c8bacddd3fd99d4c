/* The CBT log's bytes: see cbt_format.h and docs/CBT-LOG.md. */
#include "cbt_format.h"

#include <errno.h>
#include <string.h>

#include "byteorder.h"

void
cbt_header_encode(const struct cbt_header *h, uint8_t out[CBT_HEADER_SIZE])
{
	memset(out, 0, CBT_HEADER_SIZE);
	memcpy(out, h->parent, 16);
	memcpy(out + 16, h->child, 16);
	put_le32(out + 32, (uint32_t)h->consistent);
	/* 36..39: the struct's padding before the 8-byte aligned size */
	put_le64(out + 40, h->size);
}

int
cbt_header_decode(const uint8_t in[CBT_HEADER_SIZE], uint64_t file_len,
		  struct cbt_header *h, const char **why)
{
	memcpy(h->parent, in, 16);
	memcpy(h->child, in + 16, 16);
	h->consistent = (int32_t)get_le32(in + 32);
	h->size = get_le64(in + 40);
	if (!h->size || h->size > CBT_MAX_DISK) {
		*why = h->size ? "disk size in the header is too large" : "disk size in the header is 0";
		return -EINVAL;
	}
	if (h->consistent != 0 && h->consistent != 1) {
		*why = "consistent flag is neither 0 nor 1";
		return -EINVAL;
	}
	if (file_len < CBT_HEADER_SIZE + cbt_bitmap_bytes(h->size)) {
		*why = "log is shorter than its header and bitmap (truncated?)";
		return -EINVAL;
	}
	return 0;
}

uint64_t
cbt_count_set(const uint8_t *bm, uint64_t nbits)
{
	uint64_t n = 0, whole = nbits / 8;

	for (uint64_t i = 0; i < whole; i++)
		n += (uint64_t)__builtin_popcount(bm[i]);
	for (uint64_t b = whole * 8; b < nbits; b++)
		n += cbt_bit(bm, b);
	return n;
}

uint64_t
cbt_run_length(const uint8_t *bm, uint64_t first, uint64_t limit)
{
	int v = cbt_bit(bm, first);
	uint64_t n = 1;

	while (n < limit) {
		uint64_t b = first + n;
		/* whole bytes at once where they all match */
		if (b % 8 == 0 && limit - n >= 8 && bm[b / 8] == (v ? 0xff : 0)) {
			n += 8;
			continue;
		}
		if (cbt_bit(bm, b) != v)
			break;
		n++;
	}
	return n;
}
