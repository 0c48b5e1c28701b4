"""Exact Thompson propensities: the probability that each arm's Beta draw is the highest.

    P(i chosen) = integral over x of f_i(x) * prod_{j != i} F_j(x) dx

(f the Beta density, F the CDF, j over the other active arms), computed by one-dimensional
Gauss-Legendre quadrature in log space. These are logged with every Thompson assignment for
off-policy evaluation, where 1/p weights each record: a Monte Carlo estimate has a relative
error of ~1/sqrt(draws * p), which blows up exactly for the rarely chosen (losing) arms, and
a floor on it biases the weights. Quadrature keeps a relative error far below 1 % down to
p = 1e-5 and beyond (tests compare with scipy's adaptive quadrature).

Nodes: the integrand of a rarely chosen arm lives where its upper tail meets the leader's
lower tail, so [0, 1] is cut at a ladder of quantiles of *every* active arm (from 1e-14 to
1 - 1e-14), and each piece gets `NODES` Gauss-Legendre nodes. Cost: ~1-3 ms for 2-10 arms
(docs/benchmarks.md); the posterior refresher computes it in the background when counts
change, never on the Assign path.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import special

__all__ = ["NODES", "thompson_propensities"]

FloatArray = npt.NDArray[np.float64]

NODES = 12
"""Gauss-Legendre nodes per piece."""
_LOWER = (1e-14, 1e-10, 1e-7, 1e-5, 1e-3, 0.02, 0.2, 0.5)
_QUANTILES = np.array([*_LOWER, *(1.0 - q for q in reversed(_LOWER[:-1]))])
"""Cut points of [0, 1], as quantiles of each active arm (symmetric around the median)."""
_GL_X, _GL_W = np.polynomial.legendre.leggauss(NODES)


def _nodes(alpha: FloatArray, beta: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Quadrature nodes in (0, 1) and their weights."""
    cuts = special.betaincinv(alpha[:, None], beta[:, None], _QUANTILES[None, :]).ravel()
    edges = np.unique(np.concatenate(([0.0, 1.0], cuts[np.isfinite(cuts)])))
    edges = edges[(edges >= 0.0) & (edges <= 1.0)]
    lo, hi = edges[:-1], edges[1:]
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    half = (hi - lo) / 2.0
    x = (lo[:, None] + half[:, None] * (_GL_X[None, :] + 1.0)).ravel()
    w = (half[:, None] * _GL_W[None, :]).ravel()
    return x, w


def thompson_propensities(
    alpha: npt.ArrayLike, beta: npt.ArrayLike, active: npt.ArrayLike
) -> FloatArray:
    """P(arm i has the highest draw) among the ``active`` arms (0 for inactive ones), for
    independent Beta(alpha_i, beta_i) draws. Sums to 1 over active arms."""
    a = np.asarray(alpha, dtype=np.float64)
    b = np.asarray(beta, dtype=np.float64)
    on = np.asarray(active, dtype=np.bool_)
    if a.shape != b.shape or a.shape != on.shape or a.ndim != 1:
        raise ValueError("alpha, beta and active must be 1-D of the same length")
    if not (np.all(a > 0) and np.all(b > 0)):
        raise ValueError("Beta parameters must be positive")
    out = np.zeros(a.size)
    live = np.flatnonzero(on)
    if live.size == 0:
        return out
    if live.size == 1:
        out[live[0]] = 1.0
        return out
    la, lb = a[live], b[live]
    x, w = _nodes(la, lb)
    xa, ca, cb = x[None, :], la[:, None], lb[:, None]
    with np.errstate(divide="ignore"):
        log_pdf = special.xlogy(ca - 1.0, xa) + special.xlog1py(cb - 1.0, -xa)
        log_pdf -= special.betaln(ca, cb)
        log_cdf = np.log(special.betainc(ca, cb, xa))
    k = live.size
    probs = np.empty(k)
    with np.errstate(invalid="ignore"):
        for i in range(k):
            others = np.delete(log_cdf, i, axis=0).sum(axis=0)
            terms = log_pdf[i] + others
            probs[i] = float(np.sum(w * np.exp(np.where(np.isfinite(terms), terms, -np.inf))))
    total = probs.sum()
    if total > 0.0:  # quadrature error is far below 1e-6; renormalise the rounding
        probs /= total
    out[live] = probs
    return out
