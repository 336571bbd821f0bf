"""Seeds and spread (issue 12, item 1): ``seeds = [...]`` in a run config, mean ± std tables."""

from __future__ import annotations

import json

import pytest

from coblax.app.cli import main
from coblax.app.config import INT_MAX, ConfigError, load_run_config
from coblax.app.experiment import VOLATILE_KEYS, plan_run
from coblax.app.report import format_table, load_records
from helpers import TINY_RUN


def rec(method, seed, before, after, mac=0.5, par=0.5, **extra):
    base = {0: 0.96, 1: 0.97, 2: 0.98}.get(seed, 0.99)
    return {
        "model": "lenet", "method": method, "scheme": "tai", "seed": seed, "budget_mac": 0.5,
        "budget_param": 0.5, "mac_ratio": mac, "param_ratio": par, "acc_before_finetune": before,
        "acc_after_finetune": after, "base_acc": base, **extra,
    }


# Three seeds. Hand computation (percent; s = sample standard deviation, SE = s / sqrt(n)):
#   before FT  a: 50 60 70 -> 60 ± 10          b: 80 80 (seed 2 failed) -> 80 ± 0, SE 0
#              c: 78 80 82 -> 80 ± 2, SE 2/√3 = 1.1547   d: 79 79 79 -> 79 ± 0
#     best mean 80 (b and c); the larger SE of the two is c's 1.1547, so every mean
#     >= 80 - 1.1547 = 78.845 is marked: b, c, d (79); a (60) is not.
#   after FT   a: 90 92 94 -> 92 ± 2, SE 1.1547  b: 91 91 -> 91 ± 0 (n=2)
#              c: 89 90 91 -> 90 ± 1             d: 90.8 x 3 -> 90.8 ± 0
#     best mean 92 (a), reach 92 - 1.1547 = 90.845: a and b (91) marked, d (90.8) and c not.
#   MAC ratio of a: 0.49 0.50 0.51 -> 0.500 (ratios: means only, never marked).
#   base accuracy: 96 97 98 -> 97 ± 1.
SPREAD = [
    rec("a", 0, 0.50, 0.90, 0.49), rec("a", 1, 0.60, 0.92, 0.50), rec("a", 2, 0.70, 0.94, 0.51),
    rec("b", 0, 0.80, 0.91), rec("b", 1, 0.80, 0.91),
    rec("b", 2, None, None, None, None, status="failed", error="finetune b: loss is not finite"),
    rec("c", 0, 0.78, 0.89), rec("c", 1, 0.80, 0.90), rec("c", 2, 0.82, 0.91),
    rec("d", 0, 0.79, 0.908), rec("d", 1, 0.79, 0.908), rec("d", 2, 0.79, 0.908),
]


def test_mean_std_and_one_standard_error_marks_equal_a_hand_computation(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"records": SPREAD}))
    assert format_table(load_records([str(tmp_path)]), "md") == (
        "### lenet — tai (base accuracy 97.00 ± 1.00; mean ± std over 3 seeds)\n"
        "\n"
        "| method | seeds | 0.5/0.5 acc before FT | 0.5/0.5 acc after FT | 0.5/0.5 MAC ratio "
        "| 0.5/0.5 param ratio |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| a | 3 | 60.00 ± 10.00 | **92.00 ± 2.00** | 0.500 | 0.500 |\n"
        "| b | 3 | **80.00 ± 0.00 (n=2)** | **91.00 ± 0.00 (n=2)** | 0.500 | 0.500 |\n"
        "| c | 3 | **80.00 ± 2.00** | 90.00 ± 1.00 | 0.500 | 0.500 |\n"
        "| d | 3 | **79.00 ± 0.00** | 90.80 ± 0.00 | 0.500 | 0.500 |\n"
        "\n"
        "failed: b at 0.5/0.5, seed 2: finetune b: loss is not finite\n"
    )


def test_spread_in_csv_and_tex():
    csv = format_table(SPREAD, "csv").splitlines()
    assert csv[0].split(",")[:5] == ["model", "scheme", "method", "seeds", "0.5/0.5 acc before FT"]
    assert csv[1] == "lenet,tai,a,3,60.00 ± 10.00,92.00 ± 2.00*,0.500,0.500"
    tex = format_table(SPREAD, "tex")
    assert "% lenet / tai, base accuracy 97.00 $\\pm$ 1.00; mean $\\pm$ std over 3 seeds" in tex
    assert "\\begin{tabular}{lccccc}" in tex and "\\cmidrule(lr){3-6}" in tex
    assert " & Seeds & acc before FT" in tex
    assert "a & 3 & 60.00 $\\pm$ 10.00 & \\textbf{92.00 $\\pm$ 2.00} & 0.500 & 0.500 \\\\" in tex
    assert "% failed: b at 0.5/0.5, seed 2" in tex


