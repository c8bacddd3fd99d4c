/*
 * VHD structures: encoding, checksums, geometry, the virtual-size rule, and
 * loading a file's metadata with every structural check the driver relies
 * on (an image that passes cannot make the driver read or write outside
 * its blocks). Formats facts: Microsoft's VHD spec 1.0 and blktap's batmap.
 */
#include "vhd_format.h"

#include <errno.h>
#include <iconv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uuid/uuid.h>

#include "byteorder.h"

#ifndef EUCLEAN
#define EUCLEAN EINVAL
#endif

#define VHD_EPOCH 946684800ULL		/* 2000-01-01 00:00:00 UTC */
#define VHD_MAX_GEOMETRY (65535ULL * 16 * 255)
#define VHD_MAX_LOCATOR (64u << 10)

static const char footer_cookie[8] = "conectix";
static const char header_cookie[8] = "cxsparse";
static const char batmap_cookie[8] = "tdbatmap";

static uint64_t
align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

/* ---- structures ---- */

uint32_t
vhd_checksum(const uint8_t *buf, size_t len, size_t skip)
{
	uint32_t sum = 0;
	for (size_t i = 0; i < len; i++)
		if (i < skip || i >= skip + 4)
			sum += buf[i];
	return ~sum;
}

void
vhd_footer_encode(const struct vhd_footer *f, uint8_t b[VHD_FOOTER_SIZE])
{
	memset(b, 0, VHD_FOOTER_SIZE);
	memcpy(b, f->cookie, 8);
	put_be32(b + 8, f->features);
	put_be32(b + 12, f->version);
	put_be64(b + 16, f->data_offset);
	put_be32(b + 24, f->timestamp);
	memcpy(b + 28, f->creator_app, 4);
	put_be32(b + 32, f->creator_version);
	put_be32(b + 36, f->creator_os);
	put_be64(b + 40, f->orig_size);
	put_be64(b + 48, f->curr_size);
	put_be16(b + 56, f->cyls);
	b[58] = f->heads;
	b[59] = f->spt;
	put_be32(b + 60, f->type);
	memcpy(b + 68, f->uuid, 16);
	b[84] = f->saved;
	b[85] = f->hidden;
	put_be32(b + 64, vhd_checksum(b, VHD_FOOTER_SIZE, 64));
}

int
vhd_footer_decode(const uint8_t b[VHD_FOOTER_SIZE], struct vhd_footer *f, char *why,
		  size_t len)
{
	memset(f, 0, sizeof(*f));
	memcpy(f->cookie, b, 8);
	f->features = get_be32(b + 8);
	f->version = get_be32(b + 12);
	f->data_offset = get_be64(b + 16);
	f->timestamp = get_be32(b + 24);
	memcpy(f->creator_app, b + 28, 4);
	f->creator_version = get_be32(b + 32);
	f->creator_os = get_be32(b + 36);
	f->orig_size = get_be64(b + 40);
	f->curr_size = get_be64(b + 48);
	f->cyls = get_be16(b + 56);
	f->heads = b[58];
	f->spt = b[59];
	f->type = get_be32(b + 60);
	f->checksum = get_be32(b + 64);
	memcpy(f->uuid, b + 68, 16);
	f->saved = b[84];
	f->hidden = b[85];
	if (memcmp(f->cookie, footer_cookie, 8)) {
		snprintf(why, len, "no VHD footer (bad cookie)");
		return -EUCLEAN;
	}
	if (f->checksum != vhd_checksum(b, VHD_FOOTER_SIZE, 64)) {
		snprintf(why, len, "footer checksum mismatch");
		return -EUCLEAN;
	}
	return 0;
}

void
vhd_header_encode(const struct vhd_header *h, uint8_t b[VHD_HEADER_SIZE])
{
	memset(b, 0, VHD_HEADER_SIZE);
	memcpy(b, h->cookie, 8);
	put_be64(b + 8, h->data_offset);
	put_be64(b + 16, h->table_offset);
	put_be32(b + 24, h->version);
	put_be32(b + 28, h->max_bat);
	put_be32(b + 32, h->block_size);
	memcpy(b + 40, h->parent_uuid, 16);
	put_be32(b + 56, h->parent_ts);
	memcpy(b + 64, h->parent_name, 512);
	for (int i = 0; i < 8; i++) {
		uint8_t *l = b + 576 + 24 * i;
		put_be32(l, h->loc[i].code);
		put_be32(l + 4, h->loc[i].data_space);
		put_be32(l + 8, h->loc[i].data_len);
		put_be64(l + 16, h->loc[i].data_offset);
	}
	put_be32(b + 36, vhd_checksum(b, VHD_HEADER_SIZE, 36));
}

