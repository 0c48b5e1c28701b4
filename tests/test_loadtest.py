"""sira-loadtest: templates, encoders, report maths, and real runs against the echo server.

No assertion is about speed; the rate-limit test checks an upper bound on the
number of calls only.
"""

from __future__ import annotations

import asyncio
import json
import random
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from sira.experiments.v1 import (
    assignment_service_pb2,
    insights_service_pb2,
    insights_service_pb2_grpc,
    tracking_service_pb2,
)
from sira_loadtest.__main__ import main as cli_main
from sira_loadtest.bench_kernels import (
    KERNELS_END,
    KERNELS_START,
    MONTE_CARLO_TARGET_MS,
    THOMPSON_TARGET_US,
    KernelFigure,
    KernelResults,
    measure_kernels,
    write_kernels_section,
)
from sira_loadtest.bench_report import (
    SECTION_END,
    SECTION_START,
    BenchResult,
    Measurement,
    render_markdown,
    replace_section,
    target_checks,
)
from sira_loadtest.config import (
    ConfigError,
    LoadConfig,
    is_loopback,
    normalize_call,
    parse_duration,
)
from sira_loadtest.echo import ECHO_METHOD, start_echo_server
from sira_loadtest.h2load import grpc_frame, h2load_path, parse_h2load, run_h2load
from sira_loadtest.payloads import (
    RenderedEncoder,
    SplicedEncoder,
    StaticEncoder,
    build_encoder,
)
from sira_loadtest.report import (
    OTHER_ERRORS,
    PERCENTILES,
    WorkerResult,
    build_report,
    histogram,
    merge_results,
    nearest_rank,
)
from sira_loadtest.runner import preassign, run_load, run_load_detailed
from sira_loadtest.scenarios import ASSIGN_METHOD, TRACK_METHOD, build_source
from sira_loadtest.template import (
    IdFactory,
    RenderContext,
    TemplateError,
    compile_template,
    returning_subject_id,
)

GHZ_KEYS = {
    "name",
    "endReason",
    "date",
    "options",
    "count",
    "total",
    "average",
    "fastest",
    "slowest",
    "rps",
    "errorDistribution",
    "statusCodeDistribution",
    "latencyDistribution",
    "histogram",
}


