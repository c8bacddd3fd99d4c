"""The metrics HTTP endpoint (--metrics-listen): GET /stats is the control
socket's stats document, GET /metrics the same numbers in Prometheus text
format (parsed here by prometheus_client, the reference parser). The
endpoint is read-only and loopback-only unless told otherwise, and no
client of it, however slow or greedy, holds up NBD I/O or the control
socket, or leaves file descriptors behind."""

import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, SLOW, Control, fd_count, run, validate, wait_for

# the second engine's pass skips these (see pytest.ini); the vbds are ram disks
pytestmark = pytest.mark.engine_independent

OPS = ["read", "write", "flush", "discard", "write_zeroes", "block_status", "cache"]
METRICS_TIMEOUT = 3         # --metrics-timeout here (default 10): idle timeout and deadline
MAX_CONNS = 32              # the server's cap on metrics connections
CACHE = 1.0                 # a rendering serves every client for this long (s)


@pytest.fixture
def msrv(make_server):
    """A server with the endpoint on a kernel-chosen loopback port."""
    return make_server(extra=["--metrics-listen", "127.0.0.1:0",
                              "--metrics-timeout", str(METRICS_TIMEOUT)])


def address(srv):
    addr = srv.call("version")["result"]["metrics"]
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def request(srv, path, method="GET", headers=None, body=None):
    """(status, headers, body) of one request on a fresh connection."""
    host, port = address(srv)
    c = http.client.HTTPConnection(host, port, timeout=30 * SLOW)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def get(srv, path):
    status, headers, body = request(srv, path)
    assert status == 200, (path, status, body)
    return headers, body


def scrape(srv):
    """{family name: Metric} of one GET /metrics."""
    headers, body = get(srv, "/metrics")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {m.name: m for m in text_string_to_metric_families(body.decode())}


def series(families, name, **labels):
    """{(minor, op): value} of a family's samples named name (ops absent: op None)."""
    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
    fam = families.get(base) or families[name]
    out = {}
    for s in fam.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            out[(s.labels["minor"], s.labels.get("op"))] = s.value
    return out


