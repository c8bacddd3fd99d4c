"""The vhd driver and vhd-util, proven against qemu-img: images made by
either open in the other with the same size and bytes; chains, shared
parents, live snapshots and the toolstack's pause/modify/unpause; damaged
images refused with a clear error; ext4 on a VHD."""

import json
import os
import subprocess
import time

import nbd
import pytest

from conftest import BIN, ControlError, make_image, run, wait_for
from images import qemu_raw, qemu_size
from imagetests import (connect, export_bytes, ext4_check_raw, ext4_on_vbd, kill9_rounds,
                        snapshots_under_fio)
from vhdpatch import Vhd

MiB = 1 << 20


def vhdutil(*args, check=True):
    return run(os.path.join(BIN, "vhd-util"), *args, check=check)


def to_raw(path, out):
    return qemu_raw(path, "vpc", out)


# ---- interop with qemu-img ----

@pytest.mark.parametrize("size", ["1M", "100M", "1000M", "1234567k", "3G"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_images_open_with_same_size_and_bytes(server, tmp_path, size, subformat):
    img = str(tmp_path / "q.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=" + subformat, img, size)
    qsize = qemu_size(img)
    r = server.open("vhd:" + img, readonly=True)
    vsize = r["size"]
    if subformat == "dynamic":
        assert vsize == qsize
    else:
        # qemu-img counts a fixed disk's footer as data; the disk is before it
        assert qsize == os.path.getsize(img) and vsize == qsize - 512
    server.call("destroy", minor=r["minor"])
    # qemu writes some data, with its own driver and its own allocation
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x61 0 64k", "-c",
        "write -P 0x62 %d 4k" % (vsize // 2 // 4096 * 4096), "-c",
        "write -P 0x63 %d 512" % (vsize - 512), img)
    r = server.open("vhd:" + img, readonly=True)
    assert r["size"] == vsize
    if vsize < (1 << 30):
        expect = to_raw(img, str(tmp_path / "expect.raw"))[:vsize]
        got = export_bytes(server, r["minor"], str(tmp_path / "got.raw"))
        assert got == expect
        assert got[vsize - 512:] == b"\x63" * 512
    else:   # large: what was written, and zeros around it
        mid = vsize // 2 // 4096 * 4096
        h = connect(server, r["minor"])
        assert h.pread(65536 + 4096, 0) == b"\x61" * 65536 + bytes(4096)
        assert h.pread(3 * 4096, mid - 4096) == bytes(4096) + b"\x62" * 4096 + bytes(4096)
        assert h.pread(1024, vsize - 1024) == bytes(512) + b"\x63" * 512
        h.shutdown()


def test_qemu_force_size_uses_current_size(server, tmp_path):
    img = str(tmp_path / "fs.vhd")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on", img, "1000M")
    assert qemu_size(img) == 1000 * MiB
    assert server.open("vhd:" + img, readonly=True)["size"] == 1000 * MiB


@pytest.mark.parametrize("fixed", [False, True])
def test_our_images_convert_to_what_was_written(server, tmp_path, fixed):
    img = str(tmp_path / "ours.vhd")
    vhdutil("create", "-n", img, "-s", "40", *(["-r"] if fixed else []))
    # tap creator: current_size (qemu counts a fixed disk's footer in)
    assert qemu_size(img) == 40 * MiB + (512 if fixed else 0)
    r = server.open("vhd:" + img)
    assert r["size"] == 40 * MiB
    expect = bytearray(40 * MiB)
    h = connect(server, r["minor"])
    for off, n in [(0, 4096), (3 * MiB + 512, 64 * 1024), (10 * MiB, 3 * MiB), (40 * MiB - 512, 512),
                   (2 * MiB - 1024, 2048)]:
        blob = os.urandom(n)
        h.pwrite(blob, off)
        expect[off:off + n] = blob
    h.flush()
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    assert vhdutil("check", "-n", img).stdout.strip() == "%s is valid" % img
    assert to_raw(img, str(tmp_path / "out.raw")) == bytes(expect)


def test_block_status_from_bat_and_bitmaps(server, tmp_path):
    img = str(tmp_path / "bs.vhd")
    vhdutil("create", "-n", img, "-s", "16")
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    h.pwrite(b"\x01" * 8192, 5 * MiB + 4096)
    h.shutdown()
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri(r["minor"])).stdout)
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    assert data == [(5 * MiB + 4096, 8192)], extents
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw",
                       server.uri(r["minor"])).stdout)
    assert [(e["start"], e["length"]) for e in m if e["data"]] == [(5 * MiB + 4096, 8192)]
    info = json.loads(run("nbdinfo", "--json", server.uri(r["minor"])).stdout)["exports"][0]
    assert info["block_size_minimum"] == 512


