"""Running out of memory is back-pressure, never an error a client sees:
with every heap call failing (tests/preload/alloc_probe.c, toggled by
SIGUSR1), requests wait for memory instead of failing, and complete with
their data once it is back."""
import json
import os
import signal
import time

import nbd
import pytest

from conftest import BIN, make_image

PROBE = os.path.join(os.path.dirname(BIN), "tests", "alloc_probe.so")


def sanitized():
    with open(os.path.join(BIN, "tapdiskd"), "rb") as f:
        return b"libasan" in f.read()


# The probe replaces malloc, as ASan's runtime does: the two cannot share a
# process. The uring and threads passes of make check run these tests.
pytestmark = pytest.mark.skipif(sanitized(), reason="ASan build: its allocator and the "
                                "probe both replace malloc")


def probed_server(make_server):
    return make_server(env=dict(os.environ, LD_PRELOAD=PROBE))


def test_nbd_requests_wait_for_memory_and_then_complete(make_server, tmp_path):
    srv = probed_server(make_server)
    img = tmp_path / "d.img"
    make_image(img, 16 << 20)
    m = srv.open("aio:" + str(img))["minor"]
    h = nbd.NBD()
    h.connect_unix(srv.nbd_path(m))
    h.pwrite(b"w" * 4096, 0)          # warm: one context and buffer cached
    assert h.pread(4096, 0) == b"w" * 4096

    os.kill(srv.proc.pid, signal.SIGUSR1)   # every allocation fails from now
    try:
        n = 48
        bufs = [nbd.Buffer.from_bytearray(bytearray([i]) * 65536) for i in range(n)]
        cookies = [h.aio_pwrite(bufs[i], i * 65536) for i in range(n)]
        deadline = time.time() + 1.0
        while time.time() < deadline:
            h.poll(100)
        waiting = [c for c in cookies if not h.aio_command_completed(c)]
        # nothing failed (aio_command_completed raises on an error) and the
        # requests beyond what was cached are waiting, not refused
        assert waiting, "every request completed while no memory could be had"
        assert "out of memory; its requests wait" in srv.log()
    finally:
        os.kill(srv.proc.pid, signal.SIGUSR1)   # memory is back
    for c in waiting:
        while not h.aio_command_completed(c):
            h.poll(1000)
    for i in range(n):
        assert h.pread(65536, i * 65536) == bytes([i]) * 65536
    h.shutdown()
    srv.call("close", minor=m)


def blkif_attempt(tmp_path):
    """One guest against a paused vbd, the server stopped the moment its ring
    connects and made to fail every allocation before it goes on: whether a
    request had to wait on the ring, and what the guest saw."""
    from xen_harness import Xen, ram, wait_for
    x = Xen(tmp_path, server_env={"LD_PRELOAD": PROBE})
    try:
        m = ram(x)
        be = x.attach(m)
        wait_for(lambda: x.state(be) == 2, what="InitWait")
        x.srv.call("pause", minor=m)        # queued requests keep their contexts
        guest = x.sim_bg(be, "--verify", 1, "--order", 2, "--region-mb", 32,
                         "--patience", 60)
        pid = x.srv.proc.pid
        wait_for(lambda: x.state(be) == 4, what="Connected")
        os.kill(pid, signal.SIGSTOP)        # the guest fills its ring meanwhile
        os.kill(pid, signal.SIGUSR1)        # delivered first thing on SIGCONT
        time.sleep(0.3)
        os.kill(pid, signal.SIGCONT)
        try:
            deadline = time.time() + 3
            while time.time() < deadline and "requests wait on the ring" not in x.srv.log():
                time.sleep(0.05)
            waited = "requests wait on the ring" in x.srv.log()
        finally:
            os.kill(pid, signal.SIGUSR1)
        x.srv.call("unpause", minor=m)
        out, err = guest.communicate(timeout=120)
        assert guest.returncode == 0, err
        return waited, json.loads(out.splitlines()[-1])
    finally:
        x.close()


def test_blkif_requests_wait_on_the_ring_for_memory(tmp_path):
    waits = 0
    for i in range(5):      # the guest may fill its ring before the server stops
        (tmp_path / str(i)).mkdir()
        waited, r = blkif_attempt(tmp_path / str(i))
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["reads"] > 10, r
        waits += waited
        print("attempt", i, "waited" if waited else "filled before the stop")
        if waits:
            break
    assert waits, "no request ever had to wait for memory in 5 attempts"
