"""Pure choice of an arm for a new subject, and of the arm a concluded experiment serves.

No I/O: the caller hands in the compiled experiment, the posterior snapshot and the
random state, so every branch is unit-testable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sira_server.domain.allocation import weighted_choice, weighted_propensities
from sira_server.domain.bayes import thompson_choose
from sira_server.domain.experiment import Allocation, Experiment

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
StateArray = npt.NDArray[np.uint64]

MIN_PROPENSITY = 1e-300
"""Floor of a logged propensity: the exact probability of an arm far behind can underflow
to 0 in double precision (below ~1e-300) although the arm is drawable; no realistic arm
gets there, and the floor keeps 1/p finite if one does."""


WARM_UP_SHARE = 0.1
"""Share of new subjects given uniformly to active arms still short of min_samples."""

EXPLORE_SHARE = 0.8
"""With auto-stop on: share of the other new subjects spread uniformly over the active
arms, so that the stopping rule gets evidence on every arm (docs/stopping.md: without it,
Thompson sampling starves the losing arm and the rule cannot conclude in 3,000 subjects)."""


def explore_share(experiment: Experiment) -> float:
    """`EXPLORE_SHARE` while auto-stop may still act, else 0 (plain Thompson sampling)."""
    return EXPLORE_SHARE if experiment.fail_fast.auto_stop else 0.0


@dataclass(frozen=True, slots=True)
class Posterior:
    """Beta posteriors of one experiment's arms, in variant order, and P(best) per arm."""

    alpha: FloatArray
    beta: FloatArray
    prob_best: FloatArray
    """Exact probability that a Thompson draw picks each arm among the active ones
    (`domain.propensity`): the propensity of a Thompson choice."""

    @classmethod
    def uniform(cls, active: BoolArray) -> Posterior:
        """Beta(1, 1) everywhere: what a just-started experiment has."""
        n = active.size
        share = active / max(int(active.sum()), 1)
        return cls(np.ones(n), np.ones(n), share.astype(np.float64))


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    propensity: float


def choose_new_arm(
    allocation: Allocation,
    weights: FloatArray,
    active: BoolArray,
    posterior: Posterior,
    rng_state: StateArray,
    rng: random.Random,
    min_samples: int,
    explore: float = 0.0,
) -> Choice:
    """The arm a new subject gets, with the probability it had of being picked.

    Thompson sampling starves an arm that looks bad early, and fail-fast can only judge
    an arm with `min_samples` subjects: without help such an arm may never get there,
    and auto-stop would wait forever. So while some active arms are short of
    `min_samples`, a `WARM_UP_SHARE` of new subjects goes uniformly to those arms.
    Auto-stop's tests also need evidence on every arm, which pure Thompson sampling
    starves: with ``explore`` > 0 (auto-stop on, `explore_share`), that share of the
    remaining subjects goes uniformly to all active arms.
    The logged propensity is that of the whole mixture.
    """
    if allocation is Allocation.FIXED_WEIGHTS:
        index = weighted_choice(weights, active, rng.random())
        return Choice(index, float(weighted_propensities(weights, active)[index]))
    trials = posterior.alpha + posterior.beta - 2.0
    short = active & (trials < min_samples)
    n_short = int(short.sum())
    share = WARM_UP_SHARE if n_short else 0.0
    n_active = int(active.sum())
    if n_short and rng.random() < WARM_UP_SHARE:
        index = int(np.flatnonzero(short)[rng.randrange(n_short)])
    elif explore > 0.0 and rng.random() < explore:
        index = int(np.flatnonzero(active)[rng.randrange(n_active)])
    else:
        index = int(thompson_choose(posterior.alpha, posterior.beta, active, rng_state))
    thompson = (1.0 - explore) * float(posterior.prob_best[index])
    if explore > 0.0:
        thompson += explore / n_active
    propensity = (1.0 - share) * thompson
    if short[index]:
        propensity += share / n_short
    return Choice(index, max(propensity, MIN_PROPENSITY))


def concluded_index(experiment: Experiment) -> int:
    """The arm a stopped experiment serves everyone: the winner, else the control, else
    the first variant (an experiment without a control, like the seed's payment-method test)."""
    for ref in (experiment.winner_variant_id, experiment.control and experiment.control.id):
        if ref:
            for index, variant in enumerate(experiment.variants):
                if variant.id == ref:
                    return index
    return 0
