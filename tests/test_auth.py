"""TokenVerifier, Principal, dev secrets and mint_token, with real JWTs and keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sira_server.api.context import acting_as, current_principal
from sira_server.auth import (
    ANONYMOUS,
    Principal,
    TokenVerifier,
    ensure_dev_secret,
    mint_token,
    read_dev_secret,
)
from sira_server.config import DEV_SECRET_FILE, ConfigError, JwtSettings
from sira_server.errors import Unauthenticated

SECRET = "auth-test-secret-" + "s" * 40
AUDIENCE = "sira-test"
ISSUER = "https://issuer.test"
EXPIRED = "ERROR_REASON_TOKEN_EXPIRED"
INVALID = "ERROR_REASON_TOKEN_INVALID"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "roles": ["marketing"],
        "iat": now,
        "exp": now + 600,
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_settings(**kw: Any) -> JwtSettings:
    return JwtSettings(algorithm="HS256", secret=SECRET, audience=AUDIENCE, issuer=ISSUER, **kw)


def rsa_pems() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _pems(key)


def ec_pems() -> tuple[str, str]:
    return _pems(ec.generate_private_key(ec.SECP256R1()))


def _pems(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def rejected(verifier: TokenVerifier, token: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(token)
    assert SECRET not in info.value.message
    if len(token) > 8:
        assert token not in info.value.message
    return info.value


# --- happy paths ----------------------------------------------------------------------


def test_hs256_token_gives_subject_and_roles() -> None:
    verifier = TokenVerifier(hs_settings())
    token = jwt.encode(claims(roles=["marketing", "data_science"]), SECRET, algorithm="HS256")
    assert verifier.verify(token) == Principal("alice", frozenset({"marketing", "data_science"}))


def test_single_string_role_and_missing_roles() -> None:
    verifier = TokenVerifier(hs_settings())
    one = jwt.encode(claims(roles="ops_admin"), SECRET, algorithm="HS256")
    assert verifier.verify(one).roles == frozenset({"ops_admin"})
    none = jwt.encode(claims(roles=None), SECRET, algorithm="HS256")
    assert verifier.verify(none).roles == frozenset()


def test_iat_is_optional() -> None:
    verifier = TokenVerifier(hs_settings())
    token = jwt.encode(claims(iat=None), SECRET, algorithm="HS256")
    assert verifier.verify(token).subject == "alice"


def test_aud_and_iss_not_checked_when_not_configured() -> None:
    verifier = TokenVerifier(JwtSettings(secret=SECRET))
    token = jwt.encode(claims(aud="someone-else", iss="elsewhere"), SECRET, algorithm="HS256")
    assert verifier.verify(token).subject == "alice"


def test_leeway_tolerates_small_clock_skew() -> None:
    verifier = TokenVerifier(hs_settings(leeway_seconds=30))
    now = int(time.time())
    late = jwt.encode(claims(exp=now - 10, iat=now - 100), SECRET, algorithm="HS256")
    early = jwt.encode(claims(nbf=now + 10), SECRET, algorithm="HS256")
    assert verifier.verify(late).subject == "alice"
    assert verifier.verify(early).subject == "alice"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_happy_path(algorithm: str) -> None:
    private, public = rsa_pems() if algorithm == "RS256" else ec_pems()
    verifier = TokenVerifier(JwtSettings(algorithm=algorithm, public_key=public, issuer=ISSUER))
    token = mint_token(
        private, subject="pay", roles=["pay_module"], algorithm=algorithm, issuer=ISSUER
    )
    assert verifier.verify(token) == Principal("pay", frozenset({"pay_module"}))
    assert verifier.algorithm == algorithm


def test_mint_token_claims() -> None:
    token = mint_token(
        SECRET, subject="bob", roles=("ops_admin",), ttl_seconds=60, audience="a", issuer="i"
    )
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience="a", issuer="i")
    assert payload["sub"] == "bob"
    assert payload["roles"] == ["ops_admin"]
    assert payload["exp"] - payload["iat"] == 60
    verifier = TokenVerifier(JwtSettings(secret=SECRET, audience="a", issuer="i"))
    assert verifier.verify(token).subject == "bob"


# --- attacks and mistakes ---------------------------------------------------------------


def test_missing_exp_is_rejected() -> None:
    verifier = TokenVerifier(hs_settings())
    err = rejected(verifier, jwt.encode(claims(exp=None), SECRET, algorithm="HS256"))
    assert err.reason == INVALID
    assert "'exp'" in err.message


def test_expired_token_is_rejected() -> None:
    verifier = TokenVerifier(hs_settings(leeway_seconds=0))
    now = int(time.time())
    token = jwt.encode(claims(exp=now - 5, iat=now - 60), SECRET, algorithm="HS256")
    err = rejected(verifier, token)
    assert err.reason == EXPIRED
    assert "expired" in err.message


def test_token_not_yet_valid_is_rejected() -> None:
    verifier = TokenVerifier(hs_settings(leeway_seconds=0))
    token = jwt.encode(claims(nbf=int(time.time()) + 300), SECRET, algorithm="HS256")
    assert rejected(verifier, token).reason == EXPIRED


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"aud": "another-service"}, "'aud'"),
        ({"aud": None}, "'aud'"),
        ({"iss": "https://evil.test"}, "'iss'"),
        ({"iss": None}, "'iss'"),
        ({"sub": None}, "'sub'"),
        ({"sub": 42}, "'sub'"),
        ({"sub": ""}, "'sub'"),
        ({"roles": [1, 2]}, "'roles'"),
        ({"roles": {"ops_admin": True}}, "'roles'"),
        ({"exp": "tomorrow"}, "malformed"),
    ],
)
def test_bad_claims_are_rejected(overrides: dict[str, Any], needle: str) -> None:
    verifier = TokenVerifier(hs_settings())
    err = rejected(verifier, jwt.encode(claims(**overrides), SECRET, algorithm="HS256"))
    assert err.reason == INVALID
    assert needle in err.message


def test_alg_none_is_rejected() -> None:
    verifier = TokenVerifier(hs_settings())
    token = f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(claims(roles=['ops_admin']))}."
    err = rejected(verifier, token)
    assert err.reason == INVALID
    assert "HS256" in err.message


def test_algorithm_confusion_is_rejected() -> None:
    """HS256 token whose HMAC key is the server's RS256 public key."""
    _, public = rsa_pems()
    verifier = TokenVerifier(JwtSettings(algorithm="RS256", public_key=public))
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(claims(aud=None))}"
    mac = hmac.new(public.encode(), signing_input.encode(), hashlib.sha256).digest()
    err = rejected(verifier, f"{signing_input}.{b64(mac)}")
    assert err.reason == INVALID
    assert "RS256" in err.message


