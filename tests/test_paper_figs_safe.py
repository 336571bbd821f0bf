"""Issue 22, findings 3 and 4: figures never leave --out, and a failed record does not stop them."""

from __future__ import annotations

import json
from pathlib import Path

from test_paper_figs import run_payload

from paper_figs.__main__ import main


def _kd(name: str, acc: float) -> dict:
    return {"study": "kd", "name": name, "seeds": [0],
            "records": [{"study": "kd", "seed": 0, "role": "student_kd", "temperature": t, "alpha": 0.9,
                         "acc": acc, "student": "mlp"} for t in (1.0, 4.0)]}


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_traversal_and_absolute_run_names_land_under_out(tmp_path, capsys):
    """Finding 3: results named ``../../X`` or ``/abs/path`` wrote figures outside --out."""
    work = tmp_path / "a" / "b"
    names = ["../../escaped", str(tmp_path / "absolute"), "..", "escaped"]  # the last two collide after cleaning
    paths = []
    for i, name in enumerate(names):
        (work / f"r{i}").mkdir(parents=True)
        (work / f"r{i}" / "results.json").write_text(json.dumps(_kd(name, 0.9 - 0.01 * i)))
        paths.append(str(work / f"r{i}"))
    before = _files(tmp_path)
    out = work / "figs"
    assert main([*paths, "--out", str(out), "--only", "kd_temperature"]) == 0
    new = _files(tmp_path) - before
    assert new and all(out in p.parents for p in new), sorted(map(str, new))
    folders = {p.parent.name for p in new}
    assert len(folders) == 4 and all(not f.startswith(".") for f in folders), folders
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()


def test_failed_record_is_listed_and_every_figure_still_drawn(tmp_path, capsys):
    """Finding 4: one failed record (accuracies null) made paper_figs exit 1 with a TypeError."""
    payload = run_payload()
    failed = dict(payload["records"][0], status="failed", error="finetune cobla: loss is not finite (nan)",
                  acc_before_finetune=None, acc_after_finetune=None, mac_ratio=None, param_ratio=None, ranks=None)
    payload["records"][0] = failed
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps(payload))
    out = tmp_path / "figs"
    assert main([str(tmp_path / "r"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "left out 1 failed record(s)" in text and "loss is not finite" in text
    for stem in ("accuracy_vs_budget", "sqp_convergence", "rank_bars_mlp_tai", "relaxed_vs_rounded_mlp_tai"):
        assert (out / f"{stem}.png").stat().st_size > 1000, stem


def test_bad_record_schema_exits_2_naming_the_field(tmp_path, capsys):
    payload = run_payload()
    payload["records"][1]["ranks"] = "48"
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert main([str(tmp_path / "results.json"), "--out", str(tmp_path / "figs")]) == 2
    assert "record 1 has values of the wrong type for ranks" in capsys.readouterr().err
