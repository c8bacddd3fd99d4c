"""The rbd: driver (drivers/rbd.c) against a real Ceph cluster: one monitor
and one memstore OSD started for the session by the project's own
tests/ceph/start-ceph (a directory under the pytest basetemp and a port of
its own), stopped by a finalizer and at exit whatever happens. Clients
nobody here wrote check what tapdiskd serves: the rbd CLI (create, export,
du, diff, snap), qemu-img/qemu-io through qemu's own rbd driver, fio, and
the simulated blkif guest. The test that stops the cluster under I/O runs
last in this file."""
import atexit
import json
import os
import subprocess
import time

import nbd
import pytest

from conftest import BIN, ROOT, SLOW, run
from imagetests import fio_verify_load
from xen_harness import Xen

MiB = 1 << 20
# librbd does the I/O, not the engine: the second engine's pass skips these;
# `ceph`: a pass may leave them out (scripts/check)
pytestmark = [pytest.mark.engine_independent, pytest.mark.ceph]

CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "uuidgen")


class Ceph:
    def __init__(self, base):
        self.dir = str(base / "ceph")
        self.env = dict(os.environ, CEPH_DIR=self.dir)
        self.conf = None
        self.running = False

    def start(self):
        r = subprocess.run([os.path.join(ROOT, "tests/ceph/start-ceph")], env=self.env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, "start-ceph failed:\n" + r.stderr
        self.conf = r.stdout.strip()
        self.running = True

    def stop(self):
        if self.running or os.path.isdir(self.dir):
            subprocess.run([os.path.join(ROOT, "tests/ceph/stop-ceph")], env=self.env,
                           capture_output=True, timeout=60)
        self.running = False

    def rbd(self, *args, check=True, timeout=60):
        return run("rbd", "-c", self.conf, *args, check=check, timeout=timeout)

    def params(self, image):
        """Our params for image; qemu's rbd: filenames are spelt the same."""
        return "rbd:rbd/%s:conf=%s" % (image, self.conf)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    missing = [t for t in CEPH_TOOLS if not any(
        os.access(os.path.join(d, t), os.X_OK) for d in os.environ["PATH"].split(":") + ["/usr/sbin", "/sbin"])]
    if missing:
        pytest.skip("Ceph is not installed (%s missing): scripts/install-deps check "
                    "installs ceph-mon ceph-osd ceph-common" % ", ".join(missing))
    c = Ceph(tmp_path_factory.getbasetemp())
    atexit.register(c.stop)            # a killed pytest still runs this; a finalizer may not
    try:
        c.start()
        yield c
    finally:
        c.stop()


_names = iter(range(1000))


def new_image(ceph, size="64M"):
    name = "t%d" % next(_names)
    ceph.rbd("create", "--size", size, "rbd/" + name)
    return name


def qemu_io(uri, *cmds, fmt="raw", check=True, ro=False):
    args = ["qemu-io", "-f", fmt] + (["-r"] if ro else [])
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri, check=check)


def pattern_file(path, size, seed):
    """size bytes, each MiB its own byte, some MiBs left as zeros (holes)."""
    with open(path, "wb") as f:
        for i in range(size // MiB):
            b = 0 if i % 3 == 2 else (seed + i) % 255 + 1
            f.write(bytes([b]) * MiB)
    return str(path)


# ---- reading and writing: our bytes are Ceph's bytes ----

def test_images_from_rbd_create_and_qemu_img_read_identically(ceph, server, tmp_path):
    src = pattern_file(tmp_path / "src", 24 * MiB, 7)
    a = new_image(ceph, "24M")            # rbd create, written through qemu's driver
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, ceph.params(a))
    b = "qc%d" % next(_names)             # made by qemu-img convert itself
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", src, ceph.params(b))
    for image in (a, b):
        o = server.open(ceph.params(image))
        assert o["size"] == 24 * MiB
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri(o["minor"]))
        server.call("close", minor=o["minor"])


