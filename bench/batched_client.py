"""A client that sends its whole queue at once, for `make bench`'s CPU part.

fio's nbd engine (libnbd) sends each request with its own send, so a server
quicker than it wakes for about one request at a time, and its cost per
request is mostly the cost of a wake-up. This client writes QD 4 KiB
requests (random offsets, reads or writes) in one send and reads all their
replies before the next batch, the way a loaded kernel or a batching
initiator delivers them: the server's cost per request when many wait at
each wake-up. Written from the NBD protocol document; tests/integration/
nbdraw.py does the handshake, and each reply's magic and error are checked
here (nbdraw's per-reply parsing would cost more than the server does).
"""

import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "tests", "integration"))
import nbdraw  # noqa: E402

QD = 32
SIMPLE_REPLY = 16           # magic, error, cookie
CMD = {"randread": 0, "randwrite": 1}


def batched_requests(sock, rw, runtime, size=1 << 30, qd=QD):
    """Batches of qd 4k requests for runtime seconds; (requests, requests/s)."""
    cmd = CMD[rw]
    c = nbdraw.NBDRaw(path=sock)
    c.handshake()
    rnd = random.Random(1)
    payload = b"\xab" * 4096 if cmd == 1 else b""
    step = SIMPLE_REPLY + (4096 if cmd == 0 else 0)
    done = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < runtime:
            parts = []
            for i in range(qd):
                off = rnd.randrange(size // 4096) * 4096
                parts.append(struct.pack(">IHHQQI", nbdraw.REQUEST_MAGIC, 0, cmd, i, off, 4096))
                parts.append(payload)
            c.send(b"".join(parts))
            data = c.recv_exact(step * qd)
            # every reply a simple one with error 0 (its framing, not the data)
            for k in range(qd):
                magic, err = struct.unpack_from(">II", data, k * step)
                if magic != nbdraw.SIMPLE_REPLY_MAGIC or err:
                    raise RuntimeError("batched client: bad reply (magic %#x, error %d)"
                                       % (magic, err))
            done += qd
    finally:
        c.close()
    return done, done / (time.monotonic() - t0)
