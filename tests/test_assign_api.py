"""AssignmentService end to end: the real `sira-server`, real JWTs, Redis and Postgres.

Every test works on experiments of its own (unique keys) on the session server.
Statistics are checked against scipy; the exposure split also against the pure
domain function the server must be using.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format, struct_pb2
from scipy import stats
from server_fixtures import SERVER_REDIS_DB, RunningServer, redis_url_with_db

from sira import (
    AsyncClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from sira.experiments.v1 import assignment_service_pb2 as apb
from sira.experiments.v1 import experiment_pb2 as epb
from sira_server.domain.experiment import Experiment
from sira_server.domain.exposure import is_exposed
from sira_server.engine.catalog import ExperimentCatalog
from sira_server.errors import NotFound
from sira_server.store.experiments import ExperimentRepository
from sira_server.store.postgres import create_pool

TokenFor = Callable[..., str]

NEW = apb.ASSIGNMENT_REASON_NEW
STICKY = apb.ASSIGNMENT_REASON_STICKY
NOT_ELIGIBLE = apb.ASSIGNMENT_REASON_NOT_ELIGIBLE
NOT_EXPOSED = apb.ASSIGNMENT_REASON_NOT_EXPOSED
CONCLUDED = apb.ASSIGNMENT_REASON_CONCLUDED
POLL_DEADLINE_SECONDS = 30.0


# --- helpers ------------------------------------------------------------------------


def variant(name: str, *, control: bool = False, weight: float = 0.0, **config: Any) -> epb.Variant:
    struct = struct_pb2.Struct()
    struct.update(config)
    return epb.Variant(name=name, is_control=control, weight=weight, config=struct)


def experiment(key: str, *variants: epb.Variant, **fields: Any) -> epb.Experiment:
    chosen = variants or (
        variant("Blue", control=True, color="#0A84FF"),
        variant("Green", color="#34C759"),
    )
    return epb.Experiment(key=key, name=f"Experiment {key}", variants=chosen, **fields)


async def launch(admin: AsyncClient, spec: epb.Experiment) -> epb.Experiment:
    created = await admin.create_experiment(spec)
    return await admin.start_experiment(created.id)


async def assign_many(
    client: AsyncClient, experiment_ref: str, subjects: list[str], chunk: int = 200
) -> list[apb.Decision]:
    """Concurrent Assign calls, `chunk` in flight at a time, answers in subject order."""
    decisions: list[apb.Decision] = []
    for start in range(0, len(subjects), chunk):
        decisions += await asyncio.gather(
            *(client.assign(experiment_ref, s) for s in subjects[start : start + chunk])
        )
    return decisions


async def poll(probe: Callable[[], Any], expected: Any) -> Any:
    """Call the async `probe` until it returns `expected` or the deadline passes."""
    deadline = time.monotonic() + POLL_DEADLINE_SECONDS
    while True:
        value = await probe()
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


@pytest.fixture
async def admin(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("ops_admin", "olga")) as client:
        yield client


@pytest.fixture
async def pay(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("pay_module", "pay")) as client:
        yield client


# --- NEW, STICKY, config ------------------------------------------------------------


async def test_new_then_sticky_with_config(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    configs: dict[str, dict[str, Any]] = {
        "blue": {"color": "#0A84FF", "size": 1},
        "green": {"color": "#34C759", "size": 2, "labels": ["pay", "now"], "ab": {"on": True}},
    }
    exp = await launch(
        admin,
        experiment(
            unique_key,
            variant("Blue", control=True, **configs["blue"]),
            variant("Green", **configs["green"]),
        ),
    )
    before_ms = time.time_ns() // 1_000_000
    first = await pay.assign(unique_key, "user-1")
    after_ms = time.time_ns() // 1_000_000
    assert first.reason == NEW
    assert (first.experiment_id, first.experiment_key) == (exp.id, unique_key)
    assert 0.0 < first.propensity <= 1.0
    assert before_ms <= first.assign_time.ToMilliseconds() <= after_ms  # same host clock
    by_id = {v.id: v for v in exp.variants}
    assigned = by_id[first.variant.id]
    assert (first.variant.key, first.variant.name) == (assigned.key, assigned.name)
    assert first.variant.is_control == assigned.is_control
    assert json_format.MessageToDict(first.variant.config) == configs[first.variant.key]

    for reference in (unique_key, exp.id, unique_key, exp.id):  # by key or id: same answer
        again = await pay.assign(reference, "user-1")
        assert again.reason == STICKY
        assert again.variant == first.variant
        assert again.propensity == pytest.approx(first.propensity, rel=1e-12)
        assert again.assign_time == first.assign_time


async def test_connect_module_assigns_too(
    admin: AsyncClient, sira_server: RunningServer, token_for: TokenFor, unique_key: str
) -> None:
    await launch(admin, experiment(unique_key))
    async with AsyncClient(sira_server.address, token=token_for("connect_module")) as connect:
        assert (await connect.assign(unique_key, "c-1")).reason == NEW
        assert len(await connect.assign_all("c-1")) >= 1


# --- targeting ----------------------------------------------------------------------

TARGETED_SUBJECT: dict[str, Any] = {
    "country": "sn",  # any case
    "language": "FR",
    "device": "mobile",
    "user_segment": "premium",
    "transaction_count": 5,
    "attributes": {"plan": "gold", "app": "v2"},
}

OUTSIDE: dict[str, dict[str, Any]] = {
    "country": {"country": "CI"},
    "no country": {"country": ""},
    "language": {"language": "en"},
    "device": {"device": "desktop"},
    "segment": {"user_segment": "basic"},
    "below min_txn": {"transaction_count": 4},
    "unknown txn": {"transaction_count": None},
    "attribute value": {"attributes": {"plan": "silver", "app": "v2"}},
    "attribute missing": {"attributes": {"app": "v2"}},
    "attribute case": {"attributes": {"plan": "Gold", "app": "v2"}},
}


def targeted_context(**changes: Any) -> apb.SubjectContext:
    fields = {**TARGETED_SUBJECT, **changes}
    if fields["transaction_count"] is None:
        del fields["transaction_count"]
    return apb.SubjectContext(**fields)


async def test_targeting_matrix(admin: AsyncClient, pay: AsyncClient, unique_key: str) -> None:
    targeting = epb.Targeting(
        countries=["SN", "FR"],
        languages=["fr"],
        devices=["mobile", "tablet"],
        user_segments=["premium"],
        min_txn=5,
        attributes={"plan": epb.AttributeValues(values=["gold", "platinum"])},
    )
    exp = await launch(admin, experiment(unique_key, targeting=targeting))

    inside = await pay.assign(unique_key, "in-1", targeted_context())
    assert inside.reason == NEW
    assert inside.HasField("variant")
    more = await pay.assign(
        unique_key, "in-2", targeted_context(country="FR", language="fr-SN", device="Tablet")
    )
    assert more.reason == NEW, "region variants of a language and any case match"

    for case, changes in OUTSIDE.items():
        decision = await pay.assign(unique_key, f"out-{case}", targeted_context(**changes))
        assert decision.reason == NOT_ELIGIBLE, case
        assert not decision.HasField("variant"), case
        assert not decision.HasField("assign_time"), case
        assert decision.propensity == 0.0, case
        assert decision.experiment_id == exp.id, case

    # An assigned subject that no longer matches is not eligible either (the targeting
    # is checked first), but keeps its assignment for when it matches again.
    moved = await pay.assign(unique_key, "in-1", targeted_context(country="CI"))
    assert moved.reason == NOT_ELIGIBLE
    back = await pay.assign(unique_key, "in-1", targeted_context())
    assert (back.reason, back.variant.id) == (STICKY, inside.variant.id)

    results = await admin.get_results(unique_key)
    assert sum(v.assigned_subjects for v in results.variants) == 2, "only the eligible count"


# --- exposure -----------------------------------------------------------------------


async def test_exposure_thirty_percent(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    exp = await launch(admin, experiment(unique_key, exposure_percent=30))
    subjects = [f"exp-{i}" for i in range(400)]
    first = await assign_many(pay, unique_key, subjects)
    again = await assign_many(pay, unique_key, subjects)

    exposed = [d.reason == NEW for d in first]
    assert all(d.reason in (NEW, NOT_EXPOSED) for d in first)
    assert all(d.HasField("variant") == e for d, e in zip(first, exposed, strict=True))
    # The same subject is always in or always out, and in exactly per the stable hash.
    assert [d.reason == STICKY for d in again] == exposed
    assert exposed == [is_exposed(exp.id, s, 30.0) for s in subjects]
    # About 30 %: a two-sided binomial test at a level a correct server fails 1 in 10^4.
    assert stats.binomtest(sum(exposed), len(subjects), 0.3).pvalue > 1e-4

    results = await admin.get_results(unique_key)
    assert sum(v.assigned_subjects for v in results.variants) == sum(exposed)


# --- allocation ---------------------------------------------------------------------


async def test_fixed_weights_follow_the_weights(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 5.0}
    spec = experiment(
        unique_key,
        variant("A", control=True, weight=weights["a"]),
        variant("B", weight=weights["b"]),
        variant("C", weight=weights["c"]),
        allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
    )
    await launch(admin, spec)
    subjects = [f"w-{i}" for i in range(2000)]
    decisions = await assign_many(pay, unique_key, subjects)

    assert {d.reason for d in decisions} == {NEW}
    counts = Counter(d.variant.key for d in decisions)
    total_weight = sum(weights.values())
    for d in decisions:  # the logged propensity is the exact weight share
        assert d.propensity == pytest.approx(weights[d.variant.key] / total_weight, rel=1e-12)
    observed = [counts[k] for k in weights]
    expected = [len(subjects) * w / total_weight for w in weights.values()]
    assert stats.chisquare(observed, expected).pvalue > 1e-4

    results = await admin.get_results(unique_key)
    assert {v.variant_key: v.assigned_subjects for v in results.variants} == dict(counts)


async def test_thompson_propensities_are_probabilities(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    await launch(
        admin, experiment(unique_key, variant("A", control=True), variant("B"), variant("C"))
    )
    decisions = await assign_many(pay, unique_key, [f"ts-{i}" for i in range(60)])
    assert {d.reason for d in decisions} == {NEW}
    assert all(0.0 < d.propensity <= 1.0 for d in decisions)
    assert len({d.variant.key for d in decisions}) >= 2  # no arm has all of a 1/3-prior start


# --- lifecycle states ---------------------------------------------------------------


async def test_draft_is_failed_precondition(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    await admin.create_experiment(experiment(unique_key))
    with pytest.raises(FailedPreconditionError) as caught:
        await pay.assign(unique_key, "d-1")
    assert caught.value.reason == "ERROR_REASON_INVALID_EXPERIMENT_STATE"
    assert caught.value.metadata["status"] == "draft"


async def test_stopped_with_winner_serves_the_winner_to_everyone(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    spec = experiment(
        unique_key,
        variant("A", control=True, v=1),
        variant("B", v=2),
        targeting=epb.Targeting(countries=["SN"]),
    )
    exp = await launch(admin, spec)
    sn = {"country": "SN"}
    before = [await pay.assign(unique_key, f"s-{i}", sn) for i in range(20)]
    assert {d.reason for d in before} == {NEW}
    winner = exp.variants[1]
    await admin.stop_experiment(unique_key, winner_variant=winner.key, reason="B wins")

    for subject in [f"s-{i}" for i in range(20)] + ["never-seen"]:
        decision = await pay.assign(unique_key, subject, sn)
        assert decision.reason == CONCLUDED
        assert decision.variant.id == winner.id
        assert decision.variant.config["v"] == 2
        assert decision.propensity == 1.0
    outside = await pay.assign(unique_key, "s-0", {"country": "FR"})
    assert outside.reason == NOT_ELIGIBLE
    assert not outside.HasField("variant")

    results = await admin.get_results(unique_key)
    assert sum(v.assigned_subjects for v in results.variants) == 20, "concluded adds nobody"


async def test_stopped_without_winner_serves_the_control(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    exp = await launch(admin, experiment(unique_key, variant("A"), variant("B", control=True)))
    await pay.assign(unique_key, "x-1")
    await admin.stop_experiment(unique_key)
    control = exp.variants[1]
    for subject in ("x-1", "x-2"):
        decision = await pay.assign(unique_key, subject)
        assert (decision.reason, decision.variant.id) == (CONCLUDED, control.id)
        assert decision.propensity == 1.0


async def test_archived_and_unknown_are_not_found(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    await launch(admin, experiment(unique_key))
    await pay.assign(unique_key, "a-1")
    await admin.stop_experiment(unique_key)
    await admin.archive_experiment(unique_key)
    for ref in (unique_key, f"{unique_key}-nope", str(uuid.uuid4())):
        with pytest.raises(NotFoundError) as caught:
            await pay.assign(ref, "a-1")
        assert caught.value.reason == "ERROR_REASON_EXPERIMENT_NOT_FOUND", ref
    assert all(d.experiment_key != unique_key for d in await pay.assign_all("a-1"))


# --- bad input and roles ------------------------------------------------------------


async def test_bad_input_is_invalid_argument_with_fields(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    await launch(admin, experiment(unique_key))
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("", "u-1", {}, "experiment"),
        (unique_key, "", {}, "subject_id"),
        (unique_key, "x" * 257, {}, "subject_id"),
        (unique_key, "u-1", {"country": "S" * 129}, "context.country"),
        (unique_key, "u-1", {"device": "d" * 129}, "context.device"),
        (unique_key, "u-1", {"transaction_count": -1}, "context.transaction_count"),
        (
            unique_key,
            "u-1",
            {"attributes": {f"k{i}": "v" for i in range(65)}},
            "context.attributes",
        ),
    ]
    for ref, subject, context, field in cases:
        with pytest.raises(InvalidArgumentError) as caught:
            await pay.assign(ref, subject, context)
        assert caught.value.reason == "ERROR_REASON_INVALID_ARGUMENT", field
        assert field in dict(caught.value.violations), (field, caught.value.violations)
    with pytest.raises(InvalidArgumentError) as caught:
        await pay.assign_all("")
    assert "subject_id" in dict(caught.value.violations)
    assert (await pay.assign(unique_key, "x" * 256)).reason == NEW, "256 characters is fine"
    results = await admin.get_results(unique_key)
    assert sum(v.assigned_subjects for v in results.variants) == 1


async def test_only_modules_may_assign(
    admin: AsyncClient, sira_server: RunningServer, token_for: TokenFor, unique_key: str
) -> None:
    await launch(admin, experiment(unique_key))
    for role in ("data_science", "marketing", "ops_admin"):
        async with AsyncClient(sira_server.address, token=token_for(role)) as client:
            with pytest.raises(PermissionDeniedError) as caught:
                await client.assign(unique_key, "r-1")
            assert caught.value.reason == "ERROR_REASON_ROLE_NOT_ALLOWED"
            with pytest.raises(PermissionDeniedError):
                await client.assign_all("r-1")
    async with AsyncClient(sira_server.address) as anonymous:
        with pytest.raises(UnauthenticatedError) as denied:
            await anonymous.assign(unique_key, "r-1")
        assert denied.value.reason == "ERROR_REASON_TOKEN_MISSING"
    results = await admin.get_results(unique_key)
    assert sum(v.assigned_subjects for v in results.variants) == 0


# --- AssignAll ----------------------------------------------------------------------


async def test_assign_all_one_decision_per_live_experiment_with_a_variant(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    subject = f"all-{uuid.uuid4().hex[:8]}"
    sn = {"country": "SN"}
    running = await launch(admin, experiment(f"{unique_key}-run"))
    elsewhere = await launch(
        admin, experiment(f"{unique_key}-fr", targeting=epb.Targeting(countries=["FR"]))
    )
    stopped = await launch(admin, experiment(f"{unique_key}-stop"))
    await admin.stop_experiment(stopped.id, winner_variant=stopped.variants[1].id)
    draft = await admin.create_experiment(experiment(f"{unique_key}-draft"))
    hidden = await launch(admin, experiment(f"{unique_key}-hidden", exposure_percent=0.001))
    assert not is_exposed(hidden.id, subject, 0.001)

    def ours(decisions: list[apb.Decision]) -> dict[str, apb.Decision]:
        mine = [d for d in decisions if d.experiment_key.startswith(unique_key)]
        by_id = {d.experiment_id: d for d in mine}
        assert len(by_id) == len(mine), "one decision per experiment"
        return by_id

    first = ours(await pay.assign_all(subject, sn))
    assert set(first) == {running.id, stopped.id}
    assert (first[running.id].reason, first[stopped.id].reason) == (NEW, CONCLUDED)
    assert first[stopped.id].variant.id == stopped.variants[1].id
    assert not {elsewhere.id, draft.id, hidden.id} & set(first)

    second = ours(await pay.assign_all(subject, sn))
    assert second[running.id].reason == STICKY
    assert second[running.id].variant == first[running.id].variant
    single = await pay.assign(running.id, subject, sn)
    assert (single.reason, single.variant.id) == (STICKY, first[running.id].variant.id)


# --- one new subject, 1,000 concurrent calls from 4 processes -----------------------

CONCURRENT_CLIENT = r"""
import asyncio, json, sys
import grpc
from sira.experiments.v1 import assignment_service_pb2 as pb
from sira.experiments.v1 import assignment_service_pb2_grpc as rpc

