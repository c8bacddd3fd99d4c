"""NBD over TLS (server/nbd_tls.c, NBD_OPT_STARTTLS): tapdiskd serving
with PSK (--tls-psk) and x509 (--tls-creds, certificates made by certtool
here) to clients nobody here wrote (nbdinfo, qemu-img/qemu-io, libnbd),
the refusals (plaintext under --tls require, a wrong key, an unknown
user, a client certificate from another CA, a non-loopback listener
without TLS), connections handed from the shared listener to other loops
with their session, the nbd: driver over TLS (to a second tapdiskd and to
nbdkit --tls=require; a mirror to a TLS destination), and a subset of test_nbd_hostile.py's hostile
clients run again inside a TLS session (TLSRaw: STARTTLS right after the
client flags, then Python's ssl with an x509 client certificate)."""

import os
import select
import socket
import ssl
import struct
import subprocess
import time

import nbd
import pytest

import test_mirror as mirror
import test_nbd_hostile as hostile
from conftest import BIN, SLOW, make_image, run, wait_for
from nbdraw import (
    CMD_DISC, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, NBDRaw,
    build_go_payload, build_name, build_request,
)

pytestmark = pytest.mark.engine_independent

MiB = 1 << 20
REP_ERR_TLS_REQD = (1 << 31) | 5
PSK_KEY = "8c2c7d0b1b3e4a5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b"
OTHER_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_psk(path, user="alice", key=PSK_KEY):
    with open(path, "w") as f:
        f.write("%s:%s\n" % (user, key))
    os.chmod(path, 0o600)
    return str(path)


# ---------------------------------------------------------------------------
# certificates (certtool, at test time)
# ---------------------------------------------------------------------------

def _certtool(d, *args):
    run("certtool", *args, cwd=str(d))


def _key(d, name):
    _certtool(d, "--generate-privkey", "--key-type=ecdsa", "--outfile", name)


def _template(d, name, text):
    with open(os.path.join(str(d), name), "w") as f:
        f.write(text)


def make_ca(d, cn):
    os.makedirs(str(d), exist_ok=True)
    _key(d, "ca-key.pem")
    _template(d, "ca.info", 'cn = "%s"\nca\ncert_signing_key\nexpiration_days = 2\n' % cn)
    _certtool(d, "--generate-self-signed", "--load-privkey", "ca-key.pem",
              "--template", "ca.info", "--outfile", "ca-cert.pem")


