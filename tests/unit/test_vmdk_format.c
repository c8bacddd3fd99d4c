/*
 * The VMDK format library: header and footer, the grain directory and its
 * limits, grain table entries, stream-optimized grain markers and
 * inflation, the descriptor parser and the extent path rules. Images are
 * built in memory, byte by byte, the way the spec lays them out.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <cmocka.h>

#include "../memfile.h"
#include "vmdk_format.h"

#define SEC VMDK_SECTOR

/* ---- an image in memory ---- */

static void
mem_grow(struct memfile *m, size_t size)
{
	if (size > m->size) {
		m->data = realloc(m->data, size);
		memset(m->data + m->size, 0, size - m->size);
		m->size = size;
	}
}

static void
put32(struct memfile *m, size_t off, uint32_t v)
{
	mem_grow(m, off + 4);
	for (int i = 0; i < 4; i++)
		m->data[off + i] = (uint8_t)(v >> (8 * i));
}

static void
put64(struct memfile *m, size_t off, uint64_t v)
{
	put32(m, off, (uint32_t)v);
	put32(m, off + 4, (uint32_t)(v >> 32));
}

static void
put_bytes(struct memfile *m, size_t off, const void *p, size_t n)
{
	mem_grow(m, off + n);
	memcpy(m->data + off, p, n);
}

/* A SparseExtentHeader at off. */
static void
put_header(struct memfile *m, size_t off, const struct vmdk_header *h)
{
	put32(m, off, h->magic);
	put32(m, off + 4, h->version);
	put32(m, off + 8, h->flags);
	put64(m, off + 12, h->capacity);
	put64(m, off + 20, h->grain_size);
	put64(m, off + 28, h->desc_offset);
	put64(m, off + 36, h->desc_size);
	put32(m, off + 44, h->gtes);
	put64(m, off + 48, h->rgd_offset);
	put64(m, off + 56, h->gd_offset);
	put64(m, off + 64, h->overhead);
	put_bytes(m, off + 73, h->nl, 4);
	mem_grow(m, off + 79);
	m->data[off + 77] = (uint8_t)h->compress;
	m->data[off + 78] = (uint8_t)(h->compress >> 8);
	mem_grow(m, off + SEC);
}

static const char embedded[] =
	"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
	"createType=\"monolithicSparse\"\n\n# Extent description\nRW 64 SPARSE \"t.vmdk\"\n";

/*
 * 64 sectors in grains of 4 sectors, 4 entries per table: 4 tables, in
 * sectors 4..7; the directory in sector 3; grains from sector 8. Grain 0 at
 * sector 8, grain 2 at sector 12; table 1 absent; grain 13 zeroed.
 */
static struct vmdk_header
small_header(void)
{
	struct vmdk_header h = {
		.magic = VMDK_MAGIC, .version = 1, .flags = VMDK_FLAG_NL_TEST,
		.capacity = 64, .grain_size = 4, .desc_offset = 1, .desc_size = 2,
		.gtes = 4, .gd_offset = 3, .overhead = 8,
		.nl = { '\n', ' ', '\r', '\n' },
	};
	return h;
}

static struct memfile
small_image(const struct vmdk_header *h)
{
	struct memfile m = { 0 };
	put_header(&m, 0, h);
	put_bytes(&m, SEC, embedded, sizeof(embedded) - 1);
	put32(&m, 3 * SEC, 4);
	put32(&m, 3 * SEC + 4, 0);
	put32(&m, 3 * SEC + 8, 6);
	put32(&m, 3 * SEC + 12, 7);
	put32(&m, 4 * SEC, 8);			/* grain 0 */
	put32(&m, 4 * SEC + 8, 12);		/* grain 2 */
	put32(&m, 6 * SEC + 4, 1);		/* grain 9: sector 1, or zeroed */
	put32(&m, 7 * SEC + 4, 16);		/* grain 13 */
	mem_grow(&m, 20 * SEC);
	for (int s = 8; s < 20; s++)
		memset(m.data + s * SEC, 0x40 + s, SEC);
	return m;
}

