"""GetResults end to end: the numbers equal what was sent, through the API and `sira results`.

The expected numbers are computed here from the events the test itself sends,
per the contract in insights_service.proto (subjects counted once, events every
time, revenue per currency, rates over assigned subjects).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from google.protobuf import json_format
from server_fixtures import RunningServer

from sira import (
    AsyncClient,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    cli,
    tracked_event,
)
from sira.experiments.v1 import experiment_pb2 as epb
from sira.experiments.v1 import insights_service_pb2 as ipb
from sira.experiments.v1 import tracking_service_pb2 as tpb

TokenFor = Callable[..., str]


@dataclass
class Expected:
    """What one variant's GetResults row must say, built from the events sent."""

    assigned: set[str] = field(default_factory=set)
    converted: set[str] = field(default_factory=set)
    conversions: int = 0
    revenue: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    refunds: int = 0
    refunded: set[str] = field(default_factory=set)
    churns: int = 0
    churned: set[str] = field(default_factory=set)

    def rate(self, subjects: set[str]) -> float:
        return len(subjects) / len(self.assigned) if self.assigned else 0.0

    def check(self, row: ipb.VariantResults) -> None:
        n = len(self.assigned)
        assert row.assigned_subjects == n
        assert (row.converted_subjects, row.conversions) == (len(self.converted), self.conversions)
        assert row.conversion_rate == pytest.approx(self.rate(self.converted), rel=1e-12)
        assert [r.currency for r in row.revenue] == sorted(self.revenue)
        for r in row.revenue:
            assert r.total == pytest.approx(self.revenue[r.currency], rel=1e-12)
            assert r.per_assigned_subject == pytest.approx(self.revenue[r.currency] / n, rel=1e-12)
        assert (row.refunds, row.refunded_subjects) == (self.refunds, len(self.refunded))
        assert row.refund_rate == pytest.approx(self.rate(self.refunded), rel=1e-12)
        assert (row.churns, row.churned_subjects) == (self.churns, len(self.churned))
        assert row.churn_rate == pytest.approx(self.rate(self.churned), rel=1e-12)


def experiment(key: str) -> epb.Experiment:
    return epb.Experiment(
        key=key,
        name=f"Results {key}",
        allocation=epb.ALLOCATION_STRATEGY_FIXED_WEIGHTS,
        variants=[
            epb.Variant(name="Blue", is_control=True),
            epb.Variant(name="Green"),
            epb.Variant(name="Orange"),
        ],
    )


@pytest.fixture
async def admin(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("ops_admin", "olga")) as client:
        yield client


@pytest.fixture
async def pay(sira_server: RunningServer, token_for: TokenFor) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sira_server.address, token=token_for("pay_module", "pay")) as client:
        yield client


async def play_traffic(
    pay: AsyncClient, exp: epb.Experiment, subjects: int = 60
) -> dict[str, Expected]:
    """Assign `subjects` subjects and send a known mix of events; the expected rows."""
    expected = {v.id: Expected() for v in exp.variants}
    events: list[tpb.TrackedEvent] = []

    def send(
        subject: str, variant_id: str, kind: str, value: float = 0.0, cur: str = "", name: str = ""
    ) -> None:
        events.append(
            tracked_event(
                experiment=exp.key,
                subject_id=subject,
                variant_id=variant_id,
                event_type=kind,
                value=value,
                currency=cur,
                custom_event_name=name,
                client_event_id=f"{subject}-{len(events)}",
            )
        )
        e = expected[variant_id]
        if kind == "conversion":
            e.conversions += 1
            e.converted.add(subject)
            if value > 0:
                e.revenue[cur] += value
        elif kind == "refund":
            e.refunds += 1
            e.refunded.add(subject)
        elif kind == "churn":
            e.churns += 1
            e.churned.add(subject)

    decisions = await asyncio.gather(*(pay.assign(exp.key, f"u{i}") for i in range(subjects)))
    for i, decision in enumerate(decisions):
        subject, variant_id = f"u{i}", decision.variant.id
        expected[variant_id].assigned.add(subject)
        if i % 3 == 0:
            send(subject, variant_id, "conversion", 1500.0, "XOF")
        if i % 5 == 0:
            send(subject, variant_id, "conversion", 2.5, "EUR")
            send(subject, variant_id, "conversion")  # no amount: counted, no revenue
        if i % 9 == 0:
            send(subject, variant_id, "refund", 1500.0, "XOF")
        if i % 11 == 0:
            send(subject, variant_id, "refund")  # a refund without a conversion
        if i % 4 == 0:
            send(subject, variant_id, "churn")
        if i % 8 == 0:
            send(subject, variant_id, "churn")
        if i % 2 == 0:
            send(subject, variant_id, "custom", name="opened_app")
    results = await pay.track_batch(events)
    assert [r.accepted.outcome for r in results] == [tpb.TRACK_OUTCOME_ACCEPTED] * len(events)
    # Replays and duplicates change nothing.
    again = await pay.track_batch(events[:10])
    assert [r.accepted.outcome for r in again] == [tpb.TRACK_OUTCOME_DUPLICATE] * 10
    return expected


