"""Heap allocations per request, from outside: tapdiskd runs under
tests/preload/alloc_probe.so (LD_PRELOAD), which counts every malloc,
calloc, realloc and aligned allocation and reports the total on SIGUSR2; a
fio run (nbd engine, QD32, 4 KiB) between two readings gives allocations
per request, libevent's and libc's included. The target: none in steady
state for raw and allocated vhd/qcow2 reads and writes."""

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "preload"))
from alloc_count import PROBE_NAME, allocations  # noqa: E402

PROBE = os.path.join(ROOT, "build", "tests", PROBE_NAME)

WORKLOADS = [("4k randread QD32", "randread"), ("4k randwrite QD32", "randwrite")]


def fio_4k(sock, rw, runtime, size="64M"):
    """One fio run (nbd engine, 4 KiB, QD32); (requests completed, IOPS)."""
    out = subprocess.run(["fio", "--output-format=json", "--name=allocs", "--ioengine=nbd",
                          "--uri=nbd+unix:///?socket=" + sock, "--time_based",
                          "--runtime=%d" % runtime, "--size=" + size, "--rw=" + rw, "--bs=4k",
                          "--iodepth=32", "--randrepeat=0"],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return (job["read"]["total_ios"] + job["write"]["total_ios"],
            job["read"]["iops"] + job["write"]["iops"])


def fio_ios(sock, rw, runtime):
    return fio_4k(sock, rw, runtime)[0]


def alloc_bench(tmp, images, tapdiskd, runtime):
    """images: {label: (fmt, path, rws)}, rws: the fio workloads to run
    (None: both; ("randread",) for an empty child, which a write would
    fill). tapdiskd(tmp, image, fmt, env) starts a server."""
    count_file = os.path.join(tmp, "allocs")
    env = dict(os.environ, LD_PRELOAD=PROBE, ALLOC_COUNT_FILE=count_file)
    rows = []
    for label, (fmt, image, rws) in images.items():
        srv = tapdiskd(tmp, image, fmt, env)
        workloads = [w for w in WORKLOADS if not rws or w[1] in rws]
        try:
            fio_ios(srv.sock, workloads[-1][1], 1)      # warm: connection, caches, pool
            for wname, rw in workloads:
                before = allocations(srv.proc.pid, count_file)
                ios = fio_ios(srv.sock, rw, runtime)
                after = allocations(srv.proc.pid, count_file)
                rows.append((label, wname, ios, after - before))
        finally:
            srv.stop()
    lines = ["| allocations per request (LD_PRELOAD probe, fio nbd) | requests | heap calls | per request |",
             "|---|---|---|---|"]
    for label, wname, ios, n in rows:
        lines.append("| %s %s | %d | %d | %.4f |" % (label, wname, ios, n, n / ios if ios else 0))
    return "\n".join(lines)
