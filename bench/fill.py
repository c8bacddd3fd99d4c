"""Writes every byte of a vbd once over NBD (fio, 1 MiB sequential), so
that a read benchmark on it copies data rather than reading holes (a ram
disk reads never-written chunks as zeros without touching its memory)."""
import subprocess


def fill_vbd(sock, size):
    subprocess.run(["fio", "--name=fill", "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + sock,
                    "--size=" + size, "--rw=write", "--bs=1M", "--iodepth=8",
                    "--output=/dev/null"], check=True)
