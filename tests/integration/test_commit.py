"""The commit block job (active commit, server/mirror.c; image.c's
td_image_open_writable): the leaf's data (and that of the images down to
the base) merged into an image below it while fio verify runs, the vbd
switched onto that image by itself; VHD and qcow2 chains three deep,
checked with vhd-util check, qemu-img check and compare; the refusals; a
kill -9 mid-commit."""
import os

import pytest

from conftest import BIN, ControlError, run
from test_mirror import MiB, fio_load, fio_ok, jobs, snapshot_of, wait_job
from test_stream import chain, kill9_mid_job

VHD_UTIL = os.path.join(BIN, "vhd-util")


def check(fmt, path):
    if fmt == "vhd":
        run(VHD_UTIL, "check", "-n", path)
    else:
        run("qemu-img", "check", "-q", path)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
@pytest.mark.parametrize("into", ["parent", "base"])
def test_commit_under_fio_verify(server, tmp_path, fmt, into):
    size = 64 * MiB
    base, mid, leaf = chain(server, tmp_path, fmt, size)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    fio = fio_load(server.uri(m), size, ios=24000, rate=4000)
    args = ["commit", "-m", m]
    target = mid
    if into == "base":
        args += ["--base", base]
        target = base
    server.tapctl(*args)
    assert jobs(server, m)[0]["type"] == "commit"
    job = wait_job(server, m, "done")
    assert "error" not in job
    assert fio.poll() is None, "fio ended before the switch: the test proves less"
    vbd = server.call("list", minor=m)["result"]["vbds"][0]
    assert vbd["path"] == target
    depth = 2 if into == "parent" else 1
    assert len(server.stats(m)["images"]) == depth
    fio_ok(fio)
    after = snapshot_of(server, m, str(tmp_path / "after.raw"))
    server.call("close", minor=m)
    for p in (target, base):
        check(fmt, p)
    # the shorter chain, opened afresh, reads what the guest saw
    m = server.open("%s:%s" % (fmt, target))["minor"]
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), after)
    server.call("close", minor=m)
    if into == "base" or fmt == "qcow2":
        # qemu reads it alone (a VHD base) or through its backing file (qcow2)
        qfmt = "vpc" if fmt == "vhd" else "qcow2"
        run("qemu-img", "compare", "-q", "-f", qfmt, "-F", "raw", target, after)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_intermediate_commit_under_fio_verify(server, tmp_path, fmt):
    """mid merged into base while the guest writes to the leaf; the leaf is
    then pointed at base, and mid is no longer referenced."""
    size = 64 * MiB
    base, mid, leaf = chain(server, tmp_path, fmt, size)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    before_base = snapshot_of(server, m, str(tmp_path / "before.raw"))
    fio = fio_load(server.uri(m), size, ios=24000, rate=4000)
    server.tapctl("commit", "-m", m, "--top", mid)
    job = wait_job(server, m, "done")
    assert "error" not in job and job["type"] == "commit"
    assert fio.poll() is None, "fio ended before the switch: the test proves less"
    names = [i["name"] for i in server.stats(m)["images"]]
    assert len(names) == 2 and names[0].endswith(leaf) and names[1].endswith(base), names
    fio_ok(fio)
    after = snapshot_of(server, m, str(tmp_path / "after.raw"))
    server.call("close", minor=m)
    check(fmt, leaf)
    check(fmt, base)
    if fmt == "vhd":
        assert run(VHD_UTIL, "query", "-n", leaf, "-p").stdout.strip() == base
    else:
        info = run("qemu-img", "info", "--output=json", leaf).stdout
        assert '"backing-filename": "base.qcow2"' in info, info
        # qemu follows the new backing file and reads the same disk
        run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", leaf, after)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), after)
    server.call("close", minor=m)
    # and mid can go: the chain does not open it
    os.unlink(mid)
    m = server.open("%s:%s" % (fmt, leaf))["minor"]
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", server.uri(m), after)
    assert os.path.getsize(before_base) == size


