"""The chat page shows each tool call as one quiet line under the reply,
expandable to its arguments: a real Chromium, a real server process, its
``openai`` agent talking to a loopback fake that calls the ``clock`` tool."""

from __future__ import annotations

import pytest

from .helpers import expect, log_in
from .openai_upstream import FakeOpenAI
from .servers import PASSWORD, add_users, cli, ok, serving, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, upstream):
    config = write_config(tmp_path_factory.mktemp("tools-browser"), agent={
        "backend": "openai", "tools": ["clock"],
        "openai": {"base_url": upstream.base_url, "api_key": "sk-test", "max_retries": 0}})
    add_users(config, "alice", "root", "carol", "dave")
    ok(cli(config, "users", "promote", "root"))
    with serving(config) as server:
        yield server


def chat_with_tools(page, upstream, username):
    upstream.tool_calls([("call_1", "clock", "{}"), ("call_2", "nope", '{"city": "Paris"}')])
    upstream.reply(["It is ", "Saturday."])
    log_in(page, username, PASSWORD)
    expect(page.locator("#status")).to_have_text("Connected")
    page.locator("#message").fill("What day is it?")
    page.locator("#message").press("Enter")
    reply = page.locator(".msg-assistant").last
    expect(reply.locator(".msg-body")).to_have_text("It is Saturday.")
    return reply


def test_a_tool_call_is_a_quiet_line_that_opens_to_its_arguments(page, upstream):
    reply = chat_with_tools(page, upstream, "alice")
    lines = reply.locator(".msg-tool summary")
    expect(lines).to_have_text(["Used clock", "Tried nope: Paris (it failed)"])
    arguments = reply.locator(".msg-tool pre").nth(1)
    expect(arguments).to_be_hidden()
    lines.nth(1).click()
    expect(arguments).to_be_visible()
    expect(arguments).to_have_text('{\n  "city": "Paris"\n}')


def test_a_reply_resumed_after_a_reload_shows_its_tool_steps_once(page, upstream):
    upstream.tool_calls([("call_1", "clock", "{}")])
    upstream.reply([f"word{n} " for n in range(30)], delay=0.1)
    log_in(page, "dave", PASSWORD)
    expect(page.locator("#status")).to_have_text("Connected")
    page.locator("#message").fill("What day is it?")
    page.locator("#message").press("Enter")
    expect(page.locator(".msg-assistant").last.locator(".msg-body")).to_contain_text("word2 ")
    page.reload()  # the page knows nothing now: it resumes the reply from the start
    reply = page.locator(".msg-assistant").last
    expect(reply.locator(".msg-body")).to_have_text("".join(f"word{n} " for n in range(30)),
                                                    timeout=20_000)
    expect(reply.locator(".msg-tool summary")).to_have_text(["Used clock"])


def test_a_reloaded_page_shows_the_tool_steps_from_the_history(page, upstream):
    chat_with_tools(page, upstream, "carol")
    page.reload()
    reply = page.locator(".msg-assistant").last
    expect(reply.locator(".msg-body")).to_have_text("It is Saturday.")
    expect(reply.locator(".msg-tool summary")).to_have_text(
        ["Used clock", "Tried nope: Paris (it failed)"])


def test_the_dashboard_charts_tool_calls(page, upstream):
    chat_with_tools(page, upstream, "root")
    page.goto("/admin")
    expect(page.locator("#chart-tools canvas")).to_be_visible()
    rows = page.locator("#chart-tools tbody tr")
    expect(rows.first.locator("th")).to_have_text("clock")
    calls = {row.get_attribute("data-key"): row.locator("td").first.text_content()
             for row in rows.all()}
    assert int(calls["clock"]) >= 1 and int(calls["nope"]) >= 1
    failed = page.locator('#chart-tools tr[data-key="nope"] td').nth(1)
    assert int(failed.text_content()) == int(calls["nope"])  # every call of no tool fails
