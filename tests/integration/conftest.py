"""Harness for integration tests: starts the real tapdiskd, talks to its
control socket (validating every response against schema/), and runs
tap-ctl. The suite runs once per I/O engine (TAPDISKD_IO_ENGINE)."""

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import time

import jsonschema
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("TAPDISKD_BIN_DIR", os.path.join(ROOT, "build", "bin"))
ENGINE = os.environ.get("TAPDISKD_IO_ENGINE", "uring")
# event loops each server runs (--loops); unset: the server's default (one per CPU)
LOOPS = os.environ.get("TAPDISKD_LOOPS")
# Under valgrind or ASan the server is slower: scale timeouts.
SLOW = float(os.environ.get("TAPDISKD_TIMEOUT_SCALE", "1"))

# tests/preload/alloc_probe.c of the build under test, for LD_PRELOAD: it
# counts allocations (SIGUSR2) and fails them (SIGUSR1). It replaces malloc,
# as ASan's runtime does, and the two cannot share a process: the tests that
# use it are marked needs_alloc_probe (the uring pass of make check and the
# threads pass of make check-full run them).
ALLOC_PROBE = os.path.join(os.path.dirname(BIN), "tests", "alloc_probe.so")


def _asan_build():
    with open(os.path.join(BIN, "tapdiskd"), "rb") as f:
        return b"libasan" in f.read()


needs_alloc_probe = pytest.mark.skipif(_asan_build(), reason="ASan build: its allocator "
                                       "and the probe both replace malloc")

SCHEMA_BASE = "https://tapdiskd.invalid/schema/"


def _load_schemas():
    store = {}
    for path in glob.glob(os.path.join(ROOT, "schema", "*.json")):
        with open(path) as f:
            doc = json.load(f)
        store[doc["$id"]] = doc
    return store


SCHEMAS = _load_schemas()


def schema(name):
    return SCHEMAS[SCHEMA_BASE + name]


def validate(instance, name):
    """Validates instance against schema/<name>, resolving $refs locally."""
    resolver = jsonschema.RefResolver(SCHEMA_BASE + name, schema(name), store=SCHEMAS)
    jsonschema.Draft202012Validator(schema(name), resolver=resolver).validate(instance)


def validate_response(resp, cmd):
    validate(resp, "response.json")
    if resp["ok"]:
        validate(resp["result"], cmd + ".result.json")


class ControlError(Exception):
    def __init__(self, code, message):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


