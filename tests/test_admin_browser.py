"""The operator dashboard (``/admin``) in a real Chromium, against a live server.

Chromium, Playwright and the skip-or-fail rule (``CHAT_BROWSER_REQUIRED=1``)
come with conftest.py's ``page`` fixture. One server serves the module, its
database filled by scripts/generate_chats.py (three weeks, four agent/model
pairs, errors, sixty users) plus real exchanges over the WebSocket made
through the chat page; ``root`` is made an admin with ``users promote``,
``bob`` is not. Every test gets a fresh browser context; a page error or a
Content-Security-Policy report in the console fails it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import pytest

from .helpers import expect, log_in, run_axe, screenshot
from .servers import PASSWORD, ROOT, add_users, clean_env, cli, ok, serving, token, write_config

pytestmark = pytest.mark.slow

GENERATED = ["--messages", "4000", "--users", "60", "--days", "21", "--seed", "7"]
KPIS = ("messages", "users", "error-rate", "latency", "tokens")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("dashboard"))
    subprocess.run([sys.executable, "scripts/generate_chats.py", "--config", str(config),
                    *GENERATED], cwd=ROOT, env=clean_env(), check=True, capture_output=True,
                   timeout=120)
    add_users(config, "root", "bob")
    ok(cli(config, "users", "promote", "root"))
    with serving(config) as server:
        server.tokens = {name: token(config, name) for name in ("root", "bob")}
        yield server


@pytest.fixture(scope="module")
def browser_context_args(live_server) -> dict:
    return {"base_url": live_server.base_url, "locale": "en-US",
            "viewport": {"width": 1280, "height": 900}, "reduced_motion": "reduce"}


def status_of(server, path, user=None) -> int:
    """The status of a GET with ``user``'s token in the cookie, as a browser sends it."""
    headers = {} if user is None else {"Cookie": f"access_token={server.tokens[user]}"}
    return server.get(path, **headers)[0]


def sign_in_at_admin(page, username):
    log_in(page, username, PASSWORD, "/admin")


def chat_once(page, username, text):
    """A real exchange over the WebSocket, through the chat page."""
    page.goto("/")
    page.locator("#username").fill(username)
    page.locator("#password").fill(PASSWORD)
    page.locator("#password").press("Enter")
    expect(page.locator("#status")).to_have_text("Connected")
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")
    expect(page.locator(".msg-assistant .msg-body").last).to_have_text(f"Echo: {text}")


def is_summary(response) -> bool:
    return "/api/admin/analytics/summary" in response.url


def shown_and_api_summary(page, response) -> tuple[dict, dict]:
    """The KPI values the page shows, and the API's summary for the page's own query."""
    assert response.status == 200
    expect(page.locator("#report")).not_to_have_attribute("aria-busy", "true")
    api = page.request.get(response.url).json()["summary"]
    shown = {name: page.locator(f"#kpi-{name}").get_attribute("data-value") for name in KPIS}
    return shown, api


def assert_kpis_match(shown, api):
    assert shown["messages"] == str(api["messages"])
    assert shown["users"] == str(api["users"])
    assert float(shown["error-rate"]) == pytest.approx(api["error_rate"])
    assert float(shown["latency"]) == pytest.approx(api["latency_p95_ms"])
    assert shown["tokens"] == str(api["tokens_in"] + api["tokens_out"])


def utc_today():
    return datetime.now(timezone.utc).date()


# Who may see it

def test_a_non_admin_is_refused(page, live_server):
    assert status_of(live_server, "/admin", "bob") == 403
    assert status_of(live_server, "/api/admin/analytics/summary", "bob") == 403
    assert status_of(live_server, "/admin", "root") == 200
    assert status_of(live_server, "/admin") == 200  # the sign-in form

    sign_in_at_admin(page, "bob")
    expect(page.locator("#forbidden-title")).to_have_text("Administrators only")
    expect(page.locator("#forbidden-view")).to_contain_text("signed in as bob")
    assert page.locator("canvas").count() == 0
    assert page.locator("#dashboard").count() == 0
    assert page.evaluate("typeof window.Chart") == "undefined"
    assert page.request.get("/api/admin/analytics/summary").status == 403
    assert page.request.get("/admin").status == 403
    # Log out: back to the sign-in form, and the cookie is gone.
    page.locator("#logout").click()
    expect(page.locator("#login-view")).to_be_visible()
    assert not [c for c in page.context.cookies() if c["name"] == "access_token"]


