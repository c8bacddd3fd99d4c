#!/usr/bin/python3
"""A small xenstored for tests: the xenstore wire protocol (xen/io/xs_wire.h)
over a UNIX socket, so that the real libxenstore (in tapdiskd, through
XENSTORED_PATH) and the real xenstore-utils (xenstore-write, -read, -ls,
-rm, as toolstack and frontend) can talk to it. One store in memory.
A transaction buffers its writes and removals and applies them at its end,
or fails with EAGAIN if anyone changed the store meanwhile (coarser than
xenstored, same contract). Permissions are accepted and not enforced;
watches fire as xenstored's do: once when set, then for every change at or
below the watched path. Every domain counts as introduced until an
XS_RELEASE names it (what xenstored does when a domain dies), which fires
the @releaseDomain watches; XS_INTRODUCE brings it back.

usage: xenstored.py SOCKET        (prints "ready" when it listens)
"""

import asyncio
import os
import struct
import sys

(XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH,
 XS_TRANSACTION_START, XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE,
 XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS, XS_WATCH_EVENT,
 XS_ERROR, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET) = range(20)
XS_RESET_WATCHES = XS_SET_TARGET + 2
XS_DIRECTORY_PART = XS_RESET_WATCHES + 1
HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096


class Store:
    def __init__(self):
        self.nodes = {"/": b""}
        self.watches = []          # (conn, path, token)
        self.gen = 0               # bumped by every change
        self.released = set()      # domids: XS_IS_DOMAIN_INTRODUCED says F

    @staticmethod
    def norm(path):
        if not path.startswith("/") and not path.startswith("@"):
            path = "/local/domain/0/" + path
        return path.rstrip("/") or "/"

    def children(self, path):
        pre = path.rstrip("/") + "/"
        out = []
        for p in self.nodes:
            if p != path and p.startswith(pre) and "/" not in p[len(pre):]:
                out.append(p[len(pre):])
        return sorted(out)

    def write(self, path, value):
        parts = path.split("/")
        for i in range(2, len(parts)):
            self.nodes.setdefault("/".join(parts[:i]), b"")
        self.nodes[path] = value
        self.gen += 1
        self.fire(path)

    def mkdir(self, path):
        if path not in self.nodes:
            self.write(path, b"")

    def rm(self, path):
        if path not in self.nodes:
            return False
        pre = path + "/"
        gone = [p for p in self.nodes if p == path or p.startswith(pre)]
        for p in gone:
            del self.nodes[p]
        self.gen += 1
        self.fire(path)
        # watches set below the removed node hear of it too
        for conn, wpath, token in list(self.watches):
            if wpath.startswith(pre):
                conn.event(wpath, token)
        return True

    def fire(self, path):
        for conn, wpath, token in list(self.watches):
            if path == wpath or path.startswith(wpath.rstrip("/") + "/"):
                conn.event(path, token)


