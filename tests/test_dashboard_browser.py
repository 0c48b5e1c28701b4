"""The ops dashboard in a real browser (Debian's chromium driven by Playwright) against a
real `sira-server` on the embedded default: the seed's user flow, steps 1-10.

A marketer signs in through the dev sign-in, creates "Checkout Button Color" through the
form and starts it; the test sends Assign/Track traffic over gRPC and waits for the page's
numbers to match GetInsights; the marketer stops it with green as the winner and reads the
audit trail. A data_science user sees no mutation button; a server validation error shows
next to its field. SIRA_DASHBOARD_SCREENSHOTS=DIR keeps the screenshots (docs/dashboard/).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from sira.experiments.v1 import (
    assignment_service_pb2,
    assignment_service_pb2_grpc,
    insights_service_pb2,
    insights_service_pb2_grpc,
    lifecycle_service_pb2,
    lifecycle_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
)
from sira_server.auth import mint_token, read_dev_secret

T = TypeVar("T")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
READY = re.compile(r"SIRA listening on (\S+)")
DASHBOARD = re.compile(r"dashboard:\s+(http://\S+?)/?\s")
KEY = "checkout-button-color"
# Per-variant conversion chance of the simulated traffic: green wins, as in the seed.
CONVERTS = {"blue-button": 0.10, "green-button": 0.40, "orange-button": 0.05}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
    ),
]
pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) missing")

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Page,
    expect,
    sync_playwright,
)


@dataclass
class EmbeddedSira:
    grpc_address: str
    url: str
    data_dir: Path

    def token(self, role: str, subject: str = "test") -> str:
        secret = read_dev_secret(self.data_dir)
        assert secret is not None
        return mint_token(secret, subject=subject, roles=[role])


@pytest.fixture(scope="module")
def sira() -> Iterator[EmbeddedSira]:
    """`sira-server` as `make run` starts it: embedded Postgres and Redis in its own data
    directory, the development secret, the dashboard on a free loopback port."""
    base = Path(tempfile.mkdtemp(prefix="sira-dashboard-"))
    data_dir = base / "data"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SIRA_")  # nothing of the suite's own configuration
    }
    env.update(
        SIRA_DATA_DIR=str(data_dir),
        SIRA_GRPC_PORT="0",
        SIRA_HTTP_PORT="0",
        SIRA_METRICS_PORT="0",
        SIRA_SHUTDOWN_GRACE_SECONDS="2",
        # A loaded test machine: slow store answers are not what this test is about.
        SIRA_REDIS_TIMEOUT_SECONDS="10",
        SIRA_POSTGRES_TIMEOUT_SECONDS="10",
        SIRA_RATE_LIMITS=",".join(
            f"{role}=1000000/1000000/10000"
            for role in ("ops_admin", "marketing", "data_science", "anonymous")
        ),
    )
    log_path = base / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sira_server"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            text = log_path.read_text(errors="replace")
            ready, dashboard = READY.search(text), DASHBOARD.search(text)
            if ready and dashboard:
                break
            assert process.poll() is None, f"sira-server exited:\n{text}"
            assert time.monotonic() < deadline, f"sira-server not ready:\n{text}"
            time.sleep(0.1)
        yield EmbeddedSira(ready.group(1), dashboard.group(1).rstrip("/"), data_dir)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("SIRA_DASHBOARD_SCREENSHOTS")
    directory = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def channel(sira: EmbeddedSira) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sira.grpc_address) as ch:
        yield ch


def signed_in(
    browser: Browser,
    sira: EmbeddedSira,
    role: str,
    viewport: dict[str, int],
    screenshot: Path | None = None,
) -> tuple[BrowserContext, Page]:
    """A fresh browser context signed in through the dev sign-in as `role`."""
    context = browser.new_context(
        viewport={"width": viewport["width"], "height": viewport["height"]}
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(sira.url + "/")
    page.get_by_label("Role", exact=True).select_option(role)
    if screenshot is not None:
        page.screenshot(path=str(screenshot))
    page.get_by_role("button", name="Sign in with this role").click()
    page.get_by_role("heading", name="Experiments", exact=True).wait_for()
    return context, page


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def with_retry(call: Callable[[], T]) -> T:
    """A call the server asked to retry (store busy, rate limit) is retried, with a deadline."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            retryable = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            if not retryable or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def send_traffic(channel: grpc.Channel, sira: EmbeddedSira, subjects: range) -> None:
    """The Pay module's side: Assign each subject, Track a conversion for some of them."""
    metadata = [("authorization", f"Bearer {sira.token('pay_module', 'pay')}")]
    assign = assignment_service_pb2_grpc.AssignmentServiceStub(channel)
    track = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    for i in subjects:
        subject = f"user-{i}"
        request = assignment_service_pb2.AssignRequest(
            experiment=KEY,
            subject_id=subject,
            context=assignment_service_pb2.SubjectContext(
                country=("SN", "FR")[i % 2], language="fr"
            ),
        )
        decision = with_retry(
            functools.partial(assign.Assign, request, metadata=metadata, timeout=10)
        ).decision
        assert decision.variant.key in CONVERTS, decision
        # Deterministic "random": subject i converts when its fraction is under the rate.
        if (i * 0.6180339887) % 1 < CONVERTS[decision.variant.key]:
            event = tracking_service_pb2.TrackRequest(
                event=tracking_service_pb2.TrackedEvent(
                    experiment=KEY,
                    subject_id=subject,
                    variant_id=decision.variant.id,
                    event_type=tracking_service_pb2.EVENT_TYPE_CONVERSION,
                    value=49.99,
                    currency="XOF",
                    client_event_id=f"conv-{subject}",
                )
            )
            with_retry(functools.partial(track.Track, event, metadata=metadata, timeout=10))