int
vhd_header_decode(const uint8_t b[VHD_HEADER_SIZE], struct vhd_header *h, char *why,
		  size_t len)
{
	memset(h, 0, sizeof(*h));
	memcpy(h->cookie, b, 8);
	h->data_offset = get_be64(b + 8);
	h->table_offset = get_be64(b + 16);
	h->version = get_be32(b + 24);
	h->max_bat = get_be32(b + 28);
	h->block_size = get_be32(b + 32);
	h->checksum = get_be32(b + 36);
	memcpy(h->parent_uuid, b + 40, 16);
	h->parent_ts = get_be32(b + 56);
	memcpy(h->parent_name, b + 64, 512);
	for (int i = 0; i < 8; i++) {
		const uint8_t *l = b + 576 + 24 * i;
		h->loc[i].code = get_be32(l);
		h->loc[i].data_space = get_be32(l + 4);
		h->loc[i].data_len = get_be32(l + 8);
		h->loc[i].data_offset = get_be64(l + 16);
	}
	if (memcmp(h->cookie, header_cookie, 8)) {
		snprintf(why, len, "no dynamic disk header (bad cookie)");
		return -EUCLEAN;
	}
	if (h->checksum != vhd_checksum(b, VHD_HEADER_SIZE, 36)) {
		snprintf(why, len, "dynamic header checksum mismatch");
		return -EUCLEAN;
	}
	return 0;
}

void
vhd_batmap_hdr_encode(const struct vhd_batmap_hdr *bh, uint8_t b[VHD_SECTOR])
{
	memset(b, 0, VHD_SECTOR);
	memcpy(b, bh->cookie, 8);
	put_be64(b + 8, bh->offset);
	put_be32(b + 16, bh->size);
	put_be32(b + 20, bh->version);
	put_be32(b + 24, bh->checksum);
	b[28] = bh->marker;
}

void
vhd_batmap_hdr_decode(const uint8_t b[VHD_SECTOR], struct vhd_batmap_hdr *bh)
{
	memcpy(bh->cookie, b, 8);
	bh->offset = get_be64(b + 8);
	bh->size = get_be32(b + 16);
	bh->version = get_be32(b + 20);
	bh->checksum = get_be32(b + 24);
	bh->marker = b[28];
}

uint32_t
vhd_batmap_checksum(const uint8_t *map, size_t len)
{
	uint32_t sum = 0;
	for (size_t i = 0; i < len; i++)
		sum += map[i];
	return ~sum;
}

/* The part of the batmap blktap's checksum covers: what curr_size needs. */
static size_t
batmap_sum_len(const struct vhd_meta *m)
{
	uint64_t bytes = align_up(m->footer.curr_size >> 24, VHD_SECTOR);
	uint64_t all = (uint64_t)m->batmap_hdr.size * VHD_SECTOR;
	if (bytes < VHD_SECTOR)
		bytes = VHD_SECTOR;
	return (size_t)(bytes < all ? bytes : all);
}

void
vhd_geometry(uint64_t size, uint16_t *cyls, uint8_t *heads, uint8_t *spt)
{
	uint64_t secs = (size + VHD_SECTOR - 1) / VHD_SECTOR, cth;
	unsigned h, s;

	if (secs < 1)
		secs = 1;
	if (secs > VHD_MAX_GEOMETRY)
		secs = VHD_MAX_GEOMETRY;
	if (secs >= 65535ULL * 16 * 63) {
		s = 255;
		h = 16;
		cth = secs / s;
	} else {
		s = 17;
		cth = secs / s;
		h = (unsigned)((cth + 1023) / 1024);
		if (h < 4)
			h = 4;
		if (cth >= (uint64_t)h * 1024 || h > 16) {
			s = 31;
			h = 16;
			cth = secs / s;
		}
		if (cth >= (uint64_t)h * 1024) {
			s = 63;
			h = 16;
			cth = secs / s;
		}
	}
	*cyls = (uint16_t)(cth / h);
	*heads = (uint8_t)h;
	*spt = (uint8_t)s;
}

uint64_t
vhd_footer_size(const struct vhd_footer *f)
{
	/*
	 * qemu's rule (before 2025): Virtual PC and qemu's own images mean
	 * their CHS geometry; Hyper-V, disk2vhd, XenServer (tap), XenConverter
	 * and qemu with force_size mean current_size; so does the maximum CHS.
	 */
	static const char *const by_size[] = { "win ", "qem2", "d2v ", "CTXS" };
	uint64_t chs = (uint64_t)f->cyls * f->heads * f->spt;

	if (!memcmp(f->creator_app, "tap\0", 4) || chs == VHD_MAX_GEOMETRY)
		return f->curr_size;
	for (size_t i = 0; i < sizeof(by_size) / sizeof(by_size[0]); i++)
		if (!memcmp(f->creator_app, by_size[i], 4))
			return f->curr_size;
	return chs * VHD_SECTOR;
}

uint32_t
vhd_time(uint64_t unix_seconds)
{
	return unix_seconds > VHD_EPOCH ? (uint32_t)(unix_seconds - VHD_EPOCH) : 0;
}

/* ---- text encodings ---- */

static int
convert(const char *from, const char *to, const void *in, size_t inlen, void *out,
	size_t outlen, size_t *written)
{
	iconv_t cd = iconv_open(to, from);
	char *ip = (char *)in, *op = out;
	size_t il = inlen, ol = outlen;

	if (cd == (iconv_t)-1)
		return -errno;
	size_t r = iconv(cd, &ip, &il, &op, &ol);
	iconv_close(cd);
	if (r == (size_t)-1)
		return errno == E2BIG ? -ENAMETOOLONG : -EILSEQ;
	*written = outlen - ol;
	return 0;
}