def test_a_wrong_password_is_shown(page):
    page.goto("/admin")
    page.locator("#username").fill("root")
    page.locator("#password").fill("not the password")
    page.locator("#password").press("Enter")
    expect(page.locator("#login-error")).to_have_text("Incorrect username or password.")
    assert page.locator("canvas").count() == 0


# What an admin sees

def test_an_admin_sees_charts_of_the_real_data(page, live_server):
    chat_once(page, "root", "How busy was the service this month?")
    with page.expect_response(is_summary) as summary:
        page.goto("/admin")
    shown, api = shown_and_api_summary(page, summary.value)
    assert_kpis_match(shown, api)
    assert api["messages"] > 1000 and api["errors"] > 0
    expect(page.locator("#signed-in-as")).to_have_text("root")
    expect(page.locator("#kpi-messages")).to_have_text(re.compile(r"^\d+(\.\d)?K$"))
    expect(page.locator("#kpi-error-rate")).to_have_text(re.compile(r"^\d+\.\d{1,2}%$"))
    expect(page.locator("#kpi-latency")).to_have_text(re.compile(r"^\d+(\.\d+)? s$|^\d+ ms$"))

    # Eight charts, each drawn by Chart.js, each with a text alternative; the
    # generated chats called no tool, so the Tools chart says so.
    canvases = page.locator(".chart-card:not(#chart-tools) canvas")
    expect(canvases).to_have_count(8)
    assert page.evaluate("[...document.querySelectorAll('.chart-card:not(#chart-tools) canvas')]"
                         ".every((canvas) => Chart.getChart(canvas) !== undefined)")
    for index in range(8):
        label = canvases.nth(index).get_attribute("aria-label")
        assert label and label != "Loading", index
    expect(page.locator(".chart-card .empty:visible")).to_have_count(1)
    expect(page.locator("#chart-tools .empty")).to_have_text("No tool calls in this range")

    # The data tables hold what the API returns for the page's own query.
    query = urlsplit(summary.value.url).query
    daily = page.request.get(f"/api/admin/analytics/daily?{query}").json()["daily"]
    assert len(daily) >= 15
    for row in daily:
        cells = page.locator(f'#chart-messages tr[data-key="{row["day"]}"] td')
        assert [int(text.replace(",", "")) for text in cells.all_text_contents()] == [
            row["messages"], row["user_messages"], row["replies"]]
    agents = page.request.get(f"/api/admin/analytics/agents?{query}").json()["agents"]
    assert {row["agent"] for row in agents} >= {"echo", "openai", "transformers"}
    keys = page.locator("#chart-latency tbody tr").evaluate_all(
        "(rows) => rows.map((row) => row.dataset.key)")
    assert keys == [f"{row['agent']}/{row['model']}" for row in agents]
    users = page.request.get(f"/api/admin/analytics/users?{query}&limit=10").json()["users"]
    expect(page.locator("#chart-users tbody th")).to_have_text([row["username"] for row in users])
    # Each user's cost, as the users report gives it (0.0123 or 1.23, as the cost card).
    shown_costs = page.locator("#chart-users tbody td:last-child").all_text_contents()
    assert [float(text) for text in shown_costs] == [
        pytest.approx(row["cost"], abs=0.005 if row["cost"] >= 0.01 else 0.00005) for row in users]
    # Cost: the generated gpt-4o and gpt-4o-mini replies are priced.
    cost = page.request.get(f"/api/admin/analytics/cost?{query}").json()
    assert cost["totals"]["cost"] > 0
    assert float(page.locator("#kpi-cost").get_attribute("data-value")) == pytest.approx(
        cost["totals"]["cost"])
    # One row a day, as the other daily charts.
    expect(page.locator("#chart-cost tbody tr")).to_have_count(
        page.locator("#chart-messages tbody tr").count())
    # The agent menu lists every agent of the range.
    options = page.locator("#agent option").evaluate_all("(items) => items.map((o) => o.value)")
    assert options == ["", *sorted({row["agent"] for row in agents})]
    # Feedback by agent and model (the generator rates some replies), the
    # regenerate rates, and the latest comments as text.
    feedback = page.request.get(f"/api/admin/analytics/feedback?{query}&limit=5").json()
    expect(page.locator("#chart-feedback tbody tr td:nth-child(4)")).to_have_text(
        [f"{row['up']:,}" for row in feedback["feedback"]])
    assert sum(row["rated"] for row in feedback["feedback"]) > 0
    expect(page.locator("#feedback-comments li")).to_have_count(len(feedback["comments"]))
    expect(page.locator("#feedback-comments li").first).to_contain_text(
        feedback["comments"][0]["comment"])
    expect(page.locator("#regenerate-rates")).to_contain_text("Regenerated: ")


