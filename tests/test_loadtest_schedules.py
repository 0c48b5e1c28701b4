"""ghz's load and concurrency schedules, and the open-loop send clock (pure functions)."""

from __future__ import annotations

import itertools
import math

import pytest

from sira_loadtest.config import ConfigError, LoadConfig
from sira_loadtest.runner import _Slots
from sira_loadtest.schedules import Schedule, ScheduleError, SendClock


def test_const_holds_its_start() -> None:
    s = Schedule("const", start=50)
    assert [s.value_at(t) for t in (0, 1, 100)] == [50, 50, 50]
    assert s.next_change(0) == math.inf
    assert s.peak() == 50


def test_step_up_to_an_end_then_holds() -> None:
    # ghz docs: --load-start=50 --load-end=150 --load-step=10 --load-step-duration=5s
    s = Schedule("step", start=50, step=10, end=150, step_duration=5)
    assert s.value_at(0) == 50
    assert s.value_at(4.99) == 50
    assert s.value_at(5) == 60
    assert s.value_at(49.9) == 140
    assert s.value_at(50) == 150
    assert s.value_at(500) == 150
    assert s.settles_at() == 50
    assert s.peak() == 150
    assert s.next_change(7) == 10
    assert s.next_change(50) == math.inf


def test_step_down_stops_changing_after_max_duration() -> None:
    # ghz docs: --load-start=200 --load-step=-10 --load-step-duration=5s --load-max-duration=40s
    s = Schedule("step", start=200, step=-10, step_duration=5, max_duration=40)
    assert s.value_at(39.9) == 130
    assert s.value_at(40) == 120
    assert s.value_at(4000) == 120
    assert s.peak() == 200


def test_line_changes_every_second_and_never_goes_negative() -> None:
    s = Schedule("line", start=5, step=5)
    assert [s.value_at(t) for t in (0, 0.5, 1, 2.5)] == [5, 5, 10, 15]
    assert s.peak() == math.inf
    down = Schedule("line", start=3, step=-1)
    assert [down.value_at(t) for t in (0, 1, 2, 3, 9)] == [3, 2, 1, 0, 0]
    assert down.settles_at() == 3


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (Schedule("cubic"), "must be one of"),
        (Schedule("step", start=1, step=0, step_duration=1), "non-zero"),
        (Schedule("step", start=1, step=1), "step-duration"),
        (Schedule("line", start=10, step=1, end=5), "away from"),
    ],
)
def test_bad_schedules_name_the_flag(schedule: Schedule, message: str) -> None:
    with pytest.raises(ScheduleError, match=message) as info:
        schedule.validate("load")
    assert "--load-" in str(info.value)


def test_send_clock_spaces_calls_by_the_rate_in_force() -> None:
    s = Schedule("step", start=10, step=10, end=20, step_duration=1)
    clock = SendClock(s, start=100.0)
    times = [t for _ in range(25) if (t := clock.next()) is not None]
    assert len(times) == 25
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[:10] == pytest.approx([0.1] * 10)  # 10/s during the first second
    assert gaps[10:] == pytest.approx([0.05] * 14)  # then 20/s


def test_send_clock_splits_the_rate_between_processes_and_ends_at_zero() -> None:
    half = SendClock(Schedule("const", start=100), start=0.0, share=0.5)
    assert [half.next() for _ in range(3)] == pytest.approx([0.0, 0.02, 0.04])
    fading = SendClock(Schedule("line", start=2, step=-1), start=0.0)
    sent = []
    while (at := fading.next()) is not None:
        sent.append(at)
    assert sent == pytest.approx([0.0, 0.5, 1.0])  # 2/s, then 1/s, then 0 forever


def test_concurrency_schedule_opens_slots_in_steps() -> None:
    config = LoadConfig(
        target="127.0.0.1:1",
        call="/a.B/C",
        concurrency_schedule=Schedule("step", start=2, step=2, end=6, step_duration=5),
    )
    config.validate()
    slots = _Slots(config, 0, 1)
    assert slots.size == 6
    assert [slots.active(i, 0) for i in range(6)] == [True, True, False, False, False, False]
    assert [slots.active(i, 10) for i in range(6)] == [True] * 6
    two = [_Slots(config, p, 2) for p in (0, 1)]
    assert sum(s.size for s in two) == 6
    assert sum(sum(s.active(i, 0) for i in range(s.size)) for s in two) == 2


def test_an_endless_concurrency_ramp_is_rejected() -> None:
    config = LoadConfig(
        target="127.0.0.1:1", call="/a.B/C", concurrency_schedule=Schedule("line", 1, 1)
    )
    with pytest.raises(ConfigError, match="concurrency-end"):
        config.validate()