def table_numbers(page: Page) -> dict[str, tuple[str, str, str]]:
    """variant key -> (samples, conversions, rate) as the page shows them."""
    out: dict[str, tuple[str, str, str]] = {}
    for row in page.locator("[data-testid=variants-table] tbody tr").all():
        key = row.get_attribute("data-variant") or ""
        cells = [
            row.locator(f"[data-col={c}]").inner_text() for c in ("samples", "conversions", "rate")
        ]
        out[key] = (cells[0], cells[1], cells[2])
    return out


def insights_numbers(channel: grpc.Channel, sira: EmbeddedSira) -> dict[str, tuple[str, str, str]]:
    stub = insights_service_pb2_grpc.InsightsServiceStub(channel)
    reply = stub.GetInsights(
        insights_service_pb2.GetInsightsRequest(experiment=KEY),
        metadata=[("authorization", f"Bearer {sira.token('data_science')}")],
        timeout=10,
    )
    # The page shows rates as "12.34 %" (two decimals).
    return {
        v.variant_key: (str(v.samples), str(v.conversions), f"{v.conversion_rate * 100:.2f} %")
        for v in reply.insights
    }


def fill_variant(page: Page, n: int, name: str, config: str) -> None:
    page.get_by_label(f"Variant {n} name").fill(name)
    page.get_by_label(f"Variant {n} configuration (JSON object handed to your app)").fill(config)