int
vhd_utf8_to_utf16(const char *in, int big_endian, uint8_t *out, size_t outlen,
		  size_t *written)
{
	return convert("UTF-8", big_endian ? "UTF-16BE" : "UTF-16LE", in, strlen(in), out,
		       outlen, written);
}

int
vhd_utf16_to_utf8(const uint8_t *in, size_t inlen, int big_endian, char *out,
		  size_t outlen)
{
	size_t n;
	if (outlen == 0)
		return -ENAMETOOLONG;
	int rc = convert(big_endian ? "UTF-16BE" : "UTF-16LE", "UTF-8", in, inlen, out,
			 outlen - 1, &n);
	if (rc < 0)
		return rc;
	out[n] = '\0';
	if (strlen(out) != n)
		return -EILSEQ;	/* an embedded NUL */
	return 0;
}

/* ---- loading ---- */

#define FAIL(...) do { td_error_set(err, EUCLEAN, __VA_ARGS__); goto fail; } while (0)

struct range {
	uint64_t start, end;
	const char *what;
	uint32_t block;
};

static int
range_cmp(const void *a, const void *b)
{
	const struct range *x = a, *y = b;
	return x->start < y->start ? -1 : x->start > y->start;
}

static int
is_nil(const uint8_t *uuid)
{
	for (int i = 0; i < 16; i++)
		if (uuid[i])
			return 0;
	return 1;
}

/* The locator's size in bytes: blktap writes bytes, the spec says sectors. */
static uint64_t
locator_space(const struct vhd_locator *l)
{
	if (l->data_space < VHD_SECTOR)
		return (uint64_t)l->data_space * VHD_SECTOR;
	return l->data_space % VHD_SECTOR ? 0 : l->data_space;
}

/* Decodes one locator into an absolute or relative POSIX path. */
static int
locator_decode(const struct vhd_locator *l, const uint8_t *data, char *out, size_t outlen)
{
	if (l->code == VHD_PLAT_MACX) {
		if (l->data_len >= outlen || memchr(data, 0, l->data_len))
			return -EILSEQ;
		memcpy(out, data, l->data_len);
		out[l->data_len] = '\0';
		if (strncmp(out, "file://", 7))
			return -EILSEQ;
		memmove(out, out + 7, strlen(out + 7) + 1);
	} else {
		int rc = vhd_utf16_to_utf8(data, l->data_len, 0, out, outlen);
		if (rc < 0)
			return rc;
		for (char *p = out; *p; p++)
			if (*p == '\\')
				*p = '/';
		if ((out[0] == 'C' || out[0] == 'c') && out[1] == ':')
			memmove(out, out + 2, strlen(out + 2) + 1);
	}
	return out[0] ? 0 : -EILSEQ;
}

/* Reads and decodes the locators; picks the first parent that exists. */
static int
load_parent(struct vhd_meta *m, vhd_read_fn rd, void *ctx, const char *dir,
	    int (*exists)(const char *), struct td_error *err)
{
	uint8_t *data = NULL;
	char path[4096], full[8192];
	int found = 0, any = 0;

	for (int i = 0; i < 8 && !found; i++) {
		const struct vhd_locator *l = &m->header.loc[i];
		if (l->code != VHD_PLAT_MACX && l->code != VHD_PLAT_W2KU &&
		    l->code != VHD_PLAT_W2RU)
			continue;
		any = 1;
		free(data);
		data = malloc(l->data_len ? l->data_len : 1);
		if (!data)
			return td_error_set(err, ENOMEM, "out of memory");
		if (rd(ctx, data, l->data_len, l->data_offset) < 0 ||
		    locator_decode(l, data, path, sizeof(path)) < 0)
			continue;
		if (path[0] == '/')
			snprintf(full, sizeof(full), "%s", path);
		else
			snprintf(full, sizeof(full), "%s/%s", dir ? dir : ".",
				 path[0] == '.' && path[1] == '/' ? path + 2 : path);
		if (!exists || exists(full)) {
			found = 1;
			m->parent_path = strdup(full);
		}
	}
	free(data);
	if (!any)
		return td_error_set(err, EUCLEAN, "differencing disk without a parent locator");
	if (!found)
		return td_error_set(err, ENOENT, "parent not found (no locator names an existing file)");
	if (!m->parent_path)
		return td_error_set(err, ENOMEM, "out of memory");
	return 0;
}

