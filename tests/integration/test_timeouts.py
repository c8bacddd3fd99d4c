"""Transient errors and stuck storage: a request failing with EAGAIN, EBUSY
or EINTR is sent again (1 ms, doubling to 1 s) until the vbd's timeout
(tap-ctl open -t, 120 s by default); one not done by then, retrying or
with its I/O stuck in the storage, is failed with EIO, its buffers kept
until the I/O comes back. The vbd stays closable (close -f) and the other
vbds go on. Storage that hangs or crawls: nbdkit's pause and delay
filters behind nbdfuse."""

import os
import threading
import time

import nbd
import pytest

from conftest import SLOW, StuckDisk, make_image, wait_for
from xen_harness import xen  # noqa: F401 (xen: fixture)

MiB = 1 << 20


def connect(srv, minor):
    h = nbd.NBD()
    h.connect_uri(srv.uri(minor))
    return h


def arm(srv, **args):
    return srv.call("fault-inject", **args)["result"]


class Bystander:
    """Another vbd, written and read in a loop while the test waits: it
    must never stall as long as the stuck one does."""

    def __init__(self, srv, path):
        make_image(path, 16 * MiB)
        self.minor = srv.open("aio:" + path)["minor"]
        self.h = connect(srv, self.minor)
        self.worst = 0.0
        self.rounds = 0
        self.stop = threading.Event()
        self.error = None
        self.t = threading.Thread(target=self.run)
        self.t.start()

    def run(self):
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                data = bytes([self.rounds % 255 + 1]) * 65536
                self.h.pwrite(data, (self.rounds % 16) * 65536)
                assert self.h.pread(65536, (self.rounds % 16) * 65536) == data
                self.worst = max(self.worst, time.monotonic() - t0)
                self.rounds += 1
                time.sleep(0.01)
        except Exception as e:   # reported by finish()
            self.error = e

    def finish(self, stuck_for):
        self.stop.set()
        self.t.join()
        assert self.error is None, self.error
        assert self.rounds > 10, self.rounds
        # never as long as the other vbd's wait (a slow machine may take a while)
        assert self.worst < stuck_for, (self.worst, stuck_for)
        self.h.shutdown()


@pytest.fixture
def fsrv(make_server):
    return make_server(extra=["--fault-injection"])


@pytest.mark.parametrize("error", ["EAGAIN", "EBUSY", "EINTR"])
def test_transient_errors_that_clear_are_retried(fsrv, tmp_path, error):
    img = make_image(tmp_path / "d.img", 64 * MiB)
    m = fsrv.open("aio:" + img, timeout=30)["minor"]
    h = connect(fsrv, m)
    arm(fsrv, nth=1, count=6, error=error, kinds="write", path="d.img")
    h.pwrite(b"\xab" * 65536, 0)                      # succeeds: the client sees nothing
    arm(fsrv, nth=1, count=3, error=error, kinds="read", path="d.img")
    assert h.pread(65536, 0) == b"\xab" * 65536
    arm(fsrv, nth=1, count=2, error=error, kinds="sync", path="d.img")
    h.flush()
    st = fsrv.stats(m)
    assert st["timeout"] == 30
    assert st["retries"] == 11 and st["timeouts"] == 0
    assert all(st["ops"][op]["errors"] == 0 for op in ("read", "write", "flush"))
    assert fsrv.call("fault-inject")["result"]["total"] == 11
    h.shutdown()


def test_transient_errors_that_do_not_clear_fail_with_eio_at_the_timeout(fsrv, tmp_path):
    img = make_image(tmp_path / "d.img", 64 * MiB)
    m = fsrv.open("aio:" + img, timeout=2)["minor"]
    other = Bystander(fsrv, str(tmp_path / "other.img"))
    h = connect(fsrv, m)
    h.pwrite(b"\x11" * 4096, 0)
    arm(fsrv, nth=1, count=1000000, error="EBUSY", kinds="write", path="d.img")
    t0 = time.monotonic()
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"\x22" * 4096, 0)
    took = time.monotonic() - t0
    assert e.value.errno == "EIO"
    assert 1.9 <= took < 2 + 3 * SLOW, took
    fsrv.call("fault-inject", disarm=True)
    other.finish(took)
    st = fsrv.stats(m)
    # 1, 2, 4 ... 512 ms, then the rest of the 2 s
    assert st["timeouts"] == 1 and 10 <= st["retries"] <= 12, st
    assert st["ops"]["write"]["errors"] == 1
    # the vbd goes on
    h.pwrite(b"\x33" * 4096, 0)
    assert h.pread(4096, 0) == b"\x33" * 4096
    h.shutdown()
    assert fsrv.stats(other.minor)["timeouts"] == 0


def test_timeout_argument_checked_and_reported(fsrv, tmp_path):
    img = make_image(tmp_path / "d.img", MiB)
    for bad in (0, 86401):
        r = fsrv.call("open", check=False, params="aio:" + img, timeout=bad)
        assert not r["ok"] and r["error"]["code"] == "EINVAL"
        assert "timeout" in r["error"]["message"]
    out = fsrv.tapctl("create", "-a", "aio:" + img, "-t", "7").stdout
    m = int(out.strip().rsplit(".", 1)[1])
    assert fsrv.stats(m)["timeout"] == 7
    m2 = fsrv.open("ram:1M")["minor"]
    assert fsrv.stats(m2)["timeout"] == 120
    # stats --reset zeroes the counters, not the setting
    assert fsrv.call("stats", minor=m, reset=True)["result"]["timeout"] == 7
    assert fsrv.stats(m)["timeout"] == 7


