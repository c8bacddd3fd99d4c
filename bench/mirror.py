"""Block jobs in `make bench` (`--only mirror`): the mirror's copy rate and
what a job costs the guest.

- copy: a 1 GiB raw image full of data (tmpfs) mirrored to an empty one,
  from the job's start until it is ready (tapdiskd's `mirror`, qsd's
  `blockdev-mirror` until BLOCK_JOB_READY), to a local file and to a second
  server of the same kind over NBD on TCP loopback; rounds alternate the
  order, each cell the median;
- the guest: fio 4k QD32 over NBD on the mirrored vbd, without a job, while
  a speed-limited copy runs (so it spans the whole run), and once the job is
  ready (every write going to both sides); the ratio to without (target:
  at least 0.70 while the copy runs).
"""
import json
import os
import socket
import statistics
import subprocess
import time

SIZE = 1 << 30


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def empty_image(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def wait_ready(srv, timeout=300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        job = srv.ctl("job-list", minor=0)["jobs"][0]
        if job["state"] == "ready":
            return
        if job["state"] not in ("running",):
            raise RuntimeError("mirror %s: %s" % (job["state"], job.get("error")))
        time.sleep(0.01)
    raise RuntimeError("mirror not ready in %d s" % timeout)


def tapdiskd_copy(Tapdiskd, tmp, engine, src, remote):
    """Seconds from the mirror's start to ready."""
    dst = empty_image(os.path.join(tmp, "mirror-dst.img"))
    far = None
    srv = Tapdiskd(tmp, src, engine)
    try:
        dest = "aio:" + dst
        if remote:
            port = free_port()
            os.makedirs(os.path.join(tmp, "far"), exist_ok=True)
            far = Tapdiskd(os.path.join(tmp, "far"), dst, engine,
                           extra=["--nbd-listen", "tcp:127.0.0.1:%d" % port])
            dest = "nbd:nbd://127.0.0.1:%d/0" % port
        t0 = time.monotonic()
        srv.ctl("mirror", minor=0, dest=dest)
        wait_ready(srv)
        took = time.monotonic() - t0
        srv.ctl("job-cancel", minor=0)
        return took
    finally:
        srv.stop()
        if far:
            far.stop()
        os.unlink(dst)


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.f.readline()      # the greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError("%s: %s" % (name, r["error"]["desc"]))

    def event(self, name, timeout=300):
        self.s.settimeout(timeout)
        while True:
            r = json.loads(self.f.readline())
            if r.get("event") == name:
                return r


def qsd_copy(tmp, src, remote):
    dst = empty_image(os.path.join(tmp, "mirror-dst.img"))
    qmp_path = os.path.join(tmp, "qmp.sock")
    procs = []
    try:
        target = ("--blockdev", "driver=file,node-name=dfile,filename=%s,aio=io_uring" % dst,
                  "--blockdev", "driver=raw,node-name=dst,file=dfile")
        if remote:
            port = free_port()
            procs.append(subprocess.Popen(
                ["qemu-storage-daemon"] + list(target) +
                ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=%d" % port,
                 "--export", "type=nbd,id=e,node-name=dst,name=d,writable=on"],
                stderr=subprocess.DEVNULL))
            wait_port(port)
            target = ("--blockdev", "driver=nbd,node-name=dst,server.type=inet,"
                      "server.host=127.0.0.1,server.port=%d,export=d" % port)
        procs.append(subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", "driver=file,node-name=sfile,filename=%s,aio=io_uring" % src,
             "--blockdev", "driver=raw,node-name=src,file=sfile"] + list(target) +
            ["--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp_path,
             "--monitor", "chardev=m,mode=control"], stderr=subprocess.DEVNULL))
        wait_path(qmp_path)
        q = Qmp(qmp_path)
        t0 = time.monotonic()
        q.cmd("blockdev-mirror", **{"job-id": "j", "device": "src", "target": "dst",
                                    "sync": "full"})
        q.event("BLOCK_JOB_READY")
        took = time.monotonic() - t0
        q.cmd("block-job-cancel", device="j")
        return took
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        os.unlink(dst)


def wait_path(path, timeout=20):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("no " + path)
        time.sleep(0.02)


def wait_port(port, timeout=20):
    t0 = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.02)


def guest_during_job(Tapdiskd, run_fio, tmp, engine, src, runtime, rounds):
    """Guest IOPS without a job, while a limited copy runs, once ready."""
    out = {}
    for rw in ("randread", "randwrite"):
        rows = {"none": [], "copying": [], "ready": []}
        for i in range(rounds):
            order = ["none", "copying", "ready"]
            if i % 2:
                order.reverse()
            for kind in order:
                dst = empty_image(os.path.join(tmp, "mirror-dst.img"))
                srv = Tapdiskd(tmp, src, engine)
                try:
                    if kind != "none":
                        # copying: slow enough to span the run (fio ramps 1 s)
                        speed = SIZE // (runtime + 4) if kind == "copying" else 0
                        srv.ctl("mirror", minor=0, dest="aio:" + dst, speed=speed)
                        if kind == "ready":
                            wait_ready(srv)
                    r = run_fio(srv.sock, ["--rw=" + rw, "--bs=4k", "--iodepth=32"], runtime)
                    if kind == "copying":
                        assert srv.ctl("job-list", minor=0)["jobs"][0]["state"] == "running"
                    rows[kind].append(r["iops"])
                finally:
                    srv.stop()
                    os.unlink(dst)
        out[rw] = rows
    return out


def mirror_bench(Tapdiskd, run_fio, tmp, engine, src, runtime, rounds):
    copy = {}
    for i in range(rounds):
        order = [("tapdiskd", False), ("qemu-storage-daemon", False),
                 ("tapdiskd", True), ("qemu-storage-daemon", True)]
        if i % 2:
            order.reverse()
        for name, remote in order:
            took = (tapdiskd_copy(Tapdiskd, tmp, engine, src, remote) if name == "tapdiskd"
                    else qsd_copy(tmp, src, remote))
            copy.setdefault((name, remote), []).append(SIZE / (1 << 20) / took)
    guest = guest_during_job(Tapdiskd, run_fio, tmp, engine, src, runtime, rounds)
    return copy, guest


def mirror_table(res, runtime, rounds):
    copy, guest = res
    med = statistics.median
    lines = ["Mirror copy rate, 1 GiB raw full of data on tmpfs, from the job's start "
             "to ready (median of %d alternating rounds):" % rounds, "",
             "| destination | tapdiskd (MiB/s) | qemu-storage-daemon (MiB/s) | ratio |",
             "|---|---|---|---|"]
    for remote, label in ((False, "local file"), (True, "NBD over TCP loopback (same server kind)")):
        t, q = med(copy[("tapdiskd", remote)]), med(copy[("qemu-storage-daemon", remote)])
        lines.append("| %s | %.0f | %.0f | %.2fx |" % (label, t, q, t / q))
    lines += ["", "Guest 4k QD32 over NBD during a mirror (fio %d s, median of %d rounds; "
              "target: at least 0.70x while copying):" % (runtime, rounds), "",
              "| workload | no job (IOPS) | copying | ready (writes to both) | copying / none | ready / none |",
              "|---|---|---|---|---|---|"]
    for rw, rows in guest.items():
        n, c, r = med(rows["none"]), med(rows["copying"]), med(rows["ready"])
        lines.append("| 4k %s | %.0f | %.0f | %.0f | %.2fx | %.2fx |" % (rw, n, c, r, c / n, r / n))
    return "\n".join(lines)
