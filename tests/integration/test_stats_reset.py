"""`stats reset=true`: the reply is the stats as they were, and every
counter then starts again from zero in the same loop turn, so that the
counts of successive reset-reads add up to exactly what the clients did.
Gauges (requests in flight or queued, frontends) are left alone."""

import json
import os
import subprocess
import time

import pytest

from conftest import BIN, SLOW, make_image, run, validate, wait_for
from xen_harness import ram, xen  # noqa: F401 (xen: fixture)

# the second engine's pass skips these (see pytest.ini)
pytestmark = pytest.mark.engine_independent

OPS = ("read", "write", "flush", "discard", "write_zeroes", "block_status", "cache")


def counters(st):
    """Every cumulative counter of one vbd's stats, by a name."""
    out = {"secs": st["secs"]}
    for op in OPS:
        o = st["ops"][op]
        lat = o["latency_us"]
        out[op] = [o["reqs"], o["bytes"], o["errors"], lat["count"], lat["sum"], lat["max"],
                   lat["p99"], lat["buckets"]]
    for i, img in enumerate(st["images"]):
        out["image%d" % i] = [img["hits"], img["fail"]]
    if "xenbus" in st:
        x = st["xenbus"]
        out["xenbus"] = [x["reqs"], x["kicks"], x["errors"]]
        for i, r in enumerate(x["rings"]):
            out["ring%d" % i] = [r["reqs"], r["kicks"], r["errors"], r["indirect"],
                                 r["barriers"], r["flushes"], r["discards"], r["max_segments"]]
    return out


def is_zero(v):
    if isinstance(v, list):
        return all(is_zero(x) for x in v)
    if isinstance(v, dict):
        return all(is_zero(x) for x in v.values())
    return v == 0


def gauges(st):
    return {"outstanding": st["reqs_outstanding"], "queued": st["reqs_queued"],
            "frontends": st["frontends"], "inflight": [st["ops"][op]["inflight"] for op in OPS]}


def qemu_io(uri, *cmds, background=False):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(uri)
    if background:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    return run(*args)


def test_reset_replies_then_zeroes_counters_not_gauges(server):
    m = server.open("ram:64M")["minor"]
    qemu_io(server.uri(m), "write -P 7 0 1M", "read -P 7 0 1M", "write 2M 64k")
    server.call("pause", minor=m)
    # requests sent to a paused vbd wait in its queue: a gauge that is not zero
    client = qemu_io(server.uri(m), *["aio_write -q %d 4k" % (i * 4096) for i in range(8)],
                     "aio_flush", background=True)
    wait_for(lambda: server.stats(m)["reqs_queued"] >= 8, what="8 queued requests")

    before = server.call("stats", minor=m, reset=True)["result"]
    assert before["ops"]["write"]["reqs"] == 2 and before["ops"]["read"]["reqs"] == 1
    assert before["ops"]["write"]["bytes"] == (1 << 20) + (64 << 10)
    assert before["secs"] == [2048, 2048 + 128]
    assert before["images"][0]["hits"][0] >= 1
    assert before["ops"]["write"]["latency_us"]["buckets"]

    after = server.stats(m)
    assert is_zero(counters(after)), counters(after)
    assert gauges(after) == gauges(before)
    assert after["reqs_queued"] >= 8 and after["frontends"]["nbd"] == 1
    assert after["ops"]["write"]["latency_us"]["buckets"] == []

    # the queued writes finish after the reset: counted once, after it
    server.call("unpause", minor=m)
    assert client.wait(30 * SLOW) == 0, client.stderr.read()
    wait_for(lambda: server.stats(m)["ops"]["write"]["reqs"] == 8, what="8 writes counted")
    st = server.stats(m)
    assert st["ops"]["write"]["latency_us"]["count"] == 8 and st["secs"] == [0, 64]
    assert st["ops"]["write"]["inflight"] == 0 and st["reqs_queued"] == 0


def test_reset_all_vbds(server):
    minors = [server.open("ram:16M")["minor"] for _ in range(3)]
    for m in minors:
        qemu_io(server.uri(m), "write 0 %dk" % (4 * (m + 1)))
    before = server.call("stats", reset=True)["result"]["vbds"]
    assert [v["minor"] for v in before] == minors
    for v in before:
        assert v["ops"]["write"]["bytes"] == 4096 * (v["minor"] + 1)
    for v in server.call("stats")["result"]["vbds"]:
        assert is_zero(counters(v)), counters(v)


