"""The Xen PV block backend, end to end without a hypervisor: tapdiskd on
its simulated grant/event-channel port (--xen-sim), a test xenstored that
the real libxenstore and xenstore-utils speak to, the toolstack played with
xenstore-write/-rm, and blkfront_sim as the guest (its own blkif encoding,
written from blkif.h). Guest memory is hostile input: the malicious cases
are each a request xen-blkback would refuse.

The harness (xenstored, simulated port, toolstack, guest) is xen_harness.py.
"""

import json
import os
import subprocess
import time

import pytest

from conftest import BIN, SLOW, fd_count, make_image, run, wait_for
from xen_harness import MALICIOUS, MiB, Xen, ram, xen  # noqa: F401 (xen: fixture)

# the second engine's pass skips these (see pytest.ini)
pytestmark = pytest.mark.engine_independent

# ---- data paths ----

def test_verify_every_byte_with_indirect_discard_and_flush(xen):
    m = ram(xen)
    be = xen.attach(m)
    r = xen.sim(be, "--verify", 2, "--indirect", "--discard", "--region-mb", 32)
    assert r["errors"] == 0 and r["mismatches"] == 0
    assert r["reads"] > 1000 and r["writes"] > 1000
    assert r["indirect"] > 100 and r["discards"] > 10 and r["flushes"] > 10
    assert xen.state(be) == 6          # Closed after the guest's Closed
    st = xen.srv.stats(m)
    assert st["xenbus"]["path"] == be and st["xenbus"]["domid"] == 1
    assert st["xenbus"]["state"] == 6 and st["frontends"]["blkif"] == 1
    # every guest write reached the vbd's own counters
    assert st["ops"]["write"]["reqs"] >= r["writes"]
    assert st["ops"]["discard"]["reqs"] >= r["discards"]


@pytest.mark.parametrize("proto,order,queues,indirect", [
    ("x86_64", 0, 1, False),
    ("x86_32", 0, 1, True),
    ("x86_32", 4, 2, False),
    ("x86_64", 2, 4, True),
    ("x86_64", 4, 4, True),
])
def test_protocols_rings_and_queues(xen, proto, order, queues, indirect):
    m = ram(xen)
    be = xen.attach(m)
    args = ["--verify", 1, "--proto", proto, "--order", order, "--queues", queues]
    if indirect:
        args += ["--indirect"]
    r = xen.sim(be, *args)
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["reads"] > 100
    assert (r["indirect"] > 0) == indirect
    log = xen.srv.log()
    assert "%d queue" % queues in log and "protocol %s" % proto in log


def test_thousands_of_requests_in_flight(xen):
    """A paused vbd holds every request a 4-queue, 16-page guest can send."""
    m = ram(xen, "256M")
    be = xen.attach(m)
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    xen.srv.call("pause", minor=m)
    guest = xen.sim_bg(be, "--verify", 3, "--order", 4, "--queues", 4, "--region-mb", 128,
                       "--max-sectors", 8, "--patience", 60 * SLOW)
    wait_for(lambda: xen.srv.stats(m).get("reqs_queued", 0) >= 2000, timeout=30,
             what="2000 requests queued")
    st = xen.srv.stats(m)["xenbus"]
    assert st["reqs"][0] - st["reqs"][1] >= 2000       # in, not yet answered
    xen.srv.call("unpause", minor=m)
    out, err = guest.communicate(timeout=120 * SLOW)
    assert guest.returncode == 0, err
    r = json.loads(out.splitlines()[-1])
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["max_inflight"] >= 2000


def test_stats_while_connected(xen):
    m = ram(xen)
    be = xen.attach(m)
    p = xen.sim_bg(be, "--verify", 3, "--queues", 2, "--order", 1)
    try:
        wait_for(lambda: xen.state(be) == 4, what="Connected")
        wait_for(lambda: xen.srv.stats(m)["xenbus"]["reqs"][0] > 0, what="ring requests")
        x = xen.srv.stats(m)["xenbus"]
        assert len(x["rings"]) == 2 and x["rings"][0]["pages"] == 2
        assert x["rings"][0]["entries"] == 64
        assert x["errors"] == {"msg": 0, "map": 0, "vbd": 0}
        out = xen.srv.tapctl("stats", "-m", m).stdout
        assert '"xenbus"' in out
    finally:
        out, err = p.communicate(timeout=60 * SLOW)
    assert p.returncode == 0, err


