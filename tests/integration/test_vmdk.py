"""The vmdk driver (read-only) against qemu-img: every subformat qemu-img
writes (and VMware's own stream layout, built by vmdkgen) reads back over
NBD byte for byte as `qemu-img convert -f vmdk -O raw` does, with the same
size and an allocation map that agrees with `qemu-img map`; split extents,
ZERO extents, delta disks on a VMDK parent; writes refused; damaged
images refused at open with one clear line, damaged grains failing only
the reads that touch them, and the server serving on."""

import json
import os
import struct

import nbd
import pytest

from conftest import ControlError, run
from images import connect, export_bytes, qemu_size
import images
import vmdkgen

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 40 * MiB          # two grain tables of 32 MiB (64 KiB grains)

# (offset, length) of the data in the test disk: unaligned, across grains,
# runs of grains, across the first grain table's end, the last bytes.
DATA = [(0, 4 * KiB), (64 * KiB - 512, KiB), (MiB, 192 * KiB), (5 * MiB + 12345, 7000),
        (32 * MiB - 4 * KiB, 8 * KiB), (SIZE - 4 * KiB, 4 * KiB)]


def pattern(off, n):
    """Bytes that say where they belong: a misplaced grain shows."""
    words = (n + 7) // 8
    return b"".join(struct.pack("<Q", (off // 8 + i) * 0x9E3779B97F4A7C15 % (1 << 64) | 1)
                    for i in range(words))[:n]


def make_raw(path, size=SIZE, data=DATA):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(pattern(off, n))
    return str(path)


def qemu_raw(img, out):
    return images.qemu_raw(img, "vmdk", out)


def merged(ranges):
    out = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        elif length:
            out.append((start, length))
    return out


def our_map(server, minor):
    """(zero ranges, data ranges) from nbdinfo --map."""
    ext = json.loads(run("nbdinfo", "--map", "--json", server.uri(minor)).stdout)
    return (merged([(e["offset"], e["length"]) for e in ext if e["type"] & 2]),
            merged([(e["offset"], e["length"]) for e in ext if e["type"] == 0]))


def qemu_map(img):
    ext = json.loads(run("qemu-img", "map", "-f", "vmdk", "--output=json", img).stdout)
    return (merged([(e["start"], e["length"]) for e in ext if e["zero"]]),
            merged([(e["start"], e["length"]) for e in ext if e["data"] and not e["zero"]]))


def open_ro(server, img):
    # one loop: a parent is shared by the chains of one loop (opened once per loop)
    return server.open("vmdk:" + img, readonly=True, loop=0)


def assert_reads_like_qemu(server, img, tmp_path, size=None):
    r = open_ro(server, img)
    assert r["size"] == (size if size is not None else qemu_size(img))
    expect = qemu_raw(img, str(tmp_path / "expect.raw"))
    got = export_bytes(server, r["minor"], str(tmp_path / "got.raw"))
    assert got == expect
    return r


# ---- every subformat, against qemu-img ----

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]


@pytest.mark.parametrize("subformat,opts", [(s, "") for s in SUBFORMATS] + [
    ("monolithicSparse", "adapter_type=lsilogic,compat6=on"),
    ("streamOptimized", "adapter_type=buslogic,hwversion=7"),
    ("twoGbMaxExtentFlat", "adapter_type=legacyESX"),
])
def test_converted_images_read_like_qemu(server, tmp_path, subformat, opts):
    raw = make_raw(tmp_path / "src.raw")
    img = str(tmp_path / "d.vmdk")
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
        "subformat=" + subformat + ("," + opts if opts else ""), raw, img)
    r = assert_reads_like_qemu(server, img, tmp_path, SIZE)
    with open(raw, "rb") as f:
        assert export_bytes(server, r["minor"], str(tmp_path / "again.raw")) == f.read()
    zeros, data = our_map(server, r["minor"])
    qzeros, qdata = qemu_map(img)
    assert zeros == qzeros
    if "Flat" not in subformat:      # flat extents: qemu says data everywhere
        assert data == qdata
    # what was written is data; the rest, grain by grain, is a hole
    for off, n in DATA:
        assert any(s <= off and off + n <= s + ln for s, ln in data), (off, data)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat",
                                       "twoGbMaxExtentSparse"])
