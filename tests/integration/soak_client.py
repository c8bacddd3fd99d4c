"""One NBD client process of the soak test (test_soak.py): verified random
I/O on several vbds at once with libnbd's asynchronous API, several requests
in flight on each.

Each vbd's model is a file mapped shared (soak.py's Model), so that it
outlives this process when the soak's driver kills it: per 4 KiB block the
tag of the data it must hold (0: zeros) and the tag of a write in flight
(NONE if there is none). A block's data is its tag and number repeated
(block_data), so a read names what it found. A write sets the pending tag
before it is sent and makes it the block's tag once acknowledged; a block
whose write was never acknowledged (the connection died, the process was
killed) is "in doubt": either tag is right, and the next read of it settles
which. Errors are counted per vbd, with the reason: an error on a
connection opened before the driver force-closed the vbd (the model's
fclose count moved, or was odd: a force-close under way) is explained; any
other is not, and neither is a refused connection while the vbd is open.

usage: soak_client.py SPEC.json  (see soak.py: NbdClients.start)
"""

import json
import mmap
import os
import random
import select
import struct
import sys
import time

import nbd

BLOCK = 4096
NONE = (1 << 64) - 1
# header words (u64) of a model file
H_MAGIC, H_NBLOCKS, H_FCLOSE, H_READS, H_WRITES, H_ZEROES, H_FLUSHES, H_BYTES_READ, \
    H_BYTES_WRITTEN, H_ERR_EXPLAINED, H_ERR_UNEXPLAINED, H_MISMATCHES, H_RECONNECTS, \
    H_RESOLVED, H_FINAL_VERIFIED, H_FINAL_DONE = range(16)
HEADER_WORDS = 16
MAGIC = 0x534f414b4d4f444c     # "SOAKMODL"


ZERO_BLOCK = bytes(BLOCK)
FINAL_BLOCKS = 256      # the final pass reads 1 MiB at a time


