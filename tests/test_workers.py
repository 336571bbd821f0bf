"""Parallel sweeps (issue 19): the order jobs go out in, and each worker's share of the cores."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from coblax.app.workers import (
    SLOTS_ENV,
    base_priority,
    cores_of,
    dispatch_order,
    is_slow,
    make_slots,
    record_priority,
    remove_slots,
)


def _key(scheme, budget, method):
    return ("lenet5", scheme, budget, budget, method, 0)


def test_slow_methods_first_within_each_scheme_block_in_serial_order():
    methods = ("cobla", "cptv", "uniform")
    keys = [_key(s, b, m) for s in ("tai", "zhang") for b in (0.7, 0.5) for m in methods]
    got = dispatch_order(keys, ["tai", "zhang"])
    expected = [_key("tai", 0.7, "cobla"), _key("tai", 0.5, "cobla"),
                _key("tai", 0.7, "cptv"), _key("tai", 0.7, "uniform"),
                _key("tai", 0.5, "cptv"), _key("tai", 0.5, "uniform"),
                _key("zhang", 0.7, "cobla"), _key("zhang", 0.5, "cobla"),
                _key("zhang", 0.7, "cptv"), _key("zhang", 0.7, "uniform"),
                _key("zhang", 0.5, "cptv"), _key("zhang", 0.5, "uniform")]
    assert got == expected
    assert is_slow("cobla") and is_slow("lc") and not is_slow("uniform") and not is_slow("no_such_method")


def test_every_base_model_goes_out_before_any_record():
    late_base = base_priority(10_000)
    first_record = record_priority(_key("tai", 0.7, "cobla"), 0, 0, ["tai"])
    assert late_base < first_record
    # blocks in serial order: block 0's last record before block 1's first (slow) one
    assert record_priority(_key("zhang", 0.5, "uniform"), 13, 0, ["tai", "zhang"]) < \
        record_priority(_key("tai", 0.7, "cobla"), 14, 1, ["tai", "zhang"])


@pytest.mark.parametrize(("n", "cores", "expected"), [
    (2, [0, 1], [[0], [1]]),
    (3, [0, 1], [[0], [1], [0]]),  # more workers than cores: round robin
    (2, [4, 5, 6, 7], [[4, 5], [6, 7]]),
    (3, [0, 1, 2, 3, 4, 5, 6], [[0, 1], [2, 3], [4, 5, 6]]),
])
def test_cores_of_splits_the_cores_in_contiguous_shares(n, cores, expected):
    assert [cores_of(i, n, cores) for i in range(n)] == expected
    # every core is used when there are at least as many cores as workers
    if n <= len(cores):
        assert sorted(c for i in range(n) for c in cores_of(i, n, cores)) == sorted(cores)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no thread affinity on this platform")
def test_a_worker_takes_the_first_free_slot_and_pins_every_thread(tmp_path):
    name, value = make_slots(2)
    folder = value.rsplit(":", 1)[0]
    assert name == SLOTS_ENV and os.path.isdir(folder)
    held = os.open(os.path.join(folder, "slot-0"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)  # another worker holds slot 0
    code = ("import json, os; from coblax.app.workers import pin_worker; import jax; "
            "mine = pin_worker(); "
            "print(json.dumps([mine, len(jax.devices()), "
            "sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir('/proc/self/task')})]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{name: value}),
                             capture_output=True, text=True, timeout=300, check=True).stdout
    finally:
        os.close(held)
    mine, devices, affinities = json.loads(out.strip().splitlines()[-1])
    assert mine == cores_of(1, 2, os.sched_getaffinity(0))  # slot 1: the second share
    assert affinities == [mine] and devices >= 1
    remove_slots([(name, value)])
    assert not os.path.exists(folder)