static int
load(struct memfile *m, struct vmdk_sparse *s, struct td_error *err)
{
	return vmdk_sparse_load(s, mem_read, m, m->size, err);
}

static void
test_probe(void **state)
{
	(void)state;
	assert_int_equal(vmdk_probe((const uint8_t *)"KDMV\1\0\0\0", 8), VMDK_FILE_SPARSE);
	assert_int_equal(vmdk_probe((const uint8_t *)"COWD", 4), VMDK_FILE_COWD);
	assert_int_equal(vmdk_probe((const uint8_t *)"# Disk", 6), VMDK_FILE_TEXT);
	assert_int_equal(vmdk_probe((const uint8_t *)"KDM", 3), VMDK_FILE_TEXT);
}

static void
test_sparse_load(void **state)
{
	struct vmdk_header h = small_header();
	struct memfile m = small_image(&h);
	struct vmdk_sparse s;
	struct td_error err;
	uint64_t off = 0;
	char why[128], *text;
	(void)state;

	assert_int_equal(load(&m, &s, &err), 0);
	assert_int_equal(s.capacity, 64);
	assert_int_equal(s.grain_bytes, 2048);
	assert_int_equal(s.gt_bytes, 16);
	assert_int_equal(s.nr_gdes, 4);
	assert_int_equal(s.gd[0], 4);
	assert_int_equal(s.gd[1], 0);
	assert_false(s.compressed);
	assert_int_equal(vmdk_gd_index(&s, vmdk_grain_of(&s, 40 * SEC)), 2);

	uint32_t gt[4];
	memcpy(gt, m.data + 4 * SEC, sizeof(gt));
	vmdk_gt_decode(gt, 4);
	assert_int_equal(vmdk_grain_decode(&s, 0, gt[0], &off, why, sizeof(why)), VMDK_GRAIN_DATA);
	assert_int_equal(off, 8 * SEC);
	assert_int_equal(vmdk_grain_decode(&s, 1, gt[1], &off, why, sizeof(why)),
			 VMDK_GRAIN_UNALLOC);
	/* without the zeroed-grain flag, 1 is just sector 1 */
	assert_int_equal(vmdk_grain_decode(&s, 9, 1, &off, why, sizeof(why)), VMDK_GRAIN_DATA);
	assert_int_equal(off, SEC);
	/* a grain that does not fit in the file */
	assert_int_equal(vmdk_grain_decode(&s, 3, 18, &off, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "past the end"));

	assert_int_equal(vmdk_sparse_descriptor(&s, mem_read, &m, &text, &err), 0);
	struct vmdk_desc d;
	assert_int_equal(vmdk_desc_parse(text, strlen(text), &d, &err), 0);
	assert_int_equal(d.cid, 0x12345678);
	assert_int_equal(d.parent_cid, VMDK_NO_PARENT);
	assert_string_equal(d.create_type, "monolithicSparse");
	vmdk_desc_free(&d);
	free(text);
	vmdk_sparse_free(&s);

	h.flags |= VMDK_FLAG_ZERO_GRAIN;
	h.version = 2;
	put_header(&m, 0, &h);
	assert_int_equal(load(&m, &s, &err), 0);
	assert_int_equal(vmdk_grain_decode(&s, 9, 1, &off, why, sizeof(why)), VMDK_GRAIN_ZERO);
	vmdk_sparse_free(&s);
	free(m.data);
}

