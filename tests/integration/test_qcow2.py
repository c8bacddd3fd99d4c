"""The qcow2 driver, proven against qemu-img: images qemu-img makes (versions
2 and 3, cluster sizes 4 KiB to 2 MiB, backing files, compressed clusters)
read identically, and block status matches `qemu-img map`; after every test
that writes, `qemu-img check` finds no error and no leak and the content is
what was written; dirty images are repaired, unsupported features and
damaged images refused with one clear line; live snapshots; kill -9 under
load; ext4 on a qcow2."""

import json
import os
import random
import struct
import subprocess
import sys
import time

import nbd
import pytest

from conftest import ControlError, run
from imagetests import (connect, export_bytes, ext4_check_raw, ext4_on_vbd, kill9_rounds,
                        snapshots_under_fio)

MiB = 1 << 20


# ---- helpers ----

def qcow2(path, size, compat="1.1", cluster=65536, backing=None, backing_fmt=None, opts=""):
    o = "compat=%s,cluster_size=%d%s" % (compat, cluster, "," + opts if opts else "")
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", o]
    if backing:
        args += ["-b", backing, "-F", backing_fmt]
    run(*args, str(path), str(size))
    return str(path)


def check_clean(path):
    """qemu-img check: no errors, no leaks (its exit status is 3 for leaks)."""
    r = run("qemu-img", "check", path, check=False)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    assert "leaked" not in r.stdout, r.stdout
    return r.stdout


def to_raw(path, out):
    run("qemu-img", "convert", "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def qemu_extents(path):
    """qemu-img map as (start, length, data, zero) runs, adjacent ones merged."""
    out = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
    return merge([(e["start"], e["length"], e["data"], e["zero"]) for e in out])


def nbd_extents(uri):
    out = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    return merge([(e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2))
                  for e in out])


def merge(runs):
    res = []
    for start, length, data, zero in runs:
        if res and res[-1][2:] == (data, zero) and res[-1][0] + res[-1][1] == start:
            res[-1] = (res[-1][0], res[-1][1] + length, data, zero)
        else:
            res.append((start, length, data, zero))
    return res


class Header:
    """Pokes at a qcow2 file's header fields and first cluster."""

    FIELDS = {"magic": (0, ">I"), "version": (4, ">I"), "backing_offset": (8, ">Q"),
              "backing_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
              "crypt": (32, ">I"), "l1_size": (36, ">I"), "l1_offset": (40, ">Q"),
              "rt_offset": (48, ">Q"), "rt_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
              "incompat": (72, ">Q"), "compat": (80, ">Q"), "autoclear": (88, ">Q"),
              "refcount_order": (96, ">I"), "header_length": (100, ">I")}

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())

    def __getitem__(self, name):
        off, fmt = self.FIELDS[name]
        return struct.unpack_from(fmt, self.data, off)[0]

    def __setitem__(self, name, value):
        off, fmt = self.FIELDS[name]
        struct.pack_into(fmt, self.data, off, value)

    def u64(self, off, value=None):
        if value is None:
            return struct.unpack_from(">Q", self.data, off)[0]
        struct.pack_into(">Q", self.data, off, value)

    def extensions(self):
        """(offset, type, length) of each header extension."""
        off, res = self["header_length"], []
        while off + 8 <= len(self.data):
            t, n = struct.unpack_from(">II", self.data, off)
            if t == 0:
                break
            res.append((off, t, n))
            off += 8 + (n + 7) // 8 * 8
        return res

    def save(self):
        with open(self.path, "wb") as f:
            f.write(self.data)


# ---- images qemu-img makes ----

