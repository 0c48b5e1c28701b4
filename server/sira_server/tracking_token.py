"""Tracking tokens: proof of one assignment, for tracking without a service JWT.

Assign hands one out with every decision that names a variant; the subject's app sends
it back in `TrackedEvent.tracking_token`. The token is

    v1.<issued unix seconds>.<base64url HMAC-SHA256(key, v1 | experiment | subject |
                                                     variant | issued)>

over the canonical experiment and variant ids, so it proves exactly one (experiment,
subject, variant) and cannot be forged without the key. `verify` answers only True or
False: the caller turns every False into the same error, so a failure reveals nothing
about why (not enrolled, other variant, expired, forged).

Pure: no I/O, the clock is an argument.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

from sira_server.limit_settings import TRACKING_KEY_FILE

__all__ = ["TrackingTokens", "derive_key", "ensure_key_file"]

VERSION = "v1"
MAX_TOKEN_CHARS = 96
"""Longer input is rejected before any work (a real token is ~58 characters)."""
FUTURE_SKEW_SECONDS = 300
"""Tokens issued this far in the future (clock skew between replicas) still pass."""


class TrackingTokens:
    """Issues and checks tracking tokens with one key."""

    def __init__(self, key: bytes, max_age_seconds: int) -> None:
        if len(key) < 32:
            raise ValueError("tracking token key must be at least 32 bytes")
        # The keyed state, hashed once: each token copies it (a third less CPU per token).
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self.max_age_seconds = max_age_seconds

    def _mac(self, experiment_id: str, subject_id: str, variant_id: str, issued: int) -> str:
        message = "\x00".join((VERSION, experiment_id, subject_id, variant_id, str(issued)))
        mac = self._keyed.copy()
        mac.update(message.encode())
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def issue(self, experiment_id: str, subject_id: str, variant_id: str, now: float) -> str:
        issued = int(now)
        return f"{VERSION}.{issued}.{self._mac(experiment_id, subject_id, variant_id, issued)}"

    def verify(
        self, token: str, experiment_id: str, subject_id: str, variant_id: str, now: float
    ) -> bool:
        """True when `token` was issued for exactly these ids and is not too old."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return False
        version, _, rest = token.partition(".")
        issued_text, _, mac = rest.partition(".")
        if version != VERSION or not issued_text.isdigit() or len(issued_text) > 12:
            return False
        issued = int(issued_text)
        if str(issued) != issued_text:  # one spelling per token (no leading zeros)
            return False
        if not (now - self.max_age_seconds <= issued <= now + FUTURE_SKEW_SECONDS):
            return False
        expected = self._mac(experiment_id, subject_id, variant_id, issued)
        return hmac.compare_digest(expected.encode(), mac.encode())


def derive_key(jwt_secret: str) -> bytes:
    """A tracking key from the HS256 JWT secret that replicas already share; a separate
    derivation, so a tracking token is never a valid JWT signature and vice versa."""
    return hmac.digest(jwt_secret.encode(), b"sira tracking token key v1", hashlib.sha256)


def ensure_key_file(data_dir: Path) -> str:
    """Create `<data_dir>/tracking-token-key` once (mode 0600) and return its key.

    Same scheme as the dev JWT secret: write a temporary file, hard-link it into place
    (fails if the name exists), so concurrent workers agree on one key.
    """
    path = data_dir / TRACKING_KEY_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{TRACKING_KEY_FILE}.", dir=data_dir)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.urlsafe_b64encode(os.urandom(32)).decode())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_text().strip()