@pytest.fixture(scope="session")
async def echo_target() -> AsyncIterator[str]:
    server, port = await start_echo_server("127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    await server.stop(None)


def _ctx(seed: int = 1, worker: str = "w0c0") -> RenderContext:
    return RenderContext(worker, random.Random(seed), IdFactory("lt-", "run1", 0))


# --- flags ---------------------------------------------------------------------------


def test_parse_duration_accepts_go_durations() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("1m30s") == 90
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("2") == 2
    with pytest.raises(ConfigError):
        parse_duration("ten seconds")


def test_normalize_call_accepts_ghz_spellings() -> None:
    expected = "/sira.experiments.v1.AssignmentService/Assign"
    assert normalize_call("sira.experiments.v1.AssignmentService.Assign") == expected
    assert normalize_call("sira.experiments.v1.AssignmentService/Assign") == expected
    assert normalize_call("/sira.experiments.v1.AssignmentService/Assign") == expected
    with pytest.raises(ConfigError):
        normalize_call("Assign")


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1:50051")
    assert is_loopback("localhost:1")
    assert is_loopback("[::1]:50051")
    assert is_loopback("unix:/tmp/sock")
    assert not is_loopback("10.0.0.5:50051")
    assert not is_loopback("sira.example.com:443")


def test_config_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--experiment"):
        LoadConfig(target="127.0.0.1:1", scenario="mixed").validate()
    with pytest.raises(ConfigError, match="--call"):
        LoadConfig(target="127.0.0.1:1").validate()


# --- templates -----------------------------------------------------------------------


def test_request_number_and_worker_id_render_sequentially() -> None:
    template = compile_template('{"n": "{{.RequestNumber}}", "w": "{{ .WorkerID }}"}')
    ctx = _ctx(worker="w1c3")
    rendered = []
    for n in range(3):
        ctx.request_number = n
        rendered.append(json.loads(template.render(ctx)))
    assert rendered == [{"n": str(n), "w": "w1c3"} for n in range(3)]


def test_random_int_stays_in_half_open_range_and_covers_it() -> None:
    template = compile_template("{{randomInt 3 7}}")
    ctx = _ctx()
    values = {int(template.render(ctx)) for _ in range(500)}
    assert values == {3, 4, 5, 6}


def test_uuid_and_random_string() -> None:
    ctx = _ctx()
    uuids = {compile_template("{{.UUID}}").render(ctx) for _ in range(50)}
    assert len(uuids) == 50
    assert all(len(u) == 36 for u in uuids)
    assert len(compile_template("{{randomString 12}}").render(ctx)) == 12


def test_new_subjects_are_unique_across_slots_and_processes() -> None:
    template = compile_template("{{subject:new}}")
    worker0 = RenderContext("w0c0", random.Random(1), IdFactory("lt-", "run1", 0))
    worker1 = RenderContext("w1c0", random.Random(1), IdFactory("lt-", "run1", 1))
    ids = [template.render(worker0) for _ in range(100)]
    ids += [template.render(worker1) for _ in range(100)]
    assert len(set(ids)) == 200
    assert all(i.startswith("lt-new-run1-") for i in ids)


def test_returning_subjects_come_from_a_fixed_pool() -> None:
    template = compile_template("{{subject:returning 5}}")
    ctx = _ctx()
    seen = {template.render(ctx) for _ in range(500)}
    assert seen == {returning_subject_id("lt-", i) for i in range(5)}


def test_subject_mix_follows_its_share() -> None:
    template = compile_template("{{subject:mix 80 1000}}")
    ctx = _ctx(seed=7)
    draws = [template.render(ctx) for _ in range(10_000)]
    returning = sum(d.startswith("lt-ret-") for d in draws)
    # Binomial(10000, 0.8): sd = 40; 5 sd either side.
    assert 7800 <= returning <= 8200
    assert len({d for d in draws if d.startswith("lt-new-")}) == 10_000 - returning


def test_event_ids_are_unique() -> None:
    template = compile_template("{{event:new}}")
    ctx = _ctx()
    assert len({template.render(ctx) for _ in range(100)}) == 100


@pytest.mark.parametrize(
    "text", ["{{nope}}", "{{randomInt 5 5}}", "{{randomInt a b}}", "{{subject:returning 0}}"]
)
def test_bad_placeholders_are_rejected(text: str) -> None:
    with pytest.raises(TemplateError):
        compile_template(text)


# --- encoders ------------------------------------------------------------------------


def test_static_data_is_serialised_once() -> None:
    encoder = build_encoder(ASSIGN_METHOD, '{"experiment": "checkout", "subjectId": "u1"}')
    assert isinstance(encoder, StaticEncoder)
    request = assignment_service_pb2.AssignRequest.FromString(encoder.encode(_ctx()))
    assert (request.experiment, request.subject_id) == ("checkout", "u1")


def test_spliced_encoder_equals_a_full_parse() -> None:
    data = json.dumps(
        {
            "experiment": "checkout",
            "subject_id": "u-{{.RequestNumber}}",
            "context": {
                "country": "SN",
                "transactionCount": "{{randomInt 1 2}}",
                "attributes": {"plan": "gold"},
            },
        }
    )
    encoder = build_encoder(ASSIGN_METHOD, data)
    assert isinstance(encoder, SplicedEncoder)
    ctx = _ctx()
    ctx.request_number = 42
    request = assignment_service_pb2.AssignRequest.FromString(encoder.encode(ctx))
    expected = assignment_service_pb2.AssignRequest(
        experiment="checkout",
        subject_id="u-42",
        context=assignment_service_pb2.SubjectContext(
            country="SN", transaction_count=1, attributes={"plan": "gold"}
        ),
    )
    assert request == expected


def test_spliced_encoder_sets_enums_by_name() -> None:
    data = json.dumps(
        {
            "event": {
                "experiment": "checkout",
                "subjectId": "{{subject:returning 3}}",
                "eventType": "EVENT_TYPE_CONVERSION",
                "clientEventId": "{{event:new}}",
            }
        }
    )
    encoder = build_encoder(TRACK_METHOD, data)
    assert isinstance(encoder, SplicedEncoder)
    request = tracking_service_pb2.TrackRequest.FromString(encoder.encode(_ctx()))
    assert request.event.event_type == tracking_service_pb2.EVENT_TYPE_CONVERSION
    assert request.event.subject_id.startswith("lt-ret-")
    assert request.event.client_event_id.startswith("lt-ev-run1-0-")


def test_placeholders_in_maps_fall_back_to_rendering() -> None:
    data = '{"experiment": "x", "context": {"attributes": {"k": "{{randomInt 1 2}}"}}}'
    encoder = build_encoder(ASSIGN_METHOD, data)
    assert isinstance(encoder, RenderedEncoder)
    request = assignment_service_pb2.AssignRequest.FromString(encoder.encode(_ctx()))
    assert dict(request.context.attributes) == {"k": "1"}


def test_data_that_does_not_fit_the_request_is_rejected_before_the_run() -> None:
    with pytest.raises(ConfigError, match="AssignRequest"):
        build_encoder(ASSIGN_METHOD, '{"no_such_field": "{{.UUID}}"}')
    with pytest.raises(ConfigError, match="unknown method"):
        build_encoder("/x.Y/Z", '{"a": 1}')
    assert build_encoder("/x.Y/Z", "").encode(_ctx()) == b""


# --- report maths --------------------------------------------------------------------


def test_nearest_rank_matches_numpy_inverted_cdf() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100, 1001):
        values = sorted(int(v) for v in rng.integers(1, 10**6, size=n))
        for p in PERCENTILES:
            expected = int(np.percentile(values, p, method="inverted_cdf"))
            assert nearest_rank(values, p) == expected, (n, p)