async def main(address, token, experiment, subject, calls):
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = rpc.AssignmentServiceStub(channel)
        metadata = (("authorization", "Bearer " + token),)
        request = pb.AssignRequest(experiment=experiment, subject_id=subject)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        replies = await asyncio.gather(
            *(stub.Assign(request, metadata=metadata, timeout=120) for _ in range(calls))
        )
        answers = [[r.decision.variant.id, int(r.decision.reason)] for r in replies]
        print(json.dumps(answers), flush=True)

asyncio.run(main(*sys.argv[1:5], int(sys.argv[5])))
"""


@pytest.mark.slow
async def test_a_thousand_concurrent_assigns_of_one_subject_from_four_processes(
    admin: AsyncClient,
    sira_server: RunningServer,
    token_for: TokenFor,
    server_redis_url: str,
    sira_server_database_url: str,
    unique_key: str,
) -> None:
    exp = await launch(
        admin, experiment(unique_key, variant("A", control=True), variant("B"), variant("C"))
    )
    subject = "race-subject"
    token = token_for("pay_module", "pay")
    argv = [sira_server.address, token, unique_key, subject, "250"]
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CONCURRENT_CLIENT,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for child in children:  # every process connected before any call goes out
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 120)).strip() == b"ready"
    outputs = await asyncio.gather(
        *(asyncio.wait_for(child.communicate(b"go\n"), 300) for child in children)
    )
    answers = [tuple(a) for out, _ in outputs for a in json.loads(out)]
    assert all(child.returncode == 0 for child in children)

    assert len(answers) == 1000
    assert len({variant_id for variant_id, _ in answers}) == 1, "one variant for everyone"
    assert answers[0][0] in {v.id for v in exp.variants}
    assert Counter(reason for _, reason in answers) == {NEW: 1, STICKY: 999}

    redis = aioredis.Redis.from_url(redis_url_with_db(server_redis_url, SERVER_REDIS_DB))
    try:
        trials = await redis.hgetall(f"sira:{{exp:{exp.id}}}:trials")
    finally:
        await redis.aclose()
    assert sum(int(n) for n in trials.values()) == 1
    results = await admin.get_results(unique_key)
    assert sum(v.assigned_subjects for v in results.variants) == 1

    conn = await asyncpg.connect(sira_server_database_url)
    try:

        async def rows() -> list[tuple[str, str]]:
            found = await conn.fetch(
                "SELECT molam_id, variant_id::text FROM experiment_assignments"
                " WHERE experiment_id = $1",
                uuid.UUID(exp.id),
            )
            return [(r[0], r[1]) for r in found]

        assert await poll(rows, [(subject, answers[0][0])]) == [(subject, answers[0][0])]
    finally:
        await conn.close()


# --- catalog races: a slow read must not bring back an older definition -------------


class PausedRepository(ExperimentRepository):
    """Reads that can be held after they hit Postgres, to order them against a change."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.hold: asyncio.Event | None = None
        self.read_done = asyncio.Event()

    async def get(self, ref: str) -> Experiment:
        experiment = await super().get(ref)
        hold, self.hold = self.hold, None
        if hold is not None:
            self.read_done.set()
            await hold.wait()
        return experiment


