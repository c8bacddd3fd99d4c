/*
 * qcow2 structures: the header and its extensions, L1/L2/refcount entries,
 * loading a file's metadata with every structural check the driver relies
 * on (an image that passes cannot make the driver read or write outside the
 * file's clusters, nor allocate without bound), counting references and
 * writing fresh refcount structures. Format facts: qemu's
 * docs/interop/qcow2.txt.
 */
#include "qcow2_format.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "byteorder.h"

#ifndef EUCLEAN
#define EUCLEAN EINVAL
#endif

#define FAIL(...) do { td_error_set(err, EUCLEAN, __VA_ARGS__); goto fail; } while (0)

static uint64_t
align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

static uint64_t
div_up(uint64_t v, uint64_t d)
{
	return v / d + (v % d != 0);
}

/* ---- the header ---- */

int
qcow2_header_decode(const uint8_t *b, size_t len, struct qcow2_header *h, char *why,
		    size_t whylen)
{
	memset(h, 0, sizeof(*h));
	if (len < QCOW2_V2_HEADER) {
		snprintf(why, whylen, "file too short for a qcow2 header");
		return -EUCLEAN;
	}
	h->magic = get_be32(b);
	h->version = get_be32(b + 4);
	h->backing_file_offset = qcow2_be64(b + 8);
	h->backing_file_size = get_be32(b + 16);
	h->cluster_bits = get_be32(b + 20);
	h->size = qcow2_be64(b + 24);
	h->crypt_method = get_be32(b + 32);
	h->l1_size = get_be32(b + 36);
	h->l1_table_offset = qcow2_be64(b + 40);
	h->refcount_table_offset = qcow2_be64(b + 48);
	h->refcount_table_clusters = get_be32(b + 56);
	h->nb_snapshots = get_be32(b + 60);
	h->snapshots_offset = qcow2_be64(b + 64);
	if (h->magic != QCOW2_MAGIC) {
		snprintf(why, whylen, "not a qcow2 image (bad magic)");
		return -EUCLEAN;
	}
	if (h->version != 2 && h->version != 3) {
		snprintf(why, whylen, "unsupported qcow2 version %u", h->version);
		return -EUCLEAN;
	}
	if (h->version == 2) {
		h->refcount_order = 4;
		h->header_length = QCOW2_V2_HEADER;
		return 0;
	}
	if (len < QCOW2_V3_HEADER) {
		snprintf(why, whylen, "file too short for a version 3 header");
		return -EUCLEAN;
	}
	h->incompatible_features = qcow2_be64(b + 72);
	h->compatible_features = qcow2_be64(b + 80);
	h->autoclear_features = qcow2_be64(b + 88);
	h->refcount_order = get_be32(b + 96);
	h->header_length = get_be32(b + 100);
	if (h->header_length > QCOW2_V3_HEADER && len > QCOW2_V3_HEADER)
		h->compression_type = b[104];
	return 0;
}

void
qcow2_header_encode(const struct qcow2_header *h, uint8_t b[QCOW2_V3_HEADER])
{
	memset(b, 0, QCOW2_V3_HEADER);
	qcow2_put32(b, h->magic);
	qcow2_put32(b + 4, h->version);
	qcow2_put64(b + 8, h->backing_file_offset);
	qcow2_put32(b + 16, h->backing_file_size);
	qcow2_put32(b + 20, h->cluster_bits);
	qcow2_put64(b + 24, h->size);
	qcow2_put32(b + 32, h->crypt_method);
	qcow2_put32(b + 36, h->l1_size);
	qcow2_put64(b + 40, h->l1_table_offset);
	qcow2_put64(b + 48, h->refcount_table_offset);
	qcow2_put32(b + 56, h->refcount_table_clusters);
	qcow2_put32(b + 60, h->nb_snapshots);
	qcow2_put64(b + 64, h->snapshots_offset);
	qcow2_put64(b + 72, h->incompatible_features);
	qcow2_put64(b + 80, h->compatible_features);
	qcow2_put64(b + 88, h->autoclear_features);
	qcow2_put32(b + 96, h->refcount_order);
	qcow2_put32(b + 100, h->header_length);
}

/* ---- loading ---- */

static int
ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

const char *
qcow2_overlaps_meta(const struct qcow2_meta *m, uint64_t off, uint64_t len)
{
	if (ranges_overlap(off, len, 0, m->cluster_size))
		return "header";
	if (m->h.l1_size &&
	    ranges_overlap(off, len, m->h.l1_table_offset, (uint64_t)m->h.l1_size * 8))
		return "L1 table";
	if (ranges_overlap(off, len, m->h.refcount_table_offset,
			   (uint64_t)m->h.refcount_table_clusters * m->cluster_size))
		return "refcount table";
	return NULL;
}

