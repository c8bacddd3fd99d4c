/*
 * The VHD format (Microsoft VHD spec 1.0, plus blktap's batmap): the
 * on-disk structures, their encoding and checksums, the geometry and size
 * rules, and loading and checking a file's metadata through a read
 * callback. No I/O of its own: the driver, vhd-util and the fuzzer each
 * bring theirs.
 */
#ifndef TD_VHD_FORMAT_H
#define TD_VHD_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "driver.h"

#define VHD_SECTOR		512u
#define VHD_FOOTER_SIZE		512u
#define VHD_HEADER_SIZE		1024u
#define VHD_MAX_SIZE		(2040ULL << 30)		/* the format's ceiling */
#define VHD_BLOCK_DEFAULT	(2u << 20)
#define VHD_BLOCK_MIN		(4u << 10)
#define VHD_BLOCK_MAX		(256u << 20)
#define VHD_BAT_UNUSED		0xffffffffu
#define VHD_NO_OFFSET		0xffffffffffffffffULL
#define VHD_DATA_ALIGN		4096u	/* where this implementation puts block data */

#define VHD_TYPE_FIXED		2
#define VHD_TYPE_DYNAMIC	3
#define VHD_TYPE_DIFF		4

#define VHD_VERSION(maj, min)	(((uint32_t)(maj) << 16) | ((min) & 0xffff))
#define VHD_TAP_VERSION		VHD_VERSION(1, 3)	/* blktap's, with batmap 1.2 */
#define VHD_BATMAP_VERSION	VHD_VERSION(1, 2)

/* parent locator platform codes */
#define VHD_PLAT_NONE		0
#define VHD_PLAT_W2RU		0x57327275	/* "W2ru" relative, UTF-16LE */
#define VHD_PLAT_W2KU		0x57326b75	/* "W2ku" absolute, UTF-16LE */
#define VHD_PLAT_MACX		0x4d616358	/* "MacX" file URL, UTF-8 */

struct vhd_footer {
	char cookie[8];
	uint32_t features;
	uint32_t version;
	uint64_t data_offset;
	uint32_t timestamp;		/* seconds since 2000-01-01 UTC */
	char creator_app[4];
	uint32_t creator_version;
	uint32_t creator_os;
	uint64_t orig_size;
	uint64_t curr_size;
	uint16_t cyls;
	uint8_t heads, spt;
	uint32_t type;
	uint32_t checksum;
	uint8_t uuid[16];
	uint8_t saved;
	uint8_t hidden;			/* blktap's */
};

struct vhd_locator {
	uint32_t code;
	uint32_t data_space;		/* sectors (bytes in some writers) */
	uint32_t data_len;		/* bytes */
	uint64_t data_offset;
};

struct vhd_header {
	char cookie[8];
	uint64_t data_offset;
	uint64_t table_offset;
	uint32_t version;
	uint32_t max_bat;
	uint32_t block_size;
	uint32_t checksum;
	uint8_t parent_uuid[16];
	uint32_t parent_ts;
	uint8_t parent_name[512];	/* UTF-16BE */
	struct vhd_locator loc[8];
};

struct vhd_batmap_hdr {
	char cookie[8];
	uint64_t offset;		/* bytes */
	uint32_t size;			/* sectors */
	uint32_t version;
	uint32_t checksum;
	uint8_t marker;
};

/* Everything a VHD's metadata says, checked. */
struct vhd_meta {
	struct vhd_footer footer;
	struct vhd_header header;	/* dynamic, differencing */
	uint64_t file_size;
	uint64_t footer_offset;		/* file_size - 512 */
	uint64_t size;			/* virtual size: what qemu-img reports */
	uint32_t *bat;			/* host order; max_bat entries */
	uint32_t nr_blocks;		/* blocks covering size */
	uint32_t spb;			/* sectors per block */
	uint32_t bitmap_bytes;		/* sector-padded bitmap */
	uint64_t meta_end;		/* first byte after all metadata */
	int has_batmap;
	int batmap_stale;		/* its checksum did not match: zeroed here, rewrite it */
	struct vhd_batmap_hdr batmap_hdr;
	uint64_t batmap_hdr_offset;
	uint8_t *batmap;		/* batmap_hdr.size sectors, or NULL */
	char *parent_path;		/* differencing: resolved, or NULL */
	int parent_raw;			/* differencing on a raw parent (nil uuid) */
	char warning[256];		/* something odd but not fatal (stale batmap) */
};

/* A reader of the file: 0 or -errno; reading past the end is -EIO. */
typedef int (*vhd_read_fn)(void *ctx, void *buf, size_t len, uint64_t off);

uint32_t vhd_checksum(const uint8_t *buf, size_t len, size_t skip);
void vhd_footer_encode(const struct vhd_footer *f, uint8_t buf[VHD_FOOTER_SIZE]);
/* 0, or -EUCLEAN with why set (bad cookie, bad checksum). */
int vhd_footer_decode(const uint8_t buf[VHD_FOOTER_SIZE], struct vhd_footer *f,
		      char *why, size_t len);