def test_marketing_creates_starts_watches_and_stops_checkout_button_color(
    browser: Browser, sira: EmbeddedSira, channel: grpc.Channel, shots: Path
) -> None:
    context, page = signed_in(browser, sira, "marketing", DESKTOP, shots / "sign-in.png")

    # Step 3: create through the form.
    page.get_by_role("link", name="New experiment").click()
    page.get_by_label("Name", exact=True).fill("Checkout Button Color")
    page.get_by_label("Key", exact=True).fill(KEY)
    page.get_by_label("Description").fill("Blue (today) against green and orange on checkout.")
    page.get_by_label("Countries").fill("SN, FR")
    page.get_by_label("Languages").fill("fr")
    fill_variant(page, 1, "Blue Button", '{"button_color": "#0A84FF"}')
    fill_variant(page, 2, "Green Button", '{"button_color": "#34C759"')
    # The JSON editor validates as you type.
    expect(page.locator("[data-error-for='variants[1].config']")).to_contain_text("Not valid JSON")
    fill_variant(page, 2, "Green Button", '{"button_color": "#34C759"}')
    expect(page.locator("[data-error-for='variants[1].config']")).to_have_count(0)
    page.get_by_role("button", name="+ Add variant").click()
    fill_variant(page, 3, "Orange Button", '{"button_color": "#FF9500"}')
    page.screenshot(path=str(shots / "create.png"), full_page=True)
    page.get_by_role("button", name="Create draft").click()
    page.wait_for_url(f"**/experiments/{KEY}")
    expect(page.locator("h1 [data-status]")).to_have_attribute("data-status", "draft")
    expect(page.get_by_test_id("audit-trail")).to_be_visible()
    page.screenshot(path=str(shots / "experiment-draft.png"), full_page=True)

    # Step 4: start it, through the confirmation dialog.
    page.get_by_role("button", name="▶ Start").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Start “Checkout Button Color”?")
    dialog.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator("h1 [data-status]")).to_have_attribute("data-status", "running")

    # Steps 6-8: traffic over gRPC; the page (polling every 2 s) catches up with GetInsights.
    send_traffic(channel, sira, range(240))
    # Counts reach the insights a moment after the calls return (hot state, then insights).
    wait_until(
        lambda: sum(int(n) for n, _, _ in insights_numbers(channel, sira).values()) == 240,
        "GetInsights to count the 240 subjects",
    )
    wait_until(lambda: table_numbers(page) == insights_numbers(channel, sira), "the page's numbers")
    leading = page.locator("[data-testid=variants-table] tr", has_text="★ leading")
    expect(leading).to_have_attribute("data-variant", "green-button")
    expect(page.get_by_test_id("recommendation")).to_contain_text("Recommendation")
    send_traffic(
        channel, sira, range(240, 480)
    )  # more traffic: the charts over time get a second point
    wait_until(lambda: table_numbers(page) == insights_numbers(channel, sira), "the update")
    page.screenshot(path=str(shots / "experiment.png"), full_page=True)

    # Step 9-10: stop with green as the winner.
    page.get_by_role("button", name="■ Stop").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Winner (served to everyone from now on)").select_option("green-button")
    dialog.get_by_label("Reason (kept in the audit trail)").fill("Green converts better")
    dialog.get_by_role("button", name="Stop the experiment").click()
    expect(page.locator("h1 [data-status]")).to_have_attribute("data-status", "stopped")
    expect(page.get_by_test_id("outcome")).to_contain_text("Green Button")
    lifecycle = lifecycle_service_pb2_grpc.LifecycleServiceStub(channel)
    stopped = lifecycle.GetExperiment(
        lifecycle_service_pb2.GetExperimentRequest(experiment=KEY),
        metadata=[("authorization", f"Bearer {sira.token('data_science')}")],
        timeout=10,
    ).experiment
    green = next(v for v in stopped.variants if v.key == "green-button")
    assert stopped.winner_variant_id == green.id
    assert stopped.stop_reason == "Green converts better"

    # The audit trail: who did what.
    trail = page.get_by_test_id("audit-trail")
    expect(trail.locator("li[data-action=stopped]")).to_contain_text("dev-marketing")
    actions = trail.locator("li").evaluate_all("els => els.map(e => e.dataset.action)")
    assert actions == ["stopped", "started", "created"]
    page.get_by_test_id("audit-trail").locator("li[data-action=stopped] summary").click()
    expect(trail.locator("li[data-action=stopped] pre")).to_contain_text("Green converts better")
    page.screenshot(path=str(shots / "experiment-stopped.png"), full_page=True)

    page.goto(sira.url + "/")
    row = page.locator(f"tr[data-key={KEY}]")
    expect(row).to_contain_text("Stopped")
    expect(row).to_contain_text("Green Button")
    page.screenshot(path=str(shots / "list.png"))
    context.close()


def test_data_science_sees_no_mutation_buttons(
    browser: Browser, sira: EmbeddedSira, shots: Path
) -> None:
    draft_key = f"ds-{uuid.uuid4().hex[:8]}"
    lifecycle_for_draft(sira, draft_key)
    context, page = signed_in(browser, sira, "data_science", PHONE, shots / "sign-in-phone.png")
    expect(page.locator(f"tr[data-key={draft_key}]")).to_be_visible()
    expect(page.get_by_role("link", name="New experiment")).to_have_count(0)
    page.screenshot(path=str(shots / "list-phone.png"), full_page=True)
    for key in (draft_key, KEY):
        page.goto(f"{sira.url}/experiments/{key}")
        expect(page.get_by_test_id("variants-table")).to_be_visible()
        for name in ("Start", "Stop", "Archive", "Delete", "Edit draft"):
            expect(page.get_by_role("button", name=name)).to_have_count(0)
            expect(page.get_by_role("link", name=name)).to_have_count(0)
    page.goto(f"{sira.url}/experiments/{KEY}")
    expect(page.get_by_test_id("audit-trail")).to_be_visible()
    page.screenshot(path=str(shots / "experiment-phone.png"), full_page=True)
    context.close()


