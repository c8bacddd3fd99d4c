"""QoS: per-vbd limits, bursts, groups by weight, fairness between the
frontends of one vbd, runtime changes. Rates are measured by fio (its nbd
engine) over the vbds' NBD sockets, and by the server's own counters.

The rate figures come from one fio run of ten jobs on nine vbds at once
(about 10 s), shared by the tests marked `timing`; the second engine's pass
and the sanitizer pass leave those out (scripts/check): they measure
scheduling, not memory safety, and a slowed server would only blur them.
"""

import glob
import json
import os
import subprocess
import threading
import time

import pytest

from conftest import BIN, SLOW, Server, run, validate, wait_for

pytestmark = pytest.mark.engine_independent

MiB = 1 << 20
RUNTIME = 10


def uri(srv, minor):
    return "nbd+unix:///?socket=" + srv.nbd_path(minor)


def full_image(path, size=32 * MiB):
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)
    return str(path)


def fio_json(*args, timeout=120):
    r = run("fio", "--output-format=json", *args, timeout=timeout)
    return json.loads(r.stdout[r.stdout.index("{"):])


def qos(srv, minor, **limits):
    return srv.call("qos-set", minor=minor, limits=limits)["result"]


# ---- settings ----

def test_settings_round_trip_through_tap_ctl_and_schema(server, tmp_path):
    img = full_image(tmp_path / "a.img", 4 * MiB)
    out = server.tapctl("create", "-a", "aio:" + img, "--qos",
                        "iops_total=500,bps_read=20M,bps_read_max=40M,bps_read_max_length=3")
    m = 0
    assert out.stdout.strip() == server.nbd_path(m)
    got = server.call("qos-get", minor=m)
    validate(got["result"], "qos-get.result.json")
    lim = got["result"]["limits"]
    assert lim["iops_total"] == 500 and lim["bps_read"] == 20 * MiB
    assert lim["bps_read_max"] == 40 * MiB and lim["bps_read_max_length"] == 3
    assert lim["iops_write"] == 0 and got["result"]["group"] is None
    # settings merge: only what is named changes
    r = server.tapctl("qos", "-m", m, "iops_write=100", "group=gold", "weight=3").stdout
    assert "minor=0 group=gold weight=3" in r
    assert "iops_total=500" in r and "iops_write=100" in r and "bps_read=20971520" in r
    g = server.call("qos-set", group="gold", limits={"iops_total": 1000})["result"]
    validate(g, "qos-set.result.json")
    assert g["members"] == [{"minor": 0, "weight": 3, "queue_depth": 0}]
    assert "members: 0(weight 3)" in server.tapctl("qos", "-g", "gold").stdout
    # leaving the group; the group keeps its limits while it has any
    server.tapctl("qos", "-m", m, "group=")
    assert server.call("qos-get", minor=m)["result"]["group"] is None
    assert server.call("qos-get", group="gold")["result"]["members"] == []
    server.call("qos-set", group="gold", limits={"iops_total": 0})
    code = server.call("qos-get", group="gold", check=False)["error"]["code"]
    assert code == "ENOENT"
    st = server.stats(m)
    validate(st, "vbd-stats.json")
    assert set(st["qos"]) == {"throttled", "queued_us_total", "queued_us_max", "queue_depth"}


@pytest.mark.parametrize("setting, says", [
    ("iops_totl=5", "iops_totl: no such QoS limit"),
    ("iops_total_max=100", "iops_total_max (100) is below iops_total (500)"),
    ("bps_write_max=100", "bps_write_max needs bps_write"),
    ("iops_read_max_length=4000", "iops_read_max_length: at most 3600"),
    ("weight=0", "weight: must be an integer from 1 to 1000"),
    ("weight=1001", "weight: must be an integer from 1 to 1000"),
    ("group=no spaces", "group: a name of 1 to 64"),
    ("bps_total=2000T", "bps_total: must be an integer from 0"),
])
def test_bad_settings_name_the_field_and_keep_the_old_ones(server, setting, says):
    m = server.open("ram:16M", qos={"iops_total": 500})["minor"]
    before = server.call("qos-get", minor=m)["result"]
    r = server.tapctl("qos", "-m", m, setting, check=False)
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert server.call("qos-get", minor=m)["result"] == before


