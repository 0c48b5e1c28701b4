"""ghz's `-O html`: one self-contained page (inline CSS and SVG, no scripts, no fetches).

It shows the summary, the latency histogram as an SVG bar chart, the latency
distribution, and the status and error distributions.
"""

from __future__ import annotations

import json
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sira_loadtest.report import Report

CHART_WIDTH = 640
BAR_HEIGHT = 22
LABEL_WIDTH = 110

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:60rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
svg text{font-size:12px;font-family:monospace}
pre{background:#f5f5f5;padding:.6rem;overflow:auto}
"""


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f'<tr><th>{escape(k)}</th><td class="n">{escape(v)}</td></tr>' for k, v in pairs)


def histogram_svg(report: Report) -> str:
    """The latency histogram as horizontal bars, one per bucket mark (ms)."""
    buckets = report.histogram
    if not buckets:
        return "<p>No latency to show (no call counted).</p>"
    peak = max(b.count for b in buckets) or 1
    span = CHART_WIDTH - LABEL_WIDTH - 80
    height = BAR_HEIGHT * len(buckets) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{CHART_WIDTH}" '
        f'height="{height}" aria-label="latency histogram">'
    ]
    for i, b in enumerate(buckets):
        y = 5 + i * BAR_HEIGHT
        width = round(span * b.count / peak)
        parts.append(
            f'<text x="0" y="{y + 15}">{b.mark * 1e3:.3f} ms</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{width}" height="{BAR_HEIGHT - 6}" '
            f'fill="#3b82f6"><title>{b.count} calls</title></rect>'
            f'<text x="{LABEL_WIDTH + width + 6}" y="{y + 15}">{b.count}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    title = f"sira-loadtest report{': ' + report.name if report.name else ''}"
    summary = [
        ("Count", str(report.count)),
        ("Total", _ms(report.total_ns)),
        ("Slowest", _ms(report.slowest_ns)),
        ("Fastest", _ms(report.fastest_ns)),
        ("Average", _ms(report.average_ns)),
        ("Requests/sec", f"{report.rps:.2f}"),
        ("End reason", report.end_reason),
        ("Date", report.date),
    ]
    latency = [(f"{p:g} %", _ms(ns)) for p, ns in report.latency_distribution]
    statuses = [(k, str(v)) for k, v in sorted(report.status_code_distribution.items())]
    errors = [(k, str(v)) for k, v in sorted(report.error_distribution.items())]
    options = escape(json.dumps(dict(report.options), indent=2, default=str))
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f"<h2>Summary</h2><table>{_rows(summary)}</table>"
        f"<h2>Response time histogram</h2>{histogram_svg(report)}"
        f"<h2>Latency distribution</h2><table>{_rows(latency)}</table>"
        f"<h2>Status code distribution</h2><table>{_rows(statuses)}</table>"
        + (f"<h2>Error distribution</h2><table>{_rows(errors)}</table>" if errors else "")
        + f"<h2>Options</h2><pre>{options}</pre>"
        "</body></html>\n"
    )