def test_features_advertised_and_readonly_refuses_writes(xen, tmp_path):
    img = str(tmp_path / "ro.img")
    make_image(img, 16 * MiB, pattern=ord("R"))
    m = xen.srv.open("aio:" + img, readonly=True)["minor"]
    be = xen.attach(m)
    r = xen.sim(be, "--probe")
    assert r["sectors"] == 16 * MiB // 512
    assert r["info"] & 4                       # VDISK_READONLY
    assert r["sector-size"] == 512 and r["physical-sector-size"] == 4096
    assert r["feature-flush-cache"] == 1 and r["feature-barrier"] == 1
    assert r["feature-discard"] == 0
    assert r["max-ring-page-order"] == 4 and r["multi-queue-max-queues"] == 4
    assert r["feature-max-indirect-segments"] == 256
    assert r["read"] == 0 and r["write"] == -1   # BLKIF_RSP_ERROR
    with open(img, "rb") as f:
        assert f.read(MiB) == b"R" * MiB


@pytest.mark.engine
def test_io_errors_reach_the_guest_as_errors(xen, stuck_disk):
    m = xen.srv.open("aio:" + stuck_disk.path)["minor"]
    be = xen.attach(m)
    stuck_disk.fail(True)
    r = xen.sim(be, "--probe")
    assert r["read"] == -1 and r["write"] == -1
    assert r["feature-discard"] == 1


@pytest.mark.engine
@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_guest_writes_land_in_the_image(xen, tmp_path, fmt):
    """What the guest wrote, read back by qemu-img from the image file."""
    img = str(tmp_path / ("disk." + fmt))
    if fmt == "raw":
        make_image(img, 64 * MiB)
        params = "aio:" + img
    else:
        run(os.path.join(BIN, "vhd-util"), "create", "-n", img, "-s", "64")
        params = "vhd:" + img
    m = xen.srv.open(params)["minor"]
    be = xen.attach(m)
    dump = str(tmp_path / "expected")
    r = xen.sim(be, "--verify", 2, "--indirect", "--discard", "--region-mb", 16, "--dump", dump)
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["writes"] > 100
    xen.srv.call("close", minor=m)
    out = str(tmp_path / "actual")
    run("qemu-img", "convert", "-f", "raw" if fmt == "raw" else "vpc", "-O", "raw", img, out)
    with open(dump, "rb") as f:
        want = f.read()
    with open(out, "rb") as f:
        got = f.read(len(want))
    assert got == want
    if fmt == "vhd":
        run(os.path.join(BIN, "vhd-util"), "check", "-n", img)


def test_barriers_order_writes(xen):
    m = ram(xen)
    be = xen.attach(m)
    r = xen.sim(be, "--barrier", 200)
    assert r == {"rounds": 200, "violations": 0}
    x = xen.srv.stats(m)["xenbus"]
    assert x["state"] == 6 and x["reqs"][0] >= 200 * 4


# ---- hostile guests ----

def test_malicious_requests_are_refused_and_the_ring_lives(xen):
    m = ram(xen)
    be = xen.attach(m)
    bad = []
    for case in MALICIOUS:
        r = xen.sim(be, "--malicious", case, "--indirect", "--discard", raw=True)
        if r.returncode != 0:
            bad.append((case, r.stdout, r.stderr))
        assert xen.srv.proc.poll() is None, xen.srv.log()
        # the frontend reboots for the next case
        xen.xs("write", "/local/domain/1/device/vbd/51712/state", "1")
        wait_for(lambda: xen.state(be) == 2, what="InitWait after reboot")
    assert not bad, bad
    log = xen.srv.log()
    assert "blkif" in log


