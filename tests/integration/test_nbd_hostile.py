"""Hostile NBD clients: whatever a client sends, or fails to send, or
refuses to read, it gets the protocol's error or a clean disconnect. The
server never crashes, other clients and other vbds keep being served, and
once the hostile client is gone nothing of it is left (file descriptors,
frontends, connections).

Every test runs on a `bed`: a server with four vbds (a ram disk, a raw
image, and two read-only exports). After each test the bed checks that
the server is alive, that a well-behaved client (libnbd) can still write
and read every writable vbd and read the read-only ones, and that the
server's open fds, its NBD connection count and every vbd's nbd frontend
count are back to what they were before the test.
"""

import os
import random
import struct
import threading
import time

import nbd
import pytest

from conftest import SLOW, make_image
from nbdraw import (
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
    CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, EINVAL, ENOSPC, ENOTSUP, EPERM, ESHUTDOWN,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO_BLOCK_SIZE,
    INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, IHAVEOPT, NBDMAGIC, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, TFLAG_READ_ONLY,
    TFLAG_SEND_DF, Closed, NBDRaw, build_go_payload, build_meta_payload,
    build_name, build_option, build_request,
)

# the second engine's pass skips these (see pytest.ini)
pytestmark = pytest.mark.engine_independent

KiB = 1 << 10
MiB = 1 << 20
RAM_SIZE = 64 * MiB          # minor 0
AIO_SIZE = 16 * MiB          # minor 1
RO_SIZE = 4 * MiB            # minors 2 (tap-ctl create -R) and 3 (open readonly)
MAX_REQ = 32 * MiB
META = "base:allocation"

# the health check writes at random in the last MiB of every writable vbd
HEALTH_AREA = 1 * MiB


def T(seconds):
    """A timeout, scaled for slow (sanitizer, valgrind) builds."""
    return seconds * SLOW


def poll(cond, timeout, interval=0.02):
    deadline = time.monotonic() + T(timeout)
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


# ---------------------------------------------------------------------------
# the test bed
# ---------------------------------------------------------------------------

class Bed:
    def __init__(self, server, tmp_path, global_sock=None):
        self.server = server
        self.tmp = tmp_path
        self.global_sock = global_sock
        self.raws = []
        self.rng = random.Random(0x7ab)
        self.sizes = {}
        self.readonly = set()
        self.ro_pattern = 0x3c
        self.aio_img = None

    # -- setup --

    def open_vbds(self):
        s = self.server
        assert s.open("ram:64M")["minor"] == 0
        self.aio_img = make_image(self.tmp / "aio.img", AIO_SIZE, pattern=0x5a)
        assert s.open("aio:" + self.aio_img)["minor"] == 1
        ro = make_image(self.tmp / "ro.img", RO_SIZE, pattern=self.ro_pattern)
        s.tapctl("create", "-R", "-a", "aio:" + ro)
        ro2 = make_image(self.tmp / "ro2.img", RO_SIZE, pattern=self.ro_pattern)
        assert s.open("aio:" + ro2, readonly=True)["minor"] == 3
        self.sizes = {0: RAM_SIZE, 1: AIO_SIZE, 2: RO_SIZE, 3: RO_SIZE}
        self.readonly = {2, 3}
        assert s.call("list")["result"]["vbds"][2]["readonly"] is True

    def snapshot(self):
        """Records the quiet state the server must come back to."""
        self.healthy()
        assert poll(lambda: self.quiet(), 5), self.describe()
        self.base_fds = self.fd_count()

    # -- observation --

    @property
    def pid(self):
        return self.server.proc.pid

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def rss_mib(self):
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise AssertionError("no VmRSS")

    def connections(self):
        return self.server.call("version")["result"]["nbd_connections"]

    def frontends(self, minor):
        return self.server.stats(minor)["frontends"]["nbd"]

    def quiet(self):
        return self.connections() == 0 and all(self.frontends(m) == 0 for m in self.sizes)

    def describe(self):
        return "connections=%d frontends=%s fds=%d (baseline %s)\n%s" % (
            self.connections(), {m: self.frontends(m) for m in self.sizes}, self.fd_count(),
            getattr(self, "base_fds", None), self.server.log()[-3000:])

    def alive(self):
        assert self.server.proc.poll() is None, "tapdiskd died:\n" + self.server.log()[-5000:]

    # -- clients --

    def path(self, minor=0):
        return self.server.nbd_path(minor)

    def raw(self, minor=0, timeout=None, **kw):
        """A raw connection to minor's own socket (or the global one: minor=None)."""
        path = self.global_sock if minor is None else self.path(minor)
        c = NBDRaw(path, timeout=T(10) if timeout is None else timeout, **kw)
        self.raws.append(c)
        return c

    def ready(self, minor=0, structured=False, meta=(), name="", timeout=None):
        c = self.raw(minor, timeout=timeout)
        c.handshake(name=name, structured=structured, meta=meta)
        return c

    def close_raws(self):
        for c in self.raws:
            c.close()
        self.raws = []

    def libnbd(self, minor):
        h = nbd.NBD()
        h.connect_uri(self.server.uri(minor))
        return h

    def healthy(self, minors=None):
        """The server is alive and a well-behaved client gets correct data."""
        self.alive()
        for m in (self.sizes if minors is None else minors):
            h = self.libnbd(m)
            try:
                size = self.sizes[m]
                assert h.get_size() == size
                if m in self.readonly:
                    assert h.is_read_only()
                    assert h.pread(4096, 8192) == bytes([self.ro_pattern]) * 4096
                else:
                    n = self.rng.randrange(1, 64 * KiB)
                    off = size - HEALTH_AREA + self.rng.randrange(0, HEALTH_AREA - n)
                    data = os.urandom(n)
                    h.pwrite(data, off)
                    assert h.pread(n, off) == data
                    h.flush()
            finally:
                h.shutdown()
        self.alive()

    def assert_clean(self, timeout=5):
        """Every connection gone, every fd back: nothing leaked."""
        self.alive()
        ok = poll(lambda: self.quiet() and self.fd_count() == self.base_fds, timeout)
        assert ok, "server did not return to its baseline: " + self.describe()

    def forget_ram_vbd(self, minor):
        """minor (a ram vbd: no image fd) was destroyed: its listening socket
        is the one fd the baseline loses."""
        del self.sizes[minor]
        self.base_fds -= 1

    def check(self):
        """After a hostile action: alive, still serving correctly, nothing leaked."""
        self.close_raws()
        self.healthy()
        self.assert_clean()


def _make_bed(server, tmp_path, global_sock=None):
    b = Bed(server, tmp_path, global_sock)
    b.open_vbds()
    b.snapshot()
    return b


@pytest.fixture
def bed(server, tmp_path):
    b = _make_bed(server, tmp_path)
    yield b
    b.check()


@pytest.fixture
def gbed(make_server, tmp_path):
    """A bed whose server also listens on a global socket (exports by minor)."""
    sock = str(tmp_path / "global.sock")
    srv = make_server(extra=["--nbd-listen", "unix:" + sock])
    b = _make_bed(srv, tmp_path, global_sock=sock)
    yield b
    b.check()
    rc = srv.stop()
    assert rc == 0, srv.log()


def expect_error(c, cmd, err, offset=0, length=None, flags=0, payload=b""):
    """One request that must fail with err (length defaults to the payload's)."""
    rep = c.call(cmd, offset, length, flags=flags, payload=payload)
    assert rep.error == err, "cmd %d off %d len %d flags 0x%x: got %d, want %d" % (
        cmd, offset, length, flags, rep.error, err)
    return rep


def still_works(c, minor=0, bed=None):
    """The raw connection c is still in step: a write and a read round-trip."""
    off = 12 * MiB + 12345 + minor * 777
    data = os.urandom(3000)
    if bed is not None and minor in bed.readonly:
        assert c.pread(100, 0) == bytes([bed.ro_pattern]) * 100
        return
    c.pwrite(data, off)
    assert c.pread(len(data), off) == data


# ---------------------------------------------------------------------------
# handshake
# ---------------------------------------------------------------------------

def test_greeting_and_abort(bed):
    c = bed.raw()
    flags = c.read_greeting()
    assert flags == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    c.send_client_flags()
    c.opt_abort()
    r = c.read_option_reply(OPT_ABORT)
    assert r.type == REP_ACK and r.data == b""
    assert c.expect_closed() == b""
    # an abort with a payload whose sender is gone before the ACK, and an
    # abort after other options
    c = bed.raw().start()
    c.send_option(OPT_ABORT, b"junk")
    c.close()
    c = bed.raw().start()
    assert c.option_final(OPT_STRUCTURED_REPLY) == REP_ACK
    c.send_option(OPT_ABORT)
    c.expect_closed()
    bed.check()


@pytest.mark.parametrize("flags", [0x4, 0x8, 0x80000000, 0xFFFFFFFF, 0x3 | 0x100])
def test_unknown_client_flags_disconnect(bed, flags):
    c = bed.raw()
    c.read_greeting()
    c.send(struct.pack(">I", flags))
    # and an option right behind them, which must not be answered
    c.try_send(build_option(OPT_LIST))
    assert c.expect_closed() == b""
    bed.check()


def test_client_flags_without_fixed_newstyle_or_no_zeroes(bed):
    # both bits are optional for a client; without NO_ZEROES, EXPORT_NAME pads
    for flags in (0, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES):
        c = bed.raw().start(flags)
        exp = c.opt_export_name("")
        assert exp.size == RAM_SIZE
        still_works(c)
        c.disconnect()
        c.expect_closed()
    bed.check()


