"""paper_figs: each figure writes a non-empty PNG and PDF from a small synthetic results file;
results lacking a figure's records name the study and what is missing, the others are drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest

import paper_figs
from paper_figs.__main__ import main


def run_payload():
    recs = []
    for seed in (0, 1):
        for method in ("cobla", "uniform"):
            for b in (0.7, 0.5):
                recs.append({
                    "model": "mlp", "scheme": "tai", "method": method, "seed": seed,
                    "budget_mac": b, "budget_param": b, "mac_ratio": b - 0.01, "param_ratio": b - 0.01,
                    "acc_before_finetune": 0.8 + 0.1 * b + 0.01 * seed, "acc_after_finetune": 0.9 + 0.01 * seed,
                    "base_acc": 0.97, "ranks": {"fc1": int(40 * b), "fc2": int(20 * b)},
                    "full_ranks": {"fc1": 64, "fc2": 100},
                    "objective_trace": [1.0, 0.6, 0.4, 0.35] if method == "cobla" else None,
                    "slack_trace": [[0.1, 0.1], [0.02, 0.03], [0.0, 0.0], [0.0, 0.0]] if method == "cobla" else None,
                })
                if method == "cobla":  # relaxed m̂ and rounded masks per singular triplet (σ order)
                    relaxed = {"fc1": [1.0, 0.9, 0.6, 0.3, 0.1], "fc2": [1.0, 0.5, 0.45]}
                    rounded = {"fc1": [1.0, 0.9, 0.6, 0.0, 0.0], "fc2": [1.0, 0.5, 0.0]}
                    recs[-1]["diagnostics"] = {"relaxed_masks": relaxed, "rounded_masks": rounded,
                                               "relaxed_objective": 0.35, "rounded_objective": 0.41}
    return {"config": {}, "seed": 0, "records": recs}


def _study(study, recs):
    return {"study": study, "name": study, "seeds": [0, 1], "records": [{"study": study, **r} for r in recs]}


def _studies():
    kd = [{"seed": s, "role": "teacher", "temperature": None, "alpha": None, "acc": 0.95} for s in (0, 1)]
    kd += [{"seed": s, "role": "student_alone", "temperature": None, "alpha": 0.0, "acc": 0.90 + 0.01 * s}
           for s in (0, 1)]
    kd += [{"seed": s, "role": "student_kd", "temperature": t, "alpha": 0.9, "acc": 0.91 + 0.001 * t + 0.01 * s,
            "student": "mlp(hidden=[10])"} for s in (0, 1) for t in (1.0, 2.0, 4.0)]
    small = [{"family": f, "variant": v, "params": p, "macs": 10 * p, "acc": a}
             for f, v, p, a in (("fire_squeeze_ratio", "SR=0.125", 1000, 0.9), ("fire_squeeze_ratio", "SR=0.5", 3000, 0.93),
                                ("blocks", "standard", 20000, 0.97), ("blocks", "depthwise", 4000, 0.95))]
    svd = [{"layer": l, "rank": r, "weight_reduction": 64 * 300 / (r * 364), "acc_change": -0.5 / r}
           for l in ("fc1", "fc2") for r in (2, 8, 32)]
    pq = [{"kind": "prune", "retrain": rt, "sparsity": s, "kept_fraction": 1 - s, "acc": 0.9 - 0.2 * s * (not rt)}
          for rt in (False, True) for s in (0.5, 0.9)]
    pq += [{"kind": "layer_prune", "layer": l, "sparsity": s, "kept_fraction": 0.9, "acc": 0.95 - 0.1 * s}
           for l in ("fc1", "fc2") for s in (0.5, 0.9)]
    pq += [{"kind": "fixed_point", "word_length": w, "rounding": r, "acc": min(0.97, 0.2 * w), "kernel_bits": 1e4 * w}
           for w in (2, 4, 8) for r in ("nearest", "stochastic")]
    pq += [{"kind": k, "acc": 0.9 + 0.01 * i, "kernel_bits": 1e4 * (i + 1)} for k in ("kmeans", "pq", "rq")
           for i in range(3)]
    pq += [{"kind": "dns", "sparsity": s, "kept_fraction": 1.05 - s, "acc": 0.93, "magnitude_acc": 0.7,
            "magnitude_retrained_acc": 0.92} for s in (0.5, 0.9)]
    pq += [{"kind": "saliency", "method": m, "retrain": rt, "sparsity": s, "kept_fraction": 1 - s,
            "acc": 0.95 - (0.3 + 0.1 * i) * s * (not rt), "obs_magnitude_layers": ["fc1"] if m == "obs" else None}
           for i, m in enumerate(("magnitude", "obd", "obs")) for rt in (False, True) for s in (0.0, 0.5, 0.9)]
    pq += [{"kind": k, "mode": m, "acc": 0.85, "kernel_bits": 5e3} for k, m in
           (("binaryconnect", "det"), ("binaryconnect", "stoch"), ("bnn", "det"))]
    pq += [{"kind": "kmeans_hist", "seed": 0, "layer": "fc2", "bits": 2, "k": 4, "finetune_epochs": 1, "acc": 0.9,
            "acc_kmeans": 0.88, "acc_finetuned": 0.9, "hist_counts": [1, 5, 20, 40, 38, 22, 4, 2],
            "hist_edges": [-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4],
            "centroids_kmeans": [-0.2, -0.05, 0.05, 0.2], "centroids_finetuned": [-0.21, -0.06, 0.05, 0.22]}]
    return [_study("kd", kd), _study("small_arch", small), _study("svd_fc", svd), _study("prune_quant", pq)]


@pytest.fixture
def results(tmp_path):
    paths = []
    for i, payload in enumerate([run_payload(), *_studies()]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(payload))
        paths.append(d)
    return paths


@pytest.mark.parametrize("name", sorted(paper_figs.FIGURES))
def test_each_figure_writes_png_and_pdf(name, results, tmp_path):
    payloads = paper_figs.load_results(results)
    paths = paper_figs.FIGURES[name](payloads, tmp_path / "figs")
    assert {p.suffix for p in paths} == {".png", ".pdf"}
    for p in paths:
        assert p.stat().st_size > 1000


def test_missing_records_named_and_others_drawn(results, tmp_path, capsys):
    # Only the KD study: every other figure is skipped with the study and what is missing named.
    out = tmp_path / "figs"
    assert main([str(results[1]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kd_temperature:" in text
    assert "skipped accuracy_vs_budget: coblax run" in text
    assert "skipped small_arch: small_arch: no `coblax study` results" in text
    assert "skipped pruning: prune_quant:" in text
    assert "skipped relaxed_vs_rounded: coblax run" in text
    assert (out / "kd_accuracy_vs_temperature.png").stat().st_size > 0
    assert not (out / "accuracy_vs_budget.png").exists()


def test_new_prune_quant_figures_name_what_is_missing(tmp_path):
    # Results written before DNS / OBD / binary / histogram records existed: the new figures say what
    # they lack instead of failing, the old ones still draw.
    old = _study("prune_quant", [{"kind": "prune", "retrain": False, "sparsity": 0.5, "kept_fraction": 0.5,
                                  "acc": 0.9}])
    for name, missing in (("obd_vs_magnitude", "kind = saliency"), ("weight_histogram", "kind = kmeans_hist")):
        with pytest.raises(paper_figs.MissingRecords, match=f"prune_quant: .*{missing}"):
            paper_figs.FIGURES[name]([old], tmp_path)
    assert paper_figs.FIGURES["pruning"]([old], tmp_path)[0].stat().st_size > 1000


def test_folder_of_runs_draws_everything(results, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main([str(results[0].parent), "--out", str(out)]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert len(list(out.glob("*.pdf"))) == len(paper_figs.FIGURES)


def test_bad_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    bad = tmp_path / "results.json"
    bad.write_text("{")
    assert main([str(bad), "--out", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_relaxed_vs_rounded_names_missing_masks(tmp_path, capsys):
    # Run records, but no COBLA record with the masks (results written before they were saved).
    payload = run_payload()
    for r in payload["records"]:
        r.pop("diagnostics", None)
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert main([str(tmp_path), "--out", str(tmp_path / "figs"), "--only", "relaxed_vs_rounded",
                 "accuracy_vs_budget"]) == 0
    text = capsys.readouterr().out
    assert ("skipped relaxed_vs_rounded: coblax run (allocator comparison): no COBLA record has "
            "diagnostics.relaxed_masks and diagnostics.rounded_masks") in text
    assert (tmp_path / "figs" / "accuracy_vs_budget.png").stat().st_size > 0


def test_two_runs_of_one_study_get_a_figure_each(tmp_path, capsys):
    # kd_full and kd_transfer_full (one seed each, different students' data): pooled they would
    # be one figure claiming 2 seeds; drawn per run, each figure has its own run's points.
    recs = {"kd_a": 0.90, "kd_b": 0.80}
    paths = []
    for name, acc in recs.items():
        payload = {"study": "kd", "name": name, "seeds": [0],
                   "records": [{"study": "kd", "seed": 0, "role": "student_kd", "temperature": t, "alpha": 0.9,
                                "acc": acc, "student": "mlp"} for t in (1.0, 4.0)]
                   + [{"study": "kd", "seed": 0, "role": "student_alone", "temperature": None, "alpha": 0.0,
                       "acc": acc - 0.01}]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(payload))
        paths.append(str(tmp_path / name))
    out = tmp_path / "figs"
    assert main([*paths, "--out", str(out), "--only", "kd_temperature"]) == 0
    for name in recs:
        assert (out / name / "kd_accuracy_vs_temperature.png").stat().st_size > 1000
    assert not (out / "kd_accuracy_vs_temperature.png").exists()
    payloads = paper_figs.load_results(paths)
    drawn = paper_figs.draw("kd_temperature", payloads[:1], tmp_path / "one")  # one run: no subfolder
    assert drawn[0].parent == tmp_path / "one"


def _drawn(monkeypatch, module_name: str):
    """The figures a paper_figs module saves, kept open instead of written (their axes are inspected)."""
    import importlib

    module = importlib.import_module(module_name)
    figs = []

    def keep(fig, out_dir, stem):  # noqa: ARG001 - save's signature
        figs.append(fig)
        return []

    monkeypatch.setattr(module, "save", keep)
    return figs


def _saved_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(run_payload()))
    return json.loads((tmp_path / "run" / "results.json").read_text())["records"]


def test_accuracy_vs_budget_draws_the_result_files_numbers(tmp_path, monkeypatch):
    """Each plotted point is the seeds' mean of the accuracy in results.json (x100), its error bar
    their sample standard deviation: computed here from the file, not by paper_figs."""
    saved = _saved_run(tmp_path)
    figs = _drawn(monkeypatch, "paper_figs.accuracy_vs_budget")
    paper_figs.FIGURES["accuracy_vs_budget"](paper_figs.load_results([tmp_path / "run"]), tmp_path / "figs")
    (fig,) = figs
    for ax, key in zip(fig.axes, ("acc_before_finetune", "acc_after_finetune"), strict=True):
        drawn = {c.get_label(): c for c in ax.containers}
        assert sorted(drawn) == ["cobla", "uniform"]
        for method, container in drawn.items():
            budgets = sorted({r["budget_mac"] for r in saved if r["method"] == method})
            values = [[100 * r[key] for r in saved if r["method"] == method and r["budget_mac"] == b]
                      for b in budgets]
            means = [(v[0] + v[1]) / 2 for v in values]  # two seeds each
            stds = [abs(v[0] - v[1]) / 2 ** 0.5 for v in values]  # sample std of two values
            line, (low, high), _ = container.lines
            np.testing.assert_allclose(line.get_xdata(), budgets)
            np.testing.assert_allclose(line.get_ydata(), means)
            np.testing.assert_allclose(low.get_ydata(), np.subtract(means, stds))
            np.testing.assert_allclose(high.get_ydata(), np.add(means, stds))
            assert min(stds) > 0  # the bars are really drawn (the seeds differ)


def test_rank_bars_are_the_recorded_ranks(tmp_path, monkeypatch):
    saved = _saved_run(tmp_path)
    figs = _drawn(monkeypatch, "paper_figs.accuracy_vs_budget")
    paper_figs.FIGURES["rank_bars"](paper_figs.load_results([tmp_path / "run"]), tmp_path / "figs")
    (fig,) = figs
    budgets = sorted({r["budget_mac"] for r in saved}, reverse=True)
    for ax, b in zip(fig.axes, budgets, strict=True):
        drawn = {c.get_label(): [bar.get_height() for bar in c] for c in ax.containers}
        want = {m: [np.mean([r["ranks"][layer] for r in saved if r["method"] == m and r["budget_mac"] == b])
                    for layer in ("fc1", "fc2")] for m in ("cobla", "uniform")}
        assert drawn == want
