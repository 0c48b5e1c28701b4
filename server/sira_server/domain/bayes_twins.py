"""Pure-numpy twins of the numba kernels in `bayes`: the same algorithms on the same
random streams, written plainly. They are the reference the tests hold the kernels to
(equal results on fixed seeds); nothing in the server calls them.
"""

from __future__ import annotations

import math

import numpy as np

from sira_server.domain.bayes import (
    _JUMP,
    _MASK64,
    _TWO_M53,
    _U0XFF,
    _U5,
    _U7,
    _U9,
    _U11,
    _U17,
    _U19,
    _U45,
    _U57,
    _ZIG_F,
    _ZIG_R,
    _ZIG_X,
    LANES,
    BoolArray,
    FloatArray,
    IntArray,
    StateArray,
    new_rng_state,
)

__all__ = [
    "beta_draws_numpy",
    "monte_carlo_core_numpy",
    "monte_carlo_pass_numpy",
    "thompson_choose_numpy",
]


def _next_int(s: list[int]) -> None:
    """xoshiro256** step on Python ints (output unused: only the jump needs it)."""
    t = (s[1] << 17) & _MASK64
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = ((s[3] << 45) | (s[3] >> 19)) & _MASK64


def _lane_states_numpy(seed: int, lanes: int) -> StateArray:
    """Reference for `_lane_states`: the base stream jumped 2**128 steps per lane."""
    s = [int(w) for w in new_rng_state(seed)]
    out = np.empty((lanes, 4), dtype=np.uint64)
    for lane in range(lanes):
        out[lane] = s
        acc = [0, 0, 0, 0]
        for word in _JUMP:
            for b in range(64):
                if (word >> b) & 1:
                    acc = [a ^ w for a, w in zip(acc, s, strict=True)]
                _next_int(s)
        s = acc
    return out


class _Streams:
    """xoshiro256** over many lanes at once; each call advances only the lanes it names."""

    def __init__(self, states: StateArray) -> None:
        self.s = np.ascontiguousarray(states.T)  # (4, lanes)

    def next(self, lanes: IntArray) -> StateArray:
        s0, s1, s2, s3 = (self.s[k, lanes] for k in range(4))
        x = s1 * _U5
        result: StateArray = ((x << _U7) | (x >> _U57)) * _U9
        t = s1 << _U17
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = (s3 << _U45) | (s3 >> _U19)
        for k, w in enumerate((s0, s1, s2, s3)):
            self.s[k, lanes] = w
        return result

    def uniform(self, lanes: IntArray) -> FloatArray:
        return ((self.next(lanes) >> _U11).astype(np.float64) + 0.5) * _TWO_M53

    def normal(self, lanes: IntArray) -> FloatArray:
        out = np.empty(lanes.size)
        todo = np.arange(lanes.size)
        while todo.size:
            ln = lanes[todo]
            bits = self.next(ln)
            i = (bits & _U0XFF).astype(np.intp)
            u = 2.0 * (((bits >> _U11).astype(np.float64) + 0.5) * _TWO_M53) - 1.0
            x = u * _ZIG_X[i]
            fast = np.abs(x) < _ZIG_X[i + 1]
            out[todo[fast]] = x[fast]
            tail = ~fast & (i == 0)
            if tail.any():
                out[todo[tail]] = self._tail(ln[tail], u[tail])
            wedge = ~fast & (i != 0)
            iw, xw = i[wedge], x[wedge]
            y = _ZIG_F[iw + 1] + (_ZIG_F[iw] - _ZIG_F[iw + 1]) * self.uniform(ln[wedge])
            ok = y < np.exp(-0.5 * xw * xw)
            out[todo[wedge][ok]] = xw[ok]
            todo = todo[wedge][~ok]
        return out

    def _tail(self, lanes: IntArray, u: FloatArray) -> FloatArray:
        tx = np.ones(lanes.size)
        ty = np.zeros(lanes.size)
        todo = np.arange(lanes.size)
        while todo.size:
            tx[todo] = np.log(self.uniform(lanes[todo])) / _ZIG_R
            ty[todo] = np.log(self.uniform(lanes[todo]))
            todo = todo[-2.0 * ty[todo] < tx[todo] * tx[todo]]
        return np.where(u < 0.0, tx - _ZIG_R, _ZIG_R - tx)

    def gamma(self, lanes: IntArray, shape: float) -> FloatArray:
        boost = 0.0
        if shape < 1.0:
            boost = 1.0 / shape
            shape = shape + 1.0
        d = shape - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        out = np.empty(lanes.size)
        todo = np.arange(lanes.size)
        while todo.size:
            ln = lanes[todo]
            x = self.normal(ln)
            v = 1.0 + c * x
            bad = np.flatnonzero(v <= 0.0)
            while bad.size:
                x[bad] = self.normal(ln[bad])
                v[bad] = 1.0 + c * x[bad]
                bad = bad[v[bad] <= 0.0]
            v = v * v * v
            u = self.uniform(ln)
            x2 = x * x
            with np.errstate(invalid="ignore"):
                ok = (u < 1.0 - 0.0331 * (x2 * x2)) | (
                    np.log(u) < 0.5 * x2 + d * (1.0 - v + np.log(v))
                )
            out[todo[ok]] = d * v[ok]
            todo = todo[~ok]
        if boost > 0.0:
            out = out * self.uniform(lanes) ** boost
        return out

    def beta(self, lanes: IntArray, a: float, b: float) -> FloatArray:
        g = self.gamma(lanes, a)
        h = self.gamma(lanes, b)
        return g / (g + h)


