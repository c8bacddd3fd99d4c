"""The soak (issue 16, "Long runs"): one tapdiskd, 100 vbds, everything at
once for SOAK_MINUTES, then every byte checked and the server's memory and
descriptors back where they started. test_soak.py runs it for 2 minutes in
`make check`; `make soak` (tests/soak/run) for 60 by default, and writes
tests/soak/RESULTS.md.

- Images (small, 16 to 64 MiB): raw files, standalone VHDs and qcow2s,
  VHD children sharing two read-only parents, qcow2 overlays sharing two
  backing files (the parents hold a known pattern, made with qemu-img), and
  ram: disks. 100 vbds on --loops 2.
- NBD clients (soak_client.py: libnbd, asynchronous, several requests in
  flight per vbd), in a few processes, each keeping per vbd a model of what
  it wrote in a file that outlives the process. Reads are verified as they
  come back; at the end each client reads every byte of its vbds.
- Simulated Xen guests (blkfront_sim --verify --state, whose model also
  lives in a file) on six vbds, in sessions one after another (new domid
  each).
- A driver, seeded, logging every action: pauses and unpauses, live
  snapshots (the control socket's `snapshot`, or tap-ctl), QoS limits set
  and lifted (`qos-set`), force-closes (`close` with force) and reopens,
  kills of NBD client processes (restarted once the server holds none of
  their requests) and of guests (the next session reads what the dead one
  left in doubt first).
- A sampler: the server's RSS and descriptor count, open vbds, operations
  so far.
- At the end: everything lifted, every surviving vbd read whole and checked
  against its model, every vbd destroyed, the buffer pools left idle long
  enough to be trimmed, RSS and descriptors compared with the baseline
  taken before the first open; the server stops cleanly with a clean log.
"""

import json
import os
import pathlib
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import nbd

from conftest import BIN, Control, ControlError, fd_count, run
from soak_client import (BLOCK, H_BYTES_READ, H_BYTES_WRITTEN, H_ERR_EXPLAINED,
                         H_ERR_UNEXPLAINED, H_FCLOSE, H_FINAL_DONE, H_FINAL_VERIFIED,
                         H_FLUSHES, H_MISMATCHES, H_READS, H_RECONNECTS, H_RESOLVED,
                         H_WRITES, H_ZEROES, Model, block_data)
from xen_harness import Xen

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
GUEST_REGION_MB = 16
# the end's tolerance: RSS within max(10 %, 16 MiB) of the baseline, descriptors exact
RSS_SLACK_FRACTION = 0.10
RSS_SLACK_BYTES = 16 * MiB
IDLE_TRIM_WAIT = 12        # s: two of the loops' 5 s idle ticks (bufpool_trim_idle)

# what the 100 vbds are: (kind, count)
LAYOUT = [("raw", 18), ("vhd", 14), ("vhd-child", 16), ("qcow2", 14), ("qcow2-overlay", 16),
          ("ram", 22)]
PARENTS = 2                 # of each: VHD parents, qcow2 backing files
NBD_PROCS = 6
# driver actions and their weights
ACTIONS = [("pause", 25), ("snapshot", 12), ("qos", 18), ("force_close", 12),
           ("kill_client", 8), ("kill_guest", 6)]
MAX_SNAPSHOTS = 5           # per vbd: chains stay short


def parent_tag(kind, p):
    return 0xFA00000000000000 | (kind << 8) | p


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def rss_parts(pid):
    """RSS by kind of mapping: the heap (brk), anonymous maps (thread
    arenas, large buffers, stacks), and files (the binary and libraries:
    their pages count once touched)."""
    parts = {"heap": 0, "anon": 0, "files": 0}
    kind = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else ""
                kind = "heap" if name == "[heap]" else "files" if name.startswith("/") \
                    else "anon"
            elif head[0] == "Rss:":
                parts[kind] += int(head[1]) * 1024
    return parts


def fd_targets(pid):
    """What each descriptor of pid is (its /proc/PID/fd link), by number."""
    d = "/proc/%d/fd" % pid
    out = {}
    for name in os.listdir(d):
        try:
            out[int(name)] = os.readlink(os.path.join(d, name))
        except OSError:
            pass
    return out


