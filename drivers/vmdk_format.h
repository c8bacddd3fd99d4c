/*
 * The VMDK format (VMware "Virtual Disk Format" 1.1, with 5.0's zeroed
 * grains): the hosted sparse extent header, the grain directory and grain
 * tables, stream-optimized grain markers and their deflate payload, and
 * the text descriptor. Parsing and checking only, through a read callback:
 * the driver, the unit tests and the fuzzer each bring their own I/O.
 *
 * Everything read from a file is hostile until checked here: an extent
 * that loads cannot make the driver read outside its file, allocate more
 * than the limits below, or inflate more than one grain.
 */
#ifndef TD_VMDK_FORMAT_H
#define TD_VMDK_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "driver.h"

#define VMDK_SECTOR		512u
#define VMDK_MAGIC		0x564d444bu		/* "KDMV" on disk */
#define VMDK_COWD_MAGIC		0x44574f43u		/* "COWD": ESX sparse, VMDK3 */
#define VMDK_GD_AT_END		0xffffffffffffffffULL	/* stream: see the footer */
#define VMDK_NO_PARENT		0xffffffffu		/* parentCID of a base disk */
#define VMDK_GTE_ZERO		1u	/* zeroed grain, when VMDK_FLAG_ZERO_GRAIN */

/* header flags */
#define VMDK_FLAG_NL_TEST	(1u << 0)	/* the newline bytes are meaningful */
#define VMDK_FLAG_RGD		(1u << 1)	/* a redundant grain directory exists */
#define VMDK_FLAG_ZERO_GRAIN	(1u << 2)	/* GTE 1 reads as zeros */
#define VMDK_FLAG_COMPRESSED	(1u << 16)
#define VMDK_FLAG_MARKERS	(1u << 17)	/* grains start with a marker */

#define VMDK_COMPRESS_NONE	0
#define VMDK_COMPRESS_DEFLATE	1

/* stream-optimized metadata marker types */
#define VMDK_MARKER_EOS		0
#define VMDK_MARKER_GT		1
#define VMDK_MARKER_GD		2
#define VMDK_MARKER_FOOTER	3
#define VMDK_GRAIN_MARKER	12u	/* lba (8) + compressed size (4) */

/* What a file may ask of us. */
#define VMDK_MAX_SIZE		(64ULL << 40)	/* virtual bytes; VMware stops at 62 TB */
#define VMDK_MAX_GRAIN		(1u << 20)	/* bytes; every known writer uses 64 KiB */
#define VMDK_MAX_GTES		512u		/* per grain table, as the spec fixes it */
#define VMDK_MAX_GD_ENTRIES	(1u << 20)	/* a 4 MiB grain directory */
#define VMDK_MAX_DESC		(256u << 10)	/* descriptor text */
#define VMDK_MAX_EXTENTS	1024u
#define VMDK_MAX_NAME		1024u		/* an extent's or parent's file name */

/* A reader of the file: 0 or -errno; reading past the end is -EIO. */
typedef int (*vmdk_read_fn)(void *ctx, void *buf, size_t len, uint64_t off);

/* SparseExtentHeader: 512 bytes, little-endian, sectors unless said. */
struct vmdk_header {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint64_t capacity;
	uint64_t grain_size;
	uint64_t desc_offset;
	uint64_t desc_size;
	uint32_t gtes;			/* numGTEsPerGT */
	uint64_t rgd_offset;
	uint64_t gd_offset;
	uint64_t overhead;
	uint8_t unclean;
	uint8_t nl[4];			/* '\n' ' ' '\r' '\n' unless mangled */
	uint16_t compress;
};

void vmdk_header_decode(const uint8_t buf[VMDK_SECTOR], struct vmdk_header *h);

enum vmdk_file_kind {
	VMDK_FILE_SPARSE,		/* a hosted sparse extent (KDMV) */
	VMDK_FILE_COWD,			/* ESX sparse / VMDK3: not supported */
	VMDK_FILE_TEXT,			/* anything else: maybe a descriptor */
};
enum vmdk_file_kind vmdk_probe(const uint8_t *buf, size_t len);

/* A hosted sparse extent, checked (monolithicSparse, -sNNN files, stream). */
struct vmdk_sparse {
	struct vmdk_header h;		/* the footer's when the stream has one */
	uint64_t file_size;
	uint64_t capacity;		/* sectors */
	uint32_t grain_bytes;
	uint32_t gtes;			/* entries per grain table */
	uint32_t gt_bytes;
	uint32_t nr_gdes;
	uint32_t *gd;			/* host order: each grain table's sector, 0 none */
	int compressed, markers, zero_grain;
	uint32_t zread_max;		/* bytes to read for one compressed grain */
};

