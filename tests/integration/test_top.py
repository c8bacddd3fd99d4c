"""tap-ctl top: per-vbd rates from two stats samples, as a table per sample
for scripts and as a redrawn screen on a terminal; vbds coming and going
between samples, and the server going away."""

import os
import select
import signal
import subprocess
import termios
import time

import pytest

from conftest import BIN, SLOW, wait_for

# the second engine's pass skips these (see pytest.ini)
pytestmark = pytest.mark.engine_independent

COLUMNS = ["MINOR", "R_IOPS", "W_IOPS", "R_MB/s", "W_MB/s", "P99_US", "QD", "THROT/s", "JOB",
           "PARAMS"]


def top_cmd(server, *args):
    return [os.path.join(BIN, "tap-ctl"), "-S", server.state_dir, "top"] + [str(a) for a in args]


def parse(out):
    """The tables of a non-tty run: [{minor: {column: text}}], one per sample."""
    assert "\x1b" not in out
    assert out.endswith("\n\n")
    samples = []
    for block in out.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert lines[0].split() == COLUMNS
        rows = {}
        for line in lines[1:]:
            row = dict(zip(COLUMNS, line.split(None, len(COLUMNS) - 1)))
            rows[int(row["MINOR"])] = row
        samples.append(rows)
    return samples


def writer(server, minor, seconds):
    """fio writing 4k blocks to the vbd for a while."""
    p = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", "--uri=" + server.uri(minor),
                          "--rw=randwrite", "--bs=4k", "--iodepth=4", "--size=8M",
                          "--time_based", "--runtime=%d" % seconds, "--output=/dev/null"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: server.stats(minor)["ops"]["write"]["reqs"] > 0, timeout=20,
             what="fio writing")
    return p


def test_rows_under_load(server):
    server.open("ram:16M")
    busy = server.open("ram:16M")["minor"]
    fio = writer(server, busy, 10)
    t0 = time.monotonic()
    r = subprocess.run(top_cmd(server, "-n", 3, "-d", 0.5), capture_output=True, text=True,
                       timeout=30 * SLOW)
    took = time.monotonic() - t0
    fio.terminate()
    fio.wait()
    assert r.returncode == 0 and r.stderr == "", r.stderr
    samples = parse(r.stdout)
    assert len(samples) == 3 and 1.4 < took < 10 * SLOW
    for rows in samples:
        assert sorted(rows) == [0, busy] and rows[busy]["PARAMS"] == "ram:16M"
        idle, w = rows[0], rows[busy]
        assert float(idle["W_IOPS"]) == 0 and idle["P99_US"] == "-"
        iops, mbps = float(w["W_IOPS"]), float(w["W_MB/s"])
        assert iops > 0 and mbps > 0 and float(w["R_IOPS"]) == 0
        assert abs(mbps - iops * 4096 / 1e6) <= 0.01 + mbps / 100     # 4k writes
        assert int(w["P99_US"]) >= 0 and int(w["QD"]) >= 0    # a ram disk: under 1 us is 0
        assert float(w["THROT/s"]) == 0      # no limits: nothing throttled


def test_throttled_requests_show(server):
    limited = server.open("ram:16M", qos={"iops_total": 50})["minor"]
    fio = writer(server, limited, 10)
    r = server.tapctl("top", "-m", limited, "-n", 2, "-d", 1)
    fio.terminate()
    fio.wait()
    rows = parse(r.stdout)[-1][limited]
    assert 30 <= float(rows["W_IOPS"]) <= 70, rows
    assert float(rows["THROT/s"]) > 20 and int(rows["QD"]) >= 1, rows


def test_minor_filter(server):
    for _ in range(3):
        server.open("ram:1M")
    r = server.tapctl("top", "-m", 1, "-n", 2, "-d", 0.2)
    assert [sorted(rows) for rows in parse(r.stdout)] == [[1], [1]]
    r = server.tapctl("top", "-m", 7, "-n", 1, check=False)
    assert r.returncode == 1 and r.stderr == "tap-ctl: top: minor 7: no open vbd\n"
    for bad in (["-d", "0"], ["-d", "x"], ["-n", "-1"]):
        r = server.tapctl("top", *bad, check=False)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stdout == ""


