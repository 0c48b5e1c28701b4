"""ghz-style load generator and benchmark harness for SIRA.

- `sira-loadtest` (`sira_loadtest.__main__`): ghz-compatible flags and report.
- `sira_loadtest.echo`: a do-nothing gRPC server, the throughput ceiling.
- `sira_loadtest.bench` (`make bench`): Assign and Track against echo.

From code: `report = await run_load(LoadConfig(target=..., call=..., total=200))`.
"""

from __future__ import annotations

from sira_loadtest.config import ConfigError, LoadConfig
from sira_loadtest.report import Report
from sira_loadtest.runner import run_load

__all__ = ["ConfigError", "LoadConfig", "Report", "run_load"]
