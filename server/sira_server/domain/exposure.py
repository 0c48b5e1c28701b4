"""Which eligible subjects enter an experiment: a stable hash bucket per (experiment, subject).

The bucket must be the same in every process, replica and Python version, so it comes from
BLAKE2b (never ``hash()``, which is salted per process). Raising an experiment's exposure
only adds subjects (bucket < 20 implies bucket < 50), and each experiment hashes its own id
in, so being exposed to one experiment says nothing about another.
"""

from __future__ import annotations

from hashlib import blake2b

__all__ = ["exposure_bucket", "is_exposed"]

_PERSON = b"sira-exposure-v1"  # domain separation: these digests serve nothing else
_BITS = 46
# 46 bits keep bucket = m * 100 / 2**46 exact in a double (m * 100 < 2**53), so the
# largest bucket is strictly below 100 and no rounding can produce 100.0.
_SHIFT = 64 - _BITS
_SCALE = 1 << _BITS


def exposure_bucket(experiment_id: str, subject_id: str) -> float:
    """The subject's position in ``[0, 100)`` for this experiment, uniform and stable."""
    exp = experiment_id.encode()
    # Length prefix: ("ab", "c") and ("a", "bc") must not hash the same input.
    data = len(exp).to_bytes(4, "big") + exp + subject_id.encode()
    digest = blake2b(data, digest_size=8, person=_PERSON).digest()
    return (int.from_bytes(digest, "big") >> _SHIFT) * 100 / _SCALE


def is_exposed(experiment_id: str, subject_id: str, exposure_percent: float) -> bool:
    """True when the subject falls inside the experiment's ``exposure_percent`` (0..100]."""
    if exposure_percent >= 100.0:
        return True  # the common case pays no hash
    return exposure_bucket(experiment_id, subject_id) < exposure_percent