def write_pattern(path, size, init):
    """A raw file of size bytes whose block b holds block_data(init(b), b)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for b in range(size // BLOCK):
            t = init(b)
            if t:
                f.seek(b * BLOCK)
                f.write(block_data(t, b))


class Vbd:
    def __init__(self, idx, kind, params, size, init, ext):
        self.idx = idx
        self.kind = kind
        self.params = params
        self.size = size
        self.init = init        # block -> tag of the data it starts with
        self.ext = ext          # a snapshot's format: "vhd" or "qcow2"; None: cannot
        self.minor = None
        self.model = None
        self.guest = None       # a Guest, or None: served to an NBD client
        self.client = None      # index of its NBD client process
        self.state = "up"       # up, paused, closed
        self.qos = False
        self.snapshots = 0
        self.fclosed = 0


class Guest:
    def __init__(self, vbd, discard, rng):
        self.vbd = vbd
        self.discard = discard
        self.queues = rng.choice((1, 2, 4))
        self.order = rng.choice((0, 1, 2, 4))
        self.indirect = rng.random() < 0.5
        self.persistent = rng.random() < 0.5
        self.proc = None
        self.started = 0
        self.killed = False
        self.sessions = 0
        self.killed_sessions = 0
        self.failures = []
        self.counts = {"reads": 0, "writes": 0, "discards": 0, "flushes": 0, "resolved": 0}
        self.errors = 0
        self.mismatches = 0


class Soak:
    def __init__(self, tmp, minutes, seed=1, loops=2, log=print):
        self.tmp = pathlib.Path(tmp)
        self.seconds = minutes * 60
        self.minutes = minutes
        self.seed = seed
        self.loops = loops
        self.rng = random.Random(seed)
        self.say = log
        self.imgdir = self.tmp / "img"
        self.moddir = self.tmp / "models"
        self.imgdir.mkdir()
        self.moddir.mkdir()
        self.actions = []       # (t, action, minor, detail, outcome)
        self.counts = {}        # action kind -> number done
        self.failures = []      # what fails the run
        self.samples = []
        self.lock = threading.Lock()
        self.stop_driver = threading.Event()
        self.stop_guests = threading.Event()
        self.procs = {}         # client index -> Popen
        self.incarnation = {}
        self.client_down = {}   # client index -> kill time (waiting to restart)
        self.client_kills = 0
        self.next_domid = 10
        self.t0 = None

    # ---- setup ----

    def make_images(self):
        rng = self.rng
        vbds = []
        parents = {}
        for kind in ("vhd", "qcow2"):
            for p in range(PARENTS):
                size = 32 * MiB
                tag = parent_tag(1 if kind == "vhd" else 2, p)

                def init(b, tag=tag):
                    return tag if (b // 16) % 3 == 0 else 0
                raw = str(self.imgdir / ("parent-%s%d.raw" % (kind, p)))
                write_pattern(raw, size, init)
                path = str(self.imgdir / ("parent%d.%s" % (p, kind)))
                if kind == "vhd":
                    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                        "subformat=dynamic,force_size=on", raw, path)
                else:
                    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
                os.unlink(raw)
                parents[(kind, p)] = (path, size, init)
        idx = 0
        for kind, count in LAYOUT:
            for i in range(count):
                size = rng.choice((16, 32, 48, 64)) * MiB
                base = str(self.imgdir / ("d%03d" % idx))
                zero = (lambda b: 0)
                if kind == "raw":
                    path = base + ".img"
                    if i % 2:
                        tag = 0xFB00000000000000 | idx

                        def init(b, tag=tag):
                            return tag if (b // 16) % 5 == 0 else 0
                    else:
                        init = zero
                    write_pattern(path, size, init)
                    v = Vbd(idx, kind, "aio:" + path, size, init, "vhd")
                elif kind == "vhd":
                    path = base + ".vhd"
                    run(os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", size // MiB)
                    v = Vbd(idx, kind, "vhd:" + path, size, zero, "vhd")
                elif kind == "qcow2":
                    path = base + ".qcow2"
                    cs = rng.choice((4096, 16384, 65536, 65536, 1 << 20))
                    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cs,
                        path, size)
                    v = Vbd(idx, kind, "qcow2:" + path, size, zero, "qcow2")
                elif kind == "vhd-child":
                    ppath, size, init = parents[("vhd", i % PARENTS)]
                    path = base + ".vhd"
                    run(os.path.join(BIN, "vhd-util"), "snapshot", "-n", path, "-p", ppath)
                    v = Vbd(idx, kind, "vhd:" + path, size, init, "vhd")
                elif kind == "qcow2-overlay":
                    ppath, size, init = parents[("qcow2", i % PARENTS)]
                    path = base + ".qcow2"
                    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", ppath, "-F", "qcow2",
                        path)
                    v = Vbd(idx, kind, "qcow2:" + path, size, init, "qcow2")
                else:
                    v = Vbd(idx, kind, "ram:%dM" % (size // MiB), size, zero, None)
                vbds.append(v)
                idx += 1
        self.vbds = vbds

    def start(self):
        t = time.time()
        self.make_images()
        self.say("soak: images made in %.1f s" % (time.time() - t))
        self.xen = Xen(self.tmp, extra=["--loops", str(self.loops)])
        self.srv = self.xen.srv
        self.pid = self.srv.proc.pid
        # one control connection, held from the baseline to the end's figures
        self.ctl = Control(self.srv.ctl_path)
        time.sleep(1)
        self.baseline = (rss_bytes(self.pid), fd_count(self.pid))
        self.baseline_fds = fd_targets(self.pid)
        self.baseline_parts = rss_parts(self.pid)
        self.say("soak: server pid %d, baseline RSS %.1f MiB, %d fds" % (
            self.pid, self.baseline[0] / MiB, self.baseline[1]))
        ctl = self.ctl
        for v in self.vbds:
            v.minor = ctl.call("open", params=v.params)["result"]["minor"]
            v.model = Model(str(self.moddir / ("m%d.model" % v.minor)), v.size // BLOCK, v.init)
        # guests: two ram disks (with discard: they read zeros there), one of
        # each of raw, VHD child, qcow2 overlay, standalone qcow2
        want = ["ram", "ram", "raw", "vhd-child", "qcow2-overlay", "qcow2"]
        self.guests = []
        for kind in want:
            v = next(x for x in self.vbds if x.kind == kind and not x.guest)
            v.guest = Guest(v, kind == "ram", self.rng)
            v.guest.state = str(self.moddir / ("g%d.state" % v.minor))
            self.guest_state_init(v)
            self.guests.append(v.guest)
        nbd_vbds = [v for v in self.vbds if not v.guest]
        for i, v in enumerate(nbd_vbds):
            v.client = i % NBD_PROCS
        self.clients = {c: [v for v in nbd_vbds if v.client == c] for c in range(NBD_PROCS)}
        self.stopfile = str(self.tmp / "stop")
        self.t0 = time.time()
        for c in self.clients:
            self.incarnation[c] = 0
            self.start_client(c)

    def guest_state_init(self, v):
        region = GUEST_REGION_MB * MiB
        sectors = region // 512
        with open(v.guest.state, "wb") as f:
            for b in range(region // BLOCK):
                f.write(block_data(v.init(b), b))
            f.truncate(2 * region + sectors)

    def start_client(self, c):
        spec = {"client": c + 1, "incarnation": self.incarnation[c],
                "seed": self.seed * 1000 + c * 10 + self.incarnation[c],
                "stop": self.stopfile, "log": str(self.tmp / ("client%d.log" % c)),
                "qd": 4, "rate": 150,
                "vbds": [{"minor": v.minor, "socket": self.srv.nbd_path(v.minor),
                          "model": str(self.moddir / ("m%d.model" % v.minor))}
                         for v in self.clients[c]]}
        path = str(self.tmp / ("client%d.json" % c))
        with open(path, "w") as f:
            json.dump(spec, f)
        errf = open(str(self.tmp / ("client%d.err" % c)), "a")
        self.procs[c] = subprocess.Popen([sys.executable, os.path.join(HERE, "soak_client.py"),
                                          path], stdout=errf, stderr=errf)

    # ---- the run ----

    def elapsed(self):
        return time.time() - self.t0

    def record(self, action, minor, detail, outcome="ok"):
        t = round(self.elapsed(), 2)
        with self.lock:
            self.actions.append((t, action, minor, detail, outcome))
            self.counts[action] = self.counts.get(action, 0) + 1
            if outcome != "ok":
                self.failures.append("%.1f s: %s minor %s (%s): %s" % (t, action, minor, detail,
                                                                       outcome))
        with open(str(self.tmp / "driver.log"), "a") as f:
            f.write("%8.2f %-12s %5s %s %s\n" % (t, action, minor, detail, outcome))

    def run(self):
        threads = [threading.Thread(target=self.guest_loop, args=(g,), daemon=True)
                   for g in self.guests]
        threads.append(threading.Thread(target=self.sampler, daemon=True))
        for t in threads:
            t.start()
        try:
            self.driver()
        finally:
            self.stop_driver.set()
            self.stop_guests.set()
        self.say("soak: driver done after %.0f s; lifting everything" % self.elapsed())
        self.settle()
        for t in threads:
            t.join(timeout=180)
            assert not t.is_alive(), "a guest or the sampler did not stop"
        self.finish()

    def driver(self):
        self.events = []        # (time, fn, args)
        next_action = time.time() + 2
        end = self.t0 + self.seconds
        while time.time() < end:
            if self.srv.proc.poll() is not None:
                self.failures.append("the server exited with %s" % self.srv.proc.returncode)
                return
            now = time.time()
            due = [e for e in self.events if e[0] <= now]
            self.events = [e for e in self.events if e[0] > now]
            for _, fn, args in due:
                fn(*args)
            self.restart_quiet_clients()
            if now >= next_action and now < end - 5:
                self.act()
                next_action = now + self.rng.expovariate(1 / 1.2)
            time.sleep(0.05)

    def act(self):
        kinds, weights = zip(*ACTIONS)
        kind = self.rng.choices(kinds, weights)[0]
        getattr(self, "act_" + kind)()

    def pick(self, pred):
        c = [v for v in self.vbds if pred(v)]
        return self.rng.choice(c) if c else None

    def later(self, secs, fn, *args):
        self.events.append((time.time() + secs, fn, args))

    def call(self, cmd, **args):
        return self.ctl.call(cmd, **args)["result"]

    def act_pause(self):
        v = self.pick(lambda v: v.state == "up")
        if not v:
            return
        try:
            if self.rng.random() < 0.3:
                self.srv.tapctl("pause", "-m", v.minor)
            else:
                self.call("pause", minor=v.minor)
        except (ControlError, AssertionError) as e:
            self.record("pause", v.minor, "", str(e))
            return
        v.state = "paused"
        secs = round(self.rng.uniform(0.1, 3), 2)
        self.record("pause", v.minor, "for %.2f s" % secs)
        self.later(secs, self.unpause, v)

    def unpause(self, v):
        try:
            self.call("unpause", minor=v.minor)
            v.state = "up"
            self.record("unpause", v.minor, "")
        except ControlError as e:
            self.record("unpause", v.minor, "", str(e))

    def act_snapshot(self):
        v = self.pick(lambda v: v.state == "up" and v.ext and v.snapshots < MAX_SNAPSHOTS)
        if not v:
            return
        ext = "qcow2" if v.params.startswith("qcow2:") else "vhd"
        path = str(self.imgdir / ("m%d-s%d.%s" % (v.minor, v.snapshots + 1, ext)))
        try:
            if self.rng.random() < 0.3:
                new = self.srv.tapctl("snapshot", "-m", v.minor, "-n", path).stdout.strip()
            else:
                new = self.call("snapshot", minor=v.minor, path=path)["params"]
        except (ControlError, AssertionError) as e:
            self.record("snapshot", v.minor, path, str(e))
            return
        v.snapshots += 1
        v.params = new
        self.record("snapshot", v.minor, new)

    def act_qos(self):
        v = self.pick(lambda v: v.state != "closed" and not v.qos)
        if not v:
            return
        limits = self.rng.choice([
            {"iops_total": self.rng.choice((100, 300, 1000))},
            {"bps_total": self.rng.choice((1, 4, 16)) * MiB},
            {"iops_read": 200, "iops_write": 100},
            {"iops_total": 200, "iops_total_max": 1000, "iops_total_max_length": 2},
        ])
        try:
            self.call("qos-set", minor=v.minor, limits=limits)
        except ControlError as e:
            self.record("qos", v.minor, json.dumps(limits), str(e))
            return
        v.qos = True
        secs = round(self.rng.uniform(2, 15), 1)
        self.record("qos", v.minor, "%s for %.1f s" % (json.dumps(limits, sort_keys=True), secs))
        self.later(secs, self.qos_lift, v)

    def qos_lift(self, v):
        if v.state == "closed":     # the limits went with the close
            v.qos = False
            return
        zero = {k: 0 for k in ("iops_total", "iops_total_max", "iops_read", "iops_write",
                               "bps_total")}
        try:
            self.call("qos-set", minor=v.minor, limits=zero)
            v.qos = False
            self.record("qos_lift", v.minor, "")
        except ControlError as e:
            self.record("qos_lift", v.minor, "", str(e))

    def act_force_close(self):
        v = self.pick(lambda v: v.state == "up" and not v.guest and v.kind != "ram"
                      and v.client not in self.client_down)
        if not v:
            return
        # first the count the client reads to explain the errors it will see
        # (odd: closed or closing)
        v.model.w[H_FCLOSE] += 1
        try:
            self.call("close", minor=v.minor, force=True)
        except ControlError as e:
            v.model.w[H_FCLOSE] += 1
            self.record("force_close", v.minor, "", str(e))
            return
        v.state = "closed"
        v.qos = False
        v.fclosed += 1
        secs = round(self.rng.uniform(0.2, 3), 2)
        self.record("force_close", v.minor, "reopen in %.2f s" % secs)
        self.later(secs, self.reopen, v, 0)

    def reopen(self, v, tries):
        try:
            self.call("open", minor=v.minor, params=v.params)
        except ControlError as e:
            if e.code == "EBUSY" and tries < 200:
                # the zombie still holds the file: its I/O is not back yet
                self.later(0.1, self.reopen, v, tries + 1)
                return
            self.record("reopen", v.minor, v.params, str(e))
            return
        v.state = "up"
        v.model.w[H_FCLOSE] += 1       # even again: open
        self.record("reopen", v.minor, "%s (%d EBUSY retries)" % (v.params, tries))

    def act_kill_client(self):
        up = [c for c in self.procs if c not in self.client_down]
        if not up:
            return
        c = self.rng.choice(up)
        self.procs[c].kill()
        self.procs[c].wait()
        self.client_down[c] = time.time()
        self.client_kills += 1
        self.record("kill_client", None, "client %d (%d vbds)" % (c, len(self.clients[c])))

    def quiet(self, v):
        try:
            st = self.call("stats", minor=v.minor)
        except ControlError:
            return v.state == "closed"      # nothing of it left in flight once reopened
        return (st["frontends"].get("nbd", 0) == 0 and st["reqs_outstanding"] == 0
                and st["reqs_queued"] == 0)

    def restart_quiet_clients(self):
        for c, since in list(self.client_down.items()):
            if all(self.quiet(v) for v in self.clients[c]):
                del self.client_down[c]
                self.incarnation[c] += 1
                self.start_client(c)
                self.record("restart_client", None, "client %d after %.2f s" % (
                    c, time.time() - since))
            elif time.time() - since > 120:
                self.failures.append("client %d's vbds never went quiet after its kill" % c)
                del self.client_down[c]

    def act_kill_guest(self):
        live = [g for g in self.guests if g.proc and g.proc.poll() is None and not g.killed
                and time.time() - g.started > 1]
        if not live:
            return
        g = self.rng.choice(live)
        g.killed = True
        g.proc.kill()
        self.record("kill_guest", g.vbd.minor, "")

    # ---- guests ----

    def guest_loop(self, g):
        ctl = Control(self.srv.ctl_path)
        v = g.vbd
        rng = random.Random(self.seed * 7919 + v.minor)
        while not self.stop_guests.is_set():
            left = self.t0 + self.seconds - time.time()
            if left < 8:
                break
            secs = round(min(left - 3, rng.uniform(8, 40)), 1)
            with self.lock:
                domid = self.next_domid
                self.next_domid += 1
            be = self.xen.attach(v.minor, domid=domid)
            args = ["--verify", secs, "--state", g.state, "--patience", 90,
                    "--region-mb", GUEST_REGION_MB, "--mem-mb", 64, "--seed", rng.randrange(1, 1 << 30),
                    "--queues", g.queues, "--order", g.order]
            args += ["--indirect"] if g.indirect else []
            args += ["--persistent"] if g.persistent else []
            args += ["--discard"] if g.discard else []
            g.killed = False
            g.started = time.time()
            g.proc = self.xen.sim_bg(be, *args, domid=domid)
            out, err = g.proc.communicate()
            g.sessions += 1
            if g.killed:
                g.killed_sessions += 1
            elif g.proc.returncode != 0:
                g.failures.append("session %d (domid %d): rc %d: %s" % (
                    g.sessions, domid, g.proc.returncode, (out + err)[-2000:]))
            else:
                r = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
                for k in g.counts:
                    g.counts[k] += r[k]
                g.errors += r["errors"]
                g.mismatches += r["mismatches"]
            self.xen.detach(domid=domid)
            deadline = time.time() + 120
            while True:
                st = ctl.call("stats", minor=v.minor)["result"]
                if ("xenbus" not in st and st["reqs_outstanding"] == 0
                        and st["reqs_queued"] == 0):
                    break
                if time.time() > deadline:
                    g.failures.append("domid %d: the device never went" % domid)
                    ctl.close()
                    return
                time.sleep(0.05)
            simdir = self.xen.simdir
            for name in os.listdir(simdir):
                if name.startswith("dom%d." % domid) or name.startswith("evt%d." % domid):
                    os.unlink(os.path.join(simdir, name))
        ctl.close()

    # ---- sampling ----

    def client_totals(self):
        tot = {"reads": 0, "writes": 0, "zeroes": 0, "flushes": 0, "bytes_read": 0,
               "bytes_written": 0}
        for v in self.vbds:
            if v.guest:
                continue
            w = v.model.w
            tot["reads"] += w[H_READS]
            tot["writes"] += w[H_WRITES]
            tot["zeroes"] += w[H_ZEROES]
            tot["flushes"] += w[H_FLUSHES]
            tot["bytes_read"] += w[H_BYTES_READ]
            tot["bytes_written"] += w[H_BYTES_WRITTEN]
        return tot

    def sample(self, ctl, note=""):
        st = ctl.call("stats")["result"]["vbds"]
        reqs = sum(o["reqs"] for x in st for o in x["ops"].values())
        rd = sum(x["ops"]["read"]["bytes"] for x in st)
        wr = sum(x["ops"]["write"]["bytes"] for x in st)
        tot = self.client_totals()
        row = {"t": round(self.elapsed()), "rss": rss_bytes(self.pid), "fds": fd_count(self.pid),
               "vbds": len(st), "nbd_conns": sum(x["frontends"].get("nbd", 0) for x in st),
               "rings": sum(x["frontends"].get("blkif", 0) for x in st),
               "server_reqs": reqs, "server_read": rd, "server_written": wr, "client_ops": tot["reads"] + tot["writes"] + tot["zeroes"]
               + tot["flushes"], "note": note}
        with self.lock:
            self.samples.append(row)
        return row

    def sampler(self):
        ctl = Control(self.srv.ctl_path)
        every = min(60, max(3, self.seconds / 40))
        while not self.stop_guests.is_set():
            if self.srv.proc.poll() is not None:
                break
            self.sample(ctl)
            self.stop_guests.wait(every)
        ctl.close()

    # ---- the end ----

    def settle(self):
        """Unpause, reopen, lift QoS, restart killed clients; wait for them."""
        for _, fn, args in sorted(self.events, key=lambda e: e[0]):
            fn(*args)
        self.events = []
        deadline = time.time() + 60
        while self.events:
            assert time.time() < deadline, "reopens never finished"
            time.sleep(0.1)
            due, self.events = self.events, []
            for _, fn, args in due:
                fn(*args)
        for v in self.vbds:
            assert v.state == "up", "minor %d is %s at the end" % (v.minor, v.state)
        deadline = time.time() + 120
        while self.client_down:
            self.restart_quiet_clients()
            assert time.time() < deadline, "killed clients never restarted"
            time.sleep(0.1)

    def finish(self):
        ctl = self.ctl
        self.sample(ctl, "driver stopped")
        self.t_end = self.elapsed()
        open(self.stopfile, "w").close()
        t = time.time()
        for c, p in self.procs.items():
            rc = p.wait(timeout=600)
            if rc != 0:
                with open(str(self.tmp / ("client%d.err" % c))) as f:
                    self.failures.append("client %d exited with %d: %s" % (c, rc, f.read()[-3000:]))
        self.say("soak: clients verified every byte in %.0f s" % (time.time() - t))
        for g in self.guests:
            self.verify_guest_vbd(g)
        self.sample(ctl, "all verified")
        for v in self.vbds:
            ctl.call("destroy", minor=v.minor)
        deadline = time.time() + 60
        while True:
            left = ctl.call("list")["result"]["vbds"]
            if not left:
                break
            assert time.time() < deadline, "vbds left after destroy: %s" % left
            time.sleep(0.1)
        self.sample(ctl, "all destroyed")
        time.sleep(IDLE_TRIM_WAIT)
        self.end = (rss_bytes(self.pid), fd_count(self.pid))
        self.end_fds = fd_targets(self.pid)
        self.end_parts = rss_parts(self.pid)
        self.sample(ctl, "idle, pools trimmed")
        self.collect()

    def verify_guest_vbd(self, g):
        """Every byte of a guest's vbd over NBD: the region against the
        guest's model (a sector in doubt may hold either), the rest as it
        started."""
        v = g.vbd
        region = GUEST_REGION_MB * MiB
        sectors = region // 512
        with open(g.state, "rb") as f:
            st = f.read()
        shadow, pending, busy = st[:region], st[region:2 * region], st[2 * region:]
        h = nbd.NBD()
        h.connect_unix(self.srv.nbd_path(v.minor))
        bad = 0
        for off in range(0, v.size, MiB):
            data = h.pread(MiB, off)
            if off < region:
                if data == shadow[off:off + MiB]:
                    continue
                for s in range(off // 512, off // 512 + MiB // 512):
                    got = data[s * 512 - off:(s + 1) * 512 - off]
                    if got == shadow[s * 512:(s + 1) * 512]:
                        continue
                    if busy[s] == 2 and got == pending[s * 512:(s + 1) * 512]:
                        continue
                    bad += 1
            else:
                want = b"".join(block_data(v.init(b), b)
                                for b in range(off // BLOCK, (off + MiB) // BLOCK))
                if data != want:
                    bad += sum(1 for i in range(0, MiB, BLOCK)
                               if data[i:i + BLOCK] != want[i:i + BLOCK])
        h.shutdown()
        del h
        g.final_bad = bad
        g.in_doubt = sum(1 for s in range(sectors) if busy[s] == 2)

    def collect(self):
        r = {"minutes": self.minutes, "seconds": round(self.t_end), "seed": self.seed,
             "loops": self.loops, "vbds": len(self.vbds),
             "kinds": {k: n for k, n in LAYOUT}, "nbd_vbds": sum(1 for v in self.vbds if not v.guest),
             "guest_vbds": len(self.guests), "actions": dict(sorted(self.counts.items())),
             "client_kills": self.client_kills}
        r["nbd"] = self.client_totals()
        r["verified_bytes"] = sum(v.size for v in self.vbds)
        r["ram_bytes"] = sum(v.size for v in self.vbds if v.kind == "ram")
        per_client = {}
        unexplained, explained, mismatches, unverified = [], 0, 0, []
        for v in self.vbds:
            if v.guest:
                continue
            w = v.model.w
            c = per_client.setdefault(v.client + 1, {"explained": 0, "unexplained": 0,
                                                 "mismatches": 0, "connections": 0,
                                                 "resolved": 0})
            c["explained"] += w[H_ERR_EXPLAINED]
            c["unexplained"] += w[H_ERR_UNEXPLAINED]
            c["mismatches"] += w[H_MISMATCHES]
            c["connections"] += w[H_RECONNECTS]
            c["resolved"] += w[H_RESOLVED]
            explained += w[H_ERR_EXPLAINED]
            mismatches += w[H_MISMATCHES]
            if w[H_ERR_UNEXPLAINED]:
                unexplained.append(v.minor)
            if not w[H_FINAL_DONE] or w[H_FINAL_VERIFIED] != v.size // BLOCK:
                unverified.append(v.minor)
        r["nbd_clients"] = per_client
        reasons = {}
        for c in self.clients:
            path = str(self.tmp / ("client%d.log" % c))
            if not os.path.exists(path):
                continue
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    if rec.get("mismatch"):
                        self.failures.append("client %d: %s" % (c, line.strip()))
                        continue
                    key = (rec["client"], rec["reason"] or "UNEXPLAINED: " + rec["error"])
                    reasons[key] = reasons.get(key, 0) + 1
        r["error_reasons"] = [{"client": c, "reason": why, "count": n}
                              for (c, why), n in sorted(reasons.items())]
        if unexplained:
            self.failures.append("requests failed on vbds never force-closed: minors %s" %
                                 unexplained)
        if mismatches:
            self.failures.append("%d NBD reads did not match the model" % mismatches)
        if unverified:
            self.failures.append("vbds not verified to the last byte: minors %s" % unverified)
        gs = []
        for g in self.guests:
            gs.append({"minor": g.vbd.minor, "kind": g.vbd.kind, "sessions": g.sessions,
                       "killed": g.killed_sessions, "queues": g.queues, "order": g.order,
                       "indirect": g.indirect, "persistent": g.persistent,
                       "discard": g.discard, "errors": g.errors, "mismatches": g.mismatches,
                       "final_bad_units": g.final_bad, "in_doubt_sectors": g.in_doubt,
                       **g.counts})
            self.failures += ["guest on minor %d: %s" % (g.vbd.minor, f) for f in g.failures]
            if g.errors or g.mismatches or g.final_bad:
                self.failures.append("guest on minor %d: %d errors, %d mismatches, %d bad "
                                     "at the end" % (g.vbd.minor, g.errors, g.mismatches,
                                                     g.final_bad))
        r["guests"] = gs
        r["fclosed_vbds"] = sorted(v.minor for v in self.vbds if v.fclosed)
        r["nbd_errors_explained"] = explained
        r["snapshots"] = sum(v.snapshots for v in self.vbds)
        r["baseline"] = {"rss": self.baseline[0], "fds": self.baseline[1],
                         "parts": self.baseline_parts}
        r["end"] = {"rss": self.end[0], "fds": self.end[1], "parts": self.end_parts}
        r["peak"] = {"rss": max(s["rss"] for s in self.samples),
                     "fds": max(s["fds"] for s in self.samples)}
        slack = max(RSS_SLACK_FRACTION * self.baseline[0], RSS_SLACK_BYTES)
        r["rss_tolerance"] = slack
        # ASan keeps freed memory in quarantine: its RSS says nothing of leaks
        # (LeakSanitizer does, at the server's exit)
        r["rss_checked"] = "ASAN_OPTIONS" not in os.environ
        if r["rss_checked"] and self.end[0] > self.baseline[0] + slack:
            self.failures.append("RSS %.1f MiB at the end, baseline %.1f MiB (+%.1f allowed)" % (
                self.end[0] / MiB, self.baseline[0] / MiB, slack / MiB))
        if self.end[1] != self.baseline[1]:
            b, e = self.baseline_fds, self.end_fds
            self.failures.append("%d fds at the end, %d at the baseline: gone %s, new %s" % (
                self.end[1], self.baseline[1],
                {k: v for k, v in b.items() if e.get(k) != v},
                {k: v for k, v in e.items() if b.get(k) != v}))
        r["samples"] = self.samples
        r["driver_log"] = self.actions
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        r["machine"] = "%s, %s, %d CPUs" % (platform.node() or "?", platform.platform(),
                                            os.cpu_count())
        self.report = r

    def stop_server(self):
        """Stops the server (SIGTERM): exit 0, a clean log."""
        try:
            self.xen.close()
        except AssertionError as e:
            self.failures.append(str(e)[:4000])
        finally:
            if self.xen.xsd.poll() is None:     # close stops at a failed check
                self.xen.xsd.terminate()
                self.xen.xsd.wait()

    def cleanup(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for g in getattr(self, "guests", []):
            if g.proc and g.proc.poll() is None:
                g.proc.kill()
                g.proc.wait()


def curve(samples):
    lines = ["| t (s) | RSS (MiB) | fds | vbds | NBD conns | rings | server reqs | "
             "server read (MiB) | server written (MiB) | NBD client ops | |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in samples:
        lines.append("| %d | %.1f | %d | %d | %d | %d | %d | %.0f | %.0f | %d | %s |" % (
            s["t"], s["rss"] / MiB, s["fds"], s["vbds"], s["nbd_conns"], s["rings"],
            s["server_reqs"], s.get("server_read", 0) / MiB, s.get("server_written", 0) / MiB,
            s["client_ops"], s["note"]))
    return "\n".join(lines)


def summary(r):
    """The report as text (the test prints it; tests/soak/run writes it)."""
    n = r["nbd"]
    stopped = next((x for x in r["samples"] if x["note"] == "driver stopped"), {})
    out = ["%d vbds (%s) on --loops %d, %d s of load (SOAK_MINUTES=%s), seed %d" % (
        r["vbds"], ", ".join("%s %d" % kv for kv in r["kinds"].items()), r["loops"],
        r["seconds"], r["minutes"], r["seed"]),
        "",
        "NBD clients (%d vbds, %d processes): %d reads (%.1f MiB), %d writes (%.1f MiB), "
        "%d write-zeroes, %d flushes; then the final pass read and checked every byte of "
        "every vbd (%.0f MiB, the guests' vbds included)" % (
            r["nbd_vbds"], len(r["nbd_clients"]), n["reads"], n["bytes_read"] / MiB, n["writes"],
            n["bytes_written"] / MiB, n["zeroes"], n["flushes"],
            r.get("verified_bytes", 0) / MiB),
        "", "Server side, all vbds (their stats when the load stopped; a force-closed vbd's "
        "counters start again at its reopen): %d requests, %.1f MiB read, %.1f MiB written" % (
            stopped.get("server_reqs", 0), stopped.get("server_read", 0) / MiB,
            stopped.get("server_written", 0) / MiB),
        "", "| client | errors explained | unexplained | mismatches | connections | "
        "in-doubt blocks settled |", "|---|---|---|---|---|---|"]
    for c, x in sorted(r["nbd_clients"].items()):
        out.append("| %s | %d | %d | %d | %d | %d |" % (c, x["explained"], x["unexplained"],
                                                         x["mismatches"], x["connections"],
                                                         x["resolved"]))
    out += ["", "Errors by reason:", ""]
    out += ["- client %d: %d x %s" % (e["client"], e["count"], e["reason"])
            for e in r["error_reasons"]] or ["- none"]
    out += ["", "Guests (blkfront_sim --verify, sessions one after another):", "",
            "| minor | image | queues | order | indirect | persistent | discard | sessions | "
            "killed | reads | writes | discards | flushes | errors | mismatches | bad at end | "
            "in doubt |", "|" + "---|" * 17]
    for g in r["guests"]:
        out.append("| %d | %s | %d | %d | %s | %s | %s | %d | %d | %d | %d | %d | %d | %d | %d "
                   "| %d | %d |" % (g["minor"], g["kind"], g["queues"], g["order"],
                                    g["indirect"], g["persistent"], g["discard"], g["sessions"],
                                    g["killed"], g["reads"], g["writes"], g["discards"],
                                    g["flushes"], g["errors"], g["mismatches"],
                                    g["final_bad_units"], g["in_doubt_sectors"]))
    out += ["", "Driver actions: " + ", ".join("%s %d" % kv for kv in r["actions"].items()),
            "(%d snapshots in all; vbds force-closed at least once: %d)" % (
                r["snapshots"], len(r["fclosed_vbds"])),
            "",
            "Server: baseline RSS %.1f MiB, %d fds; peak %.1f MiB, %d fds; end (every vbd "
            "destroyed, pools idle %d s) %.1f MiB, %d fds; tolerance +%.1f MiB%s, fds exact" % (
                r["baseline"]["rss"] / MiB, r["baseline"]["fds"], r["peak"]["rss"] / MiB,
                r["peak"]["fds"], IDLE_TRIM_WAIT, r["end"]["rss"] / MiB, r["end"]["fds"],
                r["rss_tolerance"] / MiB,
                "" if r.get("rss_checked", True) else " (not checked: ASan)"),
            "(RSS during the run holds the ram: disks' data as it is written, up to %.0f MiB, "
            "and the images' metadata caches and the connections' buffers; descriptors grow "
            "with each snapshot's new image, opened buffered and O_DIRECT)" % (
                r.get("ram_bytes", 0) / MiB),
            "RSS by mapping, baseline -> end: %s" % ", ".join(
                "%s %.1f -> %.1f MiB" % (k, r["baseline"].get("parts", {}).get(k, 0) / MiB,
                                         r["end"].get("parts", {}).get(k, 0) / MiB)
                for k in ("heap", "anon", "files")),
            "", curve(r["samples"])]
    return "\n".join(out)


def markdown(r):
    """tests/soak/RESULTS.md."""
    fails = r.get("failures") or []
    out = ["# Soak: the last `make soak`", "",
           "%s, %s. SOAK_MINUTES=%s: %d s of load, then the final checks. Verdict: %s." % (
               r["date"], r["machine"], r["minutes"], r["seconds"],
               "passed" if not fails else "FAILED (%d failures, below)" % len(fails)),
           "",
           "What runs (tests/integration/soak.py): every NBD client's read is checked as it",
           "comes back and, at the end, every byte of every vbd; a write that was never",
           "acknowledged (its connection cut by a force-close, its process killed) leaves its",
           "blocks in doubt, either value accepted, until a read settles them. An error is",
           "explained only if the driver force-closed that vbd after the connection was made.",
           "RSS and descriptors: baseline before the first open, end after every vbd is",
           "destroyed and the loops' buffer pools have been idle for %d s (trimmed)." %
           IDLE_TRIM_WAIT, "", summary(r), ""]
    if fails:
        out += ["## Failures", ""] + ["- " + f for f in fails] + [""]
    log = r.get("driver_log") or []
    out += ["## The driver's log", "",
            "Every action, in order (seconds since the clients started; minor; what; outcome).",
            "", "<details><summary>%d lines</summary>" % len(log), "", "```"]
    out += ["%8.2f %-15s %5s %s %s" % (t, a, "-" if m is None else m, d, o)
            for t, a, m, d, o in log]
    out += ["```", "", "</details>", ""]
    return "\n".join(out)


def soak(tmp, minutes, seed=1, loops=2, log=print):
    """Runs it; returns (report, failures)."""
    s = Soak(tmp, minutes, seed, loops, log)
    try:
        s.start()
        s.run()
    finally:
        s.cleanup()
        if getattr(s, "xen", None):
            s.stop_server()
    return getattr(s, "report", None), s.failures