def test_images_written_by_qemu_io(server, tmp_path, subformat):
    img = str(tmp_path / "w.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=" + subformat, img, "12345k")
    size = qemu_size(img)
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 100k 3k",
        "-c", "write -P 0x63 %d 512" % (size - 512), img)
    r = assert_reads_like_qemu(server, img, tmp_path)
    h = connect(server, r["minor"])
    assert h.pread(1024, size - 1024) == bytes(512) + b"\x63" * 512
    h.shutdown()


def test_zeroed_grains(server, tmp_path):
    img = str(tmp_path / "z.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", img, "4M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 256k", "-c", "write -z 64k 128k", img)
    r = assert_reads_like_qemu(server, img, tmp_path)
    ext = json.loads(run("nbdinfo", "--map", "--json", server.uri(r["minor"])).stdout)
    kinds = [(e["offset"], e["length"], e["type"]) for e in ext]
    assert kinds[:4] == [(0, 64 * KiB, 0), (64 * KiB, 128 * KiB, 2), (192 * KiB, 64 * KiB, 0),
                         (256 * KiB, 4 * MiB - 256 * KiB, 3)], kinds


def test_vmware_stream_with_footer(server, tmp_path):
    raw = make_raw(tmp_path / "src.raw")
    with open(raw, "rb") as f:
        src = f.read()
    data, info = vmdkgen.stream(src, "vm.vmdk")
    img = tmp_path / "vm.vmdk"
    img.write_bytes(data)
    r = assert_reads_like_qemu(server, str(img), tmp_path, SIZE)
    assert export_bytes(server, r["minor"], str(tmp_path / "again.raw")) == src
    # many small reads at once, in and across compressed grains (the grain cache)
    h = connect(server, r["minor"])
    offs = [off + d for off, n in DATA for d in (0, 1000, n - 700) if d >= 0]
    bufs = [nbd.Buffer(700) for _ in offs]
    for buf, off in zip(bufs, offs):
        h.aio_pread(buf, off)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for buf, off in zip(bufs, offs):
        assert buf.to_bytearray() == src[off:off + 700]
    h.shutdown()


def test_tiny_grains_thrash_the_table_cache(server, tmp_path):
    """1-sector grains, 1 entry per table: 2048 tables through a cache of 256."""
    src = bytes(make_raw_bytes())
    img = tmp_path / "tiny.vmdk"
    img.write_bytes(vmdkgen.sparse(src, "tiny.vmdk", grain=1, gtes=1))
    r = assert_reads_like_qemu(server, str(img), tmp_path, len(src))
    assert export_bytes(server, r["minor"], str(tmp_path / "again.raw")) == src
    zeros, data = our_map(server, r["minor"])
    assert (zeros, data) == qemu_map(str(img))


def make_raw_bytes():
    b = bytearray(MiB)
    for off, n in [(0, 1000), (4096, 512), (300 * KiB + 7, 30000), (MiB - 512, 512)]:
        b[off:off + n] = pattern(off, n)
    return b


# ---- descriptors and extents ----

def test_split_extents_beyond_2g(server, tmp_path):
    size = 5 * GiB
    data = [(0, 4096), (2 * GiB - 4096, 8192), (4 * GiB - 512, 1024), (size - 4096, 4096)]
    raw = make_raw(tmp_path / "big.raw", size, data)
    for sub in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        img = str(tmp_path / (sub + ".vmdk"))
        run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=" + sub, raw, img)
        assert open(img).read().count("\nRW ") == 3          # 2 + 2 + 1 GiB
        r = open_ro(server, img)
        assert r["size"] == size == qemu_size(img)
        h = connect(server, r["minor"])
        for off, n in data:
            lo, hi = max(0, off - 4096), min(size, off + n + 4096)
            assert h.pread(hi - lo, lo) == bytes(off - lo) + pattern(off, n) + bytes(hi - off - n)
        h.shutdown()
        zeros, got = our_map(server, r["minor"])
        for off, n in data:
            assert any(s <= off and off + n <= s + ln for s, ln in got), (sub, off)
        server.call("destroy", minor=r["minor"])


