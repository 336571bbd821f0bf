"""Fault probe of issue 22: every finding tried again, as a user would, at small size.

Each case crafts its input (``.npz`` bombs and damaged exports, ``.cbx`` files,
results JSON, study configs, ...) and runs the entry point -- the ``coblax`` command
line in a subprocess where the finding was about a command, a library call in a
subprocess otherwise -- and prints one table row: the case, what is expected, what was
observed, HOLD or FAIL, and the test of the default suite that covers it.

Expected, unless a row says otherwise: exit 2 with one message (``coblax: error: ...``,
a single line) naming the file or the argument, no traceback; a library call raises a
``CoblaxError``/``ValueError`` naming the file or the argument; nothing is written
outside the chosen folder; a crafted file grows the process's peak RSS by at most 200
MiB per MiB of input (beyond the command's fixed cost, measured on its smallest file;
``VmHWM`` reset just before the call).

Usage: ``python benchmarks/probe_entry_points.py [--only SUBSTRING]`` (about 3-5 minutes
on the shared 2-core machine). Exit status 0 when every case holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
MB_PER_MB = 200

Row = tuple[str, str, str, bool, str]  # case, expected, observed, holds, test


def _env(tmp: Path, **extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", TQDM_DISABLE="1",
                COBLAX_CACHE=str(tmp / "cache"), **extra)


def _cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "coblax.app.cli", *map(str, args)]


def cli(tmp: Path, *args, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(_cli_cmd(*args), cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                          timeout=timeout, **popen)


_MEASURED = """
import json, sys
sys.path.insert(0, {tests!r})
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
{setup}
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = hwm()
outcome = {{}}
try:
{call}
except BaseException as err:  # the probe reports whatever happens
    outcome = {{"error": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__],
               "message": str(err)}}
outcome["grew_mb"] = (hwm() - before) / 1024
print("PROBE " + json.dumps(outcome, default=str))
"""


def measured(tmp: Path, setup: str, call: str, timeout: int = 300) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``call`` in a fresh interpreter; its outcome (``error``, ``message``, ``code``...) and peak growth."""
    script = _MEASURED.format(tests=str(TESTS), setup=textwrap.dedent(setup),
                              call=textwrap.indent(textwrap.dedent(call), "    "))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True, timeout=timeout)
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("PROBE ")), None)
    if line is None:
        return {"error": "crashed", "message": f"exit {proc.returncode}: {proc.stderr[-300:]}", "grew_mb": -1}, proc
    return json.loads(line[len("PROBE "):]), proc


def user_error(proc: subprocess.CompletedProcess, *names: str) -> tuple[str, bool]:
    """Exit 2, one ``coblax: error:`` line naming every one of ``names``, no traceback."""
    err = proc.stderr.strip()
    lines = [l for l in err.splitlines() if l.strip()]
    msg = next((l for l in lines if l.startswith("coblax: error:")), lines[-1] if lines else "")
    ok = (proc.returncode == 2 and "Traceback" not in err and len([l for l in lines if "error" in l.lower()]) == 1
          and all(n in msg for n in names))
    return f"exit {proc.returncode}: {_short(msg)}", ok


def named_error(outcome: dict, *names: str, kinds: tuple[str, ...] = ("CoblaxError",)) -> tuple[str, bool]:
    if "error" not in outcome:
        return f"no error ({_short(json.dumps(outcome))})", False
    ok = any(k in outcome["mro"] for k in kinds) and all(n in outcome["message"] for n in names)
    return f"{outcome['error']}: {_short(outcome['message'])}", ok


def _short(text: str, n: int = 95) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- findings 1, 2: load_factored


