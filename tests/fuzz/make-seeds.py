#!/usr/bin/env python3
"""Writes the seed corpora under tests/fuzz/corpus/<target>/ and the known
reproducers under tests/fuzz/crashes/.

Each seed is a valid or deliberately interesting input in the layout the
target's header comment describes. Re-run after changing a layout:
    tests/fuzz/make-seeds.py
Files are named after their content hash, so re-running is idempotent.
"""
import hashlib
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED = 8, 9, 10, 11
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16


def be32(v):
    return struct.pack(">I", v)


def s(x):
    x = x.encode() if isinstance(x, str) else x
    return be32(len(x)) + x


def opt(o, payload=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(payload)) + payload


def go(name, infos=()):
    return s(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta(name, *queries):
    return s(name) + be32(len(queries)) + b"".join(s(q) for q in queries)


def req(cmd, off=0, length=0, flags=0, cookie=None, data=b""):
    if cookie is None:
        req.n += 1
        cookie = req.n
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, off, length) + data


req.n = 0

FLAGS = be32(1)            # FIXED_NEWSTYLE
FLAGS_NZ = be32(3)         # FIXED_NEWSTYLE | NO_ZEROES

# ---- fuzz_nbd: byte 0 mode, byte 1 chunk size - 1, byte 2 events, then the
# client's bytes. mode: 0x01 by name, 0x06 canned start (<<1: 1 GO+structured,
# 2 EXPORT_NAME, 3 GO plain), 0x08 NO_ZEROES, 0x10 chunked, 0x20 slow reader,
# 0x40 read-only export, 0x80 paused. events: 0x01 early EOF, 0x02 close the
# vbd, 0x04 force, 0x08 oversized option first, 0x10 a second client, 0x20 reset,
# 0x40 a UNIX socket (the server's receive buffer; payloads of 1 KiB and more
# read straight into the request, the harness's lowered threshold), 0x80 the
# real threshold (64 KiB) on that socket.

NBD_DISK = 512 << 10    # minor 0: ram:512K (minor 1, read-only: ram:256K)


def nbd(mode, opts, body, events=0):
    return bytes([mode, opts, events]) + body


