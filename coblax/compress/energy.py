"""Per-inference energy estimate of a network, original vs compressed.

A first-order model from per-operation costs at 45 nm (Horowitz 2014, as quoted by
Han et al. 2015/2016):

    E = sum_layers MACs_l * (E_mult + E_add) + (bits fetched / 32) * E_access

* original: every MAC is a 32-bit float multiply + add; all weights (32 bits
  each) are fetched once per inference;
* compressed: only the MACs of nonzero weights run (MACs_l * nnz_l / n_l, exact
  for dense and convolution layers since every weight of a layer is used the
  same number of times); a layer that runs in fixed point with <= 8-bit weights
  does 8-bit integer MACs, every other layer -- k-means codebook layers included,
  whose centroids are float -- float MACs; the bits fetched are the file's bits;
* a model whose weights fit in ``sram_bytes`` is fetched from SRAM, else from DRAM.

Not counted (and stated in the report): activation traffic, bias adds, decoding
of the Huffman / index streams and the codebook look-up, and control overhead.

Reference: Horowitz (2014) "Computing's energy problem", ISSCC; Han, Pool, Tran &
Dally (2015) Fig. 1 / Table; Han, Mao & Dally (2016) "Deep Compression", Sec. 6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = [
    "EnergyCosts",
    "LayerWork",
    "EnergyEstimate",
    "EnergyReport",
    "estimate_energy",
    "DEFAULT_SRAM_BYTES",
]

DEFAULT_SRAM_BYTES = 256 * 1024  # an on-chip buffer of a small accelerator


@dataclasses.dataclass(frozen=True)
class EnergyCosts:
    """Energy per operation in picojoules (45 nm; seed table)."""

    fp32_mult: float = 3.7
    fp32_add: float = 0.9
    int8_mult: float = 0.2
    int8_add: float = 0.03
    sram_per_32bit: float = 5.0
    dram_per_32bit: float = 640.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"EnergyCosts.{f.name} must be a number >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class LayerWork:
    """What one layer does per inference.

    Attributes:
      name: layer name.
      macs: multiply-accumulates per example with all weights (dense count).
      weights: number of weights of the kernel.
      nonzeros: weights kept after pruning (= weights if not pruned).
      weight_bits: bits per stored weight (a k-means code width, or 32).
      fixed_point: the layer really computes in fixed point (a fixed-point stage
        produced its weights): with ``weight_bits`` <= 8 its MACs are 8-bit integer
        MACs. k-means codebook layers compute with float centroids, so they keep
        float MACs whatever their code width.
    """

    name: str
    macs: int
    weights: int
    nonzeros: int
    weight_bits: int = 32
    fixed_point: bool = False

    def __post_init__(self) -> None:
        if self.weights <= 0 or self.macs < 0:
            raise ValueError(f"layer {self.name!r}: weights must be > 0 and macs >= 0")
        if not 0 <= self.nonzeros <= self.weights:
            raise ValueError(
                f"layer {self.name!r}: nonzeros must be in [0, weights={self.weights}], got "
                f"{self.nonzeros}"
            )
        if not 1 <= self.weight_bits <= 32:
            raise ValueError(
                f"layer {self.name!r}: weight_bits must be in [1, 32], got {self.weight_bits}"
            )


@dataclasses.dataclass(frozen=True)
class EnergyEstimate:
    """Energy of one inference of one form of the network (picojoules)."""

    macs: float
    int8_macs: float
    fp32_macs: float
    compute_pj: float
    bits_fetched: float
    memory: str  # "sram" | "dram"
    memory_pj: float

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.memory_pj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"total_pj": self.total_pj}


@dataclasses.dataclass(frozen=True)
class EnergyReport:
    """Original vs compressed energy with the assumptions that produced them."""

    original: EnergyEstimate
    compressed: EnergyEstimate
    sram_bytes: int
    costs: EnergyCosts
    assumptions: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """How many times less energy the compressed network needs."""
        if not self.compressed.total_pj:
            return float("inf")
        return self.original.total_pj / self.compressed.total_pj

    def to_dict(self) -> dict[str, Any]:
        return {
            "original": self.original.to_dict(),
            "compressed": self.compressed.to_dict(),
            "ratio": self.ratio,
            "sram_bytes": self.sram_bytes,
            "costs_pj": dataclasses.asdict(self.costs),
            "assumptions": list(self.assumptions),
        }


def _fetch(bits: float, sram_bytes: int, costs: EnergyCosts) -> tuple[str, float]:
    if bits / 8 <= sram_bytes:
        return "sram", bits / 32 * costs.sram_per_32bit
    return "dram", bits / 32 * costs.dram_per_32bit


def estimate_energy(
    layers: Sequence[LayerWork],
    *,
    original_bits: float,
    compressed_bits: float,
    sram_bytes: int = DEFAULT_SRAM_BYTES,
    costs: EnergyCosts = EnergyCosts(),
) -> EnergyReport:
    """Energy per inference of the original and the compressed network.

    original   = sum_l MACs_l (E_fmul + E_fadd) + original_bits / 32 * E_mem(original)
    compressed = sum_l MACs_l nnz_l / n_l (E_mul,l + E_add,l)
                 + compressed_bits / 32 * E_mem(compressed)
    with E_mul,l, E_add,l the int8 costs when layer l computes in fixed point with
    <= 8-bit weights (``LayerWork.fixed_point``), else float32, and E_mem = SRAM cost
    if the bits fit in ``sram_bytes`` else DRAM cost.

    Args:
      layers: one :class:`LayerWork` per weight layer.
      original_bits: storage of the original weights (32 per parameter).
      compressed_bits: storage of the compressed model (8 * file bytes).
      sram_bytes: on-chip memory size deciding SRAM vs DRAM.
      costs: per-operation energies.
    """
    if not layers:
        raise ValueError("layers must list at least one layer")
    if original_bits < 0 or compressed_bits < 0:
        raise ValueError("original_bits and compressed_bits must be >= 0")
    if not isinstance(sram_bytes, int) or sram_bytes < 0:
        raise ValueError(f"sram_bytes must be an int >= 0, got {sram_bytes!r}")
    fp_mac = costs.fp32_mult + costs.fp32_add
    int_mac = costs.int8_mult + costs.int8_add
    dense = float(sum(layer.macs for layer in layers))
    mem, mem_pj = _fetch(original_bits, sram_bytes, costs)
    original = EnergyEstimate(dense, 0.0, dense, dense * fp_mac, float(original_bits), mem, mem_pj)
    int8 = fp32 = 0.0
    for layer in layers:
        nz_macs = layer.macs * layer.nonzeros / layer.weights
        if layer.fixed_point and layer.weight_bits <= 8:
            int8 += nz_macs
        else:
            fp32 += nz_macs
    mem, mem_pj = _fetch(compressed_bits, sram_bytes, costs)
    compressed = EnergyEstimate(int8 + fp32, int8, fp32, int8 * int_mac + fp32 * fp_mac,
                                float(compressed_bits), mem, mem_pj)
    assumptions = (
        "one inference of one example; energies per operation from Horowitz (45 nm)",
        "original: all MACs as 32-bit float multiply + add; all weights fetched once "
        "(32 bits each)",
        "compressed: only MACs of nonzero weights; 8-bit integer MACs for layers that run in "
        "fixed point with <= 8-bit weights (activations assumed 8-bit there), 32-bit float "
        "MACs otherwise (k-means codebook layers compute with float centroids)",
        "compressed: bits fetched = the compressed file's bits, once per inference",
        f"weights are fetched from SRAM ({costs.sram_per_32bit} pJ / 32 bits) if they fit in "
        f"{sram_bytes} bytes, else from DRAM ({costs.dram_per_32bit} pJ / 32 bits)",
        "not counted: activations, bias adds, Huffman / index decoding, codebook look-ups, control",
    )
    return EnergyReport(original, compressed, sram_bytes, costs, assumptions)