def test_our_writes_read_back_through_rbd_export_and_qemu(ceph, server, tmp_path):
    name = new_image(ceph, "16M")
    m = server.open(ceph.params(name))["minor"]
    want = pattern_file(tmp_path / "want", 16 * MiB, 40)
    run("qemu-img", "dd", "-f", "raw", "-O", "raw", "if=" + want, "of=" + server.uri(m), "bs=1M")
    st = server.stats(m)
    assert st["images"][0]["driver"] == "rbd" and st["images"][0]["status"] == "connected"
    server.call("close", minor=m)
    got = str(tmp_path / "got")
    ceph.rbd("export", "rbd/" + name, got)
    with open(want, "rb") as f, open(got, "rb") as g:
        assert f.read() == g.read()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", want, ceph.params(name))


def test_fio_verify_over_nbd(ceph, server):
    name = new_image(ceph, "64M")
    m = server.open(ceph.params(name))["minor"]
    for rw, bs, depth in (("randwrite", "4k", 32), ("write", "1M", 8)):
        run("fio", "--output-format=terse", "--name=v", "--ioengine=nbd", "--uri=" + server.uri(m),
            "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % depth, "--size=32M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
            timeout=120)
    assert server.stats(m)["ops"]["write"]["errors"] == 0


def test_blkif_guest_writes_land_in_the_image(ceph, tmp_path):
    xen = Xen(tmp_path)
    try:
        name = new_image(ceph, "32M")
        m = xen.srv.open(ceph.params(name))["minor"]
        be = xen.attach(m)
        dump = str(tmp_path / "expected")
        r = xen.sim(be, "--verify", 2, "--indirect", "--discard", "--region-mb", 16, "--dump", dump)
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["writes"] > 100
        assert r["discards"] > 0 and r["flushes"] > 0
        xen.srv.call("close", minor=m)
    finally:
        xen.close()
    got = str(tmp_path / "got")
    ceph.rbd("export", "rbd/" + name, got)
    with open(dump, "rb") as f, open(got, "rb") as g:
        want = f.read()
        assert g.read(len(want)) == want


# ---- discard, write-zeroes, block status ----

def du_used(ceph, name):
    out = json.loads(ceph.rbd("du", "--format", "json", "rbd/" + name).stdout)
    return [i for i in out["images"] if i["name"] == name and not i.get("snapshot")][0]["used_size"]


def test_discard_and_write_zeroes_give_space_back(ceph, server):
    name = new_image(ceph, "32M")
    m = server.open(ceph.params(name))["minor"]
    uri = server.uri(m)
    qemu_io(uri, "write -P 0x11 0 32M")
    assert du_used(ceph, name) == 32 * MiB
    qemu_io(uri, "discard 0 8M")                       # two whole objects go
    assert du_used(ceph, name) == 24 * MiB
    qemu_io(uri, "write -z -u 8M 9M")                  # may unmap: two objects, the 1M tail zeroed
    assert du_used(ceph, name) == 16 * MiB
    qemu_io(uri, "write -z 20M 4M")                    # no unmap asked: stays allocated
    assert du_used(ceph, name) == 16 * MiB
    qemu_io(uri, "read -P 0 8M 9M", "read -P 0x11 17M 3M", "read -P 0 20M 4M", "read -P 0x11 24M 8M")
    assert server.stats(m)["ops"]["write_zeroes"]["errors"] == 0


