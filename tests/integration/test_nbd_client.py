"""The nbd: driver (drivers/nbd_client.c): a vbd whose image is on an NBD
server, reached with libnbd. Against servers nobody here wrote (nbdkit's
memory plugin with its log, error, delay, pause and blocksize-policy
filters; qemu-storage-daemon) and against tapdiskd itself."""
import json
import os
import signal
import socket
import time

import pytest

from conftest import make_image, qsd_export, run

# libnbd does the driver's I/O, not the engine: the second engine's pass skips it
pytestmark = pytest.mark.engine_independent


def fio_verify(uri, size, n=4000, extra=()):
    r = run("fio", "--name=v", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k",
            "--iodepth=32", "--size=%d" % size, "--verify=crc32c", "--verify_fatal=1",
            "--verify_state_save=0",
            "--number_ios=%d" % n, "--randrepeat=0", *extra, timeout=300)
    assert "err= 0" in r.stdout, r.stdout


def test_a_remote_disk_verifies_and_matches_the_server(server, kits, tmp_path):
    log = str(tmp_path / "nbdkit.log")
    k = kits("--filter=log", "memory", "64M", "logfile=" + log)
    m = server.open("nbd:" + k.uri)["minor"]
    st = server.stats(m)
    assert st["images"][0]["driver"] == "nbd" and st["images"][0]["size"] == 64 << 20
    fio_verify(server.uri(m), 64 << 20)
    # every command went through: FUA writes, zeroes, trims, flush
    run("qemu-io", "-f", "raw", "-c", "write -f -P 5 0 64k", "-c", "write -z 1M 1M",
        "-c", "discard 4M 1M", "-c", "flush", "-c", "read -P 5 0 64k",
        "-c", "read -P 0 1M 1M", server.uri(m))
    text = open(log).read()
    assert "Write " in text and "fua=1" in text
    assert "Zero " in text and "Trim " in text and "Flush " in text
    # the same bytes seen directly at the server
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(m), k.uri)
    # holes come through block status
    out = run("nbdinfo", "--map", server.uri(m)).stdout
    assert "hole" in out, out
    server.call("close", minor=m)


def test_against_qemu_storage_daemon_and_tapdiskd_itself(server, tmp_path):
    img = make_image(tmp_path / "q.img", 32 << 20)
    sock = str(tmp_path / "qsd.sock")
    with qsd_export(img, sock):
        m = server.open("nbd:nbd+unix:///?socket=" + sock)["minor"]
        fio_verify(server.uri(m), 32 << 20, n=2000)
        server.call("close", minor=m)
    # a vbd of this very server, reached through another vbd
    raw = make_image(tmp_path / "r.img", 32 << 20)
    a = server.open("aio:" + raw)["minor"]
    b = server.open("nbd:" + server.uri(a))["minor"]
    fio_verify(server.uri(b), 32 << 20, n=2000)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(b), raw)
    server.call("close", minor=b)
    server.call("close", minor=a)


def test_requests_are_cut_to_the_servers_block_size(server, kits, tmp_path):
    log = str(tmp_path / "bs.log")
    k = kits("--filter=log", "--filter=blocksize-policy", "memory", "16M",
             "blocksize-minimum=4096", "blocksize-maximum=65536",
             "blocksize-preferred=65536", "blocksize-error-policy=error", "logfile=" + log)
    m = server.open("nbd:" + k.uri)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 3 0 4M", "-c", "read -P 3 0 4M",
        server.uri(m))
    # 4 MiB in 64 KiB commands, nothing larger, nothing refused
    sizes = [int(w.split("=")[1], 16 if "0x" in w else 10) for line in open(log)
             for w in line.split() if w.startswith("count=")]
    assert sizes and max(sizes) <= 65536, max(sizes)
    # the server's minimum is the vbd's: advertised to our own clients
    info = json.loads(run("nbdinfo", "--json", server.uri(m)).stdout)
    assert info["exports"][0]["block_size_minimum"] == 4096, info
    server.call("close", minor=m)