def make_cert(ca, d, role):
    """role: server (DIR/server-*.pem) or client (DIR/client-*.pem), signed by ca."""
    os.makedirs(str(d), exist_ok=True)
    key = os.path.join(str(d), role + "-key.pem")
    cert = os.path.join(str(d), role + "-cert.pem")
    _key(d, key)
    usage = ("tls_www_server\ndns_name = \"localhost\"\nip_address = \"127.0.0.1\"\n"
             if role == "server" else "tls_www_client\n")
    _template(d, role + ".info", 'cn = "%s"\n%ssigning_key\nencryption_key\n'
              'expiration_days = 2\n' % (role, usage))
    _certtool(d, "--generate-certificate", "--load-privkey", key,
              "--load-ca-certificate", os.path.join(str(ca), "ca-cert.pem"),
              "--load-ca-privkey", os.path.join(str(ca), "ca-key.pem"),
              "--template", os.path.join(str(d), role + ".info"), "--outfile", cert)
    run("cp", os.path.join(str(ca), "ca-cert.pem"), os.path.join(str(d), "ca-cert.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA; the server's creds; a client signed by the CA; a client
    signed by another CA (rogue); a client with only the CA (no cert)."""
    top = tmp_path_factory.mktemp("pki")
    make_ca(top / "ca", "tapdiskd test CA")
    make_ca(top / "otherca", "someone else's CA")
    make_cert(top / "ca", top / "server", "server")
    make_cert(top / "ca", top / "client", "client")
    make_cert(top / "otherca", top / "rogue", "client")
    # the rogue client trusts our CA for the server's certificate
    run("cp", str(top / "ca" / "ca-cert.pem"), str(top / "rogue" / "ca-cert.pem"))
    os.makedirs(str(top / "anon"))
    run("cp", str(top / "ca" / "ca-cert.pem"), str(top / "anon" / "ca-cert.pem"))
    return {k: str(top / k) for k in ("ca", "server", "client", "rogue", "anon")}


# ---------------------------------------------------------------------------
# servers and clients
# ---------------------------------------------------------------------------

def tls_server(make_server, tmp_path, tls_args, name="state", image_mib=64, loops=None,
               extra=()):
    """A tapdiskd with a TCP listener on loopback and the given TLS options,
    serving minor 0 (a raw image with 0x5a in its first MiB)."""
    port = free_port()
    img = make_image(tmp_path / (name + ".img"), image_mib * MiB, pattern=0x5a)
    kw = {"loops": str(loops)} if loops else {}
    srv = make_server(name=name, extra=["--nbd-listen", "tcp:127.0.0.1:%d" % port] +
                      list(tls_args) + list(extra), **kw)
    assert srv.open("aio:" + img)["minor"] == 0
    srv.port = port
    srv.img = img
    return srv


def psk_uri(srv, psk, minor=0, user="alice"):
    return "nbds://%s@127.0.0.1:%d/%d?tls-psk-file=%s" % (user, srv.port, minor, psk)


def libnbd_psk(srv, psk, minor=0, user="alice"):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(psk)
    h.set_tls_username(user)
    h.set_export_name(str(minor))
    h.connect_tcp("127.0.0.1", str(srv.port))
    return h


def libnbd_x509(srv, certdir, minor=0):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certdir)
    h.set_export_name(str(minor))
    h.connect_tcp("127.0.0.1", str(srv.port))
    return h


def qemu_io(srv, obj, cmd, minor=0, check=True):
    return run("qemu-io", "--object", obj, "--image-opts",
               "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,"
               "export=%d,tls-creds=tls0" % (srv.port, minor),
               "-c", cmd, check=check)


def nbdinfo(uri, check=True):
    return run("nbdinfo", uri, check=check, timeout=30)


def still_serves(srv, psk=None, certdir=None):
    """A good client still gets the right data."""
    h = libnbd_psk(srv, psk) if psk else libnbd_x509(srv, certdir)
    try:
        assert h.get_tls_negotiated()
        assert h.pread(4096, 0) == b"\x5a" * 4096
    finally:
        h.shutdown()


# ---------------------------------------------------------------------------
# PSK
# ---------------------------------------------------------------------------

def test_psk_nbdinfo_qemu_libnbd(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk])

    r = nbdinfo(psk_uri(srv, psk))
    assert "with TLS" in r.stdout and "export-size: %d" % (64 * MiB) in r.stdout, r.stdout

    # libnbd writes, with structured replies and base:allocation under TLS
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(psk)
    h.set_tls_username("alice")
    h.set_export_name("0")
    h.connect_tcp("127.0.0.1", str(srv.port))
    try:
        assert h.get_tls_negotiated() and h.get_structured_replies_negotiated()
        data = os.urandom(3 * MiB + 12345)   # many records, replies split by the socket
        h.pwrite(data, 8 * MiB)
        h.flush()
        assert h.pread(len(data), 8 * MiB) == data
        seen = []
        h.block_status(4 * MiB, 0, lambda ctx, off, ents, err: seen.append(ctx) or 0)
        assert seen == [nbd.CONTEXT_BASE_ALLOCATION]
    finally:
        h.shutdown()
    with open(srv.img, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(len(data)) == data

    # qemu reads the same bytes through its own TLS (keys.psk in its creds dir)
    obj = "tls-creds-psk,id=tls0,dir=%s,endpoint=client,username=alice" % tmp_path
    r = qemu_io(srv, obj, "read -P 0x5a 0 1M")
    assert "read 1048576/1048576" in r.stdout, r.stdout
    r = run("qemu-img", "info", "--object", obj, "--image-opts",
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,export=0,"
            "tls-creds=tls0" % srv.port)
    assert "64 MiB" in r.stdout, r.stdout


def test_plaintext_refused_under_require(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk, "--tls", "require"])

    # a raw client: every option but STARTTLS gets ERR_TLS_REQD, and stays connected
    c = NBDRaw(addr=("127.0.0.1", srv.port), timeout=10 * SLOW)
    c.start()
    for opt, data in ((OPT_GO, build_go_payload("0")), (OPT_INFO, build_go_payload("0")),
                      (OPT_LIST, b""), (OPT_STRUCTURED_REPLY, b""), (99, b"xyz")):
        assert c.option_final(opt, data) == REP_ERR_TLS_REQD, opt
    # STARTTLS with a payload is malformed
    assert c.option_final(OPT_STARTTLS, b"x") == REP_ERR_INVALID
    # EXPORT_NAME has no error reply: the server hangs up
    c.send_option(OPT_EXPORT_NAME, build_name("0"))
    assert c.expect_closed(5 * SLOW) == b""
    c.close()

    # ABORT grants nothing: acknowledged
    c = NBDRaw(addr=("127.0.0.1", srv.port), timeout=10 * SLOW)
    c.start()
    assert c.option_final(OPT_ABORT) == REP_ACK
    c.close()

    r = nbdinfo("nbd://127.0.0.1:%d/0" % srv.port, check=False)
    assert r.returncode != 0
    r = run("qemu-img", "info", "nbd://127.0.0.1:%d/0" % srv.port, check=False)
    assert r.returncode != 0 and "TLS negotiation required" in r.stderr, r.stderr
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name("0")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(srv.port))
    del h
    still_serves(srv, psk=psk)


def test_wrong_key_and_unknown_user_refused(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk])
    wrong = write_psk(tmp_path / "wrong.psk", key=OTHER_KEY)
    stranger = write_psk(tmp_path / "stranger.psk", user="mallory")

    for uri in (psk_uri(srv, wrong), psk_uri(srv, stranger, user="mallory")):
        r = nbdinfo(uri, check=False)
        assert r.returncode != 0, r.stdout
    for f, user in ((wrong, "alice"), (stranger, "mallory")):
        with pytest.raises(nbd.Error):
            libnbd_psk(srv, f, user=user)
    obj = "tls-creds-psk,id=tls0,dir=%s,endpoint=client,username=alice"
    d = tmp_path / "qwrong"
    os.makedirs(str(d))
    write_psk(d / "keys.psk", key=OTHER_KEY)
    r = qemu_io(srv, obj % d, "read 0 4k", check=False)
    assert r.returncode != 0 or "read 4096" not in r.stdout
    wait_for(lambda: "unknown PSK username" in srv.log(), what="the unknown user logged")
    assert "TLS: handshake" in srv.log()
    still_serves(srv, psk=psk)
    wait_for(lambda: srv.call("version")["result"]["nbd_connections"] == 0,
             what="every refused connection gone")


def test_psk_file_errors_are_one_line(tmp_path):
    cases = {
        "nocolon": "alice" + PSK_KEY + "\n",
        "oddhex": "alice:abc\n",
        "nothex": "alice:zz11\n",
        "twice": "alice:%s\nalice:%s\n" % (PSK_KEY, PSK_KEY),
        "empty": "# nothing\n\n",
    }
    for name, text in cases.items():
        p = tmp_path / (name + ".psk")
        p.write_text(text)
        st = tmp_path / ("st-" + name)
        r = subprocess.run([os.path.join(BIN, "tapdiskd"), "--state-dir", str(st), "--foreground",
                            "--no-xen", "--tls-psk", str(p)],
                           capture_output=True, text=True, timeout=30 * SLOW)
        assert r.returncode != 0, name
        lines = [ln for ln in r.stderr.splitlines() if "--tls-psk" in ln]
        assert len(lines) == 1 and str(p) in lines[0], (name, r.stderr)
        if name != "empty":
            assert "line " in lines[0], (name, lines[0])


# ---------------------------------------------------------------------------
# x509
# ---------------------------------------------------------------------------

def test_x509_clients(make_server, tmp_path, pki):
    srv = tls_server(make_server, tmp_path, ["--tls-creds", pki["server"]])
    uri = "nbds://127.0.0.1:%d/0?tls-certificates=%s"

    # with and without a client certificate (verified when sent)
    for d in (pki["client"], pki["anon"]):
        r = nbdinfo(uri % (srv.port, d))
        assert "with TLS" in r.stdout, r.stdout
        still_serves(srv, certdir=d)
    h = libnbd_x509(srv, pki["client"])
    data = os.urandom(2 * MiB)
    h.pwrite(data, 20 * MiB)
    assert h.pread(len(data), 20 * MiB) == data
    h.shutdown()
    obj = "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % pki["client"]
    r = qemu_io(srv, obj, "read -P 0x5a 0 1M")
    assert "read 1048576/1048576" in r.stdout, r.stdout

    # a certificate another CA signed is refused
    r = nbdinfo(uri % (srv.port, pki["rogue"]), check=False)
    assert r.returncode != 0, r.stdout
    with pytest.raises(nbd.Error):
        libnbd_x509(srv, pki["rogue"])
    r = qemu_io(srv, "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % pki["rogue"],
                "read 0 4k", check=False)
    assert r.returncode != 0 or "read 4096" not in r.stdout
    wait_for(lambda: "client certificate" in srv.log(), what="the refusal logged")
    still_serves(srv, certdir=pki["client"])


def test_x509_verify_peer_requires_a_certificate(make_server, tmp_path, pki):
    srv = tls_server(make_server, tmp_path, ["--tls-creds", pki["server"], "--tls-verify-peer"])
    uri = "nbds://127.0.0.1:%d/0?tls-certificates=%s"
    assert nbdinfo(uri % (srv.port, pki["anon"]), check=False).returncode != 0
    assert nbdinfo(uri % (srv.port, pki["rogue"]), check=False).returncode != 0
    r = nbdinfo(uri % (srv.port, pki["client"]))
    assert "with TLS" in r.stdout
    still_serves(srv, certdir=pki["client"])


def test_bad_credentials_refused_at_start(make_server, tmp_path, pki):
    empty = tmp_path / "empty"
    os.makedirs(str(empty))
    for i, (args, want) in enumerate((
            (["--tls-creds", str(empty)], "server-cert.pem"),
            (["--tls-creds", pki["anon"]], "server-cert.pem"),
            (["--tls", "require"], "needs --tls-creds"),
            (["--tls-psk", str(tmp_path / "missing.psk")], "missing.psk"),
            (["--tls-creds", pki["server"], "--tls-psk", write_psk(tmp_path / "k.psk")],
             "exactly one"))):
        srv = make_server(name="bad%d" % i, start=False, extra=args)
        with pytest.raises(RuntimeError) as e:
            srv.start()
        assert want in str(e.value), str(e.value)


# ---------------------------------------------------------------------------
# listener policy
# ---------------------------------------------------------------------------

def test_non_loopback_listener_needs_tls(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    port = free_port()
    spec = "tcp:0.0.0.0:%d" % port
    for i, args in enumerate((["--nbd-listen", spec],
                              ["--nbd-listen", spec, "--tls-psk", psk, "--tls", "on"])):
        srv = make_server(name="refused%d" % i, start=False, extra=args)
        with pytest.raises(RuntimeError) as e:
            srv.start()
        lines = [ln for ln in str(e.value).splitlines() if "not a loopback address" in ln]
        assert len(lines) == 1 and "--nbd-allow-insecure" in lines[0], str(e.value)
    # TLS required (the default with credentials), or insecure on purpose: it starts
    srv = make_server(name="tls", extra=["--nbd-listen", spec, "--tls-psk", psk])
    srv.stop()
    srv = make_server(name="insecure", extra=["--nbd-listen", spec, "--nbd-allow-insecure"])
    srv.stop()


def test_tls_on_serves_both(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk, "--tls", "on"])
    r = nbdinfo("nbd://127.0.0.1:%d/0" % srv.port)
    assert "without TLS" in r.stdout
    r = nbdinfo(psk_uri(srv, psk))
    assert "with TLS" in r.stdout
    h = libnbd_psk(srv, psk)
    assert h.get_tls_negotiated()
    h.shutdown()


def test_tls_off_refuses_starttls(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk, "--tls", "off"])
    r = nbdinfo(psk_uri(srv, psk), check=False)
    assert r.returncode != 0
    assert "without TLS" in nbdinfo("nbd://127.0.0.1:%d/0" % srv.port).stdout


# ---------------------------------------------------------------------------
# several loops: the session moves with the connection
# ---------------------------------------------------------------------------

def test_sessions_follow_their_vbd_to_its_loop(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk], loops=4)
    imgs = {0: srv.img}
    for m in (1, 2, 3):
        imgs[m] = make_image(tmp_path / ("m%d.img" % m), 64 * MiB, pattern=m)
        assert srv.open("aio:" + imgs[m])["minor"] == m
    loops = {v["minor"]: v.get("loop") for v in srv.call("list")["result"]["vbds"]}
    handles = {}
    for m in range(4):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(psk)
        h.set_tls_username("alice")
        h.set_export_name(str(m))
        h.connect_tcp("127.0.0.1", str(srv.port))
        handles[m] = h
    for m, h in handles.items():
        # large reads and writes: records across many socket writes, back-pressure
        data = os.urandom(32 * MiB)
        h.pwrite(data, 16 * MiB)
        h.flush()
        assert h.pread(32 * MiB, 16 * MiB) == data
        assert h.pread(4096, 0) == bytes([m or 0x5a]) * 4096
        with open(imgs[m], "rb") as f:
            f.seek(16 * MiB + 7 * MiB)
            assert f.read(MiB) == data[7 * MiB:8 * MiB]
    for h in handles.values():
        h.shutdown()
    # the listener is loop 0's: connections to the others' vbds were handed over
    assert len(set(loops.values())) == 4, loops


# ---------------------------------------------------------------------------
# the nbd: driver over TLS
# ---------------------------------------------------------------------------

def test_nbd_driver_to_tapdiskd_over_tls(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    dest = tls_server(make_server, tmp_path, ["--tls-psk", psk], name="dest")
    src = make_server(name="src")
    r = src.open("nbd:" + psk_uri(dest, psk))
    h = nbd.NBD()
    h.connect_uri(src.uri(r["minor"]))
    try:
        assert h.get_size() == 64 * MiB
        assert h.pread(4096, 0) == b"\x5a" * 4096
        data = os.urandom(5 * MiB)
        h.pwrite(data, 30 * MiB)
        h.flush()
    finally:
        h.shutdown()
    with open(dest.img, "rb") as f:
        f.seek(30 * MiB)
        assert f.read(len(data)) == data
    src.call("close", minor=r["minor"])


def test_nbd_driver_to_nbdkit_over_tls(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    port = free_port()
    pidfile = str(tmp_path / "nbdkit.pid")
    run("nbdkit", "-p", str(port), "-i", "127.0.0.1", "-P", pidfile, "--tls=require",
        "--tls-psk=" + psk, "memory", "64M")
    try:
        src = make_server(name="src")
        uri = "nbds://alice@127.0.0.1:%d/?tls-psk-file=%s" % (port, psk)
        r = src.open("nbd:" + uri)
        h = nbd.NBD()
        h.connect_uri(src.uri(r["minor"]))
        data = os.urandom(3 * MiB)
        h.pwrite(data, 1 * MiB)
        h.flush()
        h.shutdown()
        # read back straight from nbdkit, over its TLS
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(uri)
        assert h.pread(len(data), 1 * MiB) == data
        h.shutdown()
        src.call("close", minor=r["minor"])
    finally:
        with open(pidfile) as f:
            os.kill(int(f.read()), 15)


def test_nbd_driver_refused_without_the_key(make_server, tmp_path):
    psk = write_psk(tmp_path / "keys.psk")
    wrong = write_psk(tmp_path / "wrong.psk", key=OTHER_KEY)
    dest = tls_server(make_server, tmp_path, ["--tls-psk", psk], name="dest")
    src = make_server(name="src")
    for params in ("nbd:" + psk_uri(dest, wrong), "nbd:nbd://127.0.0.1:%d/0" % dest.port):
        r = src.call("open", check=False, params=params)
        assert not r["ok"], r


# ---------------------------------------------------------------------------
# hostile clients, inside a TLS session
# ---------------------------------------------------------------------------

class TLSRaw(NBDRaw):
    """NBDRaw that negotiates TLS (x509, with a client certificate) right
    after valid client flags; everything after goes through the session."""

    ctx = None

    def send_client_flags(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        super().send_client_flags(flags)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) or \
                not flags & FLAG_C_FIXED_NEWSTYLE:
            return
        assert self.option_final(OPT_STARTTLS) == REP_ACK
        assert not self.rbuf
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname=None)

    def _wait(self, events, timeout):
        if events & select.POLLIN and isinstance(self.sock, ssl.SSLSocket) and \
                self.sock.pending():
            return True
        return super()._wait(events, timeout)

    def send_nonblocking(self, data, deadline):
        """As NBDRaw's, one record at a time (the socket in non-blocking mode while
        sending: the tests that send from a thread do not read meanwhile)."""
        sent = 0
        view = memoryview(data)
        while sent < len(data) and time.monotonic() < deadline:
            if not self._wait(select.POLLOUT, min(0.05, deadline - time.monotonic())):
                continue
            self.sock.setblocking(False)
            try:
                sent += self.sock.send(view[sent:sent + 16384])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
            finally:
                self.sock.settimeout(self.timeout)
        return sent


class TLSBed(hostile.Bed):
    def raw(self, minor=0, timeout=None, **kw):
        path = self.global_sock if minor is None else self.path(minor)
        c = TLSRaw(path, timeout=hostile.T(10) if timeout is None else timeout, **kw)
        self.raws.append(c)
        return c


@pytest.fixture
def tls_bed(make_server, tmp_path, pki):
    """test_nbd_hostile's bed with the vbds' own sockets offering TLS (x509, client
    certificates verified): TLSRaw takes them into TLS, libnbd's health check stays
    in plaintext (--tls on is the vbd sockets' policy with credentials)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(os.path.join(pki["client"], "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(pki["client"], "client-cert.pem"),
                        os.path.join(pki["client"], "client-key.pem"))
    TLSRaw.ctx = ctx
    srv = make_server(extra=["--tls-creds", pki["server"]])
    b = TLSBed(srv, tmp_path)
    b.open_vbds()
    b.snapshot()
    yield b
    b.check()
    assert srv.stop() == 0, srv.log()


HOSTILE = [
    ("test_info_then_go", {}),
    ("test_list_and_zero_length_options", {}),
    ("test_meta_context_rules", {}),
    ("test_option_larger_than_64k_is_discarded", {}),
    ("test_export_name_errors_disconnect", {}),
    ("test_export_name_success", {}),
    ("test_bad_request_magic_disconnect", {"structured": False}),
    ("test_bad_request_magic_disconnect", {"structured": True}),
    ("test_unknown_commands_and_flags", {"structured": True}),
    ("test_oversized_read_write", {"structured": True}),
    ("test_requests_past_the_end", {"structured": False}),
    ("test_readonly_vbd_eperm", {"minor": 2}),
    ("test_structured_error_forms", {}),
    ("test_disconnect_with_requests_in_flight", {}),
    ("test_disc_answers_in_flight_then_closes", {}),
    ("test_slow_reader_byte_by_byte", {}),
    ("test_duplicate_and_reused_cookies", {}),
]


@pytest.mark.parametrize("name,kw", HOSTILE,
                         ids=["%s%s" % (n, "".join("-%s" % v for v in k.values()))
                              for n, k in HOSTILE])
def test_hostile_over_tls(tls_bed, name, kw):
    getattr(hostile, name)(tls_bed, **kw)
    # the bed's check (after the test) proves nothing leaked: fds, connections, frontends
    assert all(isinstance(c, TLSRaw) for c in tls_bed.raws)


def test_garbage_inside_tls_session(tls_bed):
    """After the handshake, garbage (not TLS records) on the socket: the
    session fails, the connection goes, nothing is left."""
    c = tls_bed.raw()
    c.start()
    raw = socket.socket(fileno=os.dup(c.sock.fileno()))
    raw.sendall(b"\x17\x03\x03\x00\x10" + os.urandom(16))   # a record that cannot decrypt
    raw.close()
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        c.recv_exact(1, timeout=5 * SLOW)


def test_handshake_garbage_and_silence(make_server, tmp_path):
    """STARTTLS, then not a ClientHello (garbage, or nothing until the handshake deadline)."""
    psk = write_psk(tmp_path / "keys.psk")
    srv = tls_server(make_server, tmp_path, ["--tls-psk", psk], extra=["--nbd-handshake-timeout", "2"])
    c = NBDRaw(addr=("127.0.0.1", srv.port), timeout=10 * SLOW)
    c.start()
    assert c.option_final(OPT_STARTTLS) == REP_ACK
    c.send(os.urandom(300))
    assert c.closed(5 * SLOW)
    c.close()
    c = NBDRaw(addr=("127.0.0.1", srv.port), timeout=10 * SLOW)
    c.start()
    assert c.option_final(OPT_STARTTLS) == REP_ACK
    assert c.closed(8 * SLOW)
    c.close()
    # STARTTLS with bytes already behind it: a client that did not wait for the reply
    c = NBDRaw(addr=("127.0.0.1", srv.port), timeout=10 * SLOW)
    c.start()
    c.send(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0) + b"\x16\x03\x01")
    assert c.closed(5 * SLOW)
    c.close()
    wait_for(lambda: srv.call("version")["result"]["nbd_connections"] == 0,
             what="every connection gone")
    still_serves(srv, psk=psk)