def test_block_status_matches_rbd_diff(ceph, server):
    name = new_image(ceph, "64M")
    m = server.open(ceph.params(name))["minor"]
    uri = server.uri(m)
    qemu_io(uri, "write -P 1 0 4k", "write -P 2 9M 2M", "write -P 3 40M 512", "write -P 4 63M 1M")
    diff = json.loads(ceph.rbd("diff", "--whole-object", "--format", "json", "rbd/" + name).stdout)
    want = [(e["offset"], e["length"]) for e in diff if e["exists"] == "true" or e["exists"] is True]
    out = run("nbdinfo", "--map", "--json", uri).stdout
    got = []
    for e in json.loads(out):
        if e["type"] & 1:              # a hole
            continue
        if got and got[-1][0] + got[-1][1] == e["offset"]:
            got[-1] = (got[-1][0], got[-1][1] + e["length"])
        else:
            got.append((e["offset"], e["length"]))
    merged = []
    for off, ln in want:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + ln)
        else:
            merged.append((off, ln))
    assert got == merged == [(0, 4 * MiB), (8 * MiB, 4 * MiB), (40 * MiB, 4 * MiB), (60 * MiB, 4 * MiB)]
    # one extent per reply (REQ_ONE): each ends where the allocation changes
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    for off, want_len, hole in ((0, 4 * MiB, False), (4 * MiB, 4 * MiB, True),
                                (12 * MiB, 28 * MiB, True), (60 * MiB, 4 * MiB, False)):
        seen = []
        h.block_status(64 * MiB - off, off, lambda ctx, o, e, err: seen.extend(e),
                       nbd.CMD_FLAG_REQ_ONE)
        assert seen[0] == want_len and bool(seen[1] & nbd.STATE_HOLE) == hole, (off, seen)
    h.shutdown()


# ---- snapshots ----

def test_snapshot_under_load_then_opened_read_only(ceph, server, tmp_path):
    name = new_image(ceph, "64M")
    m = server.open(ceph.params(name))["minor"]
    fio = fio_verify_load(server.uri(m))
    time.sleep(1)
    out = server.tapctl("snapshot", "-m", m, "-n", "s1").stdout.strip()
    assert out == "rbd:rbd/%s@s1:conf=%s" % (name, ceph.conf)
    time.sleep(0.5)
    out2 = server.tapctl("snapshot", "-m", m, "-n", "s1", check=False)
    assert out2.returncode != 0 and "there is one of that name" in out2.stderr
    assert len(out2.stderr.strip().splitlines()) == 1
    fout, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0, fout                   # no I/O failed, verify passed
    st = server.stats(m)
    assert st["ops"]["write"]["errors"] == 0 and st["images"][0]["status"] == "connected"
    assert server.call("list")["result"]["vbds"][0]["params"] == ceph.params(name)
    snaps = json.loads(ceph.rbd("snap", "ls", "--format", "json", "rbd/" + name).stdout)
    assert [s["name"] for s in snaps] == ["s1"]

    # the snapshot, read-only, is what rbd exports of it (fio has written on since)
    frozen = str(tmp_path / "frozen")
    ceph.rbd("export", "rbd/%s@s1" % name, frozen)
    snap_params = "rbd:rbd/%s@s1:conf=%s" % (name, ceph.conf)
    r = server.call("open", check=False, params=snap_params)
    assert r["error"]["code"] == "EROFS" and "open it with -R" in r["error"]["message"]
    s = server.open(snap_params, readonly=True)["minor"]
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", frozen, server.uri(s))
    info = json.loads(run("nbdinfo", "--json", server.uri(s)).stdout)
    assert info["exports"][0]["is_read_only"] is True
    server.call("close", minor=s)
    server.call("close", minor=m)


# ---- one writer ----

def test_exclusive_lock_refuses_a_second_writer(ceph, make_server):
    name = new_image(ceph, "16M")
    a = make_server("a")
    # b finds the cluster through CEPH_CONF, with no conf= in its params
    b = make_server("b", env=dict(os.environ, CEPH_CONF=ceph.conf))
    ma = a.open(ceph.params(name))["minor"]
    qemu_io(a.uri(ma), "write -P 0x42 0 1M")
    r = b.call("open", check=False, params="rbd:rbd/" + name)
    assert r["error"]["code"] == "EBUSY", r
    msg = r["error"]["message"]
    assert "holds its exclusive lock" in msg and "\n" not in msg
    owners = msg.split("(")[1].split(" holds")[0]
    assert owners and owners != "an unknown owner"
    mb = b.open("rbd:rbd/" + name, readonly=True)["minor"]   # readers are welcome
    qemu_io(b.uri(mb), "read -P 0x42 0 1M", ro=True)
    b.call("close", minor=mb)
    a.call("close", minor=ma)                          # the lock goes with the writer
    mb = b.open("rbd:rbd/" + name)["minor"]
    qemu_io(b.uri(mb), "write -P 0x43 0 1M")
    b.call("close", minor=mb)


