"""make run's demo script, and tap-ctl's table on a real terminal."""

import os
import signal
import subprocess
import time

from conftest import BIN, ROOT, Control, make_image, run, wait_for


def test_make_run_demo_serves_and_stops_on_ctrl_c(tmp_path):
    rundir = tmp_path / "run"
    env = dict(os.environ, RUN_DIR=str(rundir), TAPDISKD_BIN_DIR=BIN)
    p = subprocess.Popen([os.path.join(ROOT, "scripts", "run-demo")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 20
    uri = None
    while time.time() < deadline and uri is None:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "NBD URI " in line:
            uri = line.split("NBD URI ", 1)[1].strip()
    assert uri, "".join(lines)
    text = "".join(lines)
    assert "tap-ctl -S %s list" % rundir in text
    vhd = str(rundir / "demo.vhd")
    assert run(os.path.join(BIN, "vhd-util"), "query", "-n", vhd, "-v").stdout == "1024\n"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k", "-c", "read -P 0x44 0 64k", uri)
    out = run(os.path.join(BIN, "tap-ctl"), "-S", rundir, "list").stdout
    assert "minor=0 state=0 args=vhd:%s" % vhd in out
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 0
    rest = p.stdout.read()
    assert "SIGINT: shutting down" in rest and "stopped" in rest
    assert not os.path.exists(rundir / "ctl.sock")
    assert not [f for f in os.listdir(rundir) if f.startswith("nbd")]
    assert run(os.path.join(BIN, "vhd-util"), "check", "-n", vhd).returncode == 0
    raw = rundir / "demo.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, raw)
    with open(raw, "rb") as f:
        assert f.read(65536) == b"\x44" * 65536


def test_list_is_a_table_on_a_tty(server, tmp_path):
    img = make_image(tmp_path / "t.img", 1 << 20)
    server.open("aio:" + img)
    server.open("ram:1M")
    server.call("pause", minor=1)
    cmd = "%s -S %s list" % (os.path.join(BIN, "tap-ctl"), server.state_dir)
    out = run("script", "-qec", cmd, "/dev/null").stdout.replace("\r", "")
    rows = [l.split() for l in out.splitlines() if l.strip()]
    assert rows[0] == ["pid", "minor", "state", "type", "file"]
    assert rows[1] == [str(server.proc.pid), "0", "0", "aio", img]
    assert rows[2] == [str(server.proc.pid), "1", "0x20", "ram", "1M"]
