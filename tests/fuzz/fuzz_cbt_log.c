/*
 * libFuzzer target: the CBT log's parser (drivers/cbt_format.c) and its
 * whole-file open and growth (drivers/cbt_file.c) on hostile logs.
 *
 * Input: a whole log file (docs/CBT-LOG.md). cbt_header_decode() judges its
 * first 48 bytes against its length; a header it accepts must encode back
 * to the same bytes (the padding zeroed), and the bitmap's set-bit count
 * and runs (cbt_count_set, cbt_run_length) must agree with a bit-by-bit
 * model (the runs over the bitmap's first and last 8192 bits: the middle
 * of a large one is more of the same). The same bytes in a memfd, opened by
 * path (/proc/self/fd/N), must be accepted by cbt_file_open() exactly when
 * decode accepts them, with the same header and bitmap. An accepted log is
 * then grown by a number of bytes taken from its last byte and opened
 * again: header fields kept, the old blocks' bits kept, the new blocks'
 * (and the old slack's) clear. Seeds: make-cbt-seeds.py.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cbt_file.h"
#include "cbt_format.h"
#include "fuzz_common.h"

static int memfd = -1;
static char mempath[64];

static void
load_memfd(const uint8_t *data, size_t size)
{
	if (memfd < 0) {
		memfd = memfd_create("fuzz_cbt_log", MFD_CLOEXEC);
		if (memfd < 0)
			fz_fail("memfd_create: %s", strerror(errno));
		snprintf(mempath, sizeof(mempath), "/proc/self/fd/%d", memfd);
	}
	if (ftruncate(memfd, 0) < 0 || (size && pwrite(memfd, data, size, 0) != (ssize_t)size))
		fz_fail("loading the memfd: %s", strerror(errno));
}

#define BIT(bm, b)	(((bm)[(b) / 8] >> ((b) % 8)) & 1)

/* Bits walked at each end of a bitmap: the middle of a large one adds nothing new. */
#define WINDOW	8192

/*
 * cbt_run_length over every run in [from, to), asked up to to, each bit of
 * each run looked at.
 */
static void FZ_NO_COVERAGE
check_runs(const uint8_t *bm, uint64_t from, uint64_t to)
{
	for (uint64_t b = from; b < to;) {
		uint64_t n = cbt_run_length(bm, b, to - b);
		int v = BIT(bm, b);
		if (n < 1 || n > to - b)
			fz_fail("cbt_run_length(%llu, %llu) = %llu", (unsigned long long)b,
				(unsigned long long)(to - b), (unsigned long long)n);
		for (uint64_t i = b; i < b + n; i++)
			if (BIT(bm, i) != v)
				fz_fail("run at %llu of %llu holds a different bit at %llu",
					(unsigned long long)b, (unsigned long long)n,
					(unsigned long long)i);
		if (b + n < to && BIT(bm, b + n) == v)
			fz_fail("run at %llu stops at %llu before its end", (unsigned long long)b,
				(unsigned long long)(b + n));
		b += n;
	}
}

/* Set bits in the first nbits of bm, a byte at a time through a table built bit by bit. */
static uint64_t FZ_NO_COVERAGE
model_count(const uint8_t *bm, uint64_t nbits)
{
	static uint8_t ones[256];
	static int built;
	uint64_t n = 0;

	for (unsigned v = 0; !built && v < 256; v++)
		for (unsigned b = 0; b < 8; b++)
			ones[v] += (v >> b) & 1;
	built = 1;
	for (uint64_t i = 0; i < nbits / 8; i++)
		n += ones[bm[i]];
	for (uint64_t b = nbits / 8 * 8; b < nbits; b++)
		n += BIT(bm, b);
	return n;
}

/*
 * The runs of the bitmap's first and last WINDOW bits (the first asked up
 * to the window's end, the last up to the bitmap's), and cbt_count_set for
 * the whole and for a prefix that mostly ends inside a byte.
 */
static void FZ_NO_COVERAGE
check_bitmap(const uint8_t *bm, uint64_t nbits)
{
	uint64_t part = nbits * 5 / 7;

	check_runs(bm, 0, nbits < WINDOW ? nbits : WINDOW);
	if (nbits > WINDOW)
		check_runs(bm, nbits - WINDOW, nbits);
	if (cbt_count_set(bm, nbits) != model_count(bm, nbits) ||
	    cbt_count_set(bm, part) != model_count(bm, part))
		fz_fail("cbt_count_set: %llu of %llu, %llu of %llu; the model: %llu and %llu",
			(unsigned long long)cbt_count_set(bm, nbits), (unsigned long long)nbits,
			(unsigned long long)cbt_count_set(bm, part), (unsigned long long)part,
			(unsigned long long)model_count(bm, nbits),
			(unsigned long long)model_count(bm, part));
}

