"""Block jobs: the mirror (server/mirror.c, server/blockjob.c). A running
vbd copied to another image under a guest's load (fio verify over NBD, a
blkif guest), switched onto it with no request failing, or the copy
dropped; destinations that are files of every format, nbdkit's memory
plugin, qemu-storage-daemon and a second tapdiskd; a destination that dies;
the refusals."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import nbd
import pytest

from conftest import (BIN, SLOW, ControlError, make_image, qsd_export, run,
                      wait_for)

MiB = 1 << 20
VHD_UTIL = os.path.join(BIN, "vhd-util")


def jobs(srv, m):
    return srv.call("job-list", minor=m)["result"]["jobs"]


def wait_job(srv, m, *states, timeout=60):
    def state():
        j = jobs(srv, m)
        return j[0]["state"] if j else None
    wait_for(lambda: state() in states, timeout=timeout * SLOW,
             what="job in %s (now %s)" % (states, state()))
    return jobs(srv, m)[0]


def fill(uri, size, seed):
    """Writes seed-dependent data over the first size bytes (every other MiB: holes stay)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    for off in range(0, size, 2 * MiB):
        h.pwrite(bytes([(seed + off // MiB) % 251 + 1]) * MiB, off)
    h.flush()
    h.shutdown()


def fio_load(uri, size, ios=30000, rate=6000):
    """fio randwrite with crc32c verify (read back at the end), paced so it outlasts a pivot."""
    return subprocess.Popen(
        ["fio", "--name=v", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k",
         "--iodepth=16", "--size=%d" % size, "--number_ios=%d" % ios, "--rate_iops=%d" % rate,
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
         "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_ok(fio):
    out, err = fio.communicate(timeout=300 * SLOW)
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0
    return job


def snapshot_of(srv, m, path):
    """The disk as the guest sees it now, into a raw file."""
    run("nbdcopy", srv.uri(m), path)
    return path


def new_image(tmp_path, fmt, name, size):
    path = str(tmp_path / name)
    if fmt == "vhd":
        run(VHD_UTIL, "create", "-n", path, "-s", size >> 20)
    elif fmt == "qcow2":
        run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    else:
        make_image(path, size)
        fmt = "aio"
    return fmt + ":" + path


@pytest.mark.parametrize("dest_fmt", ["raw", "vhd", "qcow2"])
def test_mirror_and_pivot_under_fio_verify(server, tmp_path, dest_fmt):
    size = 64 * MiB
    src = new_image(tmp_path, "vhd", "src.vhd", size)
    m = server.open(src)["minor"]
    fill(server.uri(m), 32 * MiB, 3)
    dest = new_image(tmp_path, dest_fmt, "dest." + dest_fmt, size)
    fio = fio_load(server.uri(m), size)
    wait_for(lambda: server.stats(m)["ops"]["write"]["reqs"] > 2000, what="fio under way")
    server.tapctl("mirror", "-m", m, "-d", dest, "--speed", 64 * MiB)
    job = wait_job(server, m, "ready")
    assert job["type"] == "mirror" and job["sync"] == "full" and job["dirty_bytes"] == 0
    assert job["bytes_done"] >= size and job["dest"] == dest
    assert fio.poll() is None, "fio ended before the pivot: the test proves less"
    server.tapctl("mirror", "-m", m, "--pivot")
    assert fio.poll() is None
    job = jobs(server, m)[0]
    assert job["state"] == "done"
    assert server.call("list", minor=m)["result"]["vbds"][0]["path"] == dest.split(":", 1)[1]
    fio_ok(fio)      # every block written before and after the switch reads back
    st = server.stats(m)
    assert st["ops"]["write"]["errors"] == 0 and st["ops"]["read"]["errors"] == 0
    assert st["job"]["state"] == "done"
    want = snapshot_of(server, m, str(tmp_path / "want.raw"))
    server.call("destroy", minor=m)
    qfmt = {"raw": "raw", "vhd": "vpc", "qcow2": "qcow2"}[dest_fmt]
    run("qemu-img", "compare", "-q", "-f", qfmt, "-F", "raw", dest.split(":", 1)[1], want)
    if dest_fmt == "vhd":
        run(VHD_UTIL, "check", "-n", dest.split(":", 1)[1])
    elif dest_fmt == "qcow2":
        run("qemu-img", "check", "-q", dest.split(":", 1)[1])


def test_sync_top_copies_only_the_leaf_onto_a_new_leaf_of_the_same_parent(server, tmp_path):
    size = 64 * MiB
    base = str(tmp_path / "base.vhd")
    run(VHD_UTIL, "create", "-n", base, "-s", size >> 20)
    m = server.open("vhd:" + base)["minor"]
    fill(server.uri(m), 16 * MiB, 5)          # the parent's data
    server.call("close", minor=m)
    leaf, dest = str(tmp_path / "leaf.vhd"), str(tmp_path / "dest.vhd")
    for child in (leaf, dest):
        run(VHD_UTIL, "snapshot", "-n", child, "-p", base)
    m = server.open("vhd:" + leaf)["minor"]
    h = nbd.NBD()
    h.connect_uri(server.uri(m))
    h.pwrite(b"\x77" * (2 * MiB), 40 * MiB)   # the leaf's own data
    h.pwrite(b"\x66" * (1 * MiB), 2 * MiB)    # over the parent's
    h.shutdown()
    want = snapshot_of(server, m, str(tmp_path / "want.raw"))
    server.tapctl("mirror", "-m", m, "-d", "vhd:" + dest, "--sync", "top")
    assert wait_job(server, m, "ready")["sync"] == "top"
    server.tapctl("mirror", "-m", m, "--pivot")
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), want)
    server.call("destroy", minor=m)
    run(VHD_UTIL, "check", "-n", dest)
    # qemu's vpc driver does not follow a VHD's parent: read the chain here
    m = server.open("vhd:" + dest, readonly=True)["minor"]
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), want)
    # only the leaf's 3 MiB were copied: the parent's 16 MiB stayed in the parent
    assert os.path.getsize(dest) < 6 * MiB, os.path.getsize(dest)


def test_mirror_onto_nbdkit_memory(server, kits, tmp_path):
    size = 32 * MiB
    src = make_image(tmp_path / "src.img", size)
    m = server.open("aio:" + src)["minor"]
    fill(server.uri(m), size, 9)
    kit = kits("memory", "size=%d" % size)
    fio = fio_load(server.uri(m), size, ios=15000)
    server.tapctl("mirror", "-m", m, "-d", "nbd:" + kit.uri)
    wait_job(server, m, "ready")
    server.tapctl("mirror", "-m", m, "--pivot")
    fio_ok(fio)
    assert server.call("list", minor=m)["result"]["vbds"][0]["type"] == "nbd"
    want = snapshot_of(server, m, str(tmp_path / "want.raw"))
    server.call("destroy", minor=m)
    # what nbdkit holds, read by qemu-img, is the disk
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", kit.uri, want)


def test_mirror_onto_qemu_storage_daemon(server, tmp_path):
    size = 32 * MiB
    src = str(tmp_path / "src.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", src, str(size))
    m = server.open("qcow2:" + src)["minor"]
    fill(server.uri(m), size, 11)
    img, sock = make_image(tmp_path / "q.img", size), str(tmp_path / "qsd.sock")
    with qsd_export(img, sock) as uri:
        fio = fio_load(server.uri(m), size, ios=15000)
        server.tapctl("mirror", "-m", m, "-d", "nbd:" + uri)
        wait_job(server, m, "ready")
        server.tapctl("mirror", "-m", m, "--pivot")
        fio_ok(fio)
        want = snapshot_of(server, m, str(tmp_path / "want.raw"))
        server.call("destroy", minor=m)
    run("cmp", img, want)


def test_storage_migration_between_two_servers(make_server, tmp_path):
    """The destination tapdiskd serves an empty VHD; the source mirrors a
    vbd there under fio verify, pivots, keeps serving; the source vbd goes
    and the destination's image is what the guest wrote."""
    size = 64 * MiB
    a, b = make_server("a"), make_server("b")
    dst = str(tmp_path / "moved.vhd")
    run(VHD_UTIL, "create", "-n", dst, "-s", size >> 20)
    d = b.open("vhd:" + dst)["minor"]
    src = new_image(tmp_path, "vhd", "here.vhd", size)
    m = a.open(src)["minor"]
    fill(a.uri(m), 24 * MiB, 13)
    fio = fio_load(a.uri(m), size)
    a.tapctl("mirror", "-m", m, "-d", "nbd:" + b.uri(d))
    wait_job(a, m, "ready")
    a.tapctl("mirror", "-m", m, "--pivot")
    fio_ok(fio)
    want = snapshot_of(a, m, str(tmp_path / "want.raw"))
    a.call("destroy", minor=m)
    b.call("close", minor=d)
    run(VHD_UTIL, "check", "-n", dst)
    run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "raw", dst, want)


def test_blkif_guest_through_a_mirror_and_a_pivot(tmp_path):
    from xen_harness import Xen
    xen = Xen(tmp_path)
    try:
        size = 64 * MiB
        m = xen.srv.open("aio:" + make_image(tmp_path / "g.img", size))["minor"]
        be = xen.attach(m)
        dest = make_image(tmp_path / "gd.img", size)
        guest = xen.sim_bg(be, "--verify", 4, "--region-mb", 32)
        time.sleep(0.5)
        xen.srv.tapctl("mirror", "-m", m, "-d", "aio:" + dest)
        wait_job(xen.srv, m, "ready")
        xen.srv.tapctl("mirror", "-m", m, "--pivot")
        assert guest.poll() is None, "the guest finished before the pivot"
        out, err = guest.communicate(timeout=120 * SLOW)
        assert guest.returncode == 0, err
        r = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["writes"] > 100
        want = snapshot_of(xen.srv, m, str(tmp_path / "want.raw"))
        run("cmp", dest, want)
    finally:
        xen.close()


def test_speed_limit_and_rate(server, tmp_path):
    size = 32 * MiB
    src = make_image(tmp_path / "s.img", size)
    m = server.open("aio:" + src)["minor"]
    fill(server.uri(m), size, 1)
    dest = make_image(tmp_path / "d.img", size)
    t0 = time.monotonic()
    server.tapctl("mirror", "-m", m, "-d", "aio:" + dest, "--speed", 12 * MiB)
    time.sleep(1.2)
    j = jobs(server, m)[0]
    assert j["state"] == "running" and j["speed"] == 12 * MiB
    assert 0 < j["rate"] <= 18 * MiB, j
    out = server.tapctl("jobs", "-m", m).stdout
    assert out.startswith("minor=%d type=mirror state=running" % m) and "rate=" in out
    top = server.tapctl("top", "-n", 1).stdout.splitlines()
    assert top[0].split()[8] == "JOB" and top[1].split()[8].startswith("mirror:"), top
    assert top[1].split()[8].endswith("%"), top
    wait_job(server, m, "ready")
    # 32 MiB at 12 MiB/s (a 0.1 s burst): not before 2.4 s
    assert time.monotonic() - t0 >= 2.4
    server.tapctl("job-cancel", "-m", m)
    assert jobs(server, m)[0]["state"] == "cancelled"


def test_cancel_while_running_and_when_ready_leaves_the_vbd_as_it_was(server, tmp_path):
    size = 32 * MiB
    src = make_image(tmp_path / "s.img", size)
    m = server.open("aio:" + src)["minor"]
    fill(server.uri(m), size, 2)
    dest = make_image(tmp_path / "d.img", size)
    fio = fio_load(server.uri(m), size, ios=12000)
    for speed, state in ((4 * MiB, "running"), (0, "ready")):
        server.tapctl("mirror", "-m", m, "-d", "aio:" + dest, "--speed", speed)
        wait_job(server, m, state)
        server.tapctl("mirror", "-m", m, "--cancel")
        j = jobs(server, m)[0]
        assert j["state"] == "cancelled" and "error" not in j
        assert server.call("list", minor=m)["result"]["vbds"][0]["path"] == src
    fio_ok(fio)
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), src)
    r = server.tapctl("job-cancel", "-m", m, check=False)
    assert r.returncode != 0 and "already ended" in r.stderr


