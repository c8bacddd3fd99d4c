"""cbt-util against CBT logs built byte by byte here, from the format as
docs/CBT-LOG.md writes it down (header: parent UUID, child UUID, int32 flag,
4 bytes of padding, uint64 size, little-endian; then one bit per 64 KiB
block, least significant bit first): what get prints, the exact bytes that
create, set and coalesce leave, and one stderr line and a non-zero exit for
every log, argument or command line it refuses (the log left as it was)."""

import os
import stat
import struct
import subprocess
import uuid

import pytest

from conftest import BIN

pytestmark = pytest.mark.engine_independent

BLOCK = 64 * 1024
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
P_UUID = "6f1c0b8e-5d8a-4c57-9a53-4a4d1e1f2a3b"
C_UUID = "0a1b2c3d-4e5f-4071-8293-a4b5c6d7e8f9"


def bitmap_len(size):
    blocks = (size + BLOCK - 1) // BLOCK
    return (blocks + 7) // 8


def log_bytes(size, parent=ZERO_UUID, child=ZERO_UUID, flag=0, bitmap=None, raw_size=None):
    """A whole log: the 48-byte header and the bitmap (zeros unless given)."""
    if bitmap is None:
        bitmap = bytes(bitmap_len(size))
    head = struct.pack("<16s16si4xQ", uuid.UUID(parent).bytes, uuid.UUID(child).bytes, flag,
                       size if raw_size is None else raw_size)
    assert len(head) == 48
    return head + bytes(bitmap)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def cbt(*args):
    return subprocess.run([os.path.join(BIN, "cbt-util")] + [str(a) for a in args],
                          capture_output=True, timeout=60)


def ok(*args):
    r = cbt(*args)
    assert r.returncode == 0 and r.stderr == b"", (args, r.returncode, r.stderr)
    return r.stdout


def refused(*args, status=1):
    """One line on stderr, 'cbt-util: ...', and the status; returns that line."""
    r = cbt(*args)
    err = r.stderr.decode()
    assert r.returncode == status, (args, r.returncode, err)
    assert err.count("\n") == 1 and err.endswith("\n") and err.startswith("cbt-util: "), (args, err)
    return err, r.stdout


# ---- get ----

@pytest.mark.parametrize("size", [1, BLOCK, BLOCK + 1, 8 * BLOCK + 1, 10 << 30])
def test_get_reads_every_field(tmp_path, size):
    bm = bytes((i * 37 + 1) & 0xff for i in range(bitmap_len(size)))
    log = write(tmp_path / "a.log", log_bytes(size, P_UUID, C_UUID, 1, bm))
    assert ok("get", "-n", log, "-p") == (P_UUID + "\n").encode()
    assert ok("get", "-n", log, "-c") == (C_UUID + "\n").encode()
    assert ok("get", "-n", log, "-f") == b"1\n"
    assert ok("get", "-n", log, "-s") == b"%d\n" % size
    assert ok("get", "-n", log, "-b") == bm


def test_get_zero_fields_and_slack(tmp_path):
    # a longer file than header + bitmap is accepted; -b gives the bitmap only
    log = write(tmp_path / "z.log", log_bytes(3 * BLOCK, bitmap=b"\x05") + b"\xff" * 100)
    assert ok("get", "-n", log, "-p") == (ZERO_UUID + "\n").encode()
    assert ok("get", "-n", log, "-c") == (ZERO_UUID + "\n").encode()
    assert ok("get", "-n", log, "-f") == b"0\n"
    assert ok("get", "-n", log, "-b") == b"\x05"
    # uppercase or not, a UUID prints lowercase
    log2 = write(tmp_path / "u.log", log_bytes(BLOCK, parent=P_UUID.upper()))
    assert ok("get", "-n", log2, "-p") == (P_UUID + "\n").encode()


# ---- create ----

@pytest.mark.parametrize("size", [1, BLOCK, BLOCK + 1, 8 * BLOCK, 8 * BLOCK + 1, 10 << 30])
def test_create_writes_exactly_the_format(tmp_path, size):
    log = tmp_path / "c.log"
    assert ok("create", "-n", log, "-s", size) == b""
    assert read(log) == log_bytes(size)


