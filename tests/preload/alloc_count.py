"""Reading alloc_probe.so's count (alloc_probe.c): the probe writes
"allocs N" to ALLOC_COUNT_FILE when the process gets SIGUSR2. Used by
make bench (bench/allocs.py) and the tests (test_allocations.py)."""

import os
import signal
import time

PROBE_NAME = "alloc_probe.so"       # built into BUILD/tests/


def allocations(pid, count_file, timeout=5):
    """The heap calls process pid has made so far (the file is consumed)."""
    os.kill(pid, signal.SIGUSR2)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(count_file) as f:
                words = f.read().split()
            if len(words) == 2:
                os.unlink(count_file)
                return int(words[1])
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise RuntimeError("the allocation probe did not answer")
