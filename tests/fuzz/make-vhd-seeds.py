#!/usr/bin/python3
"""Writes the seed corpus of fuzz_vhd_meta: small VHDs made by vhd-util and
qemu-img, and a hand-built dynamic VHD with 4 KiB blocks, some allocated,
with a batmap (so blocks and bitmaps are reachable in 64 KiB)."""

import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "fuzz_vhd_meta")
VHDUTIL = os.path.join(ROOT, "build", "bin", "vhd-util")


def csum(buf, skip):
    return (~sum(b for i, b in enumerate(buf) if not skip <= i < skip + 4)) & 0xFFFFFFFF


def footer(size, dtype, data_offset):
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQI4sII", f, 8, 2, 0x10000, data_offset, 0, b"tap\0", 0x10003, 0)
    struct.pack_into(">QQ", f, 40, size, size)
    struct.pack_into(">HBBI", f, 56, 16, 4, 17, dtype)
    f[68:84] = bytes(range(1, 17))
    struct.pack_into(">I", f, 64, csum(f, 64))
    return f


def small_blocks():
    bs, nblk = 4096, 8
    hdr = bytearray(1024)
    hdr[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", hdr, 8, 0xFFFFFFFFFFFFFFFF, 1536, 0x10000, nblk, bs)
    struct.pack_into(">I", hdr, 36, csum(hdr, 36))
    bat = [0xFFFFFFFF] * nblk
    img = bytearray(1536 + 512)                      # footer copy, header, BAT sector
    batmap_hdr = len(img)
    img += bytearray(1024)                           # batmap header + map
    blocks = {0: b"\xff" * 512, 3: b"\xf0" + bytes(511), 5: bytes(512)}
    for blk, bitmap in blocks.items():
        pad = (-(len(img) + 512)) % 4096
        img += bytes(pad)
        bat[blk] = len(img) // 512
        img += bitmap + bytes([blk + 1]) * bs
    struct.pack_into(">%dI" % nblk, img, 1536, *bat)
    bmap = bytearray(512)
    bmap[0] = 0x80                                   # block 0 is full
    bh = bytearray(512)
    bh[0:8] = b"tdbatmap"
    struct.pack_into(">QIII", bh, 8, batmap_hdr + 512, 1, 0x10002,
                     (~sum(bmap)) & 0xFFFFFFFF)
    img[batmap_hdr:batmap_hdr + 512] = bh
    img[batmap_hdr + 512:batmap_hdr + 1024] = bmap
    f = footer(nblk * bs, 3, 512)
    img[0:512] = f
    img[512:1536] = hdr
    return bytes(img + f)


def main():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "small-blocks"), "wb") as f:
        f.write(small_blocks())
    with tempfile.TemporaryDirectory() as d:
        def mk(name, *cmd):
            subprocess.run(cmd, check=True, cwd=d, capture_output=True)
            with open(os.path.join(d, name), "rb") as src, \
                    open(os.path.join(OUT, name), "wb") as dst:
                dst.write(src.read())
        mk("tap-dynamic.vhd", VHDUTIL, "create", "-n", "tap-dynamic.vhd", "-s", "2")
        mk("tap-child.vhd", VHDUTIL, "snapshot", "-n", "tap-child.vhd", "-p", "tap-dynamic.vhd")
        mk("qemu-dynamic.vhd", "qemu-img", "create", "-q", "-f", "vpc", "qemu-dynamic.vhd", "1M")
        mk("qemu-fixed.vhd", "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed",
           "qemu-fixed.vhd", "32k")
    print("seeds in", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
