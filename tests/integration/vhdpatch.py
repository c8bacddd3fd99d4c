"""Reading and patching VHD metadata from the tests (from the VHD spec), to
build damaged images and look at what the driver wrote."""

import struct
import uuid

SECTOR = 512


def checksum(buf, skip):
    total = sum(b for i, b in enumerate(buf) if not skip <= i < skip + 4)
    return (~total) & 0xFFFFFFFF


class Vhd:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())

    # -- footer (at the end) and header (at footer.data_offset) --
    @property
    def footer_off(self):
        return len(self.data) - SECTOR

    def footer(self):
        return self.data[self.footer_off:]

    def footer_field(self, fmt, off):
        return struct.unpack_from(">" + fmt, self.data, self.footer_off + off)[0]

    @property
    def header_off(self):
        return self.footer_field("Q", 16)

    def header_field(self, fmt, off):
        return struct.unpack_from(">" + fmt, self.data, self.header_off + off)[0]

    @property
    def block_size(self):
        return self.header_field("I", 32)

    @property
    def table_off(self):
        return self.header_field("Q", 16)

    @property
    def max_bat(self):
        return self.header_field("I", 28)

    def bat(self, i):
        return struct.unpack_from(">I", self.data, self.table_off + 4 * i)[0]

    def uuid(self):
        return bytes(self.data[self.footer_off + 68:self.footer_off + 84])

    # -- patching --
    def set_footer(self, fmt, off, value, fix=True):
        struct.pack_into(">" + fmt, self.data, self.footer_off + off, value)
        if fix:
            self.fix_footer()

    def fix_footer(self):
        f = self.footer_off
        struct.pack_into(">I", self.data, f + 64, checksum(self.data[f:f + SECTOR], 64))
        if self.footer_field("I", 60) != 2:      # dynamic: the backup too
            self.data[0:SECTOR] = self.data[f:f + SECTOR]

    def set_header(self, fmt, off, value, fix=True):
        struct.pack_into(">" + fmt, self.data, self.header_off + off, value)
        if fix:
            self.fix_header()

    def fix_header(self):
        h = self.header_off
        struct.pack_into(">I", self.data, h + 36, checksum(self.data[h:h + 1024], 36))

    def set_bat(self, i, value):
        struct.pack_into(">I", self.data, self.table_off + 4 * i, value)

    def set_parent_uuid(self, raw16):
        self.data[self.header_off + 40:self.header_off + 56] = raw16
        self.fix_header()

    def save(self, path=None):
        with open(path or self.path, "wb") as f:
            f.write(self.data)


def new_uuid():
    return uuid.uuid4().bytes