@pytest.mark.parametrize("magic", [0, NBDMAGIC, IHAVEOPT ^ 1, REQUEST_MAGIC, 0xFFFFFFFFFFFFFFFF])
def test_bad_option_magic_disconnect(bed, magic):
    # as the first option
    c = bed.raw().start()
    c.send(build_option(OPT_LIST, magic=magic))
    assert c.expect_closed() == b""
    # after a successful one
    c = bed.raw().start()
    c.opt_structured_reply()
    c.send(build_option(OPT_GO, build_go_payload(""), magic=magic))
    assert c.expect_closed() == b""
    bed.check()


@pytest.mark.parametrize("opt", [0, 4, OPT_STARTTLS, OPT_EXTENDED_HEADERS, 12, 0x7FFFFFFF,
                                 0x80000000, 0xFFFFFFFF])
def test_unknown_and_unsupported_options(bed, opt):
    c = bed.raw().start()
    for payload in (b"", b"x", os.urandom(1000), b"\0" * 65536):
        r = c.option(opt, payload)
        assert len(r) == 1 and r[0].type == REP_ERR_UNSUP, r
    # the connection is still in step: finish the handshake and use it
    c.opt_go("")
    still_works(c)
    bed.check()


def test_option_larger_than_64k_is_discarded(bed):
    c = bed.raw().start()
    for opt in (OPT_GO, OPT_INFO, OPT_LIST, OPT_SET_META_CONTEXT, 77):
        for n in (64 * KiB + 1, 1 * MiB):
            c.send_option(opt, os.urandom(n))
            r = c.option_replies(opt)
            assert [x.type for x in r] == [REP_ERR_TOO_BIG], (opt, n, r)
    # exactly 16 MiB is still discarded, not fatal
    c2 = bed.raw(timeout=T(30)).start()
    c2.send_option(OPT_INFO, bytes(16 * MiB))
    assert [x.type for x in c2.option_replies(OPT_INFO)] == [REP_ERR_TOO_BIG]
    # a 64 KiB option is processed, and found invalid
    payload = build_name("") + struct.pack(">H", 0) + bytes(64 * KiB - 6)
    assert len(payload) == 64 * KiB
    assert c2.option_final(OPT_GO, payload) == REP_ERR_INVALID
    c2.opt_go("")
    still_works(c2)
    bed.check()


@pytest.mark.parametrize("length", [16 * MiB + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_huge_option_disconnects_at_once(bed, length):
    for opt in (OPT_GO, OPT_LIST, 99):
        c = bed.raw().start()
        c.send(build_option(opt, length=length) + os.urandom(4096))
        assert c.expect_closed() == b""
    bed.check()


def test_export_name_errors_disconnect(bed):
    cases = [
        build_option(OPT_EXPORT_NAME, b"9"),                # unknown export
        build_option(OPT_EXPORT_NAME, b"nosuch"),
        build_option(OPT_EXPORT_NAME, b"1"),                # another vbd's name
        build_option(OPT_EXPORT_NAME, b"0\0"),              # embedded NUL
        build_option(OPT_EXPORT_NAME, b"\0"),
        build_option(OPT_EXPORT_NAME, b"a" * 4097),         # longer than a string
        build_option(OPT_EXPORT_NAME, b"0" * 60000),
        build_option(OPT_EXPORT_NAME, length=64 * KiB + 1),  # oversized: no discard
        build_option(OPT_EXPORT_NAME, length=0xFFFFFFFF),
    ]
    for msg in cases:
        c = bed.raw().start()
        c.try_send(msg)
        assert c.expect_closed() == b"", msg[:40]
    bed.check()


def test_export_name_success(bed):
    for minor, name in ((0, ""), (0, "0"), (1, ""), (1, "1"), (2, "2")):
        for flags in (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, FLAG_C_FIXED_NEWSTYLE):
            c = bed.raw(minor).start(flags)
            exp = c.opt_export_name(name)
            assert exp.size == bed.sizes[minor]
            assert bool(exp.flags & TFLAG_READ_ONLY) == (minor in bed.readonly)
            still_works(c, minor, bed)
            c.disconnect()
            c.expect_closed()
    bed.check()


GO_MALFORMED = [
    (b"", REP_ERR_INVALID),
    (b"\0\0\0", REP_ERR_INVALID),
    (struct.pack(">I", 5) + b"ab", REP_ERR_INVALID),                 # name overruns
    (build_name(""), REP_ERR_INVALID),                               # no nr_info
    (build_name("") + b"\0", REP_ERR_INVALID),                       # half an nr_info
    (build_name("") + struct.pack(">H", 1), REP_ERR_INVALID),        # missing request
    (build_name("") + struct.pack(">HH", 2, INFO_NAME), REP_ERR_INVALID),
    (build_name("") + struct.pack(">H", 0) + b"\0", REP_ERR_INVALID),  # trailing byte
    (build_name("") + struct.pack(">HH", 1, 3) + b"\0", REP_ERR_INVALID),
    (build_name("") + struct.pack(">H", 0xFFFF), REP_ERR_INVALID),
    (build_name("0\0") + struct.pack(">H", 0), REP_ERR_INVALID),     # embedded NUL
    (build_name("\0") + struct.pack(">H", 0), REP_ERR_INVALID),
    (struct.pack(">I", 0xFFFFFFFF) + struct.pack(">H", 0), REP_ERR_TOO_BIG),
    (struct.pack(">I", 4097) + b"a" * 4097 + struct.pack(">H", 0), REP_ERR_TOO_BIG),
    (struct.pack(">I", 4097) + b"a" * 10, REP_ERR_TOO_BIG),
]


@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO])
def test_go_info_malformed(bed, opt):
    c = bed.raw().start()
    for payload, want in GO_MALFORMED:
        r = c.option(opt, payload)
        assert [x.type for x in r] == [want], (payload[:20], r)
    # unknown exports
    for name in ("1", "2", "9", "-1", "00x", "nosuch", "a" * 4096, " ", "0 "):
        r = c.option(opt, build_go_payload(name))
        assert [x.type for x in r] == [REP_ERR_UNKNOWN], (name[:20], r)
    c.opt_go("")
    still_works(c)
    bed.check()


def test_info_then_go(bed):
    c = bed.raw(1).start()
    exp = c.opt_go("", [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999, 0xFFFF], info=True)
    assert exp.size == AIO_SIZE and exp.name == ""
    assert exp.description == "aio:" + bed.aio_img
    assert exp.block_size == (1, 4096, MAX_REQ)
    assert INFO_EXPORT in exp.infos
    exp = c.opt_go("1", [INFO_NAME], info=True)
    assert exp.name == "1"
    # INFO left us in the handshake: more options work
    assert c.opt_list() == [("1", "aio:" + bed.aio_img)]
    c.opt_structured_reply()
    exp = c.opt_go("1")
    assert exp.flags & TFLAG_SEND_DF
    still_works(c, 1)
    bed.check()


def test_list_and_zero_length_options(bed):
    c = bed.raw().start()
    assert c.opt_list() == [("0", "ram:64M")]
    assert c.option_final(OPT_LIST, b"x") == REP_ERR_INVALID
    assert c.option_final(OPT_STRUCTURED_REPLY, b"\0") == REP_ERR_INVALID
    assert c.option_final(OPT_STRUCTURED_REPLY, os.urandom(100)) == REP_ERR_INVALID
    # repeated STRUCTURED_REPLY is harmless
    c.opt_structured_reply()
    c.opt_structured_reply()
    c.opt_go("")
    still_works(c)
    bed.check()


META_MALFORMED = [
    (b"", REP_ERR_INVALID),
    (build_name(""), REP_ERR_INVALID),                                 # no count
    (build_name("") + b"\0\0", REP_ERR_INVALID),
    (build_name("") + struct.pack(">I", 1), REP_ERR_INVALID),          # missing query
    (build_name("") + struct.pack(">I", 0xFFFFFFFF), REP_ERR_INVALID),
    (build_name("") + struct.pack(">I", 1) + struct.pack(">I", 100) + b"base",
     REP_ERR_INVALID),                                                  # query overruns
    (build_meta_payload("", [META]) + b"\0", REP_ERR_INVALID),          # trailing
    (build_meta_payload("", [META, "x\0y"]), REP_ERR_INVALID),          # NUL in query
    (build_meta_payload("0\0", [META]), REP_ERR_INVALID),
    (build_name("") + struct.pack(">I", 2) + build_name(META) + struct.pack(">I", 4097)
     + b"q" * 4097, REP_ERR_TOO_BIG),                                   # query too long
    (struct.pack(">I", 5000) + b"n" * 5000 + struct.pack(">I", 0), REP_ERR_TOO_BIG),
    (build_meta_payload("9", [META]), REP_ERR_UNKNOWN),
    (build_meta_payload("1", [META]), REP_ERR_UNKNOWN),
]


@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_malformed(bed, opt):
    c = bed.raw().start()
    c.opt_structured_reply()
    for payload, want in META_MALFORMED:
        r = c.option(opt, payload)
        assert [x.type for x in r] == [want], (payload[:24], r)
    # none of that selected anything: BLOCK_STATUS is refused
    c.opt_go("")
    rep = expect_error(c, CMD_BLOCK_STATUS, EINVAL, 0, 4096)
    assert rep.chunks and rep.chunks[0].type == REPLY_TYPE_ERROR
    still_works(c)
    bed.check()


