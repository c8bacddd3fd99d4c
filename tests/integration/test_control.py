"""The control socket against bad input: garbage, truncated and oversized
lines, wrong envelopes, and every argument of every command (taken from
schema/) with a wrong type, missing, or unknown. Each gets a clear error
naming the field; the server keeps serving everyone else."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import SCHEMAS, SCHEMA_BASE, Control, schema, validate

# the second engine's pass skips these (see pytest.ini)
pytestmark = pytest.mark.engine_independent


def raw_call(server, payload):
    """Sends raw bytes (which must end the request) and returns the response."""
    c = Control(server.ctl_path)
    c.send_line(payload)
    resp = c.read_line()
    c.close()
    validate(resp, "response.json")
    return resp


def error_of(resp):
    assert resp["ok"] is False, resp
    return resp["error"]["code"], resp["error"]["message"]


@pytest.mark.parametrize("payload,needle", [
    (b"hello\n", "not valid JSON"),
    (b"{\"cmd\": \"list\"\n", "not valid JSON"),
    (b"[1,2,3]\n", "must be a JSON object"),
    (b"42\n", "must be a JSON object"),
    (b"{}\n", "missing field 'cmd'"),
    (b"{\"cmd\": 7}\n", "field 'cmd' must be a string"),
    (b"{\"cmd\": \"list\", \"id\": [1]}\n", "field 'id'"),
    (b"{\"cmd\": \"list\", \"args\": []}\n", "field 'args' must be an object"),
    (b"{\"cmd\": \"list\", \"extra\": 1}\n", "unknown field 'extra'"),
    (b"{\"cmd\": \"launch-missiles\"}\n", "unknown command 'launch-missiles'"),
    (b"{\"cmd\": \"list\", \"cmd\": \"version\"}\n", "not valid JSON"),
    (b"\xff\xfe\x00garbage\n", "not valid JSON"),
])
def test_bad_envelopes(server, payload, needle):
    code, msg = error_of(raw_call(server, payload))
    assert code == "EINVAL" and needle in msg, msg
    assert server.call("version")["ok"]


def test_connection_survives_garbage(server):
    c = Control(server.ctl_path)
    c.send_line(b"garbage\n\n\r\n{\"id\": \"a\", \"cmd\": \"version\"}\r\n"
                b"{\"id\": 2, \"cmd\": \"list\"}\n")
    first = c.read_line()
    assert first["ok"] is False and first["id"] is None
    second = c.read_line()
    assert second["ok"] and second["id"] == "a"
    third = c.read_line()
    assert third["ok"] and third["id"] == 2
    c.close()


def commands():
    return sorted(k[len(SCHEMA_BASE):-len(".args.json")] for k in SCHEMAS
                  if k.endswith(".args.json"))


WRONG = {"integer": "seven", "string": 7, "boolean": "yes", "object": 7}


def test_every_command_has_schemas():
    cmds = commands()
    assert set(cmds) == set(schema("request.json")["properties"]["cmd"]["enum"])
    for c in cmds:
        assert SCHEMA_BASE + c + ".result.json" in SCHEMAS


@pytest.mark.parametrize("cmd", commands())
def test_argument_checks_follow_schema(server, cmd):
    """The server's argument table and schema/<cmd>.args.json agree."""
    s = schema(cmd + ".args.json")
    props, required = s["properties"], s.get("required", [])
    good = {"integer": 0, "string": "ram:1M", "boolean": False, "object": {}}

    def base():
        return {k: good[props[k]["type"]] for k in required}

    for name, p in props.items():
        args = base()
        args[name] = WRONG[p["type"]]
        resp = raw_call(server, json.dumps({"id": 1, "cmd": cmd, "args": args}).encode() + b"\n")
        code, msg = error_of(resp)
        assert code == "EINVAL" and "'%s'" % name in msg and "must be" in msg, (cmd, name, msg)
    for name in required:
        args = base()
        del args[name]
        code, msg = error_of(raw_call(server, json.dumps({"cmd": cmd, "args": args}).encode() + b"\n"))
        assert code == "EINVAL" and "missing argument '%s'" % name in msg, msg
    args = base()
    args["bogus"] = 1
    code, msg = error_of(raw_call(server, json.dumps({"cmd": cmd, "args": args}).encode() + b"\n"))
    assert code == "EINVAL" and "unknown argument 'bogus'" in msg, msg


@pytest.mark.parametrize("cmd", ["close", "destroy", "pause", "unpause", "stats", "open"])
def test_minor_out_of_range(server, cmd):
    args = {"minor": 99999}
    if cmd == "open":
        args["params"] = "ram:1M"
    code, msg = error_of(server.call(cmd, check=False, **args))
    assert code == "EINVAL" and "out of range" in msg


@pytest.mark.parametrize("cmd", ["close", "destroy", "pause", "unpause", "stats"])
def test_no_such_vbd(server, cmd):
    code, msg = error_of(server.call(cmd, check=False, minor=12))
    assert code == "ENOENT" and "12" in msg