def lifecycle_for_draft(sira: EmbeddedSira, key: str) -> None:
    """A draft (made over gRPC) the data_science user may look at but not start."""
    from google.protobuf import struct_pb2

    from sira.experiments.v1 import experiment_pb2

    with grpc.insecure_channel(sira.grpc_address) as ch:
        lifecycle_service_pb2_grpc.LifecycleServiceStub(ch).CreateExperiment(
            lifecycle_service_pb2.CreateExperimentRequest(
                experiment=experiment_pb2.Experiment(
                    key=key,
                    name="Payment method priority",
                    variants=[
                        experiment_pb2.Variant(
                            name="Wallet first", is_control=True, config=struct_pb2.Struct()
                        ),
                        experiment_pb2.Variant(name="Card first", config=struct_pb2.Struct()),
                    ],
                )
            ),
            metadata=[("authorization", f"Bearer {sira.token('ops_admin', 'alice')}")],
            timeout=10,
        )


def test_a_server_validation_error_shows_next_to_its_field(
    browser: Browser, sira: EmbeddedSira, shots: Path
) -> None:
    context, page = signed_in(browser, sira, "marketing", DESKTOP)
    page.goto(sira.url + "/experiments/new")
    page.get_by_label("Name", exact=True).fill("Checkout Button Color again")
    page.get_by_label("Key", exact=True).fill("Checkout Button!")
    fill_variant(page, 1, "Blue Button", "{}")
    fill_variant(page, 2, "Green Button", "{}")
    page.get_by_role("button", name="Create draft").click()
    error = page.locator("[data-error-for=key]")
    expect(error).to_contain_text("not a valid experiment key")
    key_input = page.get_by_label("Key", exact=True)
    expect(key_input).to_have_attribute("aria-invalid", "true")
    expect(key_input).to_be_focused()
    expect(page.get_by_role("alert").first).to_contain_text("Check the highlighted fields")
    # The error is described to assistive technology by the input itself.
    described = key_input.get_attribute("aria-describedby") or ""
    assert error.get_attribute("id") in described.split()
    page.screenshot(path=str(shots / "create-error.png"))

    # A violation deep inside a field (a config nested too deeply) shows under that field.
    key_input.fill(f"deep-{uuid.uuid4().hex[:8]}")
    fill_variant(page, 2, "Green Button", '{"a":' * 12 + "1" + "}" * 12)
    page.get_by_role("button", name="Create draft").click()
    config_error = page.locator("[data-error-for='variants[1].config']")
    expect(config_error).to_be_visible()
    expect(page.get_by_label("Variant 2 configuration", exact=False)).to_be_focused()
    expect(page.locator("[data-error-for=key]")).to_have_count(0)
    context.close()


def test_a_token_the_server_rejects_leads_back_to_sign_in(
    browser: Browser, sira: EmbeddedSira
) -> None:
    """A well-formed, unexpired token signed with another secret: the page believes it,
    the server answers UNAUTHENTICATED, and the page returns to sign-in saying why."""
    context = browser.new_context(viewport={"width": DESKTOP["width"], "height": 800})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(sira.url + "/sign-in")
    forged = mint_token(
        "not-the-servers-secret-" + "x" * 32, subject="mallory", roles=["ops_admin"]
    )
    page.get_by_label("JWT", exact=False).fill(forged)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_text("no longer valid")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/sign-in$"))
    assert page.evaluate("sessionStorage.getItem('sira.token')") is None
    context.close()


def test_the_keyboard_alone_reaches_the_form(browser: Browser, sira: EmbeddedSira) -> None:
    """Tab order starts with the skip link; Tab and Enter open the creation form."""
    context, page = signed_in(browser, sira, "marketing", DESKTOP)
    page.reload()  # a fresh page: focus starts at the top
    page.get_by_role("heading", name="Experiments", exact=True).wait_for()
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    new = page.get_by_role("link", name="New experiment")
    for _ in range(10):
        page.keyboard.press("Tab")
        if new.evaluate("el => el === document.activeElement"):
            break
    expect(new).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="New experiment")).to_be_visible()
    context.close()