def test_meta_context_rules(bed):
    c = bed.raw().start()
    # SET before STRUCTURED_REPLY is invalid; LIST is allowed
    assert c.option_final(OPT_SET_META_CONTEXT, build_meta_payload("", [META])) \
        == REP_ERR_INVALID
    assert c.opt_meta(False, "", []) == {META: 1}
    assert c.opt_meta(False, "0", ["base:"]) == {META: 1}
    assert c.opt_meta(False, "", ["qemu:dirty-bitmap:x", "nosuch:thing"]) == {}
    c.opt_structured_reply()
    assert c.opt_meta(True, "", ["nosuch:x", META, META]) == {META: 1}
    # a later SET that selects nothing replaces the selection
    assert c.opt_meta(True, "", ["base:"]) == {}
    c.opt_go("")
    expect_error(c, CMD_BLOCK_STATUS, EINVAL, 0, 4096)
    c.close()
    c = bed.ready(structured=True, meta=[META])
    rep = c.call(CMD_BLOCK_STATUS, 0, 1 * MiB)
    assert rep.error == 0 and rep.extents[0] == 1
    assert sum(n for n, _ in rep.extents[1]) <= 1 * MiB
    rep = c.call(CMD_BLOCK_STATUS, 0, RAM_SIZE, flags=CMD_FLAG_REQ_ONE)
    assert rep.error == 0 and len(rep.extents[1]) == 1
    bed.check()


# garbage at every stage of a conversation ---------------------------------

def _stage_greeting_unread(c):
    pass


def _stage_client_flags(c):
    c.read_greeting()


def _stage_options(c):
    c.start()


def _stage_after_structured(c):
    c.start()
    c.opt_structured_reply()
    c.opt_meta(True, "", [META])


def _stage_after_info(c):
    c.start()
    c.opt_go("", [INFO_NAME], info=True)
    c.opt_list()


def _stage_mid_option(c):
    c.start()
    c.send(build_option(OPT_GO, length=200)[:16] + b"\0\0\0\0")   # header + part of it


def _stage_transmission(c):
    c.handshake()
    still_works(c)


def _stage_structured_transmission(c):
    c.handshake(structured=True, meta=[META])
    still_works(c)
    c.call(CMD_BLOCK_STATUS, 0, 4096)


def _stage_mid_write(c):
    c.handshake()
    c.send(build_request(CMD_WRITE, 0, 64, cookie=1)[:28])


