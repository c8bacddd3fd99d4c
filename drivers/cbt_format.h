/*
 * The changed-block-tracking (CBT) log, in tapdisk's format
 * (docs/CBT-LOG.md): a 48-byte header (parent log UUID, child log UUID, a
 * consistent flag, the disk's size in bytes: tapdisk's struct as x86_64
 * lays it out, little-endian) and then a bitmap with one bit per 64 KiB
 * block of the disk (block n: byte n / 8, bit n % 8, least significant
 * first). Bytes only, no I/O: the file's reading and writing is
 * cbt_file.c's, the server's tracking server/cbt.c's.
 */
#ifndef TD_CBT_FORMAT_H
#define TD_CBT_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#define CBT_BLOCK_SIZE	(64u * 1024)
#define CBT_HEADER_SIZE	48u
/* A disk larger than this (4 PiB) is refused; the bitmap of one this large is 8 GiB. */
#define CBT_MAX_DISK	(1ull << 52)

struct cbt_header {
	uint8_t parent[16];
	uint8_t child[16];
	int32_t consistent;	/* 1 after a clean close; tapdisk's tools print it as %d */
	uint64_t size;		/* the disk's size in bytes */
};

/* Blocks of a disk of size bytes, and the bitmap's bytes. */
static inline uint64_t
cbt_blocks(uint64_t size)
{
	return (size + CBT_BLOCK_SIZE - 1) / CBT_BLOCK_SIZE;
}

static inline uint64_t
cbt_bitmap_bytes(uint64_t size)
{
	return (cbt_blocks(size) + 7) / 8;
}

static inline int
cbt_bit(const uint8_t *bm, uint64_t block)
{
	return (bm[block / 8] >> (block % 8)) & 1;
}

static inline void
cbt_bit_set(uint8_t *bm, uint64_t block)
{
	bm[block / 8] |= (uint8_t)(1u << (block % 8));
}

void cbt_header_encode(const struct cbt_header *h, uint8_t out[CBT_HEADER_SIZE]);
/*
 * Decodes and checks a header against the file's length: -EINVAL (with a
 * reason in why) when the size is 0 or beyond CBT_MAX_DISK, the flag is
 * neither 0 nor 1, or the file is shorter than the header and its bitmap.
 * A longer file is accepted (tapdisk's tools never truncate a log they
 * shrink nothing in, and some leave slack).
 */
int cbt_header_decode(const uint8_t in[CBT_HEADER_SIZE], uint64_t file_len,
		      struct cbt_header *h, const char **why);
/* Set bits in the first nbits of bm. */
uint64_t cbt_count_set(const uint8_t *bm, uint64_t nbits);
/*
 * Blocks from block first on with the same bit as it, up to limit blocks
 * (at least 1): how long the extent starting there is.
 */
uint64_t cbt_run_length(const uint8_t *bm, uint64_t first, uint64_t limit);

#endif