def test_garbage_ring_every_request_answered(xen):
    m = ram(xen)
    be = xen.attach(m)
    r = xen.sim(be, "--malicious", "garbage", "--seed", 7)
    assert r["sent"] == r["answered"] and r["sent"] >= 800
    # and the same frontend then does honest work
    xen.xs("write", "/local/domain/1/device/vbd/51712/state", "1")
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    r = xen.sim(be, "--verify", 1)
    assert r["errors"] == 0 and r["mismatches"] == 0


def test_producer_ahead_kills_only_that_ring(xen):
    m1, m2 = ram(xen), ram(xen)
    be1 = xen.attach(m1, domid=1)
    be2 = xen.attach(m2, domid=2)
    other = xen.sim_bg(be2, "--verify", 3, domid=2)
    r = xen.sim(be1, "--malicious", "producer-ahead", domid=1)
    assert r["backend_state"] in (5, 6)
    assert "ring" in xen.srv.log()
    out, err = other.communicate(timeout=60 * SLOW)
    assert other.returncode == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res["errors"] == 0 and res["mismatches"] == 0
    # the guest that broke its ring reboots and is served again
    xen.xs("write", "/local/domain/1/device/vbd/51712/state", "6")
    wait_for(lambda: xen.state(be1) == 6, what="Closed")
    xen.xs("write", "/local/domain/1/device/vbd/51712/state", "1")
    wait_for(lambda: xen.state(be1) == 2, what="InitWait after reboot")
    r = xen.sim(be1, "--verify", 1, domid=1)
    assert r["errors"] == 0 and r["mismatches"] == 0


def test_bad_ring_config_is_refused(xen):
    m = ram(xen)
    be = xen.attach(m)
    fe = "/local/domain/1/device/vbd/51712"
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    # more pages than offered, a ring-ref that is not a number, too many queues
    for kv in (["ring-page-order", "9", "ring-ref0", "1", "event-channel", "1"],
               ["ring-page-order", "0", "ring-ref", "zebra", "event-channel", "1"],
               ["multi-queue-num-queues", "64", "ring-ref", "1", "event-channel", "1"],
               ["ring-ref", "1", "event-channel", "1", "protocol", "sparc"]):
        xen.xs("rm", fe, check=False)
        args = [fe + "/backend", be]
        for i in range(0, len(kv), 2):
            args += [fe + "/" + kv[i], kv[i + 1]]
        xen.xs("write", *args, fe + "/state", "3")
        wait_for(lambda: xen.state(be) == 5, what="Closing on a bad config")
        assert xen.read(be + "/error")
        xen.xs("rm", be + "/error")
        xen.xs("write", fe + "/state", "6")
        wait_for(lambda: xen.state(be) == 6, what="Closed")
        xen.xs("write", fe + "/state", "1")
        wait_for(lambda: xen.state(be) == 2, what="InitWait")
    assert xen.srv.proc.poll() is None


def test_guest_vanishing_repeatedly_leaks_nothing(xen):
    m = ram(xen)
    fds = None
    for i in range(6):
        be = xen.attach(m, domid=10 + i)
        r = xen.sim(be, "--hold", 0.1, "--qd", 32, "--queues", 2, domid=10 + i)
        assert r["submitted"] == 32
        xen.detach(domid=10 + i)
        wait_for(lambda: "%s: backend directory removed" % be in xen.srv.log(),
                 what="the device to go")
        wait_for(lambda: "xenbus" not in xen.srv.stats(m), what="the frontend to go")
        if i == 1:
            fds = fd_count(xen.srv.proc.pid)
    assert fd_count(xen.srv.proc.pid) == fds
    run("nbdinfo", "--size", xen.srv.uri(m))


@pytest.mark.engine
def test_guest_vanishing_with_io_stuck_in_the_disk(xen, stuck_disk):
    m = xen.srv.open("aio:" + stuck_disk.path)["minor"]
    be = xen.attach(m)
    stuck_disk.freeze()
    r = xen.sim(be, "--hold", 0.2, "--qd", 16)
    assert r["submitted"] == 16
    xen.detach()
    wait_for(lambda: "backend directory removed" in xen.srv.log(), what="the device to go")
    stuck_disk.thaw()
    # the late completions find no guest and free their buffers
    wait_for(lambda: xen.srv.stats(m)["reqs_outstanding"] == 0, what="the disk to drain")
    run("nbdinfo", "--size", xen.srv.uri(m))


