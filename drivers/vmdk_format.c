/*
 * VMDK structures: the sparse extent header (and a stream's footer), the
 * grain directory with every check the driver relies on, grain table
 * entries, grain markers and their inflation, and the descriptor parser.
 * Format facts: VMware's Virtual Disk Format 1.1 (hosted sparse extents,
 * stream-optimized extents, the descriptor) and 5.0 (zeroed-grain GTEs).
 */
#include "vmdk_format.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "byteorder.h"

#ifndef EUCLEAN
#define EUCLEAN EINVAL
#endif

void
vmdk_header_decode(const uint8_t b[VMDK_SECTOR], struct vmdk_header *h)
{
	memset(h, 0, sizeof(*h));
	h->magic = get_le32(b);
	h->version = get_le32(b + 4);
	h->flags = get_le32(b + 8);
	h->capacity = get_le64(b + 12);
	h->grain_size = get_le64(b + 20);
	h->desc_offset = get_le64(b + 28);
	h->desc_size = get_le64(b + 36);
	h->gtes = get_le32(b + 44);
	h->rgd_offset = get_le64(b + 48);
	h->gd_offset = get_le64(b + 56);
	h->overhead = get_le64(b + 64);
	h->unclean = b[72];
	memcpy(h->nl, b + 73, 4);
	h->compress = get_le16(b + 77);
}

enum vmdk_file_kind
vmdk_probe(const uint8_t *buf, size_t len)
{
	if (len >= 4 && get_le32(buf) == VMDK_MAGIC)
		return VMDK_FILE_SPARSE;
	if (len >= 4 && get_le32(buf) == VMDK_COWD_MAGIC)
		return VMDK_FILE_COWD;
	return VMDK_FILE_TEXT;
}

void
vmdk_gt_decode(uint32_t *gt, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		gt[i] = get_le32((const uint8_t *)&gt[i]);
}

/* ---- the sparse extent ---- */

static int
header_check(const struct vmdk_header *h, const char *what, struct td_error *err)
{
	static const uint8_t nl[4] = { '\n', ' ', '\r', '\n' };

	if (h->magic != VMDK_MAGIC)
		return td_error_set(err, EUCLEAN, "%s: bad magic (not a VMDK sparse extent)", what);
	if (h->version < 1 || h->version > 3)
		return td_error_set(err, ENOTSUP, "%s: sparse extent version %u is not supported",
				    what, h->version);
	/* a transfer in text mode rewrites line ends: the grains are damaged too */
	if ((h->flags & VMDK_FLAG_NL_TEST) && memcmp(h->nl, nl, sizeof(nl)))
		return td_error_set(err, EUCLEAN, "%s: newline check failed (the file went "
				    "through a text-mode transfer)", what);
	if (h->compress != VMDK_COMPRESS_NONE && h->compress != VMDK_COMPRESS_DEFLATE)
		return td_error_set(err, ENOTSUP, "%s: compression algorithm %u is not supported",
				    what, h->compress);
	return 0;
}

/*
 * A stream written front to back puts its grain directory at the end and
 * says so in the header; the footer (a copy of the header with the real
 * offsets) sits between a footer marker and the end-of-stream marker.
 */
static int
load_footer(struct vmdk_sparse *s, vmdk_read_fn rd, void *ctx, struct td_error *err)
{
	uint8_t buf[3 * VMDK_SECTOR];
	uint64_t fs = s->file_size;
	int rc;

	if (fs < 4 * VMDK_SECTOR ||
	    (rc = rd(ctx, buf, sizeof(buf), fs - sizeof(buf))) < 0 ||
	    get_le32(buf + 8) != 0 || get_le32(buf + 12) != VMDK_MARKER_FOOTER ||
	    get_le64(buf + 1024) != 0 || get_le32(buf + 1032) != 0 || get_le32(buf + 1036) != VMDK_MARKER_EOS)
		return td_error_set(err, EUCLEAN, "stream-optimized extent without its footer "
				    "and end-of-stream marker (truncated?)");
	vmdk_header_decode(buf + VMDK_SECTOR, &s->h);
	if ((rc = header_check(&s->h, "footer", err)) < 0)
		return rc;
	if (s->h.gd_offset == VMDK_GD_AT_END)
		return td_error_set(err, EUCLEAN, "footer: no grain directory offset");
	return 0;
}