def first_table(proc):
    """Reads a running top's first table, so that the test acts after it."""
    lines = []
    while not lines or lines[-1] != "\n":
        line = proc.stdout.readline()
        assert line, "top ended early: " + proc.stderr.read()
        lines.append(line)
    return "".join(lines)


def test_vbds_coming_and_going(server):
    server.open("ram:1M")
    server.open("ram:2M")
    top = subprocess.Popen(top_cmd(server, "-n", 4, "-d", 0.5), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    watched = subprocess.Popen(top_cmd(server, "-m", 1, "-n", 4, "-d", 0.5),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    firsts = [first_table(top), first_table(watched)]
    server.call("destroy", minor=1)
    server.open("ram:3M", minor=2)
    out, err = top.communicate(timeout=30 * SLOW)
    assert top.returncode == 0, err
    samples = parse(firsts[0] + out)
    assert len(samples) == 4
    assert sorted(samples[0]) == [0, 1] and sorted(samples[-1]) == [0, 2]
    new = [rows[2] for rows in samples if 2 in rows]
    # first seen: no rates yet; then rates
    assert new[0]["W_IOPS"] == "-" and new[-1]["W_IOPS"] == "0.0"
    out, err = watched.communicate(timeout=30 * SLOW)
    assert watched.returncode == 0, err
    samples = parse(firsts[1] + out)
    assert 1 in samples[0] and samples[-1] == {}


def test_server_going_away_is_one_line_and_exit_1(make_server):
    srv = make_server()
    srv.open("ram:1M")
    top = subprocess.Popen(top_cmd(srv, "-d", 0.2), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)
    srv.kill()
    out, err = top.communicate(timeout=10 * SLOW)
    assert top.returncode == 1
    assert err.startswith("tap-ctl: top: ") and err.count("\n") == 1, err
    assert "tapdiskd" in err
    if out:
        parse(out)      # what came before is whole


def pty_top(server, *args):
    master, slave = os.openpty()
    p = subprocess.Popen(top_cmd(server, *args), stdin=slave, stdout=slave, stderr=slave,
                         close_fds=True)
    return p, master, slave


def read_until(fd, needle, timeout=10):
    data = b""
    deadline = time.monotonic() + timeout * SLOW
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, "no %r on the terminal: %r" % (needle, data)
        if select.select([fd], [], [], left)[0]:
            data += os.read(fd, 65536)
    return data


def drain(fd):
    data = b""
    while select.select([fd], [], [], 0.3)[0]:
        data += os.read(fd, 65536)
    return data


def canonical(fd):
    lflag = termios.tcgetattr(fd)[3]
    return bool(lflag & termios.ICANON), bool(lflag & termios.ECHO)


@pytest.mark.parametrize("stop", ["q", "SIGINT"])
def test_terminal_screen_and_quit(server, stop):
    server.open("ram:1M")
    p, master, slave = pty_top(server, "-d", 0.3)
    try:
        screen = read_until(master, b"ram:1M")
        screen += read_until(master, b"ram:1M")        # a second screen: rates
        assert b"\x1b[?1049h" in screen and b"\x1b[H\x1b[2J" in screen
        assert b"tapdiskd pid %d" % server.proc.pid in screen
        assert b"MINOR" in screen and b"p99: last interval" in screen
        assert canonical(slave) == (False, False)      # keys one by one, not echoed
        if stop == "q":
            os.write(master, b"q")
        else:
            p.send_signal(signal.SIGINT)
        assert p.wait(10 * SLOW) == 0
        rest = drain(master)
        assert rest.endswith(b"\x1b[?25h\x1b[?1049l"), rest   # main screen, cursor back
        assert canonical(slave) == (True, True)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        os.close(slave)


def test_terminal_with_count_leaves_the_last_screen(server):
    server.open("ram:1M")
    p, master, slave = pty_top(server, "-n", 2, "-d", 0.2)
    try:
        assert p.wait(10 * SLOW) == 0
        out = drain(master)
        assert b"\x1b[?1049h" not in out and out.count(b"\x1b[H\x1b[2J") == 3
        assert out.endswith(b"ram:1M\r\n\x1b[?25h"), out
        assert canonical(slave) == (True, True)
    finally:
        os.close(master)
        os.close(slave)
