"""Changed-block tracking in `make bench` (`--only cbt`): 4k randwrite QD32
on an allocated 1 GiB VHD, tapdiskd with and without a CBT log, in rounds
whose order alternates; each cell the median over the rounds, each ratio the
median of the per-round ratios.

- steady state: the log was filled by a first pass over the whole disk (1 MiB
  sequential writes through the tracked vbd), so no write needs a log write:
  the cost is the bit test per request (target: within 5% of no log, which
  gets the same first pass);
- first writes: a fresh log, so each 64 KiB block's first write waits for a
  log write and an fdatasync (shared by the writes waiting together), on
  tmpfs (the bookkeeping) and on the root filesystem (ext4: the syncs).
"""
import os
import shutil
import statistics
import struct
import subprocess

BLOCK = 64 << 10


def make_log(path, size, all_set=False):
    n = ((size + BLOCK - 1) // BLOCK + 7) // 8
    with open(path, "wb") as f:
        f.write(struct.pack("<16s16si4xQ", b"\0" * 16, b"\0" * 16, 0, size))
        f.write((b"\xff" if all_set else b"\0") * n)
    return path


def one_run(tapdiskd_cls, run_fio, tmp, image, engine, runtime, log, first_pass):
    srv = tapdiskd_cls(tmp, image, engine, "vhd", cbt_log=log)
    try:
        if first_pass:
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd",
                            "--uri=nbd+unix:///?socket=" + srv.sock, "--rw=write", "--bs=1M",
                            "--iodepth=8", "--size=1G", "--output=/dev/null"], check=True)
        before = srv.ctl("stats", minor=0)["cbt"]["log_writes"] if log else 0
        r = run_fio(srv.sock, ["--rw=randwrite", "--bs=4k", "--iodepth=32"], runtime)
        if log:	# during the measured run only
            r["log_writes"] = srv.ctl("stats", minor=0)["cbt"]["log_writes"] - before
        return r
    finally:
        srv.stop()


def cbt_bench(tapdiskd_cls, run_fio, tmp, full_vhd, engine, runtime, rounds):
    size = 1 << 30
    work = os.path.join(tmp, "cbt-work.vhd")
    ext4_dir = os.path.join("/var/tmp", os.path.basename(tmp) + "-cbt")
    os.makedirs(ext4_dir, exist_ok=True)
    rows = {k: [] for k in ("off", "steady", "first", "off-ext4", "first-ext4")}
    try:
        for i in range(rounds):
            order = ["off", "steady", "first", "off-ext4", "first-ext4"]
            if i % 2:
                order.reverse()
            for kind in order:
                where = ext4_dir if kind.endswith("ext4") else tmp
                img = os.path.join(where, "cbt-work.vhd")
                shutil.copyfile(full_vhd, img)
                log = None
                if kind != "off" and kind != "off-ext4":
                    log = make_log(os.path.join(where, "cbt.log"), size)
                # the steady state's log is made full by writing the disk once through it
                # the same first pass with no log: only the log differs between the two
                r = one_run(tapdiskd_cls, run_fio, tmp, img, engine, runtime, log,
                            first_pass=kind in ("steady", "off"))
                rows[kind].append(r)
                os.unlink(img)
                if log:
                    os.unlink(log)
    finally:
        shutil.rmtree(ext4_dir, ignore_errors=True)
        if os.path.exists(work):
            os.unlink(work)
    return rows


def cbt_table(rows, runtime, rounds):
    def med(kind):
        return statistics.median(r["iops"] for r in rows[kind])

    def ratio(a, b):
        return statistics.median(x["iops"] / y["iops"] for x, y in zip(rows[a], rows[b]))

    lines = ["### Changed-block tracking (4k randwrite QD32, allocated 1 GiB VHD; "
             "%d s, median of %d alternating rounds)" % (runtime, rounds), "",
             "| case | IOPS | vs no log | log writes in the run (per round) |", "|---|---|---|---|",
             "| no log, after a first pass (tmpfs) | %.0f | 1.00x | - |" % med("off"),
             "| log, after a first pass (tmpfs) | %.0f | %.2fx | %s |" % (
                 med("steady"), ratio("steady", "off"),
                 "/".join(str(r.get("log_writes", 0)) for r in rows["steady"])),
             "| log, first writes (tmpfs) | %.0f | %.2fx | %s |" % (
                 med("first"), ratio("first", "off"),
                 "/".join(str(r.get("log_writes", 0)) for r in rows["first"])),
             "| no log (ext4) | %.0f | 1.00x | - |" % med("off-ext4"),
             "| log, first writes (ext4) | %.0f | %.2fx | %s |" % (
                 med("first-ext4"), ratio("first-ext4", "off-ext4"),
                 "/".join(str(r.get("log_writes", 0)) for r in rows["first-ext4"])),
             "", "Target: after the first pass, within 5%% of no log (%.2fx)." %
             ratio("steady", "off")]
    return "\n".join(lines)