def test_unaligned_requests_refused(server, tmp_path):
    img = str(tmp_path / "u.vhd")
    vhdutil("create", "-n", img, "-s", "4")
    r = server.open("vhd:" + img)
    from nbdraw import CMD_READ, CMD_WRITE, NBDRaw
    c = NBDRaw(server.nbd_path(r["minor"]))
    c.handshake(structured=True)
    assert c.call(CMD_READ, 100, 512).error == 22
    assert c.call(CMD_WRITE, 0, payload=b"x" * 100).error == 22
    assert c.call(CMD_READ, 512, 1024).error == 0
    c.disconnect()


# ---- writes, allocation, discard ----

def test_concurrent_writes_to_a_new_block_allocate_it_once(server, tmp_path):
    img = str(tmp_path / "c.vhd")
    vhdutil("create", "-n", img, "-s", "16")
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 4096) for i in range(64)]
    for i in range(64):
        h.aio_pwrite(bufs[i], 6 * MiB + i * 4096)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(64):
        assert h.pread(4096, 6 * MiB + i * 4096) == bytes([i + 1]) * 4096
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    assert vhdutil("query", "-n", img, "-a").stdout.strip() == "1"
    assert vhdutil("check", "-n", img).returncode == 0


def test_full_blocks_set_the_batmap(server, tmp_path):
    img = str(tmp_path / "bm.vhd")
    vhdutil("create", "-n", img, "-s", "8")
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    h.pwrite(b"\x07" * (2 * MiB), 2 * MiB)          # a whole block
    for off in range(4 * MiB, 6 * MiB, 64 * 1024):   # another, in pieces
        h.pwrite(b"\x08" * (64 * 1024), off)
    h.pwrite(b"\x09" * 4096, 6 * MiB)                # a partial block
    h.flush()
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    v = Vhd(img)
    bm_off = v.table_off + ((v.max_bat * 4 + 511) // 512) * 512
    assert bytes(v.data[bm_off:bm_off + 8]) == b"tdbatmap"
    batmap = v.data[bm_off + 512]
    assert batmap == 0b01100000, bin(batmap)
    assert vhdutil("check", "-n", img).returncode == 0
    r = server.open("vhd:" + img)                    # and it reads back through it
    h = connect(server, r["minor"])
    assert h.pread(4096, 2 * MiB) == b"\x07" * 4096
    assert h.pread(4096, 6 * MiB - 4096) == b"\x08" * 4096
    h.shutdown()


def test_discard_and_zeroes_on_a_dynamic_disk(server, tmp_path):
    img = str(tmp_path / "d.vhd")
    vhdutil("create", "-n", img, "-s", "16")
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    h.pwrite(b"\xaa" * (6 * MiB), 0)
    h.trim(2 * MiB, 2 * MiB)                          # a whole block: deallocated
    h.zero(1 * MiB, 4 * MiB + 512 * 1024)            # part of a block: punched
    assert h.pread(2 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert h.pread(1 * MiB, 4 * MiB + 512 * 1024) == bytes(1 * MiB)
    assert h.pread(4096, 4 * MiB) == b"\xaa" * 4096
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(8192, 0) == bytes(4096) + b"\xaa" * 4096
    h.flush()
    h.shutdown()
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri(r["minor"])).stdout)
    holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert (2 * MiB, 2 * MiB) in holes, extents
    server.call("destroy", minor=r["minor"])
    assert vhdutil("query", "-n", img, "-a").stdout.strip() == "2"
    assert vhdutil("check", "-n", img).returncode == 0
    out = to_raw(img, str(tmp_path / "d.raw"))
    assert out[2 * MiB:4 * MiB] == bytes(2 * MiB)