def test_one_seed_prints_as_before_and_runs_of_single_seeds_combine(tmp_path):
    plain = [rec("a", 0, 0.5, 0.9), rec("b", 0, 0.6, 0.8)]
    unseeded = [{k: v for k, v in r.items() if k != "seed"} for r in plain]
    for fmt in ("md", "csv", "tex"):
        assert format_table(plain, fmt) == format_table(unseeded, fmt)
    assert "seeds" not in format_table(plain, "md") and "±" not in format_table(plain, "md")
    # Two single-seed runs tabulated together have two seeds; a record repeated for
    # the same seed (same cell) is replaced by the later one.
    for seed, recs in ((0, plain), (1, [rec("a", 1, 0.7, 0.7), rec("b", 1, 0.6, 0.6)])):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps({"records": recs}))
    records = load_records([str(tmp_path / "s0"), str(tmp_path / "s1")]) + [rec("a", 1, 0.7, 0.9)]
    md = format_table(records, "md")
    assert "mean ± std over 2 seeds" in md
    # a: before 50, 70 -> 60 ± 14.14, SE 10; after 90, 90 -> 90 ± 0;
    # b: before 60 ± 0; after 80, 60 -> 70 ± 14.14 (below 90 - 0).
    assert "| a | 2 | **60.00 ± 14.14** | **90.00 ± 0.00** |" in md
    assert "| b | 2 | **60.00 ± 0.00** | 70.00 ± 14.14 |" in md


def test_results_with_a_non_integer_seed_are_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"records": [rec("a", "zero", 0.5, 0.5)]}))
    with pytest.raises(ValueError, match="record 0 has values of the wrong type for seed"):
        load_records([str(tmp_path)])


# ------------------------------------------------------------------------ config


def _cfg(tmp_path, top: str):
    path = tmp_path / "cfg.toml"
    path.write_text(top + '\nmethods = ["uniform"]\n')
    return load_run_config(path)


def test_seeds_absent_means_the_one_seed(tmp_path):
    assert _cfg(tmp_path, "").seed_list == (0,)
    assert _cfg(tmp_path, "seed = 7").seed_list == (7,)
    cfg = _cfg(tmp_path, "seeds = [3, 1, 2]")
    assert cfg.seed_list == (3, 1, 2) and cfg.seeds == (3, 1, 2)
    assert _cfg(tmp_path, f"seeds = [{INT_MAX}]").seed_list == (INT_MAX,)


@pytest.mark.parametrize(
    "top,message",
    [
        ("seeds = []", "seeds is empty; give at least one value"),
        ("seeds = [1, 2, 1]", "seeds lists 1 twice"),
        ("seeds = [-1]", "seeds = -1 must be >= 0"),
        (f"seeds = [{INT_MAX + 1}]", f"seeds[0] = {INT_MAX + 1} is out of range"),
        ("seeds = [1.5]", "seeds[0]: expected an integer, got 1.5"),
        ("seeds = [true]", "seeds[0]: expected an integer, got True"),
        ('seeds = ["0"]', "seeds[0]: expected an integer, got '0'"),
        ("seed = 1\nseeds = [1, 2]", "give either seed or seeds, not both"),
    ],
)
def test_bad_seeds_are_refused_naming_the_key(tmp_path, top, message):
    with pytest.raises(ConfigError, match="seeds") as err:
        _cfg(tmp_path, top)
    assert any(message in p for p in err.value.problems), err.value.problems


def test_check_counts_every_seed(tmp_path, capsys):
    path = tmp_path / "cfg.toml"
    path.write_text(TINY_RUN.replace("seed = 0\n", "seeds = [0, 1, 2]\n"))
    plan = plan_run(path, tmp_path / "out")
    assert plan.total == 6
    assert main(["check", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "6 records (1 model(s) x 1 scheme(s) x 1 budget(s) x 2 method(s) x 3 seeds)" in (
        capsys.readouterr().out)


# ------------------------------------------------------------------------ end to end


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE_KEYS}


@pytest.mark.slow
def test_two_seed_run_has_two_records_per_cell_and_resumes(tmp_path, capsys):
    """A tiny 2-seed run: one record per cell and seed; a resume redoes only what is missing."""
    path = tmp_path / "cfg.toml"
    path.write_text(TINY_RUN.replace("seed = 0\n", "seeds = [0, 1]\n"))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    payload = json.loads((out / "results.json").read_text())
    assert payload["seeds"] == [0, 1] and payload["seed"] == 0
    records = payload["records"]
    assert len(records) == 4
    for method in ("uniform", "cptv"):
        cell = [r for r in records if r["method"] == method]
        assert sorted(r["seed"] for r in cell) == [0, 1]
    # Each seed has its own base model (init, training batches and data subsets).
    base = {r["seed"]: r["base_acc"] for r in records}
    assert base[0] != base[1]
    assert "mean ± std over 2 seeds" in table and "| uniform | 2 |" in table
    # Interrupted after three records: the rerun keeps them and runs the fourth only.
    (out / "results.json").unlink()
    (out / "results.partial.json").write_text(json.dumps(payload | {"records": records[:3]}))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert "3 of 4 records already finished" in capsys.readouterr().err
    again = json.loads((out / "results.json").read_text())["records"]
    assert [_stable(r) for r in again] == [_stable(r) for r in records]
