"""A small raw-socket NBD client for poking a server with well-formed and
deliberately malformed traffic.

Written from the NBD protocol document (fixed newstyle negotiation, simple
and structured replies). Every helper is built on three primitives, send(),
recv_exact() and closed(), so a test can stop at any point of a
conversation and send whatever bytes it likes instead.

Nothing here validates what the *client* sends: that is the point. What the
*server* sends is checked strictly (magics, lengths, option echoes), and any
deviation raises ServerProtocolError, so a test that reads a reply also
checks the reply's framing.
"""

import select
import socket
import struct
import time

# ---- wire constants ----

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# errors on the wire
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

REQUEST_LEN = 28


def rep_name(t):
    return REP_NAMES.get(t, "0x%08x" % t)


# ---- message builders (pure; usable to craft malformed bytes) ----

def build_option(opt, data=b"", magic=IHAVEOPT, length=None):
    """An option header and its payload; length overrides the length field."""
    if length is None:
        length = len(data)
    return struct.pack(">QII", magic, opt, length) + data


def build_name(name):
    if isinstance(name, str):
        name = name.encode()
    return struct.pack(">I", len(name)) + name


def build_go_payload(name="", info_reqs=()):
    return build_name(name) + struct.pack(">H", len(info_reqs)) + b"".join(
        struct.pack(">H", r) for r in info_reqs)


def build_meta_payload(name="", queries=()):
    return build_name(name) + struct.pack(">I", len(queries)) + b"".join(
        build_name(q) for q in queries)


def build_request(cmd, offset=0, length=0, cookie=0, flags=0, payload=b"",
                  magic=REQUEST_MAGIC):
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


# ---- errors ----

class ServerProtocolError(Exception):
    """The server sent something that is not valid NBD."""


class Closed(EOFError):
    """The server closed the connection."""


class OptionError(Exception):
    def __init__(self, opt, rtype, data=b""):
        super().__init__("option %d answered %s %r" % (opt, rep_name(rtype), data[:64]))
        self.opt = opt
        self.rtype = rtype
        self.data = data


# ---- replies ----

class OptionReply:
    def __init__(self, opt, rtype, data):
        self.opt = opt
        self.type = rtype
        self.data = data

    @property
    def is_error(self):
        return bool(self.type & REP_FLAG_ERROR)

    def __repr__(self):
        return "OptionReply(opt=%d, %s, %r)" % (self.opt, rep_name(self.type), self.data[:64])


class SimpleReply:
    structured = False

    def __init__(self, cookie, error, data=b""):
        self.cookie = cookie
        self.error = error
        self.data = data

    def __repr__(self):
        return "SimpleReply(cookie=%d, error=%d, %d bytes)" % (self.cookie, self.error,
                                                                len(self.data))


class Chunk:
    structured = True

    def __init__(self, cookie, flags, rtype, payload):
        self.cookie = cookie
        self.flags = flags
        self.type = rtype
        self.payload = payload

    @property
    def done(self):
        return bool(self.flags & REPLY_FLAG_DONE)

    @property
    def is_error(self):
        return bool(self.type & (1 << 15))

    @property
    def error(self):
        """(errno, message) of an error chunk."""
        if len(self.payload) < 6:
            raise ServerProtocolError("error chunk of %d bytes" % len(self.payload))
        err, mlen = struct.unpack(">IH", self.payload[:6])
        if 6 + mlen > len(self.payload):
            raise ServerProtocolError("error chunk message overruns the chunk")
        return err, self.payload[6:6 + mlen]

    def __repr__(self):
        return "Chunk(cookie=%d, flags=%d, type=0x%x, %d bytes)" % (
            self.cookie, self.flags, self.type, len(self.payload))


class Reply:
    """Everything the server sent for one request."""

    def __init__(self, cookie, error=0, data=b"", chunks=(), extents=None):
        self.cookie = cookie
        self.error = error
        self.data = data
        self.chunks = list(chunks)
        self.extents = extents

    def __repr__(self):
        return "Reply(cookie=%d, error=%d, %d bytes, %d chunks)" % (
            self.cookie, self.error, len(self.data), len(self.chunks))


class Export:
    def __init__(self):
        self.size = None
        self.flags = None
        self.name = None
        self.description = None
        self.block_size = None
        self.infos = []


# ---- the client ----

