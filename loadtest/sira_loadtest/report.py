"""Results of a load run: per-worker raw results, their merge, and ghz's report.

The report follows ghz (`runner/reporter.go`): `count` and `average` cover every
call; fastest, slowest, the histogram and the latency distribution cover the
calls that returned OK (every call with `--count-errors`); durations are
nanoseconds in JSON, milliseconds in the summary text. `details` lists every call
(timestamp, latency, status, error), as ghz's JSON and CSV do.
"""

from __future__ import annotations

import csv
import io
import json
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PERCENTILES: tuple[float, ...] = (10, 25, 50, 75, 90, 95, 99, 99.9)
HISTOGRAM_BUCKETS = 10
BAR_WIDTH = 40
MAX_ERROR_KINDS = 100
"""Distinct error strings kept; errors with unique text (request ids) go to OTHER_ERRORS."""
OTHER_ERRORS = "(other errors: more than 100 distinct messages)"
FORMATS: tuple[str, ...] = ("summary", "csv", "json", "pretty", "html")
"""ghz's -O values that sira-loadtest writes."""
MAX_DETAILS = 1_000_000
"""ghz's cap on the per-call details kept for the JSON and CSV reports."""


@dataclass
class WorkerResult:
    """What one worker process measured (picklable; merged by `merge_results`)."""

    count: int = 0
    latency_sum_ns: int = 0
    ok_latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    status_counts: Counter[str] = field(default_factory=Counter)
    error_counts: Counter[str] = field(default_factory=Counter)
    start_ns: int = 0
    """time.monotonic_ns() of the first send (system-wide clock on Linux)."""
    end_ns: int = 0
    """time.monotonic_ns() when the last call finished."""
    end_reason: str = "normal"
    """ghz's stop reasons: normal (count reached), timeout (duration reached)."""
    method_counts: Counter[str] = field(default_factory=Counter)
    skip: int = 0
    """Results still to leave out of the tally (ghz --skipFirst)."""
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    """Every call's latency, in completion order (details, --count-errors)."""
    starts_ns: array[int] = field(default_factory=lambda: array("q"))
    """Wall-clock time (ns since the epoch) each call was due or sent."""
    status_ids: array[int] = field(default_factory=lambda: array("H"))
    error_ids: array[int] = field(default_factory=lambda: array("i"))
    """Index into `labels` of each call's error, -1 for none."""
    labels: list[str] = field(default_factory=list)
    """Status names and error strings the ids point to."""
    _label_ids: dict[str, int] = field(default_factory=dict, repr=False)

    def _label(self, text: str) -> int:
        found = self._label_ids.get(text)
        if found is None:
            if len(self._label_ids) >= MAX_ERROR_KINDS + 20 and text != OTHER_ERRORS:
                return self._label(OTHER_ERRORS)
            found = self._label_ids[text] = len(self.labels)
            self.labels.append(text)
        return found

    def record(
        self, method: str, latency_ns: int, status: str, error: str | None, start_ns: int = 0
    ) -> None:
        if self.skip > 0:
            self.skip -= 1
            return
        if len(self.latencies_ns) < MAX_DETAILS:
            self.latencies_ns.append(latency_ns)
            self.starts_ns.append(start_ns)
            self.status_ids.append(self._label(status))
            self.error_ids.append(-1 if error is None else self._label(error))
        self.count += 1
        self.latency_sum_ns += latency_ns
        self.status_counts[status] += 1
        self.method_counts[method] += 1
        if error is None:
            self.ok_latencies_ns.append(latency_ns)
        else:
            _count_error(self.error_counts, error, 1)


def _count_error(counts: Counter[str], error: str, n: int) -> None:
    if error in counts or len(counts) < MAX_ERROR_KINDS:
        counts[error] += n
    else:
        counts[OTHER_ERRORS] += n


