"""ghz's load (RPS) and concurrency schedules, as pure functions of elapsed time.

A schedule's value `t` seconds into the run:

- const: `start`;
- step: `start + step * floor(t / step_duration)`;
- line: the same with `step_duration` = 1 s (ghz's linear pacer is a 1 s step pacer).

The value stops changing once it reaches `end` (when `end` > 0) or once
`max_duration` has elapsed (when > 0), and then holds; it never goes below 0.
`SendClock` turns a load schedule into the intended send time of every call
(open loop: the times do not depend on when answers come back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("const", "step", "line")
_EPSILON = 1e-9


class ScheduleError(ValueError):
    """A schedule's flags do not describe a usable schedule; the message names them."""


@dataclass(frozen=True)
class Schedule:
    kind: str = "const"
    """const, step or line."""
    start: float = 0.0
    step: float = 0.0
    """Change per step (step) or per second (line); may be negative."""
    end: float = 0.0
    """Value at which the schedule stops changing; 0: none."""
    step_duration: float = 0.0
    """Seconds per step (step only)."""
    max_duration: float = 0.0
    """Seconds after which the schedule stops changing; 0: none."""

    @property
    def period(self) -> float:
        return 1.0 if self.kind == "line" else self.step_duration

    def validate(self, flag: str) -> None:
        """Raise ScheduleError naming `--{flag}-...` when the schedule makes no sense."""
        if self.kind not in KINDS:
            raise ScheduleError(f"--{flag}-schedule must be one of {', '.join(KINDS)}")
        if self.kind == "const":
            return
        if self.start < 0 or self.end < 0 or self.max_duration < 0:
            raise ScheduleError(f"--{flag}-start/-end/-max-duration must be >= 0")
        if self.step == 0:
            raise ScheduleError(f"--{flag}-schedule={self.kind} needs a non-zero --{flag}-step")
        if self.kind == "step" and self.step_duration <= 0:
            raise ScheduleError(f"--{flag}-schedule=step needs --{flag}-step-duration > 0")
        if self.end > 0 and (self.end - self.start) * self.step < 0:
            raise ScheduleError(f"--{flag}-step moves away from --{flag}-end")

    def value_at(self, elapsed: float) -> float:
        if self.kind == "const":
            return max(self.start, 0.0)
        t = min(elapsed, self.max_duration) if self.max_duration > 0 else elapsed
        value = self.start + self.step * math.floor(max(t, 0.0) / self.period)
        if self.end > 0:
            value = min(value, self.end) if self.step > 0 else max(value, self.end)
        return max(value, 0.0)

    def settles_at(self) -> float:
        """Elapsed seconds from which the value no longer changes (inf: never)."""
        if self.kind == "const":
            return 0.0
        steps = math.inf
        if self.end > 0:
            steps = math.ceil(abs(self.end - self.start) / abs(self.step))
        elif self.step < 0:
            steps = math.ceil(self.start / -self.step)
        settle = steps * self.period
        if self.max_duration > 0:
            settle = min(settle, math.floor(self.max_duration / self.period) * self.period)
        return settle

    def peak(self) -> float:
        """The largest value the schedule ever takes (inf when it grows forever)."""
        if self.kind == "const" or self.step < 0:
            return max(self.start, 0.0)
        settle = self.settles_at()
        return math.inf if math.isinf(settle) else self.value_at(settle)

    def next_change(self, elapsed: float) -> float:
        """Elapsed seconds of the next value change after `elapsed` (inf: none)."""
        if elapsed >= self.settles_at():
            return math.inf
        return (math.floor(elapsed / self.period) + 1) * self.period


class SendClock:
    """Intended send times (perf_counter seconds) of a rate schedule, one after the other.

    Each call is due `1 / rate` after the previous one, at the rate in force at
    the previous time. A rate of 0 pauses until the schedule next changes; a
    rate that has settled at 0 ends the run (`next()` returns None).
    """

    def __init__(self, schedule: Schedule, start: float, share: float = 1.0) -> None:
        self.schedule = schedule
        self.start = start
        self.share = share
        """This process's fraction of the rate (several worker processes split it)."""
        self._next = start

    def next(self) -> float | None:
        at = self._next
        while True:
            # The epsilon keeps float drift (10 x 0.1 < 1.0) from missing a step boundary.
            rate = self.schedule.value_at(at - self.start + _EPSILON) * self.share
            if rate > 0:
                break
            change = self.schedule.next_change(at - self.start)
            if math.isinf(change):
                return None
            at = self.start + change
        self._next = at + 1.0 / rate
        return at