def test_create_replaces_an_existing_file(tmp_path):
    log = write(tmp_path / "old.log", b"x" * 5000)
    ok("create", "-n", log, "-s", 2 * BLOCK)
    assert read(log) == log_bytes(2 * BLOCK)


# ---- set ----

def test_set_changes_exactly_the_fields_given(tmp_path):
    size = 20 * BLOCK
    bm = b"\x81\x00\xff"
    log = write(tmp_path / "s.log", log_bytes(size, bitmap=bm))
    ok("set", "-n", log, "-p", P_UUID)
    assert read(log) == log_bytes(size, P_UUID, ZERO_UUID, 0, bm)
    ok("set", "-n", log, "-c", C_UUID)
    assert read(log) == log_bytes(size, P_UUID, C_UUID, 0, bm)
    ok("set", "-n", log, "-f", "1")
    assert read(log) == log_bytes(size, P_UUID, C_UUID, 1, bm)
    ok("set", "-n", log, "-f", "0", "-p", C_UUID, "-c", P_UUID.upper())
    assert read(log) == log_bytes(size, C_UUID, P_UUID, 0, bm)


def test_set_size_grows_with_zeros_and_keeps_bits(tmp_path):
    size = 20 * BLOCK                                   # 20 blocks: 3 bytes, the last with 4
    bm = b"\x81\x5a\x0f"
    log = write(tmp_path / "g.log", log_bytes(size, P_UUID, C_UUID, 1, bm))
    new = 1000 * BLOCK + 17
    ok("set", "-n", log, "-s", new)
    assert read(log) == log_bytes(new, P_UUID, C_UUID, 1, bm + bytes(bitmap_len(new) - 3))
    assert ok("get", "-n", log, "-s") == b"%d\n" % new
    # the same size again changes nothing
    before = read(log)
    ok("set", "-n", log, "-s", new)
    assert read(log) == before
    # growing with other fields in the same call
    ok("set", "-n", log, "-s", new + 8 * BLOCK, "-f", "0", "-p", ZERO_UUID)
    assert read(log) == log_bytes(new + 8 * BLOCK, ZERO_UUID, C_UUID, 0,
                                  bm + bytes(bitmap_len(new + 8 * BLOCK) - 3))


def test_set_size_growth_clears_slack_bits(tmp_path):
    # 3 blocks: bits 3..7 of the one byte are past the disk's end (slack);
    # once the disk grows over them they are blocks, never written
    log = write(tmp_path / "k.log", log_bytes(3 * BLOCK, bitmap=b"\xfd"))
    ok("set", "-n", log, "-s", 20 * BLOCK)
    assert read(log) == log_bytes(20 * BLOCK, bitmap=b"\x05\x00\x00")


def test_set_size_smaller_is_refused(tmp_path):
    log = write(tmp_path / "m.log", log_bytes(20 * BLOCK, bitmap=b"\x01\x02\x03"))
    before = read(log)
    err, _ = refused("set", "-n", log, "-s", 20 * BLOCK - 1)
    assert "size smaller than current" in err and str(20 * BLOCK) in err
    assert read(log) == before


# ---- coalesce ----

def test_coalesce_ors_the_parent_into_the_child(tmp_path):
    size = 24 * BLOCK
    parent = write(tmp_path / "p.log", log_bytes(size, P_UUID, C_UUID, 1, b"\x0f\x00\x81"))
    child = write(tmp_path / "c.log", log_bytes(size, C_UUID, ZERO_UUID, 0, b"\xf0\x01\x80"))
    pbefore = read(parent)
    assert ok("coalesce", "-p", parent, "-c", child) == b""
    assert read(child) == log_bytes(size, C_UUID, ZERO_UUID, 0, b"\xff\x01\x81")
    assert read(parent) == pbefore


def test_coalesce_smaller_parent_into_larger_child(tmp_path):
    parent = write(tmp_path / "p.log", log_bytes(16 * BLOCK, bitmap=b"\x03\xc0"))
    child = write(tmp_path / "c.log", log_bytes(40 * BLOCK, bitmap=b"\x10\x00\x00\x00\x20"))
    ok("coalesce", "-p", parent, "-c", child)
    assert read(child) == log_bytes(40 * BLOCK, bitmap=b"\x13\xc0\x00\x00\x20")


