#!/usr/bin/python3
"""Writes the seed corpus of fuzz_qcow2_meta: small qcow2 images made by
qemu-img and qemu-io (versions 2 and 3, 512 B to 4 KiB clusters so that the
tables are reachable within run-all's 64 KiB inputs): data, zero clusters,
compressed clusters, a backing file name, a dirty image with lazy
refcounts, other refcount widths, a persistent bitmap."""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "fuzz_qcow2_meta")


def sh(*cmd, cwd):
    subprocess.run(cmd, check=False, cwd=cwd, capture_output=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "src.raw"), "wb") as f:
            for i in range(64):
                f.write(bytes([i]) * 256 + os.urandom(256) if i % 3 else bytes(512))
        images = {
            "v2-512": ("compat=0.10,cluster_size=512", ["write -P 1 0 2k", "write -P 2 20k 1k"]),
            "v3-512": ("compat=1.1,cluster_size=512", ["write -P 1 0 2k", "write -z 4k 1k",
                                                       "discard 0 512"]),
            "v3-1k-rc1": ("cluster_size=1024,refcount_bits=1", ["write -P 3 0 4k"]),
            "v3-4k-rc64": ("cluster_size=4096,refcount_bits=64", ["write -P 4 8k 4k"]),
            "v3-dirty": ("cluster_size=512,lazy_refcounts=on", ["write -P 5 0 3k", "abort"]),
        }
        for name, (opts, cmds) in images.items():
            img = os.path.join(d, name)
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, "64k", cwd=d)
            args = ["qemu-io", "-f", "qcow2"]
            for c in cmds:
                args += ["-c", c]
            sh(*args, img, cwd=d)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "src.raw",
           "-F", "raw", "backed", "32k", cwd=d)
        sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", "src.raw",
           "compressed", cwd=d)
        sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compat=0.10,cluster_size=4096",
           "src.raw", "compressed-v2", cwd=d)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "bitmap", "64k",
           cwd=d)
        sh("qemu-img", "bitmap", "--add", "bitmap", "b0", cwd=d)
        for name in list(images) + ["backed", "compressed", "compressed-v2", "bitmap"]:
            path = os.path.join(d, name)
            if os.path.exists(path):
                with open(path, "rb") as src, open(os.path.join(OUT, name), "wb") as dst:
                    dst.write(src.read(65536))
    print("seeds in", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
