"""tapdiskd as a service: the systemd notification protocol (READY, STATUS,
STOPPING over NOTIFY_SOCKET, received here as systemd would), and the
descriptor budget (the soft limit raised at start; a vbd open that would
exhaust descriptors refused with EMFILE and one clear line, while every
other vbd and the control socket go on)."""

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import BIN, SLOW, ControlError, Control, make_image, run, wait_for

pytestmark = pytest.mark.engine_independent


class NotifySocket:
    """The service manager's end: a datagram socket NOTIFY_SOCKET names."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def next(self, timeout=20):
        """The next datagram as a dict of its KEY=VALUE lines."""
        self.sock.settimeout(timeout * SLOW)
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append(msg)
        return msg

    def wait(self, key, value=None, timeout=20):
        deadline = time.time() + timeout * SLOW
        while True:
            msg = self.next(max(0.1, deadline - time.time()))
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self):
        self.sock.close()


def test_notify_ready_status_and_stopping(make_server, tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=ns.path)
    srv = make_server(env=env, start=False)
    srv.start(wait=False)
    try:
        first = ns.next()
        # READY=1 is the first thing said, and the control socket answers by then
        assert first.get("READY") == "1", ns.messages
        c = Control(srv.ctl_path)
        assert c.call("version")["result"]["pid"] == srv.proc.pid
        c.close()
        assert first.get("STATUS") == "serving 0 vbds"

        srv.open("ram:16M")
        assert ns.wait("STATUS")["STATUS"] == "serving 1 vbd"
        srv.open("ram:16M")
        assert ns.wait("STATUS")["STATUS"] == "serving 2 vbds"
        srv.call("destroy", minor=0)
        assert ns.wait("STATUS")["STATUS"] == "serving 1 vbd"

        srv.proc.send_signal(signal.SIGTERM)
        assert ns.wait("STOPPING")["STOPPING"] == "1"
        assert srv.proc.wait(timeout=30 * SLOW) == 0
        assert "READY" not in "".join(str(m) for m in ns.messages[1:])
    finally:
        ns.close()


def test_no_notify_socket_is_fine_and_a_dead_one_is_one_line(make_server, tmp_path):
    # NOTIFY_SOCKET naming nothing: the server runs, says so once, stops cleanly
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "nobody.sock"))
    srv = make_server(env=env)
    srv.open("ram:1M")
    assert srv.stop() == 0
    assert srv.log().count("sd_notify READY") == 1, srv.log()


def _limits(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_soft_fd_limit_raised_to_hard_and_logged(make_server):
    srv = make_server(prefix=["prlimit", "--nofile=1024:8192"])
    assert _limits(srv.proc.pid) == (8192, 8192)
    assert "file descriptors: limit raised from 1024 to 8192" in srv.log()


def _open_until_refused(srv, tmp_path, most=200):
    """Opens raw vbds until one is refused; returns (minors, the refusal)."""
    minors = []
    for i in range(most):
        img = make_image(tmp_path / ("d%d.img" % i), 4 << 20)
        r = srv.call("open", check=False, params="aio:" + img)
        if not r["ok"]:
            return minors, r["error"]
        minors.append(r["result"]["minor"])
    raise AssertionError("%d opens and no refusal under a low descriptor limit" % most)


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _io_works(srv, minor, pattern):
    run("qemu-io", "-f", "raw", "-c", "write -P %d 0 64k" % pattern,
        "-c", "read -P %d 0 64k" % pattern, srv.uri(minor))


@pytest.mark.engine
def test_out_of_descriptors_open_fails_with_emfile_and_nothing_else_is_disturbed(
        make_server, tmp_path):
    limit = 128
    srv = make_server(prefix=["prlimit", "--nofile=%d:%d" % (limit, limit)])
    minors, err = _open_until_refused(srv, tmp_path)
    assert len(minors) >= 10, (minors, err)
    assert err["code"] == "EMFILE", err
    assert "out of file descriptors" in err["message"], err
    assert "LimitNOFILE" in err["message"], err
    assert "of %d" % limit in err["message"], err
    # the refused open left nothing behind, and the reserve is intact
    listed = srv.call("list")["result"]["vbds"]
    assert sorted(v["minor"] for v in listed) == minors
    assert len(os.listdir("/proc/%d/fd" % srv.proc.pid)) < limit - 8

    # tap-ctl says it in one line and fails
    img = make_image(tmp_path / "more.img", 4 << 20)
    r = srv.tapctl("create", "-a", "aio:" + img, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "out of file descriptors" in r.stderr, r.stderr

    # every vbd still serves, the control socket answers, the stats are there
    _io_works(srv, minors[0], 0x11)
    _io_works(srv, minors[-1], 0x22)
    assert srv.stats(minors[-1])["ops"]["write"]["reqs"] >= 1

    # closing one vbd makes room for another
    srv.call("destroy", minor=minors[-1])
    again = srv.open("aio:" + img)
    _io_works(srv, again["minor"], 0x33)


@pytest.mark.engine
def test_nbd_clients_taking_the_last_descriptors_do_not_spin_the_loop(make_server, tmp_path):
    limit = 128
    srv = make_server(prefix=["prlimit", "--nofile=%d:%d" % (limit, limit)],
                      extra=["--metrics-listen", "127.0.0.1:0"])
    metrics = srv.call("version")["result"]["metrics"]
    minors, _ = _open_until_refused(srv, tmp_path)

    # more clients than descriptors are left: the excess is shed, not spun on
    clients = []
    for _ in range(2 * 16 + 8):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.nbd_path(minors[0]))
        clients.append(s)
    wait_for(lambda: "nbd: refused a connection: out of file descriptors" in srv.log(),
             what="the shed connection's log line")
    before = _cpu_seconds(srv.proc.pid)
    time.sleep(1.0)
    spent = _cpu_seconds(srv.proc.pid) - before
    assert spent < 0.5, "the loop spins with no descriptor left: %.2f s of CPU in 1 s" % spent

    # a control client meanwhile is told why, in one JSON line
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10 * SLOW)
    c.connect(srv.ctl_path)
    reply = c.recv(4096).decode()
    c.close()
    assert '"code":"EMFILE"' in reply and "out of file descriptors" in reply, reply
    assert "(%d in use of %d" % (limit, limit) in reply, reply
    # and an HTTP client is let go at once
    host, port = metrics.rsplit(":", 1)
    # (it sends nothing: a request arriving after the close would draw a RST)
    h = socket.create_connection((host, int(port)), timeout=10 * SLOW)
    assert h.recv(4096) == b"", "an HTTP client kept with no descriptor left?"
    h.close()
    # the log is rate-limited, not a line per loop turn
    assert srv.log().count("out of file descriptors") < 40, srv.log()[-2000:]

    for s in clients:
        s.close()
    wait_for(lambda: _control_answers(srv), what="the control socket")
    _io_works(srv, minors[0], 0x44)
    _io_works(srv, minors[-1], 0x55)


def _control_answers(srv):
    try:
        c = Control(srv.ctl_path)
        ok = c.call("list", check=False)["ok"]
        c.close()
        return ok
    except (OSError, EOFError, ValueError, AssertionError, ControlError):
        return False


@pytest.mark.engine
def test_a_chain_that_runs_out_of_descriptors_half_way_fails_cleanly(make_server, tmp_path):
    # past the reserve check, a deep chain's own opens hit the limit: the
    # same clear EMFILE line, and every image it opened is closed again
    limit = 128
    srv = make_server(prefix=["prlimit", "--nofile=%d:%d" % (limit, limit)])
    vhd_util = os.path.join(BIN, "vhd-util")
    prev = str(tmp_path / "c0.vhd")
    run(vhd_util, "create", "-n", prev, "-s", "8")
    for i in range(1, 40):
        cur = str(tmp_path / ("c%d.vhd" % i))
        run(vhd_util, "snapshot", "-n", cur, "-p", prev)
        prev = cur
    minors, _ = _open_until_refused(srv, tmp_path)
    for m in minors[-3:]:
        srv.call("destroy", minor=m)
    fds = len(os.listdir("/proc/%d/fd" % srv.proc.pid))
    r = srv.call("open", check=False, params="vhd:" + prev)
    assert not r["ok"] and r["error"]["code"] == "EMFILE", r
    assert "out of file descriptors" in r["error"]["message"], r
    assert "vhd:" + prev in r["error"]["message"], r
    wait_for(lambda: len(os.listdir("/proc/%d/fd" % srv.proc.pid)) == fds,
             what="the half-opened chain's descriptors to be closed")
    _io_works(srv, minors[0], 0x66)
    img = make_image(tmp_path / "after.img", 4 << 20)
    _io_works(srv, srv.open("aio:" + img)["minor"], 0x77)
