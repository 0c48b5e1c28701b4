"""Where a server's CPU goes: py-spy samples summarised as text tables.

`python -m sira_loadtest.bench_cpu --profile DIR` runs py-spy (`pip install py-spy`;
not a dependency) against the server process during each measured run and keeps
its collapsed stacks (`--format raw`: one line per distinct stack, frames joined by
`;`, then the sample count). `summarize` turns such a file into the two tables a
flame graph shows at a glance: the frames where samples land (self) and the frames
on the stack when they do (total), each as a share of all samples.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_LOCATION = re.compile(r" \((?P<file>[^()]*):\d+\)$")
_SITE = re.compile(r".*/(site-packages|lib/python3\.\d+)/")


def frame_name(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module path)`: lines merged, paths short."""
    match = _LOCATION.search(frame)
    if match is None:
        return frame.strip()
    path = _SITE.sub("", match.group("file"))
    path = re.sub(r".*/(server|loadtest|client)/", "", path)
    return f"{frame[: match.start()].strip()} ({path})"


@dataclass(frozen=True)
class Summary:
    samples: int
    self_counts: Counter[str]
    total_counts: Counter[str]


def summarize(collapsed: str) -> Summary:
    """Self and total sample counts per frame of py-spy's raw (collapsed) output."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            total_counts[frame] += count
    return Summary(samples, self_counts, total_counts)


def _request_path(frames: list[str]) -> bool:
    return any("Guard.unary" in f or "Servicer." in f for f in frames)


_ENTRY_MODULES = frozenset({"sira_server/__main__.py", "sira_server/launcher.py"})
"""Under every sample of the process: they say nothing about where its time goes."""


def _module(frame: str) -> str:
    """The module of a `frame_name`: "f (pkg/mod.py)" -> "pkg/mod.py"."""
    return frame[frame.rfind("(") + 1 : -1]


def _sira_task(frames: list[str]) -> bool:
    return any(
        module.startswith("sira_server/") and module not in _ENTRY_MODULES
        for module in map(_module, frames)
    )


PARTS: tuple[tuple[str, Callable[[list[str]], bool]], ...] = (
    ("SIRA request path (guards, servicer, engine)", _request_path),
    ("write-behind flusher", lambda f: any("store/flusher.py" in x for x in f)),
    ("Redis client tasks (replies, coalesced sends)", lambda f: any("store/" in x for x in f)),
    ("other SIRA background tasks", _sira_task),
    ("gRPC core (Cython under Handle._run)", lambda f: f[-1].startswith("Handle._run")),
    ("gRPC poller thread (native)", lambda f: f[-1].startswith("Thread.run")),
    ("event loop select (waiting)", lambda f: "select" in f[-1]),
    ("asyncio machinery", lambda f: True),
)
"""Where a sample goes, first match wins: a coarse picture next to the frame tables."""


def breakdown(collapsed: str) -> list[tuple[str, float]]:
    """(part, % of samples) per `PARTS`, in that order."""
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += int(count_text)
        part = next(name for name, match in PARTS if match(frames))
        counts[part] += int(count_text)
    return [(name, 100 * counts[name] / max(total, 1)) for name, _ in PARTS]


def breakdown_table(collapsed: str) -> list[str]:
    lines = ["| % of samples | part |", "|---:|---|"]
    lines += [f"| {share:.1f} | {name} |" for name, share in breakdown(collapsed)]
    return [*lines, ""]


def table(summary: Summary, top: int = 15) -> list[str]:
    """Markdown: top frames by self time and by total time, in % of samples."""
    lines = [f"{summary.samples} samples.", ""]
    for title, counts in (("self", summary.self_counts), ("total", summary.total_counts)):
        lines += [f"| % {title} | frame |", "|---:|---|"]
        for frame, count in counts.most_common(top):
            share = 100 * count / max(summary.samples, 1)
            lines.append(f"| {share:.1f} | `{frame.replace('|', '/')}` |")
        lines.append("")
    return lines


def start_py_spy(
    pid: int, output: Path, seconds: float, *, native: bool = False
) -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid` for `seconds` into `output` (raw); None without py-spy.

    Python frames only by default, sampled without pausing the process (grpc's Cython
    shows as the self time of `Handle._run`); `native` adds C frames but must pause the
    process at every sample, and counts idle time in `epoll_wait`."""
    exe = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            *(["--native"] if native else ["--nonblocking"]),
            "--rate",
            "200",
            "--duration",
            str(max(1, round(seconds))),
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
