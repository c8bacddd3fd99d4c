"""The soak (soak.py): 100 vbds, NBD clients and simulated guests doing
verified random I/O, a driver pausing, snapshotting, throttling,
force-closing and reopening vbds and killing clients, for SOAK_MINUTES
(default 2 here; `make soak` runs 60 and writes tests/soak/RESULTS.md).
Fails on any byte that does not match its model, any request error not
explained by a force-close, the server's RSS or descriptors not back at the
baseline once every vbd is gone, a crash or a sanitizer report.

The `soak` marker: only the first pass of scripts/check runs it (on an
unslowed server, like `timing`)."""

import os

import pytest

from soak import soak, summary

MINUTES = float(os.environ.get("SOAK_MINUTES", "2"))
SEED = int(os.environ.get("SOAK_SEED", "1"))
RESULTS = os.environ.get("SOAK_RESULTS")     # tests/soak/run: where the report goes (JSON)

pytestmark = pytest.mark.soak


@pytest.mark.timeout(int(MINUTES * 60) + 900)
def test_soak(tmp_path):
    report, failures = soak(tmp_path, MINUTES, SEED, log=lambda s: print(s, flush=True))
    if report:
        text = summary(report)
        print(text)
        if RESULTS:
            import json
            report["failures"] = failures
            with open(RESULTS, "w") as f:
                json.dump(report, f)
    assert not failures, "\n".join(failures)
