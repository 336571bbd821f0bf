"""Energy estimate against a hand computation."""

from __future__ import annotations

import pytest

from coblax.compress.energy import EnergyCosts, LayerWork, estimate_energy


def test_hand_computation():
    layers = [
        # a conv layer: 500 weights used 100 times each, half kept, 8-bit fixed point -> int8
        LayerWork("conv1", macs=50_000, weights=500, nonzeros=250, weight_bits=8,
                  fixed_point=True),
        # a dense layer: 1000 weights, 10 % kept, 6-bit fixed point
        LayerWork("fc1", macs=1_000, weights=1_000, nonzeros=100, weight_bits=6,
                  fixed_point=True),
        # a layer left in float32, unpruned
        LayerWork("fc2", macs=20, weights=20, nonzeros=20, weight_bits=32),
    ]
    rep = estimate_energy(layers, original_bits=32 * 1520, compressed_bits=8 * 400, sram_bytes=1024)
    # Original: 51,020 float MACs x (3.7 + 0.9) pJ;
    # 6,080 bytes > 1,024 -> DRAM: 1,520 words x 640 pJ.
    assert rep.original.compute_pj == pytest.approx(51_020 * 4.6)
    assert rep.original.memory == "dram"
    assert rep.original.memory_pj == pytest.approx(1_520 * 640)
    assert rep.original.total_pj == pytest.approx(234_692 + 972_800)
    # Compressed: int8 MACs 25,000 + 100 at 0.23 pJ; float MACs 20 at 4.6 pJ;
    # 400 bytes fit in SRAM: 3,200 / 32 = 100 words x 5 pJ.
    assert rep.compressed.int8_macs == 25_100 and rep.compressed.fp32_macs == 20
    assert rep.compressed.compute_pj == pytest.approx(25_100 * 0.23 + 20 * 4.6)
    assert rep.compressed.memory == "sram"
    assert rep.compressed.memory_pj == pytest.approx(500.0)
    total_c = 25_100 * 0.23 + 92 + 500
    assert rep.ratio == pytest.approx((234_692 + 972_800) / total_c)
    d = rep.to_dict()
    assert d["compressed"]["total_pj"] == pytest.approx(total_c)
    assert any("SRAM" in a for a in d["assumptions"])


def test_kmeans_codebook_layers_count_float_macs():
    # A 5-bit k-means layer computes with float centroids: float MACs, unless a
    # fixed-point stage really ran (fixed_point=True).
    kmeans = LayerWork("fc1", macs=1_000, weights=1_000, nonzeros=100, weight_bits=5)
    rep = estimate_energy([kmeans], original_bits=32_000, compressed_bits=8 * 100)
    assert rep.compressed.int8_macs == 0 and rep.compressed.fp32_macs == 100
    assert rep.compressed.compute_pj == pytest.approx(100 * (3.7 + 0.9))
    fixed = LayerWork("fc1", macs=1_000, weights=1_000, nonzeros=100, weight_bits=5,
                      fixed_point=True)
    rep = estimate_energy([fixed], original_bits=32_000, compressed_bits=8 * 100)
    assert rep.compressed.int8_macs == 100
    assert rep.compressed.compute_pj == pytest.approx(100 * (0.2 + 0.03))


def test_sram_boundary_and_custom_costs():
    layers = [LayerWork("fc", macs=10, weights=10, nonzeros=10)]
    costs = EnergyCosts(fp32_mult=1.0, fp32_add=0.0, sram_per_32bit=2.0, dram_per_32bit=100.0)
    at = estimate_energy(
        layers, original_bits=8 * 64, compressed_bits=8 * 64, sram_bytes=64, costs=costs
    )
    assert at.original.memory == "sram" and at.original.memory_pj == pytest.approx(16 * 2.0)
    over = estimate_energy(
        layers, original_bits=8 * 65, compressed_bits=0, sram_bytes=64, costs=costs
    )
    assert over.original.memory == "dram"
    assert over.original.memory_pj == pytest.approx(520 / 32 * 100.0)
    # An unpruned 32-bit layer keeps float MACs.
    assert over.compressed.compute_pj == pytest.approx(10.0)


def test_bad_input():
    with pytest.raises(ValueError, match="nonzeros"):
        LayerWork("fc", macs=10, weights=10, nonzeros=11)
    with pytest.raises(ValueError, match="weight_bits"):
        LayerWork("fc", macs=10, weights=10, nonzeros=1, weight_bits=0)
    with pytest.raises(ValueError, match="layers"):
        estimate_energy([], original_bits=1, compressed_bits=1)
    with pytest.raises(ValueError, match="fp32_mult"):
        EnergyCosts(fp32_mult=-1.0)
