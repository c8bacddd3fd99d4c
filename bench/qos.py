"""QoS in `make bench`: what the QoS path costs when nothing is limited, and
how tapdiskd's limits hold against qemu-storage-daemon's throttle groups in
the same runs (the scenarios of tests/integration/test_qos.py).

Overhead: one vbd, 4k randread QD32 from /dev/shm, in rounds that alternate
three set-ups of the same server binary: no QoS state (the fast path),
QoS state whose limits are all 0 (the path every request of a once-limited
vbd takes), and a limit 100x above what the machine reaches (full token
accounting, nothing ever waits).
"""

import glob
import json
import os
import subprocess

MiB = 1 << 20

# name: (disk, tapdiskd settings, qemu throttle-group properties, fio options)
SCENARIOS = {
    "500 IOPS, QD1, data": ("data1", {"iops_total": 500}, {"x-iops-total": 500},
                            ["--rw=randread", "--iodepth=1"]),
    "500 IOPS, QD32, data": ("data32", {"iops_total": 500}, {"x-iops-total": 500},
                             ["--rw=randread", "--iodepth=32"]),
    "500 IOPS, QD1, unallocated": ("holes1", {"iops_total": 500}, {"x-iops-total": 500},
                                   ["--rw=randread", "--iodepth=1"]),
    "500 IOPS, QD32, unallocated": ("holes32", {"iops_total": 500}, {"x-iops-total": 500},
                                    ["--rw=randread", "--iodepth=32"]),
    "20 MiB/s, 64k QD8 writes": ("bps", {"bps_total": 20 * MiB}, {"x-bps-total": 20 * MiB},
                                 ["--rw=randwrite", "--bs=64k", "--iodepth=8"]),
    "burst 2000 for 2 s over 500": (
        "burst", {"iops_total": 500, "iops_total_max": 2000, "iops_total_max_length": 2},
        {"x-iops-total": 500, "x-iops-total-max": 2000, "x-iops-total-max-length": 2},
        ["--rw=randread", "--iodepth=32", "--write_iops_log=BURST", "--log_avg_msec=1000"]),
    "group 1000 IOPS, weight 1": ("w1", {"group": "tenants", "weight": 1}, None,
                                  ["--rw=randread", "--iodepth=32"]),
    "group 1000 IOPS, weight 3": ("w3", {"group": "tenants", "weight": 3}, None,
                                  ["--rw=randread", "--iodepth=32"]),
    "one disk 500 IOPS, client QD32": ("fair", {"iops_total": 500}, {"x-iops-total": 500},
                                       ["--rw=randread", "--iodepth=32"]),
    "one disk 500 IOPS, client QD1": ("fair", {"iops_total": 500}, {"x-iops-total": 500},
                                      ["--rw=randread", "--iodepth=1"]),
}
GROUP = {"iops_total": 1000}


def images(tmp, vhd_util):
    """disk name -> (qemu format, path): data disks full of data, holes on fresh VHDs."""
    out = {}
    for disk in sorted({s[0] for s in SCENARIOS.values()}):
        if disk.startswith("holes"):
            path = os.path.join(tmp, disk + ".vhd")
            subprocess.run([vhd_util, "create", "-n", path, "-s", "64"], check=True)
            out[disk] = ("vpc", path)
        else:
            path = os.path.join(tmp, disk + ".img")
            subprocess.run(["fio", "--name=fill", "--filename=" + path, "--size=64M",
                            "--rw=write", "--bs=1M", "--ioengine=psync", "--output=/dev/null"],
                           check=True)
            out[disk] = ("raw", path)
    return out


def run_all(uris, runtime, tmp):
    """One fio run of every scenario at once; name -> (IOPS, MiB/s, per-second IOPS log)."""
    args = ["fio", "--output-format=json", "--ioengine=nbd", "--bs=4k", "--size=64M",
            "--time_based", "--runtime=%d" % runtime, "--randrepeat=0"]
    for name, (disk, _, _, opts) in SCENARIOS.items():
        opts = [o.replace("BURST", os.path.join(tmp, "burst")) for o in opts]
        args += ["--name=" + name, "--uri=" + uris[disk]] + opts
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    res = {}
    for job in json.loads(out[out.index("{"):])["jobs"]:
        iops = job["read"]["iops"] + job["write"]["iops"]
        bw = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / MiB
        res[job["jobname"]] = [iops, bw, None]
    logs = glob.glob(os.path.join(tmp, "burst_iops.*.log"))
    if logs:
        res["burst 2000 for 2 s over 500"][2] = [int(line.split(",")[1])
                                                 for line in open(logs[0]) if line.strip()]
        for f in logs:
            os.unlink(f)
    return res


def tapdiskd_run(tapdiskd_cls, tmp, imgs, engine, runtime):
    srv = tapdiskd_cls(tmp, "1M", engine, fmt="ram")      # minor 0: unused here
    try:
        ctl = srv.ctl
        ctl("qos-set", group="tenants", limits=GROUP)
        uris = {}
        for disk, (fmt, path) in imgs.items():
            r = ctl("open", params="%s:%s" % ("vhd" if fmt == "vpc" else "aio", path))
            uris[disk] = "nbd+unix:///?socket=" + r["nbd"]
            limits = [s[1] for s in SCENARIOS.values() if s[0] == disk][0]
            ctl("qos-set", minor=r["minor"], limits=limits)
        return run_all(uris, runtime, tmp)
    finally:
        srv.stop()