def test_coalesce_ignores_the_parents_slack_bits(tmp_path):
    # same bitmap length, but the parent's disk has 8 blocks, the child's 3:
    # the parent's bits 3..7 are blocks the child does not have
    parent = write(tmp_path / "p.log", log_bytes(8 * BLOCK, bitmap=b"\xfa"))
    child = write(tmp_path / "c.log", log_bytes(3 * BLOCK, bitmap=b"\x01"))
    ok("coalesce", "-p", parent, "-c", child)
    assert read(child) == log_bytes(3 * BLOCK, bitmap=b"\x03")


def test_coalesce_refuses_a_larger_parent(tmp_path):
    parent = write(tmp_path / "p.log", log_bytes(9 * BLOCK, bitmap=b"\xff\x01"))
    child = write(tmp_path / "c.log", log_bytes(8 * BLOCK, bitmap=b"\x00"))
    err, _ = refused("coalesce", "-p", parent, "-c", child)
    assert "larger" in err
    assert read(child) == log_bytes(8 * BLOCK, bitmap=b"\x00")


# ---- refusals: one line, non-zero, nothing changed ----

def damaged_logs(tmp_path):
    """name -> (path, the words its error must have, one of them for a tuple)."""
    d = tmp_path / "dir.log"
    d.mkdir()
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    full = log_bytes(20 * BLOCK)
    return {
        "truncated": (write(tmp_path / "t.log", full[:-1]), "shorter"),
        "header-only": (write(tmp_path / "h.log", full[:48]), "shorter"),
        "short-header": (write(tmp_path / "s.log", full[:47]), "shorter"),
        "empty": (write(tmp_path / "e.log", b""), "shorter"),
        # open(2) refuses a directory for writing before we can look
        "directory": (str(d), ("not a regular file", "Is a directory")),
        "fifo": (str(fifo), "regular file"),
        "missing": (str(tmp_path / "none.log"), "No such file"),
        "size-0": (write(tmp_path / "0.log", log_bytes(BLOCK, raw_size=0)), "is 0"),
        "size-absurd": (write(tmp_path / "big.log", log_bytes(BLOCK, raw_size=1 << 60)),
                        "too large"),
        "flag-7": (write(tmp_path / "7.log", log_bytes(BLOCK, flag=7)), "flag"),
        "flag-minus-1": (write(tmp_path / "m.log", log_bytes(BLOCK, flag=-1)), "flag"),
    }


DAMAGED = ["truncated", "header-only", "short-header", "empty", "directory", "fifo", "missing",
           "size-0", "size-absurd", "flag-7", "flag-minus-1"]


def test_a_newline_in_a_path_keeps_the_error_on_one_line(tmp_path):
    path = str(tmp_path / "two\nlines.log")
    err, _ = refused("get", "-n", path, "-p")
    assert "two?lines.log" in err and "No such file" in err


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_logs_are_refused_by_every_command(tmp_path, damage):
    path, words = damaged_logs(tmp_path)[damage]
    good = write(tmp_path / "good.log", log_bytes(BLOCK))
    is_file = os.path.exists(path) and stat.S_ISREG(os.stat(path).st_mode)
    before = read(path) if is_file else None
    for args in (["get", "-n", path, "-p"], ["get", "-n", path, "-b"],
                 ["set", "-n", path, "-f", "1"], ["set", "-n", path, "-s", 1 << 30],
                 ["coalesce", "-p", path, "-c", good], ["coalesce", "-p", good, "-c", path]):
        err, out = refused(*args)
        assert path in err, (args, err)
        assert any(w in err for w in ((words,) if isinstance(words, str) else words)), (args, err)
        assert out == b"", args
    if is_file:
        assert read(path) == before
    assert read(good) == log_bytes(BLOCK)


