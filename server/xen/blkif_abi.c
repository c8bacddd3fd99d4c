/* blkif request and response layouts for the native, x86_32 and x86_64 ABIs. */
#include "blkif_abi.h"

#include <string.h>

#include "byteorder.h"

/* Fields are little-endian: both ABIs are x86, and native is x86_64 here. */

/*
 * Offsets of each layout: x86_64 aligns 64-bit fields to 8 (id at 8),
 * x86_32 to 4 (id at 4). Segments are 8 bytes: gref, first, last, pad.
 */
struct layout {
	size_t req, rsp;		/* sizes */
	size_t id, sector, seg;		/* read/write */
	size_t dis_nr;			/* discard: nr_sectors */
	size_t ind_id, ind_sector, ind_grefs;
	size_t rsp_status;
};

static const struct layout layouts[2] = {
	[BLKIF_PROTO_X86_64] = { 112, 16, 8, 16, 24, 24, 8, 16, 28, 10 },
	[BLKIF_PROTO_X86_32] = { 108, 12, 4, 12, 20, 20, 4, 12, 24, 10 },
};

size_t
blkif_entry_size(int proto)
{
	const struct layout *l = &layouts[proto];
	return l->req > l->rsp ? l->req : l->rsp;
}

unsigned
blkif_ring_entries(int proto, unsigned nr_pages)
{
	size_t n = (XEN_PAGE_SIZE * (size_t)nr_pages - BLKIF_RING_HEADER) / blkif_entry_size(proto);
	unsigned p = 1;
	while ((size_t)p * 2 <= n)
		p *= 2;
	return p;
}

void
blkif_decode(int proto, const uint8_t *e, struct blkif_raw_req *r)
{
	const struct layout *l = &layouts[proto];

	memset(r, 0, sizeof(*r));
	r->op = e[0];
	switch (r->op) {
	case BLKIF_OP_DISCARD:
		r->discard_flag = e[1];
		r->id = get_le64(e + l->id);
		r->sector = get_le64(e + l->sector);
		r->nr_sectors = get_le64(e + l->dis_nr);
		break;
	case BLKIF_OP_INDIRECT:
		r->indirect_op = e[1];
		r->indirect_nr_segments = get_le16(e + 2);
		r->id = get_le64(e + l->ind_id);
		r->sector = get_le64(e + l->ind_sector);
		for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES; i++)
			r->indirect_grefs[i] = get_le32(e + l->ind_grefs + 4 * (size_t)i);
		break;
	default:
		r->nr_segments = e[1];
		r->id = get_le64(e + l->id);
		r->sector = get_le64(e + l->sector);
		for (int i = 0; i < BLKIF_MAX_SEGMENTS; i++) {
			const uint8_t *s = e + l->seg + 8 * (size_t)i;
			r->seg[i].gref = get_le32(s);
			r->seg[i].first_sect = s[4];
			r->seg[i].last_sect = s[5];
		}
		break;
	}
}

void
blkif_encode_response(int proto, uint8_t *e, uint64_t id, uint8_t op, int16_t status)
{
	const struct layout *l = &layouts[proto];
	uint8_t rsp[16] = { 0 };

	for (int i = 0; i < 8; i++)
		rsp[i] = (uint8_t)(id >> (8 * i));
	rsp[8] = op;
	rsp[l->rsp_status] = (uint8_t)status;
	rsp[l->rsp_status + 1] = (uint8_t)((uint16_t)status >> 8);
	memcpy(e, rsp, l->rsp);
}

void
blkif_indirect_seg(const uint8_t *pages, unsigned n, struct blkif_seg *s)
{
	const uint8_t *p = pages + 8 * (size_t)n;
	s->gref = get_le32(p);
	s->first_sect = p[4];
	s->last_sect = p[5];
}

const char *
blkif_check_segments(const struct blkif_seg *seg, unsigned nr, uint64_t sector,
		     uint64_t size_sectors, uint64_t *bytes)
{
	uint64_t sectors = 0;

	for (unsigned i = 0; i < nr; i++) {
		if (seg[i].first_sect > seg[i].last_sect || seg[i].last_sect >= SECTORS_PER_PAGE)
			return "segment sectors out of its page";
		sectors += (uint64_t)(seg[i].last_sect - seg[i].first_sect + 1);
	}
	if (sector > size_sectors || sectors > size_sectors - sector)
		return "request past the end of the disk";
	*bytes = sectors * 512;
	return NULL;
}

int
blkif_protocol(const char *name)
{
	if (!name || !*name || !strcmp(name, "x86_64-abi") || !strcmp(name, "native"))
		return BLKIF_PROTO_X86_64;
	if (!strcmp(name, "x86_32-abi"))
		return BLKIF_PROTO_X86_32;
	return -1;
}