/* Grain and table sizes, capacity, the descriptor's place: all bounded. */
static int
geometry_check(struct vmdk_sparse *s, struct td_error *err)
{
	const struct vmdk_header *h = &s->h;
	uint64_t fs_sectors = s->file_size / VMDK_SECTOR;

	if (!h->grain_size || h->grain_size > VMDK_MAX_GRAIN / VMDK_SECTOR ||
	    (h->grain_size & (h->grain_size - 1)))
		return td_error_set(err, EUCLEAN, "grain size of %ju sectors is not a power of two "
				    "up to %u KiB", (uintmax_t)h->grain_size, VMDK_MAX_GRAIN >> 10);
	if (!h->gtes || h->gtes > VMDK_MAX_GTES)
		return td_error_set(err, EUCLEAN, "%u entries per grain table (1 to %u)", h->gtes,
				    VMDK_MAX_GTES);
	if (!h->capacity || h->capacity > VMDK_MAX_SIZE / VMDK_SECTOR)
		return td_error_set(err, EUCLEAN, "capacity of %ju sectors is zero or beyond %ju TiB",
				    (uintmax_t)h->capacity, (uintmax_t)(VMDK_MAX_SIZE >> 40));
	s->capacity = h->capacity;
	s->grain_bytes = (uint32_t)h->grain_size * VMDK_SECTOR;
	s->gtes = h->gtes;
	s->gt_bytes = h->gtes * 4;
	uint64_t per_gt = h->grain_size * h->gtes;
	uint64_t nr = (h->capacity + per_gt - 1) / per_gt;
	if (nr > VMDK_MAX_GD_ENTRIES)
		return td_error_set(err, EUCLEAN, "grain directory of %ju entries is too large "
				    "(at most %u)", (uintmax_t)nr, VMDK_MAX_GD_ENTRIES);
	s->nr_gdes = (uint32_t)nr;
	if (h->desc_size > VMDK_MAX_DESC / VMDK_SECTOR)
		return td_error_set(err, EUCLEAN, "embedded descriptor of %ju sectors is too large",
				    (uintmax_t)h->desc_size);
	if (h->desc_size && (!h->desc_offset || h->desc_offset > fs_sectors ||
			     h->desc_size > fs_sectors - h->desc_offset))
		return td_error_set(err, EUCLEAN, "embedded descriptor at sector %ju is past the "
				    "end of the file", (uintmax_t)h->desc_offset);
	s->compressed = h->compress == VMDK_COMPRESS_DEFLATE;
	s->markers = (h->flags & VMDK_FLAG_MARKERS) != 0;
	s->zero_grain = (h->flags & VMDK_FLAG_ZERO_GRAIN) != 0;
	uint64_t zmax = compressBound(s->grain_bytes) + (s->markers ? VMDK_GRAIN_MARKER : 0);
	s->zread_max = (uint32_t)((zmax + VMDK_SECTOR - 1) / VMDK_SECTOR * VMDK_SECTOR);
	return 0;
}