def test_a_server_that_dies_fails_requests_and_unpause_reconnects(server, kits, tmp_path):
    k = kits("memory", "32M", name="first")
    m = server.open("nbd:" + k.uri)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", server.uri(m))
    assert server.stats(m)["images"][0]["status"] == "connected"
    k.stop(signal.SIGKILL)
    r = run("qemu-io", "-f", "raw", "-c", "read 0 4k", "-c", "write 0 4k", server.uri(m),
            check=False, timeout=60)
    assert "Input/output error" in r.stdout + r.stderr
    assert "connection lost" in server.log()
    assert "connection lost" in server.stats(m)["images"][0]["status"]
    # the server lives: another vbd works, and this one moves to a new server
    other = make_image(tmp_path / "o.img", 16 << 20)
    o = server.open("aio:" + other)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 2 0 4k", server.uri(o))
    k2 = kits("memory", "32M", name="second")
    server.tapctl("pause", "-m", m)
    server.tapctl("unpause", "-m", m, "-a", "nbd:" + k2.uri)
    run("qemu-io", "-f", "raw", "-c", "write -P 9 0 64k", "-c", "read -P 9 0 64k",
        server.uri(m))
    server.call("close", minor=m)
    server.call("close", minor=o)


def test_a_server_that_stops_answering_times_out_and_closes(make_server, kits, tmp_path):
    srv = make_server()
    k = kits("--filter=pause", "memory", "16M", "pause-control=" + str(tmp_path / "p.ctl"))
    m = srv.open("nbd:" + k.uri, timeout=2)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri(m))
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(tmp_path / "p.ctl"))
    s.sendall(b"p")
    assert s.recv(1) == b"P"
    t0 = time.time()
    r = run("qemu-io", "-f", "raw", "-c", "read 0 4k", srv.uri(m), check=False, timeout=60)
    took = time.time() - t0
    assert "Input/output error" in r.stdout + r.stderr and took < 30, (took, r.stdout)
    assert srv.stats(m)["timeouts"] >= 1
    srv.call("close", minor=m, force=True)
    s.close()


def test_server_errors_reach_the_client_and_nothing_else(server, kits, tmp_path):
    inject = str(tmp_path / "inject")
    k = kits("--filter=error", "memory", "16M", "error=EIO", "error-rate=100%",
             "error-file=" + inject)
    m = server.open("nbd:" + k.uri)["minor"]
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri(m))
    open(inject, "w").close()
    r = run("qemu-io", "-f", "raw", "-c", "read 0 4k", server.uri(m), check=False)
    assert "Input/output error" in r.stdout + r.stderr
    os.unlink(inject)
    run("qemu-io", "-f", "raw", "-c", "read -P 1 0 4k", server.uri(m))
    server.call("close", minor=m)


def test_bad_params_are_one_line_each(server, kits, tmp_path):
    ro = kits("-r", "memory", "16M", name="ro")
    cases = [
        ("nbd:nbd+unix:///?socket=" + str(tmp_path / "nothing.sock"), "cannot connect"),
        ("nbd:nbd://127.0.0.1:1/", "cannot connect"),
        ("nbd:not a uri", "cannot connect"),
        ("nbd:" + ro.uri, "read-only"),
    ]
    for params, why in cases:
        t0 = time.time()
        r = server.call("open", check=False, params=params)
        assert not r["ok"] and why in r["error"]["message"], (params, r)
        assert "\n" not in r["error"]["message"] and time.time() - t0 < 10
    # read-only is fine when asked for
    m = server.open("nbd:" + ro.uri, readonly=True)["minor"]
    run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", server.uri(m))
    server.call("destroy", minor=m)
    assert server.call("list")["result"]["vbds"] == []