def test_histogram_has_eleven_marks_from_fastest_to_slowest() -> None:
    values = sorted(random.Random(5).randrange(1_000, 50_000) for _ in range(1000))
    buckets = histogram(values)
    assert len(buckets) == 11
    assert buckets[0].mark == values[0] / 1e9
    assert buckets[-1].mark == values[-1] / 1e9
    assert sum(b.count for b in buckets) == 1000
    edges = [b.mark * 1e9 for b in buckets]
    for i, b in enumerate(buckets):  # each bucket counts (previous mark, mark]
        low = edges[i - 1] if i else -1
        assert b.count == sum(low < v <= edges[i] for v in values)


def test_merge_adds_counts_and_spans_the_earliest_start_to_the_latest_end() -> None:
    a, b = WorkerResult(), WorkerResult()
    for latency in (1_000, 2_000, 3_000):
        a.record("/m", latency, "OK", None)
    b.record("/m", 4_000, "OK", None)
    b.record("/m", 9_000, "Unavailable", "rpc error: code = Unavailable desc = down")
    a.start_ns, a.end_ns = 100, 1_000_000_100
    b.start_ns, b.end_ns = 50, 500_000_050
    merged = merge_results([a, b])
    assert merged.count == 5
    assert sorted(merged.ok_latencies_ns) == [1_000, 2_000, 3_000, 4_000]
    assert merged.status_counts == Counter({"OK": 4, "Unavailable": 1})
    assert (merged.start_ns, merged.end_ns) == (50, 1_000_000_100)
    report = build_report(merged)
    assert report.count == 5
    assert report.average_ns == 19_000 // 5  # over every call, like ghz
    assert (report.fastest_ns, report.slowest_ns) == (1_000, 4_000)  # OK calls only
    assert report.rps == pytest.approx(5 / 1.00000005)


def test_error_kinds_are_capped() -> None:
    result = WorkerResult(ok_latencies_ns=array("q"))
    for i in range(150):
        result.record("/m", 1, "Internal", f"rpc error: code = Internal desc = id {i}")
    assert len(result.error_counts) == 101
    assert result.error_counts[OTHER_ERRORS] == 50
    assert sum(result.error_counts.values()) == 150


