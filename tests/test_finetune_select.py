"""``cobla.select = "finetune"``: the best K candidates fine-tuned S steps, the best after them kept."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from coblax.app.cli import main
from coblax.lowrank.allocation import AllocationProblem, LayerCost, is_feasible
from coblax.lowrank.cobla import COBLA
from coblax.lowrank.finetune_select import finetune_pick
from helpers import tiny_run_config

LAYERS = SimpleNamespace(layers=[SimpleNamespace(name="a"), SimpleNamespace(name="b")])


def _never():
    raise AssertionError("the tuner must not be built")


def test_pick_is_the_best_after_finetuning_and_k1_is_the_accuracy_pick():
    masks = {"a": np.ones(2), "b": np.ones(1)}
    chosen = ({"a": 2, "b": 1}, masks, (-0.90, 0.3))           # A: best before fine-tuning
    scored = [((-0.70, 0.5), {"a": 1, "b": 3}, masks),          # C
              ((-0.90, 0.3), {"a": 2, "b": 1}, masks),          # A again (another mask mode): skipped
              ((-0.80, 0.4), {"a": 1, "b": 2}, masks)]          # B: second before, best after
    after = {(2, 1): 0.80, (1, 2): 0.86, (1, 3): 0.83}
    calls = []

    def make_tuner():
        def tune(ranks, m):
            calls.append(dict(ranks))
            return after[(ranks["a"], ranks["b"])]
        return tune

    ranks, _, stats = finetune_pick(LAYERS, chosen, scored, 3, make_tuner)
    assert ranks == {"a": 1, "b": 2}
    assert calls == [{"a": 2, "b": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 3}]  # K distinct, in score order
    assert stats["chosen"] == 1
    assert [c["accuracy_after"] for c in stats["candidates"]] == [0.80, 0.86, 0.83]
    assert stats["candidates"][1]["score_before"] == [-0.80, 0.4]
    # K = 2: A and B only
    assert finetune_pick(LAYERS, chosen, scored, 2, make_tuner)[0] == {"a": 1, "b": 2}
    # K = 1: the accuracy pick itself, nothing trained
    ranks, out_masks, stats = finetune_pick(LAYERS, chosen, scored, 1, _never)
    assert ranks == chosen[0] and out_masks is not masks and stats["chosen"] == 0
    # a tie after fine-tuning keeps the better score before
    assert finetune_pick(LAYERS, chosen, scored, 3, lambda: lambda r, m: 0.5)[0] == chosen[0]


class _Scored:
    """E(m) = Σ σ²(1 − m)² over two layers; validation accuracy a function of the kept ranks."""

    def __init__(self, layers, metrics):
        self.layers, self._metrics = layers, metrics
        self.s2 = np.concatenate([l.sigma ** 2 for l in layers])

    def value(self, m):
        return float(np.sum(self.s2 * (1 - m) ** 2))

    def value_and_grad(self, m):
        return self.value(m), -2 * self.s2 * (1 - m)

    def validation_loss(self, m):
        return self.value(m)

    def validation_metrics(self, m):
        sizes = np.cumsum([0] + [l.full_rank for l in self.layers])
        ranks = {l.name: int(np.count_nonzero(m[sizes[i]:sizes[i + 1]])) for i, l in enumerate(self.layers)}
        return self._metrics(ranks)


class _Training:
    """A training access whose 'fine-tuning' favours rank in layer b (the accuracy before favours layer a)."""

    def __init__(self):
        self.tuned: list[dict] = []

    def candidate_tuner(self, problem, steps, learning_rate):
        assert (steps, learning_rate) == (7, 1e-3)

        def tune(ranks, masks):
            assert set(masks) == {"a", "b"}
            self.tuned.append(dict(ranks))
            return ranks["b"] / 7.0
        return tune


def _problem(training):
    layers = tuple(LayerCost(n, "dense", (10, 10), np.linspace(1.2, 0.8, 10), 1.0, 1.0, 100.0, 100.0) for n in "ab")
    loss = _Scored(layers, lambda r: (0.1, r["a"] / 7.0))
    return AllocationProblem(layers, 7.0, 7.0, loss=loss, seed=0, training=training)


def test_cobla_finetune_picks_the_candidate_best_after_finetuning():
    common = dict(max_iter=50, warm_start="uniform", roundings=6, local_search=0, polish=0, saturation_rounds=0)
    by_acc = COBLA(**common)(_problem(None))
    training = _Training()
    k = 4
    alloc = COBLA(**common, select="finetune", finetune_candidates=k, finetune_steps=7,
                  finetune_learning_rate=1e-3)(_problem(training))
    sel = alloc.stats["rounding"]["finetune_select"]
    # the first candidate is the accuracy pick; the others the next distinct ones by score
    assert training.tuned[0] == by_acc.ranks
    cands = sorted(alloc.stats["rounding"]["candidates"], key=lambda c: c["score"])
    distinct = []
    for c in cands:
        if c["ranks"] not in distinct:
            distinct.append(c["ranks"])
    assert training.tuned == distinct[:k] and len(training.tuned) >= 2
    best = max(training.tuned, key=lambda r: r["b"])
    assert alloc.ranks == best != by_acc.ranks
    assert is_feasible(_problem(None), alloc.ranks)
    assert [c["ranks"] for c in sel["candidates"]] == training.tuned
    # K = 1: exactly the accuracy pick (ranks and masks), no fine-tuning
    one = _Training()
    alloc1 = COBLA(**common, select="finetune", finetune_candidates=1, finetune_steps=7,
                   finetune_learning_rate=1e-3)(_problem(one))
    assert alloc1.ranks == by_acc.ranks and one.tuned == []
    for name in by_acc.masks:
        np.testing.assert_array_equal(alloc1.masks[name], by_acc.masks[name])


@pytest.mark.parametrize("key", ["finetune_candidates", "finetune_steps"])
@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_bad_k_or_s_names_its_key(key, value):
    with pytest.raises(ValueError, match=f"cobla.{key}"):
        COBLA(select="finetune", **{key: value})


@pytest.mark.parametrize("section,key", [("cobla", "finetune_candidates"), ("cobla", "finetune_steps"),
                                         ("method_options__cobla", "finetune_steps")])
def test_cli_exits_2_naming_the_key(tmp_path, capsys, section, key):
    cfg = tiny_run_config(tmp_path, methods='["cobla"]', **{f"{section}__{key}": "0"})
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cobla.{key}" in err and "Traceback" not in err
    assert not out.exists()


def test_runner_records_the_candidates_before_and_after(tmp_path):
    """The real tuner end to end on the tiny config: K fine-tuned candidates, recorded."""
    cfg = tiny_run_config(tmp_path, methods='["cobla"]', cobla__select='"finetune"', cobla__finetune_candidates="2",
                          cobla__finetune_steps="3", cobla__bn_stats='"recalibrated"', cobla__roundings="6",
                          budgets__mac="[0.3]", budgets__param="[0.3]")
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    (record,) = json.loads((out / "results.json").read_text())["records"]
    sel = record["diagnostics"]["rounding"]["finetune_select"]
    assert sel["k"] == 2 and len(sel["candidates"]) == 2  # two distinct roundings at this budget
    for c in sel["candidates"]:
        assert len(c["score_before"]) == 2  # (-accuracy, loss)
        assert 0.0 <= c["accuracy_after"] <= 1.0 and round(c["accuracy_after"] * 32, 6) % 1 == 0  # of 32 images
    assert record["ranks"] == sel["candidates"][sel["chosen"]]["ranks"]
