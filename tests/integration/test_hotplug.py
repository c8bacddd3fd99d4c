"""contrib/xl-hotplug/block-tap, run as libxl runs it: the backend nodes
libxl writes (4.17's vbd with script=block-tap, 4.19's vbd3), tapdiskd
reaching InitWait before the script runs (libxl waits for it), then `add`
and `remove` with XENBUS_PATH, against the test xenstored through the real
xenstore-utils, and a guest (blkfront_sim) using the disk in between.
"""

import os
import subprocess

import pytest

from conftest import BIN, SLOW, make_image, run, wait_for
from xen_harness import BLOCK_TAP, MiB, xen  # noqa: F401 (xen: fixture)

# the second engine's pass skips these (see pytest.ini)
pytestmark = pytest.mark.engine_independent


def vbds(xen):
    return xen.srv.call("list")["result"]["vbds"]


def vhd(tmp_path, name="disk.vhd", mb=64):
    path = str(tmp_path / name)
    run(os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", mb)
    return path


def assert_added(xen, be):
    """What add promises: the nodes, and a vbd behind them."""
    assert xen.read(be + "/hotplug-status") == "connected"
    minor = int(xen.read(be + "/minor"))
    assert int(xen.read(be + "/pid")) == xen.srv.proc.pid
    assert xen.read(be + "/physical-device-path") == xen.srv.nbd_path(minor)
    assert xen.read(be + "/hotplug-error") is None
    return minor


def assert_removed(xen, be):
    for node in ("physical-device-path", "pid", "minor", "hotplug-status"):
        assert xen.read(be + "/" + node) is None, node


@pytest.mark.parametrize("kind", ["vbd", "vbd3"])
def test_add_serve_remove(xen, tmp_path, kind):
    path = vhd(tmp_path)
    be = xen.libxl_disk("vhd:" + path, kind=kind)
    # libxl 4.17 waits up to 10 s for InitWait before it runs the script
    wait_for(lambda: xen.state(be) == 2, timeout=10, what="InitWait before add")
    xen.hotplug("add", be)
    minor = assert_added(xen, be)
    (v,) = vbds(xen)
    assert v["minor"] == minor and v["params"] == "vhd:" + path
    r = xen.sim(be, "--verify", 1, "--indirect", "--discard")
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["writes"] > 100
    assert xen.state(be) == 6
    xen.hotplug("remove", be)
    assert_removed(xen, be)
    assert vbds(xen) == []
    run(os.path.join(BIN, "vhd-util"), "check", "-n", path)


def test_guest_sees_the_image_contents(xen, tmp_path):
    img = make_image(str(tmp_path / "raw.img"), 16 * MiB, pattern=ord("Q"))
    be = xen.libxl_disk("aio:" + img, kind="vbd3")
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    xen.hotplug("add", be)
    assert_added(xen, be)
    r = xen.sim(be, "--probe")
    assert r["sectors"] == 16 * MiB // 512 and r["read"] == 0 and r["write"] == 0
    xen.hotplug("remove", be)


def test_a_bare_path_is_served_raw(xen, tmp_path):
    img = make_image(str(tmp_path / "bare.img"), 8 * MiB)
    be = xen.libxl_disk(img)
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    xen.hotplug("add", be)
    assert_added(xen, be)
    assert vbds(xen)[0]["params"] == "aio:" + img
    xen.hotplug("remove", be)


def test_readonly_mode_opens_readonly(xen, tmp_path):
    img = make_image(str(tmp_path / "ro.img"), 8 * MiB, pattern=ord("R"))
    be = xen.libxl_disk("aio:" + img, mode="r")
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    xen.hotplug("add", be)
    assert_added(xen, be)
    r = xen.sim(be, "--probe")
    assert r["info"] & 4 and r["read"] == 0 and r["write"] == -1
    with open(img, "rb") as f:
        assert f.read(MiB) == b"R" * MiB
    xen.hotplug("remove", be)


def test_add_and_remove_twice_are_safe(xen, tmp_path):
    be = xen.libxl_disk("vhd:" + vhd(tmp_path))
    xen.hotplug("add", be)
    minor = assert_added(xen, be)
    err = xen.hotplug("add", be)
    assert "already added" in err
    assert assert_added(xen, be) == minor and len(vbds(xen)) == 1
    xen.hotplug("remove", be)
    assert xen.hotplug("remove", be).count("nothing to remove") == 1
    assert vbds(xen) == [] and xen.srv.proc.poll() is None


@pytest.mark.parametrize("params,why", [
    ("vhd:/nonexistent/disk.vhd", "tap-ctl create"),
    ("vhd:NOTAFILE", "tap-ctl create"),
    ("garbage", "is not TYPE:PATH"),
    ("", "is not TYPE:PATH"),
])
def test_a_failed_add_says_why_and_leaves_nothing(xen, params, why):
    be = xen.libxl_disk(params)
    xen.hotplug("add", be, expect_rc=1)
    assert why in xen.read(be + "/hotplug-error")
    assert xen.read(be + "/hotplug-status") == "error"
    assert xen.read(be + "/minor") is None and vbds(xen) == []


def test_a_vhd_that_is_corrupt_is_refused(xen, tmp_path):
    path = vhd(tmp_path)
    with open(path, "r+b") as f:          # the footer's cookie, at both ends
        f.write(b"garbage!")
        f.seek(-512, 2)
        f.write(b"garbage!")
    be = xen.libxl_disk("vhd:" + path)
    xen.hotplug("add", be, expect_rc=1)
    assert "tap-ctl create" in xen.read(be + "/hotplug-error")
    assert vbds(xen) == []


def test_no_server_is_a_clear_error(xen, tmp_path):
    be = xen.libxl_disk("vhd:" + vhd(tmp_path))
    e = dict(xen.env, XENBUS_PATH=be, TAPDISKD_STATE_DIR=str(tmp_path / "nowhere"),
             PATH=BIN + ":" + os.environ["PATH"])
    r = subprocess.run([BLOCK_TAP, "add"], env=e, capture_output=True, text=True,
                       timeout=60 * SLOW)
    assert r.returncode == 1
    assert "is tapdiskd running" in xen.read(be + "/hotplug-error")


def test_concurrent_adds_do_not_race(xen, tmp_path):
    n = 8
    bes = [xen.libxl_disk("vhd:" + vhd(tmp_path, "d%d.vhd" % i, 8), domid=10 + i)
           for i in range(n)]
    for be in bes:
        wait_for(lambda: xen.state(be) == 2, what="InitWait")

    def all_at_once(cmd):
        procs = [subprocess.Popen([BLOCK_TAP, cmd], stderr=subprocess.PIPE, text=True,
                                  env=dict(xen.env, XENBUS_PATH=be,
                                           TAPDISKD_STATE_DIR=xen.srv.state_dir,
                                           PATH=BIN + ":" + os.environ["PATH"]))
                 for be in bes]
        for p in procs:
            _, err = p.communicate(timeout=60 * SLOW)
            assert p.returncode == 0, err

    all_at_once("add")
    minors = sorted(assert_added(xen, be) for be in bes)
    assert minors == sorted({v["minor"] for v in vbds(xen)}) and len(minors) == n
    # each guest reaches its own disk
    r = xen.sim(bes[3], "--verify", 1, domid=13)
    assert r["errors"] == 0 and r["mismatches"] == 0
    mine, other = (int(xen.read(be + "/minor")) for be in bes[3:5])
    assert xen.srv.stats(mine)["ops"]["write"]["reqs"] > 0
    assert xen.srv.stats(other)["ops"]["write"]["reqs"] == 0
    all_at_once("remove")
    assert vbds(xen) == []


def test_remove_after_the_toolstack_removed_the_directory(xen, tmp_path):
    be = xen.libxl_disk("vhd:" + vhd(tmp_path))
    xen.hotplug("add", be)
    assert_added(xen, be)
    xen.detach(kind="vbd")
    wait_for(lambda: "backend directory removed" in xen.srv.log(), what="the device to go")
    xen.hotplug("remove", be)
    assert vbds(xen) == []


def test_remove_with_the_guest_still_connected(xen, tmp_path):
    be = xen.libxl_disk("vhd:" + vhd(tmp_path))
    xen.hotplug("add", be)
    minor = assert_added(xen, be)
    guest = xen.sim_bg(be, "--hold", 30, "--qd", 8)
    wait_for(lambda: xen.state(be) == 4, what="Connected")
    wait_for(lambda: xen.srv.stats(minor)["reqs_outstanding"] == 0, what="the guest's I/O")
    xen.hotplug("remove", be)
    # the vbd went, and the guest was told: Closing then Closed
    wait_for(lambda: xen.state(be) == 6, what="Closed")
    assert vbds(xen) == []
    guest.kill()
    guest.wait()


def test_block_tap_is_shellcheck_clean():
    run("shellcheck", "-s", "sh", BLOCK_TAP)
