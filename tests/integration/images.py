"""Reading a disk two ways, to compare them: an image file through qemu-img,
a vbd's export through nbdcopy; and a libnbd handle on an export that
asks for block status (base:allocation)."""

import json

import nbd

from conftest import run


def qemu_size(path):
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    return info["virtual-size"]


def qemu_raw(path, fmt, out):
    """The image's bytes as qemu-img reads them (format fmt), via file out."""
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def export_bytes(server, minor, out):
    run("nbdcopy", server.uri(minor), out)
    with open(out, "rb") as f:
        return f.read()


def connect(server, minor):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri(minor))
    return h