def test_reset_reads_add_up_under_load(server):
    """qemu-io sends exactly N writes (plus one flush) while stats are read and
    reset over and over, per vbd and for all: the reads add up to N, each
    write counted once in reqs, bytes, sectors, histogram and image hits."""
    n = 20000
    m = server.open("ram:64M")["minor"]
    other = server.open("ram:1M")["minor"]
    client = qemu_io(server.uri(m), *["aio_write -q %d 4k" % ((i * 4096) % (64 << 20))
                                      for i in range(n)], "aio_flush", background=True)
    total = {"reqs": 0, "bytes": 0, "count": 0, "secs": 0, "hits": 0, "flush": 0}
    busy_reads = 0

    def take(all_vbds):
        if all_vbds:
            vbds = server.call("stats", reset=True)["result"]["vbds"]
            st = next(v for v in vbds if v["minor"] == m)
            assert any(v["minor"] == other for v in vbds)
        else:
            st = server.call("stats", minor=m, reset=True)["result"]
        w = st["ops"]["write"]
        total["reqs"] += w["reqs"]
        total["bytes"] += w["bytes"]
        total["count"] += w["latency_us"]["count"]
        total["secs"] += st["secs"][1]
        total["hits"] += st["images"][0]["hits"][1]
        total["flush"] += st["ops"]["flush"]["reqs"]
        return w["reqs"]

    i = 0
    while client.poll() is None:
        if 0 < take(i % 2) < n:
            busy_reads += 1
        i += 1
    assert client.returncode == 0, client.stderr.read()
    take(False)
    assert busy_reads >= 3, "the writes did not overlap the reset-reads"
    assert total == {"reqs": n, "bytes": n * 4096, "count": n, "secs": n * 8,
                     "hits": n + total["flush"], "flush": total["flush"]}
    assert total["flush"] >= 1


def test_tapctl_stats_reset(server):
    a = server.open("ram:16M")["minor"]
    b = server.open("ram:16M")["minor"]
    for m in (a, b):
        qemu_io(server.uri(m), "write 0 8k")
    st = json.loads(server.tapctl("stats", "-m", a, "--reset").stdout)
    validate(st, "vbd-stats.json")
    assert st["ops"]["write"]["reqs"] == 1
    assert json.loads(server.tapctl("stats", "-m", a).stdout)["ops"]["write"]["reqs"] == 0
    assert json.loads(server.tapctl("stats", "-m", b).stdout)["ops"]["write"]["reqs"] == 1

    both = json.loads(server.tapctl("stats", "-r").stdout)
    validate(both, "stats.result.json")
    assert [v["ops"]["write"]["reqs"] for v in both["vbds"]] == [0, 1]
    both = json.loads(server.tapctl("stats").stdout)
    assert [v["ops"]["write"]["reqs"] for v in both["vbds"]] == [0, 0]

    raw = json.loads(server.tapctl("--json", "stats", "-m", b, "-r").stdout)
    validate(raw, "response.json")
    r = server.tapctl("stats", "--reset=yes", check=False)
    assert r.returncode == 2 and "usage: tap-ctl stats" in r.stderr


@pytest.mark.parametrize("bad", ["yes", 1, None, [True]])
def test_reset_must_be_a_boolean(server, bad):
    m = server.open("ram:1M")["minor"]
    resp = server.call("stats", check=False, minor=m, reset=bad)
    assert resp["ok"] is False and resp["error"]["code"] == "EINVAL"
    assert "'reset'" in resp["error"]["message"] and "must be" in resp["error"]["message"]


@pytest.mark.engine
def test_inflight_requests_survive_a_reset(stuck_disk, server):
    """Requests in the kernel at the reset stay in flight (a gauge) and are
    counted, once, when they complete."""
    m = server.open("aio:" + stuck_disk.path)["minor"]
    qemu_io(server.uri(m), "write 0 4k")
    stuck_disk.freeze()
    client = qemu_io(server.uri(m), *["aio_write -q %d 4k" % (i * 8192) for i in range(4)],
                     background=True)
    wait_for(lambda: server.stats(m)["reqs_outstanding"] == 4, what="4 writes in flight")
    before = server.call("stats", minor=m, reset=True)["result"]
    assert before["ops"]["write"]["reqs"] == 1
    after = server.stats(m)
    assert is_zero(counters(after)) and gauges(after) == gauges(before)
    assert after["ops"]["write"]["inflight"] == 4
    stuck_disk.thaw()
    assert client.wait(30 * SLOW) == 0, client.stderr.read()
    st = server.stats(m)
    assert st["ops"]["write"]["reqs"] == 4 and st["ops"]["write"]["inflight"] == 0
    assert st["reqs_outstanding"] == 0


