"""Cost per request in `make bench` (`--only cpu`): the server's CPU and
system calls for each NBD request it completes.

CPU: the server process's utime+stime (/proc/PID/stat, every thread, the
exited ones too) over one fio run (nbd engine, UNIX socket, 4 KiB QD32 on
the 1 GiB raw image on /dev/shm), divided by the requests fio completed.
The servers (tapdiskd, nbdkit's file plugin, qemu-storage-daemon; with
--cpu-base, a second tapdiskd build too) take turns within each round, in
an order that rotates from round to round; the table gives each server's
median over the rounds and the median of the per-round ratios, the only
figures this shared, noisy machine makes meaningful.

System calls: one more fio run per server and workload, under `perf stat
-p PID` counting the raw_syscalls:sys_enter and epoll tracepoints, divided
by the requests completed (a separate run, so that the tracing does not
weigh on the CPU figures).

Both, twice: with fio as the client (each request sent alone: the cost of
a wake-up per request or two), and with bench/batched_client.py (32
requests per send: the cost per request when many wait at a wake-up).
"""

import os
import signal
import statistics
import subprocess
import sys
import time

from allocs import fio_4k

WORKLOADS = [("4k randread QD32", "randread"), ("4k randwrite QD32", "randwrite")]
SYSCALL_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_epoll_ctl",
                  "syscalls:sys_enter_epoll_wait"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime+stime of the whole process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # fields 14 and 15 of stat(5)


def fio_requests(sock, rw, runtime):
    """One fio run on the 1 GiB image; (requests completed, IOPS)."""
    return fio_4k(sock, rw, runtime, "1G")


def measure_cpu(srv, rw, runtime, drive=fio_requests):
    """µs of server CPU per request, and IOPS, over one run of the client drive."""
    before = cpu_seconds(srv.proc.pid)
    ios, iops = drive(srv.sock, rw, runtime)
    used = cpu_seconds(srv.proc.pid) - before
    return (used * 1e6 / ios if ios else 0.0), iops


def measure_syscalls(srv, rw, runtime, tmp, drive=fio_requests):
    """{event: count per request} over one run of the client drive under perf stat."""
    out = os.path.join(tmp, "perf-stat.csv")
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out,
                             "-e", ",".join(SYSCALL_EVENTS), "-p", str(srv.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)                     # attached before the client connects
    try:
        ios, _ = drive(srv.sock, rw, runtime)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[2] in SYSCALL_EVENTS:
                counts[parts[2]] = int(parts[0]) if parts[0].isdigit() else 0
    os.unlink(out)
    return {ev: counts.get(ev, 0) / ios if ios else 0.0 for ev in SYSCALL_EVENTS}


def perf_usable():
    try:
        return subprocess.run(["perf", "stat", "-e", SYSCALL_EVENTS[0], "true"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def cpu_bench(tmp, image, servers, runtime, rounds, drive=fio_requests,
              client="fio nbd 4k QD32"):
    """servers: [(name, start())], the first tapdiskd; drive(sock, rw, runtime)
    -> (requests, rate) is the client, named client in the report. A markdown report."""
    cpu = {}        # (workload, server) -> [(µs/request, IOPS)] by round
    for rnd in range(rounds):
        turn = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
        for wname, rw in WORKLOADS:
            for sname, start in turn:
                srv = start()
                try:
                    us, iops = measure_cpu(srv, rw, runtime, drive)
                finally:
                    srv.stop()
                cpu.setdefault((wname, sname), []).append((us, iops))
                print("cpu round %d %-18s %-20s %6.2f us/request %8.0f IOPS"
                      % (rnd + 1, wname, sname, us, iops), file=sys.stderr)
    sys_counts = {}
    if perf_usable():
        for wname, rw in WORKLOADS:
            for sname, start in servers:
                srv = start()
                try:
                    sys_counts[(wname, sname)] = measure_syscalls(srv, rw, max(2, runtime // 2),
                                                                  tmp, drive)
                finally:
                    srv.stop()
    return cpu_table(cpu, sys_counts, servers, runtime, rounds, client)


def cpu_table(cpu, sys_counts, servers, runtime, rounds, client):
    names = [s for s, _ in servers]
    td, peers = names[0], names[1:]
    lines = ["Server CPU per request (utime+stime / requests; %s, %d s runs, "
             "median of %d alternating rounds)\n" % (client, runtime, rounds)]
    head = "| workload | " + " | ".join("%s µs/req (IOPS)" % n for n in names) + " | " + \
        " | ".join("%s/%s" % (td, p) for p in peers) + " |"
    lines.append(head)
    lines.append("|---" * (1 + len(names) + len(peers)) + "|")
    for wname, _ in WORKLOADS:
        cells = []
        for n in names:
            rs = cpu[(wname, n)]
            cells.append("%.2f (%.0f)" % (statistics.median(r[0] for r in rs),
                                          statistics.median(r[1] for r in rs)))
        ratios = []
        for p in peers:
            per_round = [a[0] / b[0] for a, b in zip(cpu[(wname, td)], cpu[(wname, p)]) if b[0]]
            ratios.append("%.2fx" % statistics.median(per_round) if per_round else "-")
        lines.append("| %s | %s | %s |" % (wname, " | ".join(cells), " | ".join(ratios)))
    if sys_counts:
        lines.append("")
        lines.append("System calls per request (%s; perf stat -p, one %d s run each)\n"
                     % (client, max(2, runtime // 2)))
        lines.append("| workload | server | all | epoll_ctl | epoll_wait |")
        lines.append("|---|---|---|---|---|")
        for wname, _ in WORKLOADS:
            for n in names:
                c = sys_counts.get((wname, n))
                if c:
                    lines.append("| %s | %s | %.2f | %.2f | %.2f |" % (
                        wname, n, c[SYSCALL_EVENTS[0]], c[SYSCALL_EVENTS[1]],
                        c[SYSCALL_EVENTS[2]]))
    return "\n".join(lines)
