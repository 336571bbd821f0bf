"""Weight quantization: fixed point, k-means weight sharing, PQ/RQ codebooks, binarization.

Same conventions as :mod:`coblax.compress.prune`: kernels (leaves named ``kernel``) are the
layer weights, keyed by their ``/``-joined module path; biases stay in float.

* Fixed point ⟨IL, FL⟩ (Gupta et al. 2015): step ε = 2^-FL, range
  [-2^(IL-1), 2^(IL-1) - ε], round to nearest or stochastically (unbiased), and
  saturate outside the range; a MAC of ⟨IL, FL⟩ operands accumulates in
  ⟨2 IL, 2 FL⟩ and is rounded back.
* k-means weight sharing (Han et al. 2016, "Deep Compression", Sec. 3): each layer's
  kept weights share k = 2^bits centroids; the centroids are fine-tuned with the
  gradients summed per cluster.
* Product and residual quantization of a weight matrix (Gong et al. 2014).
* BinaryConnect (Courbariaux et al. 2015) and binarized networks (Courbariaux et
  al. 2016): binary weights (and activations) in the forward/backward passes, a
  real-valued copy updated by the optimizer, straight-through gradients.

Training with a quantized forward pass reuses ``coblax.nn.train.fit``: the helpers here
return an ``apply_fn`` that quantizes the kernels on the fly (the optimizer keeps
updating the float copy) and ``transform_grads`` / ``project`` functions.

References: Gupta, Agrawal, Gopalakrishnan & Narayanan (2015) "Deep Learning with
Limited Numerical Precision", ICML; Han, Mao & Dally (2016) "Deep Compression",
ICLR; Gong, Liu, Yang & Bourdev (2014) "Compressing Deep Convolutional Networks
using Vector Quantization", arXiv:1412.6115; Courbariaux, Bengio & David (2015)
"BinaryConnect", NIPS; Courbariaux, Hubara, Soudry, El-Yaniv & Bengio (2016)
"Binarized Neural Networks", arXiv:1602.02830.

One module per family: :mod:`.fixed` (fixed point), :mod:`.kmeans` (k-means codebooks
and weight sharing), :mod:`.sharing` (training shared weights), :mod:`.codebooks`
(product / residual quantization), :mod:`.binary` (BinaryConnect, binarized networks);
:mod:`.ste` holds the straight-through pieces they share. This package re-exports
their public names, so ``from coblax.compress.quantize import kmeans_codebook`` keeps
working.
"""

from __future__ import annotations

from coblax.compress.quantize.binary import (
    BINARY_MODES,
    BinarizedMLP,
    BinaryConnectMLP,
    BinaryDense,
    binarize,
    binarize_params,
    binaryconnect_apply_fn,
    clip_project,
    glorot_lr_factor,
    glorot_lr_scale,
    hard_sigmoid,
    sign_ste,
)
from coblax.compress.quantize.codebooks import (
    ProductQuantization,
    ResidualQuantization,
    kmeans_compression_ratio,
    pq_compression_ratio,
    product_quantize,
    residual_quantize,
    rq_compression_ratio,
)
from coblax.compress.quantize.fixed import (
    ROUNDINGS,
    FixedPointSpec,
    fixed_point,
    fixed_point_apply_fn,
    fixed_point_mac,
    fixed_point_quantize,
    validate_bits,
)
from coblax.compress.quantize.kmeans import (
    INITS,
    KMeansInfo,
    LayerCodebook,
    WeightSharingReport,
    WeightSharingSpec,
    bits_per_layer,
    dequantize,
    kernel_mask,
    kmeans_codebook,
    kmeans_share,
    masks_by_layer,
    weight_share,
)
from coblax.compress.quantize.sharing import (
    cluster_gradient,
    cluster_means,
    finetune_centroids,
    finetune_shared,
    share_gradients,
    snap_to_clusters,
)

__all__ = [
    "ROUNDINGS",
    "INITS",
    "BINARY_MODES",
    "bits_per_layer",
    "masks_by_layer",
    "kernel_mask",
    "validate_bits",
    "fixed_point",
    "fixed_point_mac",
    "fixed_point_apply_fn",
    "FixedPointSpec",
    "fixed_point_quantize",
    "KMeansInfo",
    "kmeans_codebook",
    "dequantize",
    "LayerCodebook",
    "WeightSharingReport",
    "kmeans_share",
    "WeightSharingSpec",
    "weight_share",
    "cluster_gradient",
    "share_gradients",
    "snap_to_clusters",
    "finetune_shared",
    "finetune_centroids",
    "cluster_means",
    "kmeans_compression_ratio",
    "pq_compression_ratio",
    "rq_compression_ratio",
    "ProductQuantization",
    "product_quantize",
    "ResidualQuantization",
    "residual_quantize",
    "hard_sigmoid",
    "binarize",
    "binaryconnect_apply_fn",
    "clip_project",
    "glorot_lr_factor",
    "glorot_lr_scale",
    "BinaryConnectMLP",
    "binarize_params",
    "sign_ste",
    "BinaryDense",
    "BinarizedMLP",
]
