/*
 * The blkif ring ABI (xen/io/blkif.h, xen/io/ring.h): the three request
 * layouts (native = x86_64 here, x86_32, x86_64), decoded from a private
 * copy of each ring entry, and validated into a canonical request. Pure:
 * no I/O, so it is unit-tested and fuzzed on its own.
 */
#ifndef TD_BLKIF_ABI_H
#define TD_BLKIF_ABI_H

#include <stddef.h>
#include <stdint.h>

#define XEN_PAGE_SIZE		4096u
#define SECTORS_PER_PAGE	(XEN_PAGE_SIZE / 512)

#define BLKIF_PROTO_X86_64	0	/* and native on 64-bit hosts */
#define BLKIF_PROTO_X86_32	1

#define BLKIF_OP_READ		0
#define BLKIF_OP_WRITE		1
#define BLKIF_OP_WRITE_BARRIER	2
#define BLKIF_OP_FLUSH_DISKCACHE 3
#define BLKIF_OP_DISCARD	5
#define BLKIF_OP_INDIRECT	6

#define BLKIF_MAX_SEGMENTS	11
#define BLKIF_MAX_INDIRECT_PAGES 8
#define BLKIF_SEGS_PER_INDIRECT_PAGE (XEN_PAGE_SIZE / 8)
#define BLKIF_MAX_INDIRECT_SEGMENTS 256	/* what we advertise */
#define BLKIF_DISCARD_SECURE	1

#define BLKIF_RSP_EOPNOTSUPP	(-2)
#define BLKIF_RSP_ERROR		(-1)
#define BLKIF_RSP_OKAY		0

#define BLKIF_RING_HEADER	64	/* req_prod, req_event, rsp_prod, rsp_event, padding */
#define BLKIF_MAX_RING_ORDER	4	/* 16 pages */

struct blkif_seg {
	uint32_t gref;
	uint8_t first_sect, last_sect;
};

/* A request as the guest wrote it, copied out of the ring. */
struct blkif_raw_req {
	uint8_t op;
	uint8_t nr_segments;		/* READ/WRITE/BARRIER/FLUSH */
	uint8_t indirect_op;		/* INDIRECT */
	uint8_t discard_flag;		/* DISCARD */
	uint16_t indirect_nr_segments;
	uint64_t id;
	uint64_t sector;
	uint64_t nr_sectors;		/* DISCARD */
	uint32_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES];
	struct blkif_seg seg[BLKIF_MAX_SEGMENTS];
};

size_t blkif_entry_size(int proto);
/* Entries of a ring of nr_pages pages (a power of two). */
unsigned blkif_ring_entries(int proto, unsigned nr_pages);
/* Decodes one entry (already copied out of shared memory). */
void blkif_decode(int proto, const uint8_t *entry, struct blkif_raw_req *r);
void blkif_encode_response(int proto, uint8_t *entry, uint64_t id, uint8_t op, int16_t status);
/* Decodes segment n of indirect descriptor pages (already copied). */
void blkif_indirect_seg(const uint8_t *pages, unsigned n, struct blkif_seg *s);

/*
 * Checks a data request (direct or, with segs, indirect) against a disk of
 * size_sectors and computes its byte length. Returns 0, or a static
 * sentence saying what is wrong.
 */
const char *blkif_check_segments(const struct blkif_seg *seg, unsigned nr,
				 uint64_t sector, uint64_t size_sectors, uint64_t *bytes);

/* "x86_32-abi", "x86_64-abi", "native"/absent; -1 for anything else. */
int blkif_protocol(const char *name);

#endif
