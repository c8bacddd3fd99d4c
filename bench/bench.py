#!/usr/bin/python3
"""make bench: the same fio workloads (nbd engine, UNIX socket, a 1 GiB raw
image on /dev/shm) against tapdiskd, qemu-storage-daemon and nbdkit's file
plugin, one after the other in one run; VHD and qcow2 images against
qemu-storage-daemon's vpc and qcow2 drivers (`--only vhd|qcow2` runs one of
those); then tapdiskd's memory: idle RSS
and RSS with 100 open vbds; then the blkif ring benchmark (bench/ring.py;
`--only ring` runs just that); QoS, allocations and server CPU and system
calls per request (bench/cpu.py, `--only cpu`); the rbd: driver against
qemu-storage-daemon's on one image of a Ceph cluster started for it
(bench/rbdbench.py, `--only rbd`). Prints a markdown report (ratios tapdiskd/peer)
and writes it to bench/out/latest.md. Numbers are only comparable within
one run on one machine."""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from allocs import alloc_bench  # noqa: E402
from batched_client import batched_requests  # noqa: E402
from cpu import cpu_bench  # noqa: E402
from qos import qos_bench  # noqa: E402
from ring import ring_bench  # noqa: E402
from loops import loops_bench  # noqa: E402
from cbt import cbt_bench, cbt_table  # noqa: E402
from mirror import mirror_bench, mirror_table  # noqa: E402
from rbdbench import rbd_bench  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "build", "bin")

