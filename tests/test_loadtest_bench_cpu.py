"""The CPU bench's pieces that need no server: the new scenarios, /proc accounting and
the py-spy summary. (`make bench` runs the whole thing against real servers.)"""

from __future__ import annotations

import os
import random

from sira.experiments.v1 import assignment_service_pb2, tracking_service_pb2
from sira_loadtest.bench_cpu import descendants, group_ticks, process_table
from sira_loadtest.bench_cpu_report import CpuResult, CpuRun, render_markdown, targets, vs_echo
from sira_loadtest.bench_profile import breakdown, frame_name, summarize
from sira_loadtest.config import LoadConfig
from sira_loadtest.scenarios import TRACK_BATCH_EVENTS, TRACK_BATCH_METHOD, build_source
from sira_loadtest.template import IdFactory, RenderContext, returning_subject_id

PREASSIGNED = (("lt-ret-0", "v-a"), ("lt-ret-1", "v-b"))


def _source(scenario: str) -> tuple[LoadConfig, RenderContext]:
    config = LoadConfig(
        target="127.0.0.1:1",
        scenario=scenario,
        experiment="checkout",
        returning_subjects=2,
        preassigned=PREASSIGNED,
    )
    return config, RenderContext("w0c0", random.Random(3), IdFactory("lt-", "run", 0))


def test_assign_new_and_returning_scenarios() -> None:
    config, ctx = _source("assign-new")
    new = build_source(config)
    subjects = {
        assignment_service_pb2.AssignRequest.FromString(new.next_call(ctx)[1]).subject_id
        for _ in range(50)
    }
    assert len(subjects) == 50  # never the same subject twice
    returning = build_source(_source("assign-returning")[0])
    pool = {returning_subject_id("lt-", i) for i in range(2)}
    for _ in range(50):
        request = assignment_service_pb2.AssignRequest.FromString(returning.next_call(ctx)[1])
        assert request.subject_id in pool


def test_track_batch_scenario_sends_unique_events_of_preassigned_subjects() -> None:
    config, ctx = _source("track-batch")
    method, body = build_source(config).next_call(ctx)
    assert method == TRACK_BATCH_METHOD
    events = tracking_service_pb2.TrackBatchRequest.FromString(body).events
    assert len(events) == TRACK_BATCH_EVENTS
    assert len({e.client_event_id for e in events}) == TRACK_BATCH_EVENTS
    assert all((e.subject_id, e.variant_id) in PREASSIGNED for e in events)


def test_group_ticks_sums_process_trees() -> None:
    table = {1: (0, 5), 10: (1, 7), 11: (10, 3), 20: (1, 100), 21: (20, 1)}
    assert descendants(table, 10) == {10, 11}
    assert group_ticks(table, {"a": [10], "b": [20], "none": [], "gone": [99]}) == {
        "a": 10,
        "b": 101,
        "none": 0,
        "gone": 0,
    }


def test_process_table_sees_this_process() -> None:
    parent, ticks = process_table()[os.getpid()]
    assert parent == os.getppid()
    assert ticks >= 0


def _run(stack: str, scenario: str, server: int, redis: int = 0, rnd: int = 0) -> CpuRun:
    return CpuRun(
        stack=stack,
        scenario=scenario,
        calls=100,
        ok=100,
        events=100 * (TRACK_BATCH_EVENTS if scenario.startswith("TrackBatch") else 1),
        seconds=1.0,
        drain_seconds=0.0,
        ticks={"server": server, "redis": redis},
        round=rnd,
    )


def test_ratios_are_taken_within_a_round_and_targets_read_them() -> None:
    settings = {
        "stacks": [
            {"label": "current", "python": __import__("sys").executable, "split_flusher": 0}
        ],
        "duration": 1.0,
        "warmup": 0.0,
        "concurrency": 1,
        "rounds": 2,
        "subjects": 2,
        "loadavg_start": "0 0 0",
    }
    machine = {"cpu": "test", "cores": 2, "python": "3", "grpcio": "1", "protobuf": "1"}
    result = CpuResult("today", machine, settings)
    result.runs += [
        _run("echo", "echo", 10, rnd=0),
        _run("echo", "echo", 20, rnd=1),
        _run("current", "Assign, returning subject", 12, rnd=0),
        _run("current", "Assign, returning subject", 24, rnd=1),
        _run("current", "Track", 10, redis=10, rnd=0),
    ]
    assert vs_echo(result, "current", "Assign, returning subject", lambda r: r.total_us) == 1.2
    checks = {t.what.split(",")[0]: t for t in targets(result)}
    assert checks["Assign returning"].verdict == "met"
    assert checks["Track"].measured == 2.0
    assert checks["Track"].verdict == "met"
    assert checks["Assign new"].verdict == "not measured"
    assert "| Track | current |" in render_markdown(result)


def test_profile_summary_counts_self_and_total_once_per_stack() -> None:
    collapsed = "\n".join(
        [
            "main (/x/site-packages/app/a.py:1);work (/x/site-packages/app/b.py:5) 3",
            "main (/x/site-packages/app/a.py:2);work (/x/site-packages/app/b.py:6);"
            "work (/x/site-packages/app/b.py:9) 1",
            "garbage line",
        ]
    )
    summary = summarize(collapsed)
    assert summary.samples == 4
    assert summary.self_counts["work (app/b.py)"] == 4
    assert summary.total_counts["work (app/b.py)"] == 4  # recursion counted once
    assert summary.total_counts["main (app/a.py)"] == 4
    assert frame_name("f (<frozen runpy>:198)") == "f (<frozen runpy>)"


def test_profile_breakdown_does_not_count_the_entry_frames_as_sira_work() -> None:
    # the stack of sira-server's main thread, as py-spy records it
    server = "/srv/sira/server/sira_server"
    entry = ";".join(
        [
            "_run_module_as_main (<frozen runpy>:198)",
            "_run_code (<frozen runpy>:88)",
            f"<module> ({server}/__main__.py:40)",
            f"main ({server}/__main__.py:35)",
            f"run ({server}/launcher.py:60)",
            f"run_loop ({server}/launcher.py:75)",
            "Runner.run (/usr/lib/python3.11/asyncio/runners.py:118)",
        ]
    )
    handle = "Handle._run (/usr/lib/python3.11/asyncio/events.py:80)"
    collapsed = "\n".join(
        [
            f"{entry};{handle} 6",  # gRPC's Cython work, which py-spy cannot see into
            f"{entry};{handle};Autopilot.run ({server}/engine/autopilot.py:7) 3",
            f"{entry};{handle};Coalescer._send ({server}/store/coalesce.py:7) 1",
        ]
    )
    shares = dict(breakdown(collapsed))
    assert shares["gRPC core (Cython under Handle._run)"] == 60.0
    assert shares["other SIRA background tasks"] == 30.0
    assert shares["Redis client tasks (replies, coalesced sends)"] == 10.0