def thompson_choose_numpy(
    alpha: FloatArray, beta: FloatArray, active: BoolArray, state: StateArray
) -> int:
    """numpy twin of `thompson_choose` (same stream, same choice, same state afterwards)."""
    streams = _Streams(state.reshape(1, 4))
    lane = np.zeros(1, dtype=np.intp)
    best, top = -1, -1.0
    for i in range(alpha.size):
        if active[i]:
            draw = float(streams.beta(lane, float(alpha[i]), float(beta[i]))[0])
            if draw > top:
                best, top = i, draw
    state[:] = streams.s[:, 0]
    return best


def _leader_and_runner_up_numpy(
    alpha: FloatArray, beta: FloatArray, active: BoolArray
) -> tuple[int, int]:
    act = np.flatnonzero(active)
    order = act[np.argsort(-(alpha[act] / (alpha[act] + beta[act])), kind="stable")]
    return (int(order[0]) if order.size else -1, int(order[1]) if order.size > 1 else -1)


def monte_carlo_core_numpy(
    alpha: FloatArray,
    beta: FloatArray,
    active: BoolArray,
    control: int,
    draws: int,
    seed: int,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """numpy twin of `monte_carlo_core`: all lanes advance in lockstep, one draw per step."""
    k = alpha.size
    leader, runner = _leader_and_runner_up_numpy(alpha, beta, active)
    streams = _Streams(_lane_states_numpy(seed, LANES))
    counts = np.full(LANES, draws // LANES) + (np.arange(LANES) < draws % LANES)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    best_counts = np.zeros((LANES, k), dtype=np.int64)
    worse_counts = np.zeros((LANES, k), dtype=np.int64)
    loss_sums = np.zeros((LANES, k))
    lift = np.empty((k, draws if control >= 0 else 0))
    act = np.flatnonzero(active)
    for j in range(int(counts.max())):
        lanes = np.flatnonzero(counts > j)
        x = np.empty((lanes.size, k))
        for i in range(k):
            x[:, i] = streams.beta(lanes, float(alpha[i]), float(beta[i]))
        if act.size == 0:
            continue
        best = act[np.argmax(x[:, act], axis=1)]
        top = x[np.arange(lanes.size), best]
        best_counts[lanes, best] += 1
        loss_sums[lanes] += top[:, None] - x
        worse = x < x[:, leader : leader + 1]
        worse[:, leader] = x[:, leader] < x[:, runner] if runner >= 0 else False
        worse_counts[lanes] += worse
        if control >= 0:
            lift[:, starts[lanes] + j] = (x / x[:, control : control + 1] - 1.0).T
    prob_best, prob_worse, expected_loss = np.zeros(k), np.zeros(k), np.zeros(k)
    for lane in range(LANES):  # same summation order as the kernel
        prob_best += best_counts[lane]
        prob_worse += worse_counts[lane]
        expected_loss += loss_sums[lane]
    return prob_best / draws, prob_worse / draws, expected_loss / draws, lift


def beta_draws_numpy(alpha: FloatArray, beta: FloatArray, draws: int, seed: int) -> FloatArray:
    """numpy twin of `beta_draws` (one lane, so one Python step per draw: keep it small)."""
    streams = _Streams(new_rng_state(seed).reshape(1, 4))
    lane = np.zeros(1, dtype=np.intp)
    out = np.empty((alpha.size, draws))
    for j in range(draws):
        for i in range(alpha.size):
            out[i, j] = streams.beta(lane, float(alpha[i]), float(beta[i]))[0]
    return out


def monte_carlo_pass_numpy(
    alpha: FloatArray, beta: FloatArray, draws: int, seed: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """numpy twin of `monte_carlo_pass`."""
    active = np.ones(alpha.size, dtype=np.bool_)
    prob_best, prob_worse, loss, _ = monte_carlo_core_numpy(alpha, beta, active, -1, draws, seed)
    return prob_best, prob_worse, loss