@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("cluster", [4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_images_read_identically(server, tmp_path, compat, cluster, backing):
    base = make_base(tmp_path, "qcow2", 16 * MiB)[0] if backing else None
    img = qcow2(tmp_path / "q.qcow2", 24 * MiB, compat, cluster, base, "qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 1049088 100k",
        "-c", "write -z 4M 2M", "-c", "write -P 0x63 6M 3M", "-c", "discard 7M 1M",
        "-c", "write -P 0x64 %d 4k" % (24 * MiB - 4096), img)
    r = server.open("qcow2:" + img, readonly=True)
    assert r["size"] == 24 * MiB
    expect = to_raw(img, str(tmp_path / "expect.raw"))
    assert export_bytes(server, r["minor"], str(tmp_path / "got.raw")) == expect
    assert nbd_extents(server.uri(r["minor"])) == qemu_extents(img)


@pytest.mark.parametrize("compat,cluster", [("0.10", 65536), ("1.1", 4096)])
def test_compressed_clusters_read_and_overwritten(server, tmp_path, compat, cluster):
    src = bytearray(8 * MiB)
    rnd = random.Random(7)
    for off in range(0, len(src), 3 * cluster):
        src[off:off + cluster] = bytes([rnd.randrange(256)]) * (cluster // 2) + rnd.randbytes(cluster // 2)
    with open(tmp_path / "src.raw", "wb") as f:
        f.write(src)
    img = str(tmp_path / "c.qcow2")
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compat=%s,cluster_size=%d" % (compat, cluster),
        str(tmp_path / "src.raw"), img)
    info = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
    assert info["compressed-clusters"] > 0
    r = server.open("qcow2:" + img)
    assert export_bytes(server, r["minor"], str(tmp_path / "got.raw")) == bytes(src)
    h = connect(server, r["minor"])
    for off, n in [(100, 5000), (3 * cluster + 512, 1024), (6 * cluster, cluster), (5 * MiB, 3 * cluster)]:
        blob = rnd.randbytes(n)
        h.pwrite(blob, off)
        src[off:off + n] = blob
    h.zero(2 * cluster, 9 * cluster)
    src[9 * cluster:11 * cluster] = bytes(2 * cluster)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    assert to_raw(img, str(tmp_path / "out.raw")) == bytes(src)


def make_base(tmp_path, fmt, size=8 * MiB):
    """A base image of each format this project reads, its first 6 MiB patterned."""
    data = bytes(random.Random(3).randbytes(6 * MiB)) + bytes(size - 6 * MiB)
    raw = str(tmp_path / "base.raw")
    with open(raw, "wb") as f:
        f.write(data)
    if fmt == "raw":
        return raw, data
    path = str(tmp_path / ("base." + fmt))
    run("qemu-img", "convert", "-O", fmt, raw, path)
    return path, data


@pytest.mark.parametrize("base_fmt", ["raw", "vpc", "qcow2"])
def test_backing_files_of_every_format(server, tmp_path, base_fmt):
    base, data = make_base(tmp_path, base_fmt)
    before = open(base, "rb").read()
    img = qcow2(tmp_path / "child.qcow2", 12 * MiB, backing=base, backing_fmt=base_fmt)
    r = server.open("qcow2:" + img)
    assert len(server.stats(r["minor"])["images"]) == 2
    expect = bytearray(data + bytes(4 * MiB))
    if base_fmt == "vpc":       # qemu's vpc rounds to its CHS geometry
        psize = server.stats(r["minor"])["images"][1]["size"]
        expect[psize:] = bytes(len(expect) - psize)
    assert export_bytes(server, r["minor"], str(tmp_path / "got.raw")) == bytes(expect)
    h = connect(server, r["minor"])
    for off, n in [(1024, 3072), (65536 * 5 + 512, 65536), (8 * MiB - 4096, 8192), (11 * MiB, 512)]:
        blob = os.urandom(n)   # partial clusters (whole sectors: vhd): the rest from the base
        h.pwrite(blob, off)
        expect[off:off + n] = blob
    h.zero(65536, 2 * MiB)      # must hide the base
    expect[2 * MiB:2 * MiB + 65536] = bytes(65536)
    assert h.pread(12 * MiB, 0) == bytes(expect)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    assert to_raw(img, str(tmp_path / "out.raw")) == bytes(expect)
    assert open(base, "rb").read() == before


def test_backing_format_probed_when_not_recorded(server, tmp_path):
    base, data = make_base(tmp_path, "qcow2")
    img = qcow2(tmp_path / "child.qcow2", 8 * MiB, backing=base, backing_fmt="qcow2")
    h = Header(img)
    for off, t, n in h.extensions():
        if t == 0xe2792aca:     # the backing format: now an unknown extension
            struct.pack_into(">I", h.data, off, 0x0badf00d)
    h.save()
    r = server.open("qcow2:" + img)
    assert [i["name"] for i in server.stats(r["minor"])["images"]] == ["qcow2:" + img, "qcow2:" + base]
    assert export_bytes(server, r["minor"], str(tmp_path / "got.raw")) == data
    h = connect(server, r["minor"])
    h.pwrite(b"x" * 4096, 4096)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    assert any(t == 0x0badf00d for _, t, _ in Header(img).extensions())  # kept as it was


# ---- writes ----

IO_WRITER = r"""
import nbd, os, random, sys
uri, size, cluster, seed, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rnd = random.Random(seed)
model = bytearray(open(out, "rb").read())
h = nbd.NBD(); h.connect_uri(uri)
busy, reads = {}, []
def overlaps(off, ln):
    return any(o < off + ln and off < o + l for o, l in busy.values())
def reap():
    for ck in list(busy):
        if h.aio_command_completed(ck):
            del busy[ck]
    for r in list(reads):
        if r[0] not in busy:
            reads.remove(r)
            assert r[1].to_bytearray() == r[3], "read mismatch at %d" % r[2]
for i in range(n):
    while True:
        if rnd.random() < 0.4:
            off = rnd.randrange(size - 1); ln = rnd.randrange(1, min(size - off, 200000) + 1)
        else:
            off = min(rnd.randrange(size // cluster) * cluster + rnd.choice([0, 0, 512, 4096]), size - 1)
            ln = min(size - off, rnd.choice([512, 4096, cluster, 2 * cluster, max(cluster // 2, 512)]))
        if not overlaps(off, ln):
            break
        h.poll(-1); reap()
    op = rnd.random()
    if op < 0.6:
        buf = rnd.randbytes(ln); model[off:off + ln] = buf
        busy[h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(buf)), off)] = (off, ln)
    elif op < 0.75:
        model[off:off + ln] = bytes(ln)
        fl = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.3 else 0
        busy[h.aio_zero(ln, off, flags=fl)] = (off, ln)
    elif op < 0.8:
        while busy:
            h.poll(-1); reap()
        h.trim(ln, off)         # reads after a trim are undefined: write it again
        buf = rnd.randbytes(ln); model[off:off + ln] = buf; h.pwrite(buf, off)
    else:
        b = nbd.Buffer(ln)
        ck = h.aio_pread(b, off); busy[ck] = (off, ln); reads.append((ck, b, off, model[off:off + ln]))
    while len(busy) >= 32:
        h.poll(-1); reap()
while busy:
    h.poll(-1); reap()
h.flush(); h.shutdown()
open(out, "wb").write(model)
"""


def random_io(server, minor, tmp_path, size, cluster, seed, n, model):
    """Random reads, writes, zeroes and trims, 32 in flight on disjoint ranges."""
    path = str(tmp_path / ("model%d" % seed))
    with open(path, "wb") as f:
        f.write(model)
    run(sys.executable, "-c", IO_WRITER, server.uri(minor), size, cluster, seed, n, path, timeout=300)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("compat,cluster,backing", [
    ("1.1", 65536, True), ("0.10", 4096, False), ("1.1", 512, False), ("1.1", 2 * MiB, True),
    ("0.10", 65536, True)])
def test_random_io_against_a_model(server, tmp_path, compat, cluster, backing):
    size = 16 * MiB
    model = bytes(size)
    base = None
    if backing:
        base, data = make_base(tmp_path, "raw", size)
        model = data
    img = qcow2(tmp_path / "r.qcow2", size, compat, cluster, base, "raw" if base else None)
    r = server.open("qcow2:" + img)
    model = random_io(server, r["minor"], tmp_path, size, cluster, cluster + backing, 1500, model)
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    assert to_raw(img, str(tmp_path / "out.raw")) == model


def test_concurrent_writes_to_a_new_cluster_allocate_it_once(server, tmp_path):
    img = qcow2(tmp_path / "c.qcow2", 16 * MiB)
    r = server.open("qcow2:" + img)
    h = connect(server, r["minor"])
    bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 1024) for i in range(64)]
    for i in range(64):
        h.aio_pwrite(bufs[i], 6 * MiB + i * 1024)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert h.pread(65536, 6 * MiB) == b"".join(bytes([i + 1]) * 1024 for i in range(64))
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    info = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
    assert info["allocated-clusters"] == 1