STAGES = {
    "greeting-unread": _stage_greeting_unread,
    "client-flags": _stage_client_flags,
    "option-header": _stage_options,
    "after-structured-and-meta": _stage_after_structured,
    "after-info-and-list": _stage_after_info,
    "mid-option-data": _stage_mid_option,
    "transmission": _stage_transmission,
    "structured-transmission": _stage_structured_transmission,
    "mid-write-payload": _stage_mid_write,
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_garbage_at_every_stage(bed, stage):
    prepare = STAGES[stage]
    rng = random.Random(stage)
    for i in range(8):
        c = bed.raw(i % 2)
        prepare(c)
        # garbage that starts with enough invalid words to fill whatever
        # message the stage left half-sent, then random bytes
        junk = b"\xde\xad\xbe\xef" * 64 + rng.randbytes(rng.choice([1, 27, 100, 4096, 70000]))
        c.try_send(junk)
        if i % 2:
            # a client that stops sending: the server must still have
            # answered with a disconnect, or (mid-payload) be waiting safely
            c.shutdown_write()
        assert c.closed(T(5)), "stage %s: still open after garbage" % stage
        bed.alive()
    bed.check()


def test_mutated_conversations(bed):
    """A small fuzzer: valid conversations with random damage. Each
    connection ends with the client's EOF, which must close it promptly."""
    rng = random.Random(20240501)

    def transcript():
        out = struct.pack(">I", rng.choice([3, 3, 3, 1, 2, 0]))
        if rng.random() < 0.7:
            out += build_option(OPT_STRUCTURED_REPLY)
            out += build_option(OPT_SET_META_CONTEXT, build_meta_payload("", [META]))
        if rng.random() < 0.3:
            out += build_option(OPT_LIST)
            out += build_option(OPT_INFO, build_go_payload("", [INFO_NAME]))
        if rng.random() < 0.2:
            out += build_option(OPT_EXPORT_NAME, b"")
        else:
            out += build_option(OPT_GO, build_go_payload(""))
        for k in range(rng.randrange(0, 12)):
            cmd = rng.choice([CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE,
                              CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, CMD_DISC])
            length = rng.choice([1, 512, 4096, 65536])   # zero: its own test
            off = rng.choice([0, 4096, RAM_SIZE - 4096, RAM_SIZE])
            flags = rng.choice([0, 0, CMD_FLAG_FUA, CMD_FLAG_DF, CMD_FLAG_NO_HOLE])
            payload = bytes(length) if cmd == CMD_WRITE else b""
            out += build_request(cmd, off, length, k, flags, payload)
        return bytearray(out)

    def mutate(b):
        for _ in range(rng.randrange(1, 4)):
            if not b:
                break
            what = rng.random()
            pos = rng.randrange(len(b))
            if what < 0.4:
                b[pos] ^= 1 << rng.randrange(8)
            elif what < 0.6:
                b[pos] = rng.choice([0, 0xFF, 0x7F, 0x80])
            elif what < 0.75:
                del b[pos:pos + rng.randrange(1, 16)]
            elif what < 0.9:
                b[pos:pos] = rng.randbytes(rng.randrange(1, 16))
            else:
                del b[pos:]
        return bytes(b)

    for i in range(250):
        data = mutate(transcript())
        c = bed.raw(timeout=T(5))
        c.read_greeting()
        c.try_send(data)
        try:
            c.shutdown_write()
        except OSError:
            pass
        assert c.closed(T(5)), "iteration %d: connection not closed after client EOF" % i
        c.close()
        if i % 50 == 49:
            bed.alive()
            assert poll(lambda: bed.connections() == 0, 5), bed.describe()
    bed.check()


# handshake timeout --------------------------------------------------------

HANDSHAKE_SECS = 4


@pytest.fixture
def quick_bed(make_server, tmp_path):
    """A bed whose server cuts handshakes after HANDSHAKE_SECS (default 30)."""
    srv = make_server(extra=["--nbd-handshake-timeout", str(HANDSHAKE_SECS)])
    b = _make_bed(srv, tmp_path)
    yield b
    b.check()


def test_handshake_timeout_option_is_checked(make_server):
    for bad in ("0", "3601", "soon"):
        srv = make_server(name="s" + bad, start=False,
                          extra=["--nbd-handshake-timeout", bad])
        with pytest.raises(RuntimeError, match="must be 1 to 3600 seconds"):
            srv.start()


def test_handshake_timeout(quick_bed):
    """Handshakes that stall, or drag on, are cut at the handshake timeout; a
    connection in transmission is never timed out, however idle."""
    bed = quick_bed
    t0 = time.monotonic()
    stalled = {
        "silent": bed.raw(),
        "greeting-read": bed.raw(),
        "flags-sent": bed.raw(),
        "half-option-header": bed.raw(),
        "half-option-data": bed.raw(),
        "after-structured": bed.raw(),
    }
    stalled["greeting-read"].read_greeting()
    stalled["flags-sent"].start()
    stalled["half-option-header"].start().send(build_option(OPT_LIST)[:7])
    stalled["half-option-data"].start().send(build_option(OPT_GO, build_go_payload(""))[:20])
    stalled["after-structured"].start().opt_structured_reply()
    # a slowloris that sends one byte of a never-ending option stream every
    # half second, and a chatty client that lists exports as often, forever
    slow = bed.raw().start()
    chatty = bed.raw().start()
    stream = build_option(OPT_LIST) * 100
    # a finished handshake, then silence: must survive
    idle_ok = bed.ready(1)
    assert bed.frontends(0) == 8 and bed.frontends(1) == 1

    closed_at = {}
    pos = 0
    deadline = t0 + T(HANDSHAKE_SECS + 3.5)
    while time.monotonic() < deadline and len(closed_at) < len(stalled) + 2:
        for name, c in stalled.items():
            if name not in closed_at and c.closed(0):
                closed_at[name] = time.monotonic() - t0
        if "slowloris" not in closed_at:
            if not slow.try_send(stream[pos:pos + 1]) or slow.closed(0):
                closed_at["slowloris"] = time.monotonic() - t0
            pos += 1
        if "chatty" not in closed_at:
            try:
                chatty.send_option(OPT_LIST)
                chatty.option_replies(OPT_LIST)
            except (Closed, OSError):
                closed_at["chatty"] = time.monotonic() - t0
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    # meanwhile, everyone else was served, and the finished handshake lives
    bed.healthy()
    still_works(idle_ok, 1)
    problems = []
    for name in list(stalled) + ["slowloris", "chatty"]:
        if name not in closed_at:
            problems.append("%s: handshake still open after %.1f s" % (name, elapsed))
        elif not HANDSHAKE_SECS - 1 <= closed_at[name] <= T(HANDSHAKE_SECS + 3):
            problems.append("%s: cut after %.1f s, not %d" % (name, closed_at[name],
                                                               HANDSHAKE_SECS))
    assert not problems, "\n".join(problems)
    bed.check()


# ---------------------------------------------------------------------------
# transmission
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("structured", [False, True])
def test_bad_request_magic_disconnect(bed, structured):
    for magic in (0, SIMPLE_REPLY_MAGIC, REQUEST_MAGIC ^ 0x80, 0xFFFFFFFF):
        c = bed.ready(structured=structured)
        still_works(c)
        c.send(build_request(CMD_READ, 0, 4096, magic=magic) + os.urandom(200))
        assert c.expect_closed() == b""
    # a bad magic right behind good requests: those may be answered, then EOF
    c = bed.ready(structured=structured)
    for i in range(20):
        c.send_request(CMD_READ, i * 4096, 4096)
    c.send(build_request(CMD_READ, 0, 4096, magic=0x12345678))
    got = c.expect_closed()
    assert len(got) <= 20 * (4096 + 28)
    bed.check()


@pytest.mark.parametrize("structured", [False, True])
def test_unknown_commands_and_flags(bed, structured):
    c = bed.ready(structured=structured)
    for cmd in (8, 9, 10, 0x100, 0x7FFF, 0xFFFF):
        for flags in (0, CMD_FLAG_FUA):
            rep = expect_error(c, cmd, EINVAL, 0, 4096, flags=flags)
            assert not rep.chunks, "unknown command answered with chunks"
    for bad in (CMD_FLAG_PAYLOAD_LEN, 1 << 6, 1 << 10, 1 << 15, 0xFFFF):
        for cmd in (CMD_READ, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES):
            length = 0 if cmd == CMD_FLUSH else 4096
            rep = expect_error(c, cmd, EINVAL, 0, length, flags=bad)
            if structured and cmd == CMD_READ:
                assert rep.chunks[0].type == REPLY_TYPE_ERROR
        # a rejected write's payload is swallowed
        expect_error(c, CMD_WRITE, EINVAL, 0, flags=bad, payload=b"\xff" * 8192)
    assert c.pread(8192, 0) != b"\xff" * 8192
    still_works(c)
    bed.check()


@pytest.mark.parametrize("structured", [False, True])
def test_oversized_read_write(bed, structured):
    c = bed.ready(structured=structured)
    for length in (MAX_REQ + 1, MAX_REQ + 4096, 0x80000000, 0xFFFFFFFF):
        rep = expect_error(c, CMD_READ, EINVAL, 0, length)
        if structured:
            assert len(rep.chunks) == 1 and rep.chunks[0].type == REPLY_TYPE_ERROR
            assert rep.chunks[0].flags & REPLY_FLAG_DONE
            assert rep.chunks[0].error == (EINVAL, b"")
    payload = b"\xab" * (MAX_REQ + 1)
    expect_error(c, CMD_WRITE, EINVAL, 0, payload=payload)
    assert c.pread(4096, 0) != b"\xab" * 4096
    # the limit itself is fine
    big = os.urandom(MAX_REQ)
    c.pwrite(big, 4096)
    assert c.pread(MAX_REQ, 4096) == big
    still_works(c)
    # a 4 GiB write that the client abandons part way
    c2 = bed.ready()
    c2.send(build_request(CMD_WRITE, 0, 0xFFFFFFFF, cookie=1) + bytes(3 * MiB))
    c2.close()
    bed.check()


PAST_END = [
    (CMD_READ, EINVAL), (CMD_TRIM, EINVAL), (CMD_CACHE, EINVAL),
    (CMD_WRITE, ENOSPC), (CMD_WRITE_ZEROES, ENOSPC),
]


@pytest.mark.parametrize("structured", [False, True])
def test_requests_past_the_end(bed, structured):
    wrong = []
    for minor in (0, 1):
        size = bed.sizes[minor]
        c = bed.ready(minor, structured=structured, meta=[META] if structured else ())
        ranges = [(size, 1), (size - 512, 1024), (size + 1, 0), (size + 4096, 4096),
                  (2 ** 63, 512), (2 ** 64 - 512, 1024), (2 ** 64 - 1, 1),
                  (size - 1, 0xFFFFFFFF)]
        checks = list(PAST_END)
        if structured:
            checks.append((CMD_BLOCK_STATUS, EINVAL))
        for cmd, err in checks:
            for off, length in ranges:
                if cmd == CMD_WRITE and length > MAX_REQ:
                    continue
                if cmd == CMD_BLOCK_STATUS and not length:
                    continue
                payload = b"\xee" * length if cmd == CMD_WRITE else b""
                rep = c.call(cmd, off, length, payload=payload)
                if rep.error != err:
                    wrong.append("minor %d cmd %d offset %d length %d: error %d, want %d" %
                                 (minor, cmd, off, length, rep.error, err))
                if structured and cmd in (CMD_READ, CMD_BLOCK_STATUS):
                    assert rep.chunks and rep.chunks[0].type == REPLY_TYPE_ERROR
                else:
                    assert not rep.chunks
        # the last byte is fine, and nothing past-the-end landed
        c.pwrite(b"z", size - 1)
        assert c.pread(1, size - 1) == b"z"
        still_works(c, minor)
    assert not wrong, "\n".join(wrong)
    bed.check()


@pytest.mark.parametrize("minor", [2, 3])
def test_readonly_vbd_eperm(bed, minor):
    c = bed.ready(minor, structured=True)
    assert c.export.flags & TFLAG_READ_ONLY
    for cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        for off, length in ((0, 4096), (RO_SIZE - 1, 1), (RO_SIZE, 4096)):
            payload = b"\x01" * length if cmd == CMD_WRITE else b""
            rep = expect_error(c, cmd, EPERM, off, length, payload=payload)
            assert not rep.chunks
        expect_error(c, cmd, EPERM, 0, 4096, flags=CMD_FLAG_FUA,
                     payload=b"\x01" * 4096 if cmd == CMD_WRITE else b"")
    assert c.pread(4096, 0) == bytes([bed.ro_pattern]) * 4096
    assert c.call(CMD_FLUSH).error == 0
    assert c.call(CMD_CACHE, 0, 4096).error == 0
    c.close()
    # libnbd, which trusts the flags, also gets EPERM if it tries anyway
    h = bed.libnbd(minor)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()
    bed.check()


def test_block_status_needs_structured_and_meta(bed):
    c = bed.ready()
    rep = expect_error(c, CMD_BLOCK_STATUS, EINVAL, 0, 4096)
    assert not rep.chunks
    c = bed.ready(structured=True)
    rep = expect_error(c, CMD_BLOCK_STATUS, EINVAL, 0, 4096)
    assert rep.chunks[0].type == REPLY_TYPE_ERROR and rep.chunks[0].flags & REPLY_FLAG_DONE
    # SET_META_CONTEXT with no context, then GO
    c = bed.raw().start()
    c.opt_structured_reply()
    assert c.opt_meta(True, "", []) == {}
    c.opt_go("")
    expect_error(c, CMD_BLOCK_STATUS, EINVAL, 0, 4096)
    c = bed.ready(structured=True, meta=[META])
    expect_error(c, CMD_BLOCK_STATUS, EINVAL, 0, 0)
    assert c.call(CMD_BLOCK_STATUS, 0, 4096).error == 0
    bed.check()


def test_df_flag_rules(bed):
    plain = bed.ready()
    rep = expect_error(plain, CMD_READ, EINVAL, 0, 4096, flags=CMD_FLAG_DF)
    assert not rep.chunks
    assert not plain.export.flags & TFLAG_SEND_DF
    s = bed.ready(structured=True, meta=[META])
    assert s.export.flags & TFLAG_SEND_DF
    for cmd in (CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES):
        payload = b"q" * 4096 if cmd == CMD_WRITE else b""
        length = 0 if cmd == CMD_FLUSH else 4096
        rep = expect_error(s, cmd, EINVAL, 0, length, flags=CMD_FLAG_DF, payload=payload)
        assert not rep.chunks
    rep = expect_error(s, CMD_BLOCK_STATUS, EINVAL, 0, 4096, flags=CMD_FLAG_DF)
    assert rep.chunks[0].type == REPLY_TYPE_ERROR
    rep = s.call(CMD_READ, 0, 4096, flags=CMD_FLAG_DF)
    assert rep.error == 0 and len(rep.chunks) == 1
    assert rep.chunks[0].type == REPLY_TYPE_OFFSET_DATA
    bed.check()


def test_no_hole_and_fast_zero_only_on_write_zeroes(bed):
    c = bed.ready(structured=True, meta=[META])
    for flag in (CMD_FLAG_NO_HOLE, CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO):
        for cmd in (CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_BLOCK_STATUS):
            payload = b"n" * 4096 if cmd == CMD_WRITE else b""
            length = 0 if cmd == CMD_FLUSH else 4096
            expect_error(c, cmd, EINVAL, 0, length, flags=flag, payload=payload)
        assert c.call(CMD_WRITE_ZEROES, 0, 4096, flags=flag).error == 0
    assert c.pread(4096, 0) == bytes(4096)
    bed.check()


def test_flush_with_offset_or_length(bed):
    c = bed.ready()
    for off, length in ((1, 0), (0, 1), (4096, 4096), (2 ** 64 - 1, 0xFFFFFFFF)):
        expect_error(c, CMD_FLUSH, EINVAL, off, length)
        expect_error(c, CMD_FLUSH, EINVAL, off, length, flags=CMD_FLAG_FUA)
    assert c.call(CMD_FLUSH).error == 0
    assert c.call(CMD_FLUSH, flags=CMD_FLAG_FUA).error == 0
    bed.check()


def test_structured_error_forms(bed):
    """With structured replies, READ and BLOCK_STATUS errors are ERROR chunks,
    every other command's errors simple replies, and successes are framed right."""
    c = bed.ready(structured=True, meta=[META])
    rep = expect_error(c, CMD_READ, EINVAL, RAM_SIZE, 4096)
    (ch,) = rep.chunks
    assert ch.type == REPLY_TYPE_ERROR and ch.done and ch.error == (EINVAL, b"")
    rep = expect_error(c, CMD_BLOCK_STATUS, EINVAL, RAM_SIZE, 4096)
    assert rep.chunks[0].type == REPLY_TYPE_ERROR
    # (the exact errors past the end are test_requests_past_the_end's business)
    for cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM, CMD_CACHE, 0x55):
        payload = b"w" * 4096 if cmd == CMD_WRITE else b""
        rep = c.call(cmd, RAM_SIZE, 4096, payload=payload)
        assert rep.error and not rep.chunks, rep
    rep = expect_error(c, CMD_FLUSH, EINVAL, 1, 0)
    assert not rep.chunks
    still_works(c)
    bed.check()


