"""Peak memory of the bounded readers at their caps (README, "Resource caps").

Each case runs in a fresh subprocess and reports the growth of its peak resident
memory during the call (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs`` just before it, so the ~250 MB of importing JAX is not
counted) and the wall time. Not ``getrusage().ru_maxrss``: Linux carries a parent's
peak into a child across fork and exec, which hides any growth below it.

* ``load_factored`` refusing a deflate bomb (a 0.5 MB file declaring 512 MB);
* ``load_factored`` of a real export at the ratio cap's other end: ``SIZE`` MiB of
  float32 parameters (``np.savez`` stores them uncompressed);
* ``read_cbx`` refusing a sparse leaf one byte beyond ``MAX_DECODED_BYTES``;
* ``coblax evaluate`` of a ``.cbx`` whose decoded leaves fill ``MAX_DECODED_BYTES``
  (an ``mlp`` with one hidden layer of 894,000 units: 67 M float32 parameters, all
  sparse, a 5 MB file), evaluated on the 360 test images of ``digits``.

Usage: ``python benchmarks/bench_caps.py [--npz-mib 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_MEASURE = """
import sys, time, json
sys.path.insert(0, {tests!r})
{setup}
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak to the current RSS
before = hwm()
start = time.perf_counter()
try:
{call}
    outcome = "ok"
except Exception as err:
    outcome = type(err).__name__ + ": " + str(err)[:160]
grew = (hwm() - before) / 1024
print(json.dumps({{"grew_mb": round(grew, 1), "before_mb": round(before / 1024, 1),
                  "seconds": round(time.perf_counter() - start, 2), "outcome": outcome}}))
"""


def measure(setup: str, call: str) -> dict:
    script = _MEASURE.format(tests=str(REPO / "tests"), setup=textwrap.dedent(setup),
                             call=textwrap.indent(textwrap.dedent(call), "    "))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1"))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _big_export(path: Path, mib: int) -> None:
    """An export of Mlp (tests/test_safe_load.py) padded with a float32 ``extra`` leaf of ``mib`` MiB."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from test_safe_load import make_result

    from coblax.lowrank.export import save_factored

    res = make_result()
    res.variables["params"]["extra"] = {"w": np.ones((mib, 1 << 18), np.float32)}
    save_factored(path, res)


def _evaluate_at_cap(path: Path, hidden: int) -> None:
    import numpy as np

    from coblax.compress.cbx import LeafCoding, write_cbx

    cb = np.array([0.0, 0.5], np.float32)
    params = {"params": {
        "fc1": {"kernel": np.zeros((64, hidden), np.float32), "bias": np.zeros(hidden, np.float32)},
        "fc2": {"kernel": np.zeros((hidden, 10), np.float32), "bias": np.zeros(10, np.float32)}}}
    params["params"]["fc1"]["kernel"][:, :4] = 0.5
    params["params"]["fc2"]["kernel"][:4] = 0.5
    coding = {k: LeafCoding(cb, index_bits=16) for k in ("params/fc1/kernel", "params/fc2/kernel")}
    meta = {"model": {"name": "mlp", "options": {"hidden": [hidden]}}, "num_classes": 10,
            "input_shape": [8, 8, 1], "dataset": {"name": "digits"}}
    write_cbx(path, params, coding, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz-mib", type=int, default=1023, help="size of the real export (default: just below the 1 GiB cap)")
    ap.add_argument("--hidden", type=int, default=894_000, help="hidden units of the evaluate case")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from test_safe_load import make_bomb

        make_bomb(tmp / "bomb.npz", 1 << 27)
        rows["load_factored, deflate bomb (0.5 MB -> 512 MB declared)"] = measure(
            "from test_safe_load import Mlp\nfrom coblax.lowrank.export import load_factored",
            f"load_factored({str(tmp / 'bomb.npz')!r}, Mlp())")
        (tmp / "bomb.npz").unlink()
        _big_export(tmp / "big.npz", args.npz_mib)
        size = (tmp / "big.npz").stat().st_size / 2**20
        rows[f"load_factored, real export of {size:.0f} MiB"] = measure(
            "from test_safe_load import Mlp\nfrom coblax.lowrank.export import load_factored",
            f"net = load_factored({str(tmp / 'big.npz')!r}, Mlp())")
        (tmp / "big.npz").unlink()
        _evaluate_at_cap(tmp / "cap.cbx", args.hidden)
        size = (tmp / "cap.cbx").stat().st_size / 2**20
        rows[f"coblax evaluate, .cbx of {size:.1f} MiB decoding to MAX_DECODED_BYTES"] = measure(
            "from coblax.app.cli import main",
            f"assert main(['evaluate', {str(tmp / 'cap.cbx')!r}]) == 0")
        over = int(args.hidden * 1.01)
        _evaluate_at_cap(tmp / "over.cbx", over)
        rows["coblax evaluate, .cbx 1 % beyond MAX_DECODED_BYTES"] = measure(
            "from coblax.app.cli import main",
            f"assert main(['evaluate', {str(tmp / 'over.cbx')!r}]) == 2")
    for name, row in rows.items():
        print(f"{name}: peak RSS +{row['grew_mb']} MB (after imports {row['before_mb']} MB), "
              f"{row['seconds']} s, {row['outcome']}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    main()