def probe_load_factored(tmp: Path) -> list[Row]:
    from test_safe_load import make_bomb

    rows = []
    bomb = tmp / "bomb.npz"
    make_bomb(bomb, 1 << 27)
    size = bomb.stat().st_size / 2**20
    out, _ = measured(tmp, "from test_safe_load import Mlp\nfrom coblax.lowrank.export import load_factored",
                      f"load_factored({str(bomb)!r}, Mlp())")
    obs, ok = named_error(out, str(bomb), "declare")
    obs = obs.replace(str(tmp), "TMP")
    rows.append(("1 load_factored: deflate bomb, 0.5 MB file declaring 512 MiB",
                 f"CoblaxError naming the file; RSS <= {MB_PER_MB} MiB/MiB",
                 f"{obs} [+{out['grew_mb']:.0f} MiB = {out['grew_mb'] / size:.0f} MiB/MiB]",
                 ok and out["grew_mb"] <= MB_PER_MB * size, "test_safe_load::test_zip_bomb_refused_before_inflating"))
    damages = ["_truncate", "_empty", "_bitflip", "_no_layers", "_list_header", "_deep_header", "_unknown_layer",
               "_nan_constant", "_object_array", "_wrong_rank"]
    script = f"""
        import json, shutil, sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        import test_safe_load as S
        from coblax.lowrank.export import load_factored
        from coblax.app.export_cbx import save_factored_cbx
        tmp = Path({str(tmp)!r})
        result = {{}}
        for name in {damages!r} + ["cbx"]:
            folder = tmp / ("d" + name)
            folder.mkdir()
            if name == "cbx":
                path = folder / "net.cbx"
                save_factored_cbx(path, S.make_result())
            else:
                path = S._saved(folder)
                getattr(S, name)(path)
            try:
                load_factored(path, S.Mlp())
                result[name] = ["loaded", [], str(path)]
            except BaseException as err:
                result[name] = [type(err).__name__ + ": " + str(err), [c.__name__ for c in type(err).__mro__], str(path)]
        print("PROBE " + json.dumps(result))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp, env=_env(tmp),
                          capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PROBE ")), "PROBE {}")
    result = json.loads(line[6:])
    what = {"_truncate": "truncated file", "_empty": "empty file", "_bitflip": "bit-flipped file",
            "_no_layers": "header without 'layers'", "_list_header": "header a JSON list",
            "_deep_header": "header nested 5000 deep", "_unknown_layer": "header naming unknown layers",
            "_nan_constant": "header holding NaN", "_object_array": "pickled object member",
            "_wrong_rank": "factor of the wrong rank", "cbx": "a .cbx file"}
    for name in [*damages, "cbx"]:
        message, mro, path = result.get(name, [f"probe crashed: {proc.stderr[-200:]}", [], ""])
        ok = "CoblaxError" in mro and path in message and "allow_pickle" not in message
        test = ("test_safe_load::test_cbx_given_to_load_factored_is_named" if name == "cbx"
                else f"test_safe_load::test_damaged_files_raise_one_named_error[{name[1:]}]")
        rows.append((f"2 load_factored: {what[name]}", "CoblaxError naming the file and the field",
                     _short(message.replace(str(tmp), "TMP")), ok, test))
    return rows


# ---------------------------------------------------------------- findings 8, 10: .cbx through evaluate


_EVAL = "from coblax.app.cli import main"


def _eval_call(path: Path) -> str:
    return f"outcome = {{'code': main(['evaluate', {str(path)!r}])}}"


def probe_evaluate(tmp: Path) -> list[Row]:
    import numpy as np
    from crafted import mlp_params, write_mlp_cbx

    from coblax.compress.cbx import LeafCoding, write_cbx

    rows = []
    small = tmp / "small.cbx"
    write_mlp_cbx(small, 1)
    base, _ = measured(tmp, _EVAL, _eval_call(small))
    fixed = base["grew_mb"]

    trunc = tmp / "trunc.cbx"
    trunc.write_bytes(small.read_bytes()[:-100])
    obs, ok = user_error(cli(tmp, "evaluate", trunc), str(trunc))
    rows.append(("8 evaluate: truncated .cbx", "exit 2 naming the file", obs, ok,
                 "test_faults::test_crafted_shape_is_refused_before_allocating (+ test_cbx)"))

    shape = tmp / "shape.cbx"
    params = mlp_params(8, 3)
    params["params"]["fc1"]["kernel"] = np.zeros((60, 8), np.float32)
    meta = {"model": {"name": "mlp", "options": {"hidden": [8]}}, "num_classes": 10, "input_shape": [6, 10, 1],
            "dataset": {"name": "digits"}}
    write_cbx(shape, params, {"params/fc1/kernel": LeafCoding(np.array([0.0, 0.5], np.float32))}, meta)
    obs, ok = user_error(cli(tmp, "evaluate", shape), str(shape), "[6, 10, 1]")
    rows.append(("8 evaluate: .cbx whose dataset does not fit its input shape", "exit 2 naming file and shapes",
                 obs, ok, "test_safe_results::test_cbx_whose_dataset_does_not_fit_its_input_shape_exits_2"))

    amp = tmp / "amp.cbx"
    decoded = write_mlp_cbx(amp, 894_000, every=1 << 30, index_bits=16)  # all zeros: 1 filler per 65,536
    size = amp.stat().st_size / 2**20
    out, proc = measured(tmp, _EVAL, _eval_call(amp))
    ok = out.get("code") == 2 and "64 x the file size" in proc.stderr and out["grew_mb"] - fixed <= MB_PER_MB * size
    rows.append((f"10 evaluate: sparse amplification, {amp.stat().st_size:,}-byte file declaring "
                 f"{decoded / 2**20:.0f} MiB", f"exit 2 before decoding; RSS <= {MB_PER_MB} MiB/MiB",
                 f"exit {out.get('code')}: {_short(proc.stderr.strip().splitlines()[-1] if proc.stderr else '', 60)}"
                 f" [+{out['grew_mb']:.0f} MiB, fixed {fixed:.0f}]", ok,
                 "test_caps_memory::test_cbx_beyond_the_ratio_cap_refused, "
                 "test_safe_results::test_sparse_leaf_amplification_capped_in_real_memory"))

    for label, kw in (("sparse at the 64x ratio cap", dict(hidden=420_000)),
                      ("dense Huffman-coded", dict(hidden=120_000, dense_values=4))):
        path = tmp / "worst.cbx"
        decoded = write_mlp_cbx(path, kw.pop("hidden"), **kw)
        size = path.stat().st_size / 2**20
        out, proc = measured(tmp, _EVAL, _eval_call(path))
        beyond = (out["grew_mb"] - fixed) / size
        cap = 2 * decoded / 2**20 + 100
        ok = out.get("code") == 0 and beyond <= MB_PER_MB and out["grew_mb"] <= cap
        rows.append((f"10 evaluate: worst shape, {label} ({size:.1f} MiB -> {decoded / 2**20:.0f} MiB)",
                     f"exit 0; <= {MB_PER_MB} MiB/MiB beyond fixed; <= 2 x decoded + 100 MiB",
                     f"exit {out.get('code')}, +{out['grew_mb']:.0f} MiB (fixed {fixed:.0f}): {beyond:.0f} MiB/MiB "
                     f"beyond fixed, cap {cap:.0f} MiB", ok,
                     "test_caps_memory::test_evaluate_worst_shape_within_200_mb_per_mb"))
        path.unlink()
    return rows


# ---------------------------------------------------------------- finding 8: results files


_REC = {"model": "m", "method": "uniform", "scheme": "tai", "budget_mac": 0.5, "budget_param": 0.5,
        "mac_ratio": 0.4, "param_ratio": 0.4, "acc_before_finetune": 0.5, "acc_after_finetune": 0.6,
        "base_acc": 0.9, "ranks": {"fc1": 3}, "full_ranks": {"fc1": 8}}


def probe_results(tmp: Path, finished_run: Path | None, cfg: Path | None) -> list[Row]:
    rows = []
    bad = {
        "nested 3000 deep": '{"records": ' + "[" * 3000 + "]" * 3000 + "}",
        "10**400": json.dumps({"records": [_REC | {"budget_mac": "@"}]}).replace('"@"', "1" + "0" * 400),
        "1e400": json.dumps({"records": [_REC | {"budget_mac": "@"}]}).replace('"@"', "1e400"),
        "NaN accuracy": json.dumps({"records": [_REC | {"acc_after_finetune": float("nan")}]}),
        "Infinity accuracy": json.dumps({"records": [_REC | {"acc_after_finetune": float("inf")}]}),
        "full_ranks a list": json.dumps({"records": [_REC | {"full_ranks": [8]}]}),
        "ranks a string": json.dumps({"records": [_REC | {"ranks": "33"}]}),
        "records not a list": json.dumps({"records": {"a": 1}}),
    }
    for i, (label, text) in enumerate(bad.items()):
        folder = tmp / f"res{i}"
        folder.mkdir()
        (folder / "results.json").write_text(text)
        obs, ok = user_error(cli(tmp, "table", folder), str(folder / "results.json"))
        rows.append((f"8 table: results JSON with {label}", "exit 2 naming the file", obs, ok,
                     "test_safe_results::test_results_file_beyond_limits_or_schema_exits_2"))
    folder = tmp / "res0"
    obs, ok = user_error(subprocess.run([sys.executable, "-m", "paper_figs", str(folder), "--out", str(tmp / "f0")],
                                        cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300),
                         str(folder / "results.json"))
    rows.append(("8 paper_figs: results JSON nested 3000 deep", "exit 2 naming the file", obs, ok,
                 "test_paper_figs_safe::test_bad_record_schema_exits_2_naming_the_field"))
    if finished_run is not None and cfg is not None:
        copy = tmp / "overflow_run"
        shutil.copytree(finished_run, copy)
        text = (copy / "results.json").read_text()
        (copy / "results.json").write_text(text.replace('"budget_mac": 0.5', '"budget_mac": 1' + "0" * 400, 1))
        obs, ok = user_error(cli(tmp, "check", cfg, "--out", copy), "results.json")
        rows.append(("8 check: finished folder whose results hold 10**400", "exit 2 (not 'complete')", obs, ok,
                     "test_safe_results::test_check_does_not_call_an_overflowing_folder_complete"))
    return rows


# ---------------------------------------------------------------- findings 3, 4, 11: paper_figs


def probe_paper_figs(tmp: Path) -> list[Row]:
    from test_paper_figs import run_payload

    rows = []
    work = tmp / "pf" / "a" / "b"
    names = ["../../escaped", str(tmp / "absolute"), "..", "escaped"]
    paths = []
    for i, name in enumerate(names):
        (work / f"r{i}").mkdir(parents=True)
        recs = [{"study": "kd", "seed": 0, "role": "student_kd", "temperature": t, "alpha": 0.9,
                 "acc": 0.9 - 0.01 * i, "student": "mlp"} for t in (1.0, 4.0)]
        (work / f"r{i}" / "results.json").write_text(json.dumps({"study": "kd", "name": name, "seeds": [0],
                                                                  "records": recs}))
        paths.append(str(work / f"r{i}"))
    before = _files(tmp)
    out = work / "figs"
    proc = subprocess.run([sys.executable, "-m", "paper_figs", *paths, "--out", str(out), "--only", "kd_temperature"],
                          cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300)
    new = _files(tmp) - before
    outside = [p for p in new if out not in p.parents]
    rows.append(("3 paper_figs: run names ../../escaped, /abs/path, ..", "exit 0; every file under --out",
                 f"exit {proc.returncode}; {len(new)} files written, {len(outside)} outside --out",
                 proc.returncode == 0 and bool(new) and not outside,
                 "test_paper_figs_safe::test_traversal_and_absolute_run_names_land_under_out"))
    payload = run_payload()
    payload["records"][0] = dict(payload["records"][0], status="failed", error="finetune: loss is not finite",
                                 acc_before_finetune=None, acc_after_finetune=None, mac_ratio=None, param_ratio=None,
                                 ranks=None)
    (tmp / "pf_failed").mkdir()
    (tmp / "pf_failed" / "results.json").write_text(json.dumps(payload))
    out = tmp / "pf_figs"
    proc = subprocess.run([sys.executable, "-m", "paper_figs", str(tmp / "pf_failed"), "--out", str(out)], cwd=tmp,
                          env=_env(tmp), capture_output=True, text=True, timeout=300)
    pngs = sorted(p.name for p in out.glob("*.png"))
    ok = proc.returncode == 0 and "left out 1 failed record(s)" in proc.stdout and len(pngs) >= 4
    rows.append(("4 paper_figs: one failed record (accuracies null)", "exit 0; says which; other figures drawn",
                 f"exit {proc.returncode}; {len(pngs)} PNGs; "
                 f"{'names the failed record' if 'left out 1 failed' in proc.stdout else 'silent'}", ok,
                 "test_paper_figs_safe::test_failed_record_is_listed_and_every_figure_still_drawn"))
    env = {k: v for k, v in _env(tmp).items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import paper_figs, os; print(os.path.dirname(paper_figs.__file__))"],
                          cwd="/", env=env, capture_output=True, text=True, timeout=120)
    rows.append(("11 paper_figs installed with the package", "import works outside the repository",
                 f"exit {proc.returncode}: {_short(proc.stdout.strip() or proc.stderr.strip(), 60)}",
                 proc.returncode == 0, "test_paper_figs (python -m paper_figs) / pyproject packages"))
    return rows


# ---------------------------------------------------------------- finding 5: coblax study


def _study(tmp: Path, name: str, body: str, seeds: str = "[0]", study: str = "svd_fc") -> Path:
    text = "\n".join([f'study = "{study}"', f"seeds = {seeds}", f'cache_dir = "{tmp / "cache"}"',
                      '[data]\nname = "digits"\nlimit_train = 200\nlimit_test = 100', "[train]\nepochs = 1", body])
    path = tmp / f"{name}.toml"
    path.write_text(text + "\n")
    return path


def probe_study(tmp: Path) -> list[Row]:
    rows = []
    for label, body, seeds, names, test in [
        ("model hidden = [-16]", '[svd_fc]\nmodel = { name = "mlp", hidden = [-16] }', "[0]", ["svd_fc.model.hidden"],
         "test_safe_run::test_study_model_options_exit_2"),
        ("model hidden = [0]", '[svd_fc]\nmodel = { name = "mlp", hidden = [0] }', "[0]", ["svd_fc.model.hidden"],
         "test_safe_run::test_study_model_options_exit_2"),
        ("seeds = [-1]", "", "[-1]", ["seeds[0]"], "test_safe_run::test_study_seed_out_of_range_exits_2"),
    ]:
        cfg = _study(tmp, "bad", body, seeds)
        obs, ok = user_error(cli(tmp, "study", cfg, "--out", tmp / "sout"), *names)
        rows.append((f"5 study: {label}", "exit 2 naming the key", obs, ok, test))
    kd = _study(tmp, "kd", '[kd]\nteacher = { name = "mlp", hidden = [32] }\nstudent = { name = "mlp", hidden = [-4] }',
                study="kd")
    obs, ok = user_error(cli(tmp, "study", kd, "--out", tmp / "kout"), "kd.student.hidden")
    trained = list((tmp / "cache").rglob("*.npz"))
    rows.append(("5 study: KD student hidden = [-4]", "exit 2 before the teacher trains",
                 f"{obs}; {len(trained)} models trained", ok and not trained,
                 "test_safe_run::test_kd_student_checked_before_the_teacher_trains"))
    (tmp / "afile").write_text("x")
    cfg = _study(tmp, "ok", '[svd_fc]\nmodel = { name = "mlp", hidden = [16] }\nrank_fractions = [0.25, 0.5]',
                 seeds="[0, 1, 2]")
    started = time.perf_counter()
    obs, ok = user_error(cli(tmp, "study", cfg, "--out", tmp / "afile" / "out"), str(tmp / "afile"))
    rows.append(("5 study: unwritable --out (below a file)", "exit 2 before any work",
                 f"{obs} ({time.perf_counter() - started:.0f} s)", ok and not list((tmp / "cache").rglob("*.npz")),
                 "test_safe_run::test_study_unwritable_out_fails_before_any_work"))
    # interrupted after its first finished piece, resumed, rerun without --force
    out = tmp / "study_out"
    proc = subprocess.Popen(_cli_cmd("study", cfg, "--out", out, "--quiet"), cwd=tmp, env=_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = out / "results.partial.json"
    deadline = time.time() + 240
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    saved = json.loads(partial.read_text()) if partial.exists() else {}
    n_pieces = sum(map(len, saved.get("pieces", {}).values())) + len(saved.get("done_seeds", []))
    rows.append(("5 study: SIGTERM after the first finished piece", "exit 143; finished pieces saved",
                 f"exit {proc.returncode}; partial holds {n_pieces} piece(s)/seed(s); {_short(err.strip(), 50)}",
                 proc.returncode == 143 and n_pieces >= 1 and "Traceback" not in err,
                 "test_study_pieces::test_svd_fc_resume_skips_finished_layers_and_equals_uninterrupted"))
    resumed = cli(tmp, "study", cfg, "--out", out, "--quiet")
    said = next((l for l in resumed.stderr.splitlines() if "resuming" in l), "")
    rows.append(("5 study: rerun of the interrupted study", "exit 0; skips the finished pieces",
                 f"exit {resumed.returncode}: {_short(said.replace(str(tmp), 'TMP'), 80)}",
                 resumed.returncode == 0 and "already finished" in said,
                 "test_study_pieces::test_svd_fc_resume_skips_finished_layers_and_equals_uninterrupted"))
    obs, ok = user_error(cli(tmp, "study", cfg, "--out", out), str(out / "results.json"), "--force")
    rows.append(("5 study: rerun without --force", "exit 2 naming results.json and --force", obs, ok,
                 "test_safe_run::test_study_rerun_refused_then_forced_and_resumed_after_sigint"))
    return rows


# ---------------------------------------------------------------- findings 6, 7, 11: run


def probe_run(tmp: Path) -> tuple[list[Row], Path | None, Path]:
    from helpers import tiny_run_config

    rows = []
    cfg = tiny_run_config(tmp, methods='["uniform", "cptv"]', budgets__mac="[0.5, 0.7]")
    out = tmp / "run1"
    first = subprocess.Popen(_cli_cmd("run", cfg, "--out", out, "--quiet"), cwd=tmp, env=_env(tmp),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / ".coblax.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = cli(tmp, "run", cfg, "--out", out, "--quiet")
    _, first_err = first.communicate(timeout=300)
    records = len(json.loads((out / "results.json").read_text())["records"]) if (out / "results.json").exists() else 0
    obs, ok = user_error(second, f"PID {first.pid}", socket.gethostname())
    rows.append(("6 run: a second run on the same --out", "2nd: exit 2 naming PID and host; 1st: exit 0, all records",
                 f"2nd {obs}; 1st exit {first.returncode}, {records} records",
                 ok and first.returncode == 0 and records == 4,
                 "test_safe_run::test_second_run_on_the_same_out_is_refused_and_the_first_is_unharmed"))
    rng = random.Random(22)
    codes = []
    for i in range(5):
        before = signal.signal(signal.SIGINT, signal.default_int_handler)  # SIGINT at its default in the child
        try:
            proc = subprocess.Popen(_cli_cmd("run", cfg, "--out", tmp / f"sig{i}", "--quiet"), cwd=tmp, env=_env(tmp),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        finally:
            signal.signal(signal.SIGINT, before)
        time.sleep(rng.uniform(0.2, 4.0))
        # On an idle machine the small run can end before a late signal: a run still alive
        # when the signal is sent must exit 130; one that ended first must have saved everything.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        code = proc.returncode if "Traceback" not in err else f"{proc.returncode}+traceback"
        if code == 0 and "Exception ignored" not in err:  # ended first, or in its last microseconds
            complete = code == 0 and (tmp / f"sig{i}" / "results.json").exists()
            code = "0 (ended before the signal, all saved)" if complete else f"{code} (ended before the signal)"
        codes.append(code)
    rows.append(("7 run: SIGINT at random 0.2-4 s, 5 times",
                 "exit 130 every time (0 only where the run ended first), no traceback, no 139",
                 f"exits {codes}", all(c == 130 or str(c).startswith("0 (ended") for c in codes)
                 and any(c == 130 for c in codes),
                 "test_safe_run::test_early_sigint_exits_130 (20x: -m slow)"))
    limited = tmp / "limited"
    script = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500)); "
              f"sys.argv = ['coblax', 'run', {str(cfg)!r}, '--out', {str(limited)!r}, '--quiet']; "
              "runpy.run_module('coblax.app.cli', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                          timeout=300)
    obs, ok = user_error(proc, str(limited), "File too large")
    rows.append(("7 run: disk full (ulimit -f 1500 bytes)", "exit 2 naming the file", obs, ok,
                 "test_safe_run::test_file_size_limit_names_the_file_exits_2_and_keeps_the_saved_records"))
    modes = {}
    for f in sorted(out.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            modes[f.name] = oct(f.stat().st_mode & 0o777)
    umask = os.umask(0)
    os.umask(umask)
    want = oct(0o666 & ~umask)
    rows.append((f"11 run: written files' mode under umask {oct(umask)}", f"{want} (what the umask gives)",
                 ", ".join(f"{k} {v}" for k, v in modes.items()), bool(modes) and set(modes.values()) == {want},
                 "test_safe_run::test_written_files_get_the_mode_the_umask_gives"))
    return rows, (out if first.returncode == 0 else None), cfg


# ---------------------------------------------------------------- finding 9: allocate


def probe_allocate(tmp: Path) -> list[Row]:
    cases = {
        "label -3": ("data=(x, np.where(np.arange(40) == 3, -3, y))", "data: label -3 is outside [0, 5)"),
        "label 57": ("data=(x, np.where(np.arange(40) == 3, 57, y))", "data: label 57 is outside [0, 5)"),
        "x and y of different lengths": ("data=(x, y[:30])", "x has 40 examples but y has 30 labels"),
        "empty arrays": ("data=(x[:0], y[:0])", "data: x holds no examples"),
        "float labels": ("data=(x, y.astype(np.float32))", "labels y must have an integer dtype"),
        'mac="0.5"': ("mac='0.5'", "budget mac='0.5' must be a number"),
        "mac=True": ("mac=True", "budget mac=True must be a number"),
        "mac=None": ("mac=None", "budget mac=None must be a number"),
        "min_rank=0": ("min_rank=0", "min_rank=0 must be >= 1"),
    }
    script = f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {str(TESTS)!r})
        import test_validate as V
        _, _, x, y = V._setup()
        result = {{}}
        for label, (kw, _) in {json.dumps({k: v for k, v in cases.items()})}.items():
            try:
                V._call(**eval("dict(" + kw + ")"))
                result[label] = ["accepted", []]
            except BaseException as err:
                result[label] = [type(err).__name__ + ": " + str(err), [c.__name__ for c in type(err).__mro__]]
        print("PROBE " + json.dumps(result))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp, env=_env(tmp),
                          capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PROBE ")), "PROBE {}")
    result = json.loads(line[6:])
    rows = []
    for label, (_, message) in cases.items():
        got, mro = result.get(label, [f"probe crashed: {proc.stderr[-200:]}", []])
        test = ("test_validate::test_bad_data_is_named" if "data=" in cases[label][0]
                else "test_validate::test_bad_scalar_arguments_are_named")
        rows.append((f"9 allocate: {label}", "ValueError naming the argument", _short(got, 80),
                     "ValueError" in mro and message in got, test))
    return rows


# ---------------------------------------------------------------- table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only the groups whose name contains this")
    args = ap.parse_args()
    sys.path[:0] = [str(TESTS), str(REPO)]
    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        groups: list[tuple[str, Callable[[], list[Row]]]] = []
        state: dict = {}

        def run_group() -> list[Row]:
            found, state["run"], state["cfg"] = probe_run(tmp / "run")
            return found

        for name, fn in [("load_factored", lambda: probe_load_factored(tmp / "lf")),
                         ("evaluate", lambda: probe_evaluate(tmp / "ev")),
                         ("run", run_group),
                         ("results", lambda: probe_results(tmp / "rs", state.get("run"), state.get("cfg"))),
                         ("paper_figs", lambda: probe_paper_figs(tmp / "pf")),
                         ("study", lambda: probe_study(tmp / "st")),
                         ("allocate", lambda: probe_allocate(tmp / "al"))]:
            if args.only in name:
                groups.append((name, fn))
        for name, fn in groups:
            (tmp / {"load_factored": "lf", "evaluate": "ev", "run": "run", "results": "rs", "paper_figs": "pf",
                    "study": "st", "allocate": "al"}[name]).mkdir(exist_ok=True)
            t0 = time.perf_counter()
            try:
                rows += fn()
            except Exception as err:  # noqa: BLE001 - a probe that breaks is itself a failure to report
                rows.append((f"{name}: the probe itself", "runs", f"{type(err).__name__}: {_short(str(err))}",
                             False, "-"))
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        rows = [(c, e, o.replace(tmp_name, "TMP"), ok, t) for c, e, o, ok, t in rows]
    held = sum(r[3] for r in rows)
    width = [max(len(str(r[i])) for r in rows) for i in range(3)]
    print(f"{'case':<{width[0]}} | {'expected':<{width[1]}} | {'observed':<{width[2]}} | verdict | test")
    print("-+-".join("-" * w for w in [*width, 7, 4]))
    for case, expected, observed, ok, test in rows:
        print(f"{case:<{width[0]}} | {expected:<{width[1]}} | {observed:<{width[2]}} | "
              f"{'HOLD' if ok else 'FAIL':<7} | {test}")
    print(f"\n{held} of {len(rows)} cases hold ({time.perf_counter() - start:.0f} s)")
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