static int
load_gd(struct vmdk_sparse *s, vmdk_read_fn rd, void *ctx, struct td_error *err)
{
	uint64_t gd = s->h.gd_offset, bytes = (uint64_t)s->nr_gdes * 4;
	int rc;

	if (!gd || gd > s->file_size / VMDK_SECTOR || bytes > s->file_size - gd * VMDK_SECTOR)
		return td_error_set(err, EUCLEAN, "grain directory at sector %ju is past the end "
				    "of the file", (uintmax_t)gd);
	s->gd = malloc((size_t)bytes);
	if (!s->gd)
		return td_error_set(err, ENOMEM, "out of memory");
	if ((rc = rd(ctx, s->gd, (size_t)bytes, gd * VMDK_SECTOR)) < 0)
		return td_error_set(err, -rc, "cannot read the grain directory: %s", strerror(-rc));
	vmdk_gt_decode(s->gd, s->nr_gdes);
	for (uint32_t i = 0; i < s->nr_gdes; i++) {
		uint64_t at = (uint64_t)s->gd[i] * VMDK_SECTOR;
		if (s->gd[i] && (at > s->file_size || s->gt_bytes > s->file_size - at))
			return td_error_set(err, EUCLEAN, "grain table %u at sector %u is past the "
					    "end of the file", i, s->gd[i]);
	}
	return 0;
}

int
vmdk_sparse_load(struct vmdk_sparse *s, vmdk_read_fn rd, void *ctx, uint64_t file_size,
		 struct td_error *err)
{
	uint8_t buf[VMDK_SECTOR];
	int rc;

	memset(s, 0, sizeof(*s));
	s->file_size = file_size;
	if (file_size < VMDK_SECTOR)
		return td_error_set(err, EUCLEAN, "file of %ju bytes is too short for a sparse "
				    "extent header", (uintmax_t)file_size);
	if ((rc = rd(ctx, buf, sizeof(buf), 0)) < 0)
		return td_error_set(err, -rc, "cannot read the header: %s", strerror(-rc));
	vmdk_header_decode(buf, &s->h);
	if ((rc = header_check(&s->h, "header", err)) < 0)
		return rc;
	if (s->h.gd_offset == VMDK_GD_AT_END && (rc = load_footer(s, rd, ctx, err)) < 0)
		return rc;
	if ((rc = geometry_check(s, err)) < 0 || (rc = load_gd(s, rd, ctx, err)) < 0) {
		vmdk_sparse_free(s);
		return rc;
	}
	return 0;
}

void
vmdk_sparse_free(struct vmdk_sparse *s)
{
	free(s->gd);
	s->gd = NULL;
}

int
vmdk_sparse_descriptor(const struct vmdk_sparse *s, vmdk_read_fn rd, void *ctx, char **text,
		       struct td_error *err)
{
	size_t len = (size_t)s->h.desc_size * VMDK_SECTOR;
	int rc;

	*text = NULL;
	if (!len)
		return 0;
	char *buf = malloc(len + 1);
	if (!buf)
		return td_error_set(err, ENOMEM, "out of memory");
	if ((rc = rd(ctx, buf, len, s->h.desc_offset * VMDK_SECTOR)) < 0) {
		free(buf);
		return td_error_set(err, -rc, "cannot read the embedded descriptor: %s",
				    strerror(-rc));
	}
	buf[len] = '\0';
	*text = buf;
	return 0;
}

/* ---- grains ---- */

uint32_t
vmdk_grain_need(const struct vmdk_sparse *s, uint64_t grain)
{
	uint64_t start = grain * s->grain_bytes, cap = s->capacity * VMDK_SECTOR;
	if (start >= cap)
		return 0;
	return cap - start < s->grain_bytes ? (uint32_t)(cap - start) : s->grain_bytes;
}

int
vmdk_grain_decode(const struct vmdk_sparse *s, uint64_t grain, uint32_t gte, uint64_t *off,
		  char *why, size_t whylen)
{
	if (gte == 0)
		return VMDK_GRAIN_UNALLOC;
	if (gte == VMDK_GTE_ZERO && s->zero_grain)
		return VMDK_GRAIN_ZERO;
	*off = (uint64_t)gte * VMDK_SECTOR;
	/* a compressed grain's length is in its marker: the reader checks the rest */
	uint64_t need = s->compressed ? 1 : vmdk_grain_need(s, grain);
	if (*off > s->file_size || need > s->file_size - *off) {
		snprintf(why, whylen, "grain %ju at sector %u is past the end of the file",
			 (uintmax_t)grain, gte);
		return -EUCLEAN;
	}
	return s->compressed ? VMDK_GRAIN_COMPRESSED : VMDK_GRAIN_DATA;
}