static int
check_geometry(struct qcow2_meta *m, struct td_error *err)
{
	const struct qcow2_header *h = &m->h;

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return td_error_set(err, EUCLEAN, "cluster size 2^%u is not between 512 B and 2 MiB",
				    h->cluster_bits);
	m->cluster_bits = h->cluster_bits;
	m->cluster_size = 1u << h->cluster_bits;
	m->l2_bits = m->cluster_bits - 3;
	m->l2_entries = 1u << m->l2_bits;
	if (h->version == 3 && (h->header_length < QCOW2_V3_HEADER || h->header_length % 8 ||
				h->header_length > m->cluster_size))
		return td_error_set(err, EUCLEAN, "header length %u is invalid", h->header_length);
	if (h->refcount_order > 6)
		return td_error_set(err, EUCLEAN, "refcount order %u is over 6", h->refcount_order);
	m->refcount_bits = 1u << h->refcount_order;
	m->rb_bits = m->cluster_bits + 3 - h->refcount_order;
	m->rb_entries = 1ULL << m->rb_bits;
	if (h->size > (1ULL << 61))
		return td_error_set(err, EUCLEAN, "virtual size %ju is too large",
				    (uintmax_t)h->size);
	uint64_t clusters = div_up(h->size, m->cluster_size);
	uint64_t need = div_up(clusters, m->l2_entries);
	if ((uint64_t)h->l1_size * 8 > QCOW2_MAX_L1_BYTES)
		return td_error_set(err, EUCLEAN, "L1 table of %u entries is too large", h->l1_size);
	if (h->l1_size < need)
		return td_error_set(err, EUCLEAN,
				    "L1 table of %u entries is too small for the virtual size %ju",
				    h->l1_size, (uintmax_t)h->size);
	return 0;
}

static int
check_tables(struct qcow2_meta *m, struct td_error *err)
{
	const struct qcow2_header *h = &m->h;
	uint64_t cs = m->cluster_size;

	if (h->l1_size) {
		if (h->l1_table_offset % cs || h->l1_table_offset == 0)
			return td_error_set(err, EUCLEAN, "L1 table offset %#jx is invalid",
					    (uintmax_t)h->l1_table_offset);
		if (h->l1_table_offset > m->file_size ||
		    (uint64_t)h->l1_size * 8 > m->file_size - h->l1_table_offset)
			return td_error_set(err, EUCLEAN, "L1 table lies past the end of the file");
	}
	if (h->refcount_table_offset % cs || h->refcount_table_offset == 0)
		return td_error_set(err, EUCLEAN, "refcount table offset %#jx is invalid",
				    (uintmax_t)h->refcount_table_offset);
	uint64_t rt_len = (uint64_t)h->refcount_table_clusters * cs;
	if (h->refcount_table_clusters == 0 || rt_len > QCOW2_MAX_REFTABLE_BYTES)
		return td_error_set(err, EUCLEAN, "refcount table of %u clusters is invalid",
				    h->refcount_table_clusters);
	if (h->refcount_table_offset > m->file_size ||
	    rt_len > m->file_size - h->refcount_table_offset)
		return td_error_set(err, EUCLEAN, "refcount table lies past the end of the file");
	if (h->l1_size && ranges_overlap(h->l1_table_offset, (uint64_t)h->l1_size * 8,
					 h->refcount_table_offset, rt_len))
		return td_error_set(err, EUCLEAN, "L1 table and refcount table overlap");
	m->reftable_entries = (uint32_t)(rt_len / 8);
	if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
		return td_error_set(err, EUCLEAN, "%u internal snapshots are too many",
				    h->nb_snapshots);
	if (h->nb_snapshots && (h->snapshots_offset % cs || h->snapshots_offset == 0 ||
				h->snapshots_offset >= m->file_size))
		return td_error_set(err, EUCLEAN, "snapshot table offset %#jx is invalid",
				    (uintmax_t)h->snapshots_offset);
	return 0;
}