def test_pause_as_allocating_writes_end(server, tmp_path):
    """Found by the soak (ASan: heap-use-after-free in mc_put, from
    batch_free): the write an allocation batch acknowledges last may drain
    a vbd that is being paused, and the chain's close starts on a worker at
    once; the batch then unpinned its tables in caches the close had freed.
    Rounds of allocating writes, each cut short by a pause at a different
    moment; ASan's pass of make check-full sees a use after free, every pass the
    data and the image."""
    img = qcow2(tmp_path / "p.qcow2", 64 * MiB, cluster=4096)
    m = server.open("qcow2:" + img)["minor"]
    h = connect(server, m)
    rng = random.Random(5)
    written = {}
    for r in range(60):
        bufs = []
        for i in range(24):
            off = (r * 24 + i) * 2 * 4096       # a new cluster each, and a new L2 range at times
            bufs.append(nbd.Buffer.from_bytearray(bytearray([r % 250 + 1, i]) * 2048))
            h.aio_pwrite(bufs[-1], off)
            written[off] = bytes([r % 250 + 1, i]) * 2048
        time.sleep(rng.random() * 0.004)
        server.call("pause", minor=m)       # waits for the writes to drain
        server.call("unpause", minor=m)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    for off, data in written.items():
        assert h.pread(4096, off) == data
    h.shutdown()
    server.call("destroy", minor=m)
    check_clean(img)