void vhd_header_encode(const struct vhd_header *h, uint8_t buf[VHD_HEADER_SIZE]);
int vhd_header_decode(const uint8_t buf[VHD_HEADER_SIZE], struct vhd_header *h,
		      char *why, size_t len);
void vhd_batmap_hdr_encode(const struct vhd_batmap_hdr *b, uint8_t buf[VHD_SECTOR]);
void vhd_batmap_hdr_decode(const uint8_t buf[VHD_SECTOR], struct vhd_batmap_hdr *b);
uint32_t vhd_batmap_checksum(const uint8_t *map, size_t len);

/* CHS geometry of a size, per the spec's algorithm. */
void vhd_geometry(uint64_t size, uint16_t *cyls, uint8_t *heads, uint8_t *spt);
/* The virtual size, as qemu computes it (CHS or current_size by creator). */
uint64_t vhd_footer_size(const struct vhd_footer *f);
uint32_t vhd_time(uint64_t unix_seconds);

/*
 * Loads and checks the metadata of a file of file_size bytes. dir is the
 * directory of the file (to resolve relative parent locators); exists(path)
 * tells whether a candidate parent exists (NULL: take the first locator).
 * On error: -errno with err set to a sentence naming what is wrong.
 */
int vhd_meta_load(struct vhd_meta *m, vhd_read_fn rd, void *ctx, uint64_t file_size,
		  const char *dir, int (*exists)(const char *path), struct td_error *err);
void vhd_meta_free(struct vhd_meta *m);

/* Block geometry helpers. */
static inline uint64_t
vhd_block_offset(const struct vhd_meta *m, uint32_t blk)
{
	return (uint64_t)m->bat[blk] * VHD_SECTOR;	/* the bitmap */
}
static inline uint64_t
vhd_block_data(const struct vhd_meta *m, uint32_t blk)
{
	return vhd_block_offset(m, blk) + m->bitmap_bytes;
}
static inline int
vhd_batmap_test(const struct vhd_meta *m, uint32_t blk)
{
	return m->batmap && (m->batmap[blk >> 3] >> (7 - (blk & 7))) & 1;
}
static inline void
vhd_batmap_set(struct vhd_meta *m, uint32_t blk, int on)
{
	uint8_t bit = (uint8_t)(1u << (7 - (blk & 7)));
	if (on)
		m->batmap[blk >> 3] |= bit;
	else
		m->batmap[blk >> 3] &= (uint8_t)~bit;
}
/* Sector bitmaps: bit 7 of byte 0 is the block's first sector. */
static inline int
vhd_bitmap_test(const uint8_t *map, uint32_t sec)
{
	return (map[sec >> 3] >> (7 - (sec & 7))) & 1;
}
static inline void
vhd_bitmap_set(uint8_t *map, uint32_t sec)
{
	map[sec >> 3] |= (uint8_t)(1u << (7 - (sec & 7)));
}

/*
 * Deep check (vhd-util check): everything vhd_meta_load checks, plus every
 * allocated block's bitmap read and compared with the batmap. Appends one
 * line per problem to out (NUL-terminated); returns the number of problems.
 */
int vhd_meta_check_blocks(const struct vhd_meta *m, vhd_read_fn rd, void *ctx,
			  char *out, size_t outlen);

/* ---- creating ---- */

struct vhd_create {
	uint64_t size;			/* bytes, multiple of 512 */
	int type;			/* VHD_TYPE_* */
	uint32_t block_size;		/* 0: default */
	uint64_t max_size;		/* BAT room for growing (0: size) */
	const uint8_t *uuid;		/* NULL: random */
	/* differencing */
	const char *parent_path;	/* absolute */
	const char *child_path;		/* absolute: locators store relative too */
	const uint8_t *parent_uuid;	/* NULL: raw parent */
	uint32_t parent_ts;
};

/* A writer of the file: 0 or -errno. */
typedef int (*vhd_write_fn)(void *ctx, const void *buf, size_t len, uint64_t off);

/* Lays out and writes a new VHD (file assumed empty). 0 or -errno with err. */
/*
 * A differencing disk's header pointed at a new parent (child_path and
 * parent_path absolute): its name, uuid and timestamp, and each MACX, W2KU
 * and W2RU locator's length; texts[i] (malloc'd, the locator's whole space,
 * zero-padded) is what to write at loc[i].data_offset. -ENOSPC with err when
 * a locator's space is too small for the new path.
 */
int vhd_header_reparent(struct vhd_header *h, const char *child_path, const char *parent_path,
			const uint8_t uuid[16], uint32_t ts, uint8_t *texts[8],
			struct td_error *err);
int vhd_create_write(const struct vhd_create *c, vhd_write_fn wr, void *ctx,
		     struct td_error *err);

/* UTF-8 <-> UTF-16 for locators and the parent name (iconv). */
int vhd_utf8_to_utf16(const char *in, int big_endian, uint8_t *out, size_t outlen,
		      size_t *written);
int vhd_utf16_to_utf8(const uint8_t *in, size_t inlen, int big_endian, char *out,
		      size_t outlen);

#endif
