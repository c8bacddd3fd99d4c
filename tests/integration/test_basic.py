"""The everyday session: tap-ctl create/list/stats/destroy, and real NBD
clients (qemu-io, qemu-img, nbdinfo, nbdcopy) reading and writing."""

import json
import os
import random

import nbd
import pytest

from conftest import make_image, run, validate


def test_tapctl_session(server, tmp_path):
    img = make_image(tmp_path / "disk.img", 64 << 20)
    r = server.tapctl("create", "-a", "aio:" + img)
    sock = r.stdout.strip()
    assert sock == server.nbd_path(0)
    assert os.path.exists(sock)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"

    lines = server.tapctl("list").stdout.splitlines()
    assert lines == ["pid=%d minor=0 state=0 args=aio:%s" % (server.proc.pid, img)]

    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M",
        "nbd+unix:///?socket=" + sock)
    with open(img, "rb") as f:
        assert f.read(1 << 20) == b"\x5a" * (1 << 20)

    st = json.loads(server.tapctl("stats", "-m", 0).stdout)
    validate(st, "vbd-stats.json")
    assert st["name"] == "aio:" + img
    assert st["secs"][1] == 2048 and st["secs"][0] >= 2048
    assert st["images"][0]["hits"][1] >= 1 and st["images"][0]["fail"] == [0, 0]
    assert st["ops"]["write"]["bytes"] == 1 << 20
    assert st["ops"]["write"]["latency_us"]["count"] == st["ops"]["write"]["reqs"]
    assert st["reqs_outstanding"] == 0

    server.tapctl("destroy", "-m", 0)
    assert server.tapctl("list").stdout == ""
    assert not os.path.exists(sock)


def test_list_filters_and_json(server, tmp_path):
    a = make_image(tmp_path / "a.img", 1 << 20)
    server.tapctl("create", "-a", "aio:" + a)
    server.tapctl("create", "-a", "ram:16M")
    assert len(server.tapctl("list").stdout.splitlines()) == 2
    assert server.tapctl("list", "-t", "ram").stdout.startswith("pid=%d minor=1 " % server.proc.pid)
    assert server.tapctl("list", "-f", a).stdout.count("\n") == 1
    assert server.tapctl("list", "-m", 1, "-t", "aio").stdout == ""
    raw = server.tapctl("--json", "list").stdout
    resp = json.loads(raw)
    validate(resp, "response.json")
    assert [v["minor"] for v in resp["result"]["vbds"]] == [0, 1]


def test_tapctl_relative_path_and_pid_check(server, tmp_path):
    from conftest import BIN
    make_image(tmp_path / "rel.img", 1 << 20)
    run(os.path.join(BIN, "tap-ctl"), "-S", server.state_dir, "create", "-a", "aio:rel.img",
        cwd=tmp_path)
    assert server.call("list")["result"]["vbds"][0]["path"] == str(tmp_path / "rel.img")
    assert server.tapctl("list", "-p", server.proc.pid).returncode == 0
    bad = server.tapctl("list", "-p", server.proc.pid + 100000, check=False)
    assert bad.returncode != 0 and "pid" in bad.stderr


def test_tapctl_errors_are_one_line(server, tmp_path):
    for args in (["create", "-a", "aio:" + str(tmp_path / "missing.img")],
                 ["destroy", "-m", 7],
                 ["stats", "-m", 3],
                 ["unpause", "-m", 0],
                 ["create", "-a", "nosuchtype:/x"]):
        r = server.tapctl(*args, check=False)
        assert r.returncode != 0, args
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("tap-ctl: "), r.stderr
    r = server.tapctl("create", check=False)
    assert r.returncode == 2 and "usage" in r.stderr
    r = server.tapctl("frobnicate", check=False)
    assert r.returncode == 2


def test_tapctl_without_server(tmp_path):
    from conftest import BIN
    r = run(os.path.join(BIN, "tap-ctl"), "-S", tmp_path, "list", check=False)
    assert r.returncode == 1
    assert "cannot reach tapdiskd" in r.stderr and r.stderr.count("\n") == 1
    env = dict(os.environ, TAPDISKD_STATE_DIR=str(tmp_path / "nowhere"))
    r = run(os.path.join(BIN, "tap-ctl"), "list", check=False, env=env)
    assert str(tmp_path / "nowhere") in r.stderr