@pytest.mark.parametrize("compat,backing", [("1.1", False), ("1.1", True), ("0.10", False),
                                            ("0.10", True)])
def test_discard_and_write_zeroes(server, tmp_path, compat, backing):
    size = 8 * MiB
    base, data = make_base(tmp_path, "raw", size) if backing else (None, bytes(size))
    img = qcow2(tmp_path / "z.qcow2", size, compat, 65536, base, "raw" if base else None)
    r = server.open("qcow2:" + img)
    h = connect(server, r["minor"])
    expect = bytearray(data)
    h.pwrite(b"\xaa" * (2 * MiB), MiB)
    expect[MiB:3 * MiB] = b"\xaa" * (2 * MiB)
    h.zero(MiB // 2 + 1000, MiB + 100)               # partial clusters at both ends
    expect[MiB + 100:MiB + 100 + MiB // 2 + 1000] = bytes(MiB // 2 + 1000)
    h.zero(256 * 1024, 2 * MiB + 512 * 1024, nbd.CMD_FLAG_NO_HOLE)
    expect[2 * MiB + 512 * 1024:2 * MiB + 768 * 1024] = bytes(256 * 1024)
    h.zero(MiB, 4 * MiB)                               # unallocated here: over the base
    expect[4 * MiB:5 * MiB] = bytes(MiB)
    assert h.pread(size, 0) == bytes(expect)
    h.trim(512 * 1024, 2 * MiB)                        # advisory: then written again
    h.pwrite(b"\xbb" * (512 * 1024), 2 * MiB)
    expect[2 * MiB:2 * MiB + 512 * 1024] = b"\xbb" * (512 * 1024)
    h.flush()
    h.shutdown()
    assert nbd_extents(server.uri(r["minor"])) == qemu_extents(img)
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    assert to_raw(img, str(tmp_path / "out.raw")) == bytes(expect)
    if compat == "1.1" and not backing:
        m = json.loads(run("qemu-img", "map", "--output=json", img).stdout)
        kept = [e for e in m if e["zero"] and "offset" in e]
        assert any(e["start"] <= 2 * MiB + 512 * 1024 < e["start"] + e["length"] for e in kept), m


def test_refcount_table_grows_with_small_clusters(server, tmp_path):
    img = qcow2(tmp_path / "g.qcow2", 64 * MiB, cluster=512)
    rt = Header(img)["rt_offset"]
    r = server.open("qcow2:" + img)
    h = connect(server, r["minor"])
    blob = os.urandom(MiB)
    for i in range(24):
        h.pwrite(blob, i * MiB * 2 + 4096)
    h.flush()
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    assert Header(img)["rt_offset"] != rt              # it moved, and more than once
    check_clean(img)
    out = to_raw(img, str(tmp_path / "out.raw"))
    assert all(out[i * MiB * 2 + 4096:i * MiB * 2 + 4096 + MiB] == blob for i in range(24))
    r = server.open("qcow2:" + img)                    # 2048 L2 spans in one request
    h = connect(server, r["minor"])
    h.zero(64 * MiB - 1024, 512)
    assert h.pread(MiB, 2 * MiB) == bytes(MiB)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    out = to_raw(img, str(tmp_path / "out.raw"))
    assert out == bytes(512) + b"\0" * (64 * MiB - 1024) + bytes(512)


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_refcount_widths(server, tmp_path, bits):
    img = qcow2(tmp_path / "w.qcow2", 8 * MiB, cluster=4096, opts="refcount_bits=%d" % bits)
    r = server.open("qcow2:" + img)
    h = connect(server, r["minor"])
    h.pwrite(b"w" * (3 * MiB), 1000)
    h.trim(MiB, 2 * MiB)
    h.pwrite(b"v" * 4096, 2 * MiB + 4096)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    out = to_raw(img, str(tmp_path / "out.raw"))
    assert out[:2 * MiB] == bytes(1000) + b"w" * (2 * MiB - 1000)
    assert out[2 * MiB + 4096:2 * MiB + 8192] == b"v" * 4096


def test_dirty_image_reads_as_is_and_is_repaired_for_writing(server, tmp_path):
    img = qcow2(tmp_path / "d.qcow2", 16 * MiB, cluster=4096, opts="lazy_refcounts=on")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", "-c", "write -P 0x34 8M 100k",
        "-c", "abort", img, check=False)
    assert Header(img)["incompat"] & 1
    assert run("qemu-img", "check", img, check=False).returncode != 0
    r = server.open("qcow2:" + img, readonly=True)
    h = connect(server, r["minor"])
    assert h.pread(MiB, 0) == b"\x33" * MiB
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    assert Header(img)["incompat"] & 1                 # read-only: untouched
    r = server.open("qcow2:" + img)
    assert not Header(img)["incompat"] & 1
    h = connect(server, r["minor"])
    h.pwrite(b"\x35" * 65536, 12 * MiB)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    out = to_raw(img, str(tmp_path / "out.raw"))
    assert out[:MiB] == b"\x33" * MiB and out[8 * MiB:8 * MiB + 102400] == b"\x34" * 102400
    assert out[12 * MiB:12 * MiB + 65536] == b"\x35" * 65536


# ---- refusals ----

def _set(field, value):
    def patch(path):
        h = Header(path)
        h[field] = value
        h.save()
    return patch


def _feature_name_for_bit_10(path):
    h = Header(path)
    for off, t, n in h.extensions():
        if t == 0x6803f857:     # rename the dirty bit's table entry to bit 10
            for e in range(off + 8, off + 8 + n, 48):
                if h.data[e] == 0 and h.data[e + 1] == 0:
                    h.data[e + 1] = 10
    h["incompat"] = 1 << 10
    h.save()


def _snapshot(path):
    run("qemu-img", "snapshot", "-c", "s1", path)


def _bitmap(path):
    run("qemu-img", "bitmap", "--add", path, "b0")


@pytest.mark.engine_independent     # refused at open, or reads of nothing allocated
@pytest.mark.parametrize("how,needle,ro_ok", [
    ("extended_l2=on", "extended L2 entries", False),
    ("compression_type=zstd", "zstd compression", False),
    ("data_file", "external data files", False),
    (_set("crypt", 1), "encryption (AES)", False),
    (_set("crypt", 2), "encryption (LUKS)", False),
    (_set("incompat", 1 << 20), "unknown incompatible feature (bit 20)", False),
    (_feature_name_for_bit_10, "unknown incompatible feature 'dirty bit' (bit 10)", False),
    (_set("incompat", 2), "marked corrupt", True),
    (_snapshot, "internal snapshots (1)", True),
    (_bitmap, "persistent dirty bitmaps (1)", True),
])
def test_unsupported_features_are_refused_by_name(server, tmp_path, how, needle, ro_ok):
    img = str(tmp_path / "f.qcow2")
    if isinstance(how, str):
        opts = "data_file=%s" % (tmp_path / "data.raw") if how == "data_file" else how
        qcow2(img, 4 * MiB, opts=opts)
    else:
        qcow2(img, 4 * MiB)
        how(img)
    before = open(img, "rb").read()
    with pytest.raises(ControlError) as e:
        server.call("open", params="qcow2:" + img)
    assert needle in e.value.message and img in e.value.message, e.value.message
    r = server.tapctl("create", "-a", "qcow2:" + img, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    if ro_ok:
        m = server.open("qcow2:" + img, readonly=True)["minor"]
        assert connect(server, m).pread(4096, 0) == bytes(4096)
        server.call("destroy", minor=m)
    assert open(img, "rb").read() == before
    assert server.call("list")["result"]["vbds"] == []


def _l1_past_end(h):
    h["l1_offset"] = len(h.data) + 65536 * 4


def _l1_too_small(h):
    h["size"] = 64 << 30


def _l1_entry_unaligned(h):
    h.u64(h["l1_offset"], h.u64(h["l1_offset"]) + 512)


def _l1_entry_into_reftable(h):
    h.u64(h["l1_offset"], h["rt_offset"] | (1 << 63))


def _reftable_huge(h):
    h["rt_clusters"] = 1 << 20


@pytest.mark.engine_independent     # refused at open: no I/O through the engine
@pytest.mark.parametrize("how,needle", [
    (_set("magic", 0x12345678), "bad magic"),
    (_set("version", 4), "version 4"),
    (_set("cluster_bits", 22), "between 512 B and 2 MiB"),
    (_set("header_length", 100), "header length"),
    (_set("refcount_order", 7), "refcount order"),
    (_l1_past_end, "L1 table lies past the end"),
    (_l1_too_small, "too small for the virtual size"),
    (_set("rt_offset", 65536 + 512), "refcount table offset"),
    (_reftable_huge, "refcount table of"),
    (_set("backing_offset", 65530), "backing file name"),
    (_l1_entry_unaligned, "L1 entry 0 is not cluster aligned"),
    (_l1_entry_into_reftable, "L1 entry 0 points into the refcount table"),
])
def test_damaged_images_are_refused_clearly(server, tmp_path, how, needle):
    img = qcow2(tmp_path / "bad.qcow2", 4 * MiB)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 128k", img)
    h = Header(img)
    if how.__name__ == "patch":
        how(img)
    else:
        how(h)
        h.save()
    before = open(img, "rb").read()
    with pytest.raises(ControlError) as e:
        server.call("open", params="qcow2:" + img)
    assert needle in e.value.message and img in e.value.message, e.value.message
    assert open(img, "rb").read() == before
    good = server.open("ram:1M")                      # the server serves on
    server.call("destroy", minor=good["minor"])


def test_corrupt_l2_table_fails_its_reads_not_the_server(server, tmp_path):
    img = qcow2(tmp_path / "l2.qcow2", 4 * MiB)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 128k", img)
    h = Header(img)
    l2 = h.u64(h["l1_offset"]) & ((1 << 56) - 512)
    h.u64(l2 + 8, h.u64(l2 + 8) + 4096)              # entry 1: unaligned
    h.save()
    r = server.open("qcow2:" + img)
    c = connect(server, r["minor"])
    with pytest.raises(nbd.Error) as e:
        c.pread(4096, 0)
    assert e.value.errno == "EIO"
    with pytest.raises(nbd.Error):
        c.pwrite(b"x" * 512, 65536 * 2)
    c.shutdown()
    server.call("destroy", minor=r["minor"])
    assert "L2 table 0 at" in server.log() and "is corrupt: L2 entry 1" in server.log()
    assert connect(server, server.open("ram:1M")["minor"]).pread(512, 0) == bytes(512)


# ---- snapshots, crashes, a file system ----

def test_live_snapshot_of_a_qcow2_leaf(server, tmp_path):
    base = qcow2(tmp_path / "live.qcow2", 64 * MiB)
    r = server.open("qcow2:" + base)
    leaves = [str(tmp_path / ("snap%d.qcow2" % k)) for k in range(2)]
    snapshots_under_fio(server, r["minor"], "qcow2", leaves)
    got = export_bytes(server, r["minor"], str(tmp_path / "got.raw"))
    server.call("destroy", minor=r["minor"])
    for f in [base] + leaves:
        check_clean(f)
    info = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain", leaves[-1]).stdout)
    assert [i["filename"] for i in info] == [leaves[1], leaves[0], base]
    assert to_raw(leaves[-1], str(tmp_path / "out.raw")) == got
    with pytest.raises(ControlError) as e:             # exists already
        m = server.open("qcow2:" + leaves[-1])["minor"]
        server.call("snapshot", minor=m, path=leaves[0])
    assert e.value.code == "EEXIST"


def test_kill9_during_fio_load_20_times(make_server, tmp_path):
    """fio's random writes (a flush every 8) fill the second half while the
    logging writer fills the first; after each kill qemu-img check may find
    leaked clusters, never an error."""
    img = qcow2(tmp_path / "crash.qcow2", 64 * MiB)
    leaked = []

    def fio(uri, it):
        return subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", "--uri=" + uri,
                                 "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=32M",
                                 "--size=32M", "--fsync=8", "--time_based", "--runtime=30",
                                 "--randseed=%d" % it], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def check(it):
        c = run("qemu-img", "check", img, check=False)
        assert c.returncode in (0, 3) and "ERROR" not in c.stdout, c.stdout   # 3: leaks only
        if c.returncode == 3:
            leaked.append(it)

    kill9_rounds(make_server, tmp_path, "qcow2:" + img, check, slots=512,
                 skews=(0, 4096, 61440), load=fio)
    print("runs that leaked clusters: %d of 20" % len(leaked))


def test_ext4_on_a_qcow2(server, tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse (nbdfuse, losetup, mount)")
    img = qcow2(tmp_path / "fs.qcow2", 128 * MiB)
    r = server.open("qcow2:" + img)
    files = ext4_on_vbd(server, r["minor"], tmp_path, trim=True)
    server.call("destroy", minor=r["minor"])
    check_clean(img)
    raw = str(tmp_path / "fs.raw")
    run("qemu-img", "convert", "-O", "raw", img, raw)
    ext4_check_raw(raw, tmp_path, files)
