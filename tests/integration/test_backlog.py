"""Listening sockets take the system's largest backlog (somaxconn), not 128:
a burst of connections that arrives while the server is busy waits in the
kernel's queue instead of being refused, and a well-behaved client that
comes after the burst still gets in and is served. The server is stopped
(SIGSTOP) during the burst, as a loop busy for a moment would be; no
connection of the burst completes a handshake."""

import errno
import os
import signal
import socket
import threading

import nbd
import pytest

from conftest import SLOW, Control

# the second engine's pass skips this (see pytest.ini): sockets, no I/O
pytestmark = pytest.mark.engine_independent

BURST = 600     # per socket: well past the old backlog of 128


def somaxconn():
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def burst(path, n):
    """n non-blocking connections to path, none ever saying a word: the
    sockets that connected (or are connecting), and how many were refused."""
    socks, refused = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex(path)
        if rc in (0, errno.EINPROGRESS):
            socks.append(s)
        else:
            assert rc in (errno.EAGAIN, errno.ECONNREFUSED), os.strerror(rc)
            refused += 1
            s.close()
    return socks, refused


class Client(threading.Thread):
    """Runs fn in a thread, keeping its result or the exception it raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.connected = threading.Event()

    def run(self):
        try:
            self.result = self.fn(self)
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = e
        finally:
            self.connected.set()


def test_burst_of_idle_connections_leaves_room_for_clients(server):
    n = min(BURST, somaxconn() - 16)
    if n < 300:
        pytest.skip("net.core.somaxconn is %d: too small to tell a backlog of 128 from it"
                    % somaxconn())
    info = server.open("ram:8M")
    nbd_path, ctl_path = info["nbd"], server.ctl_path

    def nbd_client(t):
        h = nbd.NBD()
        # a UNIX connect only queues: it returns before the server accepts
        h.aio_connect_unix(nbd_path)
        t.connected.set()
        while h.aio_is_connecting():
            h.poll(-1)
        assert h.aio_is_ready(), "the handshake failed"
        h.pwrite(b"b" * 4096, 4096)
        data = h.pread(4096, 4096)
        h.shutdown()
        return data

    def ctl_client(t):
        c = Control(ctl_path)       # queued in the backlog until the server runs
        t.connected.set()
        try:
            return c.call("list")["result"]
        finally:
            c.close()

    socks = []
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        for path in (nbd_path, ctl_path):
            s, refused = burst(path, n)
            socks += s
            assert refused == 0, "%d of %d connections to %s refused while the server " \
                "was busy: its backlog is smaller than the system allows" % (refused, n, path)
        clients = [Client(nbd_client), Client(ctl_client)]
        for c in clients:
            c.start()
            assert c.connected.wait(10 * SLOW)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    try:
        for c in clients:
            c.join(15 * SLOW)
            assert not c.is_alive(), "a well-behaved client behind the burst hung"
        assert clients[0].error is None, "libnbd client: %s" % clients[0].error
        assert clients[0].result == b"b" * 4096
        assert clients[1].error is None, "control client: %s" % clients[1].error
        assert [v["minor"] for v in clients[1].result["vbds"]] == [info["minor"]]
    finally:
        for s in socks:
            s.close()
    # the burst cost the server nothing lasting: it still answers
    assert server.call("list")["result"]["vbds"][0]["minor"] == info["minor"]
