"""Nothing lost on power loss (issue 16): each workload runs once on a
server recording its file I/O (--record-io); then every crash state the
recording allows (crash_replay.py) is written to the image files and
checked: the format's own checker finds no corruption (qcow2 leaks are
allowed: they waste space, never data), the image opens in tapdiskd, every
write acknowledged before the last acknowledged flush (and every
acknowledged FUA write) reads back, and every other sector holds one of the
values it may hold (a later unflushed write, the parent's data, zeros),
never garbage.

CRASH_STATES (default 300 in make check; make check-crash sets 10000) is
the number of states checked per format (raw, vhd, qcow2), shared by the
format's workloads; the workloads' rounds grow with it so that there are
enough distinct states. CRASH_SEED varies the choice. Each test prints its
counts (and appends them to CRASH_REPORT); tests/crash/RESULTS.md has the
last long run.
"""
import os
import random
import shutil
import subprocess

import nbd
import pytest

pytestmark = pytest.mark.replay     # scripts/check: the first pass only

from conftest import BIN, Server, run
from crash_replay import (Files, Log, Model, PARENT, marks_state, pattern, states, seeded,
                          SECTOR)

PER_FORMAT = int(os.environ.get("CRASH_STATES", "300"))
ROUNDS = max(10, PER_FORMAT // 400)
SEED = int(os.environ.get("CRASH_SEED", "1"))
SIZE = 16 << 20
REPORT = os.environ.get("CRASH_REPORT")      # a file each test appends its figures to


class Client:
    """libnbd, several requests in flight, a model of what was asked."""

    def __init__(self, uri, model):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.model = model
        self.round = 1
        self.errors = []

    def _cb(self, what):
        def cb(err):
            if err.value:
                self.errors.append("%s: errno %d" % (what, err.value))
            return 1
        return cb

    def write(self, off, length, fua=False):
        op = self.model.add("write", off, length, self.round, fua)
        self.h.aio_pwrite(pattern(op.wid, off, length), off,
                          completion=self._cb("write %d+%d" % (off, length)),
                          flags=nbd.CMD_FLAG_FUA if fua else 0)

    def zero(self, off, length):
        self.model.add("zero", off, length, self.round)
        self.h.aio_zero(length, off, completion=self._cb("zero"))

    def trim(self, off, length):
        self.model.add("trim", off, length, self.round)
        self.h.aio_trim(length, off, completion=self._cb("trim"))

    def wait(self):
        while self.h.aio_in_flight():
            self.h.poll(-1)
        assert not self.errors, self.errors

    def flush(self):
        """Ends the round: everything in it was acknowledged, then the flush."""
        self.wait()
        self.h.flush()
        self.round += 1

    def close(self):
        self.wait()
        self.h.shutdown()


def random_round(c, rng, ops=6, trims=False):
    """ops requests in flight at once on ranges that do not overlap."""
    taken = []
    for _ in range(ops):
        for _ in range(20):
            length = rng.choice([SECTOR, 4096, 8192, 65536, 3 * SECTOR, 131072])
            off = rng.randrange(0, (SIZE - length) // SECTOR) * SECTOR
            if all(off + length <= a or off >= b for a, b in taken):
                break
        else:
            continue
        taken.append((off, off + length))
        kind = rng.random()
        if trims and kind < 0.15:
            c.trim(off, length)
        elif trims and kind < 0.3:
            c.zero(off, length)
        else:
            c.write(off, length)


# ---- the workloads: (images made, params, base of the model, what the client does) ----

def make_parent(tmp, fmt):
    """A parent holding PARENT's pattern everywhere; its params."""
    raw = os.path.join(tmp, "parent.raw")
    with open(raw, "wb") as f:
        f.write(pattern(PARENT, 0, SIZE))
    if fmt == "vhd":
        path = os.path.join(tmp, "parent.vhd")
        run(os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", SIZE >> 20)
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "vpc", raw, path)
    else:
        path = os.path.join(tmp, "parent.qcow2")
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)
    return path


def setup_raw(tmp):
    path = os.path.join(tmp, "disk.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return "aio:" + path, 0


def setup_vhd(tmp):
    path = os.path.join(tmp, "disk.vhd")
    run(os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", SIZE >> 20)
    return "vhd:" + path, 0


def setup_vhd_child(tmp):
    parent = make_parent(tmp, "vhd")
    path = os.path.join(tmp, "child.vhd")
    run(os.path.join(BIN, "vhd-util"), "snapshot", "-n", path, "-p", parent)
    return "vhd:" + path, PARENT


def setup_qcow2_small_clusters(tmp):
    """512-byte clusters: each refcount block covers 128 KiB of file, so the
    refcount table fills and grows within the workload."""
    path = os.path.join(tmp, "disk.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", path, str(SIZE))
    return "qcow2:" + path, 0


def setup_qcow2_compressed(tmp):
    """Every cluster compressed: overwrites must allocate and free them right."""
    raw = os.path.join(tmp, "src.raw")
    with open(raw, "wb") as f:
        f.write(pattern(PARENT, 0, SIZE))
    path = os.path.join(tmp, "disk.qcow2")
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
        raw, path)
    os.unlink(raw)
    return "qcow2:" + path, PARENT


def setup_qcow2_child(tmp):
    parent = make_parent(tmp, "qcow2")
    path = os.path.join(tmp, "child.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", parent, "-F", "qcow2", path, str(SIZE))
    return "qcow2:" + path, PARENT


def work_alloc(srv, minor, c, rng, rounds=ROUNDS):
    for r in range(rounds):
        random_round(c, rng)
        if r % 3 == 2:
            c.wait()
            c.write(rng.randrange(0, (SIZE - 8192) // SECTOR) * SECTOR, 8192, fua=True)
        c.flush()


def work_trim(srv, minor, c, rng, rounds=ROUNDS):
    for _ in range(rounds):
        random_round(c, rng, trims=True)
        c.flush()


def work_snapshot(srv, minor, c, rng, rounds=ROUNDS):
    for r in range(rounds):
        random_round(c, rng)
        c.flush()
        if r == rounds // 2:
            c.wait()
            leaf = srv.call("list")["result"]["vbds"][0]["params"].split(":", 1)[1]
            srv.call("snapshot", minor=minor, path=os.path.splitext(leaf)[0] + "-snap" +
                     os.path.splitext(leaf)[1])


WORKLOADS = {
    "raw": (setup_raw, work_trim),
    "vhd-dynamic": (setup_vhd, work_alloc),
    "vhd-dynamic-trim": (setup_vhd, work_trim),
    "vhd-differencing": (setup_vhd_child, work_alloc),
    "vhd-live-snapshot": (setup_vhd, work_snapshot),
    "qcow2-refcount-growth": (setup_qcow2_small_clusters, work_alloc),
    "qcow2-trim-zero": (setup_qcow2_small_clusters, work_trim),
    "qcow2-compressed-overwrite": (setup_qcow2_compressed, work_alloc),
    "qcow2-backing": (setup_qcow2_child, work_alloc),
}


def record(tmp, name):
    setup, work = WORKLOADS[name]
    img = os.path.join(tmp, "img")
    os.makedirs(img)
    params, base = setup(img)
    files = {}
    for n in os.listdir(img):
        with open(os.path.join(img, n), "rb") as f:
            files[os.path.join(img, n)] = f.read()
    log = os.path.join(tmp, "io.rec")
    srv = Server(os.path.join(tmp, "rec"), extra=["--record-io", log], loops="1").start()
    try:
        minor = srv.open(params)["minor"]
        model = Model(SIZE, base)
        c = Client(srv.uri(minor), model)
        work(srv, minor, c, random.Random(SEED))
        c.close()
    finally:
        assert srv.stop() == 0, srv.log()
    srv.assert_clean_log()
    return Log(log), files, params, model, minor


def format_check(params):
    """None, or the checker's complaint about the leaf."""
    kind, path = params.split(":", 1)
    if kind == "vhd":
        r = subprocess.run([os.path.join(BIN, "vhd-util"), "check", "-n", path],
                           capture_output=True, text=True)
        return None if r.returncode == 0 else "vhd-util check: " + (r.stdout + r.stderr)[-600:]
    if kind == "qcow2":
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True,
                           text=True)
        # 0: clean; 3: leaked clusters only (space, never data)
        return None if r.returncode in (0, 3) else "qemu-img check: " + r.stdout[-600:]
    return None


def budget_of(name):
    fmt = name.split("-")[0]
    return PER_FORMAT // sum(1 for n in WORKLOADS if n.split("-")[0] == fmt)


def check_states(tmp, name, budget=None, exhaustive=False):
    budget = budget or budget_of(name)
    log, base, params, model, minor = record(tmp, name)
    points = log.crash_points()
    per_point = budget if exhaustive else max(8, 4 * budget // len(points))
    rng = seeded(SEED)
    plan = []
    for p in points:
        durable, maybe = log.split(p)
        for st in states(durable, maybe, per_point, rng, every_subset=exhaustive):
            plan.append((p, st))
    if len(plan) > budget:      # spread over the crash points, the last one kept
        step = len(plan) / budget
        plan = [plan[int(i * step)] for i in range(budget - 1)] + [plan[-1]]
    files = Files(base)
    chk = Server(os.path.join(tmp, "chk"), loops="1").start()
    checked = 0
    acc_cache = {}
    try:
        for n, (p, st) in enumerate(plan):
            files.write(files.build(st))
            flushes, fua, leaf = marks_state(log.marks_before(p), minor)
            leaf = leaf or params
            where = "%s: crash point %d of %d (record %d), state %d" % (
                name, points.index(p) + 1, len(points), p, n)
            bad = format_check(leaf)
            assert bad is None, where + ": " + bad
            got = chk.call("open", check=False, params=leaf)
            assert "error" not in got, where + ": open failed: %s" % got["error"]
            m = got["result"]["minor"]
            h = nbd.NBD()
            h.connect_uri(chk.uri(m))
            data = h.pread(SIZE, 0)
            h.shutdown()
            chk.call("close", minor=m)
            chk.call("destroy", minor=m, check=False)
            key = (flushes, frozenset(fua))
            if key not in acc_cache:
                acc = model.acceptable(flushes, fua)
                acc_cache[key] = (acc, model.render(acc))
            problems = model.check(data, *acc_cache[key])
            assert not problems, where + ":\n" + "\n".join(problems)
            files.forget_changed()
            checked += 1
    finally:
        chk.stop()
    chk.assert_clean_log()
    line = "%s: %d crash points, %d states checked, %d changes recorded (%d flush marks)" % (
        name, len(points), checked, len(log.changes),
        sum(1 for _, t in log.marks if t.startswith("flush")))
    print(line)
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(line + "\n")
    return checked


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_power_loss_states(tmp_path, name):
    checked = check_states(str(tmp_path), name)
    assert checked >= min(budget_of(name), 50)


def one_allocation(srv, minor, c, rng):
    """A write that allocates (a partial block or cluster: the rest must keep
    the parent's data or zeros), then a flush."""
    c.write((3 << 20) + 4096, 8192)
    c.flush()


@pytest.mark.parametrize("setup", [setup_vhd, setup_vhd_child, setup_qcow2_small_clusters,
                                   setup_qcow2_child])
def test_first_allocation_every_state(tmp_path, setup):
    """Regression for the orderings the replay found (vhd: footer, blocks and
    BAT without a sync between them; qcow2: data and L2 without one): every
    subset of the changes of one allocating write, torn ones included, at
    every crash point of the write and its flush."""
    name = "first-allocation-" + setup.__name__[len("setup_"):]
    WORKLOADS[name] = (setup, one_allocation)
    try:
        checked = check_states(str(tmp_path), name, budget=400, exhaustive=True)
    finally:
        del WORKLOADS[name]
    assert checked >= 8