class Control:
    """One connection to the control socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30 * SLOW)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 1

    def send_line(self, data):
        self.sock.sendall(data)

    def read_line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("control socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, cmd, check=True, **args):
        rid = self.next_id
        self.next_id += 1
        req = {"id": rid, "cmd": cmd, "args": args}
        validate(req, "request.json")
        self.send_line(json.dumps(req).encode() + b"\n")
        resp = self.read_line()
        validate_response(resp, cmd)
        assert resp["id"] == rid
        if check and not resp["ok"]:
            raise ControlError(resp["error"]["code"], resp["error"]["message"])
        return resp

    def close(self):
        self.sock.close()


class Server:
    """A running tapdiskd on its own state dir."""

    def __init__(self, state_dir, engine=ENGINE, extra=(), env=None, prefix=(), loops=LOOPS):
        self.state_dir = str(state_dir)
        self.engine = engine
        self.loops = loops           # None: the server's default
        self.extra = list(extra)
        self.env = env
        self.prefix = list(prefix)   # e.g. prlimit: exec's the server, same pid
        self.proc = None
        self.log_path = os.path.join(self.state_dir + ".log")
        self._ctl = None

    @property
    def ctl_path(self):
        return os.path.join(self.state_dir, "ctl.sock")

    def start(self, wait=True):
        self.logf = open(self.log_path, "ab")
        cmd = [os.path.join(BIN, "tapdiskd"), "--state-dir", self.state_dir,
               "--foreground", "--io-engine", self.engine] + \
            (["--loops", self.loops] if self.loops and "--loops" not in self.extra else []) + \
            self.extra
        wrap = os.environ.get("TAPDISKD_WRAPPER")
        if wrap:
            cmd = wrap.split() + cmd
        cmd = self.prefix + cmd
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=self.logf, env=self.env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self):
        deadline = time.time() + 20 * SLOW
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("tapdiskd exited with %d:\n%s" % (self.proc.returncode, self.log()))
            try:
                c = Control(self.ctl_path)
                c.call("version")
                c.close()
                return
            except (OSError, EOFError):
                time.sleep(0.02)
        raise RuntimeError("tapdiskd did not come up:\n" + self.log())

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def ctl(self):
        if self._ctl is None:
            self._ctl = Control(self.ctl_path)
        return self._ctl

    def call(self, cmd, check=True, **args):
        return self.ctl.call(cmd, check=check, **args)

    def open(self, params, **args):
        """Opens a vbd; returns the open result (minor, nbd, size, ...)."""
        return self.call("open", params=params, **args)["result"]

    def uri(self, minor):
        return "nbd+unix:///?socket=" + self.nbd_path(minor)

    def nbd_path(self, minor):
        return os.path.join(self.state_dir, "nbd%d.%d" % (self.proc.pid, minor))

    def stats(self, minor):
        return self.call("stats", minor=minor)["result"]

    def tapctl(self, *args, check=True, env=None, input=None):
        cmd = [os.path.join(BIN, "tap-ctl"), "-S", self.state_dir] + [str(a) for a in args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, input=input,
                           timeout=60 * SLOW)
        if check and r.returncode != 0:
            raise AssertionError("tap-ctl %s failed (%d): %s" % (args, r.returncode, r.stderr))
        return r

    def stop(self, sig=signal.SIGTERM, timeout=None):
        """Stops the server; returns its exit status."""
        if self._ctl:
            self._ctl.close()
            self._ctl = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout or 60 * SLOW)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("tapdiskd did not stop on %s:\n%s" % (sig, self.log()))

    def kill(self):
        if self._ctl:
            self._ctl.close()
            self._ctl = None
        self.proc.kill()
        self.proc.wait()

    def assert_clean_log(self):
        log = self.log()
        for bad in ("AddressSanitizer", "runtime error:", "LeakSanitizer", "ERROR SUMMARY: [1-9]",
                    "WARNING: ThreadSanitizer",
                    "Segmentation fault"):
            assert bad not in log, "sanitizer/valgrind report in server log:\n" + log


@pytest.fixture
def server(tmp_path):
    """A fresh tapdiskd; stopped (and checked for a clean exit) after the test."""
    srv = Server(tmp_path / "state").start()
    yield srv
    rc = srv.stop()
    srv.assert_clean_log()
    assert rc == 0, "tapdiskd exited with %s:\n%s" % (rc, srv.log())


@pytest.fixture
def make_server(tmp_path):
    """Factory for tests that need several servers or special options."""
    servers = []

    def factory(name="state", start=True, **kw):
        srv = Server(tmp_path / name, **kw)
        servers.append(srv)
        return srv.start() if start else srv

    yield factory
    for srv in servers:
        if srv.proc and srv.proc.poll() is None:
            srv.stop()
        srv.assert_clean_log()


def make_image(path, size, pattern=None):
    """A sparse raw image; pattern fills the first MiB if given."""
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern is not None:
            f.write(bytes([pattern]) * (1 << 20))
    return str(path)


def run(*cmd, check=True, timeout=120, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=timeout * SLOW, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d):\nstdout: %s\nstderr: %s" %
                             (" ".join(map(str, cmd)), r.returncode, r.stdout, r.stderr))
    return r


class StuckDisk:
    """A file whose I/O can be frozen or made to fail on demand: nbdkit's
    memory plugin behind its pause and error filters, mounted by nbdfuse.
    delay (seconds) puts the delay filter in front instead of pause: every
    read takes that long."""

    def __init__(self, base, size="64M", delay=None):
        self.base = str(base)
        os.makedirs(os.path.join(self.base, "mnt"), exist_ok=True)
        self.path = os.path.join(self.base, "mnt", "disk")
        self.ctl = None if delay else os.path.join(self.base, "pause.sock")
        self.inject = os.path.join(self.base, "inject")
        sock = os.path.join(self.base, "nbd.sock")
        first = ["--filter=delay"] if delay else ["--filter=pause"]
        arg = "delay-read=%g" % delay if delay else "pause-control=" + self.ctl
        run("nbdkit", "-U", sock, "-P", os.path.join(self.base, "nbdkit.pid"),
            *first, "--filter=error", "memory", size, arg, "error=EIO", "error-rate=100%",
            "error-file=" + self.inject)
        self.fuse = subprocess.Popen(["nbdfuse", os.path.join(self.base, "mnt", "disk"),
                                      "--unix", sock])
        deadline = time.time() + 10
        while not os.path.exists(self.path):
            assert time.time() < deadline, "nbdfuse did not mount"
            time.sleep(0.02)

    def _send(self, c):
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.ctl)
        s.sendall(c)
        reply = s.recv(1)
        s.close()
        return reply

    def freeze(self):
        assert self._send(b"p") == b"P"

    def thaw(self):
        assert self._send(b"r") == b"R"

    def fail(self, on=True):
        if on:
            open(self.inject, "w").close()
        elif os.path.exists(self.inject):
            os.unlink(self.inject)

    def close(self):
        try:
            if self.ctl:
                self.thaw()
        except OSError:
            pass
        # lazy: a server that still holds the file must not hang the teardown
        subprocess.run(["fusermount3", "-u", "-z", os.path.join(self.base, "mnt")])
        try:
            self.fuse.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.fuse.kill()
            self.fuse.wait()
        with open(os.path.join(self.base, "nbdkit.pid")) as f:
            os.kill(int(f.read()), signal.SIGTERM)


@pytest.fixture
def stuck_disk(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse for nbdfuse (the freezable test device)")
    d = StuckDisk(tmp_path / "stuck")
    yield d
    d.close()


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def wait_for(pred, timeout=10, what="condition"):
    deadline = time.time() + timeout * SLOW
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


class Nbdkit:
    """nbdkit on a UNIX socket in dir, its filters and plugin args as given."""

    def __init__(self, d, *args, name="k"):
        self.sock = os.path.join(str(d), name + ".sock")
        self.pidfile = os.path.join(str(d), name + ".pid")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        run("nbdkit", "-U", self.sock, "-P", self.pidfile, *args)
        self.uri = "nbd+unix:///?socket=" + self.sock

    @property
    def pid(self):
        with open(self.pidfile) as f:
            return int(f.read())

    def stop(self, sig=signal.SIGTERM):
        pid = self.pid
        for s in (sig, signal.SIGKILL):	# TERM waits for its clients to go
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                return
            deadline = time.time() + 5
            while os.path.exists("/proc/%d" % pid) and time.time() < deadline:
                time.sleep(0.02)


@pytest.fixture
def kits(tmp_path):
    made = []

    def make(*args, name="k"):
        k = Nbdkit(tmp_path, *args, name=name)
        made.append(k)
        return k
    yield make
    for k in made:
        k.stop()


@contextlib.contextmanager
def qsd_export(img, sock):
    """qemu-storage-daemon serving the raw file img, writable, on the UNIX socket sock."""
    qsd = subprocess.Popen(["qemu-storage-daemon",
                            "--blockdev", "driver=file,node-name=f,filename=" + img,
                            "--nbd-server", "addr.type=unix,addr.path=" + sock,
                            "--export", "type=nbd,id=e,node-name=f,name=,writable=on"],
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock), what="qemu-storage-daemon")
        yield "nbd+unix:///?socket=" + sock
    finally:
        qsd.terminate()
        qsd.wait(30)
