"""What the tests of every image format share: reading an export whole,
live snapshots under a verifying fio, kill -9 rounds against a logging
writer, and ext4 through nbdfuse and a loop device."""

import os
import random
import signal
import struct
import subprocess
import sys
import time

import nbd

from conftest import run, wait_for
from images import connect, export_bytes  # noqa: F401 (the format tests import them here)


def fio_verify_load(uri, runtime=3):
    """fio writing at random over 32 MiB of uri for runtime seconds, then verifying."""
    return subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", "--uri=" + uri,
                             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M",
                             "--time_based", "--runtime=%d" % runtime, "--verify=crc32c",
                             "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def snapshots_under_fio(server, minor, kind, leaves):
    """A live snapshot onto each of leaves while fio writes and verifies."""
    p = fio_verify_load(server.uri(minor))
    time.sleep(1)
    for leaf in leaves:
        out = server.tapctl("snapshot", "-m", minor, "-n", leaf).stdout.strip()
        assert out == kind + ":" + leaf
        time.sleep(0.3)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out                      # no I/O failed, verify passed
    assert server.call("list")["result"]["vbds"][0]["params"] == kind + ":" + leaves[-1]
    assert server.stats(minor)["ops"]["write"]["errors"] == 0


CRASH_WRITER = r"""
import nbd, os, random, struct, sys
uri, log, seed, slots = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
skews = [int(s) for s in sys.argv[5].split(",")]
rnd = random.Random(seed)
h = nbd.NBD(); h.connect_uri(uri)
i = 0
with open(log, "w") as lf:
    while True:
        off = rnd.randrange(slots) * 65536 + rnd.choice(skews)
        h.pwrite(struct.pack("<QQ", i, off) * 256, off)
        lf.write("w %d %d\n" % (i, off))
        i += 1
        if i % 16 == 0:
            h.flush()
            lf.write("f %d\n" % i)
            lf.flush(); os.fsync(lf.fileno())
"""


def acknowledged_before_last_flush(log):
    """offset -> the latest write the log shows before its last completed flush."""
    lines = log.read_text().splitlines()
    last_f = max(i for i, line in enumerate(lines) if line.startswith("f "))
    latest = {}
    for line in lines[:last_f]:
        if line.startswith("w "):
            _, seq, off = line.split()
            latest[int(off)] = int(seq)
    return latest


def kill9_rounds(make_server, tmp_path, params, check, rounds=20, slots=1024, skews=(0,),
                 load=None):
    """kill -9 of the server under 4 KiB writes (slots of 64 KiB, at skews in
    them) with a flush every 16, `rounds` times. check(it) judges the file;
    then every write acknowledged before the last completed flush must read
    back. load(uri, it) may start more load: a Popen, waited for after."""
    rnd = random.Random(1234)
    for it in range(rounds):
        srv = make_server(name="st%d" % it)
        srv.open(params)
        log = tmp_path / ("w%d.log" % it)
        extra = load(srv.uri(0), it) if load else None
        w = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, srv.uri(0), str(log), str(it),
                              str(slots), ",".join(map(str, skews))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: log.exists() and "f " in log.read_text(), what="a flush")
        time.sleep(rnd.uniform(0, 0.3))
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        w.wait(10)
        if extra:
            extra.wait(30)
        latest = acknowledged_before_last_flush(log)
        check(it)
        srv2 = make_server(name="vf%d" % it)
        srv2.open(params)
        h = nbd.NBD()
        h.connect_uri(srv2.uri(0))
        for off, seq in latest.items():
            got_seq, got_off = struct.unpack("<QQ", h.pread(512, off)[:16])
            assert got_off == off and got_seq >= seq, (it, off, seq, got_seq)
        h.shutdown()
        assert srv2.stop() == 0


def ext4_on_vbd(server, minor, tmp_path, trim=False):
    """mkfs.ext4 through nbdfuse and a loop device, ten files (fstrim with
    trim), fsck -n; returns the files. Needs root and /dev/fuse."""
    fmnt = tmp_path / "fuse"
    fmnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(fmnt / "disk"), "--unix", server.nbd_path(minor)])
    dev = None
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        wait_for(lambda: (fmnt / "disk").exists(), what="nbdfuse")
        dev = run("losetup", "--find", "--show", fmnt / "disk").stdout.strip()
        run("mkfs.ext4", "-q", "-F", dev)
        run("mount", dev, mnt)
        files = {("f%d" % i): os.urandom(300000 + i) for i in range(10)}
        for n, data in files.items():
            (mnt / n).write_bytes(data)
        if trim:
            run("fstrim", mnt)
        run("umount", mnt)
        run("fsck.ext4", "-n", "-f", dev)
        run("losetup", "-d", dev)
        dev = None
    finally:
        if dev:
            subprocess.run(["umount", "-l", str(mnt)])
            subprocess.run(["losetup", "-d", dev])
        subprocess.run(["fusermount3", "-u", "-z", str(fmnt)])
        fuse.wait(10)
    return files


def ext4_check_raw(raw, tmp_path, files):
    """fsck -n on a raw copy of the disk, and the files read back from it."""
    run("fsck.ext4", "-n", "-f", raw)
    mnt = tmp_path / "mnt"
    dev = run("losetup", "--find", "--show", "-r", raw).stdout.strip()
    try:
        run("mount", "-o", "ro", dev, mnt)
        for n, data in files.items():
            assert (mnt / n).read_bytes() == data
        run("umount", mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev])