uint32_t
vmdk_grain_zread_len(const struct vmdk_sparse *s, uint64_t off)
{
	uint64_t left = off < s->file_size ? s->file_size - off : 0;
	return left < s->zread_max ? (uint32_t)left : s->zread_max;
}

/* The deflate payload of a grain, after its marker (if the extent has them). */
static int
grain_payload(const struct vmdk_sparse *s, uint64_t grain, const uint8_t *in, size_t inlen,
	      const uint8_t **z, size_t *zlen, char *why, size_t whylen)
{
	*z = in;
	*zlen = inlen;
	if (!s->markers)
		return 0;
	if (inlen < VMDK_GRAIN_MARKER) {
		snprintf(why, whylen, "grain %ju: marker cut off by the end of the file",
			 (uintmax_t)grain);
		return -EUCLEAN;
	}
	uint64_t lba = get_le64(in);
	uint32_t size = get_le32(in + 8);
	if (size == 0)
		snprintf(why, whylen, "grain %ju: a metadata marker where a grain should be",
			 (uintmax_t)grain);
	else if (size > s->zread_max - VMDK_GRAIN_MARKER)
		snprintf(why, whylen, "grain %ju: compressed size %u is more than a grain of %u "
			 "bytes can take", (uintmax_t)grain, size, s->grain_bytes);
	else if (size > inlen - VMDK_GRAIN_MARKER)
		snprintf(why, whylen, "grain %ju: compressed data runs past the end of the file",
			 (uintmax_t)grain);
	else if (lba != grain * (s->grain_bytes / VMDK_SECTOR))
		snprintf(why, whylen, "grain %ju: its marker says sector %ju", (uintmax_t)grain,
			 (uintmax_t)lba);
	else {
		*z = in + VMDK_GRAIN_MARKER;
		*zlen = size;
		return 0;
	}
	return -EUCLEAN;
}

int
vmdk_grain_inflate(const struct vmdk_sparse *s, uint64_t grain, const uint8_t *in, size_t inlen,
		   uint8_t *out, char *why, size_t whylen)
{
	const uint8_t *z;
	size_t zlen;
	z_stream zs;
	int rc = grain_payload(s, grain, in, inlen, &z, &zlen, why, whylen);

	if (rc < 0)
		return rc;
	memset(&zs, 0, sizeof(zs));
	if (inflateInit(&zs) != Z_OK) {
		snprintf(why, whylen, "out of memory");
		return -ENOMEM;
	}
	zs.next_in = (Bytef *)(uintptr_t)z;
	zs.avail_in = (uInt)zlen;
	zs.next_out = out;
	zs.avail_out = s->grain_bytes;
	int zr = inflate(&zs, Z_FINISH);
	size_t got = zs.total_out;
	int full = zs.avail_out == 0;
	inflateEnd(&zs);
	if (zr != Z_STREAM_END) {
		snprintf(why, whylen, "grain %ju: %s", (uintmax_t)grain,
			 zr == Z_BUF_ERROR && full ? "inflates to more than a grain" :
			 "corrupt deflate stream");
		return -EUCLEAN;
	}
	uint32_t need = vmdk_grain_need(s, grain);
	if (got < need) {
		snprintf(why, whylen, "grain %ju inflates to %zu bytes, not %u", (uintmax_t)grain,
			 got, need);
		return -EUCLEAN;
	}
	memset(out + got, 0, s->grain_bytes - got);
	return 0;
}

/* ---- the descriptor ---- */

struct cursor {
	const char *p, *end;
};

static void
skip_blanks(struct cursor *c)
{
	while (c->p < c->end && (*c->p == ' ' || *c->p == '\t'))
		c->p++;
}

