"""The committed dashboard bundle matches its sources and keeps to the CSP; no Node needed.

Like the stubs drift test: `make dashboard` records the sha256 of the dashboard sources
and the protos in `web/dist/SOURCE_HASH`; a change to either without a rebuild fails here.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from sira_server import rbac
from sira_server.dashboard_bundle import DASHBOARD_DIR, DIST_DIR, HASH_FILE, source_hash


def test_bundle_was_built_from_the_current_sources() -> None:
    assert HASH_FILE.exists(), "no dashboard bundle: run `make dashboard` and commit web/dist"
    assert HASH_FILE.read_text().strip() == source_hash(), (
        "server/dashboard/ or protos/ changed since the bundle was built: "
        "run `make dashboard` and commit server/sira_server/web/dist/"
    )


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_text: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open = tag

    def handle_data(self, data: str) -> None:
        if self._open in ("script", "style") and data.strip():
            self.inline_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        self._open = None


def test_index_html_has_no_inline_code_and_its_assets_exist() -> None:
    parser = _Tags()
    parser.feed((DIST_DIR / "index.html").read_text())
    assert parser.inline_text == [], "inline <script>/<style> would be blocked by the CSP"
    assert not any(tag == "style" for tag, _ in parser.tags)
    assert not any("style" in attrs for _, attrs in parser.tags), "style= attributes: CSP"
    assert not any(name.startswith("on") for _, attrs in parser.tags for name in attrs)
    scripts = [attrs.get("src") for tag, attrs in parser.tags if tag == "script"]
    styles = [
        attrs.get("href")
        for tag, attrs in parser.tags
        if tag == "link" and attrs.get("rel") == "stylesheet"
    ]
    assert scripts, "no script"
    assert all(scripts), "every script is a file"
    for url in [*scripts, *styles]:
        assert url is not None
        assert url.startswith("/assets/")
        assert (DIST_DIR / url.lstrip("/")).is_file(), url


def test_the_pages_role_table_is_the_servers() -> None:
    """The page hides what a role may not do from a copy of rbac.py's table: same table."""
    text = (DASHBOARD_DIR / "src" / "rbac.ts").read_text()
    entry = r'"(/sira\.experiments\.v1\.[A-Za-z]+/[A-Za-z]+)":\s*\[([^\]]*)\]'
    page = {
        method: frozenset(re.findall(r'"([a-z_]+)"', roles))
        for method, roles in re.findall(entry, text)
    }
    server = {
        method: roles
        for method, roles in rbac.METHOD_ROLES.items()
        if "/sira.experiments.v1.LifecycleService/" in method
        or "/sira.experiments.v1.InsightsService/" in method
    }
    assert page == server