def write_descriptor(path, extents, create="twoGbMaxExtentFlat", **kw):
    path.write_bytes(vmdkgen.descriptor(create, extents, **kw))
    return str(path)


def test_descriptor_with_flat_offsets_sparse_and_zero_extents(server, tmp_path):
    flat = tmp_path / "f.bin"
    flat.write_bytes(b"".join(bytes([i]) * 512 for i in range(1, 65)))   # 64 sectors
    make_raw(tmp_path / "s.raw", 2 * MiB, [(0, 4096), (MiB + 3, 100)])
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(tmp_path / "s.raw"),
        str(tmp_path / "s.vmdk"))
    sub = tmp_path / "sub"
    sub.mkdir()
    os.rename(tmp_path / "f.bin", sub / "f.bin")
    rw = ['RW 16 FLAT "sub/f.bin" 8', 'RW 4096 SPARSE "s.vmdk"', 'RW 8 VMFS "sub/f.bin"']
    img = write_descriptor(tmp_path / "rw.vmdk", rw)
    assert_reads_like_qemu(server, img, tmp_path, (16 + 4096 + 8) * 512)
    # qemu skips ZERO and RDONLY extents altogether; the spec counts them
    img = write_descriptor(tmp_path / "all.vmdk", rw[:1] + ["RW 100 ZERO"] + rw[1:2] +
                           ['RDONLY 4 FLAT "sub/f.bin" 60'])
    r = open_ro(server, img)
    assert r["size"] == (16 + 100 + 4096 + 4) * 512
    got = export_bytes(server, r["minor"], str(tmp_path / "all.raw"))
    flat = (sub / "f.bin").read_bytes()
    with open(str(tmp_path / "s.raw"), "rb") as f:
        sparse = f.read()
    assert got == flat[8 * 512:24 * 512] + bytes(100 * 512) + sparse + flat[60 * 512:]
    ext = json.loads(run("nbdinfo", "--map", "--json", server.uri(r["minor"])).stdout)
    zero_ext = [e for e in ext if e["offset"] == 16 * 512]
    assert zero_ext and zero_ext[0]["type"] == 3 and zero_ext[0]["length"] >= 100 * 512


def test_delta_disk_on_a_vmdk_parent(server, tmp_path):
    base = str(tmp_path / "base.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", base, "8M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 2M", base)
    kid = str(tmp_path / "kid.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", kid)
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 7M 4k", kid)
    r = assert_reads_like_qemu(server, kid, tmp_path)
    names = [i["name"] for i in server.stats(r["minor"])["images"]]
    assert names == ["vmdk:" + kid, "vmdk:" + base]
    zeros, data = our_map(server, r["minor"])
    assert data == [(0, 2 * MiB), (7 * MiB, 64 * KiB)]
    # another delta, naming its parent by an absolute path: the parent is opened once
    kid2 = str(tmp_path / "kid2.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", "-b", base, "-F", "vmdk", kid2)
    r2 = open_ro(server, kid2)
    pid = server.proc.pid
    fds = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]
    assert sum(1 for f in fds if f == base) <= 2      # one buffered + one direct, once
    h = connect(server, r2["minor"])
    assert h.pread(8192, MiB) == b"\x11" * 8192
    h.shutdown()
    server.call("destroy", minor=r2["minor"])
    server.call("destroy", minor=r["minor"])
    # the parent is not the disk the child was made on
    # (in place, as long as the old one: qemu-img writes the CID unpadded)
    text = open(base, "rb").read()
    i = text.index(b"CID=") + 4
    bad = b"0badc1d0"[-(text.index(b"\n", i) - i):]
    with open(base, "r+b") as f:
        f.seek(i)
        f.write(bad)
    with pytest.raises(ControlError) as e:
        open_ro(server, kid)
    assert "CID %08x" % int(bad, 16) in e.value.message and "base.vmdk" in e.value.message
    os.unlink(base)
    with pytest.raises(ControlError) as e:
        open_ro(server, kid)
    assert e.value.code == "ENOENT" and "parent" in e.value.message


