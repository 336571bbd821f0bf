"""Issue 22, finding 5: ``coblax study`` saves partial results per finished piece and a
resumed run skips the finished pieces.

A tiny study is stopped by SIGTERM's exception (:class:`RunInterrupted`, raised where
piece k + 1 starts); the partial file must hold the k pieces finished before it, the
rerun must compute only the pieces not finished, and its records must equal an
uninterrupted run's. ``svd_fc`` (a piece per layer of the 64-16-8-10 MLP) in the default
suite; ``prune_quant`` (a piece per part, the study whose 38-minute run an unwritable
``--out`` used to lose) with ``-m slow``.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest

from coblax.app.studies import load_study_config, prune_quant, run_study, svd_fc
from coblax.app.studies.pieces import Pieces
from coblax.app.studies.runner import PARTIAL
from coblax.util.errors import RunInterrupted

QUICK = Path(__file__).resolve().parents[1] / "experiments" / "studies" / "prune_quant_quick.toml"
PARTS = ["magnitude", "fixed_point", "codebooks", "dns", "saliency", "binary", "kmeans_hist"]


def _tiny(tmp_path: Path):
    cfg = load_study_config(QUICK)
    pq = dataclasses.replace(
        cfg.prune_quant, model={"name": "mlp", "hidden": [16, 8]}, layer_sparsities=(), sparsities=(0.8,),
        steps=1, retrain_epochs=0, word_lengths=(4,), roundings=("nearest",), kmeans_bits=(2,), pq_k=(),
        rq_stages=(), dns_sparsities=(0.8,), dns_rates=(), dns_epochs=0, saliency_sparsities=(0.8,),
        saliency_examples=32, obs_max_inputs=16, binary_epochs=1, binary_modes=("det",), bnn_hidden=(),
        hist_layer="", hist_bits=2, hist_bins=8, hist_finetune_epochs=1)
    return dataclasses.replace(cfg, seeds=(0,), cache_dir=str(tmp_path / "cache"),
                               train=dataclasses.replace(cfg.train, epochs=2),
                               data=dataclasses.replace(cfg.data, limit_train=200, limit_test=100), prune_quant=pq)


def _count_calls(monkeypatch, calls: list[str], fail_at: str | None = None) -> None:
    """Wrap each part of prune_quant: record its name when it runs; ``fail_at`` raises SIGTERM's exception."""
    for part in PARTS:
        original = getattr(prune_quant, f"_pq_{part}")

        def wrapped(*args, part=part, original=original):
            if part == fail_at:
                raise RunInterrupted(signal.SIGTERM)
            calls.append(part)
            return original(*args)

        monkeypatch.setattr(prune_quant, f"_pq_{part}", wrapped)


def _records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["records"]


@pytest.mark.slow
def test_resume_skips_finished_pieces_and_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _tiny(tmp_path)
    whole: list[str] = []
    with monkeypatch.context() as m:
        _count_calls(m, whole)
        run_study(cfg, tmp_path / "whole", progress=False)
    assert whole == PARTS

    first: list[str] = []
    with monkeypatch.context() as m:
        _count_calls(m, first, fail_at="dns")
        with pytest.raises(RunInterrupted) as info:
            run_study(cfg, tmp_path / "out", progress=False)
    assert first == PARTS[:3]
    partial = json.loads((tmp_path / "out" / PARTIAL).read_text())
    assert list(partial["pieces"]["0"]) == ["base", *PARTS[:3]] and partial["done_seeds"] == []
    assert info.value.saved == sum(map(len, partial["pieces"]["0"].values())) > 0
    assert not (tmp_path / "out" / "results.json").exists()

    second: list[str] = []
    messages: list[str] = []
    with monkeypatch.context() as m:
        _count_calls(m, second)
        run_study(cfg, tmp_path / "out", progress=False, log=messages.append)
    assert second == PARTS[3:]  # the finished parts are not computed again
    assert any("4 piece(s)" in msg for msg in messages), messages
    assert _records(tmp_path / "out") == _records(tmp_path / "whole")
    assert not (tmp_path / "out" / PARTIAL).exists()
    assert "pieces" not in json.loads((tmp_path / "out" / "results.json").read_text())


SVD = Path(__file__).resolve().parents[1] / "experiments" / "studies" / "svd_fc_quick.toml"


def _count_layers(monkeypatch, calls: list[str], fail_on_call: int | None = None) -> None:
    """Wrap svd_fc's per-layer piece: record each layer it computes; raise SIGTERM's exception on call k."""
    original = svd_fc._layer_records

    def wrapped(sv, mc, base, layer, data):
        if len(calls) + 1 == fail_on_call:
            raise RunInterrupted(signal.SIGTERM)
        calls.append(layer.name)
        return original(sv, mc, base, layer, data)

    monkeypatch.setattr(svd_fc, "_layer_records", wrapped)


def test_svd_fc_resume_skips_finished_layers_and_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = load_study_config(SVD)
    sv = dataclasses.replace(cfg.svd_fc, model={"name": "mlp", "hidden": [16, 8]}, layers=(),
                             rank_fractions=(0.25, 0.5))
    cfg = dataclasses.replace(cfg, seeds=(0, 1), cache_dir=str(tmp_path / "cache"), svd_fc=sv,
                              train=dataclasses.replace(cfg.train, epochs=1),
                              data=dataclasses.replace(cfg.data, limit_train=200, limit_test=100))
    whole: list[str] = []
    with monkeypatch.context() as m:
        _count_layers(m, whole)
        run_study(cfg, tmp_path / "whole", progress=False)
    layers = whole[:3]
    assert whole == layers * 2  # three dense layers, two seeds

    first: list[str] = []
    with monkeypatch.context() as m:  # seed 0 finished, seed 1 stopped where its second layer starts
        _count_layers(m, first, fail_on_call=5)
        with pytest.raises(RunInterrupted):
            run_study(cfg, tmp_path / "out", progress=False)
    assert first == layers + layers[:1]
    partial = json.loads((tmp_path / "out" / PARTIAL).read_text())
    assert partial["done_seeds"] == [0] and list(partial["pieces"]["1"]) == [f"layer {layers[0]}"]

    second: list[str] = []
    with monkeypatch.context() as m:
        _count_layers(m, second)
        run_study(cfg, tmp_path / "out", progress=False)
    assert second == layers[1:]  # seed 0 and seed 1's first layer are not computed again
    assert _records(tmp_path / "out") == _records(tmp_path / "whole")


def test_pieces_run_each_key_once_and_return_copies():
    saved: dict[str, list] = {}
    pieces = Pieces(done={"a": [{"x": 1}]}, save=saved.__setitem__)
    calls = []
    got = pieces.run("a", lambda: calls.append("a") or [{"x": 2}])
    got.append({"x": 9})  # a caller extending the list must not change the saved piece
    assert pieces.run("a", lambda: []) == [{"x": 1}] and calls == []
    assert pieces.run("b", lambda: calls.append("b") or [{"y": 1}]) == [{"y": 1}]
    assert calls == ["b"] and saved == {"b": [{"y": 1}]} and pieces.computed == ["b"]