ZERO_LENGTH_CASES = [(CMD_READ, 0), (CMD_READ, CMD_FLAG_DF), (CMD_WRITE, 0),
                     (CMD_WRITE, CMD_FLAG_FUA), (CMD_TRIM, 0), (CMD_TRIM, CMD_FLAG_FUA),
                     (CMD_CACHE, 0), (CMD_WRITE_ZEROES, 0), (CMD_WRITE_ZEROES, CMD_FLAG_FUA),
                     (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE), (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
                     # refused, with no payload to swallow: the answer must not wait for
                     # a next byte (fuzz_nbd found it waiting for ever)
                     (CMD_WRITE, CMD_FLAG_NO_HOLE), (CMD_WRITE, 0x100)]


@pytest.mark.parametrize("minor", [0, 1])
@pytest.mark.parametrize("cmd,flags", ZERO_LENGTH_CASES,
                         ids=["%d-0x%x" % cf for cf in ZERO_LENGTH_CASES])
def test_zero_length_requests(bed, minor, cmd, flags):
    """Zero-length requests (which a client should not send) get a
    well-formed reply, success or error: never a crash or a lost reply."""
    size = bed.sizes[minor]
    for structured in (False, True):
        c = bed.ready(minor, structured=structured)
        for off in (0, 1, 4096, 65536, size - 1, size):
            if flags & CMD_FLAG_DF and not structured:
                continue
            try:
                rep = c.call(cmd, off, 0, flags=flags, timeout=T(5))
            except Closed:
                bed.alive()
                raise AssertionError("cmd %d flags 0x%x offset %d length 0: connection "
                                     "dropped" % (cmd, flags, off))
            bed.alive()
            assert rep.data == b""
        still_works(c, minor)
    bed.check()


# ---------------------------------------------------------------------------
# flow control, stalls and disconnects
# ---------------------------------------------------------------------------

def _pipeline(c, cmd, n, length, offset_of=lambda i: 0, flags=0):
    """Builds n requests as one buffer (bookkept in c.pending)."""
    out = bytearray()
    cookies = []
    for i in range(n):
        ck = c.new_cookie()
        c.pending[ck] = (cmd, length, offset_of(i))
        payload = bytes([i & 0xFF]) * length if cmd == CMD_WRITE else b""
        out += build_request(cmd, offset_of(i), length, ck, flags, payload)
        cookies.append(ck)
    return bytes(out), cookies


class Sender(threading.Thread):
    """Sends a buffer in the background, as fast as the server takes it."""

    def __init__(self, c, data):
        super().__init__(daemon=True)
        self.c, self.data, self.error, self.sent = c, data, None, 0
        self.halt = threading.Event()
        self.start()

    def run(self):
        try:
            while self.sent < len(self.data) and not self.halt.is_set():
                self.sent += self.c.send_nonblocking(self.data[self.sent:],
                                                     time.monotonic() + 0.1)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(T(10))
        assert not self.is_alive()


def test_inflight_limit_is_128(bed):
    """With the vbd paused, a client pipelining 1000 reads gets exactly 128
    of them taken in; the rest wait in the socket. Unpaused, all are answered."""
    src = os.urandom(1 * MiB)
    w = bed.ready()
    w.pwrite(src, 0)
    bed.server.call("pause", minor=0)
    c = bed.ready(timeout=T(30))
    data, cookies = _pipeline(c, CMD_READ, 1000, 4096, lambda i: (i * 4096) % MiB)
    s = Sender(c, data)
    assert poll(lambda: bed.server.stats(0)["reqs_queued"] >= 128, 5)
    time.sleep(0.5)
    assert bed.server.stats(0)["reqs_queued"] == 128
    # the other vbd is served meanwhile
    bed.healthy([1])
    bed.server.call("unpause", minor=0)
    got = {}
    for _ in range(1000):
        rep = c.read_reply(timeout=T(30))
        assert rep.error == 0
        got[rep.cookie] = rep.data
    s.join(T(10))
    assert not s.is_alive() and s.error is None
    for i, ck in enumerate(cookies):
        off = (i * 4096) % MiB
        assert got[ck] == src[off:off + 4096]
    still_works(c)
    bed.check()


def test_unread_replies_do_not_grow_without_bound(bed):
    """A client pipelines 1000 x 1 MiB reads and never reads a reply: the
    server stops taking requests (128 in flight, output limit), its memory
    stays bounded, and a second client is served promptly meanwhile."""
    base = bed.rss_mib()
    c = bed.ready(timeout=T(60))
    c.pwrite(b"\x77" * 4096, 0)
    data, cookies = _pipeline(c, CMD_READ, 1000, 1 * MiB, lambda i: (i % 60) * MiB)
    s = Sender(c, data)
    time.sleep(T(2))
    grown = bed.rss_mib() - base
    # 128 reads in flight (1 MiB each) + 32 MiB of output + slack; unbounded
    # would be 1000 MiB
    assert grown < 128 + 32 + 96, "server grew by %.0f MiB for one stalled client" % grown
    # other clients, on the same vbd and on another, are served at once
    for minor in (0, 1):
        h = bed.libnbd(minor)
        t = time.monotonic()
        h.pwrite(b"\x66" * 65536, 2 * MiB)
        assert h.pread(65536, 2 * MiB) == b"\x66" * 65536
        lat = time.monotonic() - t
        h.shutdown()
        assert lat < T(1), "second client waited %.2f s behind a stalled one" % lat
    c2 = bed.ready(1)
    t = time.monotonic()
    assert len(c2.pread(1 * MiB, 0)) == 1 * MiB
    assert time.monotonic() - t < T(1)
    grown2 = bed.rss_mib() - base
    assert grown2 < 128 + 32 + 96 + 16, grown2
    # the stalled client finally reads: every reply is there, in one piece
    seen = set()
    for _ in range(1000):
        rep = c.read_reply(timeout=T(30))
        assert rep.error == 0 and len(rep.data) == 1 * MiB
        seen.add(rep.cookie)
    assert seen == set(cookies)
    s.join(T(10))
    assert s.error is None
    c.disconnect()
    c.expect_closed()
    bed.check()


OUTPUT_LIMIT = 32 * MiB     # the server's limit on unsent replies per connection


@pytest.mark.parametrize("opt", ["info", "list-meta", "unknown"])
def test_unread_handshake_replies_do_not_grow_without_bound(bed, opt):
    """During the handshake, a client that sends options without reading
    their replies must not make the server buffer replies without bound:
    once OUTPUT_LIMIT of replies are unsent, it must stop reading options.

    Memory (RSS) is too noisy a measure under ASan, so this counts what the
    server accepted: a server that stops at the limit cannot have taken more
    options than it takes to produce OUTPUT_LIMIT of replies (plus socket
    buffers and one read's worth of slack)."""
    if opt == "info":
        code = OPT_INFO
        one = build_option(code, build_go_payload("", [INFO_NAME, INFO_DESCRIPTION]))
    elif opt == "list-meta":
        code = OPT_LIST_META_CONTEXT
        one = build_option(code, build_meta_payload("", []))
    else:
        code = 1000
        one = build_option(code)
    c = bed.raw(1).start()
    c.send(one)
    per_option = sum(20 + len(r.data) for r in c.option_replies(code))
    allowed = (OUTPUT_LIMIT // per_option + 1) * len(one) + 8 * MiB
    base = bed.rss_mib()
    blob = one * (1 * MiB // len(one))
    sent = 0
    deadline = time.monotonic() + T(2)
    while time.monotonic() < deadline and sent <= allowed:
        sent += c.send_nonblocking(blob, min(deadline, time.monotonic() + 0.2))
    time.sleep(0.2)
    grown = bed.rss_mib() - base
    bed.healthy()
    assert sent <= allowed, (
        "%s: the server took %.0f MiB of options (each answered with %d bytes) without "
        "the client reading a reply, i.e. ~%.0f MiB of unsent replies; it should have "
        "stopped near %.0f MiB of options. Its RSS grew by %.0f MiB." % (
            opt, sent / MiB, per_option, sent / len(one) * per_option / MiB,
            allowed / MiB, grown))
    c.close()
    bed.check()


def test_disconnect_with_requests_in_flight(bed):
    # queued behind a pause: 128 taken in, the client gone before any completes
    bed.server.call("pause", minor=0)
    for k in range(3):
        c = bed.ready()
        data, _ = _pipeline(c, CMD_READ, 200, 64 * KiB, lambda i: i * 64 * KiB)
        wdata, _ = _pipeline(c, CMD_WRITE, 20, 4096, lambda i: i * 4096)
        s = Sender(c, data + wdata)
        assert poll(lambda: bed.server.stats(0)["reqs_queued"] >= 128 * (k + 1), 5)
        s.stop()
        c.abort() if k % 2 else c.close()
    assert bed.connections() == 3   # kept until their requests come back
    bed.server.call("unpause", minor=0)
    assert poll(lambda: bed.connections() == 0, 5), bed.describe()
    # real I/O in flight on the raw image, cut at random points
    rng = random.Random(5)
    for k in range(20):
        c = bed.ready(1, structured=bool(k % 2))
        data, _ = _pipeline(c, rng.choice([CMD_READ, CMD_WRITE]), 64, 128 * KiB,
                            lambda i: (i * 128 * KiB) % (AIO_SIZE - HEALTH_AREA))
        c.try_send(data[:rng.randrange(len(data))])
        time.sleep(rng.random() * 0.01)
        c.abort() if k % 3 == 0 else c.close()
    bed.check()


def test_disc_answers_in_flight_then_closes(bed):
    src = os.urandom(256 * KiB)
    bed.ready().pwrite(src, 0)
    bed.server.call("pause", minor=0)
    c = bed.ready(structured=True)
    data, cookies = _pipeline(c, CMD_READ, 50, 4096, lambda i: i * 4096)
    # DISC, then junk the server must ignore
    c.send(data + build_request(CMD_DISC, cookie=999) + b"\xff" * 1000)
    assert poll(lambda: bed.server.stats(0)["reqs_queued"] == 50, 5)
    bed.server.call("unpause", minor=0)
    for _ in range(50):
        rep = c.read_reply()
        i = cookies.index(rep.cookie)
        assert rep.error == 0 and rep.data == src[i * 4096:(i + 1) * 4096]
    assert c.expect_closed() == b""
    # writes before a DISC are all acknowledged, and stick
    c = bed.ready(1)
    wdata, wcookies = _pipeline(c, CMD_WRITE, 32, 4096, lambda i: i * 4096)
    c.send(wdata + build_request(CMD_DISC))
    acks = [c.read_reply() for _ in range(32)]
    assert all(r.error == 0 for r in acks)
    c.expect_closed()
    h = bed.libnbd(1)
    for i in range(32):
        assert h.pread(4096, i * 4096) == bytes([i]) * 4096
    h.shutdown()
    bed.check()


@pytest.mark.parametrize("where", ["greeting", "client-flags", "option-header",
                                   "option-data", "request-header", "write-payload",
                                   "write-payload-rst", "rejected-write-payload"])
def test_truncated_message_then_disconnect(bed, where):
    marker = os.urandom(1 * MiB)
    h = bed.libnbd(0)
    h.pwrite(marker, 4 * MiB)
    for _ in range(5):
        c = bed.raw()
        if where == "greeting":
            c.close()
            continue
        c.read_greeting()
        if where == "client-flags":
            c.send(b"\0\0")
        elif where == "option-header":
            c.send_client_flags()
            c.send(build_option(OPT_GO, build_go_payload(""))[:10])
        elif where == "option-data":
            c.send_client_flags()
            c.send(build_option(OPT_GO, build_go_payload("0", [INFO_NAME]))[:23])
        else:
            c.send_client_flags()
            c.opt_go("")
            if where == "request-header":
                c.send(build_request(CMD_READ, 0, 4096)[:17])
            elif where.startswith("write-payload"):
                c.send(build_request(CMD_WRITE, 4 * MiB, 1 * MiB) + b"\x11" * (MiB - 1))
            else:   # past the end: rejected, its payload being discarded
                c.send(build_request(CMD_WRITE, RAM_SIZE, 1 * MiB) + b"\x11" * (MiB // 2))
        time.sleep(0.05)
        c.abort() if where.endswith("rst") else c.close()
    assert poll(lambda: bed.connections() == 1, 5), bed.describe()
    # no partial write landed
    assert h.pread(1 * MiB, 4 * MiB) == marker
    h.shutdown()
    bed.check()


def test_slow_reader_byte_by_byte(bed):
    src = os.urandom(256 * KiB)
    bed.ready().pwrite(src, 0)
    results = {}

    def other():
        worst = 0.0
        h = bed.libnbd(0)
        h2 = bed.libnbd(1)
        try:
            for i in range(40):
                t = time.monotonic()
                d = os.urandom(8192)
                h.pwrite(d, 8 * MiB + i * 8192)
                assert h.pread(8192, 8 * MiB + i * 8192) == d
                assert len(h2.pread(65536, 0)) == 65536
                worst = max(worst, time.monotonic() - t)
                time.sleep(0.01)
            results["worst"] = worst
        except Exception as e:  # noqa: BLE001
            results["error"] = e
        finally:
            h.shutdown()
            h2.shutdown()

    for structured in (False, True):
        c = bed.ready(structured=structured, timeout=T(30))
        data, cookies = _pipeline(c, CMD_READ, 64, 4096, lambda i: i * 4096)
        c.send(data)
        th = threading.Thread(target=other)
        th.start()
        hdr = 20 if structured else 16
        extra = 8 if structured else 0
        per = hdr + extra + 4096
        raw = c.recv_byte_by_byte(64 * per, delay=0)
        th.join(T(30))
        assert "error" not in results, results
        assert results["worst"] < T(1), results
        # parse the byte-by-byte stream with the normal reader
        c.rbuf[:0] = raw
        for _ in range(64):
            rep = c.read_reply()
            i = cookies.index(rep.cookie)
            assert rep.error == 0 and rep.data == src[i * 4096:(i + 1) * 4096]
        still_works(c)
    bed.check()


def test_conversation_one_byte_at_a_time(bed):
    """Every message of a whole conversation arrives split at every byte
    boundary, while other clients are served."""
    c = bed.raw(timeout=T(20))
    c.read_greeting()
    src = os.urandom(8192)

    def dribble(data, pause=0.0002):
        for i in range(len(data)):
            c.send(data[i:i + 1])
            if pause:
                time.sleep(pause)

    dribble(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
    dribble(build_option(OPT_STRUCTURED_REPLY))
    assert [r.type for r in c.option_replies(OPT_STRUCTURED_REPLY)] == [REP_ACK]
    c.structured = True
    dribble(build_option(OPT_SET_META_CONTEXT, build_meta_payload("", [META])))
    assert [r.type for r in c.option_replies(OPT_SET_META_CONTEXT)][-1] == REP_ACK
    dribble(build_option(OPT_LIST))
    assert c.option_replies(OPT_LIST)[-1].type == REP_ACK
    bed.healthy([1])
    dribble(build_option(OPT_GO, build_go_payload("", [INFO_NAME])))
    assert c.option_replies(OPT_GO)[-1].type == REP_ACK
    ck = c.new_cookie()
    c.pending[ck] = (CMD_WRITE, len(src), 4096)
    dribble(build_request(CMD_WRITE, 4096, len(src), ck, CMD_FLAG_FUA, src), pause=0)
    assert c.read_reply().error == 0
    for cmd, length in ((CMD_READ, len(src)), (CMD_BLOCK_STATUS, 65536), (CMD_FLUSH, 0)):
        ck = c.new_cookie()
        c.pending[ck] = (cmd, length, 0 if cmd == CMD_FLUSH else 4096)
        dribble(build_request(cmd, 0 if cmd == CMD_FLUSH else 4096, length, ck))
        rep = c.read_reply()
        assert rep.error == 0
        if cmd == CMD_READ:
            assert rep.data == src
    bed.healthy([1])
    dribble(build_request(CMD_DISC))
    assert c.expect_closed() == b""
    bed.check()


def test_duplicate_and_reused_cookies(bed):
    """Cookies are the client's business: duplicates are answered one by one."""
    c = bed.ready()
    c.pwrite(b"\x42" * 512, 0)
    n = 40
    c.send(b"".join(build_request(CMD_READ, 0, 512, cookie=7) for _ in range(n)))
    for _ in range(n):
        magic, err, cookie = struct.unpack(">IIQ", c.recv_exact(16))
        assert (magic, err, cookie) == (SIMPLE_REPLY_MAGIC, 0, 7)
        assert c.recv_exact(512) == b"\x42" * 512
    # a cookie of all ones, and zero
    for ck in (0, 2 ** 64 - 1):
        c.send(build_request(CMD_FLUSH, cookie=ck))
        assert struct.unpack(">IIQ", c.recv_exact(16)) == (SIMPLE_REPLY_MAGIC, 0, ck)
    still_works(c)
    bed.check()


def test_many_simultaneous_connections(bed):
    n = 200
    conns = []
    for i in range(n):
        conns.append(bed.raw(i % 2))
    for c in conns:
        c.read_greeting()
    assert poll(lambda: bed.frontends(0) == n // 2 and bed.frontends(1) == n // 2, 5), \
        bed.describe()
    assert bed.connections() == n
    rng = random.Random(200)
    for i, c in enumerate(conns):
        kind = i % 5
        if kind == 0:
            c.send_client_flags()
            c.opt_go("")
        elif kind == 1:
            c.send_client_flags()
            c.send(build_option(OPT_LIST)[:9])
        elif kind == 2:
            c.try_send(rng.randbytes(64))
        elif kind == 3:
            c.abort()
    bed.healthy()
    for i, c in enumerate(conns):
        if i % 5 == 0:
            still_works(c, i % 2)
    for c in conns:
        c.close()
    assert poll(lambda: bed.connections() == 0, 5), bed.describe()

    # churn: threads opening and closing connections in every state, while a
    # well-behaved client keeps doing I/O
    stop = threading.Event()
    errors = []

    def churn(seed):
        r = random.Random(seed)
        try:
            for k in range(60):
                minor = r.choice([0, 1, 2])
                c = NBDRaw(bed.path(minor), timeout=T(10))
                try:
                    what = r.randrange(6)
                    if what == 0:
                        pass
                    elif what == 1:
                        c.read_greeting()
                    elif what == 2:
                        c.handshake()
                    elif what == 3:
                        c.handshake(structured=True)
                        c.send_request(CMD_READ, 0, 65536)
                    elif what == 4:
                        c.read_greeting()
                        c.try_send(r.randbytes(r.randrange(1, 200)))
                    else:
                        c.handshake()
                        c.pread(4096, 0)
                        c.disconnect()
                finally:
                    if r.random() < 0.3:
                        c.abort()
                    else:
                        c.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def steady():
        h = bed.libnbd(0)
        try:
            i = 0
            while not stop.is_set():
                d = os.urandom(4096)
                h.pwrite(d, 16 * MiB + (i % 256) * 4096)
                assert h.pread(4096, 16 * MiB + (i % 256) * 4096) == d
                i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            h.shutdown()

    st = threading.Thread(target=steady)
    st.start()
    threads = [threading.Thread(target=churn, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T(60))
    stop.set()
    st.join(T(10))
    assert not errors, errors
    bed.check()


def test_connection_limit(bed):
    """At the server's connection limit (4096) a further client is hung up on
    at once, without a greeting; closing some lets clients in again."""
    limit = 4096
    conns = []
    try:
        for i in range(limit):
            conns.append(NBDRaw(bed.path(i % 2), timeout=T(10)))
        for c in conns:
            c.read_greeting()
        assert bed.connections() == limit
        extra = NBDRaw(bed.path(0), timeout=T(10))
        assert extra.expect_closed() == b"", "a connection past the limit was served"
        extra.close()
        bed.alive()
        for c in conns[:16]:
            c.close()
        assert poll(lambda: bed.connections() == limit - 16, 5), bed.describe()
        c = bed.ready(0)
        still_works(c)
        c.close()
    finally:
        for c in conns:
            c.close()
    bed.check()


def test_interleaved_clients_one_and_two_vbds(bed):
    """Eight raw clients on each of two vbds, simple and structured,
    pipelining into their own regions and reading each other's, while
    hostile connections come and go on the same sockets."""
    errors = []
    stop = threading.Event()
    region = 256 * KiB
    written = {}
    lock = threading.Lock()

    def worker(minor, idx):
        r = random.Random(minor * 100 + idx)
        try:
            c = NBDRaw(bed.path(minor), timeout=T(20))
            c.handshake(structured=bool(idx % 2), meta=[META] if idx % 2 else ())
            base = idx * region
            for rnd in range(12):
                blobs = [os.urandom(r.randrange(1, 16 * KiB)) for _ in range(6)]
                offs = [base + k * (region // 6) for k in range(6)]
                out = b""
                for d, o in zip(blobs, offs):
                    ck = c.new_cookie()
                    c.pending[ck] = (CMD_WRITE, len(d), o)
                    out += build_request(CMD_WRITE, o, len(d), ck, 0, d)
                c.send(out)
                for _ in blobs:
                    assert c.read_reply().error == 0
                for d, o in zip(blobs, offs):
                    assert c.pread(len(d), o) == d
                with lock:
                    written[(minor, idx)] = (offs[0], blobs[0])
                if idx % 2 and rnd % 4 == 0:
                    assert c.call(CMD_BLOCK_STATUS, base, region).error == 0
                if rnd % 5 == 0:
                    assert c.call(CMD_FLUSH).error == 0
            c.disconnect()
            c.closed(T(5))
            c.close()
        except Exception as e:  # noqa: BLE001
            errors.append(("worker", minor, idx, repr(e)))

    def noise(seed):
        r = random.Random(seed)
        while not stop.is_set():
            c = NBDRaw(bed.path(r.choice([0, 1])), timeout=T(5))
            try:
                c.read_greeting()
                if r.random() < 0.5:
                    c.send_client_flags()
                    c.opt_go("")
                c.try_send(r.randbytes(r.randrange(1, 300)))
            except (Closed, OSError):
                pass
            finally:
                c.close()

    noisy = [threading.Thread(target=noise, args=(s,)) for s in range(2)]
    workers = [threading.Thread(target=worker, args=(m, i)) for m in (0, 1) for i in range(8)]
    for t in noisy + workers:
        t.start()
    for t in workers:
        t.join(T(60))
    stop.set()
    for t in noisy:
        t.join(T(10))
    assert not errors, errors
    # what each client last wrote is visible through a fresh one
    for minor in (0, 1):
        h = bed.libnbd(minor)
        for idx in range(8):
            off, d = written[(minor, idx)]
            assert h.pread(len(d), off) == d
        h.shutdown()
    bed.check()


def test_vbd_destroyed_under_hostile_clients(bed):
    """Destroying a vbd with stalled, half-handshaked and pipelining clients
    finishes promptly and leaves the other vbds untouched."""
    stalled = bed.ready(0, timeout=T(30))
    data, cookies = _pipeline(stalled, CMD_READ, 300, 1 * MiB, lambda i: (i % 60) * MiB)
    s = Sender(stalled, data)
    half = bed.raw(0).start()
    half.send(build_option(OPT_GO)[:10])
    idle = bed.ready(0)
    time.sleep(0.3)
    fds = bed.fd_count()
    t = time.monotonic()
    bed.server.call("destroy", minor=0)
    assert time.monotonic() - t < T(5)
    bed.healthy([1, 2, 3])
    # the half-handshaked and idle clients are hung up on
    assert half.closed(T(5)) and idle.closed(T(5))
    # the stalled one gets what was already answered, then EOF
    n = 0
    try:
        while True:
            rep = stalled.read_reply(timeout=T(10))
            n += rep.error == 0
    except Closed:
        pass
    assert n <= 300
    s.stop()
    stalled.close()
    bed.close_raws()
    assert fds >= bed.base_fds + 3
    bed.forget_ram_vbd(0)
    bed.check()


def test_paused_vbd_destroyed_with_queued_requests(bed):
    """Requests queued behind a pause when the vbd is destroyed are failed
    with ESHUTDOWN, the connection then closes, and the rest goes on."""
    bed.server.call("pause", minor=0)
    c = bed.ready(0, structured=True, timeout=T(20))
    data, cookies = _pipeline(c, CMD_READ, 300, 4096, lambda i: i * 4096)
    s = Sender(c, data)
    w = bed.ready(0)
    wdata, _ = _pipeline(w, CMD_WRITE, 20, 65536, lambda i: i * 65536)
    w.send(wdata)
    assert poll(lambda: bed.server.stats(0)["reqs_queued"] == 128 + 20, 5), bed.describe()
    half = bed.raw(0).start()
    bed.server.call("destroy", minor=0)
    errs = []
    try:
        while True:
            errs.append(c.read_reply(timeout=T(10)).error)
    except Closed:
        pass
    assert errs == [ESHUTDOWN] * 128, errs[:5]
    werrs = []
    try:
        while True:
            werrs.append(w.read_reply(timeout=T(10)).error)
    except Closed:
        pass
    assert werrs == [ESHUTDOWN] * 20
    assert half.closed(T(5))
    s.stop()
    bed.healthy([1, 2, 3])
    bed.close_raws()
    bed.forget_ram_vbd(0)
    bed.check()


def test_whole_device_commands(bed):
    """Maximum-range TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS on every
    writable vbd, with every flag they accept."""
    for minor in (0, 1):
        size = bed.sizes[minor]
        c = bed.ready(minor, structured=True, meta=[META])
        c.pwrite(b"\x99" * 65536, 0)
        for k in range(0, size, 2 * MiB):
            c.pwrite(b"\x01" * 4096, k)
        rep = c.call(CMD_BLOCK_STATUS, 0, size)
        assert rep.error == 0
        ext = rep.extents[1]
        assert 0 < len(ext) <= 1024 and 0 < sum(n for n, _ in ext) <= size
        rep = c.call(CMD_BLOCK_STATUS, 0, size, flags=CMD_FLAG_REQ_ONE)
        assert rep.error == 0 and len(rep.extents[1]) == 1
        assert c.call(CMD_CACHE, 0, size).error == 0
        assert c.call(CMD_TRIM, 0, size, flags=CMD_FLAG_FUA).error == 0
        assert c.call(CMD_WRITE_ZEROES, 0, size).error == 0
        flags = CMD_FLAG_NO_HOLE | CMD_FLAG_FUA
        assert c.call(CMD_WRITE_ZEROES, 0, size - 1, flags=flags).error == 0
        rep = c.call(CMD_WRITE_ZEROES, 1, size - 1, flags=CMD_FLAG_FAST_ZERO)
        assert rep.error in (0, ENOTSUP), rep
        assert c.pread(65536, 0) == bytes(65536)
        assert c.pread(4096, 2 * MiB) == bytes(4096)
        still_works(c, minor)
    bed.check()


# ---------------------------------------------------------------------------
# the global listener (exports named by minor)
# ---------------------------------------------------------------------------

def test_global_listener_hostile(gbed):
    b = gbed
    c = b.raw(None).start()
    assert sorted(n for n, _ in c.opt_list()) == ["0", "1", "2", "3"]
    for name in ("", "9", "4", "-1", "abc", "1x", "99999999999999999999", "0" * 5000):
        r = c.option(OPT_GO, build_go_payload(name))
        want = REP_ERR_TOO_BIG if len(name) > 4096 else REP_ERR_UNKNOWN
        assert [x.type for x in r] == [want], name[:20]
    for payload, want in GO_MALFORMED:
        assert c.option_final(OPT_INFO, payload) == want
    # a handshake in progress is nobody's frontend yet
    assert all(b.frontends(m) == 0 for m in range(4))
    c.opt_go("1")
    assert b.frontends(1) == 1
    still_works(c, 1)
    # EXPORT_NAME of a missing export: disconnect
    for name in (b"", b"7", b"x"):
        e = b.raw(None).start()
        e.send_option(OPT_EXPORT_NAME, name)
        assert e.expect_closed() == b""
    e = b.raw(None).start()
    assert e.opt_export_name("3").size == RO_SIZE
    still_works(e, 3, b)
    # contexts chosen for one export do not carry over to another
    m = b.raw(None).start()
    m.opt_structured_reply()
    assert m.opt_meta(True, "0", [META]) == {META: 1}
    m.opt_go("1")
    expect_error(m, CMD_BLOCK_STATUS, EINVAL, 0, 4096)
    m = b.raw(None).start()
    m.opt_structured_reply()
    assert m.opt_meta(True, "1", [META]) == {META: 1}
    m.opt_go("1")
    assert m.call(CMD_BLOCK_STATUS, 0, 4096).error == 0
    # garbage on the global socket
    for i in range(10):
        g = b.raw(None)
        g.read_greeting()
        g.try_send(b"\x00\x00\x00\x03" + random.Random(i).randbytes(500))
        assert g.closed(T(5))
    b.check()


def test_global_listener_options_pipelined_after_list(gbed):
    """LIST on the global socket gathers from every loop while the options
    sent behind it wait: their replies come after LIST's, in order; and a
    connection cut while a LIST gathers (a bad option magic behind it) goes
    cleanly (the fuzzer found a use-after-free there)."""
    b = gbed
    want = ["0", "1", "2", "3"]
    c = b.raw(None).start()
    c.send(build_option(OPT_LIST) + build_option(OPT_LIST) +
           build_option(OPT_STRUCTURED_REPLY) + build_option(OPT_LIST))
    for opt in (OPT_LIST, OPT_LIST, OPT_STRUCTURED_REPLY, OPT_LIST):
        r = c.option_replies(opt)
        assert r[-1].type == REP_ACK
        if opt == OPT_LIST:
            assert sorted(x.data[4:5].decode() for x in r[:-1]) == want
    c.structured = True
    c.opt_go("1")
    still_works(c, 1)
    for i in range(20):
        g = b.raw(None).start()
        g.try_send((build_option(OPT_LIST) * (i % 3 + 1)) +
                   build_option(OPT_LIST, magic=0x1234))
        assert g.closed(T(5))
    b.check()


def test_unread_large_reads_are_bounded_by_bytes(bed):
    """Large reads count by bytes, not just by number: 40 x 32 MiB reads
    never read would hold 1.25 GiB; the server takes in only what fits its
    per-connection budget (in-flight buffers + unsent replies = 32 MiB,
    plus the one request that crosses it)."""
    base = bed.rss_mib()
    c = bed.ready(timeout=T(60))
    data, cookies = _pipeline(c, CMD_READ, 40, 32 * MiB, lambda i: 0)
    s = Sender(c, data)
    time.sleep(T(2))
    grown = bed.rss_mib() - base
    assert grown < 64 + 32 + 64, "server grew by %.0f MiB for one stalled client" % grown
    h = bed.libnbd(1)
    assert len(h.pread(65536, 0)) == 65536
    h.shutdown()
    seen = set()
    for _ in range(40):
        rep = c.read_reply(timeout=T(60))
        assert rep.error == 0 and len(rep.data) == 32 * MiB
        seen.add(rep.cookie)
    assert seen == set(cookies)
    s.join(T(10))
    assert s.error is None
    c.disconnect()
    c.expect_closed()
    bed.check()


# ---------------------------------------------------------------------------
# large write payloads: received straight into the request's buffer
# ---------------------------------------------------------------------------

def _send_in_pieces(c, data, rng):
    """Sends data in uneven pieces (a byte to 200 KiB), pausing now and then."""
    i = 0
    while i < len(data):
        n = rng.choice([1, 7, 4096, 65535, 65537, 200 * KiB, rng.randrange(1, 300000)])
        c.send(data[i:i + n])
        i += n
        if rng.random() < 0.2:
            time.sleep(0.002)


@pytest.mark.parametrize("minor", [0, 1])
def test_large_write_payloads_in_pieces(bed, minor):
    """Write payloads around and above the in-place threshold (64 KiB),
    split at random points, header and payload boundaries shared between
    pieces, interleaved with reads of another area: every reply right,
    every byte where it belongs."""
    rng = random.Random(11 + minor)
    c = bed.ready(minor, structured=bool(minor))
    h = bed.libnbd(minor)
    known = os.urandom(2 * MiB)     # what the reads see: overlapping a write
    h.pwrite(known, 8 * MiB)        # in flight would be undefined in NBD
    sizes = [MiB, 64 * KiB, 64 * KiB - 1, 300001, 4096, 2 * MiB, 64 * KiB + 1, 1]
    out, writes, reads, off = bytearray(), {}, {}, 0
    for i, n in enumerate(sizes):
        data = os.urandom(n)
        ck = c.new_cookie()
        c.pending[ck] = (CMD_WRITE, n, off)
        out += build_request(CMD_WRITE, off, n, ck, payload=data)
        writes[off] = data
        rk = c.new_cookie()
        rlen, roff = min(n, MiB), 8 * MiB + i * 4097
        c.pending[rk] = (CMD_READ, rlen, roff)
        out += build_request(CMD_READ, roff, rlen, rk)
        reads[rk] = known[roff - 8 * MiB:roff - 8 * MiB + rlen]
        off += n + 513
    assert off < 8 * MiB
    _send_in_pieces(c, bytes(out), rng)
    for _ in range(2 * len(sizes)):
        rep = c.read_reply(timeout=T(20))
        assert rep.error == 0, rep
        if rep.cookie in reads:
            assert rep.data == reads[rep.cookie]
    for o, data in writes.items():
        assert h.pread(len(data), o) == data
    h.shutdown()
    still_works(c, minor, bed)
    c.close()


@pytest.mark.parametrize("action", ["pause", "close-force", "destroy"])
def test_vbd_changes_state_mid_payload(bed, action):
    """Half of a 1 MiB write payload has arrived when the vbd is paused,
    force-closed or destroyed: a pause lets it finish and queue; the others
    hang up on the client at once, and nothing leaks."""
    c = bed.ready(0, timeout=T(20))
    data = os.urandom(MiB)
    ck = c.new_cookie()
    c.pending[ck] = (CMD_WRITE, MiB, 8 * MiB)
    req = build_request(CMD_WRITE, 8 * MiB, MiB, ck, payload=data)
    c.send(req[:len(req) // 2])
    time.sleep(0.2)
    if action == "pause":
        bed.server.call("pause", minor=0)
        c.send(req[len(req) // 2:])
        assert poll(lambda: bed.server.stats(0)["reqs_queued"] == 1, 5)
        bed.server.call("unpause", minor=0)
        assert c.read_reply(timeout=T(10)).error == 0
        h = bed.libnbd(0)
        assert h.pread(MiB, 8 * MiB) == data
        h.shutdown()
        c.close()
        bed.check()
        return
    if action == "destroy":
        bed.server.call("destroy", minor=0)
    else:
        assert bed.server.tapctl("close", "-f", "-m", "0").returncode == 0
    assert c.closed(T(5))
    c.close()
    bed.close_raws()
    if action == "destroy":
        bed.forget_ram_vbd(0)
    else:
        assert bed.server.open("ram:64M", minor=0)["minor"] == 0
    bed.check()


def test_stalled_large_write_payloads_cost_only_what_arrived(bed):
    """40 clients each announce a 32 MiB write, send 64 KiB of it and stall.
    The payload buffers are taken at the header but only what arrives is
    touched: the server's memory grows by about what was sent, not by
    1.25 GiB; the others are served meanwhile; hanging up frees it all."""
    base = bed.rss_mib()
    stalled = []
    for i in range(40):
        c = bed.ready(0, timeout=T(30))
        ck = c.new_cookie()
        c.pending[ck] = (CMD_WRITE, 32 * MiB, 0)
        c.send(build_request(CMD_WRITE, 0, 32 * MiB, ck) + b"\x33" * (64 * KiB))
        stalled.append(c)
    time.sleep(0.3)
    grown = bed.rss_mib() - base
    assert grown < 64, "server grew by %.0f MiB for 40 x 64 KiB of payload" % grown
    bed.healthy()
    for i, c in enumerate(stalled):
        c.abort() if i % 2 else c.close()
    assert poll(lambda: bed.connections() == 0, 5), bed.describe()
    bed.check()
