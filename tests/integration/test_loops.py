"""Many loops (--loops N): where vbds go, what crosses from one loop to
another (control commands, stats, shared-listener connections, blkif rings)
and that each still behaves as with one loop. The servers here run 3 loops
on purpose (more than this machine's cores)."""
import os
import signal
import subprocess
import threading

import nbd
import pytest

from conftest import BIN, ControlError, make_image, run, validate

MiB = 1 << 20


def loops_of(srv):
    return {v["minor"]: v["loop"] for v in srv.call("list")["result"]["vbds"] if "loop" in v}


def three(make_server, *extra):
    return make_server(extra=["--loops", "3"] + list(extra))


def test_placement_fewest_vbds_lowest_index_and_pinning(make_server):
    srv = three(make_server)
    assert srv.call("version")["result"]["loops"] == 3
    for _ in range(6):
        srv.open("ram:1M")
    assert loops_of(srv) == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2}
    srv.call("destroy", minor=4)
    srv.call("destroy", minor=1)
    assert srv.open("ram:1M")["minor"] == 1 and loops_of(srv)[1] == 1   # loop 1 has fewest
    # pinned by tap-ctl, shown by list --json and stats
    out = srv.tapctl("create", "-a", "ram:1M", "--loop", "2")
    minor = int(out.stdout.strip().rsplit(".", 1)[1])
    assert loops_of(srv)[minor] == 2
    st = srv.stats(minor)
    validate(st, "vbd-stats.json")
    assert st["loop"] == 2
    with pytest.raises(ControlError) as e:
        srv.open("ram:1M", loop=3)
    assert e.value.code == "EINVAL" and "loops 0..2" in e.value.message


def test_default_is_one_loop_per_cpu(make_server):
    srv = make_server(loops=None)
    assert srv.call("version")["result"]["loops"] == min(os.cpu_count(), 16)


@pytest.mark.parametrize("bad", ["0", "17", "x"])
def test_bad_loops_option_is_one_line(tmp_path, bad):
    r = subprocess.run([os.path.join(BIN, "tapdiskd"), "--state-dir", str(tmp_path),
                        "--foreground", "--loops", bad], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    assert r.stderr.strip() == "tapdiskd: --loops must be 1 to 16"


def test_qos_group_members_share_the_groups_loop(make_server):
    srv = three(make_server)
    a = srv.open("ram:1M", loop=1, qos={"group": "g", "iops_total": 1000})["minor"]
    # a member opened with the group goes to the group's loop, whatever is least loaded
    b = srv.open("ram:1M", qos={"group": "g"})["minor"]
    assert loops_of(srv)[a] == 1 and loops_of(srv)[b] == 1
    with pytest.raises(ControlError) as e:
        srv.open("ram:1M", loop=2, qos={"group": "g"})
    assert e.value.code == "EXDEV" and "lives on loop 1, not 2" in e.value.message
    c = srv.open("ram:1M", loop=0)["minor"]
    with pytest.raises(ControlError) as e:
        srv.call("qos-set", minor=c, limits={"group": "g"})
    assert e.value.code == "EXDEV"
    assert "qos group g lives on loop 1 and minor %d on loop 0" % c in e.value.message
    # group commands run on the group's loop
    g = srv.call("qos-set", group="g", limits={"iops_total": 2000})["result"]
    assert sorted(x["minor"] for x in g["members"]) == [a, b]
    assert srv.call("qos-get", group="g")["result"]["limits"]["iops_total"] == 2000
    # the members still serve
    for m in (a, b):
        h = nbd.NBD()
        h.connect_unix(srv.nbd_path(m))
        h.pwrite(b"q" * 4096, 0)
        assert h.pread(4096, 0) == b"q" * 4096
        h.shutdown()


def test_shared_listener_hands_each_connection_to_its_exports_loop(make_server, tmp_path):
    sock = str(tmp_path / "all.sock")
    srv = three(make_server, "--nbd-listen", "unix:" + sock)
    imgs = []
    for i in range(3):
        img = str(tmp_path / ("d%d.img" % i))
        make_image(img, 8 * MiB, pattern=0x41 + i)
        imgs.append(img)
        srv.open("aio:" + img)
    assert loops_of(srv) == {0: 0, 1: 1, 2: 2}
    # qemu-img reads each export through the shared socket (with its meta context)
    for m, img in enumerate(imgs):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", img,
            "nbd+unix:///%d?socket=%s" % (m, sock))
        out = run("qemu-img", "map", "--output=json", "-f", "raw",
                  "nbd+unix:///%d?socket=%s" % (m, sock)).stdout
        assert '"data": true' in out
    # writes through the shared socket land on the vbd that lives elsewhere
    hs = []
    for m in range(3):
        h = nbd.NBD()
        h.set_export_name(str(m))
        h.connect_unix(sock)
        hs.append(h)
        assert srv.stats(m)["frontends"]["nbd"] == 1
    for m, h in enumerate(hs):
        h.pwrite(bytes([0x61 + m]) * 65536, MiB, nbd.CMD_FLAG_FUA)
    for m, h in enumerate(hs):
        h.shutdown()
        direct = nbd.NBD()
        direct.connect_unix(srv.nbd_path(m))
        assert direct.pread(65536, MiB) == bytes([0x61 + m]) * 65536
        assert direct.pread(4096, 0) == bytes([0x41 + m]) * 4096
        direct.shutdown()
    # nbdinfo --list: one connection, every loop's exports listed, each then opened
    out = run("nbdinfo", "--list", "--json", "nbd+unix:///?socket=" + sock).stdout
    assert out.count('"export-size": 8388608') == 3
    # an unknown export is refused on the loop that has it (none)
    h = nbd.NBD()
    h.set_export_name("9")
    with pytest.raises(nbd.Error):
        h.connect_unix(sock)