# ---- read-only ----

def test_writes_are_refused(server, tmp_path):
    img = str(tmp_path / "ro.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", img, "4M")
    before = open(img, "rb").read()
    with pytest.raises(ControlError) as e:
        server.open("vmdk:" + img)
    assert e.value.code == "EROFS"
    assert "vmdk: read-only format" in e.value.message and img in e.value.message
    t = server.tapctl("create", "-a", "vmdk:" + img, check=False)
    assert t.returncode == 1 and t.stderr.count("\n") == 1 and "read-only" in t.stderr
    sock = server.tapctl("create", "-R", "-a", "vmdk:" + img).stdout.strip()
    minor = int(sock.rsplit(".", 1)[1])
    info = json.loads(run("nbdinfo", "--json", server.uri(minor)).stdout)["exports"][0]
    assert info["is_read_only"] is True
    h = connect(server, minor)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    server.tapctl("pause", "-m", minor)              # closes the image, reopens it read-only
    server.tapctl("unpause", "-m", minor)
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    assert open(img, "rb").read() == before


# ---- damage ----

def _sparse(tmp_path):
    raw = make_raw(tmp_path / "src.raw", 4 * MiB, [(0, 4096), (MiB, 4096)])
    img = str(tmp_path / "bad.vmdk")
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", raw, img)
    return img


def _stream(tmp_path):
    img = tmp_path / "bad.vmdk"
    img.write_bytes(vmdkgen.stream(bytes(make_raw_bytes()), "bad.vmdk")[0])
    return str(img)


def _flat(tmp_path):
    img = str(tmp_path / "bad.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", img, "1M")
    return img


def patch(img, off, b):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(b)


def _truncate_header(img):
    os.truncate(img, 300)


def _truncate_metadata(img):
    os.truncate(img, 10 * KiB)


def _truncate_stream(img):
    os.truncate(img, os.path.getsize(img) - 1024)


def _bad_magic(img):
    patch(img, 0, b"XXXX")


def _huge_directory(img):
    patch(img, vmdkgen.H_CAPACITY, struct.pack("<QQ", 1 << 37, 1))
    patch(img, vmdkgen.H_GTES, struct.pack("<I", 1))


def _table_past_end(img):
    gd = vmdkgen.read_header(open(img, "rb").read())["gd"]
    patch(img, gd * 512, struct.pack("<I", 1 << 30))


def _newlines(img):
    patch(img, vmdkgen.H_NL, b"\n \n\n")


def _bad_descriptor(img):
    with open(img, "a") as f:
        f.write("this line is not a descriptor line\n")


def _extent_renamed(name):
    def how(img):
        text = open(img).read().replace('"bad-flat.vmdk"', '"%s"' % name)
        open(img, "w").write(text)
    return how


def _symlink_out(img):
    d = os.path.dirname(img)
    os.rename(os.path.join(d, "bad-flat.vmdk"), os.path.join(d, "..", "outside-flat"))
    os.symlink(os.path.join(d, "..", "outside-flat"), os.path.join(d, "bad-flat.vmdk"))


def _missing_extent(img):
    os.unlink(os.path.join(os.path.dirname(img), "bad-flat.vmdk"))


def _cowd(img):
    patch(img, 0, b"COWD")