def block_data(tag, b):
    if tag == 0:
        return ZERO_BLOCK
    return struct.pack("<QQ", tag, b) * (BLOCK // 16)


class Model:
    """A vbd's model file: header, then cur[nblocks], then pend[nblocks]."""

    def __init__(self, path, nblocks=None, init=None):
        if nblocks is not None:
            with open(path, "wb") as f:
                f.truncate(8 * (HEADER_WORDS + 2 * nblocks))
        self.f = open(path, "r+b")
        self.mm = mmap.mmap(self.f.fileno(), 0)
        self.w = memoryview(self.mm).cast("Q")
        if nblocks is not None:
            self.w[H_MAGIC] = MAGIC
            self.w[H_NBLOCKS] = nblocks
            for b in range(nblocks):
                self.w[HEADER_WORDS + nblocks + b] = NONE
                if init:
                    self.w[HEADER_WORDS + b] = init(b)
        assert self.w[H_MAGIC] == MAGIC
        self.nblocks = self.w[H_NBLOCKS]
        self.cur = self.w[HEADER_WORDS:HEADER_WORDS + self.nblocks]
        self.pend = self.w[HEADER_WORDS + self.nblocks:HEADER_WORDS + 2 * self.nblocks]

    def add(self, word, n=1):
        self.w[word] += n

    def allowed(self, b):
        p = self.pend[b]
        return (self.cur[b],) if p == NONE else (self.cur[b], p)


class Vbd:
    def __init__(self, spec, client):
        self.minor = spec["minor"]
        self.sock = spec["socket"]
        self.model = Model(spec["model"])
        self.nblocks = self.model.nblocks
        self.cl = client
        self.h = None
        self.busy = bytearray(self.nblocks)
        self.inflight = {}          # cookie -> (kind, start, n, tag, buf)
        self.retry_at = 0.0
        self.fclose_seen = 0
        self.doubt = [b for b in range(self.nblocks) if self.model.pend[b] != NONE]
        self.final_next = None      # block of the final pass's next read
        self.bufs = {}              # blocks -> free bytearrays (reads reuse them)

    def buf_get(self, n):
        free = self.bufs.get(n)
        return free.pop() if free else bytearray(n * BLOCK)

    def buf_put(self, n, ba):
        self.bufs.setdefault(n, []).append(ba)

    # ---- connection ----

    def connect(self):
        self.fclose_seen = self.model.w[H_FCLOSE]
        h = nbd.NBD()
        try:
            h.connect_unix(self.sock)
        except nbd.Error as e:
            # refused only while the vbd is force-closed
            self.error("connect", 0, 0, str(e))
            self.retry_at = time.time() + 0.1
            return
        assert h.get_size() == self.nblocks * BLOCK, "minor %d: size changed" % self.minor
        self.h = h
        self.model.add(H_RECONNECTS)
        # what a dead connection left in doubt: read first
        self.doubt = [b for b in range(self.nblocks) if self.model.pend[b] != NONE]

    def drop(self, why):
        """The connection is gone: what was in flight is in doubt."""
        for cookie, (kind, start, n, tag, buf) in list(self.inflight.items()):
            self.error(kind, start, n, why)
            self.release(kind, start, n, acked=False)
        self.inflight.clear()
        self.h = None      # libnbd closes a handle when it is collected
        self.retry_at = time.time() + 0.05

    def error(self, kind, start, n, why):
        # the driver adds 1 to H_FCLOSE before a force-close and 1 after the
        # reopen: odd while the vbd is closed or closing
        explained = self.model.w[H_FCLOSE] != self.fclose_seen or self.fclose_seen % 2 == 1
        self.model.add(H_ERR_EXPLAINED if explained else H_ERR_UNEXPLAINED)
        self.cl.log({"minor": self.minor, "op": kind, "block": start, "blocks": n,
                     "error": why, "explained": explained,
                     "reason": "vbd force-closed by the driver" if explained else None})

    def release(self, kind, start, n, acked):
        for b in range(start, start + n):
            self.busy[b] = 0
            if kind in ("write", "zero") and acked:
                self.model.cur[b] = self.model.pend[b]
                self.model.pend[b] = NONE
            elif kind in ("write", "zero"):
                self.doubt.append(b)

    # ---- requests ----

    def free_run(self, start, n):
        return not any(self.busy[start:start + n])

    def submit(self, kind, start, n, flags=0):
        try:
            self._submit(kind, start, n, flags)
        except nbd.Error as e:
            # refused before it was sent: the connection is dead
            self.error(kind, start, n, str(e))
            self.release(kind, start, n, acked=False)
            self.drop(str(e))

    def _submit(self, kind, start, n, flags):
        h = self.h
        off = start * BLOCK
        tag = None
        buf = None
        for b in range(start, start + n):
            self.busy[b] = 1
        if kind == "read":
            buf = self.buf_get(n)
            cookie = h.aio_pread(nbd.Buffer.from_buffer(buf), off)
        elif kind == "write":
            tag = self.cl.next_tag()
            for b in range(start, start + n):
                self.model.pend[b] = tag
            buf = bytearray(b"".join(block_data(tag, b) for b in range(start, start + n)))
            cookie = h.aio_pwrite(nbd.Buffer.from_buffer(buf), off, flags=flags)
        elif kind == "zero":
            tag = 0
            for b in range(start, start + n):
                self.model.pend[b] = 0
            cookie = h.aio_zero(n * BLOCK, off, flags=flags)
        else:   # flush
            cookie = h.aio_flush()
        self.inflight[cookie] = (kind, start, n, tag, buf)

    def completed(self, cookie, ok, why):
        kind, start, n, tag, buf = self.inflight.pop(cookie)
        m = self.model
        if not ok:
            self.error(kind, start, n, why)
            self.release(kind, start, n, acked=False)
            return
        if kind == "read":
            self.check(start, n, memoryview(buf))
            self.buf_put(n, buf)
            if not self.cl.final:       # the final pass is counted apart
                m.add(H_READS)
                m.add(H_BYTES_READ, n * BLOCK)
        elif kind == "write":
            m.add(H_WRITES)
            m.add(H_BYTES_WRITTEN, n * BLOCK)
        elif kind == "zero":
            m.add(H_ZEROES)
        elif kind == "flush":
            m.add(H_FLUSHES)
        self.release(kind, start, n, acked=True)

    def check(self, start, n, data):
        """A read came back: each block must hold its tag's data, or, in
        doubt, the pending write's (which then becomes the block's tag)."""
        m = self.model
        cur, pend = m.cur, m.pend
        for i in range(n):
            b = start + i
            got = data[i * BLOCK:(i + 1) * BLOCK]
            t = cur[b]
            if got == (ZERO_BLOCK if t == 0 else block_data(t, b)):
                if pend[b] != NONE:     # was in doubt: it holds its old data
                    pend[b] = NONE
                    m.add(H_RESOLVED)
                continue
            p = pend[b]
            if p != NONE and got == block_data(p, b):
                cur[b] = p
                pend[b] = NONE
                m.add(H_RESOLVED)
                continue
            m.add(H_MISMATCHES)
            gtag, gblk = struct.unpack("<QQ", got[:16])
            self.cl.log({"minor": self.minor, "mismatch": True, "block": b,
                         "expected": ["%#x" % t for t in m.allowed(b)],
                         "found_tag": "%#x" % gtag, "found_block": gblk})

    def fill(self, rng, qd, budget):
        """Issues requests up to qd in flight; returns how many it sent."""
        sent = 0
        while self.h and len(self.inflight) < qd and sent < budget:
            if self.doubt:
                b = self.doubt.pop()
                if self.model.pend[b] == NONE or self.busy[b]:
                    continue
                self.submit("read", b, 1)
                sent += 1
                continue
            if self.cl.final:
                if self.final_next is None or self.final_next >= self.nblocks:
                    break
                n = min(FINAL_BLOCKS, self.nblocks - self.final_next)
                if not self.free_run(self.final_next, n):
                    break
                self.submit("read", self.final_next, n)
                self.final_next += n
                sent += 1
                continue
            r = rng.random()
            n = rng.choice((1, 1, 2, 4, 8, 16, 32)) if r > 0.02 else 256
            n = min(n, self.nblocks)
            start = rng.randrange(0, self.nblocks - n + 1)
            if not self.free_run(start, n):
                sent += 1       # a collision costs a try
                continue
            if r < 0.48:
                self.submit("read", start, n)
            elif r < 0.88:
                self.submit("write", start, n, flags=nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
            elif r < 0.97:
                self.submit("zero", start, n)
            else:
                self.submit("flush", 0, 0)
            sent += 1
        return sent


class Client:
    def __init__(self, spec):
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        self.tag_base = (spec["client"] << 52) | (spec["incarnation"] << 40)
        self.tag_n = 0
        self.final = False
        self.logf = open(spec["log"], "a", buffering=1)
        self.vbds = [Vbd(v, self) for v in spec["vbds"]]

    def next_tag(self):
        self.tag_n += 1
        return self.tag_base | self.tag_n

    def log(self, rec):
        rec["t"] = round(time.time(), 3)
        rec["client"] = self.spec["client"]
        self.logf.write(json.dumps(rec) + "\n")

    def pump(self, timeout):
        rd, wr, byfd = [], [], {}
        for v in self.vbds:
            if v.h is None:
                continue
            try:
                fd, d = v.h.aio_get_fd(), v.h.aio_get_direction()
            except nbd.Error as e:
                v.drop(str(e))
                continue
            byfd[fd] = v
            if d & nbd.AIO_DIRECTION_READ:
                rd.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wr.append(fd)
        if not byfd:
            time.sleep(timeout)
            return
        r, w, _ = select.select(rd, wr, [], timeout)
        for fd in set(r) | set(w):
            v = byfd[fd]
            try:
                if fd in r:
                    v.h.aio_notify_read()
                if v.h and fd in w:
                    v.h.aio_notify_write()
            except nbd.Error as e:
                v.drop(str(e))
                continue
        for v in byfd.values():
            if v.h is None:
                continue
            for cookie in list(v.inflight):
                try:
                    if not v.h.aio_command_completed(cookie):
                        continue
                    v.completed(cookie, True, None)
                except nbd.Error as e:
                    v.completed(cookie, False, str(e))
            if v.h and v.h.aio_is_dead():
                v.drop("connection dead")

    def run(self):
        stop = self.spec["stop"]
        qd, rate = self.spec["qd"], self.spec["rate"]
        tokens, last, next_stop_check = 0.0, time.time(), 0.0
        while True:
            now = time.time()
            tokens = min(rate, tokens + (now - last) * rate)
            last = now
            if now >= next_stop_check:
                next_stop_check = now + 0.2
                if not self.final and os.path.exists(stop):
                    self.final = True
                    self.final_t = time.time()
                    for v in self.vbds:
                        v.final_next = 0
            for v in self.vbds:
                if v.h is None and now >= v.retry_at:
                    v.connect()
            busy = False
            for v in self.rng.sample(self.vbds, len(self.vbds)):
                if v.h is None:
                    continue
                budget = len(self.vbds) * qd if self.final else int(tokens)
                got = v.fill(self.rng, qd, budget)
                tokens -= 0 if self.final else got
                busy = busy or bool(v.inflight)
            if self.final and all(v.h and not v.inflight and not v.doubt and
                                  v.final_next >= v.nblocks for v in self.vbds):
                break
            self.pump(0.05 if busy else 0.01)
        for v in self.vbds:
            v.model.w[H_FINAL_VERIFIED] = v.nblocks
            v.model.w[H_FINAL_DONE] = 1
            v.h.shutdown()
        sys.stderr.write("client %d: final pass of %d vbds in %.1f s\n" % (
            self.spec["client"], len(self.vbds), time.time() - self.final_t))


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    Client(spec).run()


if __name__ == "__main__":
    main()
