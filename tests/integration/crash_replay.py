"""Power-loss replay: the states a power loss could leave image files in,
rebuilt from a `tapdiskd --record-io` log (format: lib/io_record.h,
docs/CRASH-REPLAY.md), and the client-side model they are checked against.

The model of the disk under the files (the page cache): a write, punch,
zero-range or truncate reaches the file when it is submitted; it is durable
once it completed before the submission of a sync (fdatasync/fsync) of the
same file that has itself completed. At a crash point every durable change
is in the files; every other change submitted before it may be there or
not, in any combination, and a write may be torn at a 512-byte boundary
(its first sectors there, the rest not). Changes are applied in the order
they were submitted.

Crash points are just before and just after each sync completes (and the
log's end). For each,
states: none of the maybe-changes, all of them, each alone, each write torn
(alone, and on top of all the others), and seeded random subsets, in which
a write is also torn at a random sector boundary one time in four.
"""
import os
import random
import struct

HDR = struct.Struct("<IIQqQQII")
SUBMIT, COMPLETE, MARK = 1, 2, 3
K_READ, K_WRITE, K_FDATASYNC, K_FSYNC, K_FALLOCATE, K_TRUNCATE = range(6)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x1, 0x2, 0x10
SECTOR = 512


class Change:
    """One logged change or sync: sub and done are record indexes."""
    __slots__ = ("kind", "path", "offset", "length", "mode", "data", "sub", "done", "res")

    def __init__(self, kind, path, offset, length, mode, data, sub):
        self.kind, self.path, self.offset, self.length = kind, path, offset, length
        self.mode, self.data, self.sub = mode, data, sub
        self.done, self.res = None, None

    @property
    def is_sync(self):
        return self.kind in (K_FDATASYNC, K_FSYNC)


class Log:
    """A parsed recording: changes in submission order, and marks."""

    def __init__(self, path):
        with open(path, "rb") as f:
            buf = f.read()
        if buf[:8] != b"TDIOREC1":
            raise ValueError("%s: not a tapdiskd I/O record" % path)
        self.changes, self.marks = [], []
        by_id, pos, idx = {}, 8, 0
        while pos < len(buf):
            if pos + HDR.size > len(buf):
                raise ValueError("%s: truncated record at %d" % (path, pos))
            typ, kind, rid, res, off, length, mode, nlen = HDR.unpack_from(buf, pos)
            pos += HDR.size
            name = buf[pos:pos + nlen].decode()
            pos += nlen
            if typ == SUBMIT:
                data = None
                if kind == K_WRITE:
                    data = buf[pos:pos + length]
                    pos += length
                c = Change(kind, name, off, length, mode, data, idx)
                by_id[rid] = c
                self.changes.append(c)
            elif typ == COMPLETE:
                c = by_id.pop(rid)
                c.done, c.res = idx, res
            elif typ == MARK:
                self.marks.append((idx, name))
            else:
                raise ValueError("%s: record type %d at %d" % (path, typ, pos))
            idx += 1
        self.end = idx

    def crash_points(self):
        # just before a sync completes (what it covers may be lost) and just after
        done = [c.done for c in self.changes if c.is_sync and c.done is not None]
        pts = sorted(set(done) | {d + 1 for d in done})
        if not pts or pts[-1] != self.end:
            pts.append(self.end)
        return pts

    def marks_before(self, p):
        return [text for i, text in self.marks if i < p]

    def split(self, p):
        """(durable, maybe) changes submitted before crash point p, syncs left out."""
        synced = {}
        for c in self.changes:
            if c.is_sync and c.done is not None and c.done < p and c.res == 0:
                synced[c.path] = max(synced.get(c.path, -1), c.sub)
        durable, maybe = [], []
        for c in self.changes:
            if c.sub >= p or c.is_sync or c.kind == K_READ:
                continue
            ok = c.done is not None and c.done < p and c.res is not None and c.res >= 0
            if ok and c.done < synced.get(c.path, -1):
                durable.append(c)
            else:
                maybe.append(c)
        return durable, maybe


