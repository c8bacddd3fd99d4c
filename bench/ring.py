"""The blkif ring benchmark (part of make bench; `bench/run --only ring`
runs it alone): tests/blkfront_sim as the guest, on tapdiskd's simulated
grant/event-channel port, against a ram: vbd and a raw file on /dev/shm.
tapdiskd is pinned to CPU 0 and the guest to CPU 1, so the backend has one
core. Each row is requests/s and GB/s, and the ratio of its GB/s to a plain
memcpy of blocks of the same size on the same machine (the ceiling of a
design that copies each byte into a bounce buffer). Rows marked
"persistent" negotiate feature-persistent (blkfront_sim --persistent): the
backend memcpys through guest pages it keeps mapped instead of asking the
port for a grant copy; the others are the same workloads without it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from fill import fill_vbd

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "build", "bin")
SIM = os.path.join(ROOT, "build", "tests", "blkfront_sim")
XENSTORED = os.path.join(ROOT, "tests", "xen", "xenstored.py")

# name, sim args (bs, qd, rw), ring order, indirect, persistent grants
RING_WORKLOADS = [
    ("4k randread QD32", 4096, 32, "randread", 0, True, False),
    ("4k randread QD32, persistent", 4096, 32, "randread", 0, True, True),
    ("4k randwrite QD32", 4096, 32, "randwrite", 0, True, False),
    ("4k randwrite QD32, persistent", 4096, 32, "randwrite", 0, True, True),
    ("4k randread QD128", 4096, 128, "randread", 2, True, False),
    ("4k randwrite QD128", 4096, 128, "randwrite", 2, True, False),
    ("64k read QD32, indirect", 65536, 32, "read", 0, True, False),
    ("64k read QD32, indirect, persistent", 65536, 32, "read", 0, True, True),
    ("64k read QD32, no indirect", 65536, 32, "read", 0, False, False),
    ("64k write QD32, indirect", 65536, 32, "write", 0, True, False),
    ("64k write QD32, indirect, persistent", 65536, 32, "write", 0, True, True),
    ("1M read QD8, indirect", 1 << 20, 8, "read", 0, True, False),
    ("1M read QD8, indirect, persistent", 1 << 20, 8, "read", 0, True, True),
    ("1M read QD32, no indirect", 1 << 20, 32, "read", 0, False, False),
    ("1M write QD8, indirect", 1 << 20, 8, "write", 0, True, False),
    ("1M write QD8, indirect, persistent", 1 << 20, 8, "write", 0, True, True),
]
DISKS = [("ram", "ram:1G"), ("raw /dev/shm", None)]
REGION_MB = 1024
REGION = "%dM" % REGION_MB


def pinned(cpu):
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() > 1 else []


class RingBench:
    def __init__(self, tmp):
        self.tmp = os.path.join(tmp, "ring")
        os.makedirs(os.path.join(self.tmp, "sim"))
        self.xs_sock = os.path.join(self.tmp, "xs.sock")
        self.env = dict(os.environ, XENSTORED_PATH=self.xs_sock)
        self.xsd = subprocess.Popen([sys.executable, XENSTORED, self.xs_sock],
                                    stdout=subprocess.PIPE, text=True)
        assert self.xsd.stdout.readline().strip() == "ready"
        self.state = os.path.join(self.tmp, "td")
        self.proc = subprocess.Popen(pinned(0) + [
            os.path.join(BIN, "tapdiskd"), "--state-dir", self.state, "--foreground",
            "--log-level", "warning", "--xen-sim", os.path.join(self.tmp, "sim")], env=self.env)
        deadline = time.time() + 20
        while not os.path.exists(os.path.join(self.state, "ctl.sock")):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("tapdiskd did not start")
            time.sleep(0.05)
        self.domid = 1

    def tapctl(self, *args):
        return subprocess.run([os.path.join(BIN, "tap-ctl"), "-S", self.state] + list(args),
                              capture_output=True, text=True, check=True).stdout.strip()

    def xs(self, *args):
        subprocess.run(["xenstore-" + args[0]] + [str(a) for a in args[1:]], env=self.env,
                       check=True, capture_output=True)

    def run(self, nbd, bs, qd, rw, order, indirect, persistent, secs):
        """One guest, one disk, one workload: a fresh domain each time."""
        self.domid += 1
        d = self.domid
        be = "/local/domain/0/backend/vbd3/%d/51712" % d
        fe = "/local/domain/%d/device/vbd/51712" % d
        self.xs("write", be + "/physical-device-path", nbd, be + "/frontend", fe,
                be + "/frontend-id", d)
        args = pinned(1) + [SIM, "--dir", os.path.join(self.tmp, "sim"), "--domid", d,
                            "--backend", be, "--bench", "--bs", bs, "--qd", qd, "--rw", rw,
                            "--order", order, "--seconds", secs, "--region-mb", REGION_MB,
                            "--mem-mb", 256]
        if indirect:
            args.append("--indirect")
        if persistent:
            args.append("--persistent")
        r = subprocess.run([str(a) for a in args], env=self.env, capture_output=True,
                           text=True, timeout=secs + 60)
        self.xs("rm", fe)
        self.xs("rm", be)
        if r.returncode:
            raise RuntimeError("blkfront_sim: %s" % r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if res["persistent"] != persistent:
            raise RuntimeError("blkfront_sim: persistent grants %s, asked %s" % (
                res["persistent"], persistent))
        return res

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.xsd.terminate()
        self.xsd.wait()


def memcpy_gbps(bs, secs=2):
    r = subprocess.run([SIM, "--memcpy", "--bs", str(bs), "--seconds", str(secs)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["gbps"]


def ring_bench(tmp, runtime, rounds):
    """Returns the markdown table of the ring benchmark."""
    image = os.path.join(tmp, "ring.img")
    subprocess.run(["fio", "--name=fill", "--filename=" + image, "--size=1G", "--rw=write",
                    "--bs=1M", "--ioengine=psync", "--output=/dev/null"], check=True)
    ceiling = {bs: memcpy_gbps(bs) for bs in sorted({w[1] for w in RING_WORKLOADS})}
    b = RingBench(tmp)
    rows = []
    try:
        socks = {}
        for name, params in DISKS:
            socks[name] = b.tapctl("create", "-a", params or "aio:" + image)
            if params:
                fill_vbd(socks[name], REGION)   # reads copy data, not holes
        for wname, bs, qd, rw, order, indirect, persistent in RING_WORKLOADS:
            for dname, _ in DISKS:
                best = None
                for _ in range(rounds):
                    r = b.run(socks[dname], bs, qd, rw, order, indirect, persistent, runtime)
                    if r["errors"]:
                        raise RuntimeError("%s on %s: %d errors" % (wname, dname, r["errors"]))
                    if best is None or r["gbps"] > best["gbps"]:
                        best = r
                rows.append((wname, dname, best, ceiling[bs]))
                print("%-36s %-14s %10.0f req/s %7.2f GB/s" % (wname, dname, best["iops"],
                                                               best["gbps"]), file=sys.stderr)
    finally:
        b.stop()
        os.unlink(image)
    lines = ["| ring workload | disk | requests/s | GB/s | memcpy GB/s | of memcpy |",
             "|---|---|---|---|---|---|"]
    for wname, dname, r, cap in rows:
        lines.append("| %s | %s | %.0f | %.2f | %.2f | %.0f%% |" % (
            wname, dname, r["iops"], r["gbps"], cap, 100 * r["gbps"] / cap))
    return "\n".join(lines) + "\n"
