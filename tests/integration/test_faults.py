"""Injected I/O errors (tapdiskd --fault-injection): over each workload,
for every k, the kth I/O the server makes to the image's files fails (EIO,
ENOSPC, a short write). Each time: the request that depended on it fails
at its client, other vbds go on, the image checks clean after the close
(qcow2 may leak, never corrupt) or is refused at the next open in one
line, and every write that was acknowledged reads back; a write that
failed left each of its sectors old or new, nothing else."""

import os
import shutil
import struct

import nbd
import pytest

from conftest import BIN, ControlError, run

MiB = 1 << 20
SIZE = 64 * MiB
SECTOR = 512


def vhdutil(*args, check=True):
    return run(os.path.join(BIN, "vhd-util"), *args, check=check)


def arm(srv, nth, path, error="EIO", kinds=None, count=1):
    args = {"nth": nth, "path": path, "error": error, "count": count}
    if kinds:
        args["kinds"] = kinds
    return srv.call("fault-inject", **args)["result"]


def fault_status(srv):
    return srv.call("fault-inject")["result"]


def sector_data(tag, sector):
    """A sector's bytes that say who wrote them and where."""
    return struct.pack("<QQ", tag, sector) * (SECTOR // 16)


class Model:
    """What the disk must read back: an acknowledged write's sectors exactly;
    a failed write's sectors the bytes before it or its own."""

    def __init__(self, initial=None):
        self.initial = initial or (lambda s: bytes(SECTOR))
        self.allowed = {}      # sector -> set of acceptable contents
        self.touched = set()
        self.tag = 1

    def may_be(self, s):
        return self.allowed.get(s) or {self.initial(s)}

    def data(self, off, length):
        self.tag += 1
        tag = self.tag
        return b"".join(sector_data(tag, off // SECTOR + i) for i in range(length // SECTOR))

    def wrote(self, off, data, ok):
        for i in range(len(data) // SECTOR):
            s = off // SECTOR + i
            new = data[i * SECTOR:(i + 1) * SECTOR]
            self.allowed[s] = {new} if ok else self.may_be(s) | {new}
            self.touched.add(s)

    def check(self, off, got, what):
        for i in range(len(got) // SECTOR):
            s = off // SECTOR + i
            sec = bytes(got[i * SECTOR:(i + 1) * SECTOR])
            assert sec in self.may_be(s), "%s: sector %d reads %r, expected one of %r" % (
                what, s, sec[:16], [a[:16] for a in self.may_be(s)])

    def verify(self, h, what):
        """Reads back every sector ever written, in runs."""
        for start, n in runs(sorted(self.touched)):
            got = h.pread(n * SECTOR, start * SECTOR)
            self.check(start * SECTOR, got, what)


def runs(sectors):
    out, start, n = [], None, 0
    for s in sectors:
        if start is not None and s == start + n and n < 2048:
            n += 1
            continue
        if start is not None:
            out.append((start, n))
        start, n = s, 1
    if start is not None:
        out.append((start, n))
    return out


def batch(h, model, ops):
    """Runs ops ('w', off, len) / ('r', off, len) / ('f',) concurrently;
    returns each one's errno name or None, and updates the model."""
    cmds = []
    for op in ops:
        if op[0] in ("w", "wfua"):
            data = model.data(op[1], op[2])
            flags = nbd.CMD_FLAG_FUA if op[0] == "wfua" else 0
            cmds.append((op, data, h.aio_pwrite(data, op[1], flags=flags)))
        elif op[0] == "r":
            buf = nbd.Buffer(op[2])
            cmds.append((op, buf, h.aio_pread(buf, op[1])))
        elif op[0] == "z":
            cmds.append((op, bytes(op[2]), h.aio_zero(op[2], op[1])))
        else:
            cmds.append((op, None, h.aio_flush()))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    results = []
    for op, data, cookie in cmds:
        try:
            h.aio_command_completed(cookie)
            err = None
        except nbd.Error as e:
            err = e.errno or "?"
        results.append(err)
        if op[0] in ("w", "wfua", "z"):
            model.wrote(op[1], data, err is None)
        elif op[0] == "r" and err is None:
            model.check(op[1], data.to_bytearray(), "read during the workload")
    return results


def connect(srv, minor):
    h = nbd.NBD()
    h.connect_uri(srv.uri(minor))
    return h


class Other:
    """A vbd beside the faulty one: it must go on reading and writing."""

    def __init__(self, srv, path):
        with open(path, "wb") as f:
            f.truncate(SIZE)
        self.minor = srv.open("aio:" + path)["minor"]
        self.h = connect(srv, self.minor)
        self.n = 0

    def check(self):
        self.n += 1
        data = bytes([self.n % 251 + 1]) * 65536
        off = (self.n % 64) * 65536
        self.h.pwrite(data, off)
        assert self.h.pread(65536, off) == data


# ---- images ----

def fill(path, fmt):
    """Writes a pattern into the first 8 MiB of a parent, with qemu-io."""
    run("qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 8M", path)


def parent_initial(s):
    return b"\x5a" * SECTOR if s < 8 * MiB // SECTOR else bytes(SECTOR)


def vhd_batmap_offset(path):
    """Where blktap's batmap header sits: after the BAT."""
    with open(path, "rb") as f:
        f.seek(512 + 16)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(512 + 28)
        entries = struct.unpack(">I", f.read(4))[0]
    return table + (entries * 4 + SECTOR - 1) // SECTOR * SECTOR


def optional_write(params, last):
    """An I/O no request depends on, whose failure costs speed or space
    only: the VHD batmap (a stale one is ignored at open), the hole qcow2
    punches where a cluster was freed."""
    kind, path = params.split(":", 1)
    if not last or last["path"] != path:
        return False
    if kind == "qcow2":
        return last["kind"] == "fallocate"
    return (kind == "vhd" and last["kind"] == "write" and
            last["offset"] == vhd_batmap_offset(path))


class Format:
    def __init__(self, name, kind, make, initial=None, leaks_ok=False, workload=None):
        self.name, self.kind, self.make = name, kind, make
        self.initial = initial
        self.leaks_ok = leaks_ok
        self.workload = workload or WRITES

    def check(self, path):
        """The image after a close: clean (qcow2: leaks allowed)."""
        if self.kind == "vhd":
            r = vhdutil("check", "-n", path, check=False)
            assert r.returncode == 0, "vhd-util check: %s%s" % (r.stdout, r.stderr)
        elif self.kind == "qcow2":
            r = run("qemu-img", "check", "-f", "qcow2", path, check=False)
            assert r.returncode in ((0, 3) if self.leaks_ok else (0,)), \
                "qemu-img check: %s%s" % (r.stdout, r.stderr)


def make_raw(d):
    p = os.path.join(d, "disk.img")
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return "aio:" + p


def make_vhd(d):
    p = os.path.join(d, "disk.vhd")
    vhdutil("create", "-n", p, "-s", str(SIZE // MiB))
    return "vhd:" + p


def make_vhd_diff(gold):
    def make(d):
        parent, child = os.path.join(d, "parent.vhd"), os.path.join(d, "disk.vhd")
        shutil.copy(gold, parent)
        vhdutil("snapshot", "-n", child, "-p", parent)
        return "vhd:" + child
    return make


def reftable_of(path):
    """(offset, clusters) of a qcow2's refcount table, from its header."""
    with open(path, "rb") as f:
        h = f.read(60)
    return struct.unpack(">QI", h[48:60])


def make_qcow2_edge(template):
    def make(d):
        p = os.path.join(d, "disk.qcow2")
        shutil.copy(template, p)
        return "qcow2:" + p
    return make


def make_qcow2_backed(gold):
    def make(d):
        parent, child = os.path.join(d, "parent.qcow2"), os.path.join(d, "disk.qcow2")
        shutil.copy(gold, parent)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", parent, "-F", "qcow2", child)
        return "qcow2:" + child
    return make


@pytest.fixture(scope="module")
def golds(tmp_path_factory):
    d = tmp_path_factory.mktemp("gold")
    vhd = str(d / "gold.vhd")
    vhdutil("create", "-n", vhd, "-s", str(SIZE // MiB))
    fill(vhd, "vpc")
    q = str(d / "gold.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", q, str(SIZE))
    fill(q, "qcow2")
    # 512-byte clusters, 64-bit refcounts: a refcount block counts 64
    # clusters and the one-cluster refcount table 2 MiB of file. Filled
    # (far from the workload) to some 27 clusters short of that, so that the
    # workload allocates refcount blocks and grows the table.
    edge = str(d / "edge.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
        edge, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 32M 1955k", edge)
    assert reftable_of(edge)[1] == 1 and 0 < 2 * MiB - os.path.getsize(edge) < 20000
    return {"vhd": vhd, "qcow2": q, "qcow2-edge": edge}


def formats(golds):
    return {
        "raw": Format("raw", "raw", make_raw),
        "vhd": Format("vhd", "vhd", make_vhd),
        "vhd-diff": Format("vhd-diff", "vhd", make_vhd_diff(golds["vhd"]), parent_initial),
        "qcow2": Format("qcow2", "qcow2", make_qcow2_edge(golds["qcow2-edge"]), leaks_ok=True,
                        workload=QWRITES),
        "qcow2-backed": Format("qcow2-backed", "qcow2", make_qcow2_backed(golds["qcow2"]),
                               parent_initial, leaks_ok=True, workload=BWRITES),
    }


# Allocating writes: new blocks (VHD 2 MiB, qcow2 4 KiB clusters and their
# L2 tables and refcount blocks), partial ones, some into what an earlier
# batch allocated, reads across both, a flush and a FUA-less tail.
WRITES = [
    [("w", 0, 65536), ("w", 2 * MiB + 512, 4096), ("w", 10 * MiB, 256 * 1024),
     ("r", 20 * MiB, 65536)],
    [("f",)],
    [("w", 4096, 8192), ("w", 3 * MiB, 131072), ("w", 40 * MiB + 3072, 1024),
     ("r", 10 * MiB, 131072)],
    [("w", 12 * MiB, 2 * MiB), ("r", 2 * MiB, 65536)],
    [("f",)],
]

# With 64 KiB clusters (each its own job and write): a whole VHD block's
# worth of them is only more of the same.
BWRITES = [b if b[0][1:] != (12 * MiB, 2 * MiB) else [("w", 12 * MiB, 256 * 1024)] + b[1:]
           for b in WRITES]

# The same with 512-byte clusters: L2 tables, refcount blocks and a larger
# refcount table (see golds), partial L2 tables, the backing file's end.
QWRITES = [
    [("w", 0, 4096), ("w", MiB + 512, 1024), ("w", 5 * MiB, 2048), ("r", 6 * MiB, 4096)],
    [("f",)],
    [("w", 4096, 1024), ("w", MiB + 4096, 8192), ("w", 7 * MiB + 1536, 512), ("r", 0, 4096)],
    [("w", 8 * MiB - 1024, 4096), ("r", MiB, 4096)],
    [("f",)],
]


def workload(h, model, batches):
    return [batch(h, model, ops) for ops in batches]


def only_dependents_failed(results, what):
    """One fault fails requests of the batch it hit, never later ones: the
    driver is not left broken."""
    hit = [i for i, b in enumerate(results) if any(b)]
    assert not hit or not any(any(b) for b in results[hit[0] + 1:]), \
        "%s: requests after the failed one failed too: %s" % (what, results)


class Rig:
    """One server with fault injection, a bystander vbd, and a fresh
    directory (and image) per round."""

    def __init__(self, make_server, tmp_path):
        self.srv = make_server(extra=["--fault-injection"])
        self.base = tmp_path
        self.other = Other(self.srv, str(tmp_path / "other.img"))
        self.round = 0

    def fresh(self, fmt):
        self.round += 1
        d = str(self.base / ("r%d" % self.round))
        os.makedirs(d)
        return d, fmt.make(d)

    def tag(self, d):
        return os.path.basename(d) + "/"

    def reopen_and_verify(self, fmt, params, model, what):
        """Checks the closed image, opens it again (it may be refused, in one
        line) and reads back what the model says."""
        path = params.split(":", 1)[1]
        try:
            fmt.check(path)
        except AssertionError:
            # a broken image must at least be refused, not misread
            r = self.srv.call("open", check=False, params=params)
            assert not r["ok"], "%s: image fails its check but opens:\n%s" % (what, path)
            assert "\n" not in r["error"]["message"]
            raise
        r = self.srv.call("open", check=False, params=params)
        if not r["ok"]:
            msg = r["error"]["message"]
            assert "\n" not in msg and msg, msg
            return False
        m = r["result"]["minor"]
        h = connect(self.srv, m)
        model.verify(h, what + ", after reopening")
        h.shutdown()
        self.srv.call("destroy", minor=m)
        return True


def run_rounds(rig, fmt, step, error, kinds=None, limit=400):
    """Arms fault k = 1, 2, ... around step(rig, fmt, d, params, tag) until a
    round injects nothing."""
    for k in range(1, limit):
        d, params = rig.fresh(fmt)
        done = step(rig, fmt, d, params, k, error, kinds)
        rig.other.check()
        if done:
            return k
    raise AssertionError("still injecting after %d rounds" % limit)


def faulted(rig, fmt, d, h, model, batches, step, k, error, kinds, count=1):
    """Runs batches with fault k armed: (the fault's status, each request's
    result, a sentence naming the round)."""
    arm(rig.srv, k, rig.tag(d), error, kinds, count)
    results = workload(h, model, batches)
    st = fault_status(rig.srv)
    rig.srv.call("fault-inject", disarm=True)
    what = "%s %s k=%d %s (fault on %s)" % (fmt.name, step, k, error, st.get("last"))
    return st, results, what


def check_failed(params, st, results, what):
    """A fault fails some request (unless no request needs what it hit),
    only those of its batch; no fault, no failure."""
    failed = [r for b in results for r in b if r]
    if st["injected"]:
        assert failed or optional_write(params, st.get("last")), \
            "%s: the fault reached no request" % what
    else:
        assert not failed, "%s: no fault, yet %s" % (what, results)
    only_dependents_failed(results, what)


def step_writes(rig, fmt, d, params, k, error, kinds):
    srv = rig.srv
    m = srv.open(params)["minor"]
    h = connect(srv, m)
    model = Model(fmt.initial)
    st, results, what = faulted(rig, fmt, d, h, model, fmt.workload, "writes", k, error, kinds)
    check_failed(params, st, results, what)
    # the vbd still serves: what it acknowledged reads back, it takes a write
    model.verify(h, what)
    assert batch(h, model, [("w", 30 * MiB, 65536), ("f",)]) == [None, None], what
    h.shutdown()
    srv.call("destroy", minor=m)
    rig.reopen_and_verify(fmt, params, model, what)
    if not st["injected"] and fmt.name == "qcow2":
        # the workload did what it is for
        assert reftable_of(params.split(":", 1)[1])[1] > 1
    return st["injected"] == 0


FORMATS = ["raw", "vhd", "vhd-diff", "qcow2", "qcow2-backed"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("error,kinds", [("EIO", None), ("short-write", "write")])
def test_fault_at_every_io_of_allocating_writes(make_server, tmp_path, golds, fmt, error, kinds):
    rig = Rig(make_server, tmp_path)
    n = run_rounds(rig, formats(golds)[fmt], step_writes, error, kinds)
    assert n > 3


def test_fault_injection_is_refused_without_the_option(server):
    with pytest.raises(ControlError) as e:
        server.call("fault-inject", nth=1)
    assert e.value.code == "ENOTSUP" and "--fault-injection" in e.value.message


# ---- metadata loads at open, flush and FUA, snapshot, close ----

def prepared(rig, fmt):
    """A fresh image holding the first writes of its workload, closed."""
    d, params = rig.fresh(fmt)
    m = rig.srv.open(params)["minor"]
    h = connect(rig.srv, m)
    model = Model(fmt.initial)
    for ops in fmt.workload[:3]:
        assert not any(batch(h, model, ops))
    h.shutdown()
    rig.srv.call("destroy", minor=m)
    return d, params, model


def one_line_error(r, what):
    msg = r["error"]["message"]
    assert msg and "\n" not in msg, "%s: %r" % (what, msg)


def step_open(rig, fmt, d, params, k, error, kinds):
    """The fault hits the metadata an open reads: the open fails in one
    line, and the next one (no fault) finds everything."""
    srv = rig.srv
    d, params, model = prepared(rig, fmt)
    arm(srv, k, rig.tag(d), error, kinds)
    r = srv.call("open", check=False, params=params)
    st = fault_status(srv)
    srv.call("fault-inject", disarm=True)
    what = "%s open k=%d %s (fault on %s)" % (fmt.name, k, error, st.get("last"))
    if r["ok"]:
        m = r["result"]["minor"]
        h = connect(srv, m)
        model.verify(h, what)
        h.shutdown()
        srv.call("destroy", minor=m)
    else:
        assert st["injected"], "%s: open failed with no fault: %s" % (what, r["error"])
        one_line_error(r, what)
    assert rig.reopen_and_verify(fmt, params, model, what), "%s: refused after" % what
    return st["injected"] == 0


SYNCS = [[("w", 6 * MiB, 8192), ("wfua", 2 * MiB + 8192, 4096), ("w", 16 * MiB, 65536)],
         [("f",)]]


def step_flush(rig, fmt, d, params, k, error, kinds):
    """The fault hits what a flush or a FUA write does: that request fails,
    the next flush succeeds, and nothing acknowledged is lost."""
    srv = rig.srv
    d, params, model = prepared(rig, fmt)
    m = srv.open(params)["minor"]
    h = connect(srv, m)
    st, results, what = faulted(rig, fmt, d, h, model, SYNCS, "flush", k, error, kinds)
    check_failed(params, st, results, what)
    assert batch(h, model, [("f",)]) == [None], what
    model.verify(h, what)
    h.shutdown()
    srv.call("destroy", minor=m)
    assert rig.reopen_and_verify(fmt, params, model, what), "%s: refused after" % what
    return st["injected"] == 0


def step_snapshot(rig, fmt, d, params, k, error, kinds):
    """The fault hits a live snapshot (the pause's close, the new leaf,
    opening it): the snapshot fails in one line or succeeds, and either way
    the vbd goes on, on the old leaf or the new one, losing nothing."""
    srv = rig.srv
    d, params, model = prepared(rig, fmt)
    m = srv.open(params)["minor"]
    h = connect(srv, m)
    leaf = os.path.join(d, "snap." + ("qcow2" if fmt.kind == "qcow2" else "vhd"))
    arm(srv, k, rig.tag(d), error, kinds)
    r = srv.tapctl("snapshot", "-m", m, "-n", leaf, check=False)
    st = fault_status(srv)
    srv.call("fault-inject", disarm=True)
    what = "%s snapshot k=%d %s (fault on %s)" % (fmt.name, k, error, st.get("last"))
    now = srv.call("list", minor=m)["result"]["vbds"][0]["params"]
    if r.returncode == 0:
        assert now.endswith(":" + leaf), (what, now)
    else:
        assert st["injected"], "%s: snapshot failed with no fault: %s" % (what, r.stderr)
        assert r.stderr.count("\n") == 1, (what, r.stderr)
        assert now == params, "%s: the vbd is on %s after a failed snapshot" % (what, now)
        assert not os.path.exists(leaf), "%s: a failed snapshot left %s" % (what, leaf)
    # the vbd serves: what it had reads back, new writes land
    model.verify(h, what)
    assert not any(batch(h, model, [("w", 30 * MiB, 65536), ("w", 0, 4096), ("f",)])), what
    h.shutdown()
    srv.call("destroy", minor=m)
    if now != params:
        fmt.check(params.split(":", 1)[1])     # the old leaf, a parent now
    assert rig.reopen_and_verify(fmt, now, model, what), "%s: refused after" % what
    return st["injected"] == 0


def step_close(rig, fmt, d, params, k, error, kinds):
    """The fault hits a close (what it writes back, its sync): the image
    checks clean or is refused at the next open in one line, and if it
    opens, every acknowledged write reads back."""
    srv = rig.srv
    d, params, model = prepared(rig, fmt)
    m = srv.open(params)["minor"]
    h = connect(srv, m)
    # blocks made full (the VHD batmap), clusters unlinked (qcow2's frees,
    # applied at close)
    assert not any(batch(h, model, [("w", 12 * MiB, 2 * MiB), ("w", 0, 65536)])), fmt.name
    assert not any(batch(h, model, [("z", 0, 32768)])), fmt.name
    h.shutdown()
    arm(srv, k, rig.tag(d), error, kinds)
    r = srv.call("destroy", check=False, minor=m)
    st = fault_status(srv)
    srv.call("fault-inject", disarm=True)
    what = "%s close k=%d %s (fault on %s)" % (fmt.name, k, error, st.get("last"))
    if not r["ok"]:
        one_line_error(r, what)
        srv.call("destroy", minor=m)
    rig.reopen_and_verify(fmt, params, model, what)
    return st["injected"] == 0


STEPS = {"open": step_open, "flush": step_flush, "snapshot": step_snapshot, "close": step_close}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("step,error,kinds", [
    ("open", "EIO", None), ("flush", "EIO", None), ("flush", "ENOSPC", "sync"),
    ("snapshot", "EIO", None), ("snapshot", "short-write", "write"),
    ("close", "EIO", None), ("close", "short-write", "write"),
])
def test_fault_at_every_io_of_a_step(make_server, tmp_path, golds, fmt, step, error, kinds):
    rig = Rig(make_server, tmp_path)
    n = run_rounds(rig, formats(golds)[fmt], STEPS[step], error, kinds)
    # every step makes I/O to fail but a raw file's open (no metadata); not
    # every close writes (raw, qcow2 without frees)
    assert n > 1 or kinds or (fmt, step) == ("raw", "open"), n


# ---- transient errors ----

def step_transient(rig, fmt, d, params, k, error, kinds):
    """The kth I/O and the two after it fail with a transient error: the
    requests are sent again and succeed, the client sees nothing."""
    srv = rig.srv
    m = srv.open(params, timeout=30)["minor"]
    h = connect(srv, m)
    model = Model(fmt.initial)
    st, results, what = faulted(rig, fmt, d, h, model, fmt.workload, "transient x3", k, error,
                                kinds, count=3)
    assert not any(r for b in results for r in b), "%s: %s" % (what, results)
    vst = srv.stats(m)
    assert vst["timeouts"] == 0, what
    if st["injected"] and not optional_write(params, st.get("last")):
        assert vst["retries"] >= 1, what
    model.verify(h, what)
    h.shutdown()
    srv.call("destroy", minor=m)
    rig.reopen_and_verify(fmt, params, model, what)
    return st["injected"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_transient_fault_at_every_io_is_retried(make_server, tmp_path, golds, fmt):
    """(EAGAIN here; test_timeouts.py has EBUSY and EINTR: one path.)"""
    rig = Rig(make_server, tmp_path)
    assert run_rounds(rig, formats(golds)[fmt], step_transient, "EAGAIN", None) > 3


# ---- a failed write, then the same place written again ----

REWRITE = [("w", 4096, 8192), ("w", 2 * MiB + 65536, 4096), ("w", 40 * MiB, 65536)]


def step_rewrite(rig, fmt, d, params, k, error, kinds):
    """A write fails somewhere in its metadata; the same sectors written
    again (no fault) must land: nothing the failed one left in memory may
    let the second skip what makes it reachable (a VHD bitmap's bits, a
    qcow2 L2 entry)."""
    d, params, model = prepared(rig, fmt)
    srv = rig.srv
    m = srv.open(params)["minor"]
    h = connect(srv, m)
    st, results, what = faulted(rig, fmt, d, h, model, [REWRITE], "rewrite", k, error, kinds)
    assert batch(h, model, REWRITE) == [None] * len(REWRITE), what
    h.shutdown()
    srv.call("destroy", minor=m)
    assert rig.reopen_and_verify(fmt, params, model, what), "%s: refused after" % what
    return st["injected"] == 0 and not any(results[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_write_then_the_same_place_again(make_server, tmp_path, golds, fmt):
    rig = Rig(make_server, tmp_path)
    run_rounds(rig, formats(golds)[fmt], step_rewrite, "EIO", "write")


@pytest.mark.parametrize("fmt", ["aio", "vhd", "qcow2"])
def test_failed_sync_at_close_is_reported(make_server, tmp_path, fmt):
    """Close has no error to return: a failed fdatasync there is one
    warning naming the file, and the server goes on."""
    srv = make_server(extra=["--fault-injection"])
    path = str(tmp_path / ("disk." + fmt))
    if fmt == "vhd":
        vhdutil("create", "-n", path, "-s", 16)
    elif fmt == "qcow2":
        run("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
    else:
        with open(path, "wb") as f:
            f.truncate(16 * MiB)
    m = srv.open(fmt + ":" + path)["minor"]
    h = nbd.NBD()
    h.connect_uri(srv.uri(m))
    h.pwrite(b"s" * 4096, 0)            # not flushed: close's sync is its only one
    h.shutdown()
    arm(srv, 1, os.path.basename(path), kinds="sync", count=1000)
    srv.call("close", minor=m)
    assert fault_status(srv)["injected"] >= 1
    line = "%s: fdatasync at close failed: Input/output error" % path
    assert line in srv.log(), srv.log()
    assert srv.proc.poll() is None
    srv.call("fault-inject", disarm=True)
    assert srv.open(fmt + ":" + path)["minor"] >= 0
