"""The stream block job (server/mirror.c, the drivers' detach_parent): a
clone's data copied up from its parents into its leaf while fio verify
runs, then the leaf drops its parents online, for VHD and qcow2 chains
three deep; checked by vhd-util check, qemu-img check and qemu-img compare
(which can read the leaf alone once it has no parent)."""
import os
import time

import nbd
import pytest

from conftest import BIN, ControlError, run
from test_mirror import MiB, fio_load, fio_ok, jobs, snapshot_of, wait_job

VHD_UTIL = os.path.join(BIN, "vhd-util")


def write_at(uri, off, length, byte):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(bytes([byte]) * length, off)
    h.flush()
    h.shutdown()


def chain(server, tmp_path, fmt, size):
    """base <- mid <- leaf, each with data of its own (some of it overwritten above)."""
    names = [str(tmp_path / ("%s.%s" % (n, fmt))) for n in ("base", "mid", "leaf")]
    if fmt == "vhd":
        run(VHD_UTIL, "create", "-n", names[0], "-s", size >> 20)
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", names[0], str(size))
    layers = [(0, 8 * MiB, 0x11), (6 * MiB, 4 * MiB, 0x22), (9 * MiB, 3 * MiB, 0x33)]
    for i, (off, length, byte) in enumerate(layers):
        if i:
            if fmt == "vhd":
                run(VHD_UTIL, "snapshot", "-n", names[i], "-p", names[i - 1])
            else:
                run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    names[i - 1], names[i])
        m = server.open("%s:%s" % (fmt, names[i]))["minor"]
        write_at(server.uri(m), off, length, byte)
        write_at(server.uri(m), 40 * MiB + i * MiB, 64 << 10, byte)
        server.call("close", minor=m)
    return names


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_stream_under_fio_verify_leaves_a_leaf_with_no_parent(server, tmp_path, fmt):
    size = 64 * MiB
    base, mid, leaf = chain(server, tmp_path, fmt, size)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    assert server.stats(m)["images"][2]["name"].endswith(base)
    fio = fio_load(server.uri(m), size, ios=24000, rate=4000)
    server.tapctl("stream", "-m", m, "--speed", 16 * MiB)
    assert jobs(server, m)[0]["type"] == "stream"
    assert fio.poll() is None
    job = wait_job(server, m, "done")
    assert job["bytes_done"] >= size and "error" not in job
    assert len(server.stats(m)["images"]) == 1      # the parents are let go of
    fio_ok(fio)
    after = snapshot_of(server, m, str(tmp_path / "after.raw"))
    server.call("close", minor=m)
    # the leaf alone, read by tools that never saw the chain, is the disk
    qfmt = "vpc" if fmt == "vhd" else "qcow2"
    run("qemu-img", "compare", "-q", "-f", qfmt, "-F", "raw", leaf, after)
    if fmt == "vhd":
        run(VHD_UTIL, "check", "-n", leaf)
        assert "has no parent" in run(VHD_UTIL, "query", "-n", leaf, "-p").stdout
    else:
        run("qemu-img", "check", "-q", leaf)
        info = run("qemu-img", "info", "--output=json", leaf).stdout
        assert "backing-filename" not in info
    # the parents are untouched and still check clean
    for p in (base, mid):
        if fmt == "vhd":
            run(VHD_UTIL, "check", "-n", p)
        else:
            run("qemu-img", "check", "-q", p)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_stream_down_to_a_base_points_the_leaf_at_it(server, tmp_path, fmt):
    """--base: what mid holds comes up into the leaf (zeros mid holds over
    base's data included), base keeps its own, and the leaf names base;
    every byte the same, mid deleted after."""
    size = 64 * MiB
    base, mid, leaf = chain(server, tmp_path, fmt, size)
    # mid zeroes part of base's data: after the stream the leaf must hide it
    m = server.open("%s:%s" % (fmt, mid))["minor"]
    h = nbd.NBD()
    h.connect_uri(server.uri(m))
    h.zero(2 * MiB, 1 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.shutdown()
    server.call("close", minor=m)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    before = snapshot_of(server, m, str(tmp_path / "before.raw"))
    server.tapctl("stream", "-m", m, "--base", base)
    job = wait_job(server, m, "done")
    assert "error" not in job
    names = [i["name"] for i in server.stats(m)["images"]]
    assert len(names) == 2 and names[1].endswith(base), names
    server.call("close", minor=m)
    os.unlink(mid)      # no longer referenced
    if fmt == "vhd":
        run(VHD_UTIL, "check", "-n", leaf)
        assert run(VHD_UTIL, "query", "-n", leaf, "-p").stdout.strip() == base
    else:
        run("qemu-img", "check", "-q", leaf)
        run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", leaf, before)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), before)


def test_stream_without_load_preserves_every_byte(server, tmp_path):
    size = 64 * MiB
    base, mid, leaf = chain(server, tmp_path, "vhd", size)
    m = server.open("vhd:" + leaf)["minor"]
    before = snapshot_of(server, m, str(tmp_path / "before.raw"))
    server.call("stream", minor=m)
    wait_job(server, m, "done")
    server.call("close", minor=m)
    run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "raw", leaf, before)
    # and reopened, the leaf alone serves it
    m = server.open("vhd:" + leaf)["minor"]
    assert len(server.stats(m)["images"]) == 1
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), before)