static void
test_last_grain_may_be_partial(void **state)
{
	struct vmdk_header h = small_header();
	struct vmdk_sparse s;
	struct td_error err;
	uint64_t off;
	char why[128];
	(void)state;

	h.capacity = 62;			/* the last grain holds 2 sectors */
	struct memfile m = small_image(&h);
	m.size = 17 * SEC + 2 * SEC;		/* grain 15 at 17: only its 2 sectors there */
	assert_int_equal(load(&m, &s, &err), 0);
	assert_int_equal(vmdk_grain_need(&s, 15), 2 * SEC);
	assert_int_equal(vmdk_grain_need(&s, 14), 4 * SEC);
	assert_int_equal(vmdk_grain_need(&s, 16), 0);
	assert_int_equal(vmdk_grain_decode(&s, 15, 17, &off, why, sizeof(why)), VMDK_GRAIN_DATA);
	assert_int_equal(vmdk_grain_decode(&s, 14, 17, &off, why, sizeof(why)), -EUCLEAN);
	vmdk_sparse_free(&s);
	free(m.data);
}

/* ---- damage ---- */

struct damage {
	const char *name;
	void (*apply)(struct vmdk_header *h, struct memfile *m);
	int code;
	const char *needle;
};

static void d_magic(struct vmdk_header *h, struct memfile *m) { (void)m; h->magic = 0x12345678; }
static void d_version(struct vmdk_header *h, struct memfile *m) { (void)m; h->version = 4; }
static void d_newline(struct vmdk_header *h, struct memfile *m) { (void)m; h->nl[2] = '\n'; }
static void d_compress(struct vmdk_header *h, struct memfile *m) { (void)m; h->compress = 2; }
static void d_grain_odd(struct vmdk_header *h, struct memfile *m) { (void)m; h->grain_size = 3; }
static void d_grain_big(struct vmdk_header *h, struct memfile *m) { (void)m; h->grain_size = 4096; }
static void d_gtes_zero(struct vmdk_header *h, struct memfile *m) { (void)m; h->gtes = 0; }
static void d_gtes_big(struct vmdk_header *h, struct memfile *m) { (void)m; h->gtes = 513; }
static void d_capacity_zero(struct vmdk_header *h, struct memfile *m) { (void)m; h->capacity = 0; }
static void d_capacity_huge(struct vmdk_header *h, struct memfile *m) { (void)m; h->capacity = 1ULL << 50; }
static void
d_gd_huge(struct vmdk_header *h, struct memfile *m)
{
	(void)m;
	h->capacity = 1ULL << 37;	/* 64 TiB in 1-sector grains, 1 per table */
	h->grain_size = 1;
	h->gtes = 1;
}
static void d_gd_past_end(struct vmdk_header *h, struct memfile *m) { (void)m; h->gd_offset = 20; }
static void d_gd_zero(struct vmdk_header *h, struct memfile *m) { (void)m; h->gd_offset = 0; }
static void d_gt_past_end(struct vmdk_header *h, struct memfile *m) { (void)h; put32(m, 3 * SEC + 4, 20); }
static void d_gt_wrap(struct vmdk_header *h, struct memfile *m) { (void)h; put32(m, 3 * SEC + 8, 0xffffffff); }
static void d_desc_past_end(struct vmdk_header *h, struct memfile *m) { (void)m; h->desc_offset = 19; }
static void d_desc_huge(struct vmdk_header *h, struct memfile *m) { (void)m; h->desc_size = 1u << 20; }
static void d_stream_no_footer(struct vmdk_header *h, struct memfile *m) { (void)m; h->gd_offset = VMDK_GD_AT_END; }