IO_MIX = (req(CMD_WRITE, 0, 4096, data=b"\xab" * 4096)
          + req(CMD_WRITE, 65536 * 3 + 100, 700, F_FUA, data=b"x" * 700)
          + req(CMD_READ, 0, 8192)
          + req(CMD_FLUSH)
          + req(CMD_CACHE, 0, NBD_DISK // 4)
          + req(CMD_TRIM, 0, 65536 * 2)
          + req(CMD_WRITE_ZEROES, 4096, 131072, F_NO_HOLE)
          + req(CMD_WRITE_ZEROES, 0, 65536, F_FAST_ZERO)
          + req(CMD_READ, NBD_DISK - 512, 512)
          + req(CMD_READ, NBD_DISK, 1)                    # past the end
          + req(CMD_WRITE, NBD_DISK - 10, 20, data=b"y" * 20)  # ENOSPC, payload swallowed
          + req(CMD_DISC))

STRUCTURED_MIX = (req(CMD_WRITE, 70000, 3000, data=b"z" * 3000)
                  + req(CMD_BLOCK_STATUS, 0, NBD_DISK)
                  + req(CMD_BLOCK_STATUS, 0, NBD_DISK, F_REQ_ONE)
                  + req(CMD_READ, 0, 65536 + 4096, F_DF)
                  + req(CMD_READ, 0, 0)
                  + req(CMD_BLOCK_STATUS, 0, 0)          # EINVAL
                  + req(CMD_READ, 0, 16, 0x80)            # unknown flag
                  + req(9, 0, 0)                          # unknown command
                  + req(CMD_DISC))

FULL_HANDSHAKE = (FLAGS
                  + opt(OPT_LIST)
                  + opt(OPT_STARTTLS)
                  + opt(OPT_EXTENDED)
                  + opt(OPT_STRUCTURED_REPLY)
                  + opt(OPT_LIST_META, meta("", "base:"))
                  + opt(OPT_LIST_META, meta("0"))
                  + opt(OPT_SET_META, meta("0", "qemu:dirty-bitmap:x", "base:allocation"))
                  + opt(OPT_INFO, go("0", (0, 1, 2, 3, 99)))
                  + opt(OPT_GO, go("0", (3,))))

NBD_SEEDS = [
    nbd(0x00, 0, FULL_HANDSHAKE + STRUCTURED_MIX),
    nbd(0x01, 0, FULL_HANDSHAKE + IO_MIX),
    nbd(0x00, 0, FLAGS + opt(OPT_ABORT)),
    nbd(0x01, 0, FLAGS + opt(OPT_LIST) + opt(OPT_GO, go("7")) + opt(OPT_GO, go("0x"))
        + opt(OPT_SET_META, meta("0", "base:allocation"))  # needs structured first
        + opt(OPT_INFO, go("0", (1,))) + opt(OPT_EXPORT_NAME, b"1")
        + req(CMD_WRITE, 0, 512, data=b"r" * 512) + req(CMD_READ, 0, 512)),
    nbd(0x00, 0, FLAGS_NZ + opt(OPT_EXPORT_NAME, b"") + IO_MIX),
    nbd(0x00, 0, be32(0x80)),                             # unknown client flags
    nbd(0x00, 0, FLAGS + struct.pack(">QII", IHAVEOPT, 99, 70000) + b"\0" * 2000),  # discarded, partial
    nbd(0x00, 0, FLAGS + struct.pack(">QII", IHAVEOPT, 1, 70000)),  # oversized EXPORT_NAME
    nbd(0x00, 0, FLAGS + opt(OPT_GO, be32(5000) + b"a" * 10)),  # name too big
    nbd(0x02, 0, STRUCTURED_MIX),
    nbd(0x03, 0, STRUCTURED_MIX),
    nbd(0x04, 0, IO_MIX),
    nbd(0x0c, 0, IO_MIX),
    nbd(0x06, 0, IO_MIX),
    nbd(0x46, 0, IO_MIX),                                 # read-only export
    nbd(0x43, 0, STRUCTURED_MIX),
    nbd(0x12, 0, STRUCTURED_MIX),                         # 1-byte chunks
    nbd(0x14, 6, IO_MIX),                                 # 7-byte chunks
    nbd(0x22, 0, b"".join(req(CMD_READ, i << 17, 1 << 17) for i in range(4)) * 3),
    nbd(0x82, 0, IO_MIX),                                 # paused
    nbd(0x82, 0, STRUCTURED_MIX, 0x01),                   # paused, hang up early
    nbd(0x82, 0, STRUCTURED_MIX, 0x02),                   # paused, vbd closed
    nbd(0x02, 0, IO_MIX, 0x02),                           # vbd closed under load
    nbd(0x02, 0, IO_MIX, 0x06),                           # ... force-closed
    nbd(0x43, 0, STRUCTURED_MIX, 0x07),
    nbd(0x02, 0, STRUCTURED_MIX, 0x08),                   # oversized option skipped
    nbd(0x02, 0, IO_MIX, 0x10),                           # a second client reading
    nbd(0x03, 0, STRUCTURED_MIX, 0x16),                   # ... both cut by a force close
    nbd(0x82, 0, IO_MIX, 0x12),                           # ... paused, then closed
    nbd(0x02, 0, IO_MIX, 0x31),                           # both reset early
    nbd(0x04, 0, b"".join(req(CMD_WRITE, i * 4096, 1024, data=bytes([i]) * 1024)
                             for i in range(8)), 0x01),
    nbd(0x04, 0, req(CMD_WRITE, 0, 1000, data=b"short")),  # payload never completes
    nbd(0x04, 0, struct.pack(">IHHQQI", 0x12345678, 0, 0, 0, 0, 0)),  # bad magic
    nbd(0x02, 0, b"".join(req(CMD_READ, 0, 512) for _ in range(140))),  # > 128 in flight
    # a socket: payloads in place, whole, cut by chunks, or never completed
    nbd(0x02, 0, STRUCTURED_MIX, 0x40),
    nbd(0x04, 0, IO_MIX, 0x40),
    nbd(0x04, 0, req(CMD_WRITE, 8192, 3000, data=b"p" * 3000) + req(CMD_READ, 8192, 3000), 0x40),
    nbd(0x14, 99, req(CMD_WRITE, 0, 2048, data=b"q" * 2048) + req(CMD_READ, 0, 2048), 0x40),
    nbd(0x04, 0, req(CMD_WRITE, 0, 4096, data=b"short"), 0x40),
    nbd(0x04, 0, req(CMD_WRITE, 0, 4096, data=b"short"), 0x61),  # ... and a reset
    nbd(0x24, 0, b"".join(req(CMD_READ, i << 16, 1 << 16) for i in range(8)), 0x40),  # slow reader
    nbd(0x84, 0, req(CMD_WRITE, 0, 1500, data=b"w" * 1500), 0x46),  # paused, force-closed
    nbd(0x04, 0, IO_MIX, 0xc0),                           # the real threshold: 3000 buffered
    nbd(0x14, 254, b"".join(req(CMD_WRITE, i * 4096, 3000, data=bytes([i + 1]) * 3000)
                            for i in range(2)), 0xc0),   # ... in 255-byte pieces
    # 251-byte pieces never end with a 928-byte request: the 5 KiB buffer fills, moves
    nbd(0x14, 250, b"".join(req(CMD_WRITE, i * 4096, 900, data=bytes([i + 1]) * 900)
                            for i in range(7)), 0x40),
]

# ---- fuzz_nbd_proto: byte 0 picks the parser ----

PROTO_SEEDS = [
    b"\0" + req(CMD_READ, 4096, 512, F_FUA, cookie=0x1122334455667788),
    b"\0" + req(CMD_BLOCK_STATUS, 1 << 40, 0xffffffff, 0xffff, cookie=0),
    b"\0" + b"\x25\x60\x95",
    b"\1" + go("", ()),
    b"\1" + go("export", (0, 1, 2, 3)),
    b"\1" + go("x" * 4096, (3,)),
    b"\1" + be32(4097) + b"y" * 4097 + b"\0\0",
    b"\1" + be32(3) + b"a\0b" + b"\0\0",
    b"\1" + go("e", (1,))[:-1],
    b"\2" + meta("", "base:allocation"),
    b"\2" + meta("0", "base:", "qemu:dirty-bitmap:b0", ""),
    b"\2" + meta("disk"),
    b"\2" + s("a") + be32(0x40000000),
    b"\2" + s("a") + be32(2) + s("q") + be32(4097),
    b"\2" + meta("a", "q") + b"trailing",
    b"\3" + be32(28),
    b"\3" + be32(122),
]

# ---- fuzz_control: byte 0 mode (0x01 chunked, chunk byte 1 + 1; 0x02 slow
# reader; 0x04 hang up early; 0x08 reset; 0x10 over-long line first; 0x20
# over-long unterminated line last; 0x40 line by line), byte 1 chunk size - 1,
# request lines ----


def line(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


REQS = [
    {"id": 1, "cmd": "version"},
    {"id": "two", "cmd": "list", "args": {"type": "ram", "path": "4M", "minor": 0}},
    {"id": None, "cmd": "stats"},
    {"id": 4, "cmd": "stats", "args": {"minor": 5000}},
    {"id": 5, "cmd": "open", "args": {"params": "ram:4M", "minor": 3, "readonly": True}},
    {"id": 6, "cmd": "create", "args": {"params": "aio:/nonexistent", "nodirect": False}},
    {"id": 7, "cmd": "open", "args": {"params": "nocolon"}},
    {"id": 8, "cmd": "close", "args": {"minor": 2, "force": True}},
    {"id": 9, "cmd": "destroy", "args": {"minor": 1}},
    {"id": 10, "cmd": "pause", "args": {"minor": 3}},
    {"id": 11, "cmd": "unpause", "args": {"minor": 3, "params": "ram:4M"}},
    {"id": 12, "cmd": "unpause", "args": {"minor": 1}},
]
BAD = [
    b"not json\n",
    b"[1,2,3]\n",
    b'{"id":1,"cmd":"version","cmd":"list"}\n',
    b'{"id":1.5,"cmd":"version"}\n',
    b'{"id":[],"cmd":"version"}\n',
    b'{"id":1,"cmd":"version","extra":true}\n',
    b'{"id":1}\n',
    b'{"id":1,"cmd":42}\n',
    b'{"id":1,"cmd":"reboot"}\n',
    b'{"id":1,"cmd":"list","args":[]}\n',
    b'{"id":1,"cmd":"list","args":{"bogus":1}}\n',
    b'{"id":1,"cmd":"list","args":{"minor":"0"}}\n',
    b'{"id":1,"cmd":"close","args":{}}\n',
    b'{"id":1,"cmd":"close","args":{"minor":true}}\n',
    b'{"id":"\\u00e9\\ud83d\\ude00","cmd":"version"}\r\n',
    b"\n\r\n",
]
# an error message longer than the server's message buffer (512)
LONG_PARAMS = b'{"id":1,"cmd":"open","args":{"params":"' + b"p" * 700 + b'"}}\n'
# run-all gives this target inputs of at most 1 KiB (it says why): each seed fits
REQ_LINES = b"".join(line(r) for r in REQS)
BAD_LINES = b"".join(BAD)
# more requests than a client may have unanswered (8 in the fuzzer, 64 in tapdiskd)
MANY_PAUSES = b"".join(line({"id": i, "cmd": "pause", "args": {"minor": i}}) for i in range(12))



def step(obj, width=128):
    """One request padded to width bytes: in chunks of width (mode 0x01,
    chunk byte width - 1) each runs once the one before has its reply."""
    text = json.dumps(obj, separators=(",", ":"))
    assert len(text) < width
    return (text + " " * (width - 1 - len(text)) + "\n").encode()


def steps(reqs):
    """Mode 0x40: each request runs once the one before has its reply."""
    return b"\x40\0" + b"".join(line(dict(r, id=i)) for i, r in enumerate(reqs, 1))


LIMITS = {"iops_total": 100, "bps_read": 1 << 20}
# the real command table on ram disks: each step after the last one's reply
LIFECYCLES = [
    steps([{"cmd": "open", "args": {"minor": 0, "params": "ram:4M"}},
           {"cmd": "pause", "args": {"minor": 0}},
           {"cmd": "unpause", "args": {"minor": 0}},
           {"cmd": "pause", "args": {"minor": 0}},
           {"cmd": "unpause", "args": {"minor": 0, "params": "ram:8M"}},
           {"cmd": "snapshot", "args": {"minor": 0, "path": "/nonexistent/child.vhd"}},
           {"cmd": "stats", "args": {"minor": 0, "reset": True}},
           {"cmd": "close", "args": {"minor": 0}},
           {"cmd": "list", "args": {"minor": 0}},
           {"cmd": "open", "args": {"minor": 0, "params": "ram:1M", "readonly": True}},
           {"cmd": "destroy", "args": {"minor": 0, "force": True}}]),
    steps([{"cmd": "open", "args": {"minor": 1, "params": "ram:shared:1M", "readonly": True}},
           {"cmd": "create", "args": {"params": "ram:shared:1M"}},
           {"cmd": "create", "args": {"params": "ram:shared:2M", "nodirect": True}},
           {"cmd": "list", "args": {"type": "ram"}},
           {"cmd": "stats"},
           {"cmd": "version"},
           {"cmd": "close", "args": {"minor": 1}},
           {"cmd": "destroy", "args": {"minor": 1}}]),
    steps([{"cmd": "qos-set", "args": {"group": "g1", "limits": LIMITS}},
           {"cmd": "open", "args": {"minor": 2, "params": "ram:1M",
                                    "qos": {"group": "g1", "weight": 2}}},
           {"cmd": "qos-get", "args": {"group": "g1"}},
           {"cmd": "qos-set", "args": {"minor": 2, "limits": {"iops_read": 10}}},
           {"cmd": "qos-get", "args": {"minor": 2}},
           {"cmd": "pause", "args": {"minor": 2}},
           {"cmd": "close", "args": {"minor": 2, "force": True}}]),
    # all at once: a pause and a close on a vbd still opening, a second pause waiting
    b"\0\0" + line({"id": 1, "cmd": "open", "args": {"minor": 5, "params": "ram:1M"}})
    + line({"id": 2, "cmd": "pause", "args": {"minor": 5}})
    + line({"id": 3, "cmd": "close", "args": {"minor": 5}}),
    b"\x01\x7f" + step({"id": 1, "cmd": "open", "args": {"minor": 6, "params": "ram:1M"}})
    + step({"id": 2, "cmd": "pause", "args": {"minor": 6}})
    + line({"id": 3, "cmd": "pause", "args": {"minor": 6}})
    + line({"id": 4, "cmd": "close", "args": {"minor": 6}}),
    b"\x04\0" + line({"id": 1, "cmd": "open", "args": {"params": "ram:1M"}}),  # hang up, owed
]
# more replies owed at once than a client may have pending (64): reading stops, then resumes
MANY_OPENS = b"".join(line({"id": i, "cmd": "open", "args": {"minor": i, "params": "ram:64K"}})
                      for i in range(12))
LIFECYCLES += [b"\0\0" + MANY_OPENS, b"\x04\0" + MANY_OPENS, b"\x02\0" + MANY_OPENS]

CONTROL_SEEDS = LIFECYCLES + [
    b"\0\0" + REQ_LINES,
    b"\0\0" + BAD_LINES,
    b"\0\0" + LONG_PARAMS,
    b"\0\0" + line(REQS[0]),
    b"\0\0" + MANY_PAUSES,
    b"\x04\0" + MANY_PAUSES,              # hang up with lines unread, replies owed
    b"\x0c\0" + MANY_PAUSES,              # ... with a reset
    b"\x08\0" + REQ_LINES,                # reset at the end
    b"\x02\0" + REQ_LINES,                # slow reader
    b"\x01\0" + BAD_LINES[:600],          # 1-byte chunks
    b"\x01\x07" + REQ_LINES,              # 8-byte chunks
    b"\x41\x07" + BAD_LINES,              # line by line, 8-byte chunks
    b"\0\0" + b'{"id":1,"cmd":"version"}',  # no newline before EOF
    b"\x04\0" + b'{"id":1,"cmd":"pause","args":{"minor":3}}\n{"id":2,',
    b"\x10\0" + line(REQS[0]),            # over-long line first
    b"\x20\0" + line(REQS[9]),            # over-long unterminated line last
    b"\0\0" + b"[" * 3000 + b"\n",
]


def write(target, seeds):
    # adds, never removes: the corpus also keeps inputs the fuzzers found
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    for seed in seeds:
        name = hashlib.sha1(seed).hexdigest()
        with open(os.path.join(d, name), "wb") as f:
            f.write(seed)
    return sum(len(x) for x in seeds)


# ---- the reproducers of tests/fuzz/crashes/ (see its README.md), kept in
# step with the input layouts here ----

CRASHES = {
    "fuzz_nbd-zero-length-write":
        nbd(0x04, 0, struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, 0, 0)),
    "fuzz_control-no-reply-json-error-utf8":
        b"\0\0" + b'"\\\xc4\x9b\n',
    "fuzz_control-no-reply-unknown-command-utf8":
        b"\0\0" + ('{"id":7,"cmd":"a' + "\u00e9" * 32 + '"}\n').encode(),
    "fuzz_control-no-reply-long-error-utf8":
        b"\0\0" + ('{"id":8,"cmd":"open","args":{"params":"a' + "\u00e9" * 300 + '"}}\n').encode(),
}


def write_crashes():
    d = os.path.join(HERE, "crashes")
    os.makedirs(d, exist_ok=True)
    for name, data in CRASHES.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def main():
    total = 0
    total += write("fuzz_nbd", NBD_SEEDS)
    total += write("fuzz_nbd_proto", PROTO_SEEDS)
    total += write("fuzz_control", CONTROL_SEEDS)
    write_crashes()
    print(f"wrote {total} bytes of seeds under {CORPUS}, and the reproducers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
