"""Running out of memory is back-pressure, never an error a client sees:
with every heap call failing (tests/preload/alloc_probe.c, toggled by
SIGUSR1), or only the large ones (ALLOC_FAIL_MIN: data buffers, while
request contexts still come), requests wait for memory instead of
failing, and complete with their data once it is back."""
import contextlib
import json
import os
import signal
import time

import nbd

from conftest import ALLOC_PROBE as PROBE, make_image, needs_alloc_probe, run

pytestmark = needs_alloc_probe


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


def test_a_driver_short_of_memory_makes_its_request_wait(make_server, tmp_path):
    """A read of a qcow2 overlay that goes to the backing file twice (the
    clusters between are the overlay's): the first piece's backing state
    comes from the request's scratch, the second's from the heap. With the
    heap failing, the driver ends the read with ENOMEM; the vbd sends it
    again (as EAGAIN) until memory is back, and the client sees its data."""
    srv = probed_server(make_server)
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x62 64k 64k", "-c", "write -P 0x62 192k 64k", top)
    want = b"a" * 65536 + b"b" * 65536 + b"a" * 65536 + b"b" * 65536
    m = srv.open("qcow2:" + top)["minor"]
    h = nbd.NBD()
    h.connect_unix(srv.nbd_path(m))
    assert h.pread(len(want), 0) == want      # warm: context, buffer and tables cached

    os.kill(srv.proc.pid, signal.SIGUSR1)   # every allocation fails from now
    try:
        buf = nbd.Buffer(len(want))
        cookie = h.aio_pread(buf, 0)
        deadline = time.time() + 1.0
        while time.time() < deadline:
            h.poll(100)
        # not failed (aio_command_completed raises on an error), and waiting
        assert not h.aio_command_completed(cookie)
    finally:
        os.kill(srv.proc.pid, signal.SIGUSR1)   # memory is back
    while not h.aio_command_completed(cookie):
        h.poll(1000)
    assert buf.to_bytearray() == want
    assert srv.stats(m)["retries"] > 0
    h.shutdown()
    srv.call("close", minor=m)


FAIL_LARGE = {"ALLOC_FAIL_MIN": str((64 << 10) + 1)}   # buffers over 64 KiB; contexts come
# up to 128 KiB a request (indirect): half of them need a buffer over 64 KiB
LARGE_IO = ("--indirect", "--max-sectors", 256, "--region-mb", 32)


@contextlib.contextmanager
def probed_xen(tmp_path, probe_env):
    """A simulated Xen whose server runs under the probe (probe_env: which
    allocations fail when SIGUSR1 says so)."""
    from xen_harness import Xen
    x = Xen(tmp_path, server_env=dict(probe_env, LD_PRELOAD=PROBE))
    try:
        yield x
    finally:
        x.close()


@contextlib.contextmanager
def short_of_memory(x, tmp_path, *sim_args):
    """A ram vbd and a guest on it (blkfront_sim sim_args), Connected and
    held before its first request; then allocations fail, the guest goes,
    and this waits until a ring waits for memory. Yields (minor, guest)
    while memory is short; memory is back after it."""
    from xen_harness import ram, wait_for
    m = ram(x)
    be = x.attach(m)
    wait_for(lambda: x.state(be) == 2, what="InitWait")
    gate = tmp_path / "gate"
    guest = x.sim_bg(be, *sim_args, "--patience", 60, "--gate", gate)
    wait_for(lambda: x.state(be) == 4, what="Connected")
    wait_for(lambda: x.read("/local/domain/1/device/vbd/51712/state") == "4",
             what="the guest Connected")
    time.sleep(0.2)                         # the server has seen it (a xenstore event)
    pid = x.srv.proc.pid
    os.kill(pid, signal.SIGUSR1)            # allocations fail from now
    try:
        gate.touch()                        # the guest's first requests go now
        wait_for(lambda: "requests wait on the ring" in x.srv.log(),
                 what="a request waiting on the ring for memory")
        yield m, guest
    finally:
        os.kill(pid, signal.SIGUSR1)        # memory is back


def guest_result(guest):
    out, err = guest.communicate(timeout=120)
    assert guest.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def test_blkif_requests_wait_on_the_ring_for_memory(tmp_path):
    """A guest connects and holds its first request until the server fails
    every allocation: its ring's requests must wait, then all complete."""
    with probed_xen(tmp_path, {}) as x:
        with short_of_memory(x, tmp_path, "--verify", 1, "--order", 2, "--region-mb", 32) \
                as (m, guest):
            time.sleep(0.3)                 # they stay waiting, not failed
        r = guest_result(guest)
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["reads"] > 10, r


def test_blkif_requests_wait_on_the_ring_for_their_data_buffers(tmp_path):
    """Request contexts come, large data buffers do not (ALLOC_FAIL_MIN):
    the guest's large requests must wait on the ring, not fail, and all
    complete with their data once memory is back."""
    with probed_xen(tmp_path, FAIL_LARGE) as x:
        with short_of_memory(x, tmp_path, "--verify", 3, *LARGE_IO) as (m, guest):
            time.sleep(0.5)                 # it stays waiting, not failed
            assert guest.poll() is None
        r = guest_result(guest)
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["indirect"] > 10, r
        st = x.srv.stats(m)
        assert st["ops"]["read"]["errors"] == 0 and st["ops"]["write"]["errors"] == 0


def test_blkif_indirect_requests_wait_for_their_segment_tables(tmp_path):
    """Every pool buffer fails (4 KiB and up), small objects still come: an
    indirect request's segment table is had before its entry is consumed,
    so the request waits on the ring, then completes."""
    with probed_xen(tmp_path, {"ALLOC_FAIL_MIN": "4096"}) as x:
        with short_of_memory(x, tmp_path, "--verify", 2, *LARGE_IO) as (m, guest):
            time.sleep(0.5)
            assert guest.poll() is None
        r = guest_result(guest)
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["indirect"] > 10, r


def test_blkif_guest_vanishing_while_its_request_waits_for_a_buffer(tmp_path):
    """The guest dies while a request of its ring waits for a buffer: the
    ring goes with its waiting request, and the disk serves the next guest."""
    from xen_harness import wait_for
    with probed_xen(tmp_path, FAIL_LARGE) as x:
        with short_of_memory(x, tmp_path, "--verify", 30, *LARGE_IO) as (m, guest):
            guest.kill()
            guest.communicate(timeout=30)
            x.detach()
            wait_for(lambda: "backend directory removed" in x.srv.log(),
                     what="the device to go")
        time.sleep(0.3)                     # a retry timer, had the ring stayed
        assert x.srv.proc.poll() is None
        be = x.attach(m, domid=2)
        r = x.sim(be, "--verify", 1, *LARGE_IO, domid=2)
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["indirect"] > 10, r