def test_guest_vanishing_while_paused_with_requests_queued(xen, tmp_path):
    """Requests a paused vbd holds for a guest that is then destroyed: the
    unpause must answer nobody and free them, and destroy must work both
    before and after unpause."""
    img = str(tmp_path / "d.img")
    make_image(img, 32 * MiB)
    for destroy_paused in (False, True):
        m = xen.srv.open("aio:" + img)["minor"]
        be = xen.attach(m)
        wait_for(lambda: xen.state(be) == 2, what="InitWait")
        xen.srv.tapctl("pause", "-m", m)
        r = xen.sim(be, "--hold", 0.3, "--qd", 256, "--queues", 2, "--order", 3)
        assert r["submitted"] == 256
        st = xen.srv.stats(m)
        assert st["xenbus"]["reqs"][0] - st["xenbus"]["reqs"][1] == 256
        assert st["reqs_queued"] == 256
        xen.detach()
        wait_for(lambda: "%s: backend directory removed" % be in xen.srv.log(),
                 what="the device to go")
        if destroy_paused:
            xen.srv.tapctl("destroy", "-m", m)
        else:
            xen.srv.tapctl("unpause", "-m", m)
            wait_for(lambda: "xenbus" not in xen.srv.stats(m), what="the frontend to go")
            # the late completions find no guest and free their buffers
            wait_for(lambda: xen.srv.stats(m)["reqs_outstanding"] == 0, what="the disk to drain")
            xen.srv.tapctl("destroy", "-m", m)
        assert "minor=%d " % m not in xen.srv.tapctl("list").stdout
    assert xen.srv.proc.poll() is None
    run("qemu-img", "info", img)


def test_close_under_a_connected_guest(xen):
    m = ram(xen)
    be = xen.attach(m)
    p = xen.sim_bg(be, "--verify", 30)
    wait_for(lambda: xen.state(be) == 4, what="Connected")
    time.sleep(0.3)
    xen.srv.tapctl("close", "-m", m)
    wait_for(lambda: xen.state(be) == 6, what="the backend to close")
    out, err = p.communicate(timeout=60 * SLOW)
    assert p.returncode != 0          # the guest saw its disk go
    assert xen.srv.proc.poll() is None


def test_reopen_then_reconnect(xen, tmp_path):
    """The toolstack's reboot: close, open again at the same minor, the
    frontend goes Initialising, the same backend directory serves again."""
    img = str(tmp_path / "d.img")
    make_image(img, 32 * MiB)
    m = xen.srv.open("aio:" + img)["minor"]
    be = xen.attach(m)
    r = xen.sim(be, "--verify", 1)
    assert r["errors"] == 0
    xen.srv.call("close", minor=m)
    os.unlink(img)
    make_image(img, 32 * MiB)      # the guest's checker expects a zeroed disk
    xen.srv.call("open", minor=m, params="aio:" + img)
    # the hotplug script re-announces the disk
    xen.xs("write", be + "/physical-device-path", xen.srv.nbd_path(m))
    xen.xs("write", "/local/domain/1/device/vbd/51712/state", "1")
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    r = xen.sim(be, "--verify", 1)
    assert r["errors"] == 0 and r["mismatches"] == 0


# ---- which directories are ours ----

def test_claims_vbd_only_with_our_script(xen):
    m1, m2 = ram(xen), ram(xen)
    ours = xen.attach(m1, domid=3, kind="vbd", script="/etc/xen/scripts/block-tap")
    theirs = xen.attach(m2, domid=4, kind="vbd", script="/etc/xen/scripts/block")
    wait_for(lambda: xen.state(ours) == 2, what="InitWait on our directory")
    time.sleep(0.3)
    assert xen.state(theirs) is None         # blkback's, untouched
    assert xen.read(theirs + "/max-ring-page-order") is None
    r = xen.sim(ours, "--verify", 1, domid=3)
    assert r["errors"] == 0