# --- real runs against the echo server ------------------------------------------------


def _assert_ghz_json(doc: dict[str, Any], count: int) -> None:
    assert doc.keys() >= GHZ_KEYS
    assert doc["count"] == count
    for key in ("total", "average", "fastest", "slowest"):
        assert isinstance(doc[key], int)
        assert doc[key] > 0  # nanoseconds
    latency = doc["latencyDistribution"]
    assert [d["percentage"] for d in latency] == [10, 25, 50, 75, 90, 95, 99, 99.9]
    values = [d["latency"] for d in latency]
    assert values == sorted(values)
    buckets = doc["histogram"]
    assert len(buckets) == 11
    assert sum(b["count"] for b in buckets) == doc["statusCodeDistribution"]["OK"]


async def test_run_against_echo_counts_every_call(echo_target: str) -> None:
    config = LoadConfig(target=echo_target, call=ECHO_METHOD, total=200, concurrency=8)
    report = await run_load(config)
    assert report.count == 200
    assert report.status_code_distribution == {"OK": 200}
    assert report.error_distribution == {}
    assert report.end_reason == "normal"
    doc = json.loads(report.render("json"))
    _assert_ghz_json(doc, 200)
    assert doc["options"]["concurrency"] == 8
    text = report.summary_text()
    for heading in (
        "Summary:",
        "Response time histogram:",
        "Latency distribution:",
        "Status code distribution:",
    ):
        assert heading in text
    assert "[OK]" in text
    assert "200 responses" in text
    assert "99.9 % in" in text


async def test_rate_limit_bounds_the_number_of_calls(echo_target: str) -> None:
    rps, seconds = 40.0, 1.0
    config = LoadConfig(
        target=echo_target, call=ECHO_METHOD, duration=seconds, rps=rps, concurrency=8
    )
    report = await run_load(config)
    assert 0 < report.count <= rps * seconds * 1.2
    assert report.end_reason == "timeout"


async def test_two_worker_processes_merge_into_one_report(echo_target: str) -> None:
    config = LoadConfig(
        target=echo_target, call=ECHO_METHOD, total=101, concurrency=6, workers=2, connections=2
    )
    report = await run_load(config)
    assert report.count == 101
    assert report.status_code_distribution == {"OK": 101}
    _assert_ghz_json(report.to_json(), 101)


async def test_errors_are_reported_by_status(echo_target: str) -> None:
    config = LoadConfig(
        target=echo_target,
        call=ASSIGN_METHOD,
        data='{"experiment": "x", "subjectId": "{{subject:new}}"}',
        total=20,
        concurrency=4,
    )
    report = await run_load(config)
    assert report.count == 20
    assert report.status_code_distribution == {"Unimplemented": 20}
    (error,) = report.error_distribution
    assert error.startswith("rpc error: code = Unimplemented desc = ")
    assert report.latency_distribution == []
    assert report.histogram == []
    assert "Error distribution:" in report.summary_text()


async def test_scenarios_run_even_when_the_server_lacks_the_methods(echo_target: str) -> None:
    config = LoadConfig(
        target=echo_target,
        scenario="mixed",
        experiment="checkout",
        total=60,
        concurrency=4,
        returning_subjects=10,
    )
    run = await run_load_detailed(config)
    assert run.setup_statuses == {"Unimplemented": 10}
    assert run.preassigned == 0
    assert run.report.count == 60
    assert run.report.status_code_distribution == {"Unimplemented": 60}
    assert set(run.report.method_distribution) == {ASSIGN_METHOD, TRACK_METHOD}