def test_starttls_twice_and_state_before_it(tls_bed):
    """STARTTLS under TLS is refused (ERR_INVALID); what was negotiated before
    STARTTLS (structured replies) does not carry into the session."""
    c = tls_bed.raw()
    c.start()
    assert isinstance(c.sock, ssl.SSLSocket)
    assert c.option_final(OPT_STARTTLS) == REP_ERR_INVALID
    c.opt_structured_reply()
    c.opt_go("0")
    hostile.still_works(c)

    c = tls_bed.raw()
    c.read_greeting()
    NBDRaw.send_client_flags(c)             # plaintext for now
    assert c.option_final(OPT_STRUCTURED_REPLY) == REP_ACK
    assert c.option_final(OPT_STARTTLS) == REP_ACK
    c.sock = TLSRaw.ctx.wrap_socket(c.sock, server_hostname=None)
    c.structured = False
    c.opt_go("0")
    assert not c.structured
    # a plain (not structured) reply to a read: the earlier negotiation was dropped
    c.send(struct.pack(">IHHQQI", 0x25609513, 0, 0, 77, 0, 512))
    magic, err, cookie = struct.unpack(">IIQ", c.recv_exact(16))
    assert (magic, err, cookie) == (0x67446698, 0, 77)
    assert len(c.recv_exact(512)) == 512