def test_backend_types_option(tmp_path):
    x = Xen(tmp_path, extra=["--xen-backend-types", "vbd"])
    try:
        m = ram(x)
        be = x.attach(m, kind="vbd3")
        ours = x.attach(m, domid=2, kind="vbd", script="block-tap")
        wait_for(lambda: x.state(ours) == 2, what="InitWait")
        assert x.state(be) is None
    finally:
        x.close()


def test_no_xen_says_so(make_server, tmp_path):
    s = make_server("plain", env=dict(os.environ, XENSTORED_PATH=str(tmp_path / "none")))
    wait_for(lambda: "Xen backend disabled" in s.log(), what="the log line")
    s2 = make_server("off", extra=["--no-xen"])
    wait_for(lambda: "Xen backend disabled (--no-xen)" in s2.log(), what="the log line")


# ---- persistent grants (feature-persistent) ----

PGRANT_DEFAULT_MAX = 1056       # server/xen/pgrant.h, Linux blkback's default


def _watch_pgrants(xen, m, guest):
    """Samples the rings' mapped persistent grants until the guest exits;
    returns (the largest count one ring had, whether every ring said
    persistent, the guest's result)."""
    most, all_on, seen = 0, True, False
    while guest.poll() is None:
        x = xen.srv.stats(m).get("xenbus")
        if x and x["rings"]:
            seen = True
            all_on &= all(r["persistent"] for r in x["rings"])
            most = max([most] + [r["persistent_grants"] for r in x["rings"]])
            assert x["persistent_grants"] == sum(r["persistent_grants"] for r in x["rings"])
        time.sleep(0.05)
    out, err = guest.communicate()
    assert guest.returncode == 0, err + xen.srv.log()[-3000:]
    assert seen, "never saw the rings connected"
    return most, all_on, json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("proto,order,queues,indirect", [
    ("x86_64", 0, 1, False),
    ("x86_64", 0, 1, True),
    ("x86_32", 1, 2, True),
    ("x86_64", 2, 4, True),
])
def test_persistent_grants_every_byte(xen, proto, order, queues, indirect):
    """Negotiated, used on every ring (data and indirect pages), bounded,
    every byte right, and all unmapped once the guest disconnects."""
    m = ram(xen)
    be = xen.attach(m)
    args = ["--verify", 2, "--persistent", "--discard", "--proto", proto, "--order", order,
            "--queues", queues]
    if indirect:
        args += ["--indirect"]
    most, all_on, r = _watch_pgrants(xen, m, xen.sim_bg(be, *args))
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["reads"] > 100
    assert r["persistent"] == 1 and (r["indirect"] > 0) == indirect
    assert all_on and 0 < most <= min(PGRANT_DEFAULT_MAX, r["grants"])
    assert "persistent grants" in xen.srv.log()
    wait_for(lambda: xen.state(be) == 6, what="Closed")
    x = xen.srv.stats(m)["xenbus"]
    assert x["rings"] == [] and x["persistent_grants"] == 0
    if r["grants"] <= PGRANT_DEFAULT_MAX:       # the guest's pool fits the bound
        assert x["persistent_evictions"] == 0 and x["persistent_overflow"] == 0
    assert xen.guest_maps() == 0


def test_persistent_grants_are_bounded(tmp_path):
    """A lowered bound: the table never holds more, pages long unused are
    unmapped, the rest grant-copied, and every byte still comes back right."""
    x = Xen(tmp_path, server_env={"TAPDISKD_MAX_PERSISTENT_GRANTS": "24"})
    try:
        assert "24 persistent grants per ring" in x.srv.log()
        m = ram(x)
        be = x.attach(m)
        most, all_on, r = _watch_pgrants(x, m, x.sim_bg(be, "--verify", 2, "--persistent",
                                                        "--indirect", "--queues", 2))
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["persistent"] == 1
        assert r["grants"] > 24 and all_on and 0 < most <= 24
        st = x.srv.stats(m)["xenbus"]
        assert st["persistent_evictions"] > 0 and st["persistent_overflow"] > 0
        assert st["persistent_grants"] == 0
        assert x.guest_maps() == 0
    finally:
        x.close()