def test_pause_as_allocations_and_deallocations_end(server, tmp_path):
    """The vhd side of what the soak found with qcow2 (test_qcow2's
    test_pause_as_allocating_writes_end): a batch acknowledges a write or a
    trim and then takes its job off the driver's lists; the acknowledgement
    may drain a vbd being paused, and the chain's close used to start on a
    worker at once. vhd's close writes before it frees, so this never
    failed here; it guards the order (the close starts on the next loop
    turn). Rounds of block allocations and deallocations, each cut short by
    a pause at a different moment: the data and the image."""
    import random
    img = str(tmp_path / "p.vhd")
    vhdutil("create", "-n", img, "-s", "64")
    m = server.open("vhd:" + img)["minor"]
    h = connect(server, m)
    rng = random.Random(7)
    content = {}
    for r in range(40):
        blocks = rng.sample(range(32), 12)
        bufs = []
        for b in blocks:
            if content.get(b) and r % 2:
                h.aio_trim(2 * MiB, b * 2 * MiB)        # a whole block: deallocated
                content[b] = None
            else:
                bufs.append(nbd.Buffer.from_bytearray(bytearray([r + 1, b]) * 2048))
                h.aio_pwrite(bufs[-1], b * 2 * MiB + 4096 * (r % 8))
                content[b] = (4096 * (r % 8), bytes([r + 1, b]) * 2048)
        time.sleep(rng.random() * 0.004)
        server.call("pause", minor=m)       # waits for them to drain
        server.call("unpause", minor=m)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    for b, c in content.items():
        if c:
            assert h.pread(4096, b * 2 * MiB + c[0]) == c[1]
        else:
            assert h.pread(2 * MiB, b * 2 * MiB) == bytes(2 * MiB)
    h.shutdown()
    server.call("destroy", minor=m)
    assert vhdutil("check", "-n", img).returncode == 0


# ---- chains ----

def make_chain(tmp_path, depth=3, size_mb=16):
    names = [str(tmp_path / ("l%d.vhd" % i)) for i in range(depth)]
    vhdutil("create", "-n", names[0], "-s", str(size_mb))
    return names


def test_three_deep_chain_reads_the_right_layer(server, tmp_path):
    names = make_chain(tmp_path)
    expect = bytearray(16 * MiB)
    for level in range(3):
        if level:
            vhdutil("snapshot", "-n", names[level], "-p", names[level - 1])
        r = server.open("vhd:" + names[level])
        h = connect(server, r["minor"])
        for k in range(4):                             # overlapping writes per level
            off = (level * 3 + k * 2) * MiB + level * 4096
            blob = bytes([0x10 * (level + 1) + k]) * (MiB + 4096)
            h.pwrite(blob, off)
            expect[off:off + len(blob)] = blob
        h.flush()
        h.shutdown()
        server.call("destroy", minor=r["minor"])
    assert vhdutil("check", "-n", names[2], "-p").returncode == 0
    assert vhdutil("query", "-n", names[2], "-d").stdout.strip() == "chain depth: 3"
    r = server.open("vhd:" + names[2])
    assert [i["name"] for i in server.stats(r["minor"])["images"]] == ["vhd:" + n for n in reversed(names)]
    assert export_bytes(server, r["minor"], str(tmp_path / "all.raw")) == bytes(expect)


def gold_parent(srv, tmp_path):
    """An 8 MiB VHD full of "G", written through the server and closed."""
    base = str(tmp_path / "gold.vhd")
    vhdutil("create", "-n", base, "-s", "8")
    r = srv.open("vhd:" + base)
    h = connect(srv, r["minor"])
    h.pwrite(b"G" * (8 * MiB), 0)
    h.flush()
    h.shutdown()
    srv.call("destroy", minor=r["minor"])
    return base


def base_fds(server, path):
    pid = server.proc.pid
    return sum(1 for fd in os.listdir("/proc/%d/fd" % pid)
               if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == path)


