"""Scaling over loops in `make bench` (`--only loops`): four vbds driven at
once, tapdiskd with --loops 1 against --loops 2, and against four nbdkit
processes (one per image, as a host running a process per disk would).

NBD: one fio process, four jobs (nbd engine, 4 KiB QD32 each, one per vbd's
UNIX socket), aggregate IOPS. blkif: four simulated guests at once
(tests/blkfront_sim --bench, 4 KiB QD32 reads on ram disks, each filled
first so that reads copy data), aggregate
requests/s. Each configuration runs once per round, in an order that
rotates from round to round; the table gives the medians, and the ratios
within one round (the only figures this shared machine makes meaningful).
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from fill import fill_vbd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.environ.get("TAPDISKD_BIN_DIR", os.path.join(ROOT, "build", "bin"))
SIM = os.path.join(ROOT, "build", "tests", "blkfront_sim")
XENSTORED = os.path.join(ROOT, "tests", "xen", "xenstored.py")
VBDS = 4
RING_REGION_MB = 256
WORKLOADS = [("4k randwrite QD32 x4", "randwrite"), ("4k randread QD32 x4", "randread")]


def wait_path(path, proc, timeout=20):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("%s did not appear" % path)
        time.sleep(0.05)


class TapdiskdLoops:
    def __init__(self, tmp, loops, images, env=None, xen_sim=None):
        self.state = os.path.join(tmp, "td%d" % loops)
        args = [os.path.join(BIN, "tapdiskd"), "--state-dir", self.state, "--foreground",
                "--log-level", "warning", "--loops", str(loops)]
        if xen_sim:
            args += ["--xen-sim", xen_sim]
        self.proc = subprocess.Popen(args, env=env)
        wait_path(os.path.join(self.state, "ctl.sock"), self.proc)
        self.socks = [subprocess.run([os.path.join(BIN, "tap-ctl"), "-S", self.state, "create",
                                      "-a", params], capture_output=True, text=True,
                                     check=True).stdout.strip() for params in images]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class NbdkitEach:
    def __init__(self, tmp, images):
        self.procs, self.socks = [], []
        for i, img in enumerate(images):
            sock = os.path.join(tmp, "nbdkit%d.sock" % i)
            if os.path.exists(sock):
                os.unlink(sock)
            p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", img.split(":", 1)[1]],
                                 stderr=subprocess.DEVNULL)
            wait_path(sock, p)
            self.procs.append(p)
            self.socks.append(sock)

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
            p.wait(30)


def fio_aggregate(socks, rw, runtime):
    args = ["fio", "--output-format=json", "--ioengine=nbd", "--time_based",
            "--runtime=%d" % runtime, "--size=256M", "--rw=" + rw, "--bs=4k", "--iodepth=32",
            "--randrepeat=0"]
    for i, s in enumerate(socks):
        args += ["--name=j%d" % i, "--uri=nbd+unix:///?socket=" + s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    jobs = json.loads(out[out.index("{"):])["jobs"]
    return sum(j["read"]["iops"] + j["write"]["iops"] for j in jobs)


def nbd_scaling(tmp, runtime, rounds):
    images = []
    for i in range(VBDS):
        img = os.path.join(tmp, "loops%d.img" % i)
        subprocess.run(["fio", "--name=fill", "--filename=" + img, "--size=256M", "--rw=write",
                        "--bs=1M", "--ioengine=psync", "--output=/dev/null"], check=True)
        images.append("aio:" + img)
    configs = [("tapdiskd --loops 1", lambda: TapdiskdLoops(tmp, 1, images)),
               ("tapdiskd --loops 2", lambda: TapdiskdLoops(tmp, 2, images)),
               ("4 x nbdkit", lambda: NbdkitEach(tmp, images))]
    res = {}
    for wname, rw in WORKLOADS:
        per_round = []
        for r in range(rounds):
            got = {}
            for k in range(len(configs)):
                name, start = configs[(k + r) % len(configs)]
                srv = start()
                try:
                    got[name] = fio_aggregate(srv.socks, rw, runtime)
                finally:
                    srv.stop()
                print("%-22s %-20s %10.0f IOPS" % (wname, name, got[name]), file=sys.stderr)
            per_round.append(got)
        res[wname] = per_round
    return res


def xs(env, *args):
    subprocess.run(["xenstore-" + args[0]] + [str(a) for a in args[1:]], env=env, check=True,
                   capture_output=True)


def ring_round(tmp, loops, runtime):
    """Four guests at once on four ram vbds: aggregate requests/s."""
    d = os.path.join(tmp, "ring%d" % loops)
    os.makedirs(os.path.join(d, "sim"))
    env = dict(os.environ, XENSTORED_PATH=os.path.join(d, "xs.sock"))
    xsd = subprocess.Popen([sys.executable, XENSTORED, os.path.join(d, "xs.sock")],
                           stdout=subprocess.PIPE, text=True)
    assert xsd.stdout.readline().strip() == "ready"
    srv = None
    try:
        srv = TapdiskdLoops(d, loops, ["ram:%dM" % RING_REGION_MB] * VBDS, env=env,
                            xen_sim=os.path.join(d, "sim"))
        for sock in srv.socks:
            fill_vbd(sock, "%dM" % RING_REGION_MB)     # reads copy data, not holes
        guests = []
        for i, sock in enumerate(srv.socks):
            dom = 2 + i
            be = "/local/domain/0/backend/vbd3/%d/51712" % dom
            fe = "/local/domain/%d/device/vbd/51712" % dom
            xs(env, "write", be + "/physical-device-path", sock, be + "/frontend", fe,
               be + "/frontend-id", dom)
            guests.append(subprocess.Popen(
                [SIM, "--dir", os.path.join(d, "sim"), "--domid", str(dom), "--backend", be,
                 "--bench", "--bs", "4096", "--qd", "32", "--rw", "randread", "--order", "2",
                 "--seconds", str(runtime), "--region-mb", str(RING_REGION_MB), "--mem-mb", "256"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        total = 0.0
        for g in guests:
            out, err = g.communicate(timeout=runtime + 60)
            if g.returncode:
                raise RuntimeError("blkfront_sim: %s" % err)
            total += json.loads(out.strip().splitlines()[-1])["iops"]
        return total
    finally:
        if srv:
            srv.stop()
        xsd.terminate()
        xsd.wait()


def ring_scaling(tmp, runtime, rounds):
    per_round = []
    for r in range(rounds):
        got = {}
        for loops in ([1, 2] if r % 2 == 0 else [2, 1]):
            got["tapdiskd --loops %d" % loops] = ring_round(os.path.join(tmp, "r%d" % r),
                                                            loops, runtime)
            print("ring 4 guests  loops %d %10.0f req/s" % (loops, got["tapdiskd --loops %d" %
                                                                    loops]), file=sys.stderr)
        per_round.append(got)
    return per_round


def ratio(rounds, a, b):
    return statistics.median(r[a] / r[b] for r in rounds if r[b])


def loops_bench(tmp, runtime, rounds):
    """The markdown of the loops part."""
    nbd = nbd_scaling(tmp, runtime, rounds)
    ring = ring_scaling(tmp, runtime, rounds)
    lines = ["### Scaling over loops (4 vbds at once; median of %d rotating rounds, %d s each)"
             % (rounds, runtime), "",
             "| workload | --loops 1 | --loops 2 | 4 x nbdkit | loops 2 / loops 1 | "
             "loops 2 / 4 x nbdkit |", "|---|---|---|---|---|---|"]
    one, two, kit = "tapdiskd --loops 1", "tapdiskd --loops 2", "4 x nbdkit"
    for wname, _ in WORKLOADS:
        rs = nbd[wname]
        lines.append("| NBD %s | %.0f IOPS | %.0f | %.0f | %.2fx | %.2fx |" % (
            wname, statistics.median(r[one] for r in rs), statistics.median(r[two] for r in rs),
            statistics.median(r[kit] for r in rs), ratio(rs, two, one), ratio(rs, two, kit)))
    lines.append("| blkif 4 guests 4k randread QD32 (ram) | %.0f req/s | %.0f | - | %.2fx | - |"
                 % (statistics.median(r[one] for r in ring),
                    statistics.median(r[two] for r in ring), ratio(ring, two, one)))
    lines.append("")
    lines.append("Targets: loops 2 / loops 1 >= 1.3x (NBD and blkif), loops 2 / 4 x nbdkit "
                 ">= 1.0x. The clients (fio, the simulated guests) share the two cores.")
    return "\n".join(lines)