def test_persistent_grants_off_unless_both_agree(tmp_path):
    """Without the frontend's feature-persistent, or with the backend's
    turned off (a bound of 0), rings grant-copy as before: nothing mapped.
    (The third case, both agreeing, is the control.)"""
    cases = (({}, [], 1, 0), ({"TAPDISKD_MAX_PERSISTENT_GRANTS": "0"}, ["--persistent"], 0, 0),
             ({}, ["--persistent"], 1, 1))
    for i, (env, flag, offered, on) in enumerate(cases):
        d = tmp_path / ("case%d" % i)
        d.mkdir()
        x = Xen(d, server_env=env)
        try:
            m = ram(x)
            be = x.attach(m)
            r = x.sim(be, "--probe", *flag)
            assert r["feature-persistent"] == offered and r["persistent"] == on
            x.xs("write", "/local/domain/1/device/vbd/51712/state", "1")
            wait_for(lambda: x.state(be) == 2, what="InitWait")
            most, all_on, r = _watch_pgrants(x, m, x.sim_bg(be, "--verify", 1, "--indirect",
                                                            *flag))
            assert r["errors"] == 0 and r["mismatches"] == 0 and r["persistent"] == on
            assert (most > 0) == bool(on) and all_on == bool(on)
            assert ("x86_64, persistent grants)" in x.srv.log()) == bool(on)
        finally:
            x.close()


def test_persistent_grants_hostile_guest(xen):
    """Each hostile request under persistent grants: refused (or served)
    alone, the ring lives; a guest cycling through more refs than the bound
    gets every byte back and the table stays bounded."""
    m = ram(xen)
    be = xen.attach(m)
    bad = []
    for case in MALICIOUS + ["persistent-flood"]:
        r = xen.sim(be, "--malicious", case, "--persistent", "--indirect", "--discard", raw=True)
        if r.returncode != 0 or '"persistent": 1' not in r.stdout:
            bad.append((case, r.stdout, r.stderr))
        assert xen.srv.proc.poll() is None, xen.srv.log()
        xen.xs("write", "/local/domain/1/device/vbd/51712/state", "1")
        wait_for(lambda: xen.state(be) == 2, what="InitWait after reboot")
    assert not bad, bad
    x = xen.srv.stats(m)["xenbus"]
    # bad-gref, bad-gref-read, indirect-bad-page: failed maps, counted
    assert x["errors"]["map"] >= 3
    # the flood's 5120 fresh refs: 1056 mapped, the rest grant-copied (the
    # mapped ones are too recent to evict)
    assert x["persistent_overflow"] >= 5120 - PGRANT_DEFAULT_MAX
    assert x["persistent_grants"] == 0 and xen.guest_maps() == 0
    assert "cannot map grant" in xen.srv.log()


@pytest.mark.engine
def test_persistent_grants_unmapped_when_the_guest_vanishes_mid_io(xen, stuck_disk):
    """The guest dies with requests stuck in the disk: its pages are
    unmapped at once, and the late completions touch none of them."""
    m = xen.srv.open("aio:" + stuck_disk.path)["minor"]
    be = xen.attach(m)
    stuck_disk.freeze()
    r = xen.sim(be, "--hold", 0.3, "--qd", 32, "--persistent")
    assert r["submitted"] == 32 and r["persistent"] == 1
    wait_for(lambda: sum(xen.pgrants(m)) > 0, what="persistent grants mapped")
    assert xen.guest_maps() > 0
    assert xen.srv.stats(m)["reqs_outstanding"] > 0
    xen.detach()
    wait_for(lambda: "backend directory removed" in xen.srv.log(), what="the device to go")
    assert xen.srv.stats(m)["reqs_outstanding"] > 0     # still stuck in the disk
    assert xen.guest_maps() == 0                        # yet nothing of the guest is mapped
    stuck_disk.thaw()
    wait_for(lambda: xen.srv.stats(m)["reqs_outstanding"] == 0, what="the disk to drain")
    run("nbdinfo", "--size", xen.srv.uri(m))


