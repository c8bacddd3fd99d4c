#!/usr/bin/python3
"""Writes the seed corpus of fuzz_vmdk_meta: small VMDKs and descriptors made
by qemu-img (every subformat, a delta disk, zeroed grains), and hand-built
extents with 4 KiB grains (tests/integration/vmdkgen.py) so that grain
tables, grains and stream markers fit in libFuzzer's 64 KiB inputs."""

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "fuzz_vmdk_meta")
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import vmdkgen  # noqa: E402

MAX = 65536


def qemu(*args):
    subprocess.run(["qemu-img"] + list(args), check=True, capture_output=True)


def keep(src, name):
    with open(src, "rb") as f:
        data = f.read()
    save(data[:MAX], name)


def save(data, name):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def pattern(size):
    raw = bytearray(size)
    for i, off in enumerate(range(0, size, 12288)):
        raw[off:off + 1024] = bytes([i + 1]) * 1024
    return bytes(raw)


def main():
    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp()
    try:
        for sub in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                    "twoGbMaxExtentFlat", "streamOptimized"):
            path = os.path.join(tmp, sub + ".vmdk")
            qemu("create", "-q", "-f", "vmdk", "-o", "subformat=" + sub, path, "1M")
            keep(path, "qemu-" + sub)
        base = os.path.join(tmp, "base.vmdk")
        qemu("create", "-q", "-f", "vmdk", base, "1M")
        child = os.path.join(tmp, "child.vmdk")
        qemu("create", "-q", "-f", "vmdk", "-b", base, "-F", "vmdk", child)
        keep(child, "qemu-delta")
        split = os.path.join(tmp, "split.vmdk")
        qemu("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", split, "5G")
        keep(split, "qemu-split-descriptor")
        raw = pattern(64 * 1024)
        save(vmdkgen.sparse(raw), "small-sparse")
        save(vmdkgen.sparse(raw, zero_grains=(3, 5)), "small-sparse-zeroed")
        save(vmdkgen.stream(raw, grain=8, gtes=16)[0], "small-stream-footer")
        save(vmdkgen.stream(raw, grain=8, gtes=16, gd_at_end=False)[0], "small-stream")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
