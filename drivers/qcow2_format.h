/*
 * The qcow2 format (qemu's docs/interop/qcow2.txt), versions 2 and 3: the
 * header and its extensions, L1/L2 and refcount entries, and loading a
 * file's metadata with every check the driver relies on. Also the pieces
 * that work on whole tables: counting the references of every cluster and
 * laying out fresh refcount structures (repair, creation). No I/O of its
 * own: the driver, the whole-file operations and the fuzzer bring theirs.
 */
#ifndef TD_QCOW2_FORMAT_H
#define TD_QCOW2_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "driver.h"

#define QCOW2_MAGIC		0x514649fbu	/* "QFI\xfb" */
#define QCOW2_V2_HEADER		72u
#define QCOW2_V3_HEADER		104u
#define QCOW2_MIN_CLUSTER_BITS	9
#define QCOW2_MAX_CLUSTER_BITS	21		/* 2 MiB, qemu's limit too */
#define QCOW2_DEFAULT_CLUSTER_BITS 16
#define QCOW2_MAX_L1_BYTES	(32u << 20)	/* qemu's limits */
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_BACKING_NAME	1023u
#define QCOW2_MAX_SNAPSHOTS	65536u
#define QCOW2_MAX_BITMAPS	65535u
#define QCOW2_MAX_BITMAP_DIR	(64u << 20)
#define QCOW2_MAX_HOST		(1ULL << 56)	/* L1/L2 offsets have bits 9..55 */

/* incompatible features */
#define QCOW2_INCOMPAT_DIRTY		(1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT		(1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE	(1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION	(1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2		(1ULL << 4)
/* compatible features */
#define QCOW2_COMPAT_LAZY_REFCOUNTS	(1ULL << 0)
/* autoclear features */
#define QCOW2_AUTOCLEAR_BITMAPS		(1ULL << 0)

/* header extension types */
#define QCOW2_EXT_END		0x00000000u
#define QCOW2_EXT_BACKING_FMT	0xe2792acau
#define QCOW2_EXT_FEATURES	0x6803f857u
#define QCOW2_EXT_BITMAPS	0x23852875u
#define QCOW2_EXT_CRYPTO	0x0537be77u
#define QCOW2_EXT_DATA_FILE	0x44415441u

/* L1 and L2 entries */
#define QCOW2_COPIED		(1ULL << 63)	/* refcount exactly one */
#define QCOW2_COMPRESSED	(1ULL << 62)
#define QCOW2_ZERO		(1ULL << 0)	/* v3: reads as zeros */
#define QCOW2_OFFSET_MASK	0x00fffffffffffe00ULL	/* bits 9..55 */
#define QCOW2_L1_RESERVED	0x7f000000000001ffULL
#define QCOW2_L2_RESERVED	0x3f000000000001feULL
#define QCOW2_REFT_RESERVED	0x00000000000001ffULL

struct qcow2_header {
	uint32_t magic;
	uint32_t version;
	uint64_t backing_file_offset;
	uint32_t backing_file_size;
	uint32_t cluster_bits;
	uint64_t size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_table_offset;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	/* version 3 (zero for version 2) */
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	uint32_t refcount_order;
	uint32_t header_length;
	uint8_t compression_type;
};

/* A name from the feature name table, for the error about an unknown bit. */
struct qcow2_feature_name {
	uint8_t type;		/* 0 incompatible, 1 compatible, 2 autoclear */
	uint8_t bit;
	char name[47];
};

/* Everything a qcow2's metadata says, checked. */
struct qcow2_meta {
	struct qcow2_header h;
	uint64_t file_size;
	uint32_t cluster_size;
	unsigned cluster_bits;
	unsigned l2_bits;		/* log2 of the entries in an L2 table */
	uint32_t l2_entries;
	unsigned refcount_bits;
	unsigned rb_bits;		/* log2 of the entries in a refcount block */
	uint64_t rb_entries;
	uint64_t *l1;			/* host order, h.l1_size entries */
	uint64_t *reftable;		/* host order, reftable_entries */
	uint32_t reftable_entries;
	char *backing;			/* as stored (relative or absolute), or NULL */
	char backing_fmt[32];		/* "" when the extension is absent */
	uint32_t ext_end;		/* first byte after the header extensions */
	int has_bitmaps;
	uint32_t nb_bitmaps;
	uint64_t bitmap_dir_size, bitmap_dir_offset;
	struct qcow2_feature_name *features;
	unsigned nr_features;
};

/* What a guest cluster is, by its L2 entry. */
enum qcow2_ckind {
	QCOW2_UNALLOCATED,	/* the backing file's, or zeros */
	QCOW2_ZERO_CLUSTER,	/* zeros; host may be a preallocation (or 0) */
	QCOW2_DATA,		/* at host */
	QCOW2_COMPRESSED_DATA,	/* deflate at host, csize bytes */
};

struct qcow2_cluster {
	enum qcow2_ckind kind;
	uint64_t host;		/* DATA, ZERO (0: none), COMPRESSED: exact byte */
	uint64_t csize;		/* COMPRESSED: bytes to read from host */
	uint64_t rc_start;	/* COMPRESSED: the 512-byte sectors it is counted by */
	uint64_t rc_len;
};