@pytest.mark.parametrize("make,how,code,needle", [
    (_sparse, _truncate_header, "EUCLEAN", "too short for a sparse extent header"),
    (_sparse, _truncate_metadata, "EUCLEAN", "past the end of the file"),
    (_stream, _truncate_stream, "EUCLEAN", "without its footer"),
    (_sparse, _bad_magic, "EUCLEAN", "no sparse extent magic"),
    (_sparse, _huge_directory, "EUCLEAN", "grain directory of 137438953472 entries is too large"),
    (_sparse, _table_past_end, "EUCLEAN", "grain table 0 at sector 1073741824 is past the end"),
    (_sparse, _newlines, "EUCLEAN", "text-mode transfer"),
    (_sparse, _cowd, "ENOTSUP", "COWD"),
    (_flat, _bad_descriptor, "EUCLEAN", "neither KEY=VALUE nor an extent"),
    (_flat, _extent_renamed("../bad-flat.vmdk"), "EACCES", "leaves the descriptor's directory"),
    (_flat, _extent_renamed("/dev/zero"), "EACCES", "absolute path '/dev/zero'"),
    (_flat, _symlink_out, "EACCES", "through a symlink"),
    (_flat, _missing_extent, "ENOENT", "extent 1 (bad-flat.vmdk)"),
])
def test_damaged_images_are_refused_clearly(server, tmp_path, make, how, code, needle):
    sub = tmp_path / "d"
    sub.mkdir()
    img = make(sub)
    how(img)
    with pytest.raises(ControlError) as e:
        open_ro(server, img)
    assert e.value.code == code, e.value.message
    assert needle in e.value.message and img in e.value.message, e.value.message
    r = server.tapctl("create", "-R", "-a", "vmdk:" + img, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert server.call("list")["result"]["vbds"] == []
    good = server.open("ram:1M")                     # the server serves on
    server.call("destroy", minor=good["minor"])


def _grain_marker_size(img, info):
    patch(img, info["grains"][0] * 512 + 8, struct.pack("<I", 1 << 30))
    return "compressed size 1073741824 is more than a grain of 65536 bytes can take"


def _grain_deflate(img, info):
    patch(img, info["grains"][0] * 512 + 12 + 20, b"\xff" * 8)
    return "corrupt deflate stream"


def _grain_lba(img, info):
    patch(img, info["grains"][0] * 512, struct.pack("<Q", 128))
    return "its marker says sector 128"


@pytest.mark.parametrize("how", [_grain_marker_size, _grain_deflate, _grain_lba])
def test_damaged_compressed_grain_fails_only_its_reads(server, tmp_path, how):
    src = make_raw_bytes()
    img = str(tmp_path / "g.vmdk")
    data, info = vmdkgen.stream(bytes(src), "g.vmdk")
    open(img, "wb").write(data)
    why = how(img, info)
    r = open_ro(server, img)
    other = server.open("ram:1M")
    h = connect(server, r["minor"])
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 0)
    assert e.value.errno == "EIO"
    assert h.pread(4096, 300 * KiB) == bytes(src[300 * KiB:304 * KiB])
    h.shutdown()
    assert why in server.log() and img in server.log()
    ho = connect(server, other["minor"])
    ho.pwrite(b"y" * 4096, 0)
    assert ho.pread(4096, 0) == b"y" * 4096
    ho.shutdown()
    assert server.stats(r["minor"])["ops"]["read"]["errors"] >= 1


def test_grain_past_the_end_fails_its_reads(server, tmp_path):
    img = _sparse(tmp_path)
    hdr = vmdkgen.read_header(open(img, "rb").read())
    gt = struct.unpack_from("<I", open(img, "rb").read(), hdr["gd"] * 512)[0]
    patch(img, gt * 512 + 4 * 16, struct.pack("<I", 1 << 24))     # grain 16: 1 MiB in
    r = open_ro(server, img)
    h = connect(server, r["minor"])
    with pytest.raises(nbd.Error):
        h.pread(512, MiB)
    assert h.pread(4096, 0) == pattern(0, 4096)
    h.shutdown()
    assert "grain 16 at sector 16777216 is past the end of the file" in server.log()