static const struct damage damages[] = {
	{ "magic", d_magic, EUCLEAN, "bad magic" },
	{ "version", d_version, ENOTSUP, "version 4" },
	{ "newline", d_newline, EUCLEAN, "text-mode" },
	{ "compress", d_compress, ENOTSUP, "compression algorithm 2" },
	{ "grain odd", d_grain_odd, EUCLEAN, "power of two" },
	{ "grain big", d_grain_big, EUCLEAN, "power of two" },
	{ "gtes zero", d_gtes_zero, EUCLEAN, "entries per grain table" },
	{ "gtes big", d_gtes_big, EUCLEAN, "entries per grain table" },
	{ "capacity zero", d_capacity_zero, EUCLEAN, "capacity" },
	{ "capacity huge", d_capacity_huge, EUCLEAN, "capacity" },
	{ "gd huge", d_gd_huge, EUCLEAN, "grain directory of 137438953472 entries is too large" },
	{ "gd past end", d_gd_past_end, EUCLEAN, "grain directory at sector 20" },
	{ "gd zero", d_gd_zero, EUCLEAN, "grain directory at sector 0" },
	{ "gt past end", d_gt_past_end, EUCLEAN, "grain table 1 at sector 20 is past the end" },
	{ "gt wrap", d_gt_wrap, EUCLEAN, "grain table 2" },
	{ "desc past end", d_desc_past_end, EUCLEAN, "embedded descriptor" },
	{ "desc huge", d_desc_huge, EUCLEAN, "embedded descriptor" },
	{ "stream without footer", d_stream_no_footer, EUCLEAN, "footer" },
};

static void
test_damaged_extents_refused(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(damages) / sizeof(damages[0]); i++) {
		struct vmdk_header h = small_header();
		struct memfile m = small_image(&h);
		struct vmdk_sparse s;
		struct td_error err = { 0 };
		damages[i].apply(&h, &m);
		put_header(&m, 0, &h);
		int rc = load(&m, &s, &err);
		if (rc != -damages[i].code || !strstr(err.msg, damages[i].needle))
			fail_msg("%s: rc %d, '%s'", damages[i].name, rc, err.msg);
		assert_null(s.gd);
		free(m.data);
	}
	struct vmdk_sparse s;
	struct td_error err;
	struct memfile tiny = { (uint8_t *)"KDMV", 4 };
	assert_int_equal(load(&tiny, &s, &err), -EUCLEAN);
	assert_non_null(strstr(err.msg, "too short"));
}

/* ---- stream-optimized ---- */

/* A grain of 4 sectors filled with fill, deflated behind its marker at sector sec. */
static size_t
put_zgrain(struct memfile *m, size_t sec, uint64_t lba, const uint8_t *data, size_t len)
{
	uLongf zlen = compressBound(len);
	uint8_t *z = malloc(zlen);
	assert_int_equal(compress2(z, &zlen, data, len, 6), Z_OK);
	put64(m, sec * SEC, lba);
	put32(m, sec * SEC + 8, (uint32_t)zlen);
	put_bytes(m, sec * SEC + 12, z, zlen);
	free(z);
	return sec + (12 + zlen + SEC - 1) / SEC;
}

static void
put_marker(struct memfile *m, size_t sec, uint64_t val, uint32_t type)
{
	put64(m, sec * SEC, val);
	put32(m, sec * SEC + 8, 0);
	put32(m, sec * SEC + 12, type);
	mem_grow(m, (sec + 1) * SEC);
}

/*
 * As VMware streams it: header with the directory "at the end", grains
 * (0 and 5), a grain table marker and table, the directory marker and
 * directory, the footer marker, the footer, end of stream.
 */
static struct memfile
stream_image(uint8_t *g0, uint8_t *g5, size_t *gt_sec)
{
	struct vmdk_header h = small_header();
	struct memfile m = { 0 };
	h.version = 3;
	h.flags |= VMDK_FLAG_COMPRESSED | VMDK_FLAG_MARKERS;
	h.compress = VMDK_COMPRESS_DEFLATE;
	h.capacity = 16;			/* one table */
	h.gd_offset = VMDK_GD_AT_END;
	put_header(&m, 0, &h);
	put_bytes(&m, SEC, embedded, sizeof(embedded) - 1);
	for (int i = 0; i < 2048; i++) {
		g0[i] = (uint8_t)(i * 7);
		g5[i] = (uint8_t)(i / 64);
	}
	size_t sec = 3, at0 = sec;
	sec = put_zgrain(&m, sec, 0, g0, 2048);
	/* grain 5 of a 16-sector disk: only grains 0..3 exist; use grain 3 */
	size_t at3 = sec;
	sec = put_zgrain(&m, sec, 12, g5, 2048);
	put_marker(&m, sec++, 1, VMDK_MARKER_GT);
	*gt_sec = sec;
	put32(&m, sec * SEC, (uint32_t)at0);
	put32(&m, sec * SEC + 12, (uint32_t)at3);
	mem_grow(&m, (++sec) * SEC);
	put_marker(&m, sec++, 1, VMDK_MARKER_GD);
	put32(&m, sec * SEC, (uint32_t)*gt_sec);
	mem_grow(&m, (++sec) * SEC);
	put_marker(&m, sec++, 1, VMDK_MARKER_FOOTER);
	h.gd_offset = sec - 2;
	put_header(&m, sec++ * SEC, &h);
	put_marker(&m, sec++, 0, VMDK_MARKER_EOS);
	return m;
}