def qemu_io(srv, minor, *cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    run("qemu-io", "-f", "raw", *args, srv.uri(minor))


def open_ram(srv, n, size="16M"):
    return [srv.open("ram:%s" % size)["minor"] for _ in range(n)]


# ---- /stats ----

def test_stats_is_the_control_sockets_document(msrv):
    open_ram(msrv, 2)
    msrv.open("ram:named-disk:8M")
    qemu_io(msrv, 0, "write -P 7 0 1M", "read -P 7 0 1M")
    headers, body = get(msrv, "/stats")
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    validate(doc, "stats.result.json")
    ctl = msrv.call("stats")["result"]
    # the server is idle: nothing moved between the two
    assert doc == ctl
    assert [v["minor"] for v in doc["vbds"]] == [0, 1, 2]
    assert [v["name"] for v in doc["vbds"]] == ["ram:16M", "ram:16M", "ram:named-disk:8M"]
    # query strings are ignored
    assert json.loads(get(msrv, "/stats?minor=1&x")[1]) == doc


def test_renderings_are_shared_for_a_second(msrv):
    t0 = time.time()
    first = get(msrv, "/stats")[1]
    msrv.open("ram:8M")
    second = get(msrv, "/stats")[1]
    if time.time() - t0 < CACHE * 0.8:
        assert second == first
    wait_for(lambda: len(json.loads(get(msrv, "/stats")[1])["vbds"]) == 1,
             timeout=CACHE + 5, what="the new vbd in /stats")


def test_stats_with_no_vbds(msrv):
    doc = json.loads(get(msrv, "/stats")[1])
    validate(doc, "stats.result.json")
    assert doc == {"vbds": []}


# ---- /metrics ----

def test_qos_counters_reach_metrics(msrv):
    """A throttled vbd's waits show up as tapdiskd_qos_* series, as in /stats."""
    m = msrv.open("ram:16M", qos={"iops_total": 100})["minor"]
    qemu_io(msrv, m, *["write -P 1 %dk 4k" % (4 * i) for i in range(30)])
    st = msrv.stats(m)["qos"]
    assert st["throttled"] >= 10 and st["queued_us_total"] > 0
    time.sleep(1.1)                       # past the shared once-a-second rendering
    fams = scrape(msrv)
    assert series(fams, "tapdiskd_qos_throttled_total")[(str(m), None)] == st["throttled"]
    assert series(fams, "tapdiskd_qos_queued_us_total")[(str(m), None)] == \
        st["queued_us_total"]
    assert series(fams, "tapdiskd_qos_queue_depth")[(str(m), None)] == 0


def test_metrics_families_and_series(msrv):
    minors = open_ram(msrv, 2)
    fams = scrape(msrv)
    types = {name: m.type for name, m in fams.items()}
    assert types == {
        "tapdiskd_requests": "counter", "tapdiskd_bytes": "counter",
        "tapdiskd_errors": "counter", "tapdiskd_inflight": "gauge",
        "tapdiskd_latency_seconds": "histogram",
        "tapdiskd_reqs_outstanding": "gauge", "tapdiskd_reqs_queued": "gauge",
        "tapdiskd_retries": "counter", "tapdiskd_timeouts": "counter",
        "tapdiskd_qos_throttled": "counter", "tapdiskd_qos_queued_us": "counter",
        "tapdiskd_qos_queued_us_max": "gauge", "tapdiskd_qos_queue_depth": "gauge",
    }
    for name in ("tapdiskd_requests_total", "tapdiskd_bytes_total",
                 "tapdiskd_errors_total", "tapdiskd_inflight",
                 "tapdiskd_latency_seconds_count"):
        got = series(fams, name)
        assert set(got) == {(str(m), op) for m in minors for op in OPS}, name
        assert all(v == 0 for v in got.values()), name
    for name in ("tapdiskd_reqs_outstanding", "tapdiskd_reqs_queued",
                 "tapdiskd_retries_total", "tapdiskd_timeouts_total"):
        assert series(fams, name) == {(str(m), None): 0 for m in minors}
    for s in fams["tapdiskd_requests"].samples:
        assert set(s.labels) == {"minor", "params", "op"}
        assert s.labels["params"] == "ram:16M"
    # one HELP and one TYPE per family
    text = get(msrv, "/metrics")[1].decode()
    for name in ("tapdiskd_requests_total", "tapdiskd_latency_seconds"):
        assert text.count("# TYPE %s " % name) == 1
        assert text.count("# HELP %s " % name) == 1


def check_histogram(fams, minor, op, stats):
    """Cumulative buckets ending in +Inf = _count = the control socket's count."""
    buckets = [(s.labels["le"], s.value) for s in fams["tapdiskd_latency_seconds"].samples
               if s.name == "tapdiskd_latency_seconds_bucket"
               and s.labels["minor"] == str(minor) and s.labels["op"] == op]
    assert buckets[-1][0] == "+Inf"
    les = [float(le) for le, _ in buckets]
    assert les == sorted(les) and len(set(les)) == len(les)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are not cumulative: %s" % buckets
    lat = stats["ops"][op]["latency_us"]
    count = series(fams, "tapdiskd_latency_seconds_count", op=op)[(str(minor), op)]
    total = series(fams, "tapdiskd_latency_seconds_sum", op=op)[(str(minor), op)]
    assert counts[-1] == count == lat["count"] == stats["ops"][op]["reqs"]
    assert abs(total - lat["sum"] / 1e6) < 1e-9
    # each finite bucket counts the control socket's buckets below its bound
    for le, cum in buckets[:-1]:
        bound_us = round(float(le) * 1e6)
        assert cum == sum(b["count"] for b in lat["buckets"]
                          if b["le_us"] != "+Inf" and b["le_us"] < bound_us)


def test_counters_follow_real_io(msrv):
    open_ram(msrv, 2)
    before = scrape(msrv)
    qemu_io(msrv, 0, *["write -P 9 %dk 64k" % (64 * i) for i in range(16)],
            "read -P 9 0 1M", "flush", "discard 2M 1M")
    stats = msrv.stats(0)
    # a scrape within a second of the last one gets the same rendering
    wait_for(lambda: series(scrape(msrv), "tapdiskd_requests_total")[("0", "write")]
             == stats["ops"]["write"]["reqs"], timeout=CACHE + 5, what="a fresh rendering")
    after = scrape(msrv)
    reqs = series(after, "tapdiskd_requests_total")
    nbytes = series(after, "tapdiskd_bytes_total")
    for op in OPS:
        assert reqs[("0", op)] == stats["ops"][op]["reqs"], op
        assert nbytes[("0", op)] == stats["ops"][op]["bytes"], op
        check_histogram(after, 0, op, stats)
    assert reqs[("0", "write")] >= 16 and reqs[("0", "read")] >= 1
    assert reqs[("0", "flush")] >= 1 and reqs[("0", "discard")] >= 1
    assert nbytes[("0", "write")] == 1 << 20 and nbytes[("0", "read")] == 1 << 20
    assert series(after, "tapdiskd_errors_total")[("0", "write")] == 0
    # the other vbd did not move
    assert all(v == 0 for (m, _), v in reqs.items() if m == "1")
    assert series(before, "tapdiskd_requests_total")[("0", "write")] == 0


def test_label_values_are_escaped(msrv):
    weird = 'ram:a "quoted" \\back\\slash\nnewline:8M'
    minor = msrv.open(weird)["minor"]
    text = get(msrv, "/metrics")[1].decode()
    assert 'params="ram:a \\"quoted\\" \\\\back\\\\slash\\nnewline:8M"' in text
    fams = scrape(msrv)
    params = {s.labels["params"] for s in fams["tapdiskd_reqs_queued"].samples
              if s.labels["minor"] == str(minor)}
    assert params == {weird}


# ---- HTTP ----

def test_methods_paths_and_limits(msrv):
    open_ram(msrv, 1)
    for path in ("/", "/nope", "/metrics/x", "/stats/", "/STATS"):
        assert request(msrv, path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in ("/metrics", "/stats", "/nope"):
            status, headers, _ = request(msrv, path, method=method)
            assert status == 405 and headers["Allow"] == "GET, HEAD", (method, path)
    status, headers, body = request(msrv, "/metrics", method="HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert request(msrv, "/metrics?name[]=x")[0] == 200
    # no request bodies, no huge headers
    assert request(msrv, "/stats", method="POST", body=b"x" * 100)[0] in (405, 413)
    try:
        status = request(msrv, "/stats", headers={"X-Big": "y" * 9000})[0]
        assert 400 <= status < 500
    except (ConnectionError, http.client.RemoteDisconnected):
        pass
    assert msrv.call("version")["ok"]
    get(msrv, "/metrics")


def test_keepalive_connection_serves_many(msrv):
    host, port = address(msrv)
    c = http.client.HTTPConnection(host, port, timeout=10 * SLOW)
    for path in ("/metrics", "/stats", "/nope", "/metrics") * 5:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        assert r.status == (404 if path == "/nope" else 200)
    c.close()


# ---- addresses ----

def start_fails(tmp_path, *args):
    r = subprocess.run([os.path.join(BIN, "tapdiskd"), "--state-dir", str(tmp_path / "x"),
                        "--foreground"] + list(args), capture_output=True, text=True,
                       timeout=30 * SLOW)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("spec", ["0.0.0.0:0", "[::]:0", "10.1.2.3:9100", "192.168.0.1:0"])
def test_non_loopback_refused_without_the_flag(tmp_path, spec):
    msg = start_fails(tmp_path, "--metrics-listen", spec)
    assert "--metrics-listen %s: not a loopback address" % spec in msg
    assert "--metrics-allow-remote" in msg


@pytest.mark.parametrize("spec", ["127.0.0.1", "host.example:80", "::1:80", "127.0.0.1:x",
                                  "127.0.0.1:65536", ":80", "localhost"])
def test_bad_listen_specs_refused(tmp_path, spec):
    msg = start_fails(tmp_path, "--metrics-listen", spec, "--metrics-allow-remote")
    assert "--metrics-listen %s: want HOST:PORT" % spec in msg


def test_port_in_use_is_an_error(make_server, tmp_path):
    first = make_server("a", extra=["--metrics-listen", "127.0.0.1:0"])
    taken = first.call("version")["result"]["metrics"]
    msg = start_fails(tmp_path, "--metrics-listen", taken)
    assert taken in msg and "Address already in use" in msg


def listening_tcp(pid):
    """The local addresses of the process's listening TCP sockets."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with open("/proc/%d/net/%s" % (pid, table)) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    found.append(cols[1])
    return found


def test_off_by_default_and_loopback_only(make_server):
    plain = make_server("plain")
    assert "metrics" not in plain.call("version")["result"]
    assert listening_tcp(plain.proc.pid) == []
    srv = make_server("m", extra=["--metrics-listen", "localhost:0"])
    addr = srv.call("version")["result"]["metrics"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", addr) and not addr.endswith(":0")
    assert "metrics: listening on %s" % addr in srv.log()
    port = int(addr.rsplit(":", 1)[1])
    assert listening_tcp(srv.proc.pid) == ["0100007F:%04X" % port]
    get(srv, "/metrics")


def test_ipv6_loopback(make_server):
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    srv = make_server(extra=["--metrics-listen", "[::1]:0"])
    assert re.fullmatch(r"\[::1\]:\d+", srv.call("version")["result"]["metrics"])
    get(srv, "/stats")


def test_allow_remote(make_server):
    srv = make_server(extra=["--metrics-listen", "0.0.0.0:0", "--metrics-allow-remote"])
    addr = srv.call("version")["result"]["metrics"]
    assert re.fullmatch(r"0\.0\.0\.0:\d+", addr)
    c = http.client.HTTPConnection("127.0.0.1", int(addr.rsplit(":", 1)[1]), timeout=10)
    c.request("GET", "/stats")
    assert c.getresponse().status == 200
    c.close()


# ---- hostile clients ----

def assert_responsive(srv, minor=0, limit=3.0):
    """NBD I/O, a control request and a scrape each finish quickly."""
    t0 = time.time()
    qemu_io(srv, minor, "write -P 5 0 256k", "read -P 5 0 256k")
    t1 = time.time()
    c = Control(srv.ctl_path)
    c.call("stats", minor=minor)
    c.close()
    t2 = time.time()
    assert t1 - t0 < limit * SLOW, "NBD I/O took %.1f s" % (t1 - t0)
    assert t2 - t1 < limit * SLOW, "a control request took %.1f s" % (t2 - t1)


class Slowloris(threading.Thread):
    """Sends a request header one byte per `interval`; notes when the server hangs up."""

    def __init__(self, host, port, interval=0.5):
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port))
        self.interval = interval
        self.closed_after = None
        self.stop = threading.Event()

    def run(self):
        t0 = time.time()
        data = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"s" * 10000
        for b in data:
            if self.stop.wait(self.interval):
                break
            try:
                self.sock.send(bytes([b]))
            except OSError:
                self.closed_after = time.time() - t0
                break
        self.sock.close()


def test_slowloris_stalls_nothing_and_is_dropped(msrv):
    open_ram(msrv, 1)
    base = fd_count(msrv.proc.pid)
    host, port = address(msrv)
    slow = [Slowloris(host, port) for _ in range(4)]
    for s in slow:
        s.start()
    deadline = time.time() + 6
    while time.time() < deadline:
        assert_responsive(msrv)
        get(msrv, "/metrics")
    # the per-request deadline (not the idle timeout, which a trickle resets) drops them
    for s in slow:
        s.join(timeout=(METRICS_TIMEOUT + 10) * SLOW)
        assert s.closed_after is not None, "the server kept a slowloris client"
        assert s.closed_after < METRICS_TIMEOUT + 5 * SLOW
    wait_for(lambda: fd_count(msrv.proc.pid) == base, what="fds back to baseline")


def test_client_that_never_reads_stalls_nothing(msrv):
    open_ram(msrv, 48, size="1M")       # a /metrics of a few hundred KiB
    base = fd_count(msrv.proc.pid)
    assert len(get(msrv, "/metrics")[1]) > 256 << 10
    host, port = address(msrv)
    lazy = []
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
        lazy.append(s)
    t0 = time.time()
    while time.time() - t0 < 4:
        assert_responsive(msrv)
        get(msrv, "/stats")
    # the write timeout or the deadline frees them; fds go back
    wait_for(lambda: fd_count(msrv.proc.pid) == base, timeout=METRICS_TIMEOUT + 10,
             what="the lazy readers dropped")
    for s in lazy:
        s.close()
    assert_responsive(msrv)


def socket_count(pid):
    """The server's sockets: a file a sanitizer opens now and then is no connection."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return n


def test_200_concurrent_clients(msrv):
    open_ram(msrv, 2)
    base = socket_count(msrv.proc.pid)
    host, port = address(msrv)
    results, peak = [], [0]
    start = threading.Barrier(201)

    def client():
        start.wait()
        s = socket.create_connection((host, port), timeout=60 * SLOW)
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        results.append(data)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(200)]
    for t in threads:
        t.start()
    start.wait()
    while any(t.is_alive() for t in threads):
        peak[0] = max(peak[0], socket_count(msrv.proc.pid) - base)
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert len(results) == 200
    for data in results:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert len(json.loads(body)["vbds"]) == 2
    assert peak[0] <= MAX_CONNS, "the server held %d metrics connections" % peak[0]
    wait_for(lambda: socket_count(msrv.proc.pid) == base, what="fds back to baseline")
    assert_responsive(msrv)


def test_connection_cap_and_recovery(msrv):
    open_ram(msrv, 1)
    base = fd_count(msrv.proc.pid)
    host, port = address(msrv)
    idle = [socket.create_connection((host, port)) for _ in range(3 * MAX_CONNS)]
    time.sleep(0.5)
    held = fd_count(msrv.proc.pid) - base
    assert 0 < held <= MAX_CONNS, held
    assert_responsive(msrv)
    for s in idle:
        s.close()
    wait_for(lambda: fd_count(msrv.proc.pid) == base, what="fds back to baseline")
    t0 = time.time()
    get(msrv, "/metrics")
    assert time.time() - t0 < 2 * SLOW
    # again: nothing of the first round is left counted
    idle = [socket.create_connection((host, port)) for _ in range(3 * MAX_CONNS)]
    for s in idle:
        s.close()
    wait_for(lambda: fd_count(msrv.proc.pid) == base, what="fds back to baseline")
    get(msrv, "/stats")


def test_shutdown_with_clients_connected(make_server):
    srv = make_server(extra=["--metrics-listen", "127.0.0.1:0"])
    open_ram(srv, 1)
    host, port = address(srv)
    idle = socket.create_connection((host, port))
    half = socket.create_connection((host, port))
    half.sendall(b"GET /met")
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect((host, port))
    lazy.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    assert srv.stop() == 0
    srv.assert_clean_log()
    for s in (idle, half, lazy):
        s.close()
