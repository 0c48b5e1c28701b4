"""The dashboard's HTTP side against the session's real server: the four services over
Connect answer what gRPC answers (same guards: auth, RBAC, validation, error details),
and the page is served securely (CSP, same origin, no dev sign-in outside the embedded
default, no way out of the bundle's directory)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from http_protocol import Failure, as_json, connect_call, grpc_call
from server_fixtures import RunningServer, mint_test_token

from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import lifecycle_service_pb2 as lpb
from sira.experiments.v1 import tracking_service_pb2 as tpb
from sira_server.web.http_app import CONTENT_SECURITY_POLICY

LIFECYCLE = "/sira.experiments.v1.LifecycleService/"
INSIGHTS = "/sira.experiments.v1.InsightsService/"
CODECS = ("proto", "json")


@pytest.fixture
async def http(sira_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    assert sira_server.http_url is not None, sira_server.log()
    async with httpx.AsyncClient(base_url=sira_server.http_url, timeout=30) as client:
        yield client


@pytest.fixture
async def channel(sira_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        yield channel


def checkout_button_color(key: str) -> epb.Experiment:
    def config(color: str) -> struct_pb2.Struct:
        struct = struct_pb2.Struct()
        struct.update({"button_color": color})
        return struct

    return epb.Experiment(
        key=key,
        name="Checkout Button Color",
        targeting=epb.Targeting(countries=["SN", "FR"]),
        variants=[
            epb.Variant(key="blue", name="Blue Button", config=config("#0A84FF"), is_control=True),
            epb.Variant(key="green", name="Green Button", config=config("#34C759")),
        ],
    )


@pytest.mark.parametrize("codec", CODECS)
async def test_create_list_and_insights_over_connect_answer_what_grpc_answers(
    http: httpx.AsyncClient, channel: grpc.aio.Channel, codec: str
) -> None:
    marketing = mint_test_token("marketing", subject="mia")
    key = f"http-{codec}-{uuid.uuid4().hex[:8]}"
    created = await connect_call(
        http,
        LIFECYCLE + "CreateExperiment",
        lpb.CreateExperimentRequest(experiment=checkout_button_color(key)),
        lpb.CreateExperimentResponse,
        token=marketing,
        codec=codec,
    )
    assert not isinstance(created, Failure), created
    experiment = created.experiment  # type: ignore[attr-defined]
    assert experiment.key == key
    assert experiment.created_by == "mia"  # the principal came from the forwarded token

    fetched = await grpc_call(
        channel,
        LIFECYCLE + "GetExperiment",
        lpb.GetExperimentRequest(experiment=key),
        lpb.GetExperimentResponse,
        token=marketing,
    )
    assert as_json(fetched.experiment) == as_json(experiment)  # type: ignore[attr-defined]

    listing = lpb.ListExperimentsRequest(status=epb.EXPERIMENT_STATUS_DRAFT, page_size=1000)
    over_http = await connect_call(
        http, LIFECYCLE + "ListExperiments", listing, lpb.ListExperimentsResponse,
        token=marketing, codec=codec,
    )  # fmt: skip
    over_grpc = await grpc_call(
        channel, LIFECYCLE + "ListExperiments", listing, lpb.ListExperimentsResponse,
        token=marketing,
    )  # fmt: skip
    assert as_json(over_http) == as_json(over_grpc)
    assert key in {e.key for e in over_http.experiments}  # type: ignore[attr-defined]

    started = await connect_call(
        http, LIFECYCLE + "StartExperiment", lpb.StartExperimentRequest(experiment=key),
        lpb.StartExperimentResponse, token=marketing, codec=codec,
    )  # fmt: skip
    assert not isinstance(started, Failure), started
    pay = mint_test_token("pay_module", subject="pay")
    for i in range(6):
        subject = f"user-{i}"
        decided = await grpc_call(
            channel,
            "/sira.experiments.v1.AssignmentService/Assign",
            apb.AssignRequest(
                experiment=key, subject_id=subject, context=apb.SubjectContext(country="SN")
            ),
            apb.AssignResponse,
            token=pay,
        )
        assert not isinstance(decided, Failure), decided
        if i % 2 == 0:
            tracked = await grpc_call(
                channel,
                "/sira.experiments.v1.TrackingService/Track",
                tpb.TrackRequest(
                    event=tpb.TrackedEvent(
                        experiment=key,
                        subject_id=subject,
                        variant_id=decided.decision.variant.id,  # type: ignore[attr-defined]
                        event_type=tpb.EVENT_TYPE_CONVERSION,
                        client_event_id=f"order-{i}",
                    )
                ),
                tpb.TrackResponse,
                token=pay,
            )
            assert not isinstance(tracked, Failure), tracked

    results = await same_answer(
        http, channel, codec, marketing,
        INSIGHTS + "GetResults", ipb.GetResultsRequest(experiment=key), ipb.GetResultsResponse,
    )  # fmt: skip
    assert sum(v.assigned_subjects for v in results.variants) == 6
    assert sum(v.converted_subjects for v in results.variants) == 3
    await same_answer(
        http, channel, codec, marketing,
        INSIGHTS + "GetInsights", ipb.GetInsightsRequest(experiment=key), ipb.GetInsightsResponse,
    )  # fmt: skip


async def same_answer(
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    codec: str,
    token: str,
    path: str,
    request: Any,
    response_class: Any,
) -> Any:
    """The answer over Connect equals the answer over gRPC (compute_time aside). Insights
    are a Monte Carlo estimate cached for about a second: two calls on either side of a
    refresh may differ in their last digits, so a differing pair is asked again."""
    deadline = time.monotonic() + 20
    while True:
        over_http = await connect_call(
            http, path, request, response_class, token=token, codec=codec
        )
        over_grpc = await grpc_call(channel, path, request, response_class, token=token)
        assert not isinstance(over_http, Failure), over_http
        assert not isinstance(over_grpc, Failure), over_grpc
        over_http.ClearField("compute_time")
        over_grpc.ClearField("compute_time")
        if as_json(over_http) == as_json(over_grpc) or time.monotonic() > deadline:
            break
    assert as_json(over_http) == as_json(over_grpc)
    return over_http


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("token", "path", "request_message"),
    [
        (None, LIFECYCLE + "ListExperiments", lpb.ListExperimentsRequest()),
        ("not-a-jwt", LIFECYCLE + "ListExperiments", lpb.ListExperimentsRequest()),
        (
            mint_test_token("data_science"),
            LIFECYCLE + "CreateExperiment",
            lpb.CreateExperimentRequest(experiment=checkout_button_color("never")),
        ),
        (
            mint_test_token("marketing"),
            LIFECYCLE + "DeleteExperiment",
            lpb.DeleteExperimentRequest(experiment="whatever"),
        ),
        (
            mint_test_token("pay_module"),
            INSIGHTS + "GetInsights",
            ipb.GetInsightsRequest(experiment="whatever"),
        ),
    ],
    ids=["no-token", "malformed-token", "reader-creates", "marketing-deletes", "module-reads"],
)
async def test_refusals_over_connect_carry_the_grpc_code_and_details(
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    codec: str,
    token: str | None,
    path: str,
    request_message: Any,
) -> None:
    response_class = lpb.ListExperimentsResponse  # never decoded: every call here fails
    over_http = await connect_call(
        http, path, request_message, response_class, token=token, codec=codec
    )
    over_grpc = await grpc_call(channel, path, request_message, response_class, token=token)
    assert isinstance(over_http, Failure)
    assert isinstance(over_grpc, Failure)
    assert over_http == over_grpc
    assert over_http.code in ("unauthenticated", "permission_denied")
    info = over_http.detail(error_details_pb2.ErrorInfo)
    assert info.domain == "sira.experiments.v1"
    assert info.reason.startswith("ERROR_REASON_")


@pytest.mark.parametrize("codec", CODECS)
async def test_a_validation_error_arrives_with_its_field_violations(
    http: httpx.AsyncClient, channel: grpc.aio.Channel, codec: str
) -> None:
    token = mint_test_token("marketing")
    spec = checkout_button_color(f"bad-{uuid.uuid4().hex[:8]}")
    spec.name = "Checkout\x01Button"
    spec.variants[1].config["depth"] = float("nan") if codec == "proto" else 1.0
    request = lpb.CreateExperimentRequest(experiment=spec)
    over_http = await connect_call(
        http, LIFECYCLE + "CreateExperiment", request, lpb.CreateExperimentResponse,
        token=token, codec=codec,
    )  # fmt: skip
    over_grpc = await grpc_call(
        channel, LIFECYCLE + "CreateExperiment", request, lpb.CreateExperimentResponse,
        token=token,
    )  # fmt: skip
    assert isinstance(over_http, Failure)
    assert over_http == over_grpc
    assert over_http.code == "invalid_argument"
    violations = {
        v.field: v.description
        for v in over_http.detail(error_details_pb2.BadRequest).field_violations
    }
    assert "experiment.name" in violations
    assert "control characters" in violations["experiment.name"]
    if codec == "proto":
        assert "experiment.variants[1].config.depth" in violations


async def test_undecodable_bodies_are_invalid_argument_with_a_bad_request(
    http: httpx.AsyncClient,
) -> None:
    token = mint_test_token("marketing")
    for content_type, body in (
        ("application/proto", b"\xff\xff\xff"),
        ("application/json", b'{"experiment": 12'),
        ("application/json", b'{"experimentz": "x"}'),
    ):
        response = await http.post(
            LIFECYCLE + "GetExperiment",
            content=body,
            headers={"content-type": content_type, "authorization": f"Bearer {token}"},
        )
        assert response.status_code == 400, response.text
        failure = Failure(response.json()["code"], "", ())
        assert failure.code == "invalid_argument"
        (detail,) = [d for d in response.json()["details"] if d["type"] == "google.rpc.BadRequest"]
        assert detail


async def test_rpcs_are_post_only_and_unknown_methods_are_not_found(
    http: httpx.AsyncClient,
) -> None:
    token = mint_test_token("marketing")
    # A GET needs no preflight from another site's page: nothing is served by GET.
    got = await http.get(
        LIFECYCLE + "ListExperiments",
        params={"encoding": "json", "message": "{}", "connect": "v1"},
        headers={"authorization": f"Bearer {token}"},
    )
    assert got.status_code >= 400
    assert "experiments" not in got.text
    unknown = await http.post(
        LIFECYCLE + "DropEverything",
        content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
    )
    assert unknown.status_code == 404
    health = await http.post(
        "/grpc.health.v1.Health/Check",
        content=b"{}",
        headers={"content-type": "application/json"},
    )
    assert health.status_code in (404, 405)  # only the four services are bridged


async def test_the_page_is_served_with_a_strict_policy(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    policy = dict(
        part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";") if part.strip()
    )
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-cache"
    assert "<script>" not in page.text  # no inline script in the shipped page
    assert "access-control-allow-origin" not in page.headers

    route = await http.get("/experiments/checkout-button-color")
    assert route.status_code == 200
    assert route.text == page.text  # a client-side route: the page routes itself

    missing_asset = await http.get("/assets/no-such-file.js")
    assert missing_asset.status_code == 404  # never HTML where a script was expected


async def test_bundle_assets_have_their_types_and_a_long_cache(http: httpx.AsyncClient) -> None:
    from sira_server.web.http_app import DIST_DIR

    assets = sorted(p for p in (DIST_DIR / "assets").iterdir() if p.is_file())
    assert assets, "the bundle has no assets"
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for asset in assets:
        response = await http.get(f"/assets/{asset.name}")
        assert response.status_code == 200
        assert response.content == asset.read_bytes()
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        expected = types.get(asset.suffix)
        if expected is not None:
            assert response.headers["content-type"].startswith(expected)
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/../../server/sira_server/config.py",
        "/assets/../../config.py",
        "/assets/..%2f..%2fconfig.py",
        "/%2e%2e/%2e%2e/config.py",
        "/..%2f..%2fconfig.py",
        "/assets/%2e%2e%2f%2e%2e%2fhttp_app.py",
        "//etc/passwd",
        "/assets/%00.js",
    ],
)
async def test_no_path_leaves_the_bundle(sira_server: RunningServer, path: str) -> None:
    # Raw paths, as a hostile client sends them (httpx would normalise them).
    assert sira_server.http_url is not None
    async with httpx.AsyncClient(timeout=30) as client:
        request = client.build_request("GET", sira_server.http_url)
        request.url = request.url.copy_with(raw_path=path.encode())
        response = await client.send(request)
    assert response.status_code in (200, 400, 404), response.status_code
    if response.status_code == 200:  # the page itself (client route), nothing else
        assert response.text.lstrip().lower().startswith("<!doctype html>")
    for secret_looking in ("SIRA_", "root:", "[project]", "import "):
        assert secret_looking not in response.text


async def test_other_sites_are_refused_when_no_cors_origin_is_configured(
    http: httpx.AsyncClient, sira_server: RunningServer
) -> None:
    preflight = await http.options(
        LIFECYCLE + "ListExperiments",
        headers={
            "origin": "https://evil.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers
    token = mint_test_token("marketing")
    cross = await http.post(
        LIFECYCLE + "ListExperiments",
        content=b"{}",
        headers={
            "origin": "https://evil.example",
            "content-type": "application/json",
            "authorization": f"Bearer {token}",
        },
    )
    assert cross.status_code == 403
    assert "experiments" not in cross.text
    # The page's own origin (what a browser sends on a same-origin POST) is served.
    same = await http.post(
        LIFECYCLE + "ListExperiments",
        content=b"{}",
        headers={
            "origin": str(sira_server.http_url),
            "content-type": "application/json",
            "authorization": f"Bearer {token}",
        },
    )
    assert same.status_code == 200, same.text
    assert "access-control-allow-origin" not in same.headers
    assert same.headers["cache-control"] == "no-store"


async def test_dev_sign_in_is_absent_outside_the_embedded_default(
    http: httpx.AsyncClient,
) -> None:
    # The session's server has external stores and an operator's SIRA_JWT_SECRET.
    assert (await http.get("/dev/sign-in")).status_code == 404
    posted = await http.post("/dev/sign-in", json={"role": "ops_admin"})
    assert posted.status_code in (404, 405)
    assert "token" not in posted.text


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8051", "127.0.0.1:8051", True),
        ("https://ops.example.com", "ops.example.com", True),  # TLS ended by a proxy
        ("https://ops.example.com", "ops.example.com:443", True),
        ("http://127.0.0.1:8051", "127.0.0.1:9999", False),
        ("http://localhost:8051", "127.0.0.1:8051", False),
        ("null", "127.0.0.1:8051", False),
        ("file://", "127.0.0.1:8051", False),
    ],
)
def test_same_origin_is_the_host_the_request_was_sent_to(
    origin: str, host: str, same: bool
) -> None:
    from sira_server.web.origins import same_origin

    assert same_origin(origin, host) is same


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost:8051", True),
        ("127.0.0.1:8051", True),
        ("[::1]:8051", True),
        ("127.0.0.1", True),
        ("evil.example:8051", False),
        ("192.168.1.2:8051", False),
        ("localhost.evil.example", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    from sira_server.web.origins import is_loopback_host

    assert is_loopback_host(host) is loopback


async def test_grpc_web_is_answered_on_the_same_paths(http: httpx.AsyncClient) -> None:
    """The fallback protocol of the contract: same guards, status and details in the
    trailer frame."""
    import base64
    import struct

    from google.rpc import status_pb2  # type: ignore[import-untyped]

    empty = b"\x00" + struct.pack(">I", 0)  # one uncompressed frame: an empty request
    response = await http.post(
        LIFECYCLE + "ListExperiments",
        content=empty,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/grpc-web+proto"
    assert response.content[0] == 0x80  # the trailer frame (no message)
    trailers = dict(
        line.split(": ", 1) for line in response.content[5:].decode().splitlines() if line
    )
    assert trailers["grpc-status"] == "16"  # UNAUTHENTICATED
    packed = trailers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(packed + "=" * (-len(packed) % 4)))
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo.FromString(detail.value)
    assert info.reason == "ERROR_REASON_TOKEN_MISSING"

    token = mint_test_token("marketing")
    answered = await http.post(
        LIFECYCLE + "ListExperiments",
        content=empty,
        headers={
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "authorization": f"Bearer {token}",
        },
    )
    assert answered.status_code == 200
    assert answered.content[0] == 0x00  # a message frame, then the trailers
    (length,) = struct.unpack(">I", answered.content[1:5])
    lpb.ListExperimentsResponse.FromString(answered.content[5 : 5 + length])
    assert b"grpc-status: 0" in answered.content[5 + length :]


async def test_a_request_over_the_size_limit_is_refused_as_over_grpc(
    http: httpx.AsyncClient,
) -> None:
    token = mint_test_token("marketing")
    oversized = lpb.GetExperimentRequest(experiment="x" * (4 * 1024 * 1024 + 1))
    over_http = await connect_call(
        http, LIFECYCLE + "GetExperiment", oversized, lpb.GetExperimentResponse, token=token
    )
    assert isinstance(over_http, Failure)
    assert over_http.code == "resource_exhausted"