class Conn:
    def __init__(self, store, reader, writer):
        self.store, self.reader, self.writer = store, reader, writer
        self.tx = 0
        self.txs = {}              # id -> (store.gen at start, [buffered ops])

    def send(self, mtype, req_id, tx_id, payload):
        self.writer.write(HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload)

    def event(self, path, token):
        self.send(XS_WATCH_EVENT, 0, 0, path.encode() + b"\0" + token.encode() + b"\0")

    async def serve(self):
        try:
            while True:
                hdr = await self.reader.readexactly(HEADER.size)
                mtype, req_id, tx_id, length = HEADER.unpack(hdr)
                if length > PAYLOAD_MAX:
                    break
                payload = await self.reader.readexactly(length)
                self.handle(mtype, req_id, tx_id, payload)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            pass
        finally:
            self.store.watches = [w for w in self.store.watches if w[0] is not self]
            self.writer.close()

    def reply(self, mtype, req_id, tx_id, payload):
        self.send(mtype, req_id, tx_id, payload)

    def error(self, req_id, tx_id, name):
        self.send(XS_ERROR, req_id, tx_id, name.encode() + b"\0")

    def tx_view(self, tx_id, path):
        """A read inside a transaction: its own buffered changes first."""
        for op, p, value in reversed(self.txs[tx_id][1]):
            if op == "write" and p == path:
                return value
            if op == "rm" and (p == path or path.startswith(p + "/")):
                return None
        return self.store.nodes.get(path)

    def tx_handle(self, mtype, req_id, tx_id, payload):
        """Requests inside a transaction; False if not one of them."""
        s, ops = self.store, self.txs[tx_id][1]
        args = payload.split(b"\0")
        if mtype == XS_READ:
            v = self.tx_view(tx_id, s.norm(args[0].decode()))
            if v is None:
                self.error(req_id, tx_id, "ENOENT")
            else:
                self.reply(mtype, req_id, tx_id, v)
        elif mtype == XS_WRITE:
            path, _, value = payload.partition(b"\0")
            ops.append(("write", s.norm(path.decode()), value))
            self.reply(mtype, req_id, tx_id, b"OK\0")
        elif mtype == XS_MKDIR:
            p = s.norm(args[0].decode())
            if self.tx_view(tx_id, p) is None:
                ops.append(("write", p, b""))
            self.reply(mtype, req_id, tx_id, b"OK\0")
        elif mtype == XS_RM:
            p = s.norm(args[0].decode())
            if self.tx_view(tx_id, p) is None:
                return self.error(req_id, tx_id, "ENOENT") or True
            ops.append(("rm", p, None))
            self.reply(mtype, req_id, tx_id, b"OK\0")
        elif mtype == XS_TRANSACTION_END:
            gen, ops = self.txs.pop(tx_id)
            if args[0] == b"T":
                if gen != s.gen:
                    return self.error(req_id, tx_id, "EAGAIN") or True
                for op, p, value in ops:
                    if op == "write":
                        s.write(p, value)
                    else:
                        s.rm(p)
            self.reply(mtype, req_id, 0, b"OK\0")
        else:
            return False
        return True

    def handle(self, mtype, req_id, tx_id, payload):
        s = self.store
        args = payload.split(b"\0")
        ok = b"OK\0"
        if tx_id:
            if tx_id not in self.txs:
                return self.error(req_id, tx_id, "ENOENT")
            if self.tx_handle(mtype, req_id, tx_id, payload):
                return
        if mtype == XS_READ:
            p = s.norm(args[0].decode())
            if p not in s.nodes:
                return self.error(req_id, tx_id, "ENOENT")
            return self.reply(mtype, req_id, tx_id, s.nodes[p])
        if mtype == XS_WRITE:
            path, _, value = payload.partition(b"\0")
            s.write(s.norm(path.decode()), value)
            return self.reply(mtype, req_id, tx_id, ok)
        if mtype == XS_MKDIR:
            s.mkdir(s.norm(args[0].decode()))
            return self.reply(mtype, req_id, tx_id, ok)
        if mtype == XS_RM:
            if not s.rm(s.norm(args[0].decode())):
                return self.error(req_id, tx_id, "ENOENT")
            return self.reply(mtype, req_id, tx_id, ok)
        if mtype == XS_DIRECTORY:
            p = s.norm(args[0].decode())
            if p not in s.nodes:
                return self.error(req_id, tx_id, "ENOENT")
            return self.reply(mtype, req_id, tx_id,
                              b"".join(c.encode() + b"\0" for c in s.children(p)))
        if mtype == XS_WATCH:
            path, token = s.norm(args[0].decode()), args[1].decode()
            s.watches.append((self, path, token))
            self.reply(mtype, req_id, tx_id, ok)
            self.event(path, token)         # xenstored fires once when set
            return
        if mtype == XS_UNWATCH:
            path, token = s.norm(args[0].decode()), args[1].decode()
            s.watches = [w for w in s.watches
                         if not (w[0] is self and w[1] == path and w[2] == token)]
            return self.reply(mtype, req_id, tx_id, ok)
        if mtype == XS_TRANSACTION_START:
            self.tx += 1
            self.txs[self.tx] = (s.gen, [])
            return self.reply(mtype, req_id, tx_id, b"%d\0" % self.tx)
        if mtype == XS_GET_DOMAIN_PATH:
            return self.reply(mtype, req_id, tx_id, b"/local/domain/" + args[0] + b"\0")
        if mtype == XS_GET_PERMS:
            if s.norm(args[0].decode()) not in s.nodes:
                return self.error(req_id, tx_id, "ENOENT")
            return self.reply(mtype, req_id, tx_id, b"n0\0")
        if mtype == XS_IS_DOMAIN_INTRODUCED:
            gone = int(args[0]) in s.released
            return self.reply(mtype, req_id, tx_id, b"F\0" if gone else b"T\0")
        if mtype in (XS_RELEASE, XS_INTRODUCE):
            domid = int(args[0])
            if mtype == XS_RELEASE:
                s.released.add(domid)
            else:
                s.released.discard(domid)
            self.reply(mtype, req_id, tx_id, ok)
            s.fire("@releaseDomain" if mtype == XS_RELEASE else "@introduceDomain")
            return
        if mtype in (XS_SET_PERMS, XS_RESUME,
                     XS_SET_TARGET, XS_RESET_WATCHES, XS_CONTROL):
            return self.reply(mtype, req_id, tx_id, ok)
        return self.error(req_id, tx_id, "EINVAL")


async def main(path):
    store = Store()

    async def client(reader, writer):
        await Conn(store, reader, writer).serve()

    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(client, path=path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
