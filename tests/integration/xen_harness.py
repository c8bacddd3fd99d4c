"""The Xen side of the blkif and hotplug tests, without a hypervisor: a test
xenstored (tests/xen/xenstored.py) that the real libxenstore and
xenstore-utils speak to, a tapdiskd on its simulated grant/event-channel
port (--xen-sim), the toolstack played with xenstore-write/-rm, and
blkfront_sim (tests/xen/blkfront_sim.c) as the guest.
"""

import json
import os
import socket
import struct
import subprocess

import pytest

from conftest import BIN, SLOW, Server, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIM = os.path.join(BIN, "..", "tests", "blkfront_sim")
XENSTORED = os.path.join(ROOT, "tests", "xen", "xenstored.py")
BLOCK_TAP = os.path.join(ROOT, "contrib", "xl-hotplug", "block-tap")
MiB = 1 << 20

MALICIOUS = ["zero-segments", "twelve-segments", "first-after-last", "last-past-page",
             "past-end", "huge-sector", "bad-gref", "bad-gref-read", "alias-refs",
             "unknown-op", "indirect-zero",
             "indirect-too-many", "indirect-bad-op", "indirect-bad-page",
             "discard-secure", "discard-past-end"]


class Xen:
    """A test xenstore, a sim directory, and a tapdiskd serving blkif on them."""

    def __init__(self, tmp_path, extra=(), server_env=None):
        self.tmp = tmp_path
        self.sock = str(tmp_path / "xs.sock")
        self.simdir = str(tmp_path / "sim")
        os.mkdir(self.simdir)
        self.xsd = subprocess.Popen(["/usr/bin/python3", XENSTORED, self.sock],
                                    stdout=subprocess.PIPE, text=True)
        assert self.xsd.stdout.readline().strip() == "ready"
        self.env = dict(os.environ, XENSTORED_PATH=self.sock)
        self.srv = Server(tmp_path / "state", env=dict(self.env, **(server_env or {})),
                          extra=["--xen-sim", self.simdir] + list(extra)).start()
        wait_for(lambda: "Xen backend: watching" in self.srv.log(), what="the Xen backend")

    # the toolstack's view

    def xs(self, tool, *args, check=True):
        r = subprocess.run(["xenstore-" + tool] + [str(a) for a in args], env=self.env,
                           capture_output=True, text=True, timeout=30)
        if check and r.returncode:
            raise AssertionError("xenstore-%s %s: %s" % (tool, args, r.stderr))
        return r.stdout.strip()

    def read(self, path):
        r = subprocess.run(["xenstore-read", path], env=self.env, capture_output=True,
                           text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    def attach(self, minor, domid=1, devid=51712, kind="vbd3", script=None):
        """What xl/xapi write for a new disk; returns the backend path."""
        be = "/local/domain/0/backend/%s/%d/%d" % (kind, domid, devid)
        fe = "/local/domain/%d/device/vbd/%d" % (domid, devid)
        kv = [be + "/physical-device-path", self.srv.nbd_path(minor),
              be + "/params", "ignored", be + "/mode", "w", be + "/online", "1"]
        if script:
            kv += [be + "/script", script]
        kv += [be + "/frontend", fe, be + "/frontend-id", domid]
        self.xs("write", *kv)
        return be

    def libxl_disk(self, params, domid=1, devid=51712, kind="vbd", mode="w"):
        """What libxl writes for a new disk before it runs the hotplug script
        (4.17 for vbd with script=block-tap, as ../shared/xen-lab records;
        4.19's backendtype=tap likewise under vbd3). Returns the backend path."""
        be = "/local/domain/0/backend/%s/%d/%d" % (kind, domid, devid)
        fe = "/local/domain/%d/device/vbd/%d" % (domid, devid)
        kv = {fe + "/backend": be, fe + "/backend-id": 0, fe + "/state": 1,
              fe + "/virtual-device": devid, fe + "/device-type": "disk",
              be + "/params": params, be + "/script": "/etc/xen/scripts/block-tap",
              be + "/online": 1, be + "/removable": 0, be + "/bootable": 1, be + "/state": 1,
              be + "/dev": "xvda", be + "/type": "phy", be + "/mode": mode,
              be + "/device-type": "disk", be + "/discard-enable": 1,
              be + "/specification": "xen", be + "/frontend": fe, be + "/frontend-id": domid}
        self.xs("write", *[x for item in kv.items() for x in item])
        return be

    def hotplug(self, cmd, be, expect_rc=0, **env):
        """Runs contrib/xl-hotplug/block-tap as libxl does; returns its stderr."""
        e = dict(self.env, XENBUS_PATH=be, TAPDISKD_STATE_DIR=self.srv.state_dir,
                 PATH=BIN + ":" + os.environ["PATH"], **env)
        r = subprocess.run([BLOCK_TAP, cmd], env=e, capture_output=True, text=True,
                           timeout=60 * SLOW)
        assert r.returncode == expect_rc, "block-tap %s: rc %d\n%s%s" % (
            cmd, r.returncode, r.stdout, r.stderr)
        return r.stderr

    def detach(self, domid=1, devid=51712, kind="vbd3"):
        """What the toolstack does once the guest is gone."""
        self.xs("rm", "/local/domain/%d/device/vbd/%d" % (domid, devid))
        self.xs("rm", "/local/domain/0/backend/%s/%d/%d" % (kind, domid, devid))

    def release_domain(self, domid):
        """What xenstored does when a domain dies: XS_RELEASE (no
        xenstore-utils tool sends it), so @releaseDomain fires and the domain
        is no longer introduced."""
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(self.sock)
            body = b"%d\0" % domid
            c.sendall(struct.pack("<IIII", 9, 1, 0, len(body)) + body)     # XS_RELEASE
            hdr = c.recv(16)
            assert len(hdr) == 16 and struct.unpack("<IIII", hdr)[0] == 9, hdr

    def guest_maps(self, domid=1):
        """tapdiskd's mappings of domain domid's memory file, seen by the
        kernel (/proc/PID/maps), not by tapdiskd's own counters: the
        simulated port keeps the file mapped while any ring or persistent
        grant of the domain is mapped."""
        name = "/dom%d.mem" % domid
        with open("/proc/%d/maps" % self.srv.proc.pid) as f:
            return sum(1 for ln in f if name in ln)

    def pgrants(self, minor):
        """Persistent grants mapped now, per live ring (a list), from the stats."""
        x = self.srv.stats(minor).get("xenbus")
        return [r["persistent_grants"] for r in x["rings"]] if x else []

    def state(self, be):
        v = self.read(be + "/state")
        return int(v) if v is not None else None

    # the guest's view

    def sim_cmd(self, be, args, domid=1, devid=51712):
        return [SIM, "--dir", self.simdir, "--domid", str(domid), "--devid", str(devid),
                "--backend", be] + [str(a) for a in args]

    def sim_bg(self, be, *args, domid=1, devid=51712):
        """A guest running while the test does something else."""
        return subprocess.Popen(self.sim_cmd(be, args, domid, devid), env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sim(self, be, *args, domid=1, devid=51712, timeout=120, expect_rc=0, raw=False):
        r = subprocess.run(self.sim_cmd(be, args, domid, devid), env=self.env,
                           capture_output=True, text=True, timeout=timeout * SLOW)
        if raw:
            return r
        assert r.returncode == expect_rc, "blkfront_sim %s: rc %d\n%s%s\nserver log:\n%s" % (
            args, r.returncode, r.stdout, r.stderr, self.srv.log()[-4000:])
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])

    def close(self):
        rc = self.srv.stop()
        self.srv.assert_clean_log()
        self.xsd.terminate()
        self.xsd.wait()
        assert rc == 0, "tapdiskd exited with %s:\n%s" % (rc, self.srv.log())


@pytest.fixture
def xen(tmp_path):
    x = Xen(tmp_path)
    yield x
    x.close()


def ram(xen, size="64M"):
    return xen.srv.open("ram:" + size)["minor"]
