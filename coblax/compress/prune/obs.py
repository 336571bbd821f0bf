"""Optimal Brain Surgeon (Hassibi & Stork 1993), layer-wise.

The quadratic layer reconstruction error with the inverse Hessian of the layer inputs
gives both the saliency w_q^2 / (2 [H^-1]_qq) and the compensating update of the other
weights.

Reference: Hassibi & Stork (1993) "Second order derivatives for network pruning:
Optimal Brain Surgeon", NIPS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from coblax.compress.prune.magnitude import layer_sparsity, n_pruned
from coblax.compress.prune.masks import (
    Masks,
    Params,
    Sparsity,
    apply_masks,
    check_layer_keys,
    kernels,
    masks_from_layers,
    replace_kernels,
)
from coblax.compress.prune.report import PruneReport, mask_report

__all__ = ["layer_hessian", "obs_saliency", "obs_prune_layer", "obs_prune"]


def layer_hessian(X: Any, damp: float = 1e-4) -> np.ndarray:
    """H = (2/N) X^T X + damp * mean(diag) * I for a linear layer y = x W.

    It is the Hessian of the reconstruction error E(W') = (1/N) ||X W - X W'||_F^2
    w.r.t. any one output column of W' (the same for every column). ``damp`` is
    relative to the mean diagonal so it is scale free; 0 disables it.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (N, d_in), got shape {X.shape}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    H = 2.0 / X.shape[0] * X.T @ X
    if damp > 0:
        H = H + damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    return H


def _check_obs_inputs(W: Any, X: Any) -> tuple[np.ndarray, np.ndarray]:
    W = np.asarray(W, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (d_in, d_out), got shape {W.shape}")
    if X.ndim != 2 or X.shape[1] != W.shape[0]:
        raise ValueError(f"X must have shape (N, {W.shape[0]}) to match W, got {X.shape}")
    return W, X


def obs_saliency(W: Any, X: Any, damp: float = 1e-4) -> np.ndarray:
    """OBS saliencies L_q = w_q^2 / (2 [H^-1]_qq) of every entry of W (d_in, d_out).

    Hassibi & Stork (1993), Eq. (5) with H from :func:`layer_hessian`; L_q is
    the increase of (1/N) ||X W - X W'||^2 after deleting w_q and applying the
    optimal compensation to the rest of its column.
    """
    W, X = _check_obs_inputs(W, X)
    hinv_diag = np.diag(np.linalg.inv(layer_hessian(X, damp)))
    return W**2 / (2.0 * hinv_diag[:, None])


def obs_prune_layer(
    W: Any, X: Any, n_prune: int, damp: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal Brain Surgeon on one dense layer y = x W, one weight at a time.

    With H = (2/N) X^T X (+ damping) shared by all output columns, each step
    deletes the (q, c) of least saliency L = w_qc^2 / (2 [H_c^-1]_qq) over the
    whole layer and updates its column by
        δw_c = -(w_qc / [H_c^-1]_qq) H_c^-1 e_q            (Hassibi & Stork Eq. 5)
    then downdates that column's inverse Hessian to the remaining coordinates,
        H_c^-1 <- H_c^-1 - H_c^-1 e_q e_q^T H_c^-1 / [H_c^-1]_qq,
    which zeroes row/column q, so later updates keep w_qc = 0. For the quadratic
    error this is exact: the result equals the least-squares refit of each column
    on its kept inputs (with the damping as ridge term).

    Cost: O(d_in^2) per deletion plus an O(d_in^2) inverse per touched column
    (memory d_in^2 per touched column) — meant for small layers.

    Args:
      W: weights (d_in, d_out).
      X: layer inputs (N, d_in).
      n_prune: number of weights to delete, 0 <= n_prune <= W.size.
      damp: relative damping (see :func:`layer_hessian`).

    Returns:
      (W_new float64 with the pruned entries exactly 0, keep-mask bool).
    """
    W, X = _check_obs_inputs(W, X)
    if not isinstance(n_prune, (int, np.integer)) or not 0 <= n_prune <= W.size:
        raise ValueError(f"n_prune must be an int in [0, {W.size}], got {n_prune!r}")
    d_in, d_out = W.shape
    hinv0 = np.linalg.inv(layer_hessian(X, damp))
    W = W.copy()
    mask = np.ones(W.shape, dtype=bool)
    col_hinv: dict[int, np.ndarray] = {}  # copy-on-write per touched column

    def column_best(c: int) -> tuple[float, int]:
        hinv = col_hinv.get(c, hinv0)
        d = np.diag(hinv)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = W[:, c] ** 2 / (2.0 * d)
        s[~mask[:, c]] = np.inf
        q = int(np.argmin(s))
        return float(s[q]), q

    best = [column_best(c) for c in range(d_out)]
    for _ in range(int(n_prune)):
        c = int(np.argmin([b[0] for b in best]))
        q = best[c][1]
        hinv = col_hinv.get(c, hinv0)
        col = hinv[:, q].copy()
        W[:, c] -= W[q, c] / col[q] * col
        mask[q, c] = False
        W[~mask[:, c], c] = 0.0  # exact zeros despite round-off in the downdates
        hinv = hinv - np.outer(col, col) / col[q]
        hinv[q, :] = 0.0
        hinv[:, q] = 0.0
        col_hinv[c] = hinv
        if mask[:, c].any():
            best[c] = column_best(c)
        else:
            best[c] = (np.inf, 0)
    return W, mask


def obs_prune(
    params: Params,
    layer_inputs: Mapping[str, Any],
    sparsity: Sparsity,
    *,
    damp: float = 1e-4,
) -> tuple[Params, Masks, PruneReport]:
    """Layer-wise OBS over the kernels named in ``layer_inputs``.

    Each kernel is viewed as a matrix (prod(shape[:-1]), out) (for a conv this
    needs im2col patches as inputs) and :func:`obs_prune_layer` deletes
    ``floor(s * size)`` weights with ``X = layer_inputs[layer]`` (N, rows).
    Other kernels are left dense.

    Returns:
      (params, mask tree, report).
    """
    ks = kernels(params)
    check_layer_keys(layer_inputs, ks, "layer_inputs")
    fractions = layer_sparsity(sparsity, list(ks), "layer")
    new, keep = {}, {}
    for name, X in layer_inputs.items():
        w = np.asarray(ks[name])
        mat = w.reshape(-1, w.shape[-1])
        w_new, m = obs_prune_layer(mat, X, n_pruned(fractions[name], mat.size), damp)
        new[name] = jnp.asarray(w_new.reshape(w.shape), dtype=ks[name].dtype)
        keep[name] = m.reshape(w.shape)
    masks = masks_from_layers(params, keep)
    params = apply_masks(replace_kernels(params, new), masks)
    return params, masks, mask_report(masks, extra={"method": "obs", "damp": damp})