def test_tampered_payload_is_rejected() -> None:
    verifier = TokenVerifier(hs_settings())
    header, _, signature = jwt.encode(claims(), SECRET, algorithm="HS256").split(".")
    forged = f"{header}.{segment(claims(roles=['ops_admin']))}.{signature}"
    err = rejected(verifier, forged)
    assert err.reason == INVALID
    assert "signature" in err.message


def test_wrong_secret_is_rejected() -> None:
    verifier = TokenVerifier(hs_settings())
    token = jwt.encode(claims(), "another-secret-" + "z" * 40, algorithm="HS256")
    assert rejected(verifier, token).reason == INVALID


def test_other_asymmetric_key_is_rejected() -> None:
    private, _ = ec_pems()
    _, public = ec_pems()
    verifier = TokenVerifier(JwtSettings(algorithm="ES256", public_key=public))
    token = mint_token(private, subject="x", roles=[], algorithm="ES256")
    assert rejected(verifier, token).reason == INVALID


@pytest.mark.parametrize(
    "garbage", ["", "garbage", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30", "\u00e9t\u00e9"]
)
def test_garbage_is_rejected(garbage: str) -> None:
    verifier = TokenVerifier(hs_settings())
    err = rejected(verifier, garbage)
    assert err.reason == INVALID
    assert "malformed" in err.message


# --- cache ------------------------------------------------------------------------------


def test_cache_rechecks_exp() -> None:
    verifier = TokenVerifier(hs_settings(leeway_seconds=0))
    exp = int(time.time()) + 1
    token = jwt.encode(claims(exp=exp), SECRET, algorithm="HS256")
    assert verifier.verify(token).subject == "alice"
    assert verifier.verify(token).subject == "alice"  # served from the cache
    while time.time() < exp + 0.05:
        time.sleep(0.1)
    assert rejected(verifier, token).reason == EXPIRED


def test_cache_is_bounded_and_never_caches_failures() -> None:
    verifier = TokenVerifier(hs_settings(), cache_size=3)
    tokens = [jwt.encode(claims(sub=f"u{i}"), SECRET, algorithm="HS256") for i in range(10)]
    for i, token in enumerate(tokens):
        assert verifier.verify(token).subject == f"u{i}"
    assert len(verifier._cache) == 3
    assert set(verifier._cache) == set(tokens[-3:])
    rejected(verifier, "garbage")
    assert "garbage" not in verifier._cache
    uncached = TokenVerifier(hs_settings(), cache_size=0)
    assert uncached.verify(tokens[0]).subject == "u0"
    assert uncached._cache == {}


# --- configuration ------------------------------------------------------------------------


def test_configuration_errors() -> None:
    _, rsa_public = rsa_pems()
    _, ec_public = ec_pems()
    with pytest.raises(ConfigError, match="SIRA_JWT_SECRET"):
        TokenVerifier(JwtSettings(algorithm="HS256"))
    with pytest.raises(ConfigError, match="SIRA_JWT_PUBLIC_KEY"):
        TokenVerifier(JwtSettings(algorithm="RS256", secret=SECRET))
    with pytest.raises(ConfigError, match="HS256"):
        TokenVerifier(JwtSettings(algorithm="HS256", secret=rsa_public))  # PEM as HMAC secret
    with pytest.raises(ConfigError, match="RS256"):
        TokenVerifier(JwtSettings(algorithm="RS256", public_key=ec_public))
    with pytest.raises(ConfigError, match="HS512"):
        TokenVerifier(JwtSettings(algorithm="HS512", secret=SECRET))


# --- principal and context ------------------------------------------------------------


def test_principal_and_anonymous() -> None:
    assert ANONYMOUS.is_anonymous
    assert ANONYMOUS.subject == "anonymous"
    assert ANONYMOUS.roles == frozenset()
    assert not Principal("anonymous", frozenset({"pay_module"})).is_anonymous
    assert not Principal("alice", frozenset()).is_anonymous


def test_current_principal_requires_a_caller() -> None:
    with pytest.raises(RuntimeError, match="GuardedRegistrar"):
        current_principal()
    alice = Principal("alice", frozenset({"marketing"}))
    with acting_as(alice):
        assert current_principal() is alice
    with pytest.raises(RuntimeError):
        current_principal()


# --- development secret -------------------------------------------------------------------


def test_dev_secret_created_once_with_private_mode(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert read_dev_secret(data_dir) is None
    secret = ensure_dev_secret(data_dir)
    assert len(secret) >= 64
    path = data_dir / DEV_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_dev_secret(data_dir) == secret
    assert read_dev_secret(data_dir) == secret
    assert sorted(p.name for p in data_dir.iterdir()) == [DEV_SECRET_FILE]  # no temp files left
    token = mint_token(secret, subject="dev", roles=["ops_admin"])
    assert TokenVerifier(JwtSettings(secret=secret)).verify(token).subject == "dev"


def test_empty_dev_secret_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / DEV_SECRET_FILE).write_text("\n")
    with pytest.raises(ConfigError, match="delete it"):
        read_dev_secret(tmp_path)


def test_concurrent_processes_agree_on_dev_secret(tmp_path: Path) -> None:
    script = (
        "import sys, pathlib\n"
        "from sira_server.auth import ensure_dev_secret\n"
        "print(ensure_dev_secret(pathlib.Path(sys.argv[1])))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "shared")],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        for _ in range(6)
    ]
    outputs = {proc.communicate(timeout=60)[0].decode().strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(outputs) == 1
    assert outputs == {read_dev_secret(tmp_path / "shared")}
