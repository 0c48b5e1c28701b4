"""Tracking tokens: issue/verify, every way a token can be wrong, and the key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sira_server.app import resolve_tracking_key, tracking_key
from sira_server.config import ConfigError, JwtSettings, Settings
from sira_server.tracking_token import TrackingTokens, derive_key, ensure_key_file

KEY = b"k" * 32
NOW = 1_800_000_000.0
DAY = 24 * 3600


@pytest.fixture
def tokens() -> TrackingTokens:
    return TrackingTokens(KEY, max_age_seconds=7 * DAY)


def test_a_token_proves_exactly_its_assignment(tokens: TrackingTokens) -> None:
    token = tokens.issue("exp-1", "subject-1", "var-a", NOW)
    assert tokens.verify(token, "exp-1", "subject-1", "var-a", NOW + 60)
    for ids in (
        ("exp-2", "subject-1", "var-a"),
        ("exp-1", "subject-2", "var-a"),
        ("exp-1", "subject-1", "var-b"),
        # No ambiguity between fields: the separator is not a valid part of an id.
        ("exp-1", "subject-1var-a", ""),
    ):
        assert not tokens.verify(token, *ids, NOW)


def test_age_window(tokens: TrackingTokens) -> None:
    token = tokens.issue("e", "s", "v", NOW)
    assert tokens.verify(token, "e", "s", "v", NOW + 7 * DAY)
    assert not tokens.verify(token, "e", "s", "v", NOW + 7 * DAY + 1)
    # Issued far in the future (a forged timestamp or a broken clock): refused.
    assert not tokens.verify(token, "e", "s", "v", NOW - 3600)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "",
        lambda t: t + "A",
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: "v2" + t[2:],
        lambda t: t.replace(".", ".0", 1),  # same time, another spelling
        lambda t: t.split(".")[0] + ".-5." + t.split(".")[2],
        lambda t: "v1.99999999999999999999." + t.split(".")[2],
        lambda t: "x" * 10_000,
        lambda t: "v1..",
        lambda t: "....",
    ],
)
def test_forged_or_mangled_tokens_fail(tokens: TrackingTokens, mangle: object) -> None:
    token = tokens.issue("e", "s", "v", NOW)
    assert callable(mangle)
    assert not tokens.verify(mangle(token), "e", "s", "v", NOW)


def test_another_key_does_not_verify(tokens: TrackingTokens) -> None:
    other = TrackingTokens(b"o" * 32, max_age_seconds=7 * DAY)
    assert not tokens.verify(other.issue("e", "s", "v", NOW), "e", "s", "v", NOW)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TrackingTokens(b"short", 60)


def test_key_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    first = ensure_key_file(tmp_path)
    assert len(first) >= 32
    assert ensure_key_file(tmp_path) == first
    assert (tmp_path / "tracking-token-key").stat().st_mode & 0o777 == 0o600
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_key_resolution(tmp_path: Path) -> None:
    embedded = resolve_tracking_key(Settings(data_dir=tmp_path), embedded=True)
    assert embedded.limits.tracking_key == ensure_key_file(tmp_path)
    assert tracking_key(embedded) == embedded.limits.tracking_key.encode()  # type: ignore[union-attr]
    # External stores: derived from the shared HS256 secret, unlike the secret itself.
    external = Settings(jwt=JwtSettings(secret="s" * 40))
    assert resolve_tracking_key(external, embedded=False) == external
    assert tracking_key(external) == derive_key("s" * 40) != b"s" * 40
    with pytest.raises(ConfigError, match="SIRA_TRACKING_TOKEN_KEY"):
        tracking_key(Settings(jwt=JwtSettings(algorithm="RS256", public_key="pem")))


def test_settings_from_env() -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        Settings.from_env({"SIRA_TRACKING_TOKEN_KEY": "short"})
    settings = Settings.from_env(
        {"SIRA_TRACKING_TOKEN_KEY": "t" * 32, "SIRA_TRACKING_TOKEN_MAX_AGE_SECONDS": "60"}
    )
    assert settings.limits.tracking_key == "t" * 32
    assert settings.limits.tracking_token_max_age_seconds == 60