static int
ext_bitmaps(struct qcow2_meta *m, const uint8_t *d, uint32_t len, struct td_error *err)
{
	if (len < 24)
		return td_error_set(err, EUCLEAN, "bitmaps extension is too short");
	m->nb_bitmaps = get_be32(d);
	m->bitmap_dir_size = qcow2_be64(d + 8);
	m->bitmap_dir_offset = qcow2_be64(d + 16);
	if (!(m->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;	/* inconsistent: qemu ignores them, so do we */
	if (m->nb_bitmaps == 0 || m->nb_bitmaps > QCOW2_MAX_BITMAPS || get_be32(d + 4) ||
	    m->bitmap_dir_size > QCOW2_MAX_BITMAP_DIR || m->bitmap_dir_size == 0 ||
	    m->bitmap_dir_offset % m->cluster_size || m->bitmap_dir_offset == 0 ||
	    m->bitmap_dir_offset > m->file_size ||
	    m->bitmap_dir_size > m->file_size - m->bitmap_dir_offset)
		return td_error_set(err, EUCLEAN, "bitmaps extension is invalid");
	m->has_bitmaps = 1;
	return 0;
}

static int
ext_features(struct qcow2_meta *m, const uint8_t *d, uint32_t len, struct td_error *err)
{
	unsigned n = len / 48;

	if (!n || m->features)
		return 0;
	m->features = calloc(n, sizeof(*m->features));
	if (!m->features)
		return td_error_set(err, ENOMEM, "out of memory");
	for (unsigned i = 0; i < n; i++) {
		m->features[i].type = d[48 * i];
		m->features[i].bit = d[48 * i + 1];
		memcpy(m->features[i].name, d + 48 * i + 2, 46);
		m->features[i].name[46] = '\0';
	}
	m->nr_features = n;
	return 0;
}

/* Walks the header extensions in cluster 0 (hdr: its first len bytes). */
static int
read_extensions(struct qcow2_meta *m, const uint8_t *hdr, uint64_t len, struct td_error *err)
{
	uint64_t off = m->h.header_length, end = len;
	int rc;

	if (m->h.backing_file_offset && m->h.backing_file_offset < end)
		end = m->h.backing_file_offset;
	while (off + 8 <= end) {
		uint32_t type = get_be32(hdr + off), elen = get_be32(hdr + off + 4);
		const uint8_t *d = hdr + off + 8;
		if (type == QCOW2_EXT_END)
			break;
		if (elen > end - off - 8)
			return td_error_set(err, EUCLEAN,
					    "header extension %#x overruns the header", type);
		switch (type) {
		case QCOW2_EXT_BACKING_FMT:
			if (elen >= sizeof(m->backing_fmt) || memchr(d, 0, elen))
				return td_error_set(err, EUCLEAN, "backing format name is invalid");
			memcpy(m->backing_fmt, d, elen);
			m->backing_fmt[elen] = '\0';
			break;
		case QCOW2_EXT_FEATURES:
			if ((rc = ext_features(m, d, elen, err)) < 0)
				return rc;
			break;
		case QCOW2_EXT_BITMAPS:
			if ((rc = ext_bitmaps(m, d, elen, err)) < 0)
				return rc;
			break;
		default:
			break;	/* kept as it is: we never rewrite the header cluster */
		}
		off += 8 + align_up(elen, 8);
	}
	m->ext_end = (uint32_t)(off < end ? off : end);
	return 0;
}

static const char *
feature_name(const struct qcow2_meta *m, unsigned type, unsigned bit)
{
	for (unsigned i = 0; i < m->nr_features; i++)
		if (m->features[i].type == type && m->features[i].bit == bit && m->features[i].name[0])
			return m->features[i].name;
	return NULL;
}

/* Features this code cannot serve, named. */
static int
check_features(const struct qcow2_meta *m, int rdonly, struct td_error *err)
{
	const struct qcow2_header *h = &m->h;
	uint64_t known = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE |
			 QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2;
	uint64_t unknown = h->incompatible_features & ~known;

	if (unknown) {
		unsigned bit = (unsigned)__builtin_ctzll(unknown);
		const char *name = feature_name(m, 0, bit);
		return td_error_set(err, ENOTSUP, "unknown incompatible feature %s%s%s(bit %u)",
				    name ? "'" : "", name ? name : "", name ? "' " : "", bit);
	}
	if (h->crypt_method == 1)
		return td_error_set(err, ENOTSUP, "encryption (AES) is not supported");
	if (h->crypt_method == 2)
		return td_error_set(err, ENOTSUP, "encryption (LUKS) is not supported");
	if (h->crypt_method)
		return td_error_set(err, EUCLEAN, "unknown encryption method %u", h->crypt_method);
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
		return td_error_set(err, ENOTSUP, "external data files are not supported");
	if (h->incompatible_features & QCOW2_INCOMPAT_EXTL2)
		return td_error_set(err, ENOTSUP,
				    "extended L2 entries (subclusters) are not supported");
	if (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
		if (h->compression_type == 1)
			return td_error_set(err, ENOTSUP, "zstd compression is not supported");
		return td_error_set(err, EUCLEAN, "compression type %u is invalid",
				    h->compression_type);
	}
	if (h->compression_type)
		return td_error_set(err, EUCLEAN, "compression type %u without its feature bit",
				    h->compression_type);
	if (rdonly)
		return 0;
	if (h->incompatible_features & QCOW2_INCOMPAT_CORRUPT)
		return td_error_set(err, EROFS, "the image is marked corrupt (qemu-img check -r "
				    "all repairs it); it can only be opened read-only");
	if (h->nb_snapshots)
		return td_error_set(err, EROFS, "the image has internal snapshots (%u); it can "
				    "only be opened read-only", h->nb_snapshots);
	/* writing would make them inconsistent, and qemu then counts them as leaks */
	if (m->has_bitmaps)
		return td_error_set(err, EROFS, "the image has persistent dirty bitmaps (%u), which "
				    "are not maintained here; open it read-only, or remove them "
				    "(qemu-img bitmap --remove)", m->nb_bitmaps);
	return 0;
}

static int
read_backing_name(struct qcow2_meta *m, const uint8_t *hdr, uint64_t len, struct td_error *err)
{
	const struct qcow2_header *h = &m->h;

	if (!h->backing_file_offset)
		return 0;
	if (h->backing_file_size == 0 || h->backing_file_size > QCOW2_MAX_BACKING_NAME ||
	    h->backing_file_offset > len || h->backing_file_size > len - h->backing_file_offset ||
	    h->backing_file_offset < h->header_length)
		return td_error_set(err, EUCLEAN, "backing file name lies outside the header cluster");
	const uint8_t *name = hdr + h->backing_file_offset;
	if (memchr(name, 0, h->backing_file_size))
		return td_error_set(err, EUCLEAN, "backing file name contains a NUL byte");
	m->backing = strndup((const char *)name, h->backing_file_size);
	if (!m->backing)
		return td_error_set(err, ENOMEM, "out of memory");
	return 0;
}

static int
read_table(qcow2_read_fn rd, void *ctx, uint64_t off, uint64_t n, uint64_t **out,
	   const char *what, struct td_error *err)
{
	uint8_t *raw = malloc(n ? n * 8 : 1);
	uint64_t *t = calloc(n ? n : 1, sizeof(*t));
	int rc;

	if (!raw || !t) {
		free(raw);
		free(t);
		return td_error_set(err, ENOMEM, "out of memory");
	}
	if (n && (rc = rd(ctx, raw, n * 8, off)) < 0) {
		free(raw);
		free(t);
		return td_error_set(err, -rc, "cannot read the %s: %s", what, strerror(-rc));
	}
	for (uint64_t i = 0; i < n; i++)
		t[i] = qcow2_be64(raw + 8 * i);
	free(raw);
	*out = t;
	return 0;
}

/* A pointer to one cluster of metadata: aligned, inside the file, not in a fixed table. */
static int
check_pointer(const struct qcow2_meta *m, uint64_t off, const char *what, uint64_t idx,
	      struct td_error *err)
{
	const char *in;

	if (off % m->cluster_size)
		return td_error_set(err, EUCLEAN, "%s entry %ju is not cluster aligned", what,
				    (uintmax_t)idx);
	if (off > m->file_size || m->cluster_size > m->file_size - off)
		return td_error_set(err, EUCLEAN, "%s entry %ju points past the end of the file",
				    what, (uintmax_t)idx);
	if ((in = qcow2_overlaps_meta(m, off, m->cluster_size)))
		return td_error_set(err, EUCLEAN, "%s entry %ju points into the %s", what,
				    (uintmax_t)idx, in);
	return 0;
}

static int
load_l1(struct qcow2_meta *m, qcow2_read_fn rd, void *ctx, struct td_error *err)
{
	int rc = read_table(rd, ctx, m->h.l1_table_offset, m->h.l1_size, &m->l1, "L1 table", err);
	if (rc < 0)
		return rc;
	for (uint32_t i = 0; i < m->h.l1_size; i++) {
		uint64_t e = m->l1[i];
		if (e & QCOW2_L1_RESERVED)
			return td_error_set(err, EUCLEAN, "L1 entry %u has reserved bits set", i);
		if (!(e & QCOW2_OFFSET_MASK)) {
			m->l1[i] = 0;
			continue;
		}
		if ((rc = check_pointer(m, e & QCOW2_OFFSET_MASK, "L1", i, err)) < 0)
			return rc;
	}
	return 0;
}

static int
load_reftable(struct qcow2_meta *m, qcow2_read_fn rd, void *ctx, struct td_error *err)
{
	int rc = read_table(rd, ctx, m->h.refcount_table_offset, m->reftable_entries,
			    &m->reftable, "refcount table", err);
	if (rc < 0)
		return rc;
	for (uint32_t i = 0; i < m->reftable_entries; i++) {
		uint64_t e = m->reftable[i];
		if (!e)
			continue;
		if (e & QCOW2_REFT_RESERVED)
			return td_error_set(err, EUCLEAN, "refcount table entry %u is not cluster "
					    "aligned", i);
		if (e >= QCOW2_MAX_HOST)
			return td_error_set(err, EUCLEAN, "refcount table entry %u is out of range", i);
		if ((rc = check_pointer(m, e, "refcount table", i, err)) < 0)
			return rc;
	}
	return 0;
}

int
qcow2_meta_load(struct qcow2_meta *m, qcow2_read_fn rd, void *ctx, uint64_t file_size,
		int rdonly, struct td_error *err)
{
	uint8_t fixed[QCOW2_V3_HEADER + 8];
	uint8_t *hdr = NULL;
	char why[128];
	int rc;

	memset(m, 0, sizeof(*m));
	m->file_size = file_size;
	size_t flen = file_size < sizeof(fixed) ? (size_t)file_size : sizeof(fixed);
	if ((rc = rd(ctx, fixed, flen, 0)) < 0) {
		td_error_set(err, -rc, "cannot read the header: %s", strerror(-rc));
		goto fail;
	}
	if (qcow2_header_decode(fixed, flen, &m->h, why, sizeof(why)) < 0)
		FAIL("%s", why);
	if ((rc = check_geometry(m, err)) < 0)
		goto fail;
	uint64_t hlen = file_size < m->cluster_size ? file_size : m->cluster_size;
	if (hlen < m->h.header_length)
		FAIL("file too short for its header");
	if (!(hdr = malloc(hlen))) {
		td_error_set(err, ENOMEM, "out of memory");
		goto fail;
	}
	if ((rc = rd(ctx, hdr, hlen, 0)) < 0) {
		td_error_set(err, -rc, "cannot read the header: %s", strerror(-rc));
		goto fail;
	}
	if ((rc = read_extensions(m, hdr, hlen, err)) < 0 ||
	    (rc = check_features(m, rdonly, err)) < 0 ||
	    (rc = check_tables(m, err)) < 0 ||
	    (rc = read_backing_name(m, hdr, hlen, err)) < 0 ||
	    (rc = load_l1(m, rd, ctx, err)) < 0 ||
	    (rc = load_reftable(m, rd, ctx, err)) < 0)
		goto fail;
	free(hdr);
	return 0;
fail:
	free(hdr);
	qcow2_meta_free(m);
	return -err->code;
}

void
qcow2_meta_free(struct qcow2_meta *m)
{
	free(m->l1);
	free(m->reftable);
	free(m->backing);
	free(m->features);
	m->l1 = m->reftable = NULL;
	m->backing = NULL;
	m->features = NULL;
}

/* ---- entries ---- */

static int
decode_compressed(const struct qcow2_meta *m, uint64_t e, uint64_t limit,
		  struct qcow2_cluster *c, char *why, size_t whylen)
{
	unsigned shift = 62 - (m->cluster_bits - 8);
	uint64_t host = e & ((1ULL << shift) - 1);
	uint64_t nsec = ((e >> shift) & ((1ULL << (m->cluster_bits - 8)) - 1)) + 1;

	if (e & QCOW2_COPIED) {
		snprintf(why, whylen, "compressed cluster marked copied");
		return -EUCLEAN;
	}
	if (host >= QCOW2_MAX_HOST || host >= limit || host < m->cluster_size) {
		snprintf(why, whylen, "compressed cluster at %#jx lies outside the file",
			 (uintmax_t)host);
		return -EUCLEAN;
	}
	c->kind = QCOW2_COMPRESSED_DATA;
	c->host = host;
	c->rc_start = host & ~511ULL;
	c->rc_len = nsec * 512;
	c->csize = c->rc_start + c->rc_len - host;
	if (c->csize > limit - host)
		c->csize = limit - host;	/* the last sector may lie past the end */
	return 0;
}

int
qcow2_l2_decode(const struct qcow2_meta *m, uint64_t e, uint64_t limit,
		struct qcow2_cluster *c, char *why, size_t whylen)
{
	const char *in;

	memset(c, 0, sizeof(*c));
	if (e & QCOW2_COMPRESSED)
		return decode_compressed(m, e, limit, c, why, whylen);
	if (e & QCOW2_L2_RESERVED) {
		snprintf(why, whylen, "entry %#jx has reserved bits set", (uintmax_t)e);
		return -EUCLEAN;
	}
	c->host = e & QCOW2_OFFSET_MASK;
	if (e & QCOW2_ZERO) {
		if (m->h.version < 3) {
			snprintf(why, whylen, "zero flag in a version 2 image");
			return -EUCLEAN;
		}
		c->kind = QCOW2_ZERO_CLUSTER;
	} else if (!c->host) {
		if (e & QCOW2_COPIED) {
			snprintf(why, whylen, "entry in use without an offset");
			return -EUCLEAN;
		}
		c->kind = QCOW2_UNALLOCATED;
		return 0;
	} else {
		c->kind = QCOW2_DATA;
	}
	if (!c->host)
		return 0;
	if (c->host % m->cluster_size) {
		snprintf(why, whylen, "cluster offset %#jx is not aligned", (uintmax_t)c->host);
		return -EUCLEAN;
	}
	if (c->host > limit || m->cluster_size > limit - c->host) {
		snprintf(why, whylen, "cluster at %#jx lies past the end of the file",
			 (uintmax_t)c->host);
		return -EUCLEAN;
	}
	if ((in = qcow2_overlaps_meta(m, c->host, m->cluster_size))) {
		snprintf(why, whylen, "cluster at %#jx lies in the %s", (uintmax_t)c->host, in);
		return -EUCLEAN;
	}
	return 0;
}

int
qcow2_l2_check(const struct qcow2_meta *m, const uint8_t *table, uint64_t limit, char *why,
	       size_t whylen)
{
	struct qcow2_cluster c;
	char one[96];

	for (uint32_t i = 0; i < m->l2_entries; i++) {
		if (qcow2_l2_decode(m, qcow2_be64(table + 8 * (size_t)i), limit, &c, one,
				    sizeof(one)) < 0) {
			snprintf(why, whylen, "L2 entry %u: %s", i, one);
			return -EUCLEAN;
		}
	}
	return 0;
}

/* ---- refcounts ---- */

uint64_t
qcow2_rc_get(const uint8_t *b, uint64_t idx, unsigned bits)
{
	switch (bits) {
	case 1:
	case 2:
	case 4: {
		uint64_t bit = idx * bits;
		return (uint64_t)(b[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
	}
	case 8:
		return b[idx];
	case 16:
		return (uint64_t)b[2 * idx] << 8 | b[2 * idx + 1];
	case 32:
		return get_be32(b + 4 * idx);
	default:
		return qcow2_be64(b + 8 * idx);
	}
}

void
qcow2_rc_set(uint8_t *b, uint64_t idx, unsigned bits, uint64_t v)
{
	switch (bits) {
	case 1:
	case 2:
	case 4: {
		uint64_t bit = idx * bits;
		uint8_t mask = (uint8_t)(((1u << bits) - 1) << (bit % 8));
		b[bit / 8] = (uint8_t)((b[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
		return;
	}
	case 8:
		b[idx] = (uint8_t)v;
		return;
	case 16:
		b[2 * idx] = (uint8_t)(v >> 8);
		b[2 * idx + 1] = (uint8_t)v;
		return;
	case 32:
		qcow2_put32(b + 4 * idx, (uint32_t)v);
		return;
	default:
		qcow2_put64(b + 8 * idx, v);
		return;
	}
}

void
qcow2_rc_bytes(uint64_t first, uint64_t last, unsigned bits, uint64_t *off, uint64_t *len)
{
	*off = first * bits / 8;
	*len = div_up((last + 1) * bits, 8) - *off;
}

int
qcow2_inflate(const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen)
{
	z_stream s;
	int rc;

	memset(&s, 0, sizeof(s));
	/* raw deflate; the largest window also takes qemu's 4 KiB-window streams */
	if (inflateInit2(&s, -15) != Z_OK)
		return -ENOMEM;
	s.next_in = (Bytef *)(uintptr_t)in;
	s.avail_in = (uInt)inlen;
	s.next_out = out;
	s.avail_out = (uInt)outlen;
	rc = inflate(&s, Z_FINISH);
	inflateEnd(&s);
	/* a full cluster is what counts: the rest of the last sector is not data */
	if ((rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && s.avail_out == 0)
		return 0;
	return -EIO;
}

/* ---- counting references ---- */

struct counter {
	uint32_t *counts;
	uint64_t n;
	unsigned cbits;
	struct td_error *err;
};

static int
count_range(struct counter *k, uint64_t off, uint64_t len, const char *what)
{
	if (!len)
		return 0;
	uint64_t first = off >> k->cbits, last = (off + len - 1) >> k->cbits;
	if (off + len < off || last >= k->n)
		return td_error_set(k->err, EUCLEAN, "%s at %#jx lies past the end of the file",
				    what, (uintmax_t)off);
	for (uint64_t c = first; c <= last; c++)
		if (k->counts[c] < UINT32_MAX)
			k->counts[c]++;
	return 0;
}

static int
count_l2(const struct qcow2_meta *m, struct counter *k, const uint8_t *t, uint32_t l1i)
{
	struct qcow2_cluster c;
	char why[96];
	int rc;

	for (uint32_t i = 0; i < m->l2_entries; i++) {
		if (qcow2_l2_decode(m, qcow2_be64(t + 8 * (size_t)i), k->n << k->cbits, &c, why,
				    sizeof(why)) < 0)
			return td_error_set(k->err, EUCLEAN, "L2 table %u, entry %u: %s", l1i, i, why);
		if (c.kind == QCOW2_COMPRESSED_DATA)
			rc = count_range(k, c.rc_start, c.rc_len, "compressed cluster");
		else
			rc = count_range(k, c.host, c.host ? m->cluster_size : 0, "data cluster");
		if (rc < 0)
			return rc;
	}
	return 0;
}

int
qcow2_count_refs(const struct qcow2_meta *m, qcow2_read_fn rd, void *ctx, uint32_t *counts,
		 uint64_t n, struct td_error *err)
{
	struct counter k = { counts, n, m->cluster_bits, err };
	uint8_t *t;
	int rc;

	if (m->h.nb_snapshots || m->has_bitmaps)
		return td_error_set(err, ENOTSUP, "cannot count the references of internal "
				    "snapshots or bitmaps");
	memset(counts, 0, n * sizeof(*counts));
	if ((rc = count_range(&k, 0, m->cluster_size, "header")) < 0 ||
	    (rc = count_range(&k, m->h.l1_table_offset, (uint64_t)m->h.l1_size * 8, "L1 table")) < 0)
		return rc;
	if (!(t = malloc(m->cluster_size)))
		return td_error_set(err, ENOMEM, "out of memory");
	for (uint32_t i = 0; i < m->h.l1_size && rc == 0; i++) {
		uint64_t off = m->l1[i] & QCOW2_OFFSET_MASK;
		if (!off)
			continue;
		if ((rc = count_range(&k, off, m->cluster_size, "L2 table")) < 0)
			break;
		if ((rc = rd(ctx, t, m->cluster_size, off)) < 0) {
			rc = td_error_set(err, -rc, "cannot read L2 table %u", i);
			break;
		}
		rc = count_l2(m, &k, t, i);
	}
	free(t);
	return rc;
}

/* ---- writing refcount structures ---- */

/* Blocks and table clusters that count clusters [0, first) and themselves. */
static void
refcount_layout(const struct qcow2_meta *m, uint64_t first, uint64_t *nb, uint64_t *nt)
{
	uint64_t b = 0, t = 0;
	for (;;) {
		uint64_t b2 = div_up(first + b + t, m->rb_entries);
		uint64_t t2 = div_up(b2 * 8, m->cluster_size);
		if (b2 == b && t2 == t)
			break;
		b = b2;
		t = t2;
	}
	*nb = b;
	*nt = t;
}

static uint64_t
refcount_of(const uint32_t *counts, uint64_t n, uint64_t first, uint64_t own, uint64_t c)
{
	if (c < n)
		return counts[c];
	return c >= first && c < first + own;
}

int
qcow2_refcounts_write(const struct qcow2_meta *m, const uint32_t *counts, uint64_t n,
		      uint64_t first, qcow2_write_fn wr, void *ctx, uint64_t *table_off,
		      uint32_t *table_clusters, struct td_error *err)
{
	uint64_t cs = m->cluster_size, nb, nt;
	uint64_t max = m->refcount_bits == 64 ? UINT64_MAX : (1ULL << m->refcount_bits) - 1;
	uint8_t *buf;
	int rc = 0;

	refcount_layout(m, first, &nb, &nt);
	if (nt * cs > QCOW2_MAX_REFTABLE_BYTES || (first + nb + nt) * cs >= QCOW2_MAX_HOST)
		return td_error_set(err, EFBIG, "the refcount table would be too large");
	for (uint64_t c = 0; c < n; c++)
		if (counts[c] > max)
			return td_error_set(err, EUCLEAN, "cluster %ju is referenced %u times; "
					    "refcount_bits %u cannot count that", (uintmax_t)c,
					    counts[c], m->refcount_bits);
	if (!(buf = calloc(1, nt * cs > cs ? nt * cs : cs)))
		return td_error_set(err, ENOMEM, "out of memory");
	for (uint64_t b = 0; b < nb && rc == 0; b++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < m->rb_entries; i++)
			qcow2_rc_set(buf, i, m->refcount_bits,
				     refcount_of(counts, n, first, nb + nt, b * m->rb_entries + i));
		if ((rc = wr(ctx, buf, cs, (first + b) * cs)) < 0)
			td_error_set(err, -rc, "cannot write a refcount block: %s", strerror(-rc));
	}
	if (rc == 0) {
		memset(buf, 0, nt * cs);
		for (uint64_t b = 0; b < nb; b++)
			qcow2_put64(buf + 8 * b, (first + b) * cs);
		if ((rc = wr(ctx, buf, nt * cs, (first + nb) * cs)) < 0)
			td_error_set(err, -rc, "cannot write the refcount table: %s", strerror(-rc));
	}
	free(buf);
	*table_off = (first + nb) * cs;
	*table_clusters = (uint32_t)nt;
	return rc < 0 ? -err->code : 0;
}

/* ---- creating ---- */

static const struct {
	uint8_t type, bit;
	const char *name;
} known_features[] = {
	{ 0, 0, "dirty bit" },
	{ 0, 1, "corrupt bit" },
	{ 0, 2, "external data file" },
	{ 0, 3, "compression type" },
	{ 0, 4, "extended L2 entries" },
	{ 1, 0, "lazy refcounts" },
	{ 2, 0, "bitmaps" },
	{ 2, 1, "raw external data" },
};

/* Extensions (backing format, feature names) then the backing name, into hdr. */
static int
build_header_cluster(const struct qcow2_create *c, struct qcow2_header *h, uint8_t *hdr,
		     uint32_t cs, struct td_error *err)
{
	size_t nf = sizeof(known_features) / sizeof(known_features[0]);
	size_t fmt_len = c->backing ? strlen(c->backing_fmt) : 0;
	size_t name_len = c->backing ? strlen(c->backing) : 0;
	uint64_t pos = QCOW2_V3_HEADER;

	if (name_len > QCOW2_MAX_BACKING_NAME || fmt_len >= 32)
		return td_error_set(err, ENAMETOOLONG, "backing file name is too long");
	if (pos + 8 + align_up(fmt_len, 8) + 8 + name_len > cs)
		return td_error_set(err, ENAMETOOLONG, "the header does not fit in one cluster");
	if (pos + 8 + align_up(fmt_len, 8) + 8 + 48 * nf + 8 + name_len > cs)
		nf = 0;		/* the feature names are only a courtesy */
	if (c->backing) {
		qcow2_put32(hdr + pos, QCOW2_EXT_BACKING_FMT);
		qcow2_put32(hdr + pos + 4, (uint32_t)fmt_len);
		memcpy(hdr + pos + 8, c->backing_fmt, fmt_len);
		pos += 8 + align_up(fmt_len, 8);
	}
	if (nf) {
		qcow2_put32(hdr + pos, QCOW2_EXT_FEATURES);
		qcow2_put32(hdr + pos + 4, (uint32_t)(48 * nf));
		for (size_t i = 0; i < nf; i++) {
			uint8_t *e = hdr + pos + 8 + 48 * i;
			e[0] = known_features[i].type;
			e[1] = known_features[i].bit;
			memcpy(e + 2, known_features[i].name, strlen(known_features[i].name));
		}
		pos += 8 + 48 * nf;
	}
	pos += 8;	/* the end marker: zeros */
	if (c->backing) {
		h->backing_file_offset = pos;
		h->backing_file_size = (uint32_t)name_len;
		memcpy(hdr + pos, c->backing, name_len);
	}
	return 0;
}

int
qcow2_create_write(const struct qcow2_create *c, qcow2_write_fn wr, void *ctx,
		   struct td_error *err)
{
	struct qcow2_meta m;
	struct qcow2_header *h = &m.h;
	unsigned cb = c->cluster_bits ? c->cluster_bits : QCOW2_DEFAULT_CLUSTER_BITS;
	uint8_t *hdr = NULL, *l1 = NULL;
	uint32_t *counts = NULL;
	int rc;

	memset(&m, 0, sizeof(m));
	if (cb < QCOW2_MIN_CLUSTER_BITS || cb > QCOW2_MAX_CLUSTER_BITS || c->size > (1ULL << 61))
		return td_error_set(err, EINVAL, "invalid cluster size or virtual size");
	uint64_t cs = 1ULL << cb, l2_span = (cs / 8) << cb;
	uint64_t l1_entries = div_up(c->size, l2_span);
	uint64_t l1_clusters = div_up(l1_entries * 8, cs);
	if (l1_entries * 8 > QCOW2_MAX_L1_BYTES)
		return td_error_set(err, EFBIG, "the L1 table would be too large");
	h->magic = QCOW2_MAGIC;
	h->version = 3;
	h->cluster_bits = cb;
	h->size = c->size;
	h->refcount_order = 4;
	h->header_length = QCOW2_V3_HEADER;
	h->l1_size = (uint32_t)l1_entries;
	h->l1_table_offset = cs;
	if ((rc = check_geometry(&m, err)) < 0)
		return rc;
	hdr = calloc(1, cs);
	l1 = calloc(1, l1_clusters ? l1_clusters * cs : 1);
	counts = calloc(1 + l1_clusters, sizeof(*counts));
	if (!hdr || !l1 || !counts) {
		rc = td_error_set(err, ENOMEM, "out of memory");
		goto out;
	}
	for (uint64_t i = 0; i < 1 + l1_clusters; i++)
		counts[i] = 1;
	if ((rc = build_header_cluster(c, h, hdr, (uint32_t)cs, err)) < 0 ||
	    (rc = qcow2_refcounts_write(&m, counts, 1 + l1_clusters, 1 + l1_clusters, wr, ctx,
					&h->refcount_table_offset, &h->refcount_table_clusters,
					err)) < 0)
		goto out;
	qcow2_header_encode(h, hdr);
	if ((l1_clusters && (rc = wr(ctx, l1, l1_clusters * cs, cs)) < 0) ||
	    (rc = wr(ctx, hdr, cs, 0)) < 0)
		rc = td_error_set(err, -rc, "cannot write the image: %s", strerror(-rc));
out:
	free(hdr);
	free(l1);
	free(counts);
	return rc;
}
