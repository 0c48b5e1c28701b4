"""JWT bearer tokens: verify them into a `Principal`, mint them for development.

Verification pins the one configured algorithm (no `alg: none`, no HS/RS
confusion), requires `exp` and `sub`, checks `nbf`/`iat`, and `aud`/`iss` when
configured. Verified tokens are cached by their exact text (backend modules
reuse one token for many calls) and the cache re-checks `exp` on every hit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from sira_server.config import DEV_SECRET_FILE, ConfigError, JwtSettings
from sira_server.domain.limits import MAX_ACTOR_CHARS
from sira_server.domain.text_rules import Text, text_problem
from sira_server.errors import Unauthenticated

__all__ = [
    "ANONYMOUS",
    "Principal",
    "TokenVerifier",
    "ensure_dev_secret",
    "mint_token",
    "read_dev_secret",
]

logger = logging.getLogger("sira_server.auth")

TOKEN_EXPIRED = "ERROR_REASON_TOKEN_EXPIRED"
TOKEN_INVALID = "ERROR_REASON_TOKEN_INVALID"
_CACHE_SIZE = 4096
_ASYMMETRIC = ("RS256", "ES256")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's `sub` and its roles."""

    subject: str
    roles: frozenset[str]

    @property
    def is_anonymous(self) -> bool:
        return self == ANONYMOUS


ANONYMOUS = Principal("anonymous", frozenset())
"""The caller of an RPC open to anonymous use that sent no token."""


class TokenVerifier:
    """Turns a bearer token into a `Principal` or raises `Unauthenticated`."""

    def __init__(self, settings: JwtSettings, *, cache_size: int = _CACHE_SIZE) -> None:
        algorithm = settings.algorithm.upper()
        if algorithm == "HS256":
            raw_key = settings.secret
            missing = "SIRA_JWT_SECRET"
        elif algorithm in _ASYMMETRIC:
            raw_key = settings.public_key
            missing = "SIRA_JWT_PUBLIC_KEY"
        else:
            raise ConfigError(f"JWT algorithm must be HS256, RS256 or ES256, got {algorithm}")
        if not raw_key:
            raise ConfigError(f"JWT algorithm {algorithm} needs {missing}")
        try:
            # Parse the key once (PEM parsing costs more than the signature check);
            # this also refuses a PEM key used as an HMAC secret and a key of the
            # wrong type for the algorithm.
            self._key: Any = jwt.get_algorithm_by_name(algorithm).prepare_key(raw_key)
        except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"JWT key does not suit {algorithm}: {exc}") from None
        self._algorithm = algorithm
        self._audience = settings.audience
        self._issuer = settings.issuer
        self._leeway = settings.leeway_seconds
        self._jwt = jwt.PyJWT(
            {
                "require": ["exp", "sub"],
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_aud": settings.audience is not None,
                "verify_iss": settings.issuer is not None,
                "verify_sub": True,
            }
        )
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._cache_size = cache_size

    @property
    def algorithm(self) -> str:
        return self._algorithm

    def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None:
            principal, exp = hit
            if time.time() < exp + self._leeway:
                return principal
            self._cache.pop(token, None)  # expired: full verification reports it
        payload = self._decode(token)
        principal = Principal(_subject(payload), _roles(payload))
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                # Evict the oldest entry (dicts keep insertion order).
                self._cache.pop(next(iter(self._cache)), None)
            self._cache[token] = (principal, float(payload["exp"]))
        return principal

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            return self._jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as exc:
            error = _explain(exc, self._algorithm)
            logger.info("rejected bearer token: %s (%s)", error.message, type(exc).__name__)
            raise error from None


def _explain(exc: jwt.PyJWTError, algorithm: str) -> Unauthenticated:
    """A message a person can act on; never echoes the token or the key."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return Unauthenticated("token has expired; request a new one", reason=TOKEN_EXPIRED)
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthenticated(
            "token is not valid yet (nbf or iat in the future); check the issuer's clock",
            reason=TOKEN_EXPIRED,
        )
    if isinstance(exc, jwt.MissingRequiredClaimError):
        message = f"token lacks the required '{exc.claim}' claim"
        if exc.claim == "exp":
            message += "; this server only accepts tokens that expire"
    elif isinstance(exc, jwt.InvalidAlgorithmError):
        message = f"token is not signed with {algorithm}, the only algorithm this server accepts"
    elif isinstance(exc, jwt.InvalidSignatureError):
        message = "token signature does not verify; was it issued for this server?"
    elif isinstance(exc, jwt.InvalidAudienceError):
        message = "token 'aud' claim does not name this server's audience (SIRA_JWT_AUDIENCE)"
    elif isinstance(exc, jwt.InvalidIssuerError):
        message = "token 'iss' claim is not this server's issuer (SIRA_JWT_ISSUER)"
    elif isinstance(exc, jwt.exceptions.InvalidSubjectError):
        message = "token 'sub' claim must be a non-empty string"
    elif isinstance(exc, jwt.InvalidIssuedAtError):
        message = "token 'iat' claim must be a number"
    elif isinstance(exc, jwt.DecodeError):
        message = "token is malformed: expected a JWT (header.payload.signature, base64url)"
    else:
        message = "token is invalid"
    return Unauthenticated(message, reason=TOKEN_INVALID)


_ACTOR = Text(MAX_ACTOR_CHARS)


def _subject(payload: dict[str, Any]) -> str:
    subject = payload.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token 'sub' claim must be a non-empty string", reason=TOKEN_INVALID)
    problem = text_problem(subject, _ACTOR)
    if problem is not None:  # it becomes the audit log's actor: Postgres must take it
        raise Unauthenticated(f"token 'sub' claim {problem}", reason=TOKEN_INVALID)
    return subject


def _roles(payload: dict[str, Any]) -> frozenset[str]:
    roles = payload.get("roles", [])
    if isinstance(roles, str):
        return frozenset((roles,))
    if isinstance(roles, list) and all(isinstance(r, str) for r in roles):
        return frozenset(roles)
    raise Unauthenticated(
        "token 'roles' claim must be a list of role names (strings)", reason=TOKEN_INVALID
    )


def mint_token(
    secret_or_private_key: str,
    *,
    subject: str,
    roles: Sequence[str],
    ttl_seconds: int = 3600,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Sign a token the way SIRA expects it (for development, tests and the CLI)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "roles": list(roles),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret_or_private_key, algorithm=algorithm)


def read_dev_secret(data_dir: Path) -> str | None:
    """The development HS256 secret in `data_dir`, or None if none was made yet."""
    path = data_dir / DEV_SECRET_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not secret:
        raise ConfigError(f"{path} is empty; delete it to generate a new secret")
    return secret


def ensure_dev_secret(data_dir: Path) -> str:
    """Create `<data_dir>/dev-jwt-secret` once (mode 0600) and return its secret.

    The file is written under a temporary name, then hard-linked into place:
    linking fails if the name exists, so concurrent processes agree on one
    secret and nobody ever reads a half-written file.
    """
    existing = read_dev_secret(data_dir)
    if existing is not None:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DEV_SECRET_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{DEV_SECRET_FILE}.", dir=data_dir)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use its secret
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    secret = read_dev_secret(data_dir)
    if secret is None:  # pragma: no cover - deleted between link and read
        raise ConfigError(f"{path} vanished while being created")
    logger.info("development JWT secret created at %s", path)
    return secret