def qsd_run(tmp, imgs, runtime, wait_socket):
    sock = os.path.join(tmp, "qsd-qos.sock")
    cmd = ["qemu-storage-daemon", "--nbd-server", "addr.type=unix,addr.path=" + sock,
           "--object", "throttle-group,id=tenants,x-iops-total=%d" % GROUP["iops_total"]]
    for disk, (fmt, path) in imgs.items():
        props = [s[2] for s in SCENARIOS.values() if s[0] == disk][0]
        group = "tenants" if props is None else "tg_" + disk
        if props is not None:
            cmd += ["--object", "throttle-group,id=%s,%s" % (
                group, ",".join("%s=%d" % kv for kv in props.items()))]
        cmd += ["--blockdev", "driver=file,node-name=f_%s,filename=%s,cache.direct=off,"
                "aio=io_uring" % (disk, path),
                "--blockdev", "driver=%s,node-name=d_%s,file=f_%s" % (fmt, disk, disk),
                "--blockdev", "driver=throttle,node-name=t_%s,throttle-group=%s,file=d_%s" % (
                    disk, group, disk),
                "--export", "type=nbd,id=e_%s,node-name=t_%s,name=%s,writable=on" % (
                    disk, disk, disk)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        uris = {d: "nbd+unix:///%s?socket=%s" % (d, sock) for d in imgs}
        return run_all(uris, runtime, tmp)
    finally:
        proc.terminate()
        proc.wait(30)


def overhead(tapdiskd_cls, run_fio, tmp, image, engine, runtime, rounds):
    """set-up -> best 4k randread QD32 IOPS over rounds, set-ups interleaved."""
    setups = {"no QoS state": None, "QoS state, no limits": {"iops_total": 0},
              "limit never reached": {"iops_total": 100000000}}
    best = {k: 0.0 for k in setups}
    for _ in range(rounds):
        for name, limits in setups.items():
            srv = tapdiskd_cls(tmp, image, engine)
            try:
                if limits is not None:
                    srv.ctl("qos-set", minor=0, limits={"iops_total": 1})
                    srv.ctl("qos-set", minor=0, limits=limits)
                r = run_fio(srv.sock, ["--rw=randread", "--bs=4k", "--iodepth=32"], runtime)
            finally:
                srv.stop()
            best[name] = max(best[name], r["iops"])
    return best


def report(overhead_iops, td, qsd, runtime):
    base = overhead_iops["no QoS state"]
    lines = ["### QoS", "",
             "What the QoS path costs (4k randread QD32, /dev/shm raw, best of the rounds, "
             "set-ups interleaved):", "",
             "| set-up | IOPS | vs no QoS state |", "|---|---|---|"]
    for name, v in overhead_iops.items():
        lines.append("| %s | %.0f | %+.1f%% |" % (name, v, 100 * (v / base - 1) if base else 0))
    lines += ["", "Limits held, all scenarios at once for %d s (fio over NBD; tapdiskd "
              "vs qemu-storage-daemon throttle groups, which have no weights):" % runtime, "",
              "| scenario | tapdiskd | qemu-storage-daemon |", "|---|---|---|"]
    for name in SCENARIOS:
        unit, col = ("MiB/s", 1) if "MiB/s" in name else ("IOPS", 0)
        lines.append("| %s | %.0f %s | %.0f %s |" % (name, td[name][col], unit, qsd[name][col], unit))
    for label, res in (("tapdiskd", td), ("qemu-storage-daemon", qsd)):
        w1, w3 = res["group 1000 IOPS, weight 1"][0], res["group 1000 IOPS, weight 3"][0]
        d, s = res["one disk 500 IOPS, client QD32"][0], res["one disk 500 IOPS, client QD1"][0]
        lines.append("")
        lines.append("%s: group shares %.0f%%/%.0f%% (weights 1:3), clients of one disk "
                     "%.0f%%/%.0f%% (QD32/QD1), burst log per second %s" % (
                         label, 100 * w1 / (w1 + w3), 100 * w3 / (w1 + w3),
                         100 * d / (d + s), 100 * s / (d + s),
                         res["burst 2000 for 2 s over 500"][2]))
    return "\n".join(lines) + "\n"


def qos_bench(tapdiskd_cls, run_fio, wait_socket, vhd_util, tmp, image, engine, runtime,
              rounds):
    ov = overhead(tapdiskd_cls, run_fio, tmp, image, engine, runtime, max(rounds, 3))
    imgs = images(tmp, vhd_util)
    td = tapdiskd_run(tapdiskd_cls, tmp, imgs, engine, 10)
    qsd = qsd_run(tmp, imgs, 10, wait_socket)
    for _, path in imgs.values():
        os.unlink(path)
    return report(ov, td, qsd, 10)
