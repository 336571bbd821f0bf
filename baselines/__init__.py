"""Rank-allocation baselines for coblax, registered as ``coblax.allocators`` plug-ins.

* ``cptv`` — :class:`CPTV` (Tai et al. 2016), one energy fraction beta for all layers.
* ``pos_greedy`` / ``pos_greedy_unnormalized`` — :class:`POSGreedy` (Zhang et al. 2016).
* ``pos_exact`` — :class:`POSExact`, the MILP optimum of the POS objective.
* ``vbmf`` — :class:`VBMF`, analytic empirical VBMF thresholds (Nakajima et al. 2013).
* ``gavish_donoho`` — :class:`GavishDonoho`, optimal hard thresholds (Gavish & Donoho 2014).
* ``alds`` — :class:`ALDS`, one shared relative operator-norm error (Liebenwein et al. 2021).
* ``lc`` — :class:`LC`, learning-compression rank selection (Idelbayev & Carreira-Perpiñán 2020).
* ``balf`` — :class:`BALF`, activation-aware energy allocation by Lagrangian bisection (2025).
"""

from coblax.baselines.alds import ALDS
from coblax.baselines.balf import BALF
from coblax.baselines.cptv import CPTV, cptv_rank
from coblax.baselines.gavish_donoho import GavishDonoho, lambda_star, omega, omega_approx
from coblax.baselines.gavish_donoho import threshold as gavish_donoho_threshold
from coblax.baselines.lc import LC
from coblax.baselines.pos import POSExact, POSGreedy, POSGreedyUnnormalized, pos_objective
from coblax.baselines.vbmf import VBMF, EVBMFResult, evbmf, evbmf_from_singular_values

__all__ = [
    "CPTV",
    "cptv_rank",
    "POSGreedy",
    "POSGreedyUnnormalized",
    "POSExact",
    "pos_objective",
    "VBMF",
    "EVBMFResult",
    "evbmf",
    "evbmf_from_singular_values",
    "GavishDonoho",
    "lambda_star",
    "omega",
    "omega_approx",
    "gavish_donoho_threshold",
    "ALDS",
    "LC",
    "BALF",
]