def test_shared_parent_is_opened_once_per_loop_and_a_writer_is_exclusive_across_loops(
        make_server, tmp_path):
    """Children on different loops: each loop opens the read-only parent
    once (its state is its loop's); every child reads it; no loop may open
    it for writing while any child uses it."""
    srv = make_server(extra=["--loops", "3"])
    base = gold_parent(srv, tmp_path)
    kids = []
    for k, loop in enumerate([0, 0, 1, 2]):
        kid = str(tmp_path / ("kid%d.vhd" % k))
        vhdutil("snapshot", "-n", kid, "-p", base)
        kids.append(srv.open("vhd:" + kid, loop=loop)["minor"])
    loops = [v["loop"] for v in srv.call("list")["result"]["vbds"]]
    assert loops == [0, 0, 1, 2]
    assert 3 <= base_fds(srv, base) <= 6     # once per loop (buffered + direct each)
    for i, m in enumerate(kids):
        h = connect(srv, m)
        h.pwrite(bytes([0x30 + i]) * MiB, MiB)
        assert h.pread(4096, 0) == b"G" * 4096
        h.shutdown()
    for loop in range(3):
        with pytest.raises(ControlError) as e:
            srv.call("open", params="vhd:" + base, loop=loop)
        assert e.value.code == "EBUSY"
    for i, m in enumerate(kids):
        h = connect(srv, m)
        assert h.pread(MiB, MiB) == bytes([0x30 + i]) * MiB
        h.shutdown()
        srv.call("destroy", minor=m)
    assert base_fds(srv, base) == 0
    # and a writer on one loop keeps every other loop out
    w = srv.open("vhd:" + base, loop=2)["minor"]
    with pytest.raises(ControlError) as e:
        srv.call("open", params="vhd:" + str(tmp_path / "kid0.vhd"), loop=0)
    assert e.value.code == "EBUSY"
    srv.call("destroy", minor=w)


def test_shared_parent_opened_once_children_isolated(server, tmp_path):
    base = gold_parent(server, tmp_path)
    before = open(base, "rb").read()
    kids = []
    for k in range(2):
        kid = str(tmp_path / ("kid%d.vhd" % k))
        vhdutil("snapshot", "-n", kid, "-p", base)
        kids.append(server.open("vhd:" + kid, loop=0)["minor"])   # a parent is shared per loop
    assert base_fds(server, base) <= 2      # one buffered + one direct, once
    hs = [connect(server, m) for m in kids]
    for i, h in enumerate(hs):
        h.pwrite(bytes([0x30 + i]) * MiB, MiB)
    for i, h in enumerate(hs):
        assert h.pread(MiB, MiB) == bytes([0x30 + i]) * MiB
        assert h.pread(4096, 0) == b"G" * 4096
        h.shutdown()
    for m in kids:
        server.call("destroy", minor=m)
    assert open(base, "rb").read() == before
    # the parent cannot be opened for writing while children use it
    kid = server.open("vhd:" + str(tmp_path / "kid0.vhd"))
    with pytest.raises(ControlError) as e:
        server.call("open", params="vhd:" + base)
    assert e.value.code == "EBUSY"
    server.call("destroy", minor=kid["minor"])


def test_raw_parent_and_grown_child(server, tmp_path):
    rawp = make_image(tmp_path / "p.raw", 4 * MiB, pattern=0x5e)
    kid = str(tmp_path / "onraw.vhd")
    vhdutil("snapshot", "-n", kid, "-p", rawp, "-m", "-S", "10")
    assert vhdutil("query", "-n", kid, "-p").stdout.strip() == rawp
    r = server.open("vhd:" + kid)
    assert r["size"] == 10 * MiB
    h = connect(server, r["minor"])
    assert h.pread(4096, 0) == b"\x5e" * 4096           # from the raw parent
    assert h.pread(8192, 4 * MiB - 4096) == bytes(4096) + bytes(4096)  # past its end
    h.pwrite(b"k" * 4096, 4 * MiB - 2048 - 2048)
    assert h.pread(4096, 4 * MiB - 4096) == b"k" * 4096
    h.shutdown()
    with open(rawp, "rb") as f:
        assert f.read(4096) == b"\x5e" * 4096