def test_a_dying_destination_fails_the_job_never_the_guest(server, kits, tmp_path):
    size = 32 * MiB
    src = make_image(tmp_path / "s.img", size)
    m = server.open("aio:" + src, timeout=5)["minor"]
    fill(server.uri(m), size, 4)
    kit = kits("memory", "size=%d" % size)
    fio = fio_load(server.uri(m), size, ios=15000)
    server.tapctl("mirror", "-m", m, "-d", "nbd:" + kit.uri, "--speed", 4 * MiB)
    wait_job(server, m, "running")
    time.sleep(0.5)
    kit.stop(signal.SIGKILL)
    j = wait_job(server, m, "failed")
    assert "destination" in j["error"], j
    fio_ok(fio)                               # no write failed, every block reads back
    assert server.stats(m)["ops"]["write"]["errors"] == 0
    r = server.tapctl("mirror", "-m", m, "--pivot", check=False)
    assert r.returncode != 0 and "no mirror is running" in r.stderr
    assert "job failed" in server.log()


def test_refusals(server, tmp_path):
    size = 16 * MiB
    src = make_image(tmp_path / "s.img", size)
    m = server.open("aio:" + src)["minor"]
    fill(server.uri(m), size, 6)

    def refused(cmd, code, text, **args):
        with pytest.raises(ControlError) as e:
            server.call(cmd, minor=m, **args)
        assert e.value.code == code and text in e.value.message, e.value.message

    refused("job-pivot", "EINVAL", "no mirror is running")
    refused("job-cancel", "EINVAL", "no job is running")
    small = make_image(tmp_path / "small.img", size // 2)
    refused("mirror", "EINVAL", "must have the disk's size", dest="aio:" + small)
    refused("mirror", "ENOENT", "nothing.img", dest="aio:" + str(tmp_path / "nothing.img"))
    refused("mirror", "EBUSY", "", dest="aio:" + src)     # itself: one writer per image
    refused("mirror", "EINVAL", "sync is full or top", dest="aio:" + small, sync="middle")
    dest = make_image(tmp_path / "d.img", size)
    server.call("mirror", minor=m, dest="aio:" + dest, speed=1 * MiB)
    refused("mirror", "EBUSY", "already has a block job", dest="aio:" + dest)
    refused("job-pivot", "EAGAIN", "not ready yet")
    refused("pause", "EBUSY", "has a mirror job running: cancel it")
    r = server.tapctl("snapshot", "-m", m, "-n", str(tmp_path / "snap.vhd"), check=False)
    assert r.returncode != 0 and "mirror job" in r.stderr
    # a close cancels the job, drops the destination, and closes
    server.call("close", minor=m)
    assert server.call("job-list")["result"]["jobs"] == []
    m2 = server.open("aio:" + dest)["minor"]        # the destination was let go
    server.call("close", minor=m2)
    r = server.tapctl("mirror", "-m", m, check=False)
    assert r.returncode == 2 and "usage" in r.stderr


def test_overlapping_writes_reach_both_sides_in_one_order(make_server, tmp_path):
    """Three writes to one block in flight at once, the first failing once
    on the source with EAGAIN (vbd.c sends it again, to the source alone):
    the others must wait for it, or the second lands on the source before
    the first's retry and on the destination after the first: the sides
    differ. The waiting ones then go in the order they came, so the last
    sent is what both sides hold. Both files on tmpfs, whose writes run in
    order, as they are sent."""
    shm = tempfile.mkdtemp(prefix="tdmirror", dir="/dev/shm")
    try:
        srv = make_server(extra=["--fault-injection"])
        src, dst = os.path.join(shm, "src.img"), os.path.join(shm, "dst.img")
        make_image(src, 8 * MiB)
        make_image(dst, 8 * MiB)
        m = srv.open("aio:" + src)["minor"]
        srv.tapctl("mirror", "-m", m, "-d", "aio:" + dst)
        wait_job(srv, m, "ready")
        srv.call("fault-inject", nth=1, count=1, kinds="write", path="src.img",
                 error="EAGAIN")
        h = nbd.NBD()
        h.connect_uri(srv.uri(m))
        first = h.aio_pwrite(b"A" * 4096, 0)
        second = h.aio_pwrite(b"B" * 4096, 0)      # sent with it, not after it
        third = h.aio_pwrite(b"C" * 4096, 0)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in (first, second, third))
        assert srv.call("fault-inject")["result"]["injected"] == 1
        assert srv.stats(m)["retries"] == 1
        with open(src, "rb") as f:
            on_src = f.read(4096)
        with open(dst, "rb") as f:
            on_dst = f.read(4096)
        assert on_src == on_dst == b"C" * 4096, (on_src[:1], on_dst[:1])
        h.shutdown()
        srv.tapctl("job-cancel", "-m", m)
        srv.call("close", minor=m)
    finally:
        shutil.rmtree(shm)