def test_scenario_requests_are_well_formed() -> None:
    config = LoadConfig(
        target="127.0.0.1:1",
        scenario="mixed",
        experiment="checkout",
        returning_subjects=4,
        preassigned=(("lt-ret-0", "v-a"), ("lt-ret-1", "v-b")),
    )
    source = build_source(config)
    ctx = _ctx(seed=11)
    methods: Counter[str] = Counter()
    event_ids = set()
    for _ in range(1000):
        method, body = source.next_call(ctx)
        methods[method] += 1
        if method == TRACK_METHOD:
            event = tracking_service_pb2.TrackRequest.FromString(body).event
            assert (event.subject_id, event.variant_id) in config.preassigned
            assert event.event_type == tracking_service_pb2.EVENT_TYPE_CONVERSION
            assert event.currency == "XOF"
            assert event.value > 0
            event_ids.add(event.client_event_id)
        else:
            request = assignment_service_pb2.AssignRequest.FromString(body)
            assert request.experiment == "checkout"
    assert 650 <= methods[ASSIGN_METHOD] <= 750  # Binomial(1000, 0.7): sd 14.5
    assert len(event_ids) == methods[TRACK_METHOD]  # every Track event id is unique


async def test_preassign_reports_statuses_without_raising(echo_target: str) -> None:
    config = LoadConfig(
        target=echo_target, scenario="assign-heavy", experiment="x", returning_subjects=5
    )
    assigned, statuses = await preassign(config)
    assert assigned == ()
    assert statuses == {"Unimplemented": 5}