def test_commit_refusals(server, tmp_path):
    size = 64 * MiB
    base, mid, leaf = chain(server, tmp_path, "vhd", size)
    m = server.open("vhd:" + leaf)["minor"]

    def refused(code, text, **args):
        with pytest.raises(ControlError) as e:
            server.call("commit", minor=m, **args)
        assert e.value.code == code and text in e.value.message, e.value.message

    refused("EINVAL", "is not in minor", top=str(tmp_path / "elsewhere.vhd"))
    refused("EINVAL", "is not below", base=str(tmp_path / "elsewhere.vhd"))
    refused("EINVAL", "is not below", top=mid, base=leaf)
    refused("EINVAL", "the top has no parent", top=base)
    # another disk on the same parent: merging into it would change that disk
    other = str(tmp_path / "other.vhd")
    run(VHD_UTIL, "snapshot", "-n", other, "-p", mid)
    o = server.open("vhd:" + other)["minor"]
    refused("EBUSY", "a parent of another open disk")
    server.call("close", minor=o)
    server.call("commit", minor=m, speed=1 * MiB)
    refused("EBUSY", "already has a block job")
    server.tapctl("job-cancel", "-m", m)
    assert jobs(server, m)[0]["state"] == "cancelled"
    assert server.call("list", minor=m)["result"]["vbds"][0]["path"] == leaf
    # cancelled, the chain is as it was; and the base was let go of (a writer may open it)
    server.call("close", minor=m)
    check("vhd", mid)
    raw = str(tmp_path / "flat.img")
    with open(raw, "wb") as f:
        f.truncate(size)
    f = server.open("aio:" + raw)["minor"]
    with pytest.raises(ControlError) as e:
        server.call("commit", minor=f)
    assert e.value.code == "EINVAL" and "no parent" in e.value.message


def test_kill9_mid_commit_then_the_chain_opens_and_reads_the_same(make_server, tmp_path):
    # the base holds only data the leaf hides: the chain reads as before
    srv, m, (base, mid, leaf), before = kill9_mid_job(make_server, tmp_path, "commit")
    # a second commit finishes the merge
    srv.call("commit", minor=m)
    wait_job(srv, m, "done")
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", srv.uri(m), before)
    srv.call("close", minor=m)
    check("vhd", mid)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_a_failure_at_each_step_of_pointing_the_child_at_the_base(make_server, tmp_path, fmt):
    """The last step of an intermediate commit rewrites the child's metadata
    (set_parent) in several writes and syncs. A failure at each of them fails
    the job; the child, reopened, still names a parent it opens, and the
    chain reads what it read (the base holds the merged data either way)."""
    srv = make_server(extra=["--fault-injection"])
    size = 64 * MiB
    k = 1
    while True:
        d = tmp_path / ("k%d" % k)
        d.mkdir()
        base, mid, leaf = chain(srv, d, fmt, size)
        m = srv.open("%s:%s" % (fmt, leaf))["minor"]
        before = snapshot_of(srv, m, str(d / "before.raw"))
        # only the child's file: the copy phase reads mid and writes base
        srv.call("fault-inject", nth=k, path=os.path.basename(leaf), kinds="write,sync")
        srv.call("commit", minor=m, top=mid)
        job = wait_job(srv, m, "done", "failed")
        status = srv.call("fault-inject")["result"]
        srv.call("fault-inject", disarm=True)
        srv.call("close", minor=m)
        check(fmt, leaf)
        m = srv.open("%s:%s" % (fmt, leaf))["minor"]
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", srv.uri(m), before)
        srv.call("close", minor=m)
        if job["state"] == "done":
            assert status["injected"] == 0
            break
        assert "pointing it at" in job["error"], job
        k += 1
    # every write and sync of the rewrite was failed once before one run got through
    assert k >= (5 if fmt == "vhd" else 3), k