# ---- refusals: one line each, quickly ----

def test_bad_params_fail_in_one_line_quickly(ceph, server, tmp_path):
    bad_conf = tmp_path / "nomon.conf"
    bad_conf.write_text("[global]\nmon host = 127.0.0.1:1\n")
    cases = [
        ("rbd:nopool/x:conf=" + ceph.conf, "no such pool", {}),
        ("rbd:rbd/nosuchimage:conf=" + ceph.conf, "no such image", {}),
        ("rbd:rbd/%s@nosnap:conf=%s" % (new_image(ceph, "4M"), ceph.conf), "no such image or snapshot",
         {"readonly": True}),
        ("rbd:rbd/x:conf=%s" % bad_conf, "cannot reach the cluster's monitors", {"timeout": 2}),
        ("rbd:rbd/x:conf=/nonexistent.conf", "cannot read the Ceph configuration", {}),
        ("rbd:rbd/x:conf=ceph.conf", "conf= takes an absolute path", {}),
        ("rbd:rbd", "is not POOL/IMAGE", {}),
        ("rbd:rbd/x:colour=red", "unknown option 'colour'", {}),
        ("rbd:rbd/a/b/c", "holds a character", {}),
    ]
    for params, words, kw in cases:
        t0 = time.time()
        r = server.call("open", check=False, params=params, **kw)
        took = time.time() - t0
        assert "error" in r, params
        msg = r["error"]["message"]
        assert words in msg and "\n" not in msg, (params, msg)
        assert took < 5 * SLOW, (params, took)
    assert server.call("list")["result"]["vbds"] == []
    # tap-ctl's line
    r = server.tapctl("create", "-a", "rbd:nopool/x:conf=" + ceph.conf, check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


# ---- last: the cluster goes away under I/O ----

def test_zz_cluster_stopped_mid_io_fails_requests_and_the_vbd_closes(ceph, server):
    name = new_image(ceph, "16M")
    m = server.open(ceph.params(name), timeout=3)["minor"]
    # a writer that sees no failure, at the default timeout (120 s): its close is bounded too
    idle = server.open(ceph.params(new_image(ceph, "4M")))["minor"]
    uri = server.uri(m)
    qemu_io(uri, "write -P 5 0 4M")
    load = subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", "--uri=" + uri,
                             "--rw=randrw", "--bs=64k", "--iodepth=8", "--size=16M",
                             "--time_based", "--runtime=30"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    ceph.stop()
    t0 = time.time()
    out, _ = load.communicate(timeout=60 * SLOW)
    failed_after = time.time() - t0
    assert load.returncode != 0, out                   # its I/O failed, it did not hang
    assert failed_after < 20 * SLOW, failed_after
    r = qemu_io(uri, "read 0 64k", check=False)
    assert "Input/output error" in r.stdout + r.stderr
    server.call("version")                             # the server lives
    st = server.stats(m)
    assert "not answering" in st["images"][0]["status"], st["images"][0]
    # the watchdog or librados (both at the timeout), whichever came first
    assert st["ops"]["read"]["errors"] > 0
    t0 = time.time()
    closing_idle = subprocess.Popen([os.path.join(BIN, "tap-ctl"), "-S", server.state_dir,
                                     "close", "-m", str(idle)])
    # Bounded by the vbds' timeouts, not librados' own (120 s per op): the
    # bounds are loose, as a loaded machine (make check runs two test files
    # at once) took 18 s for what takes 3 to 5 alone.
    server.call("close", minor=m)          # rbd_close's ops time out after 1 s each
    assert time.time() - t0 < 40 * SLOW
    assert closing_idle.wait(timeout=120 * SLOW) == 0   # 5 s each: at most 15 s, not 6 minutes
    assert time.time() - t0 < 90 * SLOW
    for vbd in server.call("list")["result"]["vbds"]:
        assert vbd["state"] == 0x2 and vbd["params"] is None
    assert "cluster does not answer" in server.log()