def test_persistent_grants_unmapped_on_vanish_and_close(xen):
    """Guests vanishing with requests in flight (2 queues), then a close
    under a connected guest: every mapping goes each time."""
    m = ram(xen)
    for i in range(3):
        be = xen.attach(m, domid=20 + i)
        r = xen.sim(be, "--hold", 0.1, "--qd", 32, "--queues", 2, "--persistent",
                    domid=20 + i)
        assert r["persistent"] == 1
        assert sum(xen.pgrants(m)) > 0 and xen.guest_maps(20 + i) > 0
        xen.detach(domid=20 + i)
        wait_for(lambda: "xenbus" not in xen.srv.stats(m), what="the frontend to go")
        assert xen.guest_maps(20 + i) == 0
    be = xen.attach(m)
    p = xen.sim_bg(be, "--verify", 30, "--persistent", "--indirect")
    wait_for(lambda: sum(xen.pgrants(m)) > 0, what="persistent grants mapped")
    xen.srv.tapctl("close", "-m", m)
    wait_for(lambda: xen.state(be) == 6, what="the backend to close")
    assert xen.guest_maps() == 0
    p.communicate(timeout=60 * SLOW)
    assert p.returncode != 0          # the guest saw its disk go
    assert xen.srv.proc.poll() is None


def test_frontend_left_closing_then_gone_ends_closed(xen):
    """A guest powering off leaves its frontend in Closing (Linux's xenbus
    shutdown path); once the toolstack removes the dead domain's frontend, the
    backend must reach Closed: libxl waits for that before it runs the
    hotplug script's remove, and the vbd would outlive the guest otherwise."""
    m = ram(xen)
    be = xen.attach(m)
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    fe = "/local/domain/1/device/vbd/51712"
    xen.xs("write", fe + "/state", 5)
    wait_for(lambda: xen.state(be) == 5, what="Closing, answering the frontend's")
    xen.xs("rm", fe)
    wait_for(lambda: xen.state(be) == 6, what="Closed once the frontend is gone")


def test_guest_dead_without_its_toolstack_gets_its_rings_freed(xen):
    """A guest dies and its toolstack has crashed: nobody removes the
    frontend or backend directories (the frontend still says Connected).
    When xenstore releases the domain (@releaseDomain), its rings and
    persistent grants are unmapped and the backend goes Closed; a live
    guest of another domain is untouched, and the late cleanup still works."""
    m, m2 = ram(xen), ram(xen)
    other = xen.attach(m2, domid=31, devid=51728)
    live = xen.sim_bg(other, "--verify", 20, "--persistent", domid=31, devid=51728)
    wait_for(lambda: xen.guest_maps(31) > 0, what="the live guest's rings")
    be = xen.attach(m, domid=30)
    r = xen.sim(be, "--hold", 0.1, "--qd", 32, "--persistent", domid=30)
    assert r["submitted"] == 32 and r["persistent"] == 1
    assert xen.guest_maps(30) > 0            # nothing removed its directories: still mapped
    assert xen.state(be) == 4
    xen.release_domain(30)
    wait_for(lambda: "domain 30 is gone; its rings are freed" in xen.srv.log(),
             what="the release to be seen")
    wait_for(lambda: xen.guest_maps(30) == 0, what="the dead guest's memory unmapped")
    assert xen.state(be) == 6
    assert xen.guest_maps(31) > 0 and xen.state(other) == 4
    out, err = live.communicate(timeout=120 * SLOW)
    assert live.returncode == 0, out + err
    xen.detach(domid=30)                      # the toolstack, back, cleans up late
    wait_for(lambda: "%s: backend directory removed" % be in xen.srv.log(),
             what="the device to go")
    run("nbdinfo", "--size", xen.srv.uri(m))