/* The next blank-separated word; its length (0 at the end). */
static size_t
next_word(struct cursor *c, const char **w)
{
	skip_blanks(c);
	*w = c->p;
	while (c->p < c->end && *c->p != ' ' && *c->p != '\t')
		c->p++;
	return (size_t)(c->p - *w);
}

static int
word_is(const char *w, size_t n, const char *lit)
{
	return n == strlen(lit) && memcmp(w, lit, n) == 0;
}

static int
parse_u64(const char *w, size_t n, uint64_t *v)
{
	*v = 0;
	if (!n || n > 20)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (w[i] < '0' || w[i] > '9' || *v > (UINT64_MAX - (uint64_t)(w[i] - '0')) / 10)
			return -1;
		*v = *v * 10 + (uint64_t)(w[i] - '0');
	}
	return 0;
}

static int
parse_hex32(const char *w, size_t n, uint32_t *v)
{
	*v = 0;
	if (!n || n > 8)
		return -1;
	for (size_t i = 0; i < n; i++) {
		char ch = w[i];
		int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 :
			ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
		if (d < 0)
			return -1;
		*v = *v << 4 | (uint32_t)d;
	}
	return 0;
}

/* A word of the file, fit to quote in a one-line message. */
static const char *
quoted(char *out, size_t outlen, const char *w, size_t n)
{
	size_t i;
	for (i = 0; i < n && i + 1 < outlen; i++)
		out[i] = w[i] >= 0x20 && w[i] < 0x7f ? w[i] : '?';
	out[i] = '\0';
	return out;
}

static int
has_control(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
			return 1;
	return 0;
}

static int __attribute__((format(printf, 4, 5)))
line_error(struct td_error *err, int code, unsigned line, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return td_error_set(err, code, "descriptor line %u: %s", line, msg);
}

int
vmdk_name_check(const char *name, char *why, size_t whylen)
{
	if (!*name) {
		snprintf(why, whylen, "empty file name");
		return -EACCES;
	}
	if (has_control(name, strlen(name))) {
		snprintf(why, whylen, "control character in file name");
		return -EACCES;
	}
	if (name[0] == '/') {
		snprintf(why, whylen, "absolute path '%.200s' (extents must be in the "
			 "descriptor's directory)", name);
		return -EACCES;
	}
	for (const char *c = name; *c; ) {
		size_t n = strcspn(c, "/");
		if (n == 2 && c[0] == '.' && c[1] == '.') {
			snprintf(why, whylen, "'%.200s' leaves the descriptor's directory", name);
			return -EACCES;
		}
		c += n;
		c += *c == '/';
	}
	return 0;
}

static int
extent_type(const char *w, size_t n, enum vmdk_ext_type *t, unsigned line, struct td_error *err)
{
	char q[33];

	if (word_is(w, n, "FLAT") || word_is(w, n, "VMFS"))
		*t = VMDK_EXT_FLAT;
	else if (word_is(w, n, "SPARSE"))
		*t = VMDK_EXT_SPARSE;
	else if (word_is(w, n, "ZERO"))
		*t = VMDK_EXT_ZERO;
	else if (word_is(w, n, "VMFSSPARSE") || word_is(w, n, "SESPARSE") ||
		 word_is(w, n, "VMFSRDM") || word_is(w, n, "VMFSRAW") ||
		 word_is(w, n, "VSANSPARSE"))
		return line_error(err, ENOTSUP, line, "%.*s extents are not supported", (int)n, w);
	else
		return line_error(err, EUCLEAN, line, "unknown extent type '%s'",
				  quoted(q, sizeof(q), w, n));
	return 0;
}