@pytest.mark.engine
def test_shared_parent_reset_is_per_vbd(server, tmp_path):
    """A parent shared by two chains is one image: resetting one vbd's stats
    must not zero what the other reports for it, and a live snapshot (a new
    chain over the same parent) keeps the reset."""
    vhdutil = os.path.join(BIN, "vhd-util")
    base = str(tmp_path / "gold.vhd")
    run(vhdutil, "create", "-n", base, "-s", "8")
    kids = []
    for k in range(2):
        kid = str(tmp_path / ("kid%d.vhd" % k))
        run(vhdutil, "snapshot", "-n", kid, "-p", base)
        kids.append(server.open("vhd:" + kid, loop=0)["minor"])   # shared on one loop
    for m in kids:
        qemu_io(server.uri(m), "read 0 64k", "read 1M 64k")   # unallocated: the parent
    a, b = (server.stats(m)["images"][1]["hits"][0] for m in kids)
    assert a == b and a >= 4        # the parent's count, both vbds' reads

    server.call("stats", minor=kids[0], reset=True)
    assert server.stats(kids[0])["images"][1]["hits"] == [0, 0]
    assert server.stats(kids[1])["images"][1]["hits"][0] == b
    qemu_io(server.uri(kids[1]), "read 2M 64k")
    assert server.stats(kids[0])["images"][1]["hits"][0] >= 1      # the other's read
    grown = server.stats(kids[1])["images"][1]["hits"][0]
    assert grown > b

    # snapshot: kid0 becomes the parent of a new leaf; gold stays open (kid1)
    server.call("stats", minor=kids[0], reset=True)
    server.call("snapshot", minor=kids[0], path=str(tmp_path / "kid0-2.vhd"))
    st = server.stats(kids[0])
    assert st["images"][2]["name"].endswith("gold.vhd")
    assert st["images"][2]["hits"] == [0, 0], st["images"]
    assert server.stats(kids[1])["images"][1]["hits"][0] == grown


def test_reset_zeroes_blkif_counters(xen):
    """A guest's rings: its requests and kicks are counters, reset with the
    vbd's; the requests it has queued in the paused vbd are a gauge."""
    m = ram(xen, "64M")
    be = xen.attach(m)
    wait_for(lambda: xen.state(be) == 2, what="InitWait")
    xen.srv.call("pause", minor=m)
    guest = xen.sim_bg(be, "--verify", 1, "--order", 2, "--queues", 2, "--region-mb", 16,
                       "--max-sectors", 8, "--patience", 60 * SLOW)
    seen = []

    def rings_full():
        # the guest stops sending once its rings are full: no counter moves then
        seen.append(xen.srv.stats(m)["reqs_queued"])
        time.sleep(0.2)
        return len(seen) > 2 and seen[-1] >= 100 and seen[-1] == seen[-3]

    wait_for(rings_full, timeout=30, what="the guest's rings full of queued requests")
    before = xen.srv.call("stats", minor=m, reset=True)["result"]
    assert before["xenbus"]["reqs"][0] >= 100 and before["xenbus"]["kicks"][0] > 0
    after = xen.srv.stats(m)
    assert is_zero(counters(after)), counters(after)
    assert after["reqs_queued"] == before["reqs_queued"]
    assert after["xenbus"]["rings"] and after["xenbus"]["state"] == before["xenbus"]["state"]
    xen.srv.call("unpause", minor=m)
    out, err = guest.communicate(timeout=120 * SLOW)
    assert guest.returncode == 0, err
    st = xen.srv.stats(m)
    # everything queued at the reset was answered after it
    assert st["xenbus"]["reqs"][1] >= before["reqs_queued"]
    # (the guest's flushes are among them: once its run time is over while the
    # vbd is paused, nothing but the queued requests comes after the reset)
    assert sum(st["ops"][op]["reqs"] for op in OPS) >= before["reqs_queued"]