/* A grown bitmap: the old blocks' bits, then nothing (the old slack cleared). */
static void FZ_NO_COVERAGE
check_grown(const uint8_t *old, uint64_t old_blocks, const uint8_t *bm, uint64_t bytes)
{
	uint64_t whole = old_blocks / 8;

	if (memcmp(old, bm, whole))
		fz_fail("grow changed the old bitmap's bytes");
	for (uint64_t i = whole; i < bytes; i++) {
		uint8_t want = i == whole && old_blocks % 8 ?
			       old[i] & (uint8_t)((1u << (old_blocks % 8)) - 1) : 0;
		if (bm[i] != want)
			fz_fail("after grow, bitmap byte %llu is %#x, not %#x", (unsigned long long)i,
				bm[i], want);
	}
}

static void
same_header(const struct cbt_header *a, const struct cbt_header *b, const char *what)
{
	if (memcmp(a->parent, b->parent, 16) || memcmp(a->child, b->child, 16) ||
	    a->consistent != b->consistent || a->size != b->size)
		fz_fail("%s: the header differs", what);
}

/* Grows the accepted log in the memfd and checks what it left. */
static void
grow(const struct cbt_header *h, const uint8_t *bm, uint64_t by)
{
	struct cbt_file f, g;
	char err[256];
	uint64_t size = h->size + by;

	if (cbt_file_open(mempath, 0, &f, err, sizeof(err)) < 0)
		fz_fail("reopening for writing: %s", err);
	/* (no input is long enough for a log near CBT_MAX_DISK: every growth fits) */
	int rc = cbt_file_grow(&f, size, err, sizeof(err));
	cbt_file_close(&f);
	if (rc < 0)
		fz_fail("grow by %llu: %s", (unsigned long long)by, err);
	if (cbt_file_open(mempath, 1, &g, err, sizeof(err)) < 0)
		fz_fail("the grown log does not open: %s", err);
	struct cbt_header want = *h;
	want.size = size;
	same_header(&want, &g.h, "after grow");
	check_grown(bm, cbt_blocks(h->size), g.bitmap, cbt_bitmap_bytes(size));
	cbt_file_close(&g);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct cbt_header h;
	struct cbt_file f;
	const char *why = NULL;
	char err[256];
	int rc = -EINVAL;

	if (size >= CBT_HEADER_SIZE) {
		rc = cbt_header_decode(data, size, &h, &why);
		if (rc && (rc != -EINVAL || !why))
			fz_fail("decode: %d without a reason", rc);
	}
	load_memfd(data, size);
	int orc = cbt_file_open(mempath, 1, &f, err, sizeof(err));
	if ((orc == 0) != (rc == 0))
		fz_fail("cbt_file_open says %d, decode %d (%s)", orc, rc, orc ? err : why);
	if (rc) {
		if (orc != -EINVAL || !strstr(err, mempath))
			fz_fail("refused with %d: %s", orc, err);
		return 0;
	}
	same_header(&h, &f.h, "open against decode");
	uint64_t n = cbt_bitmap_bytes(h.size);
	if (memcmp(f.bitmap, data + CBT_HEADER_SIZE, n))
		fz_fail("open's bitmap is not the file's");
	cbt_file_close(&f);

	uint8_t out[CBT_HEADER_SIZE], in[CBT_HEADER_SIZE];
	cbt_header_encode(&h, out);
	memcpy(in, data, CBT_HEADER_SIZE);
	memset(in + 36, 0, 4);
	if (memcmp(in, out, CBT_HEADER_SIZE))
		fz_fail("encode(decode(header)) is not the header");

	check_bitmap(data + CBT_HEADER_SIZE, cbt_blocks(h.size));
	/* up to 255 * 33 blocks more, and not always whole blocks */
	grow(&h, data + CBT_HEADER_SIZE, (uint64_t)data[size - 1] * (33 * CBT_BLOCK_SIZE + 1));
	return 0;
}