# ---------------------------------------------------------------------------
# a mirror to another host's tapdiskd, over TLS (issue 18's migration proof)
# ---------------------------------------------------------------------------

def test_storage_migration_over_tls(make_server, tmp_path):
    """The destination serves an empty VHD on a TCP listener with TLS (PSK)
    required; the source mirrors a vbd there through the nbd: driver over
    TLS under fio verify, pivots and keeps serving; the destination's image
    is then what the guest wrote."""
    size = 64 * MiB
    psk = write_psk(tmp_path / "keys.psk")
    port = free_port()
    a = make_server("a")
    b = make_server("b", extra=["--nbd-listen", "tcp:127.0.0.1:%d" % port, "--tls-psk", psk])
    b.port = port
    dst = str(tmp_path / "moved.vhd")
    run(os.path.join(BIN, "vhd-util"), "create", "-n", dst, "-s", size >> 20)
    d = b.open("vhd:" + dst)["minor"]
    src = mirror.new_image(tmp_path, "vhd", "here.vhd", size)
    m = a.open(src)["minor"]
    mirror.fill(a.uri(m), 24 * MiB, 29)
    fio = mirror.fio_load(a.uri(m), size)
    a.tapctl("mirror", "-m", m, "-d", "nbd:" + psk_uri(b, psk, minor=d))
    mirror.wait_job(a, m, "ready")
    a.tapctl("mirror", "-m", m, "--pivot")
    mirror.fio_ok(fio)
    want = mirror.snapshot_of(a, m, str(tmp_path / "want.raw"))
    a.call("destroy", minor=m)
    b.call("close", minor=d)
    run(os.path.join(BIN, "vhd-util"), "check", "-n", dst)
    run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "raw", dst, want)