@pytest.mark.engine
def test_hung_storage_fails_requests_at_the_timeout_and_close_f_still_works(
        make_server, stuck_disk, tmp_path):
    srv = make_server()
    m = srv.open("aio:" + stuck_disk.path, timeout=2)["minor"]
    h = connect(srv, m)
    h.pwrite(b"\x44" * 65536, 0)
    h.flush()
    other = Bystander(srv, str(tmp_path / "other.img"))
    stuck_disk.freeze()
    t0 = time.monotonic()
    bufs = [nbd.Buffer(65536) for _ in range(4)]
    cookies = [h.aio_pread(b, i * MiB) for i, b in enumerate(bufs)]
    cookies.append(h.aio_pwrite(b"\x55" * 65536, 8 * MiB))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    took = time.monotonic() - t0
    for c in cookies:
        with pytest.raises(nbd.Error) as e:
            h.aio_command_completed(c)
        assert e.value.errno == "EIO"
    assert 1.9 <= took < 2 + 3 * SLOW, took
    st = srv.stats(m)
    assert st["timeouts"] == 5 and st["retries"] == 0
    # answered, but their I/O is still out: the vbd holds them
    assert st["reqs_outstanding"] == 5
    other.finish(took)
    h.shutdown()
    t0 = time.monotonic()
    srv.tapctl("close", "-f", "-m", m)
    assert time.monotonic() - t0 < 2 * SLOW
    assert srv.call("list", minor=m)["result"]["vbds"][0]["state"] == 2
    assert "force-closing with 5 requests in flight" in srv.log()
    # the other vbd is untouched
    h2 = connect(srv, other.minor)
    h2.pwrite(b"\x66" * 4096, 0)
    assert h2.pread(4096, 0) == b"\x66" * 4096
    h2.shutdown()
    # the storage comes back: the zombie's late I/O lands in buffers still its
    stuck_disk.thaw()
    wait_for(lambda: "minor %d: closed" % m in srv.log(), what="the zombie to go")
    assert srv.stop() == 0


@pytest.fixture
def slow_disk(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse for nbdfuse")
    d = StuckDisk(tmp_path / "slow", delay=4)
    yield d
    d.close()


@pytest.mark.engine
def test_slow_reads_time_out_and_their_late_data_lands_safely(make_server, slow_disk, tmp_path):
    """Reads that take 4 s on a vbd with -t 2: EIO at 2 s; at 4 s the data
    lands in the buffers the vbd kept for them (ASan would see it land in
    freed ones), no second reply reaches the client, and the vbd goes on."""
    srv = make_server()
    m = srv.open("aio:" + slow_disk.path, timeout=2, nodirect=True)["minor"]
    h = connect(srv, m)
    other = Bystander(srv, str(tmp_path / "other.img"))
    t0 = time.monotonic()
    with pytest.raises(nbd.Error) as e:
        h.pread(65536, 3 * MiB)
    took = time.monotonic() - t0
    assert e.value.errno == "EIO" and 1.9 <= took < 2 + 3 * SLOW, (e.value, took)
    assert srv.stats(m)["reqs_outstanding"] == 1
    wait_for(lambda: srv.stats(m)["reqs_outstanding"] == 0, timeout=10,
             what="the late read to come back")
    other.finish(took)
    # the handle saw exactly one reply per request: it still works
    h.pwrite(b"\x77" * 65536, 5 * MiB)
    assert h.pread(4096, 5 * MiB) == b"\x77" * 4096     # in the page cache: no delay
    st = srv.stats(m)
    assert st["timeouts"] == 1 and st["ops"]["read"]["errors"] == 1
    # a hard error is not retried: EIO at once, not at the timeout
    slow_disk.fail(True)
    t0 = time.monotonic()
    with pytest.raises(nbd.Error):
        h.pwrite(b"\x88" * 65536, 9 * MiB)
        h.flush()
    assert time.monotonic() - t0 < 1.5 * SLOW
    slow_disk.fail(False)
    assert srv.stats(m)["retries"] == 0
    h.shutdown()
    srv.call("close", minor=m)      # nothing in flight: an ordinary close


@pytest.mark.engine
def test_blkif_request_timing_out_is_answered_once(xen, stuck_disk):  # noqa: F811
    m = xen.srv.open("aio:" + stuck_disk.path, timeout=2)["minor"]
    be = xen.attach(m)
    stuck_disk.freeze()
    t0 = time.monotonic()
    r = xen.sim(be, "--probe")
    assert r["read"] == -1 and r["write"] == -1
    assert time.monotonic() - t0 >= 3.8      # a read, then a write, 2 s each
    st = xen.srv.stats(m)
    assert st["timeouts"] == 2 and st["reqs_outstanding"] == 2
    stuck_disk.thaw()
    wait_for(lambda: xen.srv.stats(m)["reqs_outstanding"] == 0, what="the late I/O")
    # the late completions answered nobody twice: the ring serves on
    r = xen.sim(be, "--probe")
    assert r["read"] == 0 and r["write"] == 0
