"""Drive nghttp2's `h2load` as a gRPC client: one fixed, pre-framed request body.

h2load knows HTTP/2, not gRPC: it posts the same body on every stream and
counts HTTP statuses. gRPC answers errors with HTTP 200 and a `grpc-status`
trailer, so h2load counts them as successes; callers check the gRPC status of
the body once with a real client and label the run accordingly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sira_loadtest.report import nearest_rank

_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def h2load_path() -> str | None:
    return shutil.which("h2load")


def h2load_version() -> str | None:
    path = h2load_path()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: flag byte 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class H2loadResult:
    requests: int
    succeeded: int
    failed: int
    errored: int
    seconds: float
    rps: float
    p50_ns: int
    p95_ns: int
    p99_ns: int
    mean_ns: int
    output: str
    """h2load's own summary text."""


def parse_h2load(output: str, log_lines: list[str]) -> H2loadResult:
    """h2load's stdout plus its `--log-file` (start µs, HTTP status, duration µs)."""
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    if finished is None or requests is None:
        raise RuntimeError(f"unexpected h2load output:\n{output}")
    seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    durations = sorted(
        int(parts[2]) * 1000
        for parts in (line.split("\t") for line in log_lines)
        if len(parts) == 3 and parts[1] == "200"
    )

    def pct(p: float) -> int:
        return nearest_rank(durations, p) if durations else 0

    return H2loadResult(
        requests=int(requests.group(1)),
        succeeded=int(requests.group(4)),
        failed=int(requests.group(5)),
        errored=int(requests.group(6)),
        seconds=seconds,
        rps=float(finished.group(3)),
        p50_ns=pct(50),
        p95_ns=pct(95),
        p99_ns=pct(99),
        mean_ns=sum(durations) // len(durations) if durations else 0,
        output=output[output.find("finished in") :].strip() if "finished in" in output else output,
    )


def run_h2load(
    url: str,
    message: bytes,
    *,
    duration: float,
    concurrency: int,
    connections: int = 1,
    headers: Mapping[str, str] | None = None,
) -> H2loadResult:
    """POST `message` (gRPC-framed here) to `url` for `duration` s, `concurrency` streams."""
    path = h2load_path()
    if path is None:
        raise FileNotFoundError("h2load is not on PATH (Debian: apt-get install nghttp2-client)")
    streams = max(1, concurrency // connections)
    all_headers = {"content-type": "application/grpc", "te": "trailers", **(headers or {})}
    with tempfile.TemporaryDirectory(prefix="sira-h2load-") as tmp:
        body, log = Path(tmp) / "body.bin", Path(tmp) / "requests.log"
        body.write_bytes(grpc_frame(message))
        cmd = [
            path,
            f"--duration={max(1, round(duration))}",
            f"--clients={connections}",
            f"--max-concurrent-streams={streams}",
            "--threads=1",
            f"--data={body}",
            f"--log-file={log}",
        ]
        cmd += [f"--header={k}: {v}" for k, v in all_headers.items()]
        cmd.append(url)
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=duration + 60
        )
        if out.returncode != 0:
            raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr or out.stdout}")
        lines = log.read_text().splitlines() if log.exists() else []
    return parse_h2load(out.stdout, lines)