def test_nbdinfo_flags(server, tmp_path):
    img = make_image(tmp_path / "d.img", 32 << 20)
    rw = server.open("aio:" + img)
    info = json.loads(run("nbdinfo", "--json", server.uri(rw["minor"])).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == 32 << 20
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_cache", "can_df"):
        assert exp[flag] is True, flag
    assert exp["is_read_only"] is False
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_maximum"] == 32 << 20
    assert "base:allocation" in exp["contexts"]


def test_readonly_export(server, tmp_path):
    img = make_image(tmp_path / "ro.img", 8 << 20, pattern=0x11)
    server.tapctl("create", "-R", "-a", "aio:" + img)
    uri = server.uri(0)
    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert info["is_read_only"] is True
    assert info["can_trim"] is False and info["can_zero"] is False
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 1M", uri)
    h = nbd.NBD()
    h.connect_uri(uri)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()
    with open(img, "rb") as f:
        assert f.read(512) == b"\x11" * 512


def test_qemu_img_convert_compare(server, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(48 << 20)
        for i in range(0, 48, 3):
            f.seek(i << 20)
            f.write(os.urandom(256 << 10))
    dst = make_image(tmp_path / "dst.img", 48 << 20)
    server.open("aio:" + dst)
    uri = server.uri(0)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, dst)


def test_nbdcopy_both_ways(server, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(20 << 20))
        f.truncate(64 << 20)
    server.open("ram:64M")
    uri = server.uri(0)
    run("nbdcopy", src, uri)
    back = tmp_path / "back.raw"
    run("nbdcopy", uri, back)
    run("cmp", src, back)


def test_map_shows_holes(server, tmp_path):
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
        f.seek(4 << 20)
        f.write(b"\xff" * (1 << 20))
    server.open("aio:" + str(img))
    out = run("nbdinfo", "--map", "--json", server.uri(0)).stdout
    extents = json.loads(out)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [(4 << 20, 1 << 20)], extents
    # discard in the middle of the data punches a hole that the map then shows
    run("qemu-io", "-f", "raw", "-c", "discard 4M 512k", server.uri(0))
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri(0)).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [((4 << 20) + (512 << 10), 512 << 10)], extents
    with open(img, "rb") as f:
        f.seek(4 << 20)
        assert f.read(512 << 10) == b"\0" * (512 << 10)
    # the driver remembers a data region it found: write-zeroes must forget it too
    run("qemu-io", "-f", "raw", "-c", "write -P 7 4M 1M", server.uri(0))
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri(0)).stdout)
    assert [(e["offset"], e["length"]) for e in extents if e["type"] == 0] == [(4 << 20, 1 << 20)]
    run("qemu-io", "-f", "raw", "-c", "write -z -u 4352k 256k", server.uri(0))
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri(0)).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [(4 << 20, 256 << 10), (4608 << 10, 512 << 10)], extents