def apply_change(files, c, torn=None):
    """Applies c (or, torn, its first torn bytes) to files {path: bytearray}."""
    f = files.setdefault(c.path, bytearray())
    if c.kind == K_WRITE:
        data = c.data if torn is None else c.data[:torn]
        end = c.offset + len(data)
        if len(f) < end:
            f.extend(bytes(end - len(f)))
        f[c.offset:end] = data
    elif c.kind == K_TRUNCATE:
        if c.length < len(f):
            del f[c.length:]
        else:
            f.extend(bytes(c.length - len(f)))
    elif c.kind == K_FALLOCATE:
        end = c.offset + c.length
        if c.mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            stop = min(end, len(f))
            if stop > c.offset:
                f[c.offset:stop] = bytes(stop - c.offset)
        if not c.mode & FALLOC_FL_KEEP_SIZE and len(f) < end:
            f.extend(bytes(end - len(f)))


def tear_points(c):
    """Where a write may tear: bytes before each 512-byte boundary inside it."""
    first = (c.offset // SECTOR + 1) * SECTOR
    return [b - c.offset for b in range(first, c.offset + c.length, SECTOR)]


def states(durable, maybe, budget, rng, every_subset=False):
    """Up to budget states: lists of (change, bytes torn at or None), in submission order."""
    out, seen = [], set()

    def add(chosen):
        key = tuple((id(c), t) for c, t in chosen)
        if key not in seen and len(out) < budget:
            seen.add(key)
            out.append([(c, None) for c in durable] + chosen)

    add([])
    add([(c, None) for c in maybe])
    writes = [c for c in maybe if c.kind == K_WRITE and tear_points(c)]
    for i, c in enumerate(maybe):
        add([(c, None)])
        if i < len(writes):
            w = writes[i]
            cut = rng.choice(tear_points(w))
            add([(w, cut)])
            add([(x, cut if x is w else None) for x in maybe])
    if every_subset and len(maybe) <= 8:
        for bits in range(1 << len(maybe)):
            add([(c, None) for k, c in enumerate(maybe) if bits >> k & 1])
    tries = 0
    while len(out) < budget and len(maybe) > 1 and tries < 4 * budget:
        tries += 1     # small sets run out of new subsets: stop then
        chosen = []
        for c in maybe:
            if rng.random() < 0.5:
                continue
            # a write in the subset may also be torn: a power loss mid-write
            cuts = tear_points(c) if c.kind == K_WRITE else []
            chosen.append((c, rng.choice(cuts) if cuts and rng.random() < 0.25 else None))
        add(chosen)
    for s in out:
        s.sort(key=lambda ct: ct[0].sub)
    return out


def touched(c, torn=None):
    """The byte range of a file c may have changed."""
    if c.kind == K_WRITE:
        return c.offset, c.offset + (len(c.data) if torn is None else torn)
    if c.kind == K_TRUNCATE:
        return c.length, None           # from there to whichever end is longer
    return c.offset, c.offset + c.length


class Files:
    """The image files on disk. Between two states only the ranges either
    one changed (against the files as recorded at the start) are rewritten."""

    def __init__(self, base):
        self.base = {p: bytes(b) for p, b in base.items()}
        self.ranges = {}        # path: ranges the state on disk changed; absent: unknown
        self.stamp = {}

    def build(self, state):
        """({path: bytearray}, {path: [(start, end or None)]}) of a state."""
        files = {p: bytearray(b) for p, b in self.base.items()}
        ranges = {}
        for c, torn in state:
            apply_change(files, c, torn)
            ranges.setdefault(c.path, []).append(touched(c, torn))
        return files, ranges

    def write(self, built):
        files, ranges = built
        for p, want in files.items():
            mine = ranges.get(p, [])
            if p not in self.ranges or not os.path.exists(p):
                with open(p, "wb") as f:
                    f.write(want)
            else:
                with open(p, "r+b") as f:
                    f.truncate(len(want))
                    for a, b in self.ranges[p] + mine:
                        b = len(want) if b is None else min(b, len(want))
                        if a < b:
                            f.seek(a)
                            f.write(want[a:b])
            self.ranges[p] = mine
            st = os.stat(p)
            self.stamp[p] = (st.st_size, st.st_mtime_ns)

    def forget_changed(self):
        """After a check that may have written (a repair at open): rewrite those whole."""
        for p, st in list(self.stamp.items()):
            try:
                now = os.stat(p)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_size, now.st_mtime_ns) != st:
                self.ranges.pop(p, None)


# ---- the client's side: what each sector may hold ----

PARENT = 1           # the data a differencing child's parent holds