def test_writes_then_disc_then_close_land(tls_bed):
    """A client that sends writes and DISC and closes at once (no
    close_notify): what it sent before the end of the stream is served, as
    over a plain socket."""
    for k in range(5):
        c = tls_bed.ready()
        data = os.urandom(64 * 1024 + k)
        c.send(build_request(CMD_WRITE, (5 + k) * MiB, len(data), cookie=1, payload=data) +
               build_request(CMD_DISC, cookie=2))
        c.close()
        h = tls_bed.libnbd(0)
        try:
            wait_for(lambda: h.pread(len(data), (5 + k) * MiB) == data, timeout=5 * SLOW,
                     what="the write before DISC landed")
        finally:
            h.shutdown()


def test_starttls_after_a_plaintext_hand_off(make_server, tmp_path, pki):
    """--tls on, several loops: an option naming an export on another loop
    moves the plaintext connection there first; STARTTLS then runs on that
    loop and the session serves the export."""
    srv = tls_server(make_server, tmp_path, ["--tls-creds", pki["server"], "--tls", "on"],
                     loops=3)
    for m in (1, 2):
        img = make_image(tmp_path / ("h%d.img" % m), 16 * MiB, pattern=0x40 + m)
        assert srv.open("aio:" + img)["minor"] == m
    loops = {v["minor"]: v["loop"] for v in srv.call("list")["result"]["vbds"]}
    assert loops[1] != 0 or loops[2] != 0, loops    # the listener is loop 0's
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(os.path.join(pki["client"], "ca-cert.pem"))
    for m in (1, 2):
        c = NBDRaw(addr=("127.0.0.1", srv.port), timeout=10 * SLOW)
        c.start()
        # a plaintext option naming export m: the connection goes to m's loop
        assert c.option_final(OPT_INFO, build_go_payload(str(m))) == REP_ACK
        assert c.option_final(OPT_STARTTLS) == REP_ACK
        c.sock = ctx.wrap_socket(c.sock, server_hostname=None)
        c.opt_go(str(m))
        assert c.pread(4096, 0) == bytes([0x40 + m]) * 4096
        data = os.urandom(300000)
        c.pwrite(data, 4 * MiB)
        assert c.pread(len(data), 4 * MiB) == data
        c.close()