def test_write_zeroes_variants(server, tmp_path):
    img = make_image(tmp_path / "z.img", 8 << 20)
    with open(img, "r+b") as f:
        f.write(b"\xee" * (8 << 20))
    server.open("aio:" + img)
    h = nbd.NBD()
    h.connect_uri(server.uri(0))
    h.zero(1 << 20, 0)                                   # may punch
    h.zero(1 << 20, 2 << 20, nbd.CMD_FLAG_NO_HOLE)       # must stay allocated
    h.zero(4096, 5 << 20, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(1000, 7 << 20, nbd.CMD_FLAG_FUA)              # unaligned
    assert h.pread(1 << 20, 0) == b"\0" * (1 << 20)
    assert h.pread(1 << 20, 2 << 20) == b"\0" * (1 << 20)
    assert h.pread(4096, 5 << 20) == b"\0" * 4096
    assert h.pread(1000, 7 << 20) == b"\0" * 1000
    assert h.pread(24, (7 << 20) + 1000) == b"\xee" * 24
    h.shutdown()
    st = os.stat(img)
    assert st.st_blocks * 512 < 8 << 20, "the first MiB should have been deallocated"


def test_unaligned_io_and_fua(server, tmp_path):
    img = make_image(tmp_path / "u.img", 4 << 20)
    server.open("aio:" + img)
    h = nbd.NBD()
    h.connect_uri(server.uri(0))
    blob = os.urandom(12345)
    h.pwrite(blob, 777, nbd.CMD_FLAG_FUA)
    assert h.pread(12345, 777) == blob
    h.pwrite(b"A" * 4096, 16384)
    h.flush()
    h.cache(1 << 20, 0)
    assert h.pread(3, 16383) == b"\0AA"
    h.shutdown()
    with open(img, "rb") as f:
        f.seek(777)
        assert f.read(12345) == blob


def test_direct_and_buffered_io_sharing_pages(server, tmp_path):
    """Sector-aligned writes, and unaligned writes and reads of other bytes
    of the same pages, all in flight together, on a file that takes
    O_DIRECT. The unaligned ones go through the page cache, so a direct
    write to such a page would collide with them (the kernel then warns
    "Page cache invalidation failure" and fails the next fdatasync with
    EIO). Only page-aligned transfers may go direct: every flush succeeds
    and every byte lands."""
    size = 8 << 20
    img = make_image(tmp_path / "pages.img", size)
    server.open("aio:" + img)
    h = nbd.NBD()
    h.connect_uri(server.uri(0))
    rng = random.Random(7)
    expect = bytearray(size)

    def write(off, n):
        data = os.urandom(n)
        expect[off:off + n] = data
        h.aio_pwrite(data, off)

    for _ in range(12):
        for base in range(0, size, 4096):
            ops = [lambda: write(base, 512),
                   lambda: write(base + 1000 + rng.randrange(2000), 100),
                   lambda: h.aio_pread(nbd.Buffer(50), base + 3200 + rng.randrange(800))]
            rng.shuffle(ops)
            for op in ops[:2]:
                op()
            while h.aio_in_flight() >= 64:
                h.poll(-1)
        while h.aio_in_flight():
            h.poll(-1)
        h.flush()
    assert h.pread(size, 0) == expect
    h.shutdown()
    with open(img, "rb") as f:
        assert f.read() == expect


def test_ram_disk_block_status_and_discard(server):
    server.open("ram:8M")
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri(0))
    h.pwrite(b"\x42" * (128 << 10), 1 << 20)
    seen = []

    def cb(meta, offset, entries, err):
        seen.append((offset, list(entries)))
        return 0

    h.block_status(8 << 20, 0, cb)
    entries = seen[0][1]
    ext, off = [], 0
    for i in range(0, len(entries), 2):
        ext.append((off, entries[i], entries[i + 1]))
        off += entries[i]
    assert (1 << 20, 128 << 10, 0) in ext, ext
    assert ext[0] == (0, 1 << 20, 3)
    h.trim(128 << 10, 1 << 20)
    assert h.pread(128 << 10, 1 << 20) == b"\0" * (128 << 10)
    h.shutdown()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def test_ram_disk_reads_of_unwritten_chunks_take_no_memory(server):
    """Reading a thin ram disk end to end returns zeros without filling the
    host's memory (a read fault on untouched memory allocates a page on some
    kernels, this machine's among them), and a read across written and
    unwritten chunks returns each part right."""
    server.open("ram:1G")
    h = nbd.NBD()
    h.connect_uri(server.uri(0))
    h.pread(1 << 20, 0)          # the buffer pool warmed up
    before = rss_kib(server.proc.pid)
    # 1 MiB reads: their buffers come back from the pool (under ASan, big
    # freed buffers would sit in its quarantine and look like growth)
    zero = bytes(1 << 20)
    for off in range(0, 1 << 30, 1 << 20):
        assert h.pread(1 << 20, off) == zero
    grown = rss_kib(server.proc.pid) - before
    assert grown < 64 << 10, "server grew by %d KiB reading holes" % grown
    h.pwrite(b"\x5a" * 1000, (64 << 10) - 500)     # straddles chunks 0 and 1
    got = h.pread(256 << 10, 0)
    assert got == (b"\0" * ((64 << 10) - 500) + b"\x5a" * 1000 +
                   b"\0" * ((192 << 10) - 500))
    h.shutdown()


