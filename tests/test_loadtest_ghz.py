"""sira-loadtest at ghz parity: data files, stop modes, schedules, outputs, descriptors.

Everything runs against real gRPC servers on loopback: a small recording server
defined here (it keeps the bytes it receives, or answers slowly on purpose) and
the real sira-server (reflection, health, Assign). No assertion is about speed:
slow handlers only give lower bounds (a call cannot answer before its handler).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from sira.experiments.v1 import assignment_service_pb2
from sira_loadtest.__main__ import main as cli_main
from sira_loadtest.config import ConfigError, LoadConfig
from sira_loadtest.descriptors import from_proto, from_protoset, from_reflection, method_input
from sira_loadtest.runner import CLOSING_ERROR, resolve_descriptors, run_load
from sira_loadtest.schedules import Schedule

SERVICE = "loadtest.test.Recorder"
RECORD = f"/{SERVICE}/Record"
PROTO = """syntax = "proto3";
package loadtest.test;
import "google/protobuf/timestamp.proto";
message Ping { string name = 1; int64 n = 2; google.protobuf.Timestamp at = 3; }
message Pong {}
service Recorder {
  rpc Record(Ping) returns (Pong);
  rpc Block(Ping) returns (Pong);
  rpc Slow(Ping) returns (Pong);
  rpc StallFirst(Ping) returns (Pong);
}
"""
# ghz's JSON report (runner/reporter.go) and its per-call details.
GHZ_REPORT_KEYS = {
    "name",
    "endReason",
    "options",
    "date",
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
    "details",
}
GHZ_OPTION_KEYS = {
    "host",
    "proto",
    "protoset",
    "import-paths",
    "call",
    "cacert",
    "cert",
    "key",
    "skipTLS",
    "skipFirst",
    "cname",
    "authority",
    "insecure",
    "total",
    "concurrency",
    "rps",
    "connections",
    "duration",
    "timeout",
    "dial-timeout",
    "keepalive",
    "data",
    "binary",
    "metadata",
    "CPUs",
    "name",
}


@dataclass
class Recorder:
    address: str
    received: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    stall_first: list[bool] = field(default_factory=lambda: [True])


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    server = grpc.aio.server()
    rec = Recorder("")
    never = asyncio.Event()

    async def record(request: bytes, context: Any) -> bytes:
        rec.received.append(request)
        rec.headers.append({k: v for k, v in context.invocation_metadata()})
        return b""

    async def block(request: bytes, context: Any) -> bytes:
        await never.wait()
        return b""

    async def slow(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(1.5)
        return b""

    async def stall_first(request: bytes, context: Any) -> bytes:
        if rec.stall_first.pop() if rec.stall_first else False:
            await asyncio.sleep(0.5)
        return b""

    handlers = {
        "Record": record,
        "Block": block,
        "Slow": slow,
        "StallFirst": stall_first,
    }
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {k: grpc.unary_unary_rpc_method_handler(v) for k, v in handlers.items()},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rec.address = f"127.0.0.1:{port}"
    yield rec
    await server.stop(0)


@pytest.fixture
def proto_file(tmp_path: Path) -> Path:
    path = tmp_path / "protos" / "recorder.proto"
    path.parent.mkdir()
    path.write_text(PROTO)
    return path


def _decode(proto: Path, blobs: list[bytes]) -> list[Any]:
    cls = method_input(from_proto(str(proto), ()), RECORD)
    return [cls.FromString(b) for b in blobs]


async def _cli(argv: list[str]) -> None:
    await asyncio.to_thread(cli_main, argv)


# --- data -------------------------------------------------------------------------------


async def test_a_json_array_is_sent_round_robin(
    recorder: Recorder, proto_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.json"  # the same file ghz takes with -D
    data.write_text(json.dumps([{"name": "a", "n": 1}, {"name": "b", "n": 2}, {"name": "c"}]))
    out = tmp_path / "report.json"
    argv = ["--proto", str(proto_file), "--call", "loadtest.test.Recorder.Record"]
    argv += ["-D", str(data), "-n", "9", "-c", "3", "-O", "json", "-o", str(out)]
    await _cli([*argv, recorder.address])
    names = sorted(p.name for p in _decode(proto_file, recorder.received))
    assert names == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert json.loads(out.read_text())["statusCodeDistribution"] == {"OK": 9}


async def test_templates_inside_an_array_render_per_call(
    recorder: Recorder, proto_file: Path
) -> None:
    config = LoadConfig(
        target=recorder.address,
        call=RECORD,
        proto=str(proto_file),
        data='[{"name": "x{{.RequestNumber}}", "n": {{.RequestNumber}}}, {"name": "y"}]',
        total=4,
        concurrency=1,
    )
    report = await run_load(config)
    assert report.status_code_distribution == {"OK": 4}
    pings = _decode(proto_file, recorder.received)
    assert sorted((p.name, p.n) for p in pings) == [("x0", 0), ("x2", 2), ("y", 0), ("y", 0)]


async def test_protoset_with_data_from_stdin(
    recorder: Recorder, proto_file: Path, tmp_path: Path
) -> None:
    protoset = tmp_path / "bundle.protoset"  # as in ghz's docs: protoc --descriptor_set_out
    compiled = await asyncio.to_thread(from_proto, str(proto_file), ())
    protoset.write_bytes(compiled)
    assert from_protoset([str(protoset)]) == compiled
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sira_loadtest",
        "--protoset",
        str(protoset),
        "--call",
        "loadtest.test.Recorder/Record",
        "-d",
        "@",
        "-n",
        "5",
        "-c",
        "1",
        "-O",
        "csv",
        recorder.address,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(b'{"name": "from-stdin", "at": "2026-01-02T03:04:05Z"}')
    assert process.returncode == 0, err.decode()
    pings = _decode(proto_file, recorder.received)
    assert [p.name for p in pings] == ["from-stdin"] * 5
    assert pings[0].at.seconds > 0
    lines = out.decode().splitlines()
    assert lines[0] == "duration (ms),status,error"  # ghz's CSV header
    assert len(lines) == 6
    assert all(line.split(",")[1] == "OK" for line in lines[1:])


async def test_binary_file_is_sent_as_is(
    recorder: Recorder, proto_file: Path, tmp_path: Path
) -> None:
    cls = method_input(from_proto(str(proto_file), ()), RECORD)
    body = cls(name="binary", n=7).SerializeToString()
    (tmp_path / "ping.bin").write_bytes(body)
    await _cli(["--call", RECORD, "-B", str(tmp_path / "ping.bin"), "-n", "3", recorder.address])
    assert recorder.received == [body] * 3


async def test_an_unknown_field_is_rejected_before_the_run(
    recorder: Recorder, proto_file: Path
) -> None:
    with pytest.raises(SystemExit, match=r"does not fit loadtest\.test\.Ping"):
        await _cli(
            ["--proto", str(proto_file), "--call", RECORD, "-d", '{"nope": 1}', recorder.address]
        )
    assert recorder.received == []


async def test_metadata_from_a_file_renders_templates_and_tags_reach_the_report(
    recorder: Recorder, tmp_path: Path
) -> None:
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"x-request": "r{{.RequestNumber}}", "x-fixed": "yes"}))
    out = tmp_path / "report.json"
    argv = ["--call", RECORD, "-M", str(metadata), "-n", "5", "-c", "2"]
    argv += ["--tags", '{"Env": "ci"}', "-O", "pretty", "-o", str(out), recorder.address]
    await _cli(argv)
    assert sorted(h["x-request"] for h in recorder.headers) == [f"r{i}" for i in range(5)]
    assert {h["x-fixed"] for h in recorder.headers} == {"yes"}
    assert json.loads(out.read_text())["tags"] == {"Env": "ci"}


# --- stop modes, skipFirst, count-errors ---------------------------------------------------


@pytest.mark.parametrize("mode", ["close", "ignore"])
async def test_duration_stop_close_counts_in_flight_calls_and_ignore_drops_them(
    recorder: Recorder, mode: str
) -> None:
    config = LoadConfig(
        target=recorder.address,
        call=f"/{SERVICE}/Block",
        concurrency=3,
        duration=0.5,
        duration_stop=mode,
    )
    report = await run_load(config)
    assert report.end_reason == "timeout"
    if mode == "close":
        assert report.status_code_distribution == {"Canceled": 3}
        assert report.error_distribution == {CLOSING_ERROR: 3}
    else:
        assert report.count == 0


async def test_duration_stop_wait_lets_calls_in_flight_finish(recorder: Recorder) -> None:
    config = LoadConfig(
        target=recorder.address,
        call=f"/{SERVICE}/Slow",
        concurrency=2,
        duration=0.3,
        duration_stop="wait",
    )
    report = await run_load(config)
    assert report.status_code_distribution == {"OK": 2}
    assert report.fastest_ns >= 1_500_000_000  # the handler's own sleep
    assert report.end_reason == "timeout"


async def test_max_duration_stops_a_count_run(recorder: Recorder) -> None:
    config = LoadConfig(
        target=recorder.address,
        call=f"/{SERVICE}/Block",
        concurrency=2,
        total=1000,
        max_duration=0.5,
    )
    report = await run_load(config)
    assert report.end_reason == "timeout"
    assert report.status_code_distribution == {"Canceled": 2}


async def test_skip_first_and_count_errors(recorder: Recorder) -> None:
    report = await run_load(
        LoadConfig(target=recorder.address, call=RECORD, total=30, concurrency=2, skip_first=10)
    )
    assert report.count == 20
    assert len(recorder.received) == 30
    missing = f"/{SERVICE}/Missing"
    plain = await run_load(LoadConfig(target=recorder.address, call=missing, total=10))
    assert plain.status_code_distribution == {"Unimplemented": 10}
    assert plain.latency_distribution == []
    assert plain.histogram == []
    counted = await run_load(
        LoadConfig(target=recorder.address, call=missing, total=10, count_errors=True)
    )
    assert counted.status_code_distribution == {"Unimplemented": 10}
    assert len(counted.latency_distribution) == 8
    assert sum(b.count for b in counted.histogram) == 10
    assert counted.fastest_ns > 0


# --- schedules and open-loop latency --------------------------------------------------------


async def test_load_schedule_sets_the_intended_send_times(recorder: Recorder) -> None:
    # ghz's step example, scaled down: 50/s, +50/s every 0.2 s, up to 150/s.
    load = Schedule("step", start=50, step=50, end=150, step_duration=0.2)
    config = LoadConfig(target=recorder.address, call=RECORD, total=60, concurrency=4, load=load)
    report = await run_load(config)
    assert report.status_code_distribution == {"OK": 60}
    starts = sorted(row[0] for row in report.details.rows())
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(starts)]
    assert gaps[:10] == pytest.approx([1 / 50] * 10, abs=1e-6)
    assert gaps[10:30] == pytest.approx([1 / 100] * 20, abs=1e-6)
    assert gaps[30:] == pytest.approx([1 / 150] * 29, abs=1e-6)


async def test_concurrency_schedule_only_uses_scheduled_slots(
    recorder: Recorder, proto_file: Path
) -> None:
    config = LoadConfig(
        target=recorder.address,
        call=RECORD,
        proto=str(proto_file),
        data='{"name": "{{.WorkerID}}"}',
        concurrency_schedule=Schedule("step", start=1, step=1, end=3, step_duration=0.2),
        duration=0.8,
        duration_stop="wait",
    )
    report = await run_load(config)
    assert report.count == len(recorder.received) > 0
    slots = {p.name for p in _decode(proto_file, recorder.received)}
    assert "w0c0" in slots
    assert slots <= {"w0c0", "w0c1", "w0c2"}


async def test_open_loop_latency_counts_the_wait_behind_a_stall(recorder: Recorder) -> None:
    """wrk2's point: with -c 1 and one 0.5 s stall, a closed loop sees one slow call,
    the open loop charges every call that was due during the stall."""
    slow_ns = 250_000_000
    stall = f"/{SERVICE}/StallFirst"
    closed = await run_load(
        LoadConfig(target=recorder.address, call=stall, total=30, concurrency=1)
    )
    recorder.stall_first = [True]
    opened = await run_load(
        LoadConfig(target=recorder.address, call=stall, total=30, concurrency=1, rps=100)
    )
    slow_closed = sum(ns >= slow_ns for _, ns, _, _ in closed.details.rows())
    slow_open = sum(ns >= slow_ns for _, ns, _, _ in opened.details.rows())
    # Calls 0..25 were due at 10 ms intervals, all before the stall ended at >= 0.5 s.
    assert slow_open >= 20
    assert slow_closed < slow_open
    p90 = opened.latency_ns(90)
    assert p90 is not None
    assert p90 >= slow_ns


# --- outputs ---------------------------------------------------------------------------------


async def test_html_is_one_self_contained_page(recorder: Recorder, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    await _cli(
        ["--call", RECORD, "-n", "40", "-c", "4", "-O", "html", "-o", str(out), recorder.address]
    )
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page
    assert "latency histogram" in page
    assert page.count("<rect") == 11  # ghz's 11 histogram marks
    lowered = page.lower()
    for external in ("<script", "src=", "<link", "@import", "url("):
        assert external not in lowered


# --- the real SIRA server: reflection, health, ghz's JSON ----------------------------------


async def test_health_check_through_reflection_alone(sira_server: Any) -> None:
    config = LoadConfig(
        target=sira_server.address, call="/grpc.health.v1.Health/Check", data='{"service": ""}'
    )
    descriptor_set = await resolve_descriptors(config)
    cls = method_input(descriptor_set, "/grpc.health.v1.Health/Check")
    assert cls.DESCRIPTOR.full_name == "grpc.health.v1.HealthCheckRequest"
    report = await run_load(replace_total(config, 20))
    assert report.status_code_distribution == {"OK": 20}


async def test_reflection_is_tried_in_both_versions_and_its_absence_is_explained(
    recorder: Recorder, sira_server: Any
) -> None:
    async with grpc.aio.insecure_channel(recorder.address) as channel:
        with pytest.raises(ConfigError, match="no reflection service: pass --proto"):
            await from_reflection(channel, RECORD)
    # SIRA serves v1alpha (v1 too once added): either way the service's file is found,
    # several times in a row (grpc/grpc#36066 made the v1 miss flaky).
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        for _ in range(5):
            found = await from_reflection(channel, "/sira.experiments.v1.TrackingService/Track")
            assert method_input(found, "/sira.experiments.v1.TrackingService/Track")
    with pytest.raises(ConfigError, match="has no method 'Nope'"):
        method_input(found, "/sira.experiments.v1.TrackingService/Nope")


def replace_total(config: LoadConfig, total: int) -> LoadConfig:
    from dataclasses import replace

    return replace(config, total=total, concurrency=4)


async def test_ghz_data_and_metadata_files_against_assign(
    sira_server: Any, token_for: Any, unique_key: str, tmp_path: Path
) -> None:
    from sira_loadtest.bench import seed_experiment

    await seed_experiment(sira_server.address, token_for("ops_admin"), unique_key)
    data = tmp_path / "assign.json"
    data.write_text(
        json.dumps([{"experiment": unique_key, "subject_id": f"ghz-{i}"} for i in range(4)])
    )
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"authorization": f"Bearer {token_for('pay_module')}"}))
    out = tmp_path / "report.json"
    await _cli(
        [
            "--call",
            "sira.experiments.v1.AssignmentService/Assign",
            "-D",
            str(data),
            "-M",
            str(metadata),
            "-n",
            "12",
            "-c",
            "2",
            "-O",
            "json",
            "-o",
            str(out),
            sira_server.address,
        ]
    )
    doc = json.loads(out.read_text())
    assert doc.keys() >= GHZ_REPORT_KEYS
    assert doc["options"].keys() >= GHZ_OPTION_KEYS
    assert doc["options"]["metadata"] == {"authorization": "***"}
    assert doc["statusCodeDistribution"] == {"OK": 12}
    assert len(doc["details"]) == 12
    assert {tuple(sorted(d)) for d in doc["details"]} == {
        ("error", "latency", "status", "timestamp")
    }
    assert [d["percentage"] for d in doc["latencyDistribution"]][:7] == [10, 25, 50, 75, 90, 95, 99]
    # The four subjects were each assigned (sticky: 3 calls each, one assignment).
    request = assignment_service_pb2.AssignRequest(experiment=unique_key, subject_id="ghz-0")
    async with grpc.aio.insecure_channel(sira_server.address) as channel:
        assign = channel.unary_unary(
            "/sira.experiments.v1.AssignmentService/Assign",
            request_serializer=assignment_service_pb2.AssignRequest.SerializeToString,
            response_deserializer=assignment_service_pb2.AssignResponse.FromString,
        )
        response = await assign(
            request, metadata=(("authorization", f"Bearer {token_for('pay_module')}"),)
        )
    assert response.decision.variant.key