/* "NAME" after the type: a relative path that stays in the directory. */
static int
extent_file(struct cursor *c, struct vmdk_desc_extent *e, unsigned line, struct td_error *err)
{
	char why[256];

	skip_blanks(c);
	if (c->p == c->end || *c->p != '"') {
		if (e->type == VMDK_EXT_ZERO)
			return 0;
		return line_error(err, EUCLEAN, line, "extent without a quoted file name");
	}
	const char *name = ++c->p;
	const char *q = memchr(name, '"', (size_t)(c->end - name));
	if (!q)
		return line_error(err, EUCLEAN, line, "unterminated file name");
	if ((size_t)(q - name) > VMDK_MAX_NAME)
		return line_error(err, EUCLEAN, line, "file name longer than %u bytes", VMDK_MAX_NAME);
	c->p = q + 1;
	if (e->type == VMDK_EXT_ZERO)
		return 0;
	e->file = strndup(name, (size_t)(q - name));
	if (!e->file)
		return td_error_set(err, ENOMEM, "out of memory");
	int rc = vmdk_name_check(e->file, why, sizeof(why));
	return rc < 0 ? line_error(err, -rc, line, "%s", why) : 0;
}

/* What may follow the file name: a FLAT extent's offset, nothing else. */
static int
extent_offset(struct cursor *c, struct vmdk_desc_extent *e, unsigned line, struct td_error *err)
{
	const char *w;
	size_t n = next_word(c, &w);

	if (n && e->type == VMDK_EXT_FLAT) {
		/* bytes must stay addressable as an off_t */
		if (parse_u64(w, n, &e->offset) < 0 ||
		    e->offset > (uint64_t)INT64_MAX / VMDK_SECTOR - e->sectors)
			return line_error(err, EUCLEAN, line, "bad extent offset");
		n = next_word(c, &w);
	}
	if (n)
		return line_error(err, EUCLEAN, line, "unexpected text after the extent");
	return 0;
}

/* ACCESS SECTORS TYPE ["FILE" [OFFSET]] */
static int
parse_extent(struct vmdk_desc *d, struct cursor *c, unsigned line, struct td_error *err)
{
	struct vmdk_desc_extent e = { 0 };
	const char *w;
	size_t n = next_word(c, &w);
	int rc;

	if (word_is(w, n, "NOACCESS"))
		return line_error(err, ENOTSUP, line, "NOACCESS extents are not supported");
	n = next_word(c, &w);
	if (parse_u64(w, n, &e.sectors) < 0 || !e.sectors)
		return line_error(err, EUCLEAN, line, "bad extent size");
	if (e.sectors > VMDK_MAX_SIZE / VMDK_SECTOR - d->sectors)
		return line_error(err, EUCLEAN, line, "the disk grows beyond %ju TiB",
				  (uintmax_t)(VMDK_MAX_SIZE >> 40));
	n = next_word(c, &w);
	if ((rc = extent_type(w, n, &e.type, line, err)) < 0)
		return rc;
	if (d->nr_ext == VMDK_MAX_EXTENTS)
		return line_error(err, EUCLEAN, line, "more than %u extents", VMDK_MAX_EXTENTS);
	if ((rc = extent_file(c, &e, line, err)) < 0 ||
	    (rc = extent_offset(c, &e, line, err)) < 0)
		goto fail;
	if ((d->nr_ext & (d->nr_ext - 1)) == 0) {	/* 0, 1, 2, 4...: grow */
		void *ext = realloc(d->ext, (d->nr_ext ? 2 * d->nr_ext : 1) * sizeof(*d->ext));
		if (!ext) {
			rc = td_error_set(err, ENOMEM, "out of memory");
			goto fail;
		}
		d->ext = ext;
	}
	d->ext[d->nr_ext++] = e;
	d->sectors += e.sectors;
	return 0;
fail:
	free(e.file);
	return rc;
}

static int
key_char(char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
	       ch == '.' || ch == '_' || ch == '-';
}

