"""Weight pruning: magnitude (+ retraining), dynamic network surgery, OBD and OBS.

Everything works over a flax parameter PyTree. A *layer weight* is any leaf named
``kernel``; its layer name is the ``/``-joined path of the module that owns it, with
a leading ``params`` collection dropped (``{"params": {"fc1": {"kernel": ...}}}`` ->
``"fc1"``; ``"Fire_0/squeeze"``). A *mask tree* has the structure of the params with
a boolean array (True = kept) for every kernel and ``None`` for every other leaf
(biases are never pruned: they are few and cost nothing to keep).

Methods:

* Magnitude pruning with retraining (Han et al. 2015): drop the weights of smallest
  |w| (per layer or globally), retrain with the pruned weights held at zero, and
  repeat with a higher sparsity.
* Dynamic network surgery (Guo et al. 2016): masks T_k = h_k(W_k) re-evaluated
  during training, so wrongly pruned weights can be spliced back.
* Optimal Brain Damage (LeCun et al. 1989): saliency s_k = 1/2 H_kk w_k^2 with the
  diagonal of the Gauss-Newton (Levenberg-Marquardt) approximation of the loss Hessian,
  as in the paper, or of the Hessian itself (exact, or Hutchinson's estimator).
* Optimal Brain Surgeon (Hassibi & Stork 1993), layer-wise: the quadratic layer
  reconstruction error with the inverse Hessian of the layer inputs gives both the
  saliency w_q^2 / (2 [H^-1]_qq) and the compensating update of the other weights.

References: Han, Pool, Tran & Dally (2015) "Learning both Weights and Connections
for Efficient Neural Networks", NIPS; Guo, Yao & Chen (2016) "Dynamic Network
Surgery for Efficient DNNs", NIPS; LeCun, Denker & Solla (1989) "Optimal Brain
Damage", NIPS; Hassibi & Stork (1993) "Second order derivatives for network
pruning: Optimal Brain Surgeon", NIPS.

One module per method: :mod:`.masks` (mask trees and kernel helpers), :mod:`.report`
(what a pruning run reports), :mod:`.magnitude`, :mod:`.dns`, :mod:`.obd`, :mod:`.obs`.
This package re-exports their public names, so ``from coblax.compress.prune import
magnitude_masks`` keeps working.
"""

from __future__ import annotations

from coblax.compress.prune.dns import (
    dns,
    dns_mask_update,
    dns_thresholds,
    dns_update_probability,
)
from coblax.compress.prune.magnitude import (
    SCOPES,
    MagnitudeSpec,
    iterative_magnitude_prune,
    magnitude_masks,
    magnitude_prune,
    score_masks,
    sparsity_schedule,
)
from coblax.compress.prune.masks import (
    apply_masks,
    full_masks,
    kernels,
    key_str,
    layer_masks,
    layer_name,
    map_kernels,
    mask_or_true,
    masks_from_layers,
    replace_kernels,
)
from coblax.compress.prune.obd import (
    OBD_HESSIANS,
    gauss_newton_diag,
    hessian_diag_exact,
    hessian_diag_hutchinson,
    obd_prune,
    obd_saliency,
)
from coblax.compress.prune.obs import (
    layer_hessian,
    obs_prune,
    obs_prune_layer,
    obs_saliency,
)
from coblax.compress.prune.report import (
    LayerSparsity,
    PruneReport,
    mask_report,
)

__all__ = [
    "SCOPES",
    "key_str",
    "mask_or_true",
    "layer_name",
    "kernels",
    "map_kernels",
    "replace_kernels",
    "full_masks",
    "apply_masks",
    "layer_masks",
    "masks_from_layers",
    "LayerSparsity",
    "PruneReport",
    "mask_report",
    "MagnitudeSpec",
    "score_masks",
    "magnitude_masks",
    "magnitude_prune",
    "sparsity_schedule",
    "iterative_magnitude_prune",
    "dns_thresholds",
    "dns_mask_update",
    "dns_update_probability",
    "dns",
    "OBD_HESSIANS",
    "gauss_newton_diag",
    "hessian_diag_exact",
    "hessian_diag_hutchinson",
    "obd_saliency",
    "obd_prune",
    "layer_hessian",
    "obs_saliency",
    "obs_prune_layer",
    "obs_prune",
]