def test_parent_uuid_mismatch_is_refused(server, tmp_path):
    base = str(tmp_path / "b.vhd")
    vhdutil("create", "-n", base, "-s", "4")
    kid = str(tmp_path / "k.vhd")
    vhdutil("snapshot", "-n", kid, "-p", base)
    os.unlink(base)
    vhdutil("create", "-n", base, "-s", "4")           # same name, another disk
    with pytest.raises(ControlError) as e:
        server.call("open", params="vhd:" + kid)
    assert "uuid" in e.value.message and "b.vhd" in e.value.message
    r = vhdutil("check", "-n", kid, check=False)
    assert r.returncode == 1 and "another uuid" in r.stdout


def test_missing_parent_is_refused(server, tmp_path):
    base = str(tmp_path / "gone.vhd")
    vhdutil("create", "-n", base, "-s", "4")
    kid = str(tmp_path / "orphan.vhd")
    vhdutil("snapshot", "-n", kid, "-p", base)
    os.unlink(base)
    with pytest.raises(ControlError) as e:
        server.call("open", params="vhd:" + kid)
    assert e.value.code == "ENOENT" and "parent" in e.value.message


# ---- live snapshot and the toolstack's flows ----

def fio(uri, *opts, check=True):
    return run("fio", "--output-format=terse", "--name=job", "--ioengine=nbd", "--uri=" + uri,
               *opts, check=check, timeout=300)


def test_live_snapshot_under_load(server, tmp_path):
    base = str(tmp_path / "live.vhd")
    vhdutil("create", "-n", base, "-s", "64")
    r = server.open("vhd:" + base)
    leaves = [str(tmp_path / ("snap%d.vhd" % k)) for k in range(3)]
    snapshots_under_fio(server, r["minor"], "vhd", leaves)
    server.call("destroy", minor=r["minor"])
    assert vhdutil("check", "-n", leaves[-1], "-p").returncode == 0
    assert vhdutil("query", "-n", leaves[-1], "-d").stdout.strip() == "chain depth: 4"


def test_snapshot_of_a_raw_leaf_and_refusals(server, tmp_path):
    rawp = make_image(tmp_path / "leaf.raw", 4 * MiB, pattern=0x42)
    r = server.open("aio:" + rawp)
    new = str(tmp_path / "on-raw.vhd")
    assert server.call("snapshot", minor=r["minor"], path=new)["result"]["params"] == "vhd:" + new
    h = connect(server, r["minor"])
    assert h.pread(512, 0) == b"\x42" * 512
    h.pwrite(b"n" * 512, 0)
    h.shutdown()
    with open(rawp, "rb") as f:
        assert f.read(512) == b"\x42" * 512
    with pytest.raises(ControlError) as e:             # exists already
        server.call("snapshot", minor=r["minor"], path=new)
    assert e.value.code == "EEXIST" and new in e.value.message
    assert server.call("list")["result"]["vbds"][0]["state"] == 0   # resumed on the old leaf
    ram = server.open("ram:1M")
    with pytest.raises(ControlError) as e:
        server.call("snapshot", minor=ram["minor"], path=str(tmp_path / "x.vhd"))
    assert e.value.code == "ENOTSUP"


def test_toolstack_pause_snapshot_coalesce_unpause(server, tmp_path):
    base = str(tmp_path / "vm.vhd")
    vhdutil("create", "-n", base, "-s", "16")
    r = server.open("vhd:" + base)
    m = r["minor"]
    h = connect(server, m)
    h.pwrite(b"1" * MiB, 0)
    # snapshot by hand, as a toolstack does
    server.tapctl("pause", "-m", m)
    leaf = str(tmp_path / "vm-leaf.vhd")
    vhdutil("snapshot", "-n", leaf, "-p", base)
    server.tapctl("unpause", "-m", m, "-a", "vhd:" + leaf)
    h.pwrite(b"2" * MiB, MiB)
    assert h.pread(2 * MiB, 0) == b"1" * MiB + b"2" * MiB
    # and coalesce back
    server.tapctl("pause", "-m", m)
    out = vhdutil("coalesce", "-n", leaf).stdout
    assert "Coalesced 2048 sectors" in out
    server.tapctl("unpause", "-m", m, "-a", "vhd:" + base)
    assert h.pread(2 * MiB, 0) == b"1" * MiB + b"2" * MiB   # same connection throughout
    h.shutdown()
    server.call("destroy", minor=m)
    assert vhdutil("check", "-n", base).returncode == 0