def test_filters_requery_and_are_kept_in_the_url(page, live_server):
    with page.expect_response(is_summary) as first:
        sign_in_at_admin(page, "root")
    everything, _api = shown_and_api_summary(page, first.value)
    assert "since=" in first.value.url  # the default range: the last 30 days

    with page.expect_response(lambda r: is_summary(r) and "agent=openai" in r.url) as by_agent:
        page.locator("#agent").select_option("openai")
    shown, api = shown_and_api_summary(page, by_agent.value)
    assert_kpis_match(shown, api)
    openai_month = int(shown["messages"])
    assert openai_month < int(everything["messages"])
    assert parse_qs(urlsplit(page.url).query) == {"agent": ["openai"]}
    expect(page.locator("#range-label")).to_contain_text("openai")
    keys = page.locator("#chart-latency tbody tr").evaluate_all(
        "(rows) => rows.map((row) => row.dataset.key)")
    assert keys and all(key.startswith("openai/") for key in keys)

    since = (utc_today() - timedelta(days=6)).isoformat()
    with page.expect_response(lambda r: is_summary(r) and f"since={since}" in r.url) as week:
        page.locator(".presets .chip", has_text="7 days").click()
    shown, api = shown_and_api_summary(page, week.value)
    assert_kpis_match(shown, api)
    assert "agent=openai" in week.value.url
    openai_week = int(shown["messages"])
    assert 0 < openai_week < openai_month
    expect(page.locator("#since")).to_have_value(since)
    expect(page.locator(".presets .chip", has_text="7 days")).to_have_attribute(
        "aria-pressed", "true")

    # A bookmark: the same URL opens the same view.
    bookmark = page.url
    with page.expect_response(is_summary) as reopened:
        page.goto(bookmark)
    assert reopened.value.url == week.value.url
    expect(page.locator("#agent")).to_have_value("openai")

    # A custom day: from the date field.
    day = (utc_today() - timedelta(days=3)).isoformat()
    with page.expect_response(lambda r: is_summary(r) and f"since={day}" in r.url) as custom:
        page.locator("#since").fill(day)
    shown, api = shown_and_api_summary(page, custom.value)
    assert_kpis_match(shown, api)
    assert int(shown["messages"]) < openai_week
    assert parse_qs(urlsplit(page.url).query)["since"] == [day]


def test_an_empty_range_and_an_api_error_are_readable(page):
    sign_in_at_admin(page, "root")
    expect(page.locator("#dashboard")).to_be_visible()
    with page.expect_response(is_summary):
        page.goto("/admin?since=2001-01-01&until=2001-01-31")
    expect(page.locator("#kpi-messages")).to_have_text("0")
    expect(page.locator(".chart-card .empty:visible")).to_have_count(9)
    expect(page.locator("#chart-messages .empty")).to_have_text("No data in this range")
    expect(page.locator("#chart-messages canvas")).to_be_hidden()
    expect(page.locator("#notice")).to_be_hidden()

    with page.expect_response(is_summary):
        page.goto("/admin?since=2030-01-05&until=2030-01-01")
    expect(page.locator("#notice")).to_have_text(
        "The analytics could not be loaded: since: must not be after until")


def test_accessibility_and_screenshot(page, tmp_path):
    sign_in_at_admin(page, "root")
    expect(page.locator("#login-view")).to_have_count(0)
    expect(page.locator(".chart-card canvas:visible")).to_have_count(8)
    expect(page.locator("#report")).not_to_have_attribute("aria-busy", "true")
    assert run_axe(page) == []
    assert screenshot(page, "dashboard.png", tmp_path).stat().st_size > 10_000


def test_the_sign_in_form_and_the_refusal_have_no_axe_violations(page):
    page.goto("/admin")
    expect(page.locator("#login-view")).to_be_visible()
    assert run_axe(page) == []
    sign_in_at_admin(page, "bob")
    expect(page.locator("#forbidden-view")).to_be_visible()
    assert run_axe(page) == []