class NBDRaw:
    """One connection. path: a UNIX socket; addr: a (host, port) tuple."""

    def __init__(self, path=None, addr=None, timeout=10.0, connect=True):
        self.path = path
        self.addr = addr
        self.timeout = timeout
        self.sock = None
        self.rbuf = bytearray()
        self.structured = False
        self.no_zeroes = False
        self.export = None
        self.pending = {}           # cookie -> (cmd, length, offset)
        self.next_cookie = 1
        self.server_flags = None
        if connect:
            self.connect()

    # -- socket primitives --

    def connect(self):
        if self.path is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = self.path
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = self.addr
        s.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    s.connect(target)
                    break
                except BlockingIOError:
                    # a UNIX listener's backlog is full: wait for accept()
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.002)
        except BaseException:
            s.close()
            raise
        self.sock = s
        return self

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def abort(self):
        """Hangs up with a RST-like close: unread data is dropped."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close()

    def shutdown_write(self):
        self.sock.shutdown(socket.SHUT_WR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _wait(self, events, timeout):
        """poll() (not select(): there may be thousands of fds) for events."""
        p = select.poll()
        p.register(self.sock.fileno(), events | select.POLLERR | select.POLLHUP)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def send(self, data):
        """Sends raw bytes, all of them (blocking, with the timeout)."""
        self.sock.sendall(data)

    def send_nonblocking(self, data, deadline):
        """Sends as much of data as the peer takes before deadline; returns the count."""
        sent = 0
        view = memoryview(data)
        while sent < len(data) and time.monotonic() < deadline:
            if not self._wait(select.POLLOUT, min(0.05, deadline - time.monotonic())):
                continue
            try:
                n = self.sock.send(view[sent:sent + (1 << 20)], socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            sent += n
        return sent

    def _fill(self, n, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.rbuf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("waited for %d bytes, have %d" % (n, len(self.rbuf)))
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(max(65536, n - len(self.rbuf)), 4 << 20))
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            finally:
                if self.sock is not None:
                    self.sock.settimeout(self.timeout)
            if not chunk:
                raise Closed("server closed the connection (wanted %d bytes, had %d)" %
                             (n, len(self.rbuf)))
            self.rbuf += chunk

    def recv_exact(self, n, timeout=None):
        self._fill(n, timeout)
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def recv_byte_by_byte(self, n, delay=0.0):
        """Reads n bytes one recv(1) at a time: a deliberately slow reader."""
        out = bytearray()
        while len(out) < n:
            if self.rbuf:
                out.append(self.rbuf.pop(0))
                continue
            b = self.sock.recv(1)
            if not b:
                raise Closed("closed after %d of %d bytes" % (len(out), n))
            out += b
            if delay:
                time.sleep(delay)
        return bytes(out)

    def closed(self, timeout=5.0):
        """True if the server closes within timeout, False if the connection
        is still open at the deadline. What the server sent meanwhile (and
        anything unread before) is kept in self.trailing."""
        deadline = time.monotonic() + timeout
        got = bytearray(self.rbuf)
        self.rbuf.clear()
        try:
            while True:
                left = max(0.0, deadline - time.monotonic())
                if not self._wait(select.POLLIN, left):
                    return False
                try:
                    chunk = self.sock.recv(1 << 20)
                except (ConnectionResetError, BrokenPipeError):
                    return True
                if not chunk:
                    return True
                got += chunk
        finally:
            self.trailing = bytes(got)

    def expect_closed(self, timeout=5.0):
        """Asserts the server hangs up within timeout; returns what it sent first."""
        assert self.closed(timeout), "the server did not close the connection"
        return self.trailing

    def try_send(self, data):
        """Sends, ignoring a server that has already hung up; returns False then."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def peek_idle(self, timeout=0.2):
        """True if nothing arrives (and the socket stays open) for timeout."""
        if self.rbuf:
            return False
        return not self._wait(select.POLLIN, timeout)

    # -- handshake --

    def read_greeting(self):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC:
            raise ServerProtocolError("bad NBDMAGIC 0x%x" % magic)
        if opt_magic != IHAVEOPT:
            raise ServerProtocolError("not a newstyle server: 0x%x" % opt_magic)
        self.server_flags = flags
        return flags

    def send_client_flags(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def start(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        """Greeting and client flags: ready for options."""
        self.read_greeting()
        self.send_client_flags(flags)
        return self

    def send_option(self, opt, data=b"", magic=IHAVEOPT, length=None):
        self.send(build_option(opt, data, magic, length))

    def read_option_reply(self, expect_opt=None, timeout=None):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20, timeout))
        if magic != REP_MAGIC:
            raise ServerProtocolError("bad option reply magic 0x%x" % magic)
        if expect_opt is not None and opt != expect_opt:
            raise ServerProtocolError("reply for option %d, expected %d" % (opt, expect_opt))
        data = self.recv_exact(length, timeout) if length else b""
        return OptionReply(opt, rtype, data)

    def option_replies(self, opt):
        """Reads replies to opt up to its final one (ACK or an error)."""
        out = []
        while True:
            r = self.read_option_reply(opt)
            out.append(r)
            if r.type == REP_ACK or r.is_error:
                return out
            if r.type not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
                raise ServerProtocolError("unexpected reply type %s" % rep_name(r.type))

    def option(self, opt, data=b"", length=None):
        """Sends an option; returns all its replies (the last being final)."""
        self.send_option(opt, data, length=length)
        return self.option_replies(opt)

    def option_final(self, opt, data=b"", length=None):
        """The final reply type of an option (REP_ACK or REP_ERR_*)."""
        return self.option(opt, data, length=length)[-1].type

    def opt_structured_reply(self):
        r = self.option(OPT_STRUCTURED_REPLY)
        if r[-1].type != REP_ACK:
            raise OptionError(OPT_STRUCTURED_REPLY, r[-1].type, r[-1].data)
        self.structured = True

    def opt_list(self):
        names = []
        replies = self.option(OPT_LIST)
        if replies[-1].type != REP_ACK:
            raise OptionError(OPT_LIST, replies[-1].type, replies[-1].data)
        for r in replies[:-1]:
            if r.type != REP_SERVER or len(r.data) < 4:
                raise ServerProtocolError("bad LIST reply %r" % r)
            (n,) = struct.unpack(">I", r.data[:4])
            if 4 + n > len(r.data):
                raise ServerProtocolError("LIST name overruns its reply")
            names.append((r.data[4:4 + n].decode(), r.data[4 + n:].decode(errors="replace")))
        return names

    def _parse_infos(self, replies):
        exp = Export()
        for r in replies:
            if r.type != REP_INFO:
                continue
            if len(r.data) < 2:
                raise ServerProtocolError("short INFO reply")
            (t,) = struct.unpack(">H", r.data[:2])
            exp.infos.append(t)
            if t == INFO_EXPORT:
                if len(r.data) != 12:
                    raise ServerProtocolError("INFO_EXPORT of %d bytes" % len(r.data))
                exp.size, exp.flags = struct.unpack(">QH", r.data[2:])
            elif t == INFO_BLOCK_SIZE:
                if len(r.data) != 14:
                    raise ServerProtocolError("INFO_BLOCK_SIZE of %d bytes" % len(r.data))
                exp.block_size = struct.unpack(">III", r.data[2:])
            elif t == INFO_NAME:
                exp.name = r.data[2:].decode(errors="replace")
            elif t == INFO_DESCRIPTION:
                exp.description = r.data[2:].decode(errors="replace")
        return exp

    def opt_go(self, name="", info_reqs=(), info=False):
        """OPT_GO (or OPT_INFO): returns an Export, raises OptionError."""
        opt = OPT_INFO if info else OPT_GO
        replies = self.option(opt, build_go_payload(name, info_reqs))
        last = replies[-1]
        if last.type != REP_ACK:
            raise OptionError(opt, last.type, last.data)
        exp = self._parse_infos(replies)
        if exp.size is None:
            raise ServerProtocolError("no NBD_INFO_EXPORT before ACK")
        if not info:
            self.export = exp
        return exp

    def opt_export_name(self, name=""):
        if isinstance(name, str):
            name = name.encode()
        self.send_option(OPT_EXPORT_NAME, name)
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        if not self.no_zeroes:
            z = self.recv_exact(124)
            if z != b"\0" * 124:
                raise ServerProtocolError("nonzero padding after EXPORT_NAME")
        exp = Export()
        exp.size, exp.flags = size, flags
        self.export = exp
        return exp

    def opt_meta(self, set_=True, name="", queries=()):
        """LIST/SET_META_CONTEXT: returns {context name: id}; raises OptionError."""
        opt = OPT_SET_META_CONTEXT if set_ else OPT_LIST_META_CONTEXT
        replies = self.option(opt, build_meta_payload(name, queries))
        if replies[-1].type != REP_ACK:
            raise OptionError(opt, replies[-1].type, replies[-1].data)
        out = {}
        for r in replies[:-1]:
            if r.type != REP_META_CONTEXT or len(r.data) < 4:
                raise ServerProtocolError("bad META reply %r" % r)
            (cid,) = struct.unpack(">I", r.data[:4])
            out[r.data[4:].decode()] = cid
        return out

    def opt_abort(self):
        self.send_option(OPT_ABORT)

    def handshake(self, name="", structured=False, meta=(), flags=None):
        """Greeting to transmission with OPT_GO; returns the Export."""
        self.start(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES if flags is None else flags)
        if structured:
            self.opt_structured_reply()
        if meta:
            self.meta_ids = self.opt_meta(True, name, meta)
        return self.opt_go(name)

    # -- transmission --

    def new_cookie(self):
        c = self.next_cookie
        self.next_cookie += 1
        return c

    def send_request(self, cmd, offset=0, length=None, cookie=None, flags=0, payload=b"",
                     magic=REQUEST_MAGIC, track=True):
        """Sends one request header (and payload); returns its cookie.

        length defaults to len(payload); track=False leaves it out of the
        bookkeeping that read_reply() needs to size simple READ replies."""
        if length is None:
            length = len(payload)
        if cookie is None:
            cookie = self.new_cookie()
        if track:
            self.pending[cookie] = (cmd, length, offset)
        self.send(build_request(cmd, offset, length, cookie, flags, payload, magic))
        return cookie

    def read_reply_header(self, timeout=None):
        """One simple reply (with the data of a successful READ) or one chunk."""
        (magic,) = struct.unpack(">I", self.recv_exact(4, timeout))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12, timeout))
            data = b""
            what = self.pending.get(cookie)
            if what is None:
                raise ServerProtocolError("simple reply for unknown cookie %d" % cookie)
            if what[0] == CMD_READ and err == 0 and what[1]:
                data = self.recv_exact(what[1], timeout)
            return SimpleReply(cookie, err, data)
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise ServerProtocolError("structured reply without negotiation")
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16, timeout))
            if cookie not in self.pending:
                raise ServerProtocolError("chunk for unknown cookie %d" % cookie)
            payload = self.recv_exact(length, timeout) if length else b""
            return Chunk(cookie, flags, rtype, payload)
        raise ServerProtocolError("bad reply magic 0x%08x" % magic)

    def read_reply(self, timeout=None):
        """A whole reply (all chunks up to DONE) for whichever request comes next.

        Chunks of different requests are assumed not to interleave, which is
        true of a server that sends each reply as a single chunk."""
        first = self.read_reply_header(timeout)
        cookie = first.cookie
        cmd, length, offset = self.pending[cookie]
        if not first.structured:
            del self.pending[cookie]
            return Reply(cookie, first.error, first.data)
        chunks = [first]
        while not chunks[-1].done:
            c = self.read_reply_header(timeout)
            if c.cookie != cookie:
                raise ServerProtocolError("interleaved chunks")
            chunks.append(c)
        del self.pending[cookie]
        rep = Reply(cookie, chunks=chunks)
        data = None     # allocated at the first data chunk: never for errors
        for c in chunks:
            if c.is_error:
                rep.error = c.error[0]
                if rep.error == 0:
                    raise ServerProtocolError("error chunk with error 0")
            elif c.type == REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", c.payload[:8])
                d = c.payload[8:]
                if cmd != CMD_READ or off < offset or off + len(d) > offset + length:
                    raise ServerProtocolError("data chunk outside the request")
                if data is None:
                    data = bytearray(length)
                data[off - offset:off - offset + len(d)] = d
            elif c.type == REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", c.payload[:12])
                if cmd != CMD_READ or off < offset or off + n > offset + length:
                    raise ServerProtocolError("hole chunk outside the request")
            elif c.type == REPLY_TYPE_BLOCK_STATUS:
                if cmd != CMD_BLOCK_STATUS or (len(c.payload) - 4) % 8:
                    raise ServerProtocolError("bad block status chunk")
                (cid,) = struct.unpack(">I", c.payload[:4])
                ext = [struct.unpack(">II", c.payload[i:i + 8])
                       for i in range(4, len(c.payload), 8)]
                rep.extents = (cid, ext)
            elif c.type == REPLY_TYPE_NONE:
                if not c.done or c.payload:
                    raise ServerProtocolError("NONE chunk without DONE or with payload")
            else:
                raise ServerProtocolError("unknown chunk type 0x%x" % c.type)
        if cmd == CMD_READ and not rep.error:
            rep.data = bytes(data) if data is not None else bytes(length)
        return rep

    def call(self, cmd, offset=0, length=None, flags=0, payload=b"", timeout=None):
        """One request, waited for; returns the Reply."""
        cookie = self.send_request(cmd, offset, length, flags=flags, payload=payload)
        rep = self.read_reply(timeout)
        if rep.cookie != cookie:
            raise ServerProtocolError("reply for cookie %d, expected %d" % (rep.cookie, cookie))
        return rep

    def pread(self, length, offset, flags=0):
        rep = self.call(CMD_READ, offset, length, flags=flags)
        if rep.error:
            raise OSError(rep.error, "NBD read error %d" % rep.error)
        return rep.data

    def pwrite(self, data, offset, flags=0):
        rep = self.call(CMD_WRITE, offset, flags=flags, payload=data)
        if rep.error:
            raise OSError(rep.error, "NBD write error %d" % rep.error)

    def disconnect(self):
        self.send_request(CMD_DISC, track=False)


def random_bytes(rng, n):
    """n bytes from a random.Random (reproducible garbage)."""
    return rng.randbytes(n)