@pytest.fixture
async def catalog_parts(
    sira_server_database_url: str, server_redis_url: str
) -> AsyncIterator[tuple[ExperimentCatalog, PausedRepository]]:
    """A second, in-process catalog on the session server's stores (never started)."""
    pool = await create_pool(sira_server_database_url, min_size=1, max_size=4)
    redis = aioredis.Redis.from_url(redis_url_with_db(server_redis_url, SERVER_REDIS_DB))
    repository = PausedRepository(pool)
    try:
        yield ExperimentCatalog(repository, pool, redis), repository
    finally:
        await redis.aclose()
        await pool.close()


async def test_a_reload_that_read_before_an_archive_does_not_resurrect_it(
    admin: AsyncClient,
    catalog_parts: tuple[ExperimentCatalog, PausedRepository],
    unique_key: str,
) -> None:
    catalog, repository = catalog_parts
    exp = await launch(admin, experiment(unique_key))
    await admin.stop_experiment(exp.id)

    for stale_read in ("reload", "get"):
        if stale_read == "get":  # a fresh experiment, never seen by this catalog
            exp = await launch(admin, experiment(f"{unique_key}-2"))
            await admin.stop_experiment(exp.id)
        repository.hold, repository.read_done = asyncio.Event(), asyncio.Event()
        hold = repository.hold
        slow = asyncio.create_task(
            catalog.reload(exp.id) if stale_read == "reload" else catalog.get(exp.key)
        )
        await repository.read_done.wait()  # it has read "stopped" and is held there
        await admin.archive_experiment(exp.id)
        await catalog.reload(exp.id)  # the pub/sub message of the archive, say
        hold.set()
        if stale_read == "reload":
            await slow
        else:
            with pytest.raises(NotFound):
                await slow
        assert exp.id not in {live.id for live in catalog.live()}, stale_read
        with pytest.raises(NotFound):
            await catalog.get(exp.key)
