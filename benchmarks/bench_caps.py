"""Peak memory of the bounded readers at their caps and on the worst-shaped files
(README, "Resource caps"; issue 22: at most 200 MB per MB of input and the documented cap).

Each case runs in a fresh subprocess and reports the growth of its peak resident
memory during the call (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs`` just before it, so the ~250 MB of importing JAX is not
counted) and the wall time. Not ``getrusage().ru_maxrss``: Linux carries a parent's
peak into a child across fork and exec, which hides any growth below it.

Cases (files from ``tests/crafted.py`` and ``tests/test_safe_load.py``):

* ``load_factored`` refusing a deflate bomb (a 0.5 MB file declaring 512 MB);
* ``load_factored`` of a deflated export inflating ~58x (the worst ratio the 64x
  ``MAX_NPZ_RATIO`` lets through) and of an uncompressed one just below the 1 GiB cap;
* ``coblax evaluate`` of ``mlp`` ``.cbx`` files on ``digits`` (360 test images): the
  smallest one (the fixed cost), a sparse one just under the 64x decoded-to-file
  ratio and a dense Huffman-coded one, each decoding to ``MAX_DECODED_BYTES``, and the
  refusals one step beyond the ratio and the absolute cap.

Each row prints the file size, the decoded (declared) bytes, the peak growth, MB of
growth per MB of file, growth per decoded byte (k), and PASS/FAIL against both
criteria: <= 200 MB per MB of file, and <= the README's cap (``load_factored``:
declared bytes + 100 MB; ``evaluate``: 2 x decoded bytes + 100 MB).

Usage: ``python benchmarks/bench_caps.py [--npz-mib 1023] [--hidden 894000]`` (about
2-3 minutes on the shared 2-core machine; ``--quick`` sizes everything down 8x).
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
MB_PER_MB = 200
FIXED_MB = 100  # the documented caps' allowance for the runtime (compiled code, data, threads)

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


def _big_export(path: Path, mib: int) -> int:
    """An export of Mlp (tests/test_safe_load.py) padded with a float32 ``extra`` leaf of ``mib`` MiB."""
    import numpy as np
    from test_safe_load import make_result

    from coblax.lowrank.export import save_factored

    res = make_result()
    res.variables["params"]["extra"] = {"w": np.ones((mib, 1 << 18), np.float32)}
    save_factored(path, res)
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return sum(i.file_size for i in zf.infolist())


_LOAD = "from test_safe_load import Mlp\nfrom coblax.lowrank.export import load_factored"
_EVAL = "from coblax.app.cli import main"


def _row(name: str, path: Path, decoded: int, row: dict, cap_k: float | None, fixed_mb: float = 0.0) -> dict:
    """One table row; ``fixed_mb``: the command's growth on its smallest valid file."""
    file_mb = path.stat().st_size / 2**20
    grew = row["grew_mb"]  # MiB
    refused = row["outcome"] != "ok"
    beyond = max(grew - fixed_mb, 0.0) / file_mb
    cap_mb = None if cap_k is None else cap_k * decoded / 2**20 + FIXED_MB
    ok = beyond <= MB_PER_MB and (cap_mb is None or grew <= cap_mb)
    return {"case": name, "file": f"{file_mb:.2f}", "decoded": f"{decoded / 2**20:.1f}",
            "grew": f"+{grew:.0f}", "per_mb": f"{grew / file_mb:.0f}", "beyond": f"{beyond:.0f}",
            "k": "-" if refused or decoded < 2**20 else f"{grew * 2**20 / decoded:.2f}",
            "cap": "-" if cap_mb is None else f"{cap_mb:.0f}",
            "verdict": ("PASS" if ok else "FAIL") + (" (refused)" if refused else ""),
            "time": f"{row['seconds']} s", "outcome": row["outcome"][:110]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz-mib", type=int, default=1023, help="size of the real export (default: just below the 1 GiB cap)")
    ap.add_argument("--hidden", type=int, default=894_000, help="hidden units of the evaluate cases (at MAX_DECODED_BYTES)")
    ap.add_argument("--quick", action="store_true", help="everything but the refusals 8x smaller")
    args = ap.parse_args()
    if args.quick:
        args.npz_mib, args.hidden = args.npz_mib // 8, args.hidden // 8
    from crafted import write_deflated_export, write_mlp_cbx
    from test_safe_load import make_bomb

    from coblax.compress.cbx import MAX_DECODED_BYTES

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p = tmp / "bomb.npz"
        make_bomb(p, 1 << 27)
        rows.append(_row("load_factored: deflate bomb (declares 512 MiB)", p, 1 << 29,
                         measure(_LOAD, f"load_factored({str(p)!r}, Mlp())"), None))
        p.unlink()
        p = tmp / "deflated.npz"
        declared = write_deflated_export(p, max(1, args.npz_mib // 16))
        rows.append(_row("load_factored: deflated export, ~58x", p, declared,
                         measure(_LOAD, f"net = load_factored({str(p)!r}, Mlp())"), 1.0))
        p.unlink()
        p = tmp / "big.npz"
        declared = _big_export(p, args.npz_mib)
        rows.append(_row("load_factored: uncompressed export at the 1 GiB cap", p, declared,
                         measure(_LOAD, f"net = load_factored({str(p)!r}, Mlp())"), 1.0))
        p.unlink()
        over = int(MAX_DECODED_BYTES / 300 * 1.01)  # mlp(hidden=H): ~300 H decoded bytes
        cases = [("evaluate: smallest mlp .cbx (fixed cost)", dict(hidden=1)),
                 ("evaluate: sparse .cbx, ~58x, at MAX_DECODED_BYTES", dict(hidden=args.hidden)),
                 ("evaluate: Huffman-dense .cbx at MAX_DECODED_BYTES", dict(hidden=args.hidden, dense_values=4)),
                 ("evaluate: sparse .cbx beyond the 64x ratio", dict(hidden=args.hidden // 4, every=12)),
                 ("evaluate: 1 % beyond MAX_DECODED_BYTES", dict(hidden=over))]
        fixed = 0.0
        for name, kw in cases:
            p = tmp / "x.cbx"
            decoded = write_mlp_cbx(p, kw.pop("hidden"), **kw)
            row = measure(_EVAL, f"main(['evaluate', {str(p)!r}])")
            fixed = fixed or row["grew_mb"]  # the first case: the smallest file
            rows.append(_row(name, p, decoded, row, 2.0, fixed))
            p.unlink()
    cols = ["case", "file", "decoded", "grew", "per_mb", "beyond", "k", "cap", "verdict", "time"]
    head = {"file": "file MiB", "decoded": "decoded MiB", "grew": "peak RSS MiB", "per_mb": "MiB/MiB",
            "beyond": "beyond fixed, MiB/MiB", "k": "grew/decoded", "cap": "README cap MiB"}
    widths = {c: max(len(head.get(c, c)), *(len(r[c]) for r in rows)) for c in cols}
    print(" | ".join(head.get(c, c).ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(r[c].ljust(widths[c]) for c in cols))
    print(f"\nPASS: <= {MB_PER_MB} MiB of peak growth per MiB of file beyond the command's fixed cost (evaluate: "
          f"its growth on the smallest file, row 4; load_factored: 0), and <= the README cap "
          f"(load_factored: declared + {FIXED_MB} MiB; evaluate: 2 x decoded + {FIXED_MB} MiB)")
    for r in rows:
        if r["outcome"] != "ok":
            print(f"{r['case']}: {r['outcome']}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    main()