def test_named_ram_is_shared(server):
    a = server.open("ram:shared1:4M")
    b = server.open("ram:shared1:4M")
    ha, hb = nbd.NBD(), nbd.NBD()
    ha.connect_uri(server.uri(a["minor"]))
    hb.connect_uri(server.uri(b["minor"]))
    ha.pwrite(b"shared!" * 100, 4096)
    assert hb.pread(700, 4096) == b"shared!" * 100
    ha.shutdown()
    hb.shutdown()
    with pytest.raises(Exception):
        server.open("ram:shared1:8M")


def test_multiple_clients_one_vbd(server):
    server.open("ram:32M")
    hs = [nbd.NBD() for _ in range(8)]
    for h in hs:
        h.connect_uri(server.uri(0))
    for i, h in enumerate(hs):
        h.pwrite(bytes([i + 1]) * 65536, i * 65536)
    for i, h in enumerate(hs):
        other = hs[(i + 3) % 8]
        assert other.pread(65536, i * 65536) == bytes([i + 1]) * 65536
    assert server.stats(0)["frontends"]["nbd"] == 8
    for h in hs:
        h.shutdown()


def test_global_listener_by_export_name(make_server, tmp_path):
    sock = tmp_path / "all.sock"
    srv = make_server(extra=["--nbd-listen", "unix:%s" % sock])
    srv.open("ram:1M")
    srv.open("ram:2M", minor=3)
    out = run("nbdinfo", "--list", "--json", "nbd+unix:///?socket=%s" % sock).stdout
    names = sorted(e["export-name"] for e in json.loads(out)["exports"])
    assert names == ["0", "3"]
    info = json.loads(run("nbdinfo", "--json", "nbd+unix:///3?socket=%s" % sock).stdout)
    assert info["exports"][0]["export-size"] == 2 << 20
    r = run("nbdinfo", "nbd+unix:///9?socket=%s" % sock, check=False)
    assert r.returncode != 0


def test_tcp_listener_on_loopback(make_server):
    import socket as s
    probe = s.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    srv = make_server(extra=["--nbd-listen", "tcp:127.0.0.1:%d" % port])
    srv.open("ram:1M")
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "read -P 7 0 64k",
        "nbd://127.0.0.1:%d/0" % port)


def test_relative_paths_resolve_against_the_clients_cwd(server, tmp_path):
    """The server alone decides what is a path (ram: names no file), against
    the cwd the client sends; without one a relative path is refused."""
    make_image(tmp_path / "a.img", 1 << 20)
    r = server.call("open", check=False, params="aio:a.img")
    assert r["ok"] is False and "relative path" in r["error"]["message"]
    assert server.call("list")["result"]["vbds"] == []
    m = server.open("aio:a.img", cwd=str(tmp_path))["minor"]
    assert server.call("list")["result"]["vbds"][0]["path"] == str(tmp_path / "a.img")
    server.call("close", minor=m)
    # ram:SIZE names no file: it is never joined to a directory
    opened = server.open("ram:4M", cwd=str(tmp_path))
    m = opened["minor"]
    assert opened["params"] == "ram:4M" and opened["size"] == 4 << 20
    # a snapshot's new leaf resolves the same way
    from conftest import BIN
    run(os.path.join(BIN, "vhd-util"), "create", "-n", str(tmp_path / "b.vhd"), "-s", "4")
    m2 = server.open("vhd:" + str(tmp_path / "b.vhd"))["minor"]
    r = server.call("snapshot", minor=m2, path="b-snap.vhd", cwd=str(tmp_path))
    assert (tmp_path / "b-snap.vhd").exists(), r
    server.call("close", minor=m)
    server.call("close", minor=m2)