static int
read_grain(struct memfile *m, const struct vmdk_sparse *s, uint64_t grain, uint32_t gte,
	   uint8_t *out, char *why, size_t whylen)
{
	uint64_t off;
	int kind = vmdk_grain_decode(s, grain, gte, &off, why, whylen);
	if (kind != VMDK_GRAIN_COMPRESSED)
		return kind < 0 ? kind : -1000;
	uint32_t len = vmdk_grain_zread_len(s, off);
	return vmdk_grain_inflate(s, grain, m->data + off, len, out, why, whylen);
}

static void
test_stream_with_footer(void **state)
{
	uint8_t g0[2048], g3[2048], out[2048];
	size_t gt_sec;
	struct memfile m = stream_image(g0, g3, &gt_sec);
	struct vmdk_sparse s;
	struct td_error err;
	char why[256];
	(void)state;

	assert_int_equal(load(&m, &s, &err), 0);
	assert_true(s.compressed && s.markers);
	assert_int_equal(s.nr_gdes, 1);
	assert_int_equal(s.gd[0], gt_sec);
	uint32_t gt[4];
	memcpy(gt, m.data + gt_sec * SEC, sizeof(gt));
	vmdk_gt_decode(gt, 4);
	assert_int_equal(read_grain(&m, &s, 0, gt[0], out, why, sizeof(why)), 0);
	assert_memory_equal(out, g0, 2048);
	assert_int_equal(read_grain(&m, &s, 3, gt[3], out, why, sizeof(why)), 0);
	assert_memory_equal(out, g3, 2048);
	assert_true(s.zread_max >= compressBound(2048) + 12);

	/* the grain table says grain 1 is where grain 0 is: its marker disagrees */
	assert_int_equal(read_grain(&m, &s, 1, gt[0], out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "marker says sector 0"));
	/* a metadata marker where a grain should be */
	assert_int_equal(read_grain(&m, &s, 0, (uint32_t)gt_sec - 1, out, why, sizeof(why)),
			 -EUCLEAN);
	assert_non_null(strstr(why, "metadata marker"));

	/* damage grain 0's marker and payload */
	uint32_t zlen;
	memcpy(&zlen, m.data + gt[0] * SEC + 8, 4);
	put32(&m, gt[0] * SEC + 8, 1u << 30);
	assert_int_equal(read_grain(&m, &s, 0, gt[0], out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "more than a grain of 2048 bytes can take"));
	put32(&m, gt[0] * SEC + 8, zlen);
	m.data[gt[0] * SEC + 12 + 5] ^= 0x55;
	assert_int_equal(read_grain(&m, &s, 0, gt[0], out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "grain 0"));
	vmdk_sparse_free(&s);

	/* the end of the file cut off: no footer */
	m.size -= SEC;
	assert_int_equal(load(&m, &s, &err), -EUCLEAN);
	assert_non_null(strstr(err.msg, "footer"));
	free(m.data);
}