/* A reader of the file: 0 or -errno; reading past the end is -EIO. */
typedef int (*qcow2_read_fn)(void *ctx, void *buf, size_t len, uint64_t off);
/* A writer of the file: 0 or -errno. */
typedef int (*qcow2_write_fn)(void *ctx, const void *buf, size_t len, uint64_t off);

/* Big-endian fields. */
static inline uint64_t
qcow2_be64(const uint8_t *p)
{
	return (uint64_t)p[0] << 56 | (uint64_t)p[1] << 48 | (uint64_t)p[2] << 40 |
	       (uint64_t)p[3] << 32 | (uint64_t)p[4] << 24 | (uint64_t)p[5] << 16 |
	       (uint64_t)p[6] << 8 | p[7];
}
static inline void
qcow2_put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}
static inline void
qcow2_put64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--) {
		p[i] = (uint8_t)v;
		v >>= 8;
	}
}

/* Decodes the fixed header (buf holds at least len bytes). 0 or -EUCLEAN/why. */
int qcow2_header_decode(const uint8_t *buf, size_t len, struct qcow2_header *h,
			char *why, size_t whylen);
/* Encodes a version 3 header of QCOW2_V3_HEADER bytes (header_length 104). */
void qcow2_header_encode(const struct qcow2_header *h, uint8_t buf[QCOW2_V3_HEADER]);

/*
 * Loads and checks the metadata of a file of file_size bytes: the header,
 * its extensions, the L1 table and the refcount table. Features this code
 * cannot serve at all are refused whatever rdonly says; those that only
 * writing cannot (internal snapshots, the corrupt bit) are refused when
 * !rdonly. The dirty bit is left for the caller (qcow2_meta_dirty).
 * On error: -errno with err set to a sentence naming what is wrong.
 */
int qcow2_meta_load(struct qcow2_meta *m, qcow2_read_fn rd, void *ctx, uint64_t file_size,
		    int rdonly, struct td_error *err);
void qcow2_meta_free(struct qcow2_meta *m);

static inline int
qcow2_meta_dirty(const struct qcow2_meta *m)
{
	return (m->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) != 0;
}

/*
 * Decodes an L2 entry. limit: host clusters must end at or before it (the
 * end of the file as the caller knows it). 0, or -EUCLEAN with why set.
 */
int qcow2_l2_decode(const struct qcow2_meta *m, uint64_t entry, uint64_t limit,
		    struct qcow2_cluster *c, char *why, size_t whylen);
/* Checks every entry of a raw (big-endian) L2 table. 0, or -EUCLEAN/why. */
int qcow2_l2_check(const struct qcow2_meta *m, const uint8_t *table, uint64_t limit,
		   char *why, size_t whylen);
/* Does [off, off+len) overlap the header cluster, the L1 table or the refcount table? */
const char *qcow2_overlaps_meta(const struct qcow2_meta *m, uint64_t off, uint64_t len);

/* Refcount block entries of any width (refcount_bits 1..64). */
uint64_t qcow2_rc_get(const uint8_t *block, uint64_t idx, unsigned bits);
void qcow2_rc_set(uint8_t *block, uint64_t idx, unsigned bits, uint64_t v);
/* The bytes of a refcount block holding entries [first, last]. */
void qcow2_rc_bytes(uint64_t first, uint64_t last, unsigned bits, uint64_t *off,
		    uint64_t *len);

/* Inflates one compressed cluster (raw deflate) into out[cluster_size]. 0 or -EIO. */
int qcow2_inflate(const uint8_t *in, size_t inlen, uint8_t *out, size_t outlen);

/*
 * Counts the references to every host cluster [0, n): the header, the L1
 * table, L2 tables, data (compressed data counts once per cluster it
 * touches), preallocated zero clusters. The refcount structures themselves
 * are not counted (a rebuild replaces them). Refuses images with internal
 * snapshots or persistent bitmaps (never opened for writing). 0, or -errno
 * with err set.
 */
int qcow2_count_refs(const struct qcow2_meta *m, qcow2_read_fn rd, void *ctx,
		     uint32_t *counts, uint64_t n, struct td_error *err);

/*
 * Lays out refcount blocks and a table after cluster `first` that count
 * counts[0..n) (and themselves), writes them, and returns where the table
 * went. The header is not touched. 0, or -errno with err set.
 */
int qcow2_refcounts_write(const struct qcow2_meta *m, const uint32_t *counts, uint64_t n,
			  uint64_t first, qcow2_write_fn wr, void *ctx,
			  uint64_t *table_off, uint32_t *table_clusters, struct td_error *err);

/* ---- creating ---- */

struct qcow2_create {
	uint64_t size;			/* virtual bytes */
	unsigned cluster_bits;		/* 0: 64 KiB */
	const char *backing;		/* NULL: none */
	const char *backing_fmt;	/* with backing */
};

/* Writes a new, empty version 3 image (refcount_bits 16) through wr. */
int qcow2_create_write(const struct qcow2_create *c, qcow2_write_fn wr, void *ctx,
		       struct td_error *err);

#endif