# ---- damaged images ----

def _alloc(tmp_path, server, name):
    img = str(tmp_path / name)
    vhdutil("create", "-n", img, "-s", "8")
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    h.pwrite(b"x" * 4096, 0)
    h.pwrite(b"y" * 4096, 2 * MiB)
    h.flush()
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    return img


def _bad_cookie(v):
    v.data[v.footer_off:v.footer_off + 8] = b"notavhd!"
    v.data[0:8] = b"notavhd!"


def _bad_footer_sum(v):
    v.set_footer("I", 60, 3, fix=False)
    v.data[v.footer_off + 64] ^= 0xff
    v.data[0:512] = v.data[v.footer_off:v.footer_off + 512]


def _bad_header_sum(v):
    v.data[v.header_off + 36] ^= 0xff


def _too_big(v):
    v.set_footer("Q", 48, 2041 << 30)


def _bad_block_size(v):
    v.set_header("I", 32, 3 * 1024 * 1024)


def _bat_past_end(v):
    v.set_bat(0, (len(v.data) // 512) + 100)


def _bat_into_meta(v):
    v.set_bat(1, v.table_off // 512)


def _bat_overlap(v):
    v.set_bat(1, v.bat(0) + 1)


def _absurd_bat(v):
    v.set_header("I", 28, 0xfffffff0)


@pytest.mark.parametrize("how,needle", [
    (_bad_cookie, "bad cookie"),
    (_bad_footer_sum, "checksum"),
    (_bad_header_sum, "header checksum"),
    (_too_big, "2040 GiB"),
    (_bad_block_size, "power of two"),
    (_bat_past_end, "past the end"),
    (_bat_into_meta, "overlaps"),
    (_bat_overlap, "overlap"),
    (_absurd_bat, "BAT"),
])
def test_damaged_images_are_refused_clearly(server, tmp_path, how, needle):
    img = _alloc(tmp_path, server, "bad.vhd")
    v = Vhd(img)
    how(v)
    v.save()
    before = open(img, "rb").read()
    with pytest.raises(ControlError) as e:
        server.call("open", params="vhd:" + img)
    assert needle in e.value.message, e.value.message
    assert img in e.value.message
    r = server.tapctl("create", "-a", "vhd:" + img, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    c = vhdutil("check", "-n", img, check=False)
    assert c.returncode == 1 and "appears invalid" in c.stdout
    assert open(img, "rb").read() == before           # nothing was written
    assert server.call("list")["result"]["vbds"] == []
    good = server.open("ram:1M")                     # the server serves on
    server.call("destroy", minor=good["minor"])


def test_self_loop_in_parent_chain_is_refused(server, tmp_path):
    base = str(tmp_path / "aa.vhd")
    vhdutil("create", "-n", base, "-s", "4")
    kid = str(tmp_path / "bb.vhd")
    vhdutil("snapshot", "-n", kid, "-p", base)
    v = Vhd(kid)
    v.set_parent_uuid(v.uuid())                       # its own parent...
    for i in range(len(v.data) - 6):                   # ...by every locator
        if v.data[i:i + 6] == b"aa.vhd":
            v.data[i:i + 6] = b"bb.vhd"
        if v.data[i:i + 12] == "aa.vhd".encode("utf-16-le"):
            v.data[i:i + 12] = "bb.vhd".encode("utf-16-le")
    v.fix_header()                                    # its parent name changed too
    v.save()
    with pytest.raises(ControlError) as e:
        server.call("open", params="vhd:" + kid)
    assert e.value.code == "ELOOP" and "loops" in e.value.message


def test_repair_restores_the_footer(server, tmp_path):
    img = _alloc(tmp_path, server, "rep.vhd")
    before = to_raw(img, str(tmp_path / "before.raw"))
    with open(img, "r+b") as f:
        f.seek(-512, 2)
        f.write(b"\0" * 512)                           # the footer is gone
    c = vhdutil("check", "-n", img, check=False)
    assert c.returncode == 1 and "repair" in c.stdout
    with pytest.raises(ControlError) as e:
        server.call("open", params="vhd:" + img)
    assert "repair" in e.value.message
    vhdutil("repair", "-n", img)
    assert vhdutil("check", "-n", img).returncode == 0
    assert to_raw(img, str(tmp_path / "after.raw")) == before


# ---- vhd-util ----

def test_vhdutil_query_scan_read(tmp_path):
    base = str(tmp_path / "q.vhd")
    vhdutil("create", "-n", base, "-s", "33")              # rounded to whole 2 MiB blocks
    assert vhdutil("query", "-n", base, "-v").stdout == "34\n"
    kid = str(tmp_path / "q-kid.vhd")
    vhdutil("snapshot", "-n", kid, "-p", base)
    out = vhdutil("query", "-n", kid, "-v", "-s", "-p", "-f", "-d").stdout.splitlines()
    assert out[0] == "34"
    assert int(out[1]) == os.path.getsize(kid)
    assert out[2] == base and out[3] == "hidden: 0" and out[4] == "chain depth: 2"
    lines = vhdutil("scan", base, kid).stdout.splitlines()
    assert lines[0] == "vhd=q.vhd capacity=%d size=%d hidden=0 parent=none" % (
        34 * MiB, os.path.getsize(base))
    assert lines[1].endswith("parent=q.vhd")
    bad = tmp_path / "junk.vhd"
    bad.write_bytes(b"junk" * 300)
    assert "scan-error=" in vhdutil("scan", str(bad)).stdout
    rd = vhdutil("read", "-p", "-n", kid).stdout
    assert "Differencing hard disk" in rd and "Parent locator" in rd and "MacX" in rd


def test_vhdutil_errors_are_one_line(tmp_path):
    for args in (["query", "-n", str(tmp_path / "none.vhd"), "-v"],
                 ["create", "-n", str(tmp_path), "-s", "4"],
                 ["create", "-n", str(tmp_path / "x.vhd"), "-s", "3000000"],
                 ["snapshot", "-n", str(tmp_path / "k.vhd"), "-p", str(tmp_path / "none.vhd")],
                 ["coalesce", "-n", str(tmp_path / "none.vhd")]):
        r = vhdutil(*args, check=False)
        assert r.returncode == 1, args
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("vhd-util "), r.stderr
    assert vhdutil("create", check=False).returncode == 2
    assert vhdutil("bogus", check=False).returncode == 2
    base = str(tmp_path / "e.vhd")
    vhdutil("create", "-n", base, "-s", "4")
    r = vhdutil("create", "-n", base, "-s", "4", check=False)
    assert r.returncode == 1 and "exists" in r.stderr


@pytest.mark.parametrize("fixed", [False, True])
def test_vhdutil_resize(server, tmp_path, fixed):
    img = str(tmp_path / "rs.vhd")
    vhdutil("create", "-n", img, "-s", "4", *(["-r"] if fixed else []))
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    h.pwrite(b"r" * MiB, 3 * MiB)
    h.flush()
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    vhdutil("resize", "-n", img, "-s", "40")            # beyond the BAT's room
    assert vhdutil("check", "-n", img).returncode == 0
    assert qemu_size(img) == 40 * MiB + (512 if fixed else 0)
    r = server.open("vhd:" + img)
    h = connect(server, r["minor"])
    assert h.pread(MiB, 3 * MiB) == b"r" * MiB
    assert h.pread(MiB, 4 * MiB) == bytes(MiB)          # new space reads zero
    h.pwrite(b"s" * MiB, 30 * MiB)
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    out = to_raw(img, str(tmp_path / "rs.raw"))
    assert out[30 * MiB:31 * MiB] == b"s" * MiB and out[3 * MiB:4 * MiB] == b"r" * MiB
    assert vhdutil("resize", "-n", img, "-s", "10", check=False).returncode == 1


# ---- a real file system ----

def test_ext4_on_a_vhd(server, tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse (nbdfuse, losetup, mount)")
    img = str(tmp_path / "fs.vhd")
    vhdutil("create", "-n", img, "-s", "128")
    r = server.open("vhd:" + img)
    files = ext4_on_vbd(server, r["minor"], tmp_path)
    server.call("destroy", minor=r["minor"])
    assert vhdutil("check", "-n", img).returncode == 0
    raw = str(tmp_path / "fs.raw")
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", img, raw)
    ext4_check_raw(raw, tmp_path, files)   # qemu's copy of the image holds the files


# ---- crash ----

def test_kill9_during_writes_20_times(make_server, tmp_path):
    img = str(tmp_path / "crash.vhd")
    vhdutil("create", "-n", img, "-s", "64")
    repaired = []

    def check(it):
        c = vhdutil("check", "-n", img, check=False)
        if c.returncode:
            repaired.append(it)
            vhdutil("repair", "-n", img)
            c = vhdutil("check", "-n", img, check=False)
        assert c.returncode == 0, c.stdout

    kill9_rounds(make_server, tmp_path, "vhd:" + img, check)
    print("repairs needed: %d of 20" % len(repaired))


def test_zeroes_and_discard_on_a_differencing_disk(server, tmp_path):
    base = str(tmp_path / "zb.vhd")
    vhdutil("create", "-n", base, "-s", "8")
    r = server.open("vhd:" + base)
    h = connect(server, r["minor"])
    h.pwrite(b"P" * (8 * MiB), 0)
    h.flush()
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    kid = str(tmp_path / "zk.vhd")
    vhdutil("snapshot", "-n", kid, "-p", base)
    r = server.open("vhd:" + kid)
    h = connect(server, r["minor"])
    h.zero(3 * MiB, MiB // 2)                 # must hide the parent, not expose it
    h.trim(MiB, 5 * MiB)                      # advisory: the data may stay
    assert h.pread(3 * MiB, MiB // 2) == bytes(3 * MiB)
    assert h.pread(4096, 0) == b"P" * 4096
    assert h.pread(4096, 7 * MiB) == b"P" * 4096
    h.shutdown()
    server.call("destroy", minor=r["minor"])
    assert vhdutil("check", "-n", kid, "-p").returncode == 0
    with open(base, "rb") as f:               # the parent is untouched
        v = Vhd(base)
        blk = v.bat(0) * 512 + 512
        f.seek(blk + MiB // 2)
        assert f.read(4096) == b"P" * 4096


def test_fua_write_is_durable_before_it_completes(make_server, tmp_path):
    """A FUA write (NBD's flag; blkif's barriers and flushes with data) to a
    dynamic VHD syncs its data and metadata before it is answered: seen as
    fdatasync calls by the thread engine, under strace. An overwrite without
    FUA syncs nothing; an allocation syncs between its steps (the power-loss
    order, docs/CRASH-REPLAY.md)."""
    srv = make_server(engine="threads")
    img = tmp_path / "fua.vhd"
    vhdutil("create", "-n", img, "-s", "16")
    m = srv.open("vhd:" + str(img))["minor"]
    h = nbd.NBD()
    h.connect_unix(srv.nbd_path(m))
    h.pwrite(b"a" * 4096, 0)
    out = tmp_path / "syncs"
    st = subprocess.Popen(["strace", "-f", "-e", "trace=fdatasync,fsync", "-o", str(out),
                           "-p", str(srv.proc.pid)], stderr=subprocess.PIPE, text=True)
    try:
        assert "attached" in st.stderr.readline()
        time.sleep(0.5)

        def syncs():
            time.sleep(0.3)
            return out.read_text().count("fdatasync(") if out.exists() else 0
        h.pwrite(b"c" * 4096, 0)                 # an overwrite: no sync
        assert syncs() == 0
        h.pwrite(b"b" * 4096, 1 << 20)           # new sectors of block 0: data | bitmap
        assert syncs() == 1
        h.pwrite(b"e" * 4096, 0, nbd.CMD_FLAG_FUA)          # an overwrite, FUA
        assert syncs() >= 2
        h.pwrite(b"d" * 4096, 2 << 20, nbd.CMD_FLAG_FUA)    # block 1: footer | blocks | BAT, FUA
        assert syncs() >= 5
    finally:
        st.terminate()
        st.wait()
    h.shutdown()
    srv.call("close", minor=m)