static void
test_inflate_size_rules(void **state)
{
	struct vmdk_header h = small_header();
	struct memfile m = { 0 };
	struct vmdk_sparse s;
	struct td_error err;
	uint8_t big[4096], out[2048];
	char why[256];
	(void)state;

	h.compress = VMDK_COMPRESS_DEFLATE;
	h.flags |= VMDK_FLAG_MARKERS;
	h.capacity = 14;			/* grain 3: 2 sectors */
	struct memfile base = small_image(&h);
	m = base;
	memset(big, 0x11, sizeof(big));
	assert_int_equal(load(&m, &s, &err), 0);
	/* twice a grain, deflated: too much */
	put_zgrain(&m, 8, 0, big, 4096);
	assert_int_equal(read_grain(&m, &s, 0, 8, out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "inflates to more than a grain"));
	/* half a grain: short, except for the disk's last, partial grain */
	put_zgrain(&m, 8, 0, big, 1024);
	assert_int_equal(read_grain(&m, &s, 0, 8, out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "inflates to 1024 bytes, not 2048"));
	put_zgrain(&m, 8, 12, big, 1024);
	assert_int_equal(read_grain(&m, &s, 3, 8, out, why, sizeof(why)), 0);
	assert_int_equal(out[1023], 0x11);
	assert_int_equal(out[1024], 0);
	/* a marker cut by the end of the file */
	vmdk_sparse_free(&s);
	m.size = 19 * SEC + 6;
	assert_int_equal(load(&m, &s, &err), 0);
	assert_int_equal(read_grain(&m, &s, 0, 19, out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "cut off"));
	put_zgrain(&m, 19, 0, big, 2048);
	vmdk_sparse_free(&s);
	m.size = 19 * SEC + 14;
	assert_int_equal(load(&m, &s, &err), 0);
	assert_int_equal(read_grain(&m, &s, 0, 19, out, why, sizeof(why)), -EUCLEAN);
	assert_non_null(strstr(why, "runs past the end"));
	vmdk_sparse_free(&s);
	free(m.data);
}

/* ---- descriptors ---- */

static const char qemu_flat[] =
	"# Disk DescriptorFile\nversion=1\nCID=59747496\nparentCID=ffffffff\n"
	"createType=\"monolithicFlat\"\n\n# Extent description\n"
	"RW 16384 FLAT \"d-flat.vmdk\" 0\n\n# The Disk Data Base\n#DDB\n\n"
	"ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"16\"\n"
	"ddb.adapterType = \"ide\"\n\0\0\0\0padding";

static const char vmware_mixed[] =
	"# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\n"
	"parentCID=0a0B0c0D\r\nisNativeSnapshot=\"no\"\r\ncreateType=\"custom\"\r\n"
	"parentFileNameHint=\"base disk.vmdk\"\r\n\r\n# Extent description\r\n"
	"RW 4192256 SPARSE \"x-s001.vmdk\"\r\n"
	"RDONLY 2048 FLAT \"sub/x-f002.vmdk\" 8\r\n"
	"  RW\t1000 ZERO\r\n"
	"RW 8 VMFS \"x-flat.vmdk\"\r\n"
	"\r\n#DDB\r\nddb.uuid.image = \"a b c\"\r\nddb.comment = \"=\"\r\n";