static int
load_batmap(struct vhd_meta *m, vhd_read_fn rd, void *ctx)
{
	uint8_t sec[VHD_SECTOR];
	uint32_t v = m->footer.creator_version;

	if (memcmp(m->footer.creator_app, "tap", 3) || v <= VHD_VERSION(0, 1))
		return 0;
	m->batmap_hdr_offset = m->header.table_offset +
			       align_up((uint64_t)m->header.max_bat * 4, VHD_SECTOR);
	if (m->batmap_hdr_offset + VHD_SECTOR > m->footer_offset ||
	    rd(ctx, sec, sizeof(sec), m->batmap_hdr_offset) < 0) {
		if (v >= VHD_VERSION(1, 2))
			snprintf(m->warning, sizeof(m->warning), "batmap missing");
		return 0;
	}
	vhd_batmap_hdr_decode(sec, &m->batmap_hdr);
	const struct vhd_batmap_hdr *b = &m->batmap_hdr;
	uint64_t need = align_up((m->header.max_bat + 7) / 8, VHD_SECTOR) / VHD_SECTOR;
	if (memcmp(b->cookie, batmap_cookie, 8) || b->version > VHD_BATMAP_VERSION) {
		if (v >= VHD_VERSION(1, 2))
			snprintf(m->warning, sizeof(m->warning), "batmap header invalid");
		return 0;
	}
	if (b->size < need || b->size > need + 64 || b->offset % VHD_SECTOR ||
	    b->offset < m->batmap_hdr_offset + VHD_SECTOR ||
	    b->offset + (uint64_t)b->size * VHD_SECTOR > m->footer_offset) {
		snprintf(m->warning, sizeof(m->warning), "batmap out of place");
		return 0;
	}
	m->batmap = calloc(b->size, VHD_SECTOR);
	if (!m->batmap)
		return -ENOMEM;
	if (rd(ctx, m->batmap, (size_t)b->size * VHD_SECTOR, b->offset) < 0) {
		free(m->batmap);
		m->batmap = NULL;
		snprintf(m->warning, sizeof(m->warning), "batmap unreadable");
		return 0;
	}
	m->has_batmap = 1;
	size_t n = batmap_sum_len(m);
	uint32_t sum = 0;
	for (size_t i = 0; i < n; i++)	/* version 1.1 summed signed bytes */
		sum += b->version == VHD_VERSION(1, 1) ? (uint32_t)(int8_t)m->batmap[i]
						       : m->batmap[i];
	if (~sum != b->checksum) {
		/* a stale batmap is only an optimisation lost: rebuilt on the next write */
		memset(m->batmap, 0, (size_t)b->size * VHD_SECTOR);
		m->batmap_stale = 1;
		snprintf(m->warning, sizeof(m->warning), "batmap checksum mismatch (ignored)");
	}
	/* a "full" bit on an unallocated block would skip a bitmap that is not there */
	for (uint32_t blk = 0; blk < m->header.max_bat; blk++)
		if (m->bat[blk] == VHD_BAT_UNUSED && vhd_batmap_test(m, blk))
			vhd_batmap_set(m, blk, 0);
	return 0;
}

/* Bytes the BAT takes in the file: whole sectors. */
static uint64_t
bat_size(const struct vhd_meta *m)
{
	return align_up((uint64_t)m->header.max_bat * 4, VHD_SECTOR);
}

/* The footer at the end of the file: decoded, and the disk it describes checked. */
static int
load_footer(struct vhd_meta *m, vhd_read_fn rd, void *ctx, struct td_error *err)
{
	uint8_t buf[VHD_FOOTER_SIZE];
	char why[128];
	int rc;

	if (m->file_size < VHD_FOOTER_SIZE || m->file_size % VHD_SECTOR)
		FAIL("file size %ju is not a whole number of sectors holding a footer",
		     (uintmax_t)m->file_size);
	m->footer_offset = m->file_size - VHD_FOOTER_SIZE;
	if ((rc = rd(ctx, buf, VHD_FOOTER_SIZE, m->footer_offset)) < 0)
		return td_error_set(err, -rc, "cannot read the footer: %s", strerror(-rc));
	if (vhd_footer_decode(buf, &m->footer, why, sizeof(why)) < 0) {
		/* a backup footer at offset 0 means repair can restore it */
		struct vhd_footer backup;
		if (rd(ctx, buf, VHD_FOOTER_SIZE, 0) == 0 &&
		    vhd_footer_decode(buf, &backup, why + 64, sizeof(why) - 64) == 0)
			FAIL("%s at the end of the file; the backup at offset 0 is intact "
			     "(vhd-util repair restores it)", why);
		FAIL("%s", why);
	}
	const struct vhd_footer *f = &m->footer;
	if (!(f->features & 2) || f->version != VHD_VERSION(1, 0))
		FAIL("unsupported footer (features %#x, version %#x)", f->features, f->version);
	if (f->type != VHD_TYPE_FIXED && f->type != VHD_TYPE_DYNAMIC && f->type != VHD_TYPE_DIFF)
		FAIL("unsupported disk type %u", f->type);
	if (!memcmp(f->creator_app, "tap", 3) && f->creator_version <= VHD_VERSION(0, 1) &&
	    f->type != VHD_TYPE_FIXED)
		FAIL("tapdisk 0.1 image (little-endian bitmaps) is not supported");
	m->size = vhd_footer_size(f);
	if (m->size > VHD_MAX_SIZE || f->curr_size > VHD_MAX_SIZE)
		FAIL("virtual size %ju is beyond the VHD limit of 2040 GiB", (uintmax_t)f->curr_size);
	if (m->size % VHD_SECTOR || f->curr_size % VHD_SECTOR)
		FAIL("virtual size %ju is not a whole number of sectors", (uintmax_t)f->curr_size);
	if (m->size > f->curr_size) {
		/* qemu's CHS rounding may say more than the disk holds: trust the bytes */
		m->size = f->curr_size;
	}
	if (f->type != VHD_TYPE_FIXED)
		return 0;
	if (f->data_offset != VHD_NO_OFFSET)
		FAIL("fixed disk with a data offset");
	if (m->footer_offset < f->curr_size)
		FAIL("fixed disk of %ju bytes in a file of %ju", (uintmax_t)f->curr_size,
		     (uintmax_t)m->file_size);
	m->meta_end = m->footer_offset;
	return 0;
fail:
	return -err->code;
}

