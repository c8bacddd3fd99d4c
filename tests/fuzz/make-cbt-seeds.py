#!/usr/bin/python3
"""Writes the seed corpus of fuzz_cbt_log: CBT logs built byte by byte from
docs/CBT-LOG.md (a 48-byte header, struct '<16s16si4xQ', then one bit per
64 KiB block), valid ones of sizes at the block and byte edges with bit
patterns, with slack after the bitmap and in its last byte, and the damaged
ones cbt-util must refuse: truncated, size 0, past the limit, flag 2."""

import os
import struct

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "fuzz_cbt_log")
BLOCK = 64 * 1024
PARENT = bytes(range(0x10, 0x20))
CHILD = bytes(range(0xa0, 0xb0))


def bitmap_len(size):
    return ((size + BLOCK - 1) // BLOCK + 7) // 8


def log(size, flag=0, bitmap=None, raw_size=None, parent=PARENT, child=CHILD):
    if bitmap is None:
        bitmap = bytes(bitmap_len(size))
    return struct.pack("<16s16si4xQ", parent, child, flag,
                       size if raw_size is None else raw_size) + bytes(bitmap)


def pattern(n):
    # runs of every kind: clear and set whole bytes, alternating bits, lone bits
    return bytes((0x00, 0xff, 0x55, 0x80, 0x0f, 0xff, 0x01, 0xf0)[i % 8] for i in range(n))


def save(name, data):
    assert len(data) <= 65536, name
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, size in (("1", 1), ("64k", BLOCK), ("64k-plus-1", BLOCK + 1),
                       ("8-blocks", 8 * BLOCK), ("9-blocks", 8 * BLOCK + 1),
                       ("100m", 100 << 20), ("10g", 10 << 30)):
        save("valid-" + name, log(size, flag=1, bitmap=pattern(bitmap_len(size))))
    save("valid-zero", log(20 * BLOCK, parent=bytes(16), child=bytes(16)))
    save("valid-all-set", log(1 << 30, bitmap=b"\xff" * bitmap_len(1 << 30)))
    save("valid-slack-bits", log(3 * BLOCK, bitmap=b"\xfd"))
    save("valid-slack-after", log(20 * BLOCK, bitmap=b"\x81\x42\x0f") + b"\xee" * 64)
    full = log(100 << 20, bitmap=pattern(bitmap_len(100 << 20)))
    save("bad-truncated", full[:-1])
    save("bad-header-only", full[:48])
    save("bad-short-header", full[:47])
    save("bad-size-0", log(BLOCK, raw_size=0))
    save("bad-size-past-limit", log(BLOCK, raw_size=(1 << 52) + 1))
    save("bad-flag-2", log(BLOCK, flag=2))
    save("bad-flag-minus-1", log(BLOCK, flag=-1))


if __name__ == "__main__":
    main()