static void
test_descriptor_parse(void **state)
{
	struct vmdk_desc d;
	struct td_error err;
	(void)state;

	assert_int_equal(vmdk_desc_parse(qemu_flat, sizeof(qemu_flat), &d, &err), 0);
	assert_int_equal(d.version, 1);
	assert_int_equal(d.cid, 0x59747496);
	assert_int_equal(d.parent_cid, VMDK_NO_PARENT);
	assert_null(d.parent_hint);
	assert_string_equal(d.create_type, "monolithicFlat");
	assert_int_equal(d.nr_ext, 1);
	assert_int_equal(d.ext[0].type, VMDK_EXT_FLAT);
	assert_int_equal(d.ext[0].sectors, 16384);
	assert_int_equal(d.ext[0].offset, 0);
	assert_string_equal(d.ext[0].file, "d-flat.vmdk");
	vmdk_desc_free(&d);

	assert_int_equal(vmdk_desc_parse(vmware_mixed, strlen(vmware_mixed), &d, &err), 0);
	assert_int_equal(d.parent_cid, 0x0a0b0c0d);
	assert_string_equal(d.parent_hint, "base disk.vmdk");
	assert_int_equal(d.nr_ext, 4);
	assert_int_equal(d.ext[0].type, VMDK_EXT_SPARSE);
	assert_int_equal(d.ext[1].type, VMDK_EXT_FLAT);
	assert_int_equal(d.ext[1].offset, 8);
	assert_string_equal(d.ext[1].file, "sub/x-f002.vmdk");
	assert_int_equal(d.ext[2].type, VMDK_EXT_ZERO);
	assert_null(d.ext[2].file);
	assert_int_equal(d.ext[3].type, VMDK_EXT_FLAT);
	assert_int_equal(d.sectors, 4192256 + 2048 + 1000 + 8);
	vmdk_desc_free(&d);
}

struct bad_desc {
	const char *text;
	int code;
	const char *needle;
};

static const struct bad_desc bad_descs[] = {
	{ "version=1\nRW 8 FLAT \"a\"\n", EUCLEAN, "no createType" },
	{ "createType=\"x\"\nthis is not a descriptor\n", EUCLEAN,
	  "line 2: neither KEY=VALUE nor an extent" },
	{ "createType=x\nRW 8 FLAT \"a\"\nNOACCESS 8 FLAT \"b\"\n", ENOTSUP, "line 3: NOACCESS" },
	{ "createType=x\nRW 8 VMFSSPARSE \"a\"\n", ENOTSUP, "VMFSSPARSE extents are not supported" },
	{ "createType=x\nRW 8 SESPARSE \"a\"\n", ENOTSUP, "SESPARSE" },
	{ "createType=x\nRW 8 BOGUS \"a\"\n", EUCLEAN, "unknown extent type 'BOGUS'" },
	{ "createType=x\nRW 8x FLAT \"a\"\n", EUCLEAN, "bad extent size" },
	{ "createType=x\nRW 0 FLAT \"a\"\n", EUCLEAN, "bad extent size" },
	{ "createType=x\nRW 99999999999999999999999 FLAT \"a\"\n", EUCLEAN, "bad extent size" },
	{ "createType=x\nRW 8 FLAT\n", EUCLEAN, "without a quoted file name" },
	{ "createType=x\nRW 8 FLAT \"a\n", EUCLEAN, "unterminated" },
	{ "createType=x\nRW 8 FLAT \"\"\n", EACCES, "empty file name" },
	{ "createType=x\nRW 8 FLAT \"/etc/shadow\"\n", EACCES, "absolute path" },
	{ "createType=x\nRW 8 FLAT \"../x.vmdk\"\n", EACCES, "leaves the descriptor's directory" },
	{ "createType=x\nRW 8 FLAT \"a/../../x\"\n", EACCES, "leaves" },
	{ "createType=x\nRW 8 FLAT \"a\" 0 junk\n", EUCLEAN, "unexpected text" },
	{ "createType=x\nRW 8 SPARSE \"a\" 0\n", EUCLEAN, "unexpected text" },
	{ "createType=x\nRW 8 FLAT \"a\" -1\n", EUCLEAN, "bad extent offset" },
	{ "createType=x\nRW 8 FLAT \"a\" 18014398509481983\n", EUCLEAN, "bad extent offset" },
	{ "createType=x\nCID=xyz\n", EUCLEAN, "bad CID" },
	{ "createType=x\nparentCID=123456789\n", EUCLEAN, "bad parentCID" },
	{ "createType=x\nversion=4\n", ENOTSUP, "descriptor version '4'" },
	{ "createType=\"\"\n", EUCLEAN, "bad createType" },
	{ "createType=x\nparentFileNameHint=\"\"\n", EUCLEAN, "bad parentFileNameHint" },
	{ "createType=x\nRW 68719476736 FLAT \"a\"\nRW 68719476737 FLAT \"b\"\n", EUCLEAN,
	  "line 3: the disk grows beyond 64 TiB" },
	{ "createType=x\n= 3\n", EUCLEAN, "neither KEY=VALUE" },
	{ "createType=x\nRW 8 FLAT \"a\033[2Jb\"\n", EACCES, "control character" },
	{ "createType=x\nRW 8 \033[2J \"a\"\n", EUCLEAN, "unknown extent type '?[2J'" },
	{ "createType=x\nparentFileNameHint=\"a\tb\"\n", EUCLEAN, "bad parentFileNameHint" },
	{ "createType=x\nversion=\0011\n", ENOTSUP, "version '?1'" },
};