def merge_results(results: Sequence[WorkerResult]) -> WorkerResult:
    """One result as if one process had made every call."""
    merged = WorkerResult()
    started = [r.start_ns for r in results if r.count]
    merged.start_ns = min(started) if started else 0
    merged.end_ns = max((r.end_ns for r in results if r.count), default=0)
    for r in results:
        merged.count += r.count
        merged.latency_sum_ns += r.latency_sum_ns
        merged.ok_latencies_ns.extend(r.ok_latencies_ns)
        merged.status_counts.update(r.status_counts)
        for error, n in r.error_counts.items():
            _count_error(merged.error_counts, error, n)
        merged.method_counts.update(r.method_counts)
        ids = [merged._label(label) for label in r.labels]
        merged.latencies_ns.extend(r.latencies_ns)
        merged.starts_ns.extend(r.starts_ns)
        merged.status_ids.extend(ids[i] for i in r.status_ids)
        merged.error_ids.extend(-1 if i < 0 else ids[i] for i in r.error_ids)
    reasons = {r.end_reason for r in results}
    merged.end_reason = "timeout" if "timeout" in reasons else "normal"
    return merged


def nearest_rank(sorted_values: Sequence[int], percent: float) -> int:
    """ghz's percentile: the value at 0-based rank ceil(p/100 * n) - 1."""
    n = len(sorted_values)
    position = percent / 100.0 * n
    rank = int(position)
    if position == rank:
        rank -= 1
    return sorted_values[max(0, min(rank, n - 1))]


@dataclass(frozen=True)
class Bucket:
    mark: float
    """Upper edge of the bucket in seconds."""
    count: int
    frequency: float


def histogram(sorted_ns: Sequence[int], buckets: int = HISTOGRAM_BUCKETS) -> list[Bucket]:
    """ghz's histogram: `buckets + 1` marks from fastest to slowest, each counts <= mark."""
    if not sorted_ns:
        return []
    fastest, slowest = sorted_ns[0], sorted_ns[-1]
    width = (slowest - fastest) / buckets
    marks = [fastest + width * i for i in range(buckets)] + [float(slowest)]
    counts = [0] * len(marks)
    index = 0
    for value in sorted_ns:
        while value > marks[index] and index < len(marks) - 1:
            index += 1
        counts[index] += 1
    total = len(sorted_ns)
    return [Bucket(m / 1e9, c, c / total) for m, c in zip(marks, counts, strict=True)]


def _percentage(p: float) -> int | float:
    return int(p) if float(p).is_integer() else p


@dataclass(frozen=True)
class Details:
    """Per-call rows of a report (ghz's `details`), kept as compact arrays."""

    latencies_ns: Sequence[int] = ()
    starts_ns: Sequence[int] = ()
    status_ids: Sequence[int] = ()
    error_ids: Sequence[int] = ()
    labels: Sequence[str] = ()

    def rows(self) -> Iterable[tuple[int, int, str, str]]:
        """(start ns since the epoch, latency ns, status, error or "")."""
        labels = self.labels
        for start, latency, status, error in zip(
            self.starts_ns, self.latencies_ns, self.status_ids, self.error_ids, strict=True
        ):
            yield start, latency, labels[status], labels[error] if error >= 0 else ""


