"""Builds VMDK files byte by byte, as VMware's Virtual Disk Format 1.1 lays
them out, for what qemu-img does not write: stream-optimized extents with
the grain directory at the end (VMware's own streams: grain markers, table
and directory markers, footer, end-of-stream), small grains (fuzz seeds),
and places to damage (offsets of the header fields, tables, markers)."""

import struct
import zlib

SECTOR = 512
MAGIC = 0x564D444B
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL, FLAG_RGD, FLAG_ZERO_GRAIN = 1, 2, 4
FLAG_COMPRESSED, FLAG_MARKERS = 1 << 16, 1 << 17
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3

# byte offsets of SparseExtentHeader fields
H_VERSION, H_FLAGS, H_CAPACITY, H_GRAIN, H_DESC_OFF, H_DESC_SIZE = 4, 8, 12, 20, 28, 36
H_GTES, H_RGD, H_GD, H_OVERHEAD, H_NL, H_COMPRESS = 44, 48, 56, 64, 73, 77


def header(capacity, grain, desc_off, desc_size, gtes, gd_off, overhead, flags=FLAG_NL,
           version=1, compress=0):
    h = struct.pack("<IIIQQQQIQQQB4sH", MAGIC, version, flags, capacity, grain, desc_off,
                    desc_size, gtes, 0, gd_off, overhead, 0, b"\n \r\n", compress)
    return h.ljust(SECTOR, b"\0")


def descriptor(create_type, extents, cid=0x12345678, parent_cid=0xFFFFFFFF, hint=None):
    """extents: lines such as 'RW 2048 SPARSE "x.vmdk"'."""
    lines = ["# Disk DescriptorFile", "version=1", "CID=%08x" % cid,
             "parentCID=%08x" % parent_cid, 'createType="%s"' % create_type]
    if hint:
        lines.append('parentFileNameHint="%s"' % hint)
    lines += ["", "# Extent description"] + extents + ["", "# The Disk Data Base", "#DDB", "",
                                                       'ddb.virtualHWVersion = "4"',
                                                       'ddb.adapterType = "ide"', ""]
    return "\n".join(lines).encode()


def pad(b):
    return b + bytes(-len(b) % SECTOR)


def marker(val, mtype):
    return struct.pack("<QII", val, 0, mtype).ljust(SECTOR, b"\0")


class Image:
    """A growing file, sector by sector."""

    def __init__(self):
        self.data = bytearray()

    @property
    def sector(self):
        return len(self.data) // SECTOR

    def add(self, b):
        at = self.sector
        self.data += pad(bytes(b))
        return at


def _grains(raw, grain_bytes):
    for g in range(0, (len(raw) + grain_bytes - 1) // grain_bytes):
        chunk = raw[g * grain_bytes:(g + 1) * grain_bytes]
        if any(chunk):
            yield g, chunk


def stream(raw, name="s.vmdk", grain=128, gtes=512, gd_at_end=True, level=6):
    """A stream-optimized extent of raw (a multiple of 512 bytes), as VMware
    writes it. Returns (bytes, info): info has each grain's sector, the
    tables' and the directory's."""
    capacity = len(raw) // SECTOR
    gb = grain * SECTOR
    ngt = (capacity + grain * gtes - 1) // (grain * gtes)
    desc = pad(descriptor("streamOptimized", ['RW %d SPARSE "%s"' % (capacity, name)]))
    flags = FLAG_NL | FLAG_COMPRESSED | FLAG_MARKERS
    img = Image()
    img.add(header(capacity, grain, 1, len(desc) // SECTOR, gtes, GD_AT_END, 0, flags, 3, 1))
    img.add(desc)
    gt = [[0] * gtes for _ in range(ngt)]
    info = {"grains": {}}
    for g, chunk in _grains(raw, gb):
        z = zlib.compress(chunk, level)
        at = img.add(struct.pack("<QI", g * grain, len(z)) + z)
        gt[g // gtes][g % gtes] = at
        info["grains"][g] = at
    gd = [0] * ngt
    for t in range(ngt):
        if any(gt[t]):
            img.add(marker(gtes * 4 // SECTOR or 1, MARKER_GT))
            gd[t] = img.add(struct.pack("<%dI" % gtes, *gt[t]))
    img.add(marker(len(pad(bytes(4 * ngt))) // SECTOR, MARKER_GD))
    info["gd"] = img.add(struct.pack("<%dI" % ngt, *gd))
    info["gt"] = gd
    img.add(marker(1, MARKER_FOOTER))
    info["footer"] = img.add(header(capacity, grain, 1, len(desc) // SECTOR, gtes, info["gd"],
                                    0, flags, 3, 1))
    img.add(marker(0, MARKER_EOS))
    if not gd_at_end:
        img.data[0:SECTOR] = header(capacity, grain, 1, len(desc) // SECTOR, gtes, info["gd"],
                                    0, flags, 3, 1)
    return bytes(img.data), info


def sparse(raw, name="m.vmdk", grain=8, gtes=16, zero_grains=(), embed=True):
    """A hosted sparse extent (monolithicSparse, or an -sNNN file without
    descriptor), every table allocated; zero_grains: grain indexes written
    as zeroed-grain entries (version 2)."""
    capacity = len(raw) // SECTOR
    gb = grain * SECTOR
    ngt = (capacity + grain * gtes - 1) // (grain * gtes)
    desc = pad(descriptor("monolithicSparse", ['RW %d SPARSE "%s"' % (capacity, name)])) \
        if embed else b""
    gd_sectors = len(pad(bytes(4 * ngt))) // SECTOR
    gt_sectors = len(pad(bytes(4 * gtes))) // SECTOR
    gd_off = 1 + len(desc) // SECTOR
    overhead = gd_off + gd_sectors + ngt * gt_sectors
    flags = FLAG_NL | (FLAG_ZERO_GRAIN if zero_grains else 0)
    img = Image()
    img.add(header(capacity, grain, 1 if desc else 0, len(desc) // SECTOR, gtes, gd_off,
                   overhead, flags, 2 if zero_grains else 1))
    img.add(desc)
    gts = [gd_off + gd_sectors + t * gt_sectors for t in range(ngt)]
    img.add(struct.pack("<%dI" % ngt, *gts))
    entries = [0] * (ngt * gtes)
    for t in range(ngt):
        img.add(bytes(gt_sectors * SECTOR))
    for g, chunk in _grains(raw, gb):
        entries[g] = img.add(chunk.ljust(gb, b"\0"))
    for g in zero_grains:
        entries[g] = 1
    for t in range(ngt):
        struct.pack_into("<%dI" % gtes, img.data, gts[t] * SECTOR,
                         *entries[t * gtes:(t + 1) * gtes])
    return bytes(img.data)


def gt_entry_offset(data, table_sector, index):
    """Byte offset of entry index of the grain table at table_sector."""
    return table_sector * SECTOR + 4 * index


def read_header(data, off=0):
    f = struct.unpack_from("<IIIQQQQIQQQ", data, off)
    keys = ("magic", "version", "flags", "capacity", "grain", "desc_off", "desc_size",
            "gtes", "rgd", "gd", "overhead")
    return dict(zip(keys, f))