def test_stream_refusals_and_cancel(server, tmp_path):
    size = 64 * MiB
    raw = str(tmp_path / "r.img")
    with open(raw, "wb") as f:
        f.truncate(size)
    m = server.open("aio:" + raw)["minor"]

    def refused(code, text, minor, **args):
        with pytest.raises(ControlError) as e:
            server.call("stream", minor=minor, **args)
        assert e.value.code == code and text in e.value.message, e.value.message

    refused("EINVAL", "the leaf has no parent", m)
    server.call("close", minor=m)
    base, mid, leaf = chain(server, tmp_path, "vhd", size)
    m = server.open("vhd:" + leaf, readonly=True)["minor"]
    refused("EROFS", "read-only", m)
    server.call("close", minor=m)
    m = server.open("vhd:" + leaf)["minor"]
    before = snapshot_of(server, m, str(tmp_path / "before.raw"))
    server.call("stream", minor=m, speed=1 * MiB)
    refused("EBUSY", "already has a block job", m)
    r = server.tapctl("mirror", "-m", m, "--pivot", check=False)
    assert r.returncode != 0 and "the job is not a mirror" in r.stderr
    server.tapctl("job-cancel", "-m", m)
    assert jobs(server, m)[0]["state"] == "cancelled"
    # the chain is whole, and reads what it read
    assert len(server.stats(m)["images"]) == 3
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), before)
    # a close during a stream cancels it and closes
    server.call("stream", minor=m, speed=1 * MiB)
    server.call("close", minor=m)
    run(VHD_UTIL, "check", "-n", leaf)


def kill9_mid_job(make_server, tmp_path, cmd):
    """A job on a VHD chain three deep, tapdiskd killed mid-copy, the chain
    opened by a new server: the files check clean and read as before.
    Returns (server, minor, (base, mid, leaf), the disk as it was)."""
    size = 64 * MiB
    srv = make_server("a")
    names = chain(srv, tmp_path, "vhd", size)
    m = srv.open("vhd:" + names[2])["minor"]
    before = snapshot_of(srv, m, str(tmp_path / "before.raw"))
    srv.call(cmd, minor=m, speed=8 * MiB)
    wait_job(srv, m, "running")
    time.sleep(1.5)
    assert jobs(srv, m)[0]["state"] == "running"
    srv.kill()
    for p in names:
        run(VHD_UTIL, "check", "-n", p)
    srv2 = make_server("b")
    m = srv2.open("vhd:" + names[2])["minor"]
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", srv2.uri(m), before)
    return srv2, m, names, before


def test_kill9_mid_stream_then_the_chain_opens_and_reads_the_same(make_server, tmp_path):
    srv, m, (base, mid, leaf), before = kill9_mid_job(make_server, tmp_path, "stream")
    assert len(srv.stats(m)["images"]) == 3
    # a second stream finishes what the first began
    srv.call("stream", minor=m)
    wait_job(srv, m, "done")
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", srv.uri(m), before)
    srv.call("close", minor=m)
    run(VHD_UTIL, "check", "-n", leaf)
    assert "has no parent" in run(VHD_UTIL, "query", "-n", leaf, "-p").stdout