async def test_cli_writes_the_json_report(echo_target: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [
        "--call",
        "sira.bench.Echo.Echo",
        "-n",
        "30",
        "-c",
        "3",
        "-O",
        "json",
        "-o",
        str(out),
        "--token",
        "secret-token",
        echo_target,
    ]
    await asyncio.to_thread(cli_main, argv)
    doc = json.loads(out.read_text())
    _assert_ghz_json(doc, 30)
    assert doc["options"]["metadata"] == {"authorization": "***"}


def test_cli_rejects_bad_flags() -> None:
    with pytest.raises(SystemExit, match="duration"):
        cli_main(["--call", "a.B.C", "-z", "soon", "127.0.0.1:1"])


# --- h2load and the bench report ----------------------------------------------------

H2LOAD_OUTPUT = """starting benchmark...
finished in 3.01s, 3280.33 req/s, 198.92KB/s
requests: 9841 total, 9905 started, 9841 done, 9841 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 9841 2xx, 0 3xx, 0 4xx, 0 5xx
"""


def test_parse_h2load_uses_the_request_log_for_percentiles() -> None:
    log = [f"1795771901602697\t200\t{us}" for us in range(1, 101)] + ["1\t503\t99999"]
    result = parse_h2load(H2LOAD_OUTPUT, log)
    assert (result.requests, result.succeeded, result.rps) == (9841, 9841, 3280.33)
    assert (result.p50_ns, result.p95_ns, result.p99_ns) == (50_000, 95_000, 99_000)


def test_grpc_frame_is_length_prefixed() -> None:
    assert grpc_frame(b"") == b"\x00\x00\x00\x00\x00"
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


@pytest.mark.skipif(h2load_path() is None, reason="h2load not installed")
async def test_h2load_against_echo(echo_target: str) -> None:
    # h2load runs in a thread; the echo server keeps answering on this loop.
    result = await asyncio.to_thread(
        run_h2load, f"http://{echo_target}{ECHO_METHOD}", b"", duration=1, concurrency=4
    )
    assert result.requests > 0
    assert result.succeeded == result.requests
    assert 0 < result.p50_ns <= result.p99_ns


def test_bench_section_replaces_only_its_markers(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(
        "# Benchmarks\n\n## Kernels\n\nkernel numbers\n\n"
        f"{SECTION_START}\nold numbers\n{SECTION_END}\n\n## Later\n\nkept\n"
    )
    result = BenchResult(date="today", machine={"cpu": "x", "cores": 2}, settings={})
    for target, client, rps, statuses in (
        ("echo", "sira-loadtest", 1000.0, {"OK": 10}),
        ("Assign", "sira-loadtest", 250.0, {"OK": 10}),
        ("Track", "sira-loadtest", 300.0, {"Unimplemented": 10}),
        ("echo", "h2load", 2000.0, {"OK": 10}),
        ("Assign", "h2load", 1000.0, {"OK": 9, "Unavailable": 1}),
    ):
        calls = sum(statuses.values())
        result.measurements.append(Measurement(target, client, "w", calls, rps, 1, 2, 3, statuses))
    body = render_markdown(result)
    assert "sira-loadtest: Assign/echo = 0.25; Track/echo n/a (100.0% not OK, mostly Unimpl" in body
    assert "h2load: Assign/echo = 0.50 (10.0% not OK, mostly Unavailable); Track/echo not" in body
    replace_section(path, body)
    replace_section(path, body)  # idempotent
    text = path.read_text()
    assert "old numbers" not in text
    assert text.count(SECTION_START) == 1
    assert text.count(SECTION_END) == 1
    assert "kernel numbers" in text
    assert "## Later\n\nkept" in text
    assert text.index("kernel numbers") < text.index(SECTION_START) < text.index("kept")


def test_bench_section_is_appended_to_a_new_or_unmarked_file(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "benchmarks.md"
    replace_section(path, "body\n")
    assert path.read_text() == f"# Benchmarks\n\n{SECTION_START}\nbody\n{SECTION_END}\n"


def test_status_names_follow_go() -> None:
    from sira_loadtest.runner import status_name

    assert status_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert status_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DeadlineExceeded"
    assert status_name(grpc.StatusCode.UNIMPLEMENTED) == "Unimplemented"


async def test_bench_echo_only_writes_markdown_and_json(tmp_path: Path) -> None:
    from sira_loadtest.bench import main as bench_main

    markdown, results = tmp_path / "benchmarks.md", tmp_path / "bench.json"
    markdown.write_text("# Benchmarks\n\n## Kernels\n\nkept\n")
    argv = ["-z", "1s", "--warmup", "0", "-c", "4", "--no-h2load", "--echo-only", "--no-kernels"]
    argv += ["--markdown", str(markdown), "--json", str(results)]
    await asyncio.to_thread(bench_main, argv)
    doc = json.loads(results.read_text())
    (echo,) = doc["measurements"]
    assert (echo["target"], echo["client"]) == ("echo", "sira-loadtest")
    assert echo["statuses"] == {"OK": echo["calls"]}
    assert echo["calls"] > 0
    assert doc["machine"]["cores"] >= 1
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\n## Kernels\n\nkept\n")
    assert SECTION_START in text
    assert "| echo | sira-loadtest |" in text


def test_failure_summary_keeps_the_first_line_and_the_last_exception() -> None:
    from sira_loadtest.bench import summarize_failure

    log = "-m sira_server exited early:\nTraceback (most recent call last):\n  File x\n"
    log += "TypeError: __init__() missing 1 required positional argument\nINFO: exiting\n"
    assert summarize_failure(log) == (
        "-m sira_server exited early: ... "
        "TypeError: __init__() missing 1 required positional argument"
    )
    assert summarize_failure("") == "no output"


# --- targets, kernels, GetInsights and worker runs of the bench -----------------------


def _bench_result(*runs: tuple[str, str, float, float, dict[str, int]]) -> BenchResult:
    result = BenchResult(date="today", machine={"cpu": "x", "cores": 2}, settings={})
    result.settings["concurrency"] = 64
    for target, client, rps, p95_ms, statuses in runs:
        calls = sum(statuses.values())
        p95 = int(p95_ms * 1e6)
        result.measurements.append(
            Measurement(target, client, "w", calls, rps, p95 // 2, p95, p95 * 2, statuses)
        )
    return result


def test_target_checks_say_met_or_missed() -> None:
    result = _bench_result(
        ("echo", "sira-loadtest", 1000.0, 20.0, {"OK": 10}),
        ("Assign", "sira-loadtest", 600.0, 5.0, {"OK": 10}),
        ("Track", "sira-loadtest", 400.0, 50.0, {"OK": 9, "Unavailable": 1}),
        ("Assign, 2 workers", "sira-loadtest", 700.0, 150.0, {"OK": 10}),
        ("GetInsights", "sira-loadtest", 2000.0, 4.0, {"OK": 10}),
        ("echo", "h2load", 2000.0, 10.0, {"OK": 10}),
        ("Track", "h2load", 500.0, 12.0, {"Unimplemented": 10}),
    )
    checks = {c.what: c for c in target_checks(result)}
    assert checks["Assign/echo throughput, sira-loadtest"].verdict == "met"
    assert checks["Assign/echo throughput, sira-loadtest"].measured == "0.600"
    assert checks["Track/echo throughput, sira-loadtest"].verdict == "missed"
    assert "10.0% not OK" in checks["Track/echo throughput, sira-loadtest"].caveat
    workers = checks["Assign, 2 workers/echo throughput, sira-loadtest"]
    assert (workers.verdict, workers.caveat) == ("met", "echo is one process")
    assert checks["Assign p95 at 64 in flight, sira-loadtest"].verdict.startswith("met (aim")
    assert checks["Track p95 at 64 in flight, sira-loadtest"].verdict == ("met; aim < 10 ms missed")
    assert checks["Assign, 2 workers p95 at 64 in flight, sira-loadtest"].verdict == "missed"
    assert checks["GetInsights p95, sira-loadtest"].verdict == "met"
    assert checks["Track/echo throughput, h2load"].verdict == "n/a"
    assert checks["Track p95 at 64 in flight, h2load"].verdict == "n/a"
    assert "Assign/echo throughput, h2load" not in checks  # not measured: no row
    body = render_markdown(result)
    assert "| GetInsights p95, sira-loadtest | 4.00 ms | < 5 ms | met | - |" in body
    assert "Assign, 2 workers/echo = 0.70" in body
    assert "needs roughly 6400 calls/s or more" in body  # Little's law at 64 in flight
    doc = result.to_json()
    assert doc["ratios"]["Assign, 2 workers/echo sira-loadtest"]["ratio"] == 0.7
    assert {c["what"] for c in doc["targets"]} == set(checks)


def test_slow_insights_miss_their_target() -> None:
    result = _bench_result(("GetInsights", "sira-loadtest", 100.0, 7.5, {"OK": 10}))
    (check,) = target_checks(result)
    assert (check.measured, check.verdict) == ("7.50 ms", "missed")


def _kernel_results(mc_ms: float, thompson_us: float) -> KernelResults:
    results = KernelResults("today", {"cpu": "x", "cores": 2}, 5, 10, 100_000, 0.1, "0.1 0.2 0.3")
    results.figures += [
        KernelFigure("monte_carlo", "MC", mc_ms, mc_ms * 0.9, "ms", MONTE_CARLO_TARGET_MS),
        KernelFigure("thompson", "TS", thompson_us, thompson_us, "µs", THOMPSON_TARGET_US),
        KernelFigure("insights", "GI", 45.0, 44.0, "ms"),
    ]
    return results


def test_kernel_section_states_targets_and_keeps_the_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Benchmarks\n\n{SECTION_START}\ndecisions\n{SECTION_END}\n")
    write_kernels_section(path, _kernel_results(25.0, 3.5))
    write_kernels_section(path, _kernel_results(41.0, 0.7))  # replaces, never appends
    text = path.read_text()
    assert text.count(KERNELS_START) == 1
    assert f"{SECTION_START}\ndecisions\n{SECTION_END}" in text
    assert "| MC | 41.000 ms | 36.900 ms | < 40 ms | missed |" in text
    assert "| TS | 0.700 µs | 0.700 µs | < 2 µs | met |" in text
    assert "| GI | 45.000 ms | 44.000 ms | - | - |" in text
    assert "about 9 % of a core" in text  # 45 ms every 0.5 s
    assert "Load average at the start: 0.1 0.2 0.3" in text


def test_measure_kernels_applies_targets_only_at_the_reference_size() -> None:
    results = measure_kernels(runs=1, arms=10, draws=2_000)
    keys = [f.key for f in results.figures]
    assert keys == ["monte_carlo", "thompson", "insights", "numpy_beta", "our_beta"]
    figures = {f.key: f for f in results.figures}
    assert figures["monte_carlo"].target is None  # 2,000 draws is not the 100k reference
    assert figures["thompson"].target == THOMPSON_TARGET_US
    assert all(f.median > 0 and f.best <= f.median for f in results.figures)


def test_bench_runs_the_kernels_into_the_report(tmp_path: Path) -> None:
    from sira_loadtest.bench import run_kernels

    path = tmp_path / "benchmarks.md"
    assert run_kernels(path, ["--runs", "1", "--draws", "1000"]) is None
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert KERNELS_START in text
    assert KERNELS_END in text
    assert "| Thompson decision over 10 arms |" in text
    problem = run_kernels(path, ["--runs", "0"])
    assert problem is not None
    assert problem.startswith("kernel microbenchmarks failed")


def test_bench_flags_for_kernels_insights_and_workers() -> None:
    from sira_loadtest.bench import BenchOptions, parse_args

    assert parse_args([]) == BenchOptions()
    options = parse_args(
        ["--no-kernels", "--no-insights", "--insights-concurrency", "4", "--sira-workers", "3"]
    )
    assert (options.kernels, options.insights) == (False, False)
    assert (options.insights_concurrency, options.sira_workers) == (4, 3)
    with pytest.raises(SystemExit):
        parse_args(["--sira-workers", "0"])


async def test_insights_seed_and_load_through_the_real_server(
    sira_server: Any, token_for: Any, unique_key: str
) -> None:
    from sira_loadtest.bench import (
        INSIGHTS_METHOD,
        INSIGHTS_VARIANTS,
        seed_experiment,
        seed_traffic,
    )

    address = sira_server.address
    await seed_experiment(address, token_for("ops_admin"), unique_key, INSIGHTS_VARIANTS)
    pay = (("authorization", f"Bearer {token_for('pay_module')}"),)
    assigned, assign_statuses, track_statuses = await seed_traffic(address, unique_key, pay, 1000)
    assert assign_statuses == {"OK": 1000}
    assert len(assigned) == 1000
    assert set(track_statuses) == {"OK"}
    assert 50 < track_statuses["OK"] < 300  # 8 % to 21.5 % of 1000 subjects
    reader = (("authorization", f"Bearer {token_for('data_science')}"),)
    config = LoadConfig(
        target=address,
        call=INSIGHTS_METHOD,
        data=json.dumps({"experiment": unique_key}),
        metadata=reader,
        concurrency=4,
        total=40,
    )
    report = await run_load(config)
    assert report.status_code_distribution == {"OK": 40}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = insights_service_pb2_grpc.InsightsServiceStub(channel)
        response = await stub.GetInsights(
            insights_service_pb2.GetInsightsRequest(experiment=unique_key), metadata=reader
        )
    assert len(response.insights) == len(INSIGHTS_VARIANTS)
    assert all(v.samples > 0 for v in response.insights)
    assert sum(v.conversions for v in response.insights) > 0


def test_tree_ticks_sum_a_process_and_its_descendants_only() -> None:
    from sira_loadtest.bench import tree_ticks

    table = {1: (0, 1000), 10: (1, 5), 11: (10, 7), 12: (11, 11), 20: (1, 100), 30: (1, 3)}
    assert tree_ticks(table, {10}) == 5 + 7 + 11
    assert tree_ticks(table, {10, 30, 99}) == 5 + 7 + 11 + 3  # 99 exited: nothing
    assert tree_ticks(table, {11, 12}) == 7 + 11  # counted once


def test_other_load_is_measured_in_cores() -> None:
    from sira_loadtest.bench import OtherLoad

    watch = OtherLoad()
    assert watch.stop() is None  # never started
    watch.start()
    other = watch.stop()
    assert other is not None
    assert other >= 0.0


def test_disturbed_runs_are_flagged() -> None:
    result = _bench_result(("echo", "h2load", 1000.0, 5.0, {"OK": 10}))
    result.measurements[0] = replace(result.measurements[0], other_cores=0.75)
    body = render_markdown(result)
    assert "| OK 10 | 0.75 |" in body
    assert "- echo (h2load): other processes used 0.75 cores during this run" in body
