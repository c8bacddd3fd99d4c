"""Changed-block tracking: a vbd opened with a CBT log (tapdisk's format,
docs/CBT-LOG.md) marks every block a write, write-zeroes or discard touches,
durably before the data is written; qemu's and libnbd's clients read the
marks as the NBD meta context qemu:dirty-bitmap:cbt; a live snapshot
rotates the log, and an incremental backup built from the old log restores
the disk exactly."""
import json
import os
import shutil
import struct
import subprocess
import time

import nbd
import pytest

from conftest import BIN, Server, make_image, run, wait_for
import crash_replay

BLOCK = 64 << 10
HDR = struct.Struct("<16s16si4xQ")
CTX = "qemu:dirty-bitmap:cbt"


def bitmap_len(size):
    return ((size + BLOCK - 1) // BLOCK + 7) // 8


def make_log(path, size, blocks=(), consistent=0, parent=b"\0" * 16, child=b"\0" * 16):
    """A log built byte by byte from the format's description."""
    bm = bytearray(bitmap_len(size))
    for b in blocks:
        bm[b // 8] |= 1 << (b % 8)
    with open(path, "wb") as f:
        f.write(HDR.pack(parent, child, consistent, size) + bytes(bm))
    return str(path)


def read_log(path):
    with open(path, "rb") as f:
        buf = f.read()
    parent, child, consistent, size = HDR.unpack_from(buf)
    bm = buf[HDR.size:HDR.size + bitmap_len(size)]
    blocks = {i for i in range(len(bm) * 8) if bm[i // 8] >> (i % 8) & 1}
    return {"consistent": consistent, "size": size, "blocks": blocks, "parent": parent,
            "child": child, "len": len(buf)}


def blocks_of(offset, length):
    return set(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))


def dirty_map(uri):
    """[(offset, length, dirty)] of the whole disk through libnbd's block_status."""
    h = nbd.NBD()
    h.add_meta_context(CTX)
    h.connect_uri(uri)
    assert h.can_meta_context(CTX)
    size, out, off = h.get_size(), [], 0
    while off < size:
        got = []

        def cb(ctx, o, entries, err):
            if ctx == CTX:
                got.extend(entries)
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        assert got, "no extents for %s at %d" % (CTX, off)
        for i in range(0, len(got), 2):
            out.append((off, got[i], got[i + 1] & 1))
            off += got[i]
    h.shutdown()
    return out


def dirty_blocks_nbd(uri):
    blocks = set()
    for off, length, dirty in dirty_map(uri):
        if dirty:
            assert off % BLOCK == 0 and (length % BLOCK == 0 or off + length >= 0), (off, length)
            blocks |= blocks_of(off, length)
    return blocks


def test_every_kind_of_write_marks_its_blocks_and_nbd_shows_them(server, tmp_path):
    size = 64 << 20
    img = make_image(tmp_path / "d.img", size)
    log = make_log(tmp_path / "d.log", size)
    m = server.open("aio:" + img, cbt_log=log)["minor"]
    uri = server.uri(m)
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", "-c", "write -P 8 1M 128k",
        "-c", "write -z 8M 64k", "-c", "discard 20M 192k",
        "-c", "write -P 9 %d 512" % (size - 512), "-c", "read 30M 1M", uri)
    want = ({0} | blocks_of(1 << 20, 128 << 10) | blocks_of(8 << 20, 64 << 10) |
            blocks_of(20 << 20, 192 << 10) | {size // BLOCK - 1})
    assert dirty_blocks_nbd(uri) == want
    st = server.stats(m)["cbt"]
    assert st["dirty_blocks"] == len(want) and st["blocks"] == size // BLOCK
    assert st["log"] == log and st["log_errors"] == 0 and st["log_writes"] >= 1
    # a rewrite of marked blocks costs no log write
    writes = st["log_writes"]
    run("qemu-io", "-f", "raw", "-c", "write -P 3 0 4k", "-c", "write -P 3 1M 64k", uri)
    assert server.stats(m)["cbt"]["log_writes"] == writes
    # nbdinfo and qemu-img read the same map
    out = run("nbdinfo", "--map=" + CTX, uri).stdout
    seen = set()
    for line in out.splitlines():
        off, length, flag = line.split()[:3]
        if flag == "1":
            seen |= blocks_of(int(off), int(length))
    assert seen == want
    # in the file, while open: the bits, and the flag cleared
    on_disk = read_log(log)
    assert on_disk["blocks"] == want and on_disk["consistent"] == 0
    assert [v["cbt_log"] for v in server.call("list")["result"]["vbds"]
            if v["minor"] == m] == [log]
    server.call("close", minor=m)
    after = read_log(log)
    assert after["consistent"] == 1 and after["blocks"] == want and after["size"] == size
    # exactly the bytes the format describes
    assert open(log, "rb").read() == open(make_log(tmp_path / "want.log", size, want, 1),
                                          "rb").read()


def test_concurrent_first_writes_share_log_writes(server, tmp_path):
    size = 64 << 20
    img = make_image(tmp_path / "d.img", size)
    log = make_log(tmp_path / "d.log", size)
    m = server.open("aio:" + img, cbt_log=log)["minor"]
    _fio_write(server.uri(m), size, 7, extra=["--iodepth=32", "--number_ios=2000"])
    st = server.stats(m)["cbt"]
    # at QD32 many first writes wait together: far fewer log writes than blocks marked
    assert st["dirty_blocks"] > 500 and st["log_writes"] < st["dirty_blocks"] * 0.7, st
    server.call("close", minor=m)


def test_a_log_that_does_not_fit_is_refused_in_one_line(server, tmp_path):
    size = 16 << 20
    img = make_image(tmp_path / "d.img", size)
    for name, log, why in [
            ("size", make_log(tmp_path / "other.log", size * 2), "is for a disk of"),
            ("short", str(tmp_path / "short.log"), "shorter"),
            ("missing", str(tmp_path / "none.log"), "No such file"),
            ("flag", make_log(tmp_path / "flag.log", size, consistent=5), "neither 0 nor 1")]:
        if name == "short":
            with open(make_log(log, size), "r+b") as f:
                f.truncate(HDR.size + bitmap_len(size) - 1)
        r = server.call("open", check=False, params="aio:" + img, cbt_log=log)
        assert not r["ok"] and why in r["error"]["message"], (name, r)
        assert "\n" not in r["error"]["message"]
    assert server.call("list")["result"]["vbds"] == []
    # and tap-ctl says it in one line too
    r = server.tapctl("create", "-a", "aio:" + img, "-C", str(tmp_path / "other.log"),
                      check=False)
    assert r.returncode != 0 and "is for a disk of" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _copy_dirty(uri, dst, size):
    """An incremental backup with libnbd: only the dirty extents, onto dst; bytes copied."""
    h = nbd.NBD()
    h.add_meta_context(CTX)
    h.connect_uri(uri)
    copied = 0
    with open(dst, "r+b") as f:
        for off, length, dirty in dirty_map(uri):
            if not dirty:
                continue
            pos = off
            while pos < off + length:
                n = min(off + length - pos, 4 << 20)
                f.seek(pos)
                f.write(h.pread(n, pos))
                pos += n
                copied += n
    h.shutdown()
    return copied


def _qemu_img_dirty(uri_path):
    """The dirty extents as qemu-img map reads them (x-dirty-bitmap: dirty = not present)."""
    out = run("qemu-img", "map", "--output=json", "--image-opts",
              "driver=nbd,server.type=unix,server.path=%s,x-dirty-bitmap=%s" % (uri_path, CTX)
              ).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["present"]]


def _fio_write(filename, size, seed, runtime=None, extra=()):
    args = ["fio", "--name=w", "--ioengine=nbd", "--uri=" + filename, "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--size=%d" % size, "--randseed=%d" % seed,
            "--randrepeat=0", "--norandommap", "--output-format=json"] + list(extra)
    args += ["--runtime=%d" % runtime, "--time_based"] if runtime else ["--number_ios=3000"]
    return run(*args, timeout=300)


def test_incremental_backup_flow_restores_the_disk_exactly(server, tmp_path):
    size = 64 << 20
    base = str(tmp_path / "base.vhd")
    run(os.path.join(BIN, "vhd-util"), "create", "-n", base, "-s", size >> 20)
    log0 = make_log(tmp_path / "log0", size)
    log1 = make_log(tmp_path / "log1", size)
    log2 = make_log(tmp_path / "log2", size)
    m = int(server.tapctl("create", "-a", "vhd:" + base, "-C", log0).stdout.strip()
            .rsplit(".", 1)[1])
    uri = server.uri(m)
    _fio_write(uri, size, 1)
    # (1) snapshot: base frozen, tracking moves to log1; the full backup reads base
    leaf1 = str(tmp_path / "leaf1.vhd")
    server.tapctl("snapshot", "-m", m, "-n", leaf1, "-C", log1)
    assert read_log(log0)["consistent"] == 1
    full = str(tmp_path / "full.raw")
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", base, full)
    # changes since the full backup: a quarter of the disk, and two more places
    _fio_write(uri, size // 4, 2)
    run("qemu-io", "-f", "raw", "-c", "write -P 5 40M 1M", "-c", "discard 50M 256k", uri)
    # (1) again: leaf1 frozen; log1 now says what changed in it since the full backup
    leaf2 = str(tmp_path / "leaf2.vhd")
    server.tapctl("snapshot", "-m", m, "-n", leaf2, "-C", log2)
    changed = read_log(log1)
    assert changed["consistent"] == 1 and changed["blocks"]
    # (2) the frozen image served read-only with its log
    sock = server.tapctl("create", "-R", "-a", "vhd:" + leaf1, "-C", log1).stdout.strip()
    frozen = int(sock.rsplit(".", 1)[1])
    furi = server.uri(frozen)
    assert dirty_blocks_nbd(furi) == changed["blocks"]
    st = server.stats(frozen)["cbt"]
    assert st["readonly"] and st["dirty_blocks"] == len(changed["blocks"])
    # (3) copy only the dirty extents onto a copy of the full backup
    incr = str(tmp_path / "restored.raw")
    shutil.copyfile(full, incr)
    copied = _copy_dirty(furi, incr, size)
    assert copied == len(changed["blocks"]) * BLOCK, (copied, len(changed["blocks"]))
    assert copied < size // 2
    # qemu-img sees the same extents
    q = _qemu_img_dirty(server.nbd_path(frozen))
    assert {b for off, length in q for b in blocks_of(off, length)} == changed["blocks"]
    # full + incremental == the disk at the second snapshot, byte for byte (read
    # through tapdiskd: qemu's vpc driver does not follow a differencing disk's parent)
    want = str(tmp_path / "leaf1.raw")
    run("nbdcopy", furi, want)
    run("cmp", incr, want)
    assert open(full, "rb").read() != open(want, "rb").read()
    # (4) destroy it; the read-only log was left as it was
    server.tapctl("destroy", "-m", frozen)
    assert read_log(log1) == changed
    # the live disk goes on on leaf2, tracked in log2
    run("qemu-io", "-f", "raw", "-c", "write -P 6 0 4k", uri)
    assert 0 in dirty_blocks_nbd(uri)
    # a toolstack coalesces the snapshot later, and the logs with it: log1 into log2
    server.call("close", minor=m)
    run(os.path.join(BIN, "cbt-util"), "coalesce", "-p", log1, "-c", log2)
    assert read_log(log2)["blocks"] == changed["blocks"] | {0}


def test_kill9_under_load_then_reopen_the_log_still_marks_every_change(make_server, tmp_path):
    size = 64 << 20
    img = make_image(tmp_path / "d.img", size)
    before = str(tmp_path / "before.img")
    shutil.copyfile(img, before)
    log = make_log(tmp_path / "d.log", size)
    srv = make_server()
    m = srv.open("aio:" + img, cbt_log=log)["minor"]
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", "--uri=" + srv.uri(m),
                            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=%d" % size,
                            "--runtime=30", "--time_based", "--randrepeat=0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: srv.stats(m)["cbt"]["dirty_blocks"] > 200, timeout=30, what="writes")
    srv.kill()
    fio.wait(timeout=60)
    assert read_log(log)["consistent"] == 0
    # every 64 KiB block that differs from before is marked
    marked = read_log(log)["blocks"]
    a, b = open(before, "rb").read(), open(img, "rb").read()
    differ = {i for i in range(size // BLOCK) if a[i * BLOCK:(i + 1) * BLOCK] !=
              b[i * BLOCK:(i + 1) * BLOCK]}
    assert differ and differ <= marked, sorted(differ - marked)[:10]
    # reopened after the crash: accepted, said so, and the bits are still there
    srv2 = make_server("state2")
    m2 = srv2.open("aio:" + img, cbt_log=log)["minor"]
    assert "was not closed cleanly" in srv2.log()	# (or is new: one sentence for both)
    assert dirty_blocks_nbd(srv2.uri(m2)) == marked
    # the incremental from the before image restores it exactly
    _copy_dirty(srv2.uri(m2), before, size)
    srv2.call("close", minor=m2)
    run("cmp", before, img)


@pytest.mark.replay	# slow, and the engine's part is the same in each pass: the first only
@pytest.mark.parametrize("fmt", ["raw", "vhd", "qcow2"])
def test_bits_are_durable_before_the_data_write_leaves(tmp_path, fmt):
    """The write-ahead rule in a --record-io recording: at the moment each
    tracked write goes down the chain (the server's cbt-write mark), the
    durable content of the log (what every power-loss state holds, in the
    replay's model) already marks its blocks. So at every crash point every
    block that may differ from the last backup is marked."""
    size = 32 << 20
    if fmt == "raw":
        img, params = make_image(tmp_path / "d.img", size), "aio:%s"
    elif fmt == "vhd":
        img = str(tmp_path / "d.vhd")
        run(os.path.join(BIN, "vhd-util"), "create", "-n", img, "-s", size >> 20)
        params = "vhd:%s"
    else:
        img = str(tmp_path / "d.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
        params = "qcow2:%s"
    log = make_log(tmp_path / "d.log", size)
    rec = str(tmp_path / "io.rec")
    srv = Server(tmp_path / "rec", extra=["--record-io", rec], loops="1").start()
    try:
        m = srv.open(params % img, cbt_log=log)["minor"]
        _fio_write(srv.uri(m), size, 3, extra=["--number_ios=400"])
        run("qemu-io", "-f", "raw", "-c", "write -z 4M 256k", "-c", "discard 8M 128k",
            "-c", "write -P 1 12M 3M", "-c", "flush", srv.uri(m))
        srv.call("close", minor=m)
    finally:
        srv.stop()
    rec_log = crash_replay.Log(rec)
    logs = [c for c in rec_log.changes if c.path == log]
    assert logs, "the log's writes were not recorded"
    checked = 0
    for idx, text in rec_log.marks:
        if not text.startswith("cbt-write "):
            continue
        _, _, off, length = text.split()
        durable, _ = rec_log.split(idx)
        files = {log: bytearray(open(make_log(tmp_path / "empty.log", size), "rb").read())}
        for c in durable:
            if c.path == log:
                crash_replay.apply_change(files, c)
        bm = files[log][HDR.size:]
        for b in blocks_of(int(off), int(length)):
            assert bm[b // 8] >> (b % 8) & 1, \
                "block %d written (mark %d) before its bit was durable in the log" % (b, idx)
        checked += 1
    assert checked >= 400, checked
    if fmt != "raw":
        return
    # raw: the file's offsets are the disk's, so check the replay's crash points
    # directly: whatever subset of the writes before a crash point reached the
    # image, every block they touched is marked in the log's durable content
    points = rec_log.crash_points()
    for p in points:
        durable, maybe = rec_log.split(p)
        touched = set()
        for c in durable + maybe:
            if c.path == img and c.kind in (crash_replay.K_WRITE, crash_replay.K_FALLOCATE):
                touched |= blocks_of(c.offset, c.length)
        files = {log: bytearray(open(make_log(tmp_path / "empty.log", size), "rb").read())}
        for c in durable:
            if c.path == log:
                crash_replay.apply_change(files, c)
        bm = files[log][HDR.size:]
        missing = [b for b in touched if not bm[b // 8] >> (b % 8) & 1]
        assert not missing, "crash point %d: blocks %s may differ, unmarked" % (p, missing[:5])
    assert len(points) > 50, len(points)


def test_unpause_switches_logs_and_a_grown_disk_grows_its_log(server, tmp_path):
    size = 16 << 20
    img = make_image(tmp_path / "d.img", size)
    a, b = make_log(tmp_path / "a.log", size), make_log(tmp_path / "b.log", size)
    m = server.open("aio:" + img, cbt_log=a)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", server.uri(m))
    server.tapctl("pause", "-m", m)
    server.tapctl("unpause", "-m", m, "-c", b)
    assert read_log(a)["consistent"] == 1 and read_log(a)["blocks"] == {0}
    run("qemu-io", "-f", "raw", "-c", "write -P 2 1M 64k", server.uri(m))
    assert read_log(b)["blocks"] == {16} and server.stats(m)["cbt"]["log"] == b
    # a log for another size is refused at unpause: the vbd stays paused on its old log
    wrong = make_log(tmp_path / "wrong.log", size * 4)
    server.tapctl("pause", "-m", m)
    r = server.tapctl("unpause", "-m", m, "-c", wrong, check=False)
    assert r.returncode != 0 and "is for a disk of" in r.stderr
    server.tapctl("unpause", "-m", m)
    assert server.stats(m)["cbt"]["log"] == b
    # the disk grows while paused: the log grows with clear bits
    server.tapctl("pause", "-m", m)
    os.truncate(img, size * 2)
    server.tapctl("unpause", "-m", m)
    grown = read_log(b)
    assert grown["size"] == size * 2 and grown["len"] == HDR.size + bitmap_len(size * 2)
    assert grown["blocks"] == {16}
    run("qemu-io", "-f", "raw", "-c", "write -P 3 %d 4k" % (size + (1 << 20)), server.uri(m))
    assert dirty_blocks_nbd(server.uri(m)) == {16, (size + (1 << 20)) // BLOCK}
    # and shrinking is refused
    server.tapctl("pause", "-m", m)
    os.truncate(img, size)
    r = server.tapctl("unpause", "-m", m, check=False)
    assert r.returncode != 0 and "shrank" in r.stderr
    server.call("close", minor=m)


def test_snapshot_rotation_under_fio_verify(server, tmp_path):
    size = 64 << 20
    base = str(tmp_path / "base.vhd")
    run(os.path.join(BIN, "vhd-util"), "create", "-n", base, "-s", size >> 20)
    logs = [make_log(tmp_path / ("l%d" % i), size) for i in range(4)]
    m = server.open("vhd:" + base, cbt_log=logs[0])["minor"]
    fio = subprocess.Popen(["fio", "--name=v", "--ioengine=nbd", "--uri=" + server.uri(m),
                            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=%d" % size,
                            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                            "--number_ios=6000", "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for i in range(1, 4):
        time.sleep(0.3)
        server.tapctl("snapshot", "-m", m, "-n", str(tmp_path / ("s%d.vhd" % i)), "-C", logs[i])
    out, err = fio.communicate(timeout=300)
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    for i in range(3):
        assert read_log(logs[i])["consistent"] == 1
    assert server.stats(m)["cbt"]["log"] == logs[3]
    server.call("close", minor=m)
    # every block fio wrote is marked in the log of the leaf it went to
    marked = set().union(*(read_log(lg)["blocks"] for lg in logs))
    assert len(marked) > 100


def test_blkif_guest_writes_are_marked(tmp_path):
    from xen_harness import Xen
    xen = Xen(tmp_path)
    try:
        size = 64 << 20
        log = make_log(tmp_path / "g.log", size)
        m = xen.srv.open("ram:64M", cbt_log=log)["minor"]
        be = xen.attach(m)
        r = xen.sim(be, "--verify", 1, "--discard", "--region-mb", 16)
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["writes"] > 100
        marked = xen.srv.stats(m)["cbt"]["dirty_blocks"]
        h = nbd.NBD()
        h.connect_uri(xen.srv.uri(m))
        data = h.pread(16 << 20, 0)
        h.shutdown()
        written = {i for i in range(len(data) // BLOCK)
                   if data[i * BLOCK:(i + 1) * BLOCK].count(0) != BLOCK}
        blocks = dirty_blocks_nbd(xen.srv.uri(m))
        assert written and written <= blocks and marked == len(blocks)
        assert max(blocks) < (16 << 20) // BLOCK
        # the incremental onto the full backup (the fresh disk: zeros) is the disk
        backup = str(tmp_path / "backup.raw")
        make_image(backup, size)
        assert _copy_dirty(xen.srv.uri(m), backup, size) == len(blocks) * BLOCK
        live = str(tmp_path / "live.raw")
        run("nbdcopy", xen.srv.uri(m), live)
        run("cmp", backup, live)
    finally:
        xen.close()


def test_a_failing_log_fails_only_the_writes_that_need_it(make_server, tmp_path):
    size = 16 << 20
    srv = make_server(extra=["--fault-injection"])
    img = make_image(tmp_path / "d.img", size)
    log = make_log(tmp_path / "d.log", size)
    other = make_image(tmp_path / "o.img", size)
    m = srv.open("aio:" + img, cbt_log=log)["minor"]
    o = srv.open("aio:" + other)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri(m))
    srv.call("fault-inject", nth=1, count=1000, error="EIO", path="d.log")
    r = run("qemu-io", "-f", "raw", "-c", "write -P 2 1M 4k", srv.uri(m), check=False)
    assert "Input/output error" in r.stdout + r.stderr
    # a write into a marked block needs no log write: it works
    run("qemu-io", "-f", "raw", "-c", "write -P 3 0 4k", srv.uri(m))
    run("qemu-io", "-f", "raw", "-c", "write -P 4 0 64k", "-c", "read -P 4 0 64k", srv.uri(o))
    srv.call("fault-inject", disarm=True)
    # the data of the failed write never reached the image, its bit is not on disk
    with open(img, "rb") as f:
        f.seek(1 << 20)
        assert f.read(4096) == bytes(4096)
    run("qemu-io", "-f", "raw", "-c", "write -P 5 1M 4k", "-c", "read -P 5 1M 4k", srv.uri(m))
    st = srv.stats(m)["cbt"]
    assert st["log_errors"] >= 1 and st["dirty_blocks"] == 2
    srv.call("close", minor=m)
    assert read_log(log)["blocks"] == {0, 16}


def test_switching_logs_keeps_a_ram_disk_and_its_data(server, tmp_path):
    size = 16 << 20
    a, b = make_log(tmp_path / "a.log", size), make_log(tmp_path / "b.log", size)
    m = server.open("ram:16M", cbt_log=a)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 9 0 128k", server.uri(m))
    server.tapctl("pause", "-m", m)
    server.tapctl("unpause", "-m", m, "-c", b)
    # the chain stayed open (a ram disk would have lost its data): only the log changed
    run("qemu-io", "-f", "raw", "-c", "read -P 9 0 128k", "-c", "write -P 1 1M 4k",
        server.uri(m))
    assert read_log(a)["blocks"] == {0, 1} and read_log(a)["consistent"] == 1
    assert dirty_blocks_nbd(server.uri(m)) == {16}
    # a log that does not fit leaves it paused on the old one, data intact
    server.tapctl("pause", "-m", m)
    r = server.tapctl("unpause", "-m", m, "-c", make_log(tmp_path / "w.log", size * 2),
                      check=False)
    assert r.returncode != 0 and "is for a disk of" in r.stderr
    server.tapctl("unpause", "-m", m)
    run("qemu-io", "-f", "raw", "-c", "read -P 9 0 128k", server.uri(m))
    assert server.stats(m)["cbt"]["log"] == b