/* A dynamic or differencing disk's header, and the geometry it gives. */
static int
load_dynamic_header(struct vhd_meta *m, vhd_read_fn rd, void *ctx, struct td_error *err)
{
	const struct vhd_footer *f = &m->footer;
	struct vhd_header *h = &m->header;
	uint8_t buf[VHD_HEADER_SIZE];
	char why[128];
	int rc;

	if (f->data_offset < VHD_FOOTER_SIZE || f->data_offset % VHD_SECTOR ||
	    f->data_offset > m->footer_offset - VHD_HEADER_SIZE || m->footer_offset < VHD_HEADER_SIZE)
		FAIL("dynamic header offset %ju out of place", (uintmax_t)f->data_offset);
	if ((rc = rd(ctx, buf, VHD_HEADER_SIZE, f->data_offset)) < 0)
		return td_error_set(err, -rc, "cannot read the header: %s", strerror(-rc));
	if (vhd_header_decode(buf, h, why, sizeof(why)) < 0)
		FAIL("%s", why);
	if (h->version != VHD_VERSION(1, 0) || h->data_offset != VHD_NO_OFFSET)
		FAIL("unsupported dynamic header (version %#x)", h->version);
	if (h->block_size < VHD_BLOCK_MIN || h->block_size > VHD_BLOCK_MAX ||
	    (h->block_size & (h->block_size - 1)))
		FAIL("block size %u is not a power of two between 4 KiB and 256 MiB",
		     h->block_size);
	m->spb = h->block_size / VHD_SECTOR;
	m->bitmap_bytes = (uint32_t)align_up((m->spb + 7) / 8, VHD_SECTOR);
	m->nr_blocks = (uint32_t)((f->curr_size + h->block_size - 1) / h->block_size);
	if (h->max_bat < m->nr_blocks)
		FAIL("BAT of %u entries cannot map %ju bytes", h->max_bat, (uintmax_t)f->curr_size);
	if (h->max_bat > VHD_MAX_SIZE / h->block_size + 1)
		FAIL("BAT of %u entries is absurd", h->max_bat);
	uint64_t bat_bytes = bat_size(m);
	if (h->table_offset % VHD_SECTOR || h->table_offset < VHD_FOOTER_SIZE ||
	    h->table_offset > m->footer_offset || bat_bytes > m->footer_offset - h->table_offset)
		FAIL("BAT at %ju does not fit in the file", (uintmax_t)h->table_offset);
	if (h->table_offset < f->data_offset + VHD_HEADER_SIZE &&
	    h->table_offset + bat_bytes > f->data_offset)
		FAIL("BAT overlaps the dynamic header");
	if (f->type == VHD_TYPE_DYNAMIC && !is_nil(h->parent_uuid))
		FAIL("dynamic disk names a parent");
	return 0;
fail:
	return -err->code;
}

/* The block allocation table, then the batmap if there is one. */
static int
load_bat(struct vhd_meta *m, vhd_read_fn rd, void *ctx, struct td_error *err)
{
	const struct vhd_header *h = &m->header;
	uint64_t bat_bytes = bat_size(m);
	uint8_t *raw = malloc(bat_bytes);
	int rc;

	m->bat = malloc((size_t)h->max_bat * sizeof(*m->bat));
	if (!raw || !m->bat) {
		free(raw);
		return td_error_set(err, ENOMEM, "out of memory for a BAT of %u entries",
				    h->max_bat);
	}
	if ((rc = rd(ctx, raw, bat_bytes, h->table_offset)) < 0) {
		free(raw);
		return td_error_set(err, -rc, "cannot read the BAT: %s", strerror(-rc));
	}
	for (uint32_t i = 0; i < h->max_bat; i++)
		m->bat[i] = get_be32(raw + 4 * (size_t)i);
	free(raw);
	if (load_batmap(m, rd, ctx) < 0)
		return td_error_set(err, ENOMEM, "out of memory");
	return 0;
}

/*
 * Every region of the file (headers, tables, locators, blocks) in place and
 * none overlapping another; m->meta_end is where the last one ends.
 */