WORKLOADS = [
    # name, fio args, metric
    ("4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops"),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops"),
    ("1M read QD8", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw"),
    ("1M write QD8", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw"),
]


def wait_socket(path, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited early: %s" % proc.args)
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError("no socket " + path)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Tapdiskd:
    name = "tapdiskd"

    def __init__(self, tmp, image, engine, fmt="aio", env=None, bin_dir=BIN, cbt_log=None,
                 extra=()):
        self.state = os.path.join(tmp, "td")
        self.proc = subprocess.Popen([os.path.join(bin_dir, "tapdiskd"), "--state-dir", self.state,
                                      "--foreground", "--io-engine", engine, "--log-level", "warning"] +
                                     list(extra), env=env)
        wait_socket(os.path.join(self.state, "ctl.sock"), self.proc)
        r = subprocess.run([os.path.join(bin_dir, "tap-ctl"), "-S", self.state, "create", "-a",
                            fmt + ":" + image] + (["-C", cbt_log] if cbt_log else []),
                           capture_output=True, text=True, check=True)
        self.sock = r.stdout.strip()

    def ctl(self, cmd, **args):
        """One control request; its result, or an exception with the server's message."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(self.state, "ctl.sock"))
        s.sendall((json.dumps({"id": 1, "cmd": cmd, "args": args}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            d = s.recv(65536)
            if not d:
                break
            buf += d
        s.close()
        r = json.loads(buf)
        if not r["ok"]:
            raise RuntimeError("%s: %s" % (cmd, r["error"]["message"]))
        return r.get("result")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class QemuStorageDaemon:
    name = "qemu-storage-daemon"

    def __init__(self, tmp, image, fmt="raw"):
        self.sock = os.path.join(tmp, "qsd.sock")
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", "driver=file,node-name=file0,filename=%s,cache.direct=off,aio=io_uring" % image,
            "--blockdev", "driver=%s,node-name=disk0,file=file0" % fmt,
            "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
            "--export", "type=nbd,id=e0,node-name=disk0,name=,writable=on"],
            stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.proc)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Nbdkit:
    name = "nbdkit-file"

    def __init__(self, tmp, image):
        self.sock = os.path.join(tmp, "nbdkit.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)        # nbdkit leaves it behind
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", self.sock, "file", image],
                                     stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.proc)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def run_fio(sock, args, runtime):
    cmd = ["fio", "--output-format=json", "--name=bench", "--ioengine=nbd",
           "--uri=nbd+unix:///?socket=" + sock, "--time_based", "--runtime=%d" % runtime,
           "--ramp_time=1", "--size=1G", "--randrepeat=0"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]   # fio may print notes first
    rw = "read" if job["read"]["io_bytes"] else "write"
    return {"iops": job[rw]["iops"], "bw": job[rw]["bw_bytes"] / (1 << 20),
            "lat_p99_us": job[rw]["clat_ns"]["percentile"].get("99.000000", 0) / 1000}


FORMAT_WORKLOADS = [
    # name ({} is the format), fio args, metric, image state
    ("4k randwrite QD32, fresh {} (allocating)", ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
     "iops", "fresh"),
    ("4k randread QD32, allocated {}", ["--rw=randread", "--bs=4k", "--iodepth=32"],
     "iops", "full"),
    ("4k randwrite QD32, allocated {}", ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
     "iops", "full"),
    ("1M write QD8, fresh {}", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw", "fresh"),
]
QCOW2_EXTRA = [("1M read QD8, allocated {}", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw", "full")]

# format: (tapdiskd type, qemu-storage-daemon driver, label, extra workloads)
FORMATS = {"vhd": ("vhd", "vpc", "VHD", []), "qcow2": ("qcow2", "qcow2", "qcow2", QCOW2_EXTRA)}


def format_images(tmp, engine, fmt):
    """A fresh 1 GiB image (vhd-util's dynamic VHD, qemu-img's qcow2 with 64 KiB
    clusters), and one with every block written (a copy is served per run, so
    each run starts from the same state)."""
    fresh = os.path.join(tmp, "fresh." + fmt)
    full = os.path.join(tmp, "full." + fmt)
    if fmt == "vhd":
        subprocess.run([os.path.join(BIN, "vhd-util"), "create", "-n", fresh, "-s", "1024"], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", fresh, "1G"], check=True)
    shutil.copyfile(fresh, full)
    srv = Tapdiskd(tmp, full, engine, FORMATS[fmt][0])
    try:
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + srv.sock,
                        "--rw=write", "--bs=1M", "--iodepth=8", "--size=1G", "--output=/dev/null"],
                       check=True)
    finally:
        srv.stop()
    return {"fresh": fresh, "full": full}


def format_bench(tmp, engine, runtime, rounds, fmt):
    """tapdiskd and qemu-storage-daemon on the same image files of one format."""
    td_type, qsd_driver, label, extra = FORMATS[fmt]
    images = format_images(tmp, engine, fmt)
    work = os.path.join(tmp, "work." + fmt)
    results = {}
    for wname, wargs, metric, state in FORMAT_WORKLOADS + extra:
        wname = wname.format(label)
        for sname in ("tapdiskd", "qemu-storage-daemon"):
            best = None
            for _ in range(rounds):
                shutil.copyfile(images[state], work)
                srv = (Tapdiskd(tmp, work, engine, td_type) if sname == "tapdiskd"
                       else QemuStorageDaemon(tmp, work, qsd_driver))
                try:
                    r = run_fio(srv.sock, wargs, runtime)
                finally:
                    srv.stop()
                if best is None or r[metric] > best[metric]:
                    best = r
            results[(wname, sname)] = best
            print("%-46s %-20s %10.0f %s" % (wname, sname, best[metric],
                                             "IOPS" if metric == "iops" else "MiB/s"),
                  file=sys.stderr)
    os.unlink(work)
    for f in images.values():
        os.unlink(f)
    return results


def format_table(fmt, res, raw_iops=None):
    """The markdown table of one format's rows (vs raw: tapdiskd's raw rows, when run)."""
    td_type, qsd_driver, label, extra = FORMATS[fmt]
    lines = ["| %s workload | tapdiskd %s | qemu-storage-daemon %s | tapdiskd/qsd | tapdiskd %s/raw |"
             % (label, td_type, qsd_driver, td_type), "|---|---|---|---|---|"]
    for wname, _, metric, state in FORMAT_WORKLOADS + extra:
        wname = wname.format(label)
        t = res[(wname, "tapdiskd")][metric]
        q = res[(wname, "qemu-storage-daemon")][metric]
        unit = "IOPS" if metric == "iops" else "MiB/s"
        kind = "randread" if "randread" in wname else "randwrite"
        vs_raw = "-"
        if raw_iops and state == "full" and metric == "iops":
            vs_raw = "%.2fx" % (t / raw_iops[kind])
        lines.append("| %s | %.0f %s | %.0f | %.2fx | %s |" % (wname, t, unit, q, t / q if q else 0,
                                                              vs_raw))
    return "\n".join(lines)


def memory(tmp, engine):
    state = os.path.join(tmp, "mem")
    p = subprocess.Popen([os.path.join(BIN, "tapdiskd"), "--state-dir", state, "--foreground",
                          "--io-engine", engine, "--log-level", "warning"])
    wait_socket(os.path.join(state, "ctl.sock"), p)
    time.sleep(0.5)
    idle = rss_kb(p.pid)
    for i in range(100):
        img = os.path.join(tmp, "m%03d.img" % i)
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        subprocess.run([os.path.join(BIN, "tap-ctl"), "-S", state, "create", "-a", "aio:" + img],
                       check=True, capture_output=True)
    time.sleep(0.5)
    hundred = rss_kb(p.pid)
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    return idle, hundred


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s, %d CPUs, %s, Linux %s" % (model, os.cpu_count(), platform.machine(),
                                         platform.release())


def qos_part(tmp, a, image=None):
    if image is None:
        image = os.path.join(tmp, "bench.img")
        subprocess.run(["fio", "--name=fill", "--filename=" + image, "--size=1G", "--rw=write",
                        "--bs=1M", "--ioengine=psync", "--output=/dev/null"], check=True)
    return qos_bench(Tapdiskd, run_fio, wait_socket, os.path.join(BIN, "vhd-util"), tmp, image,
                     a.engine, a.runtime, a.rounds)


def allocs_part(tmp, a):
    """Allocations per request on a filled raw, vhd and qcow2 image of 64 MiB,
    and reads through an empty vhd and qcow2 child of the filled one (every
    read goes to the parent)."""
    images = {}
    for label, fmt in (("raw", "aio"), ("vhd", "vhd"), ("qcow2", "qcow2")):
        path = os.path.join(tmp, "allocs." + label)
        if label == "raw":
            with open(path, "wb") as f:
                f.truncate(64 << 20)
        elif label == "vhd":
            subprocess.run([os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", "64"],
                           check=True)
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
        srv = Tapdiskd(tmp, path, a.engine, fmt)
        try:
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", "--rw=write", "--bs=1M",
                            "--uri=nbd+unix:///?socket=" + srv.sock, "--size=64M",
                            "--output=/dev/null"], check=True)
        finally:
            srv.stop()
        images[label] = (fmt, path, None)
    child = os.path.join(tmp, "allocs.vhd-child")
    subprocess.run([os.path.join(BIN, "vhd-util"), "snapshot", "-n", child, "-p",
                    images["vhd"][1]], check=True)
    images["vhd child (reads from its parent)"] = ("vhd", child, ("randread",))
    child = os.path.join(tmp, "allocs.qcow2-child")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", images["qcow2"][1],
                    "-F", "qcow2", child], check=True)
    images["qcow2 child (reads from its parent)"] = ("qcow2", child, ("randread",))
    return alloc_bench(tmp, images, lambda t, img, fmt, env: Tapdiskd(t, img, a.engine, fmt, env),
                       a.runtime)


def fill_image(tmp):
    """The 1 GiB raw image every raw row serves, full of data."""
    image = os.path.join(tmp, "bench.img")
    subprocess.run(["fio", "--name=fill", "--filename=" + image, "--size=1G", "--rw=write",
                    "--bs=1M", "--ioengine=psync", "--output=/dev/null"], check=True)
    return image


def cbt_part(tmp, a):
    """Changed-block tracking's cost on an allocated VHD (bench/cbt.py)."""
    images = format_images(tmp, a.engine, "vhd")
    rows = cbt_bench(Tapdiskd, run_fio, tmp, images["full"], a.engine, a.runtime, a.cpu_rounds)
    for f in images.values():
        os.unlink(f)
    return cbt_table(rows, a.runtime, a.cpu_rounds)


def mirror_part(tmp, a, image=None):
    """The mirror's copy rate against qsd's blockdev-mirror, and the guest during a job."""
    if image is None:
        image = fill_image(tmp)
    res = mirror_bench(Tapdiskd, run_fio, tmp, a.engine, image, a.runtime, a.cpu_rounds)
    return mirror_table(res, a.runtime, a.cpu_rounds)


def cpu_part(tmp, a, image=None):
    """Server CPU and system calls per 4k request, tapdiskd against its peers
    (and against the tapdiskd of --cpu-base, for an A/B of two builds)."""
    if image is None:
        image = fill_image(tmp)
    servers = [("tapdiskd", lambda: Tapdiskd(tmp, image, a.engine))]
    if a.cpu_base:
        servers.append(("tapdiskd-base", lambda: Tapdiskd(tmp, image, a.engine,
                                                          bin_dir=a.cpu_base)))
    servers += [("nbdkit-file", lambda: Nbdkit(tmp, image)),
                ("qemu-storage-daemon", lambda: QemuStorageDaemon(tmp, image))]
    # fio sends each request alone; the batched client sends 32 at once
    # (bench/batched_client.py): the cost per wake-up, then per request
    return "%s\n\n%s" % (
        cpu_bench(tmp, image, servers, a.runtime, a.cpu_rounds),
        cpu_bench(tmp, image, servers, a.runtime, a.cpu_rounds, batched_requests,
                  "a client sending 32 4k requests per send (bench/batched_client.py)"))


def rbd_part(tmp, a):
    """The rbd: driver against qemu-storage-daemon's on one RBD image (bench/rbdbench.py)."""
    return rbd_bench(tmp, a.engine, a.runtime, a.rounds, Tapdiskd, wait_socket)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=int(os.environ.get("BENCH_RUNTIME", "8")))
    ap.add_argument("--engine", default="uring")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "2")),
                    help="runs per server and workload; the best counts")
    ap.add_argument("--only", choices=["all", "ring", "qos", "vhd", "qcow2", "allocs", "cpu", "loops",
                                       "cbt", "mirror", "rbd"],
                    default="all")
    ap.add_argument("--cpu-rounds", type=int, default=int(os.environ.get("BENCH_CPU_ROUNDS", "3")),
                    help="alternating rounds of the CPU-per-request part; the median counts")
    ap.add_argument("--cpu-base", metavar="BIN_DIR",
                    help="also run the tapdiskd (and tap-ctl) of BIN_DIR in the CPU part")
    a = ap.parse_args()
    single = {"ring": lambda tmp: ring_bench(tmp, a.runtime, a.rounds),
              "qos": lambda tmp: qos_part(tmp, a),
              "allocs": lambda tmp: allocs_part(tmp, a),
              "cpu": lambda tmp: cpu_part(tmp, a),
              "loops": lambda tmp: loops_bench(tmp, a.runtime, a.cpu_rounds),
              "cbt": lambda tmp: cbt_part(tmp, a),
              "mirror": lambda tmp: mirror_part(tmp, a),
              "rbd": lambda tmp: rbd_part(tmp, a)}
    for fmt in FORMATS:
        single[fmt] = lambda tmp, fmt=fmt: format_table(
            fmt, format_bench(tmp, a.engine, a.runtime, a.rounds, fmt))
    if a.only in single:
        tmp = tempfile.mkdtemp(prefix="tdbench-", dir="/dev/shm")
        try:
            table = single[a.only](tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print("Machine: %s\n\n%s" % (machine(), table))
        return

    tmp = tempfile.mkdtemp(prefix="tdbench-", dir="/dev/shm")
    try:
        image = fill_image(tmp)
        results = {}
        servers = [("tapdiskd", lambda: Tapdiskd(tmp, image, a.engine)),
                   ("qemu-storage-daemon", lambda: QemuStorageDaemon(tmp, image)),
                   ("nbdkit-file", lambda: Nbdkit(tmp, image))]
        for wname, wargs, metric in WORKLOADS:
            for sname, start in servers:
                best = None
                for _ in range(a.rounds):
                    srv = start()
                    try:
                        r = run_fio(srv.sock, wargs, a.runtime)
                    finally:
                        srv.stop()
                    if best is None or r[metric] > best[metric]:
                        best = r
                results[(wname, sname)] = best
                print("%-20s %-20s %10.0f %s" % (wname, sname, best[metric],
                                                 "IOPS" if metric == "iops" else "MiB/s"),
                      file=sys.stderr)
        formats = {fmt: format_bench(tmp, a.engine, a.runtime, a.rounds, fmt) for fmt in FORMATS}
        idle, hundred = memory(tmp, a.engine)
        ring = ring_bench(tmp, a.runtime, a.rounds)
        qos = qos_part(tmp, a, image)
        allocs = allocs_part(tmp, a)
        cpu = cpu_part(tmp, a, image)
        loops = loops_bench(tmp, a.runtime, a.cpu_rounds)
        cbt = cbt_part(tmp, a)
        mirror = mirror_part(tmp, a, image)
        rbd = rbd_part(tmp, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = []
    lines.append("## %s (io engine %s, fio %ds x best of %d)\n" % (
        datetime.date.today().isoformat(), a.engine, a.runtime, a.rounds))
    lines.append("Machine: %s\n" % machine())
    lines.append("| workload | tapdiskd | qemu-storage-daemon | nbdkit file | tapdiskd/qsd | tapdiskd/nbdkit |")
    lines.append("|---|---|---|---|---|---|")
    for wname, _, metric in WORKLOADS:
        t = results[(wname, "tapdiskd")][metric]
        q = results[(wname, "qemu-storage-daemon")][metric]
        n = results[(wname, "nbdkit-file")][metric]
        unit = "IOPS" if metric == "iops" else "MiB/s"
        lines.append("| %s | %.0f %s | %.0f | %.0f | %.2fx | %.2fx |" % (
            wname, t, unit, q, n, t / q if q else 0, t / n if n else 0))
    lines.append("")
    raw_iops = {"randread": results[("4k randread QD32", "tapdiskd")]["iops"],
                "randwrite": results[("4k randwrite QD32", "tapdiskd")]["iops"]}
    for fmt, res in formats.items():
        lines.append(format_table(fmt, res, raw_iops))
        lines.append("")
    lines.append("| memory | tapdiskd RSS | target |")
    lines.append("|---|---|---|")
    lines.append("| idle | %.1f MB | < 8 MB |" % (idle / 1024))
    lines.append("| 100 open vbds | %.1f MB | < 64 MB |" % (hundred / 1024))
    lines.append("")
    lines.append(ring)
    lines.append("")
    lines.append(qos)
    lines.append("")
    lines.append(allocs)
    lines.append("")
    lines.append(cpu)
    lines.append("")
    lines.append(loops)
    lines.append("")
    lines.append(cbt)
    lines.append("")
    lines.append(mirror)
    lines.append("")
    lines.append(rbd)
    report = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "latest.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
