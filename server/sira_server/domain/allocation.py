"""Fixed-weight allocation: pick an arm with probability proportional to its weight.

Pure and deterministic given the uniform draw ``u``: the caller owns the random source,
so tests can sweep ``u`` and the server can use any generator. Dropped (inactive) arms
get weight zero and are never chosen. Thompson sampling lives in ``domain/bayes.py``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["weighted_choice", "weighted_propensities"]


def _active_weights(weights: npt.ArrayLike, active: npt.ArrayLike) -> npt.NDArray[np.float64]:
    w = np.asarray(weights, dtype=np.float64)
    mask = np.asarray(active, dtype=np.bool_)
    if w.ndim != 1 or w.shape != mask.shape:
        raise ValueError(
            f"weights and active must be 1-D of the same length, got {w.shape} and {mask.shape}"
        )
    # `not (w >= 0)` also catches NaN.
    if not bool(np.all(w >= 0.0)) or not bool(np.all(np.isfinite(w))):
        raise ValueError("weights must be finite and non-negative")
    effective = np.where(mask, w, 0.0)
    if not effective.sum() > 0.0:
        raise ValueError("no active arm with a positive weight")
    return effective


def weighted_propensities(weights: npt.ArrayLike, active: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Probability of each arm under `weighted_choice`: weight / total over active arms,
    0 for inactive arms. Raises ValueError when no active arm has a positive weight."""
    effective = _active_weights(weights, active)
    result: npt.NDArray[np.float64] = effective / effective.sum()
    return result


def weighted_choice(weights: npt.ArrayLike, active: npt.ArrayLike, u: float) -> int:
    """Index of the arm that the uniform draw ``u`` in ``[0, 1)`` selects.

    Arm ``i`` owns the slice ``[c[i-1], c[i])`` of the cumulative active weights ``c`` scaled
    by ``u``, so ``P(i) = w[i] / sum(w)`` and zero-weight (inactive) arms own an empty slice.
    Raises ValueError on bad input, like `weighted_propensities`.
    """
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u!r}")
    # Arms are few (2..10): a Python loop beats numpy's per-call overhead several times over.
    w_array = np.asarray(weights, dtype=np.float64)
    on_array = np.asarray(active, dtype=np.bool_)
    if w_array.ndim != 1 or w_array.shape != on_array.shape:
        raise ValueError(
            "weights and active must be 1-D of the same length, "
            f"got {w_array.shape} and {on_array.shape}"
        )
    ws: list[float] = w_array.tolist()
    on: list[bool] = on_array.tolist()
    total = 0.0
    for w, is_on in zip(ws, on, strict=True):
        if not 0.0 <= w < math.inf:  # also rejects NaN
            raise ValueError("weights must be finite and non-negative")
        if is_on:
            total += w
    if not total > 0.0:
        raise ValueError("no active arm with a positive weight")
    target = u * total
    cumulative = 0.0
    last = 0
    for i, (w, is_on) in enumerate(zip(ws, on, strict=True)):
        if is_on and w > 0.0:
            cumulative += w
            last = i
            if target < cumulative:
                return i
    # u * total rounded up to total: the last arm with a positive weight owns the top.
    return last
