"""Heavy real clients: fio's nbd engine with data verification, and a real
ext4 file system on a vbd (nbdfuse -> loop device -> mkfs/mount/fsck)."""

import os
import subprocess
import time

import pytest

from conftest import make_image, run


def fio(uri, *opts):
    return run("fio", "--output-format=terse", "--name=job", "--ioengine=nbd", "--uri=" + uri,
               "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", *opts, timeout=300)


@pytest.fixture
def shm_dir():
    """A directory on tmpfs, where raw images take the engine's memory path."""
    import shutil
    import tempfile
    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs /dev/shm (tmpfs)")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="tapdiskd-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("params", ["aio", "aio-tmpfs", "ram"])
def test_fio_verify(server, tmp_path, shm_dir, params):
    if params == "aio":
        spec = "aio:" + make_image(tmp_path / "fio.img", 256 << 20)
    elif params == "aio-tmpfs":
        spec = "aio:" + make_image(os.path.join(shm_dir, "fio.img"), 256 << 20)
    else:
        spec = "ram:256M"
    server.open(spec)
    uri = server.uri(0)
    fio(uri, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M", "--io_size=32M")
    fio(uri, "--rw=write", "--bs=1M", "--iodepth=32", "--size=128M", "--offset=128M")
    fio(uri, "--rw=randrw", "--bs=16k", "--iodepth=8", "--numjobs=4", "--size=32M",
        "--offset_increment=32M", "--group_reporting")
    st = server.stats(0)
    assert st["ops"]["write"]["errors"] == 0 and st["ops"]["read"]["errors"] == 0
    assert st["ops"]["write"]["bytes"] >= (32 + 128) << 20


@pytest.fixture
def fuse_loop(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/fuse (nbdfuse) and /dev/loop-control (losetup)")
    state = {"mounts": [], "loops": [], "fuse": []}
    yield state
    for m in reversed(state["mounts"]):
        subprocess.run(["umount", "-l", m])
    for dev in state["loops"]:
        subprocess.run(["losetup", "-d", dev])
    for mnt, proc in state["fuse"]:
        subprocess.run(["fusermount3", "-u", "-z", mnt])
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_ext4_on_a_vbd(server, tmp_path, fuse_loop):
    img = make_image(tmp_path / "ext4.img", 256 << 20)
    server.open("aio:" + img)
    fmnt = tmp_path / "fuse"
    fmnt.mkdir()
    p = subprocess.Popen(["nbdfuse", str(fmnt / "disk"), "--unix", server.nbd_path(0)])
    fuse_loop["fuse"].append((str(fmnt), p))
    deadline = time.time() + 10
    while not (fmnt / "disk").exists():
        assert time.time() < deadline
        time.sleep(0.02)
    dev = run("losetup", "--find", "--show", fmnt / "disk").stdout.strip()
    fuse_loop["loops"].append(dev)
    run("mkfs.ext4", "-q", "-F", dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "ext4", dev, mnt)
    fuse_loop["mounts"].append(str(mnt))
    blobs = {}
    for i in range(20):
        data = os.urandom(1 << 20) if i % 2 else os.urandom(4096 + i)
        (mnt / ("f%d" % i)).write_bytes(data)
        blobs[i] = data
    (mnt / "dir").mkdir()
    (mnt / "dir" / "small").write_text("hello tapdiskd\n")
    run("sync")
    run("umount", mnt)
    fuse_loop["mounts"].remove(str(mnt))
    run("fsck.ext4", "-n", "-f", dev)
    run("mount", "-t", "ext4", "-o", "ro", dev, mnt)
    fuse_loop["mounts"].append(str(mnt))
    for i, data in blobs.items():
        assert (mnt / ("f%d" % i)).read_bytes() == data
    assert (mnt / "dir" / "small").read_text() == "hello tapdiskd\n"
    st = server.stats(0)
    assert st["ops"]["flush"]["reqs"] >= 1       # sync and umount reach the server
    run("umount", mnt)
    fuse_loop["mounts"].remove(str(mnt))
    run("losetup", "-d", dev)
    fuse_loop["loops"].remove(dev)
    # the image itself holds the file system: e2fsck straight on the file agrees
    run("fsck.ext4", "-n", "-f", img)


def test_block_device_image(server, tmp_path, fuse_loop):
    """A raw block device (a loop device): O_DIRECT, discard, flush, size."""
    backing = make_image(tmp_path / "backing.img", 64 << 20)
    dev = run("losetup", "--find", "--show", "--direct-io=on", backing).stdout.strip()
    fuse_loop["loops"].append(dev)
    r = server.open("aio:" + dev)
    assert r["size"] == 64 << 20 and r["sector_size"] == 512
    uri = server.uri(r["minor"])
    fio(uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 1M", "-c", "discard 1536k 512k",
        "-c", "read -P 0x3c 1M 512k", "-c", "read -P 0 1536k 512k", "-c", "flush",
        "-c", "write -P 0x11 3000 777", "-c", "read -P 0x11 3000 777", uri)
    server.call("destroy", minor=r["minor"])
    run("losetup", "-d", dev)
    fuse_loop["loops"].remove(dev)
    with open(backing, "rb") as f:
        f.seek(1 << 20)
        assert f.read(512 << 10) == b"\x3c" * (512 << 10)