static int
check_layout(struct vhd_meta *m, struct td_error *err)
{
	const struct vhd_footer *f = &m->footer;
	const struct vhd_header *h = &m->header;
	uint64_t bat_bytes = bat_size(m);
	size_t nr = 0, cap = (size_t)h->max_bat + 16;
	struct range *ranges = malloc(cap * sizeof(*ranges));

	if (!ranges)
		return td_error_set(err, ENOMEM, "out of memory");
	if (f->data_offset >= VHD_FOOTER_SIZE)
		ranges[nr++] = (struct range){ 0, VHD_FOOTER_SIZE, "the backup footer", 0 };
	ranges[nr++] = (struct range){ f->data_offset, f->data_offset + VHD_HEADER_SIZE,
				       "the dynamic header", 0 };
	ranges[nr++] = (struct range){ h->table_offset, h->table_offset + bat_bytes, "the BAT", 0 };
	if (m->has_batmap) {
		ranges[nr++] = (struct range){ m->batmap_hdr_offset, m->batmap_hdr_offset + VHD_SECTOR,
					       "the batmap header", 0 };
		ranges[nr++] = (struct range){ m->batmap_hdr.offset, m->batmap_hdr.offset +
					       (uint64_t)m->batmap_hdr.size * VHD_SECTOR,
					       "the batmap", 0 };
	}
	if (f->type == VHD_TYPE_DIFF) {
		for (int i = 0; i < 8; i++) {
			const struct vhd_locator *l = &h->loc[i];
			if (l->code == VHD_PLAT_NONE)
				continue;
			uint64_t space = locator_space(l);
			if (!space || space > VHD_MAX_LOCATOR || l->data_len > space ||
			    l->data_offset % VHD_SECTOR || l->data_offset > m->footer_offset ||
			    space > m->footer_offset - l->data_offset)
				FAIL("parent locator %d out of place", i);
			ranges[nr++] = (struct range){ l->data_offset, l->data_offset + space,
						       "a parent locator", 0 };
		}
	}
	uint64_t block_span = m->bitmap_bytes + (uint64_t)h->block_size;
	for (uint32_t i = 0; i < h->max_bat; i++) {
		if (m->bat[i] == VHD_BAT_UNUSED)
			continue;
		if (i >= m->nr_blocks)
			FAIL("BAT entry %u is allocated beyond the disk's size", i);
		uint64_t start = (uint64_t)m->bat[i] * VHD_SECTOR;
		if (start > m->footer_offset || block_span > m->footer_offset - start)
			FAIL("BAT entry %u points past the end of the file", i);
		ranges[nr++] = (struct range){ start, start + block_span, NULL, i };
	}
	qsort(ranges, nr, sizeof(*ranges), range_cmp);
	for (size_t i = 1; i < nr; i++) {
		const struct range *a = &ranges[i - 1], *b = &ranges[i];
		if (b->start < a->end) {
			if (!a->what && !b->what)
				FAIL("blocks %u and %u overlap", a->block, b->block);
			if (!a->what || !b->what)
				FAIL("block %u overlaps %s", a->what ? b->block : a->block,
				     a->what ? a->what : b->what);
			FAIL("%s overlaps %s", a->what, b->what);
		}
	}
	m->meta_end = nr ? ranges[nr - 1].end : 0;
	free(ranges);
	return 0;
fail:
	free(ranges);
	return -err->code;
}

int
vhd_meta_load(struct vhd_meta *m, vhd_read_fn rd, void *ctx, uint64_t file_size,
	      const char *dir, int (*exists)(const char *path), struct td_error *err)
{
	memset(m, 0, sizeof(*m));
	m->file_size = file_size;
	if (load_footer(m, rd, ctx, err) < 0)
		goto fail;
	if (m->footer.type == VHD_TYPE_FIXED)
		return 0;
	if (load_dynamic_header(m, rd, ctx, err) < 0 || load_bat(m, rd, ctx, err) < 0 ||
	    check_layout(m, err) < 0)
		goto fail;
	if (m->footer.type == VHD_TYPE_DIFF) {
		m->parent_raw = is_nil(m->header.parent_uuid);
		if (load_parent(m, rd, ctx, dir, exists, err) < 0)
			goto fail;
	}
	return 0;
fail:
	vhd_meta_free(m);
	return -err->code;
}

void
vhd_meta_free(struct vhd_meta *m)
{
	free(m->bat);
	free(m->batmap);
	free(m->parent_path);
	m->bat = NULL;
	m->batmap = NULL;
	m->parent_path = NULL;
}

int
vhd_meta_check_blocks(const struct vhd_meta *m, vhd_read_fn rd, void *ctx, char *out,
		      size_t outlen)
{
	int problems = 0;
	size_t used = 0;
	uint8_t *map;

	out[0] = '\0';
#define PROBLEM(...) do { \
		problems++; \
		if (used < outlen) { \
			int n_ = snprintf(out + used, outlen - used, __VA_ARGS__); \
			if (n_ > 0) used += (size_t)n_; \
		} \
	} while (0)

	if (m->footer.type == VHD_TYPE_FIXED)
		return 0;
	map = malloc(m->bitmap_bytes);
	if (!map) {
		PROBLEM("out of memory\n");
		return problems;
	}
	for (uint32_t blk = 0; blk < m->nr_blocks; blk++) {
		if (m->bat[blk] == VHD_BAT_UNUSED)
			continue;
		if (rd(ctx, map, m->bitmap_bytes, vhd_block_offset(m, blk)) < 0) {
			PROBLEM("block %u: bitmap unreadable\n", blk);
			continue;
		}
		if (!vhd_batmap_test(m, blk))
			continue;
		for (uint32_t s = 0; s < m->spb; s++) {
			if (!vhd_bitmap_test(map, s)) {
				PROBLEM("block %u: batmap says full, bitmap disagrees\n", blk);
				break;
			}
		}
	}
	free(map);
	if (m->warning[0])
		PROBLEM("%s\n", m->warning);
	return problems;