def check_results(
    results: ipb.GetResultsResponse, exp: epb.Experiment, expected: dict[str, Expected]
) -> None:
    assert results.experiment_id == exp.id
    assert results.HasField("compute_time")
    assert [r.variant_id for r in results.variants] == [v.id for v in exp.variants]
    for row, variant in zip(results.variants, exp.variants, strict=True):
        assert (row.variant_key, row.variant_name) == (variant.key, variant.name)
        assert row.is_control == variant.is_control
        assert row.state == epb.VARIANT_STATE_ACTIVE
        expected[variant.id].check(row)


async def test_results_match_what_was_sent(
    admin: AsyncClient, pay: AsyncClient, unique_key: str
) -> None:
    exp = await admin.start_experiment((await admin.create_experiment(experiment(unique_key))).id)
    expected = await play_traffic(pay, exp)
    assert sum(len(e.assigned) for e in expected.values()) == 60
    assert all(e.assigned for e in expected.values()), "60 subjects reach all three arms"

    results = await admin.get_results(unique_key)
    assert results.status == epb.EXPERIMENT_STATUS_RUNNING
    check_results(results, exp, expected)
    by_id = await admin.get_results(exp.id)
    assert list(by_id.variants) == list(results.variants)

    await admin.stop_experiment(unique_key)
    stopped = await admin.get_results(unique_key)
    assert stopped.status == epb.EXPERIMENT_STATUS_STOPPED
    check_results(stopped, exp, expected)
    await admin.archive_experiment(unique_key)
    archived = await admin.get_results(unique_key)
    assert archived.status == epb.EXPERIMENT_STATUS_ARCHIVED
    check_results(archived, exp, expected)


async def test_draft_results_are_zero(admin: AsyncClient, unique_key: str) -> None:
    draft = await admin.create_experiment(experiment(unique_key))
    results = await admin.get_results(unique_key)
    assert results.status == epb.EXPERIMENT_STATUS_DRAFT
    check_results(results, draft, {v.id: Expected() for v in draft.variants})


async def test_results_roles_and_bad_references(
    admin: AsyncClient,
    pay: AsyncClient,
    sira_server: RunningServer,
    token_for: TokenFor,
    unique_key: str,
) -> None:
    await admin.create_experiment(experiment(unique_key))
    for role in ("marketing", "data_science"):
        async with AsyncClient(sira_server.address, token=token_for(role)) as reader:
            assert (await reader.get_results(unique_key)).status == epb.EXPERIMENT_STATUS_DRAFT
    with pytest.raises(PermissionDeniedError) as denied:
        await pay.get_results(unique_key)
    assert denied.value.reason == "ERROR_REASON_ROLE_NOT_ALLOWED"
    with pytest.raises(NotFoundError) as missing:
        await admin.get_results(f"{unique_key}-missing")
    assert missing.value.reason == "ERROR_REASON_EXPERIMENT_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as empty:
        await admin.get_results("")
    assert "experiment" in dict(empty.value.violations)


# --- the CLI ------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SIRA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.usefixtures("clean_env")
async def test_sira_results_prints_the_numbers(
    admin: AsyncClient,
    pay: AsyncClient,
    sira_server: RunningServer,
    token_for: TokenFor,
    capsys: pytest.CaptureFixture[str],
    unique_key: str,
) -> None:
    exp = await admin.start_experiment((await admin.create_experiment(experiment(unique_key))).id)
    expected = await play_traffic(pay, exp, subjects=30)
    token = token_for("data_science", "dana")
    base = ["--address", sira_server.address, "--token", token]

    code = await asyncio.to_thread(cli.main, ["results", unique_key, "--json", *base])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    printed = json_format.Parse(out, ipb.GetResultsResponse())
    check_results(printed, exp, expected)

    code = await asyncio.to_thread(cli.main, ["results", unique_key, *base])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    for variant in exp.variants:
        e = expected[variant.id]
        label = f"{variant.name} (control)" if variant.is_control else variant.name
        line = next(ln for ln in lines if f" {label} " in f" {ln} ")
        assert f" {len(e.assigned)} " in line, line
        assert f"{len(e.converted)} ({e.conversions} events)" in line, line
        assert f"{e.rate(e.converted) * 100:.2f}%" in line, line
        assert f"{len(e.refunded)} ({e.rate(e.refunded) * 100:.2f}%)" in line, line
        assert f"{len(e.churned)} ({e.rate(e.churned) * 100:.2f}%)" in line, line
        revenue = "\n".join(lines[lines.index(line) : lines.index(line) + 3])
        for currency, total in e.revenue.items():
            assert f"{currency} {total:,.2f}" in revenue, revenue