def _timestamp(ns: int) -> str:
    """RFC 3339 with nanoseconds, like Go's time.Time in JSON."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


@dataclass(frozen=True)
class Report:
    """ghz's report for one run (`to_json` mirrors ghz's JSON output)."""

    name: str
    end_reason: str
    date: str
    options: Mapping[str, Any]
    count: int
    total_ns: int
    average_ns: int
    fastest_ns: int
    slowest_ns: int
    rps: float
    histogram: list[Bucket]
    latency_distribution: list[tuple[float, int]]
    status_code_distribution: dict[str, int]
    error_distribution: dict[str, int]
    method_distribution: dict[str, int]
    details: Details = field(default_factory=Details)

    @property
    def ok_count(self) -> int:
        return self.status_code_distribution.get("OK", 0)

    def latency_ns(self, percent: float) -> int | None:
        """A latency of the distribution (10, 25, 50, 75, 90, 95, 99, 99.9), if any."""
        return dict(self.latency_distribution).get(percent)

    def to_json(self, *, details: bool = True) -> dict[str, Any]:
        """ghz's JSON report; `details=False` leaves out the per-call rows."""
        doc = {
            "name": self.name,
            "endReason": self.end_reason,
            "date": self.date,
            "options": dict(self.options),
            "count": self.count,
            "total": self.total_ns,
            "average": self.average_ns,
            "fastest": self.fastest_ns,
            "slowest": self.slowest_ns,
            "rps": self.rps,
            "errorDistribution": self.error_distribution,
            "statusCodeDistribution": self.status_code_distribution,
            "latencyDistribution": [
                {"percentage": _percentage(p), "latency": ns} for p, ns in self.latency_distribution
            ],
            "histogram": [
                {"mark": b.mark, "count": b.count, "frequency": b.frequency} for b in self.histogram
            ],
            "methodDistribution": self.method_distribution,
        }
        tags = self.options.get("tags")
        if tags:
            doc["tags"] = dict(tags)
        if details:
            doc["details"] = [
                {"timestamp": _timestamp(start), "latency": ns, "error": error, "status": status}
                for start, ns, status, error in self.details.rows()
            ]
        return doc

    def render(self, fmt: str) -> str:
        """summary (ghz's text), json, pretty (indented JSON), csv or html."""
        if fmt == "json":
            return json.dumps(self.to_json())
        if fmt == "pretty":
            return json.dumps(self.to_json(), indent=2)
        if fmt == "csv":
            return self.csv_text()
        if fmt == "html":
            from sira_loadtest.report_html import render_html

            return render_html(self)
        return self.summary_text()

    def csv_text(self) -> str:
        """ghz's CSV: one row per call, `duration (ms),status,error`."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["duration (ms)", "status", "error"])
        for _, ns, status, error in self.details.rows():
            writer.writerow([f"{ns / 1e6:.2f}", status, error])
        return out.getvalue()

    def summary_text(self) -> str:
        lines = ["", "Summary:"]
        if self.name:
            lines.append(f"  Name:\t\t{self.name}")
        lines += [
            f"  Count:\t{self.count}",
            f"  Total:\t{_ms(self.total_ns)}",
            f"  Slowest:\t{_ms(self.slowest_ns)}",
            f"  Fastest:\t{_ms(self.fastest_ns)}",
            f"  Average:\t{_ms(self.average_ns)}",
            f"  Requests/sec:\t{self.rps:4.2f}",
            "",
            "Response time histogram:",
        ]
        peak = max((b.count for b in self.histogram), default=0)
        for b in self.histogram:
            bar = "∎" * (b.count * BAR_WIDTH // peak if peak else 0)
            lines.append(f"  {b.mark * 1e3:4.3f} [{b.count}]\t|{bar}")
        lines += ["", "Latency distribution:"]
        lines += [f"  {_percentage(p)} % in {_ms(ns)} " for p, ns in self.latency_distribution]
        lines += ["", "Status code distribution:"]
        width = max((len(s) for s in self.status_code_distribution), default=0) + 2
        for status, n in sorted(self.status_code_distribution.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {'[' + status + ']':<{width}}  {n} responses")
        if self.error_distribution:
            lines += ["", "Error distribution:"]
            for error, n in sorted(self.error_distribution.items(), key=lambda kv: -kv[1]):
                lines.append(f"  [{n}]\t{error}")
        return "\n".join(lines) + "\n"


def _ms(ns: int) -> str:
    return f"{ns / 1e6:4.2f} ms"


def build_report(
    result: WorkerResult,
    *,
    name: str = "",
    options: Mapping[str, Any] | None = None,
    percentiles: Iterable[float] = PERCENTILES,
    count_errors: bool = False,
) -> Report:
    """ghz's summary statistics of a (merged) result (errors too with `count_errors`)."""
    ok = sorted(result.latencies_ns if count_errors else result.ok_latencies_ns)
    total_ns = max(0, result.end_ns - result.start_ns)
    return Report(
        name=name,
        end_reason=result.end_reason,
        date=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        options=dict(options or {}),
        count=result.count,
        total_ns=total_ns,
        average_ns=result.latency_sum_ns // result.count if result.count else 0,
        fastest_ns=ok[0] if ok else 0,
        slowest_ns=ok[-1] if ok else 0,
        rps=result.count / (total_ns / 1e9) if total_ns else 0.0,
        histogram=histogram(ok),
        latency_distribution=[(p, nearest_rank(ok, p)) for p in percentiles] if ok else [],
        status_code_distribution=dict(result.status_counts),
        error_distribution=dict(result.error_counts),
        method_distribution=dict(result.method_counts),
        details=Details(
            result.latencies_ns,
            result.starts_ns,
            result.status_ids,
            result.error_ids,
            tuple(result.labels),
        ),
    )