#undef PROBLEM
}

/* ---- creating ---- */

struct locator_text {
	uint32_t code;
	uint8_t data[8192];
	size_t len;
};

/* The path of parent relative to the directory of child ("./p.vhd", "../d/p.vhd"). */
static int
relative_path(const char *parent, const char *child, char *out, size_t outlen)
{
	size_t common = 0, i;
	/* the longest common directory prefix */
	for (i = 0; parent[i] && parent[i] == child[i]; i++)
		if (parent[i] == '/')
			common = i + 1;
	size_t n = 0;
	int ups = 0;
	for (const char *p = child + common; *p; p++)
		if (*p == '/')
			ups++;
	if (!ups)
		n = (size_t)snprintf(out, outlen, "./");
	else
		out[0] = '\0';
	for (int u = 0; u < ups && n < outlen; u++)
		n += (size_t)snprintf(out + n, outlen - n, "../");
	if (n >= outlen || (size_t)snprintf(out + n, outlen - n, "%s", parent + common) >= outlen - n)
		return -ENAMETOOLONG;
	return 0;
}

static int
make_locators(const char *parent_path, const char *child_path, struct locator_text loc[3])
{
	char rel[4096], win[4096 + 8];
	int rc;

	rc = relative_path(parent_path, child_path, rel, sizeof(rel));
	if (rc < 0)
		return rc;
	loc[0].code = VHD_PLAT_MACX;
	loc[0].len = (size_t)snprintf((char *)loc[0].data, sizeof(loc[0].data), "file://%s", rel);
	if (loc[0].len >= sizeof(loc[0].data))
		return -ENAMETOOLONG;
	/* Windows form: ".\name" with backslashes */
	snprintf(win, sizeof(win), ".\\%s", strncmp(rel, "./", 2) ? rel : rel + 2);
	for (char *p = win; *p; p++)
		if (*p == '/')
			*p = '\\';
	for (int i = 1; i < 3; i++) {
		loc[i].code = i == 1 ? VHD_PLAT_W2KU : VHD_PLAT_W2RU;
		rc = vhd_utf8_to_utf16(win, 0, loc[i].data, sizeof(loc[i].data), &loc[i].len);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* The header's parent name: the parent's file name, UTF-16BE. */
static int
parent_name16(const char *parent_path, uint8_t name16[512], struct td_error *err)
{
	const char *base = strrchr(parent_path, '/');
	size_t n = 0;
	int rc;

	base = base ? base + 1 : parent_path;
	memset(name16, 0, 512);
	rc = vhd_utf8_to_utf16(base, 1, name16, 512, &n);
	if (rc == -ENAMETOOLONG)
		return td_error_set(err, -rc, "parent name too long for the header");
	if (rc < 0)	/* e.g. no iconv module for UTF-16 on this host */
		return td_error_set(err, -rc, "cannot encode the parent name as UTF-16: %s",
				    strerror(-rc));
	return 0;
}

int
vhd_header_reparent(struct vhd_header *h, const char *child_path, const char *parent_path,
		    const uint8_t uuid[16], uint32_t ts, uint8_t *texts[8], struct td_error *err)
{
	struct locator_text *loc = calloc(3, sizeof(*loc));
	int rc;

	for (int i = 0; i < 8; i++)
		texts[i] = NULL;
	if (!loc)
		return td_error_set(err, ENOMEM, "out of memory");
	if ((rc = parent_name16(parent_path, h->parent_name, err)) < 0)
		goto out;
	if ((rc = make_locators(parent_path, child_path, loc)) < 0) {
		rc = td_error_set(err, -rc, "parent path too long for a locator");
		goto out;
	}
	for (int i = 0; i < 8; i++) {
		struct vhd_locator *l = &h->loc[i];
		const struct locator_text *t = NULL;
		for (int k = 0; k < 3; k++)
			if (loc[k].code == l->code)
				t = &loc[k];
		if (!t)
			continue;
		uint64_t space = locator_space(l);
		if (t->len > space) {
			rc = td_error_set(err, ENOSPC, "the parent locator has room for %ju bytes, "
					  "the new parent's path needs %zu", (uintmax_t)space, t->len);
			goto out;
		}
		if (!(texts[i] = calloc(1, space))) {
			rc = td_error_set(err, ENOMEM, "out of memory");
			goto out;
		}
		memcpy(texts[i], t->data, t->len);
		l->data_len = (uint32_t)t->len;
	}
	memcpy(h->parent_uuid, uuid, 16);
	h->parent_ts = ts;
	rc = 0;
out:
	if (rc < 0)
		for (int i = 0; i < 8; i++) {
			free(texts[i]);
			texts[i] = NULL;
		}
	free(loc);
	return rc;
}

int
vhd_create_write(const struct vhd_create *c, vhd_write_fn wr, void *ctx, struct td_error *err)
{
	struct vhd_footer f = { 0 };
	struct vhd_header h = { 0 };
	struct vhd_batmap_hdr bh = { 0 };
	struct locator_text *loc = NULL;
	uint8_t fbuf[VHD_FOOTER_SIZE], hbuf[VHD_HEADER_SIZE], *buf = NULL;
	uint32_t block = c->block_size ? c->block_size : VHD_BLOCK_DEFAULT;
	uint64_t max = c->max_size > c->size ? c->max_size : c->size;
	int rc;

	if (!c->size || c->size % VHD_SECTOR)
		return td_error_set(err, EINVAL, "size %ju is not a whole number of sectors",
				    (uintmax_t)c->size);
	if (c->size > VHD_MAX_SIZE || max > VHD_MAX_SIZE)
		return td_error_set(err, EFBIG, "size %ju is beyond the VHD limit of 2040 GiB",
				    (uintmax_t)max);
	memcpy(f.cookie, footer_cookie, 8);
	f.features = 2;
	f.version = VHD_VERSION(1, 0);
	f.timestamp = vhd_time((uint64_t)time(NULL));
	memcpy(f.creator_app, "tap\0", 4);
	f.creator_version = VHD_TAP_VERSION;
	f.orig_size = f.curr_size = c->size;
	vhd_geometry(c->size, &f.cyls, &f.heads, &f.spt);
	f.type = (uint32_t)c->type;
	if (c->uuid)
		memcpy(f.uuid, c->uuid, 16);
	else
		uuid_generate(f.uuid);

	if (c->type == VHD_TYPE_FIXED) {
		f.data_offset = VHD_NO_OFFSET;
		vhd_footer_encode(&f, fbuf);
		rc = wr(ctx, fbuf, VHD_FOOTER_SIZE, c->size);
		return rc < 0 ? td_error_set(err, -rc, "cannot write: %s", strerror(-rc)) : 0;
	}

	f.data_offset = VHD_FOOTER_SIZE;
	memcpy(h.cookie, header_cookie, 8);
	h.data_offset = VHD_NO_OFFSET;
	h.table_offset = VHD_FOOTER_SIZE + VHD_HEADER_SIZE;
	h.version = VHD_VERSION(1, 0);
	h.block_size = block;
	h.max_bat = (uint32_t)((max + block - 1) / block);
	uint64_t bat_bytes = align_up((uint64_t)h.max_bat * 4, VHD_SECTOR);

	memcpy(bh.cookie, batmap_cookie, 8);
	uint64_t bh_off = h.table_offset + bat_bytes;
	bh.offset = bh_off + VHD_SECTOR;
	bh.size = (uint32_t)(align_up((h.max_bat + 7) / 8, VHD_SECTOR) / VHD_SECTOR);
	bh.version = VHD_BATMAP_VERSION;
	uint64_t end = bh.offset + (uint64_t)bh.size * VHD_SECTOR;

	if (c->type == VHD_TYPE_DIFF) {
		if ((rc = parent_name16(c->parent_path, h.parent_name, err)) < 0)
			return rc;
		if (c->parent_uuid)
			memcpy(h.parent_uuid, c->parent_uuid, 16);
		h.parent_ts = c->parent_ts;
		loc = calloc(3, sizeof(*loc));
		if (!loc)
			return td_error_set(err, ENOMEM, "out of memory");
		rc = make_locators(c->parent_path, c->child_path, loc);
		if (rc < 0) {
			free(loc);
			return td_error_set(err, -rc, "parent path too long for a locator");
		}
		for (int i = 0; i < 3; i++) {
			uint64_t space = align_up(loc[i].len, VHD_SECTOR);
			h.loc[i].code = loc[i].code;
			h.loc[i].data_space = (uint32_t)space;	/* bytes, as blktap writes */
			h.loc[i].data_len = (uint32_t)loc[i].len;
			h.loc[i].data_offset = end;
			end += space;
		}
	}

	/* metadata, zeroed BAT and batmap, locators, then the footers */
	size_t meta = (size_t)(end - h.table_offset);
	buf = calloc(1, meta);
	if (!buf) {
		free(loc);
		return td_error_set(err, ENOMEM, "out of memory");
	}
	memset(buf, 0xff, (size_t)((uint64_t)h.max_bat * 4));
	bh.checksum = vhd_batmap_checksum(buf + (bh.offset - h.table_offset),
					  (size_t)align_up(c->size >> 24 ? c->size >> 24 : 1, VHD_SECTOR));
	vhd_batmap_hdr_encode(&bh, buf + (bh_off - h.table_offset));
	for (int i = 0; loc && i < 3; i++)
		memcpy(buf + (h.loc[i].data_offset - h.table_offset), loc[i].data, loc[i].len);
	free(loc);
	vhd_header_encode(&h, hbuf);
	vhd_footer_encode(&f, fbuf);
	if ((rc = wr(ctx, buf, meta, h.table_offset)) < 0 ||
	    (rc = wr(ctx, hbuf, VHD_HEADER_SIZE, VHD_FOOTER_SIZE)) < 0 ||
	    (rc = wr(ctx, fbuf, VHD_FOOTER_SIZE, 0)) < 0 ||
	    (rc = wr(ctx, fbuf, VHD_FOOTER_SIZE, end)) < 0) {
		free(buf);
		return td_error_set(err, -rc, "cannot write: %s", strerror(-rc));
	}
	free(buf);
	return 0;
}
