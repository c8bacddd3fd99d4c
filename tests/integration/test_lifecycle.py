"""vbd lifecycle under load: pause/unpause with clients connected, close
with requests in flight (a frozen device), open errors that leave nothing
behind, the state-dir lock, daemon mode, SIGTERM and kill -9."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import nbd
import pytest

from conftest import (BIN, ControlError, Server, fd_count, make_image, run,
                      wait_for)


def bg(fn, *args):
    """Runs fn in a thread; returns a dict that gets 'result' or 'error'."""
    out = {}

    def wrap():
        try:
            out["result"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e
    t = threading.Thread(target=wrap, daemon=True)
    t.start()
    out["thread"] = t
    return out


def connect(server, minor):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri(minor))
    return h


# ---- pause / unpause ----

def test_pause_queues_io_and_unpause_resumes(server, tmp_path):
    img = make_image(tmp_path / "p.img", 16 << 20)
    server.open("aio:" + img)
    h = connect(server, 0)
    h.pwrite(b"1" * 4096, 0)
    server.tapctl("pause", "-m", 0)
    assert server.call("list")["result"]["vbds"][0]["state"] == 0x20
    w = bg(h.pwrite, b"2" * 4096, 4096)
    wait_for(lambda: server.stats(0)["reqs_queued"] == 1, what="a queued write")
    time.sleep(0.2)
    assert "result" not in w, "a write completed while paused"
    # the image is closed while paused: another tool may use the file now
    with open(img, "rb") as f:
        assert f.read(4096) == b"1" * 4096
    server.tapctl("unpause", "-m", 0)
    w["thread"].join(10)
    assert "error" not in w and not w["thread"].is_alive()
    assert h.pread(8192, 0) == b"1" * 4096 + b"2" * 4096
    assert server.stats(0)["reqs_queued"] == 0
    h.shutdown()


def test_pause_is_idempotent_and_unpause_needs_pause(server):
    server.open("ram:4M")
    server.call("pause", minor=0)
    server.call("pause", minor=0)
    with pytest.raises(ControlError) as e:
        server.call("open", params="ram:1M", minor=0)
    assert e.value.code == "EBUSY"
    server.call("unpause", minor=0)
    with pytest.raises(ControlError) as e:
        server.call("unpause", minor=0)
    assert e.value.code == "EINVAL"


def test_ram_contents_survive_pause(server):
    server.open("ram:4M")
    h = connect(server, 0)
    h.pwrite(b"keep" * 1024, 65536)
    server.call("pause", minor=0)
    server.call("unpause", minor=0)
    assert h.pread(4096, 65536) == b"keep" * 1024
    h.shutdown()


def test_unpause_with_new_image_toolstack_flow(server, tmp_path):
    a = make_image(tmp_path / "a.img", 8 << 20, pattern=0xaa)
    b = make_image(tmp_path / "b.img", 8 << 20)
    server.open("aio:" + a)
    h = connect(server, 0)
    assert h.pread(16, 0) == b"\xaa" * 16
    server.tapctl("pause", "-m", 0)
    shutil.copyfile(a, b)                       # what a coalesce/snapshot tool would do
    with open(b, "r+b") as f:
        f.write(b"\xbb" * 16)
    server.tapctl("unpause", "-m", 0, "-a", "aio:" + b)
    assert h.pread(32, 0) == b"\xbb" * 16 + b"\xaa" * 16   # same connection, new image
    assert server.call("list")["result"]["vbds"][0]["path"] == b
    h.shutdown()


def test_unpause_failure_stays_paused(server, tmp_path):
    a = make_image(tmp_path / "a.img", 8 << 20, pattern=0x01)
    server.open("aio:" + a)
    h = connect(server, 0)
    server.call("pause", minor=0)
    w = bg(h.pread, 16, 0)
    r = server.tapctl("unpause", "-m", 0, "-a", "aio:" + str(tmp_path / "gone.img"), check=False)
    assert r.returncode == 1 and "No such file" in r.stderr
    assert server.call("list")["result"]["vbds"][0]["state"] & 0x20
    assert "result" not in w
    server.call("unpause", minor=0)             # the old image again
    w["thread"].join(10)
    assert w.get("result") == b"\x01" * 16
    h.shutdown()


# ---- close with requests in flight ----

def test_close_waits_for_inflight_io(stuck_disk, server):
    server.open("aio:" + stuck_disk.path)
    h = connect(server, 0)
    h.pwrite(b"x" * 4096, 0)
    stuck_disk.freeze()
    w = bg(h.pwrite, b"y" * 4096, 8192)
    wait_for(lambda: server.stats(0)["reqs_outstanding"] == 1, what="an in-flight write")
    c = bg(server.tapctl, "close", "-m", 0)
    time.sleep(0.5)
    assert "result" not in c, "close returned with I/O still in flight"
    assert "result" not in w
    stuck_disk.thaw()
    c["thread"].join(20)
    w["thread"].join(20)
    assert "error" not in w, w.get("error")     # the write was answered before close
    assert c["result"].returncode == 0
    vbd = server.call("list")["result"]["vbds"][0]
    assert vbd["state"] == 0x2 and vbd["params"] is None
    with open(stuck_disk.path, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"y" * 4096


@pytest.mark.parametrize("how", ["pause", "close"])
def test_stats_and_list_while_the_chain_closes(stuck_disk, make_server, tmp_path, how):
    """Found by the soak (ASan: heap-use-after-free in image_stats_since_reset,
    a stats gather on the loop while a worker freed the chain): a drained
    pause or close hands the chain to a worker to close and free, and the
    vbd must let go of it then, not when the worker is done. Here the
    loop's two workers are held by two opens reading a frozen device, so
    the close waits in their queue: meanwhile stats and list must show no
    images (they used to walk the chain the worker was about to free)."""
    server = make_server(loops="1")
    img = make_image(tmp_path / "d.img", 16 << 20)
    m = server.open("aio:" + img)["minor"]
    h = connect(server, m)
    h.pwrite(b"x" * 4096, 0)
    stuck_disk.freeze()
    opens = [bg(lambda: server.tapctl("create", "-R", "-a", "vhd:" + stuck_disk.path,
                                      check=False)) for _ in range(2)]

    def listed():
        return {v["minor"]: v for v in server.call("list")["result"]["vbds"]}
    wait_for(lambda: len(listed()) == 3, what="two opens stuck on the frozen device")
    time.sleep(0.3)     # both workers in their reads
    p = bg(server.tapctl, how, "-m", m)
    # stats -m refuses a vbd that is opening or closing its chain; the
    # gathers (stats of every vbd, list, /metrics) do not
    try:
        wait_for(lambda: listed()[m]["state"] & 0x1000, what="the chain's close to be queued")
        st = [v for v in server.call("stats")["result"]["vbds"] if v["minor"] == m][0]
        assert st["images"] == [], "stats walks a chain handed to a worker: %s" % st["images"]
        assert listed()[m]["chain_depth"] == 0
        server.call("stats", reset=True)
        assert "result" not in p, "%s returned before the chain was closed" % how
    finally:
        stuck_disk.thaw()
    for o in opens:
        o["thread"].join(30)
        assert o["result"].returncode != 0      # zeros: not a VHD
    p["thread"].join(30)
    assert p["result"].returncode == 0, p["result"].stderr
    if how == "pause":
        server.tapctl("unpause", "-m", m)
        assert h.pread(4096, 0) == b"x" * 4096
        assert len(server.stats(m)["images"]) == 1
    h.shutdown()


def test_force_close_cuts_clients_and_frees_minor(stuck_disk, server, tmp_path):
    server.open("aio:" + stuck_disk.path)
    base_fds = None
    h = connect(server, 0)
    stuck_disk.freeze()
    w = bg(h.pread, 4096, 0)
    wait_for(lambda: server.stats(0)["reqs_outstanding"] == 1, what="an in-flight read")
    t0 = time.time()
    server.tapctl("close", "-m", 0, "-f")
    assert time.time() - t0 < 5
    w["thread"].join(10)
    assert "error" in w, "the client should see its connection cut"
    # the minor is closed and can take another image at once
    assert server.call("list")["result"]["vbds"][0]["state"] == 0x2
    other = make_image(tmp_path / "other.img", 1 << 20, pattern=0x33)
    server.call("open", params="aio:" + other, minor=0)
    h2 = connect(server, 0)
    assert h2.pread(4, 0) == b"\x33" * 4
    h2.shutdown()
    base_fds = fd_count(server.proc.pid)
    stuck_disk.thaw()                           # the zombie drains and closes its file
    wait_for(lambda: fd_count(server.proc.pid) < base_fds, what="the zombie to close its image")
    server.call("destroy", minor=0)
    assert server.call("list")["result"]["vbds"] == []


def test_io_errors_reach_the_client_and_stats(stuck_disk, server):
    server.open("aio:" + stuck_disk.path)
    h = connect(server, 0)
    h.pwrite(b"ok" * 2048, 0)
    stuck_disk.fail(True)
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    with pytest.raises(nbd.Error):
        h.pwrite(b"z" * 4096, 0)
    stuck_disk.fail(False)
    assert h.pread(4096, 0) == b"ok" * 2048
    st = server.stats(0)
    assert st["ops"]["read"]["errors"] >= 1 and st["ops"]["write"]["errors"] >= 1
    assert st["images"][0]["fail"][0] >= 1 and st["images"][0]["fail"][1] >= 1
    h.shutdown()


# ---- open errors leave nothing behind ----

def test_open_errors(server, tmp_path):
    before = set(os.listdir(server.state_dir))
    cases = [
        ("aio:" + str(tmp_path / "missing.img"), "ENOENT"),
        ("aio:" + str(tmp_path), "EISDIR"),
        ("aio:/dev/null", "EINVAL"),
        ("qcow9:/x", "EINVAL"),
        ("noparams", "EINVAL"),
        ("ram:12Q", "EINVAL"),
        ("ram:0", "EINVAL"),
    ]
    for params, code in cases:
        with pytest.raises(ControlError) as e:
            server.call("open", params=params, minor=3)
        assert e.value.code == code, (params, e.value)
    assert server.call("list")["result"]["vbds"] == []
    assert set(os.listdir(server.state_dir)) == before


def test_minor_in_use_and_exclusive_writer(server, tmp_path):
    img = make_image(tmp_path / "x.img", 1 << 20)
    server.open("aio:" + img, minor=2)
    with pytest.raises(ControlError) as e:
        server.call("open", params="ram:1M", minor=2)
    assert e.value.code == "EBUSY"
    with pytest.raises(ControlError) as e:
        server.call("open", params="aio:" + img)              # a second writer
    assert e.value.code == "EBUSY" and "already open" in e.value.message
    with pytest.raises(ControlError) as e:
        server.call("open", params="aio:" + img, readonly=True)
    assert e.value.code == "EBUSY"
    server.call("destroy", minor=2)
    a = server.open("aio:" + img, readonly=True)               # readers share
    b = server.open("aio:" + img, readonly=True)
    assert a["minor"] != b["minor"]


def test_permission_denied_as_unprivileged_server(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the server as another user (setpriv)")
    d = tempfile.mkdtemp(prefix="tapdiskd-nobody-")
    try:
        os.chmod(d, 0o777)
        secret = os.path.join(d, "secret.img")
        make_image(secret, 1 << 20)
        os.chmod(secret, 0o600)                  # root's, unreadable for nobody
        mine = os.path.join(d, "mine.img")
        make_image(mine, 1 << 20)
        os.chown(mine, 65534, 65534)
        srv = Server(os.path.join(d, "state"))
        srv.extra = []
        wrap = os.environ.get("TAPDISKD_WRAPPER", "")
        os.environ["TAPDISKD_WRAPPER"] = "setpriv --reuid=65534 --regid=65534 --clear-groups " + wrap
        try:
            srv.start()
        finally:
            if wrap:
                os.environ["TAPDISKD_WRAPPER"] = wrap
            else:
                del os.environ["TAPDISKD_WRAPPER"]
        try:
            with pytest.raises(ControlError) as e:
                srv.call("open", params="aio:" + secret)
            assert e.value.code == "EACCES"
            assert srv.call("list")["result"]["vbds"] == []
            srv.open("aio:" + mine)              # root may drive a server of another uid
        finally:
            assert srv.stop() == 0
            srv.assert_clean_log()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- the server process ----

def test_second_server_refuses_state_dir(server):
    r = run(os.path.join(BIN, "tapdiskd"), "--state-dir", server.state_dir, "--foreground",
            check=False, timeout=10)
    assert r.returncode == 1
    assert "already serving" in r.stderr and str(server.proc.pid) in r.stderr
    assert r.stderr.count("\n") == 1
    server.call("version")                        # the first one still owns its socket


def test_bad_options(tmp_path):
    for args in (["--io-engine", "spdk"], ["--log-level", "loud"], ["--bogus"], ["extra"]):
        r = run(os.path.join(BIN, "tapdiskd"), "--state-dir", tmp_path / "s", "--foreground",
                *args, check=False, timeout=10)
        assert r.returncode == 2, args
    r = run(os.path.join(BIN, "tapdiskd"), "--state-dir", tmp_path / "s", "--foreground",
            "--nbd-listen", "tcp:nohost.invalid:xyz", check=False, timeout=10)
    assert r.returncode == 1 and "nbd-listen" in r.stderr


def test_daemon_mode(tmp_path):
    state = tmp_path / "d"
    r = run(os.path.join(BIN, "tapdiskd"), "--state-dir", state, timeout=20)
    assert r.returncode == 0
    with open(state / "tapdiskd.lock") as f:
        pid = int(f.read())
    srv = Server(state)
    assert srv.call("version")["result"]["pid"] == pid
    srv.call("open", params="ram:1M")
    srv.ctl.close()
    srv._ctl = None
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
             open("/proc/%d/stat" % pid).read().split()[2] == "Z", what="the daemon to exit")
    assert not os.path.exists(state / "ctl.sock")


def test_sigterm_flushes_and_cleans_up(server, tmp_path):
    img = make_image(tmp_path / "t.img", 8 << 20)
    server.open("aio:" + img)
    h = connect(server, 0)
    h.pwrite(b"T" * 65536, 0)
    nbd_sock = server.nbd_path(0)
    assert server.stop() == 0
    assert not os.path.exists(nbd_sock)
    assert not os.path.exists(server.ctl_path)
    with open(img, "rb") as f:
        assert f.read(65536) == b"T" * 65536


def test_sigterm_waits_for_inflight_io(stuck_disk, server):
    server.open("aio:" + stuck_disk.path)
    h = connect(server, 0)
    stuck_disk.freeze()
    w = bg(h.pwrite, b"w" * 4096, 0)
    wait_for(lambda: server.stats(0)["reqs_outstanding"] == 1, what="an in-flight write")
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None, "exited with a write in flight"
    stuck_disk.thaw()
    assert server.proc.wait(20) == 0
    w["thread"].join(10)
    assert "error" not in w
    with open(stuck_disk.path, "rb") as f:
        assert f.read(4096) == b"w" * 4096


WRITER = r"""
import nbd, os, struct, sys
uri, log = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(uri)
blk = 4096
i = 0
with open(log, "w") as lf:
    while True:
        slot = i % 2048
        data = struct.pack("<QQ", i, slot) * (blk // 16)
        h.pwrite(data, slot * blk)
        i += 1
        if i % 32 == 0:
            h.flush()
            lf.write("%d\n" % i); lf.flush(); os.fsync(lf.fileno())
"""


def test_kill9_under_load_then_restart(make_server, tmp_path):
    img = make_image(tmp_path / "crash.img", 2048 * 4096)
    log = tmp_path / "flushed.log"
    srv = make_server()
    srv.open("aio:" + img)
    w = subprocess.Popen([sys.executable if sys.executable.startswith("/usr/bin") else "/usr/bin/python3",
                          "-c", WRITER, srv.uri(0), str(log)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: log.exists() and log.stat().st_size > 40, what="writes and flushes")
    time.sleep(0.5)
    srv.kill()
    w.wait(10)
    flushed = int(log.read_text().split()[-1])
    assert flushed >= 64

    srv2 = Server(srv.state_dir).start()           # stale sockets and lock are no obstacle
    try:
        srv2.open("aio:" + img)
        h = nbd.NBD()
        h.connect_uri(srv2.uri(0))
        import struct
        # every write acknowledged before the last completed flush reads back
        # (a later write to the same slot may have landed too: never older)
        for i in range(max(0, flushed - 2048), flushed):
            slot = i % 2048
            seq, s = struct.unpack("<QQ", h.pread(16, slot * 4096))
            assert s == slot and seq >= i, (i, slot, seq)
        h.shutdown()
    finally:
        assert srv2.stop() == 0
        srv2.assert_clean_log()