class HostileServer:
    """A minimal NBD server (fixed newstyle, simple replies only) that turns
    hostile at its first read: a short reply then a hang-up, more data than
    asked, a cookie never sent, or a header cut in half."""

    def __init__(self, path, mode, size=16 << 20):
        import threading
        self.path, self.mode, self.size = path, mode, size
        self.ls = socket.socket(socket.AF_UNIX)
        self.ls.bind(path)
        self.ls.listen(4)
        self.t = threading.Thread(target=self.serve, daemon=True)
        self.t.start()

    def serve(self):
        import struct
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            try:
                self.one(c, struct)
            except (OSError, ValueError):
                pass
            finally:
                c.close()

    @staticmethod
    def recvn(c, n):
        buf = b""
        while len(buf) < n:
            d = c.recv(n - len(buf))
            if not d:
                raise ValueError("eof")
            buf += d
        return buf

    def one(self, c, struct):
        c.sendall(b"NBDMAGIC" + struct.pack(">QH", 0x49484156454F5054, 3))
        self.recvn(c, 4)
        size = (1 << 64) - 512 if self.mode == "absurd-size" else self.size
        while True:
            _, opt, ln = struct.unpack(">QII", self.recvn(c, 16))
            self.recvn(c, ln)
            rep = lambda t, data=b"": c.sendall(
                struct.pack(">QIII", 0x3e889045565a9, opt, t, len(data)) + data)
            if opt == 7:	# GO: the export's size and flags, then ack
                rep(3, struct.pack(">HQH", 0, size, 1 | 4 | 8))	# HAS_FLAGS, SEND_FLUSH, SEND_FUA
                rep(1)
                break
            rep((1 << 31) + 1)	# anything else: unsupported
        data = bytearray(self.size if self.size < (1 << 30) else 0)
        while True:
            magic, flags, typ, cookie, off, ln = struct.unpack(">IHHQQI", self.recvn(c, 28))
            if typ == 1:	# write
                data[off:off + ln] = self.recvn(c, ln)
                c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))
            elif typ == 0:	# read: the hostile part
                head = struct.pack(">IIQ", 0x67446698, 0, cookie)
                if self.mode == "short-read":
                    c.sendall(head + bytes(data[off:off + ln // 2]))
                    return
                if self.mode == "oversized":
                    c.sendall(head + bytes(data[off:off + ln]) + b"\xee" * 4096)
                elif self.mode == "wrong-cookie":
                    c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie ^ 0x5a5a) +
                              bytes(data[off:off + ln]))
                elif self.mode == "cut-header":
                    c.sendall(head[:6])
                    return
                else:
                    c.sendall(head + bytes(data[off:off + ln]))
            elif typ == 2:	# disconnect
                return
            else:
                c.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))

    def close(self):
        self.ls.close()


@pytest.mark.parametrize("mode", ["short-read", "oversized", "wrong-cookie", "cut-header"])
def test_a_hostile_server_fails_requests_never_the_server(server, tmp_path, mode):
    hs = HostileServer(str(tmp_path / "h.sock"), mode)
    try:
        m = server.open("nbd:nbd+unix:///?socket=" + hs.path)["minor"]
        assert server.stats(m)["images"][0]["status"] == "connected"
        run("qemu-io", "-f", "raw", "-c", "write -P 4 0 64k", server.uri(m))
        r = run("qemu-io", "-f", "raw", "-c", "read 0 64k", "-c", "read 0 4k", server.uri(m),
                check=False, timeout=60)
        assert "Input/output error" in r.stdout + r.stderr, (mode, r.stdout)
        assert "connection lost" in server.stats(m)["images"][0]["status"]
        # the server lives, another vbd serves, and this one closes
        other = server.open("ram:4M")["minor"]
        run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", "-c", "read -P 1 0 4k",
            server.uri(other))
        server.call("destroy", minor=m, force=True)
        server.call("destroy", minor=other)
    finally:
        hs.close()


def test_a_server_claiming_an_absurd_size_is_refused(server, tmp_path):
    hs = HostileServer(str(tmp_path / "h.sock"), "absurd-size")
    try:
        r = server.call("open", check=False, params="nbd:nbd+unix:///?socket=" + hs.path)
        assert not r["ok"], r
        assert "\n" not in r["error"]["message"]
    finally:
        hs.close()
