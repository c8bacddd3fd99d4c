"""`make bench`'s rbd part (`--only rbd`): tapdiskd's rbd: driver against
qemu-storage-daemon's rbd driver (qemu-block-extra) on the same RBD image,
in the same run, over NBD (fio's nbd engine, UNIX socket).

The cluster is the one the tests use (tests/ceph/start-ceph: one monitor,
one memstore OSD on 127.0.0.1, a directory and port of its own), started
here and stopped on every exit path. One 256 MiB image (memstore keeps
what is written in RAM), filled once, so reads hit objects. Both servers
run without librbd's cache (tapdiskd always; qemu with cache.direct=on),
so every request is an OSD op, and one after the other, never at once
(each takes the image's exclusive lock). Per workload and server: the best
of --rounds fio runs, and the server's CPU (utime+stime of every thread,
librbd's included) per request over that run. The OSD and the monitor
share the two cores with the server and fio: the ratio is what counts.
"""

import json
import os
import subprocess

from cpu import cpu_seconds

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SIZE = "256M"
WORKLOADS = [
    ("4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops"),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops"),
    ("1M read QD8", ["--rw=read", "--bs=1M", "--iodepth=8"], "bw"),
    ("1M write QD8", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw"),
]


class QsdRbd:
    name = "qemu-storage-daemon"

    def __init__(self, tmp, conf, image, wait_socket):
        self.sock = os.path.join(tmp, "qsd-rbd.sock")
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", "driver=rbd,node-name=disk0,pool=rbd,image=%s,conf=%s,"
            "cache.direct=on" % (image, conf),
            "--nbd-server", "addr.type=unix,addr.path=%s" % self.sock,
            "--export", "type=nbd,id=e0,node-name=disk0,name=,writable=on"],
            stderr=subprocess.DEVNULL)
        wait_socket(self.sock, self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def fio(sock, args, runtime):
    """One fio run: (IOPS, MiB/s, requests completed)."""
    cmd = ["fio", "--output-format=json", "--name=bench", "--ioengine=nbd",
           "--uri=nbd+unix:///?socket=" + sock, "--time_based", "--runtime=%d" % runtime,
           "--ramp_time=1", "--size=" + SIZE, "--randrepeat=0"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    rw = "read" if job["read"]["io_bytes"] else "write"
    return job[rw]["iops"], job[rw]["bw_bytes"] / (1 << 20), job[rw]["total_ios"]


def rbd_bench(tmp, engine, runtime, rounds, tapdiskd_cls, wait_socket):
    env = dict(os.environ, CEPH_DIR=os.path.join(tmp, "ceph"))
    start = os.path.join(ROOT, "tests", "ceph", "start-ceph")
    stop = os.path.join(ROOT, "tests", "ceph", "stop-ceph")
    try:
        conf = subprocess.run([start], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
        subprocess.run(["rbd", "-c", conf, "create", "--size", SIZE, "rbd/bench"], check=True)
        servers = [
            ("tapdiskd", lambda: tapdiskd_cls(tmp, "rbd/bench:conf=" + conf, engine, "rbd")),
            ("qemu-storage-daemon", lambda: QsdRbd(tmp, conf, "bench", wait_socket)),
        ]
        srv = servers[0][1]()
        try:       # every object written once: reads find data
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", "--rw=write", "--bs=4M",
                            "--iodepth=4", "--uri=nbd+unix:///?socket=" + srv.sock,
                            "--size=" + SIZE, "--output=/dev/null"], check=True)
        finally:
            srv.stop()
        res = {}
        for wname, wargs, metric in WORKLOADS:
            for sname, make in servers:
                best = None
                for _ in range(rounds):
                    srv = make()
                    try:
                        before = cpu_seconds(srv.proc.pid)
                        iops, bw, ios = fio(srv.sock, wargs, runtime)
                        used = cpu_seconds(srv.proc.pid) - before
                    finally:
                        srv.stop()
                    r = {"iops": iops, "bw": bw, "cpu_us": used * 1e6 / ios if ios else 0}
                    if best is None or r[metric] > best[metric]:
                        best = r
                res[(wname, sname)] = best
    finally:
        subprocess.run([stop, "--purge"], env=env, capture_output=True)
    return rbd_table(res, engine, runtime, rounds)


def rbd_table(res, engine, runtime, rounds):
    lines = ["### rbd: tapdiskd's driver vs qemu-storage-daemon's, one RBD image "
             "(memstore, %s, io engine %s, fio %ds x best of %d)\n" % (SIZE, engine, runtime, rounds),
             "| workload | tapdiskd | qemu-storage-daemon | tapdiskd/qsd | CPU µs/req tapdiskd "
             "| CPU µs/req qsd |",
             "|---|---|---|---|---|---|"]
    for wname, _, metric in WORKLOADS:
        t, q = res[(wname, "tapdiskd")], res[(wname, "qemu-storage-daemon")]
        unit = "IOPS" if metric == "iops" else "MiB/s"
        lines.append("| %s | %.0f %s | %.0f | %.2fx | %.0f | %.0f |" % (
            wname, t[metric], unit, q[metric], t[metric] / q[metric] if q[metric] else 0,
            t["cpu_us"], q["cpu_us"]))
    return "\n".join(lines)