static void
test_descriptor_errors(void **state)
{
	struct vmdk_desc d;
	struct td_error err;
	(void)state;

	for (size_t i = 0; i < sizeof(bad_descs) / sizeof(bad_descs[0]); i++) {
		const struct bad_desc *b = &bad_descs[i];
		int rc = vmdk_desc_parse(b->text, strlen(b->text), &d, &err);
		if (rc != -b->code || !strstr(err.msg, b->needle))
			fail_msg("'%s': rc %d, '%s'", b->text, rc, err.msg);
		assert_null(d.ext);
	}
}

static void
test_descriptor_limits(void **state)
{
	size_t n = VMDK_MAX_EXTENTS + 1, len = 0;
	char *text = malloc(32 + n * 32);
	struct vmdk_desc d;
	struct td_error err;
	(void)state;

	len += (size_t)sprintf(text + len, "createType=\"twoGbMaxExtentFlat\"\n");
	for (size_t i = 0; i < n - 1; i++)
		len += (size_t)sprintf(text + len, "RW 8 FLAT \"f%zu\" 0\n", i);
	assert_int_equal(vmdk_desc_parse(text, len, &d, &err), 0);
	assert_int_equal(d.nr_ext, VMDK_MAX_EXTENTS);
	assert_string_equal(d.ext[VMDK_MAX_EXTENTS - 1].file, "f1023");
	vmdk_desc_free(&d);
	len += (size_t)sprintf(text + len, "RW 8 FLAT \"one-too-many\" 0\n");
	assert_int_equal(vmdk_desc_parse(text, len, &d, &err), -EUCLEAN);
	assert_non_null(strstr(err.msg, "more than 1024 extents"));
	free(text);

	char *huge = calloc(1, VMDK_MAX_DESC + 2);
	memset(huge, '#', VMDK_MAX_DESC + 1);
	assert_int_equal(vmdk_desc_parse(huge, VMDK_MAX_DESC + 1, &d, &err), -EUCLEAN);
	assert_non_null(strstr(err.msg, "too large"));
	free(huge);
}

static void
test_name_rules(void **state)
{
	char why[256];
	(void)state;
	const char *ok[] = { "a.vmdk", "sub/b.vmdk", "..a", "a..b", "./c", "x/./y", "a b" };
	const char *bad[] = { "", "/x", "..", "../x", "a/..", "a/../b", "a//../b" };
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
		assert_int_equal(vmdk_name_check(ok[i], why, sizeof(why)), 0);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(vmdk_name_check(bad[i], why, sizeof(why)), -EACCES);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_probe),
		cmocka_unit_test(test_sparse_load),
		cmocka_unit_test(test_last_grain_may_be_partial),
		cmocka_unit_test(test_damaged_extents_refused),
		cmocka_unit_test(test_stream_with_footer),
		cmocka_unit_test(test_inflate_size_rules),
		cmocka_unit_test(test_descriptor_parse),
		cmocka_unit_test(test_descriptor_errors),
		cmocka_unit_test(test_descriptor_limits),
		cmocka_unit_test(test_name_rules),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