@pytest.mark.parametrize("args,words", [
    (["set", "-p", "not-a-uuid"], "-p: 'not-a-uuid' is not a UUID"),
    (["set", "-c", P_UUID[:-1]], "is not a UUID"),
    (["set", "-c", P_UUID + "0"], "is not a UUID"),
    (["set", "-p", P_UUID.replace("-", "")], "is not a UUID"),
    (["set", "-p", P_UUID[:18] + "\n" + P_UUID[19:]], "is not a UUID"),    # still one line
    (["set", "-f", "2"], "is not 0 or 1"),
    (["set", "-f", "01"], "is not 0 or 1"),
    (["set", "-f", ""], "is not 0 or 1"),
    (["set", "-s", "-1"], "is not a disk size"),
    (["set", "-s", "12x"], "is not a disk size"),
    (["set", "-s", " 5"], "is not a disk size"),
    (["set", "-s", "+5"], "is not a disk size"),
    (["set", "-s", "0"], "is not a disk size"),
    (["set", "-s", "18446744073709551616"], "is not a disk size"),
    (["set", "-s", str((1 << 52) + 1)], "is not a disk size"),
])
def test_bad_arguments_are_refused_before_the_log_is_touched(tmp_path, args, words):
    log = write(tmp_path / "a.log", log_bytes(BLOCK, bitmap=b"\x01"))
    before = read(log)
    # a valid change alongside: nothing of it may happen either
    err, _ = refused(args[0], "-n", log, "-f", "1", *args[1:])
    assert words in err, err
    assert read(log) == before


@pytest.mark.parametrize("size", ["0", "-65536", "1e6", "0x100", "", "99999999999999999999"])
def test_create_refuses_bad_sizes(tmp_path, size):
    log = tmp_path / "n.log"
    err, _ = refused("create", "-n", log, "-s", size)
    assert "is not a disk size" in err
    assert not log.exists()


@pytest.mark.parametrize("args", [
    ["get", "-p"],                                   # missing -n
    ["set", "-p", P_UUID],
    ["create", "-s", "100"],
    ["create", "-n", "x.log"],                       # missing -s
    ["coalesce", "-p", "x.log"],
    ["coalesce", "-c", "x.log"],
    ["get", "-n", "x.log"],                          # no field
    ["get", "-n", "x.log", "-p", "-c"],              # two fields
    ["set", "-n", "x.log"],                          # nothing to set
    ["get", "-n", "x.log", "-p", "-x"],              # unknown option
    ["get", "-n", "x.log", "-p", "--parent"],        # no long options
    ["get", "-n"],                                   # option without its argument
    ["get", "-n", "x.log", "-p", "extra"],           # a stray argument
])
def test_bad_command_lines_are_usage_errors(tmp_path, args):
    args = [str(tmp_path / a) if a == "x.log" else a for a in args]
    err, out = refused(*args, status=2)
    assert "usage: cbt-util %s " % args[0] in err, err
    assert out == b""
    assert not (tmp_path / "x.log").exists()


@pytest.mark.parametrize("args", [[], ["bogus"], ["-x"]])
def test_no_or_unknown_command_lists_the_commands(args):
    err, out = refused(*args, status=2)
    assert ("unknown command" if args else "no command") in err
    out = out.decode()
    assert out.startswith("usage: cbt-util COMMAND [OPTIONS]\n"), out
    for name in ("create", "get", "set", "coalesce"):
        assert "\n  %s " % name in out, out


def test_help(tmp_path):
    out = ok("--help").decode()
    assert out.startswith("usage: cbt-util COMMAND [OPTIONS]\n")
    assert ok("-h").decode() == out
    for name, opts in (("create", "-n -s"), ("get", "-n -p -c -f -s -b"),
                       ("set", "-n -p -c -f -s"), ("coalesce", "-p -c")):
        text = ok(name, "-h").decode()
        assert text.startswith("usage: cbt-util %s " % name), text
        for o in opts.split():
            assert "\n  %s " % o in text, (name, o, text)


@pytest.mark.parametrize("what", ["-b", "-s"])
def test_output_that_cannot_be_written_is_an_error(tmp_path, what):
    # stdout on /dev/full: the write fails, and that must not pass for success
    log = write(tmp_path / "b.log", log_bytes(1 << 30))
    with open("/dev/full", "wb") as full:
        r = subprocess.run([os.path.join(BIN, "cbt-util"), "get", "-n", log, what],
                           stdout=full, stderr=subprocess.PIPE, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("cbt-util: get: ") and err.count("\n") == 1, err
    assert "No space left" in err, err
