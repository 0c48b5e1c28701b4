"""Dev sign-in in the embedded default (`make run`): the server holds the development
secret, so the page may ask it for a short-lived token of a person's role; the token is
a real one (its role is enforced), and requests from elsewhere are refused."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from http_protocol import Failure, connect_call
from server_fixtures import RunningServer, run_sira_server

from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira_server.auth import read_dev_secret
from sira_server.web.dev_sign_in import DEV_TOKEN_SECONDS

CREATE = "/sira.experiments.v1.LifecycleService/CreateExperiment"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded() -> Iterator[RunningServer]:
    """The embedded default: no store URLs, no secret (as `make run` starts it)."""
    # Not under pytest's tmp_path: as root, pgserver runs Postgres as another user.
    data_dir = Path(tempfile.mkdtemp(prefix="sira-http-dev-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SIRA_DATABASE_URL", "SIRA_REDIS_URL", "SIRA_JWT_SECRET", "SIRA_TOKEN")
    }
    env.update({"SIRA_DATA_DIR": str(data_dir), "SIRA_METRICS_PORT": "0"})
    try:
        with run_sira_server(
            "", "", data_dir, extra_env={**env, "SIRA_JWT_SECRET": ""}, timeout=180
        ) as server:
            yield server
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def http(embedded: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    assert embedded.http_url is not None, embedded.log()
    async with httpx.AsyncClient(base_url=embedded.http_url, timeout=30) as client:
        yield client


def draft(key: str) -> lpb.CreateExperimentRequest:
    return lpb.CreateExperimentRequest(
        experiment=epb.Experiment(
            key=key,
            name="Dev sign-in",
            variants=[epb.Variant(name="A", is_control=True), epb.Variant(name="B")],
        )
    )


async def sign_in(http: httpx.AsyncClient, role: str, **headers: str) -> httpx.Response:
    return await http.post("/dev/sign-in", json={"role": role}, headers=headers)


async def test_the_page_learns_the_roles_on_offer(http: httpx.AsyncClient) -> None:
    offered = await http.get("/dev/sign-in")
    assert offered.status_code == 200
    assert offered.json() == {"roles": ["ops_admin", "marketing", "data_science"]}
    assert offered.headers["cache-control"] == "no-store"


async def test_a_dev_token_is_short_lived_and_its_role_is_enforced(
    http: httpx.AsyncClient, embedded: RunningServer
) -> None:
    own_origin = str(embedded.http_url)
    answer = await sign_in(http, "marketing", origin=own_origin)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    secret = read_dev_secret(embedded.data_dir)
    assert secret is not None
    claims = jwt.decode(body["token"], secret, algorithms=["HS256"])
    assert claims["roles"] == ["marketing"]
    assert claims["exp"] - claims["iat"] == DEV_TOKEN_SECONDS
    assert body["expires_at"].endswith("Z")

    created = await connect_call(
        http, CREATE, draft("dev-sign-in"), lpb.CreateExperimentResponse, token=body["token"]
    )
    assert not isinstance(created, Failure), created
    assert created.experiment.created_by == "dev-marketing"  # type: ignore[attr-defined]

    reader = (await sign_in(http, "data_science")).json()["token"]
    refused = await connect_call(
        http, CREATE, draft("dev-sign-in-2"), lpb.CreateExperimentResponse, token=reader
    )
    assert isinstance(refused, Failure)
    assert refused.code == "permission_denied"
    assert refused.detail(error_details_pb2.ErrorInfo).reason == "ERROR_REASON_ROLE_NOT_ALLOWED"


async def test_requests_from_elsewhere_are_refused(http: httpx.AsyncClient) -> None:
    cross_site = await sign_in(http, "ops_admin", origin="https://evil.example")
    assert cross_site.status_code == 403
    # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own host name
    # (and an Origin that matches it).
    rebound = await sign_in(
        http, "ops_admin", host="evil.example:8051", origin="http://evil.example:8051"
    )
    assert rebound.status_code == 403
    form = await http.post(
        "/dev/sign-in",
        content=b"role=ops_admin",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415  # a cross-site form cannot send JSON
    for refused in (cross_site, rebound, form):
        assert "token" not in refused.text
    huge = await http.post(
        "/dev/sign-in",
        content=b'{"role": "ops_admin", "pad": "' + b"x" * 100_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    assert (await sign_in(http, "pay_module")).status_code == 400  # a service's role
    assert (await sign_in(http, "root")).status_code == 400