def test_stats_are_gathered_from_every_loop_and_reset_exactly(make_server):
    srv = three(make_server)
    ms = [srv.open("ram:4M")["minor"] for _ in range(3)]
    for m in ms:
        h = nbd.NBD()
        h.connect_unix(srv.nbd_path(m))
        for i in range(10 + m):
            h.pwrite(b"s" * 4096, i * 4096)
        h.shutdown()
    r = srv.call("stats", reset=True)["result"]
    validate(r, "stats.result.json")
    got = {v["minor"]: (v["loop"], v["ops"]["write"]["reqs"]) for v in r["vbds"]}
    assert got == {0: (0, 10), 1: (1, 11), 2: (2, 12)}
    r = srv.call("stats")["result"]
    assert [v["ops"]["write"]["reqs"] for v in r["vbds"]] == [0, 0, 0]


def test_stats_reset_loses_no_request_under_load_on_every_loop(make_server, tmp_path):
    """fio writes to three vbds on three loops while stats --reset runs in a
    loop: the sum of the reset snapshots and the final one is fio's count."""
    srv = three(make_server)
    ms = [srv.open("ram:64M")["minor"] for _ in range(3)]
    fio = subprocess.Popen(["fio", "--output-format=json"] + sum(
        [["--name=j%d" % m, "--ioengine=nbd", "--uri=" + srv.uri(m), "--rw=randwrite",
          "--bs=4k", "--iodepth=8", "--size=16M", "--number_ios=3000"] for m in ms], []),
        stdout=subprocess.PIPE, text=True)
    totals = {m: 0 for m in ms}
    while fio.poll() is None:
        for v in srv.call("stats", reset=True)["result"]["vbds"]:
            totals[v["minor"]] += v["ops"]["write"]["reqs"]
    fio.communicate(timeout=120)
    assert fio.returncode == 0
    for v in srv.call("stats")["result"]["vbds"]:
        totals[v["minor"]] += v["ops"]["write"]["reqs"]
    assert totals == {m: 3000 for m in ms}


def test_blkif_rings_live_on_their_vbds_loops(tmp_path):
    from xen_harness import Xen
    x = Xen(tmp_path, extra=["--loops", "3"])
    try:
        ms = [x.srv.open("ram:64M")["minor"] for _ in range(3)]
        assert loops_of(x.srv) == {0: 0, 1: 1, 2: 2}
        bes = [x.attach(m, domid=1 + i, devid=51712) for i, m in enumerate(ms)]
        guests = [x.sim_bg(be, "--verify", 2, "--queues", 2, "--indirect", "--region-mb", 32,
                           domid=1 + i) for i, be in enumerate(bes)]
        for g in guests:
            out, err = g.communicate(timeout=120)
            assert g.returncode == 0, err
            assert '"mismatches": 0' in out and '"errors": 0' in out
        for m, be in zip(ms, bes):
            st = x.srv.stats(m)
            assert st["loop"] == m and st["xenbus"]["path"] == be
            assert st["ops"]["write"]["reqs"] > 100
        # a vbd closed under its guest on loop 2: the device goes Closed from loop 0
        be = x.attach(ms[2], domid=9)
        guest = x.sim_bg(be, "--hold", 5, "--qd", 4, domid=9)
        from conftest import wait_for
        wait_for(lambda: x.state(be) == 4, what="Connected")
        x.srv.call("close", minor=ms[2], force=True)
        wait_for(lambda: x.state(be) == 6, what="Closed after the vbd went")
        guest.kill()
        guest.wait()
    finally:
        x.close()


def test_sigterm_drains_every_loop(make_server, tmp_path):
    srv = three(make_server)
    ms = []
    for i in range(3):
        img = str(tmp_path / ("d%d.img" % i))
        make_image(img, 32 * MiB)
        ms.append(srv.open("aio:" + img)["minor"])
    fio = subprocess.Popen(["fio"] + sum(
        [["--name=j%d" % m, "--ioengine=nbd", "--uri=" + srv.uri(m), "--rw=randwrite",
          "--bs=64k", "--iodepth=16", "--size=32M", "--time_based", "--runtime=30"]
         for m in ms], []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = threading.Event()
    threading.Timer(1.5, done.set).start()
    done.wait()
    assert srv.stop(signal.SIGTERM) == 0
    fio.kill()
    fio.wait()
    log = srv.log()
    for m in ms:
        assert "minor %d: closed" % m in log
    assert "stopped" in log
    srv.assert_clean_log()