/*
 * Loads and checks the header (the footer of a stream whose directory is
 * at the end) and the grain directory. -errno with err set to a sentence
 * naming what is wrong.
 */
int vmdk_sparse_load(struct vmdk_sparse *s, vmdk_read_fn rd, void *ctx, uint64_t file_size,
		     struct td_error *err);
void vmdk_sparse_free(struct vmdk_sparse *s);
/* The embedded descriptor (NUL-terminated, malloc'd), or *text = NULL if none. */
int vmdk_sparse_descriptor(const struct vmdk_sparse *s, vmdk_read_fn rd, void *ctx,
			   char **text, struct td_error *err);

/* The grain holding byte of the extent, and the grain table mapping a grain. */
static inline uint64_t
vmdk_grain_of(const struct vmdk_sparse *s, uint64_t byte)
{
	return byte / s->grain_bytes;
}
static inline uint32_t
vmdk_gd_index(const struct vmdk_sparse *s, uint64_t grain)
{
	return (uint32_t)(grain / s->gtes);
}
/* A grain table, read little-endian from the file, to host order in place. */
void vmdk_gt_decode(uint32_t *gt, uint32_t n);

enum vmdk_grain_kind {
	VMDK_GRAIN_UNALLOC,		/* the parent's, or zeros */
	VMDK_GRAIN_ZERO,		/* zeroed grain: zeros, hiding any parent */
	VMDK_GRAIN_DATA,		/* grain_bytes at *off */
	VMDK_GRAIN_COMPRESSED,		/* a (marker and) deflate stream at *off */
};
/* Bytes of grain that lie inside the extent (the last may be partial). */
uint32_t vmdk_grain_need(const struct vmdk_sparse *s, uint64_t grain);
/*
 * What grain table entry gte says of grain (its index in the extent), with
 * its byte offset in the file in *off; the grain must lie inside the file.
 * A kind, or -EUCLEAN with why set.
 */
int vmdk_grain_decode(const struct vmdk_sparse *s, uint64_t grain, uint32_t gte, uint64_t *off,
		      char *why, size_t whylen);
/* How many bytes to read at off for a compressed grain (up to the file's end). */
uint32_t vmdk_grain_zread_len(const struct vmdk_sparse *s, uint64_t off);
/*
 * Inflates a compressed grain from in (inlen bytes read at its offset) into
 * out (grain_bytes). 0, or -EUCLEAN with why set (a marker that does not
 * fit, names another grain, or a stream that does not inflate to the grain).
 */
int vmdk_grain_inflate(const struct vmdk_sparse *s, uint64_t grain, const uint8_t *in,
		       size_t inlen, uint8_t *out, char *why, size_t whylen);

/* ---- the text descriptor ---- */

enum vmdk_ext_type {
	VMDK_EXT_FLAT,			/* FLAT and VMFS: raw sectors at an offset */
	VMDK_EXT_SPARSE,		/* a hosted sparse extent file */
	VMDK_EXT_ZERO,			/* reads zeros, no file */
};

struct vmdk_desc_extent {
	enum vmdk_ext_type type;
	uint64_t sectors;
	uint64_t offset;		/* FLAT: sectors into the file */
	char *file;			/* relative to the descriptor; NULL for ZERO */
};

struct vmdk_desc {
	unsigned version;		/* 0 if absent */
	uint32_t cid, parent_cid;
	char create_type[64];
	char *parent_hint;		/* parentFileNameHint, or NULL */
	struct vmdk_desc_extent *ext;
	unsigned nr_ext;
	uint64_t sectors;		/* of all extents */
};

/*
 * Parses descriptor text (up to len bytes or a NUL). Extent files must be
 * relative names that stay in the descriptor's directory (see
 * vmdk_name_check). -errno with err set, naming the line.
 */
int vmdk_desc_parse(const char *text, size_t len, struct vmdk_desc *d, struct td_error *err);
void vmdk_desc_free(struct vmdk_desc *d);
/* 0 if name may name an extent: relative, no ".." component; else -EACCES with why. */
int vmdk_name_check(const char *name, char *why, size_t whylen);

#endif