/* The value of KEY = VALUE, without blanks around it or one pair of quotes. */
static void
kv_value(struct cursor *c, const char **v, size_t *n)
{
	skip_blanks(c);
	const char *end = c->end;
	while (end > c->p && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	if (end - c->p >= 2 && c->p[0] == '"' && end[-1] == '"') {
		c->p++;
		end--;
	}
	*v = c->p;
	*n = (size_t)(end - c->p);
}

static int
parse_kv(struct vmdk_desc *d, const char *key, size_t klen, const char *v, size_t n,
	 unsigned line, struct td_error *err)
{
	uint64_t version;
	char q[17];

	if (word_is(key, klen, "version")) {
		if (parse_u64(v, n, &version) < 0 || version < 1 || version > 3)
			return line_error(err, ENOTSUP, line, "descriptor version '%s' is not "
					  "supported", quoted(q, sizeof(q), v, n));
		d->version = (unsigned)version;
	} else if (word_is(key, klen, "CID")) {
		if (parse_hex32(v, n, &d->cid) < 0)
			return line_error(err, EUCLEAN, line, "bad CID");
	} else if (word_is(key, klen, "parentCID")) {
		if (parse_hex32(v, n, &d->parent_cid) < 0)
			return line_error(err, EUCLEAN, line, "bad parentCID");
	} else if (word_is(key, klen, "createType")) {
		if (!n || n >= sizeof(d->create_type) || has_control(v, n))
			return line_error(err, EUCLEAN, line, "bad createType");
		memcpy(d->create_type, v, n);
		d->create_type[n] = '\0';
	} else if (word_is(key, klen, "parentFileNameHint")) {
		if (!n || n > VMDK_MAX_NAME || has_control(v, n))
			return line_error(err, EUCLEAN, line, "bad parentFileNameHint");
		free(d->parent_hint);
		if (!(d->parent_hint = strndup(v, n)))
			return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;	/* the disk database and other keys are not ours */
}

static int
parse_line(struct vmdk_desc *d, struct cursor *c, unsigned line, struct td_error *err)
{
	const char *w, *key;
	size_t n;

	skip_blanks(c);
	if (c->p == c->end || *c->p == '#')
		return 0;
	struct cursor look = *c;
	n = next_word(&look, &w);
	if (word_is(w, n, "RW") || word_is(w, n, "RDONLY") || word_is(w, n, "NOACCESS"))
		return parse_extent(d, c, line, err);
	key = c->p;
	while (c->p < c->end && key_char(*c->p))
		c->p++;
	size_t klen = (size_t)(c->p - key);
	skip_blanks(c);
	if (!klen || c->p == c->end || *c->p != '=')
		return line_error(err, EUCLEAN, line, "neither KEY=VALUE nor an extent");
	c->p++;
	kv_value(c, &w, &n);
	return parse_kv(d, key, klen, w, n, line, err);
}

int
vmdk_desc_parse(const char *text, size_t len, struct vmdk_desc *d, struct td_error *err)
{
	unsigned line = 0;
	int rc;

	memset(d, 0, sizeof(*d));
	d->cid = d->parent_cid = VMDK_NO_PARENT;
	if (len > VMDK_MAX_DESC)
		return td_error_set(err, EUCLEAN, "descriptor of %zu bytes is too large (at most %u)",
				    len, VMDK_MAX_DESC);
	const char *p = text, *end = text + strnlen(text, len);
	while (p < end) {
		const char *eol = memchr(p, '\n', (size_t)(end - p));
		struct cursor c = { p, eol ? eol : end };
		if (c.end > c.p && c.end[-1] == '\r')
			c.end--;
		p = eol ? eol + 1 : end;
		if ((rc = parse_line(d, &c, ++line, err)) < 0) {
			vmdk_desc_free(d);
			return rc;
		}
	}
	if (!d->create_type[0]) {
		vmdk_desc_free(d);
		return td_error_set(err, EUCLEAN, "descriptor has no createType");
	}
	return 0;
}

void
vmdk_desc_free(struct vmdk_desc *d)
{
	for (unsigned i = 0; i < d->nr_ext; i++)
		free(d->ext[i].file);
	free(d->ext);
	free(d->parent_hint);
	d->ext = NULL;
	d->parent_hint = NULL;
	d->nr_ext = 0;
}
