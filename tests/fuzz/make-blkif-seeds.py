#!/usr/bin/python3
"""Writes the seed corpus of fuzz_blkif: well-formed rings of each kind of
request (read, write, barrier, flush, discard, indirect) in both layouts,
with their data and indirect pages, from the structs in xen/io/blkif.h.
See the input layout at the top of fuzz_blkif.c."""

import os
import struct

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "fuzz_blkif")
DATA_PAGE = 8                      # guest page the input's tail starts at
READ, WRITE, BARRIER, FLUSH, DISCARD, INDIRECT = 0, 1, 2, 3, 5, 6


def entry(x86_32, op, rid, sector=0, segs=(), nr_sectors=0, flag=0, ind_op=0,
          ind_nr=0, ind_grefs=()):
    """One request. x86_64 aligns the 64-bit id to 8, x86_32 to 4."""
    a = 4 if x86_32 else 8
    size = 108 if x86_32 else 112
    e = bytearray(size)
    e[0] = op
    if op == DISCARD:
        e[1] = flag
        struct.pack_into("<QQQ", e, a, rid, sector, nr_sectors)
    elif op == INDIRECT:
        e[1] = ind_op
        struct.pack_into("<H", e, 2, ind_nr)
        struct.pack_into("<QQ", e, a, rid, sector)
        # handle (u16) after the sector, then the grefs 4-aligned
        for i, g in enumerate(ind_grefs):
            struct.pack_into("<I", e, a + 20 + 4 * i, g)
    else:
        e[1] = len(segs)
        # handle (u16) at 2, then id, sector and the segments
        struct.pack_into("<QQ", e, a, rid, sector)
        for i, (gref, first, last) in enumerate(segs):
            struct.pack_into("<IBB", e, a + 16 + 8 * i, gref, first, last)
    return bytes(e)


def seed(name, mode, entries, tail=b""):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([mode, len(entries)]) + b"".join(entries) + tail)


def main():
    for x86_32 in (0, 1):
        p = "x86_32" if x86_32 else "x86_64"
        g = DATA_PAGE
        rw = [entry(x86_32, WRITE, 1, 0, [(g, 0, 7), (g + 1, 0, 7)]),
              entry(x86_32, READ, 2, 0, [(g + 2, 0, 7)]),
              entry(x86_32, WRITE, 3, 64, [(g + 3, 2, 5)]),
              entry(x86_32, READ, 4, 2040, [(g + 4, 0, 7)])]
        seed(p + "-read-write", x86_32, rw, b"\x5a" * 8192)
        seed(p + "-barrier-flush", x86_32 | 0x40, [
            entry(x86_32, WRITE, 1, 8, [(g, 0, 7)]),
            entry(x86_32, BARRIER, 2, 16, [(g + 1, 0, 7)]),
            entry(x86_32, READ, 3, 16, [(g + 2, 0, 7)]),
            entry(x86_32, FLUSH, 4),
            entry(x86_32, FLUSH, 5, 24, [(g + 3, 0, 7)])], b"\xa5" * 4096)
        seed(p + "-discard", x86_32, [
            entry(x86_32, DISCARD, 1, 0, nr_sectors=64),
            entry(x86_32, DISCARD, 2, 128, nr_sectors=8, flag=1),
            entry(x86_32, DISCARD, 3, 2047, nr_sectors=2)])
        # 300 segments over two descriptor pages (8 and 9), data from page 10
        desc = b"".join(struct.pack("<IBBH", 10 + (i % 40), 0, 7, 0) for i in range(300))
        seed(p + "-indirect", x86_32 | 0x04, [
            entry(x86_32, INDIRECT, 1, 0, ind_op=WRITE, ind_nr=200, ind_grefs=[8, 9]),
            entry(x86_32, INDIRECT, 2, 0, ind_op=READ, ind_nr=256, ind_grefs=[8, 9]),
            entry(x86_32, INDIRECT, 3, 0, ind_op=READ, ind_nr=300, ind_grefs=[8, 9])],
            desc.ljust(8192, b"\0"))
        seed(p + "-readonly-disconnect", x86_32 | 0x18, rw)
        seed(p + "-ahead", x86_32 | 0x20, [], struct.pack("<I", 1000))


if __name__ == "__main__":
    main()
