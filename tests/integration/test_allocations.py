"""Steady-state I/O makes no heap call: tapdiskd runs under
tests/preload/alloc_probe.c (LD_PRELOAD), which counts every allocation
and writes the total to ALLOC_COUNT_FILE on SIGUSR2. After a warm-up,
4 KiB reads and writes over NBD on raw, vhd and qcow2 images, and reads
through an empty vhd or qcow2 child (each one a read of the parent), must
cost almost none: what is left is the loop's own (a timer, a log line),
not one per request. `make bench` measures the same under fio."""
import json
import os
import random
import subprocess
import sys

import nbd
import pytest

from conftest import ALLOC_PROBE as PROBE, BIN, make_image, needs_alloc_probe, run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "preload"))
from alloc_count import allocations  # noqa: E402

pytestmark = needs_alloc_probe

SIZE = 8 << 20
OPS = 2000
MAX_PER_REQUEST = 0.05      # 2.0 per read when a parent's state came from the heap


def image(tmp_path, fmt, name, parent=None):
    path = str(tmp_path / name)
    if fmt == "aio":
        make_image(path, SIZE)
    elif fmt == "vhd" and parent:
        run(os.path.join(BIN, "vhd-util"), "snapshot", "-n", path, "-p", parent)
    elif fmt == "vhd":
        run(os.path.join(BIN, "vhd-util"), "create", "-n", path, "-s", SIZE >> 20)
    elif parent:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", parent, "-F", "qcow2", path)
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    return path


def fill(srv, params):
    m = srv.open(params)["minor"]
    h = nbd.NBD()
    h.connect_uri(srv.uri(m))
    for off in range(0, SIZE, 1 << 20):
        h.pwrite(bytes([off >> 20 | 1]) * (1 << 20), off)
    h.flush()
    h.shutdown()
    srv.call("destroy", minor=m)


def per_request(srv, count_file, params, writes):
    """Heap calls per 4 KiB request, QD1, after a warm-up of as many."""
    m = srv.open(params)["minor"]
    h = nbd.NBD()
    h.connect_uri(srv.uri(m))
    rng = random.Random(7)
    data = b"x" * 4096

    def burst():
        for _ in range(OPS):
            off = rng.randrange(SIZE // 4096) * 4096
            if writes and rng.random() < 0.5:
                h.pwrite(data, off)
            else:
                h.pread(4096, off)
    burst()                                 # warm: contexts, buffers, metadata caches
    before = allocations(srv.proc.pid, count_file)
    burst()
    after = allocations(srv.proc.pid, count_file)
    h.shutdown()
    srv.call("destroy", minor=m)
    return (after - before) / OPS


@pytest.mark.parametrize("fmt", ["aio", "vhd", "qcow2"])
def test_steady_state_io_makes_no_heap_call(make_server, tmp_path, fmt):
    count_file = str(tmp_path / "allocs")
    srv = make_server(env=dict(os.environ, LD_PRELOAD=PROBE, ALLOC_COUNT_FILE=count_file))
    path = image(tmp_path, fmt, "disk")
    fill(srv, fmt + ":" + path)
    n = per_request(srv, count_file, fmt + ":" + path, writes=True)
    assert n < MAX_PER_REQUEST, "%.3f heap calls per request on %s" % (n, fmt)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_reads_through_an_empty_child_make_no_heap_call(make_server, tmp_path, fmt):
    count_file = str(tmp_path / "allocs")
    srv = make_server(env=dict(os.environ, LD_PRELOAD=PROBE, ALLOC_COUNT_FILE=count_file))
    parent = image(tmp_path, fmt, "parent")
    fill(srv, fmt + ":" + parent)
    child = image(tmp_path, fmt, "child", parent=parent)
    n = per_request(srv, count_file, fmt + ":" + child, writes=False)
    assert n < MAX_PER_REQUEST, "%.3f heap calls per read through a %s child" % (n, fmt)
    # the child is still empty: every read went to the parent
    if fmt == "qcow2":
        extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", child],
                                            capture_output=True, text=True, check=True).stdout)
        assert all(e["depth"] >= 1 for e in extents if e["data"]), extents