def sector_bytes(wid, s):
    if wid == 0:
        return bytes(SECTOR)
    return struct.pack("<4sIQ", b"TDCR", wid, s) + bytes([wid % 251 + 1]) * (SECTOR - 16)


def pattern(wid, offset, length):
    s0 = offset // SECTOR
    return b"".join(sector_bytes(wid, s0 + i) for i in range(length // SECTOR))


def decode(buf, s):
    """The writer of sector s as read in buf (512 bytes): its id, or None for garbage."""
    if buf == bytes(SECTOR):
        return 0
    magic, wid, sec = struct.unpack_from("<4sIQ", buf)
    if magic != b"TDCR" or sec != s or buf != sector_bytes(wid, s):
        return None
    return wid


class ClientOp:
    __slots__ = ("wid", "kind", "offset", "length", "round", "fua")

    def __init__(self, wid, kind, offset, length, rnd, fua=False):
        self.wid, self.kind, self.offset, self.length = wid, kind, offset, length
        self.round, self.fua = rnd, fua

    def value(self):
        return 0 if self.kind in ("zero", "trim") else self.wid


class Model:
    """What a client did to one disk, round by round; flush j follows round j."""

    def __init__(self, size, base=0):
        self.size, self.base = size, base
        self.ops = []
        self.next_wid = PARENT + 1

    def add(self, kind, offset, length, rnd, fua=False):
        op = ClientOp(self.next_wid, kind, offset, length, rnd, fua)
        self.next_wid += 1
        self.ops.append(op)
        return op

    def acceptable(self, flushes, fua_done):
        """Per sector: the set of writer ids it may hold, given flushes acknowledged
        (the count) and the FUA writes acknowledged ({(offset, length)})."""
        acc = [None] * (self.size // SECTOR)     # None: {base} untouched
        for op in sorted(self.ops, key=lambda o: o.round):
            durable = op.round <= flushes or (op.fua and (op.offset, op.length) in fua_done)
            v = op.value()
            for s in range(op.offset // SECTOR, (op.offset + op.length) // SECTOR):
                cur = acc[s] if acc[s] is not None else {self.base}
                if op.kind == "trim":      # a hint: old data or zeros
                    acc[s] = cur | {0}
                elif durable:
                    acc[s] = {v}
                else:
                    acc[s] = cur | {v}
        return acc

    def render(self, acc):
        """The disk as it reads if every sector holds the newest value it may hold."""
        out = bytearray(self.size)
        for s, want in enumerate(acc):
            v = max(want) if want is not None else self.base
            if v:
                out[s * SECTOR:(s + 1) * SECTOR] = sector_bytes(v, s)
        return bytes(out)

    def check(self, data, acc, rendered=None):
        """Problems (at most 5 lines) with data, the whole disk as read. Chunks
        equal to rendered (render(acc)) are right as a whole; the others are
        looked at sector by sector."""
        bad = []
        big, chunk = 1 << 20, 4096
        suspects = []
        for b0 in range(0, self.size, big):
            if rendered is not None and data[b0:b0 + big] == rendered[b0:b0 + big]:
                continue
            suspects += [c0 for c0 in range(b0, min(b0 + big, self.size), chunk)
                         if rendered is None or data[c0:c0 + chunk] != rendered[c0:c0 + chunk]]
        for c0 in suspects:
            for s in range(c0 // SECTOR, (c0 + chunk) // SECTOR):
                want = acc[s] if acc[s] is not None else {self.base}
                got = decode(data[s * SECTOR:(s + 1) * SECTOR], s)
                if got not in want:
                    bad.append("sector %d: holds %s, may hold %s" % (
                        s, "garbage" if got is None else "write %d" % got, sorted(want)))
                    if len(bad) >= 5:
                        return bad
        return bad


def marks_state(marks, minor):
    """(flushes, fua_done, leaf params or None) acknowledged in marks for minor."""
    flushes, fua, leaf = 0, set(), None
    for text in marks:
        w = text.split()
        if int(w[1]) != minor:
            continue
        if w[0] == "flush":
            flushes += 1
        elif w[0] == "fua":
            fua.add((int(w[2]), int(w[3])))
        elif w[0] == "snapshot":
            leaf = w[2]
    return flushes, fua, leaf


def seeded(seed):
    return random.Random(seed)