def test_oversized_line_disconnects_only_that_client(server):
    other = Control(server.ctl_path)
    c = Control(server.ctl_path)
    chunk = b"x" * 65536
    try:
        for _ in range(20):                      # 1.25 MiB without a newline
            c.send_line(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = c.read_line()
    assert resp["ok"] is False and resp["error"]["code"] == "E2BIG"
    with pytest.raises((EOFError, ConnectionResetError)):
        c.read_line()
    assert other.call("version")["ok"]
    other.close()


def send_then_half_close(server, payload):
    """Sends payload, shuts down the write side, returns all that comes back."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.ctl_path)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        d = s.recv(4096)
        if not d:
            return data
        data += d


def test_truncated_request_at_eof_gets_an_answer(server):
    resp = json.loads(send_then_half_close(server, b'{"id": 5, "cmd": "vers'))
    validate(resp, "response.json")
    assert resp["ok"] is False and "truncated" in resp["error"]["message"]


def test_request_then_half_close_still_answered(server):
    data = send_then_half_close(server, b'{"id": 9, "cmd": "open", "args": {"params": "ram:1M"}}\n')
    resp = json.loads(data)
    assert resp["ok"] and resp["id"] == 9 and resp["result"]["minor"] == 0


def test_pipelined_requests_answered_in_order(server):
    c = Control(server.ctl_path)
    reqs = b"".join(json.dumps({"id": i, "cmd": "list"}).encode() + b"\n" for i in range(200))
    c.send_line(reqs)
    ids = [c.read_line()["id"] for _ in range(200)]
    assert ids == list(range(200))
    c.close()


def test_more_requests_owed_than_a_client_may_have_pending(server):
    """A client may have 64 requests unanswered: the server stops reading its
    input there and goes on as replies leave. 80 opens (each answered once
    its worker is done) in one write all get their answer."""
    c = Control(server.ctl_path)
    reqs = b"".join(json.dumps({"id": i, "cmd": "open",
                                "args": {"minor": i, "params": "ram:64K"}}).encode() + b"\n"
                    for i in range(80))
    c.send_line(reqs)
    resps = [c.read_line() for _ in range(80)]
    assert sorted(r["id"] for r in resps) == list(range(80))
    assert all(r["ok"] for r in resps), [r for r in resps if not r["ok"]][:3]
    assert len(c.call("list")["result"]["vbds"]) == 80
    c.close()


def test_many_clients(server):
    cs = [Control(server.ctl_path) for _ in range(100)]
    for i, c in enumerate(cs):
        assert c.call("version")["ok"]
    for c in cs[::2]:
        c.close()
    for c in cs[1::2]:
        assert c.call("list")["ok"]
        c.close()


def test_client_vanishing_mid_pause(server):
    """A reply that finds its client gone is dropped; nothing else breaks."""
    server.open("ram:1M")
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.ctl_path)
    s.sendall(b'{"cmd": "pause", "args": {"minor": 0}}\n')
    s.close()
    assert server.call("version")["ok"]
    # the pause went through regardless
    for _ in range(100):
        if server.call("list")["result"]["vbds"][0]["state"] == 0x20:
            break
    assert server.call("list")["result"]["vbds"][0]["state"] == 0x20


def test_other_uid_is_refused(make_server):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid (setpriv)")
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="tapdiskd-uid-")   # /tmp/pytest-of-root is 0700
    try:
        os.chmod(d, 0o755)
        srv = make_server(name=os.path.join(d, "state"))
        os.chmod(srv.state_dir, 0o755)
        os.chmod(srv.ctl_path, 0o666)      # let the connect through: the server must refuse
        # the refusal comes at once, before any request
        probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                 "print(s.recv(4096).decode())")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "/usr/bin/python3", "-c", probe, srv.ctl_path],
                           capture_output=True, text=True, timeout=20)
        resp = json.loads(r.stdout)
        validate(resp, "response.json")
        assert resp["ok"] is False and resp["error"]["code"] == "EACCES"
        assert srv.call("version")["ok"]
        srv.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_string_and_null_ids_echoed(server):
    c = Control(server.ctl_path)
    c.send_line(b'{"id": "abc", "cmd": "version"}\n{"id": null, "cmd": "version"}\n{"cmd": "version"}\n')
    assert c.read_line()["id"] == "abc"
    assert c.read_line()["id"] is None
    assert c.read_line()["id"] is None
    c.close()


@pytest.mark.parametrize("payload", [
    # each one-byte prefix puts a length limit in the middle of a character
    '{"id": 1, "cmd": "open", "args": {"params": "aio:/nonexistent/x%s"}}' % ("\u00e9" * 300),
    '{"id": 1, "cmd": "a%s"}' % ("\u011b" * 40),
    '{"id": 1, "cmd": "list", "x%s": 1}' % ("\u00e9" * 200),
])
def test_error_messages_cut_inside_utf8_still_answer(server, payload):
    """Error messages quote the client and are length-limited; a cut inside a
    multi-byte character must not cost the client its response."""
    resp = raw_call(server, payload.encode() + b"\n")
    assert resp["ok"] is False and resp["id"] in (1, None)
    assert resp["error"]["message"]