def test_bad_settings_at_open_open_nothing(server):
    resp = server.call("open", check=False, params="ram:16M", qos={"iops_total": -1})
    assert resp["error"]["code"] == "EINVAL" and "iops_total" in resp["error"]["message"]
    assert server.call("list")["result"]["vbds"] == []
    r = server.tapctl("create", "-a", "ram:16M", "--qos", "bps=1", check=False)
    assert r.returncode == 1 and "bps: no such QoS limit" in r.stderr
    r = server.tapctl("qos", "-m", "0", "-g", "x", check=False)
    assert r.returncode == 2
    code = server.call("qos-get", check=False)["error"]["code"]
    assert code == "EINVAL"


# ---- requests under changing limits ----

@pytest.mark.engine
def test_changes_pause_and_group_moves_never_fail_a_request(server, tmp_path):
    """fio writes and verifies every block while limits change under it, the
    vbd moves between groups, is paused with requests waiting, and ends
    unlimited: no request fails, every byte reads back."""
    img = full_image(tmp_path / "a.img", 16 * MiB)
    # a group made by qos-set lives on loop 0, and its members with it
    m = server.open("aio:" + img, qos={"iops_total": 800}, loop=0)["minor"]
    server.call("qos-set", group="g", limits={"iops_total": 600})
    steps = [
        lambda: qos(server, m, iops_total=300, bps_total=4 * MiB),
        lambda: qos(server, m, group="g", weight=2),
        lambda: server.call("pause", minor=m),
        lambda: server.call("unpause", minor=m),
        lambda: server.call("qos-set", group="g", limits={"iops_total": 2000}),
        lambda: qos(server, m, iops_total=0, bps_total=0, iops_write=1000,
                    iops_write_max=3000, iops_write_max_length=1),
        lambda: qos(server, m, group=""),
        lambda: qos(server, m, iops_write=0, iops_write_max=0),
    ]
    errors = []

    def changer():
        try:
            for step in steps:
                time.sleep(0.4)
                step()
        except Exception as e:          # noqa: BLE001 (reported below)
            errors.append(e)

    t = threading.Thread(target=changer)
    t.start()
    res = fio_json("--name=v", "--ioengine=nbd", "--uri=" + uri(server, m), "--rw=randwrite",
                   "--bs=4k", "--iodepth=32", "--size=8M", "--verify=crc32c",
                   "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", timeout=180)
    t.join()
    assert not errors, errors
    job = res["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == 2048 and job["read"]["total_ios"] == 2048
    st = server.stats(m)
    assert st["qos"]["throttled"] > 0 and st["qos"]["queue_depth"] == 0
    assert st["ops"]["write"]["errors"] == 0 and st["ops"]["read"]["errors"] == 0


@pytest.mark.engine
def test_closing_a_vbd_fails_its_waiting_requests_and_nothing_else(server, tmp_path):
    slow = server.open("ram:16M", qos={"iops_total": 5})["minor"]
    other = server.open("ram:16M")["minor"]
    p = subprocess.Popen(["fio", "--name=s", "--ioengine=nbd", "--uri=" + uri(server, slow),
                          "--rw=randread", "--bs=4k", "--iodepth=16", "--runtime=60",
                          "--time_based", "--size=16M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: server.stats(slow)["qos"]["queue_depth"] >= 8, timeout=20 * SLOW,
             what="requests waiting on the limit")
    server.tapctl("close", "-m", slow)
    p.communicate(timeout=60 * SLOW)
    assert p.returncode != 0                   # the client saw its disk go
    r = run("qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "-c", "read -P 7 0 1M",
            "nbd+unix:///?socket=" + server.nbd_path(other))
    assert "read 1048576/1048576" in r.stdout
    server.tapctl("destroy", "-m", slow)
    assert server.proc.poll() is None


# ---- rates, measured (one shared fio run) ----

JOBS = {
    # name: (vbd, qos settings, fio options)
    "qd1-data": ("data1", {"iops_total": 500}, ["--rw=randread", "--iodepth=1"]),
    "qd32-data": ("data32", {"iops_total": 500}, ["--rw=randread", "--iodepth=32"]),
    "qd1-holes": ("holes1", {"iops_total": 500}, ["--rw=randread", "--iodepth=1"]),
    "qd32-holes": ("holes32", {"iops_total": 500}, ["--rw=randread", "--iodepth=32"]),
    "bps": ("bps", {"bps_total": 20 * MiB}, ["--rw=randwrite", "--bs=64k", "--iodepth=8"]),
    "burst": ("burst", {"iops_total": 500, "iops_total_max": 2000, "iops_total_max_length": 2},
              ["--rw=randread", "--iodepth=32", "--write_iops_log=BURST", "--log_avg_msec=1000"]),
    "weight1": ("w1", {"group": "tenants", "weight": 1}, ["--rw=randread", "--iodepth=32"]),
    "weight3": ("w3", {"group": "tenants", "weight": 3}, ["--rw=randread", "--iodepth=32"]),
    "fair-qd32": ("fair", {"iops_total": 500}, ["--rw=randread", "--iodepth=32"]),
    "fair-qd1": ("fair", {"iops_total": 500}, ["--rw=randread", "--iodepth=1"]),
}


@pytest.fixture(scope="module")
def rates(tmp_path_factory):
    """Runs every job of JOBS at once for RUNTIME s; returns name -> fio job result."""
    tmp = tmp_path_factory.mktemp("qos")
    srv = Server(tmp / "state").start()
    try:
        minors = {}
        for vbd in sorted({v for v, _, _ in JOBS.values()}):
            if vbd.startswith("holes"):
                path = str(tmp / (vbd + ".vhd"))
                run(os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", "32")
                params = "vhd:" + path
            else:
                params = "aio:" + full_image(tmp / (vbd + ".img"))
            minors[vbd] = srv.open(params, loop=0)["minor"]    # the group's loop
        srv.call("qos-set", group="tenants", limits={"iops_total": 1000})
        for vbd, limits, _ in JOBS.values():
            srv.call("qos-set", minor=minors[vbd], limits=limits)
        args = ["--ioengine=nbd", "--bs=4k", "--size=32M", "--time_based",
                "--runtime=%d" % RUNTIME, "--randrepeat=0"]
        for name, (vbd, _, opts) in JOBS.items():
            opts = [o.replace("BURST", str(tmp / "burst")) for o in opts]
            args += ["--name=" + name, "--uri=" + uri(srv, minors[vbd])] + opts
        res = fio_json(*args, timeout=RUNTIME + 120)
        out = {j["jobname"]: j for j in res["jobs"]}
        log, = glob.glob(str(tmp / "burst_iops.*.log"))
        out["burst-log"] = [int(line.split(",")[1]) for line in open(log) if line.strip()]
        out["stats"] = {vbd: srv.stats(m) for vbd, m in minors.items()}
        yield out
    finally:
        srv.stop()
        srv.assert_clean_log()


def iops(job):
    return job["read"]["iops"] + job["write"]["iops"]


timing = pytest.mark.timing


@timing
@pytest.mark.parametrize("name", ["qd1-data", "qd32-data", "qd1-holes", "qd32-holes"])
def test_iops_limit_holds_for_data_and_holes(rates, name):
    job = rates[name]
    assert job["error"] == 0
    assert 450 <= iops(job) <= 550, "%s: %.0f IOPS under a 500 limit" % (name, iops(job))


@timing
def test_holes_are_counted_like_data(rates):
    """qemu's throttle lets reads of unallocated ranges through; ours counts them."""
    st = rates["stats"]["holes32"]
    assert st["qos"]["throttled"] > 1000
    assert st["ops"]["read"]["reqs"] <= 1.1 * 500 * RUNTIME


@timing
def test_bandwidth_limit_holds(rates):
    bw = rates["bps"]["write"]["bw_bytes"]
    assert 0.9 * 20 * MiB <= bw <= 1.1 * 20 * MiB, "%.1f MiB/s under 20" % (bw / MiB)


@timing
def test_burst_then_back_to_the_limit(rates):
    per_sec = rates["burst-log"]
    assert len(per_sec) >= RUNTIME - 1, per_sec
    first2 = sum(per_sec[:2]) / 2
    later = per_sec[3:RUNTIME]
    assert 1800 <= first2 <= 2400, "IOPS per second: %s" % per_sec
    # the limit holds over the seven seconds; one second alone may be off by
    # more than 10% when fio or the server is held up across a sample's edge
    # on a loaded machine (a CI run saw this once): the bucket lets the
    # delayed requests through in the next second, as a leaky bucket should
    assert 450 <= sum(later) / len(later) <= 550, "IOPS per second: %s" % per_sec
    # and the burst does not come back: 2000 IOPS is twice this bound
    assert all(250 <= x <= 1000 for x in later), "IOPS per second: %s" % per_sec


@timing
def test_group_weights_share_the_group_limit(rates):
    w1, w3 = iops(rates["weight1"]), iops(rates["weight3"])
    assert 900 <= w1 + w3 <= 1100, (w1, w3)
    share = w1 / (w1 + w3)
    assert 0.20 <= share <= 0.30, "weight 1 got %.0f%% (want 25%%)" % (100 * share)


@timing
def test_clients_of_one_vbd_share_it_fairly(rates):
    deep, shallow = iops(rates["fair-qd32"]), iops(rates["fair-qd1"])
    assert 450 <= deep + shallow <= 550
    share = shallow / (deep + shallow)
    # fair is 50%; without fair queueing the QD1 client would get 1/33 (3%).
    # A QD1 client also needs a round trip under 4 ms for its 250/s, which a
    # loaded machine does not always give it (a CI run measured 39.9%)
    assert 0.33 <= share <= 0.67, "the QD1 client got %.0f%% (want 50%%)" % (100 * share)


@timing
def test_runtime_change_takes_effect_within_a_second(server, tmp_path):
    m = server.open("aio:" + full_image(tmp_path / "a.img"), qos={"iops_total": 500})["minor"]
    p = subprocess.Popen(["fio", "--name=c", "--ioengine=nbd", "--uri=" + uri(server, m),
                          "--rw=randread", "--bs=4k", "--iodepth=16", "--runtime=5",
                          "--time_based", "--size=32M", "--output-format=json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []                        # (time, reads done)
    changed = None
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 4.5:
        # stamped at the call's midpoint: a slow stats call skews less
        before = time.monotonic()
        reads = server.stats(m)["ops"]["read"]["reqs"]
        samples.append(((before + time.monotonic()) / 2, reads))
        if changed is None and time.monotonic() - t0 > 2:
            qos(server, m, iops_total=1500)
            changed = time.monotonic()
        time.sleep(0.05)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert json.loads(out[out.index("{"):])["jobs"][0]["error"] == 0

    def rate(t_from, t_to):
        a = [s for s in samples if s[0] >= t_from][0]
        b = [s for s in samples if s[0] <= t_to][-1]
        return (b[1] - a[1]) / (b[0] - a[0])

    assert 400 <= rate(t0 + 0.5, changed) <= 600
    # 1 s after the change, the next second already runs at the new limit
    # (a 0.5 s window was off by 6% once on a loaded machine: its edges)
    assert 1300 <= rate(changed + 1.0, changed + 2.0) <= 1700
