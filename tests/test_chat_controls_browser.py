"""The chat page's conversation controls in a real browser (Chromium through
Playwright) against a real server: thumbs up/down with a comment, regenerate,
edit, moving between versions, and the agent picker; axe-core clean, and a
screenshot for the README (UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import pytest

from .helpers import expect, log_in, run_axe, screenshot
from .servers import PASSWORD, add_users, serving, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("controls"),
                          agent={"backend": "echo", "selectable": ["echo", "shout"]})
    add_users(config, "alice")
    with serving(config) as server:
        yield server


def chat(page):
    log_in(page, "alice", PASSWORD)
    expect(page.locator("#status")).to_have_text("Connected")


def send(page, text):
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")


def bodies(page):
    return page.locator("#messages .msg-body")


def last(page, kind):
    return page.locator(f".msg-{kind}").last


def button(scope, name):
    return scope.get_by_role("button", name=name, exact=True)


def test_thumbs_and_a_comment_are_kept(page):
    chat(page)
    send(page, "rate me")
    reply = last(page, "assistant")
    expect(reply.locator(".msg-body")).to_have_text("Echo: rate me")
    button(reply, "Good reply").click()
    expect(button(reply, "Good reply")).to_have_attribute("aria-pressed", "true")
    reply.get_by_label("Comment on this reply").fill("Short and right.")
    button(reply, "Send comment").click()
    expect(reply.locator(".feedback-form")).to_have_count(0)
    page.reload()
    reply = last(page, "assistant")
    expect(button(reply, "Good reply")).to_have_attribute("aria-pressed", "true")
    expect(button(reply, "Bad reply")).to_have_attribute("aria-pressed", "false")
    button(reply, "Bad reply").click()
    expect(button(reply, "Good reply")).to_have_attribute("aria-pressed", "false")
    page.reload()
    expect(button(last(page, "assistant"), "Bad reply")).to_have_attribute("aria-pressed", "true")


def test_regenerate_then_move_between_the_versions(page):
    chat(page)
    send(page, "first question")
    expect(last(page, "assistant").locator(".msg-body")).to_have_text("Echo: first question")
    send(page, "second question")
    expect(last(page, "assistant").locator(".msg-body")).to_have_text("Echo: second question")
    # Regenerate only on the last reply.
    expect(page.locator("[data-regenerate]:visible")).to_have_count(1)
    button(last(page, "assistant"), "Regenerate this reply").click()
    reply = last(page, "assistant")
    expect(reply.locator(".sibling-count")).to_have_text("2 / 2")
    expect(reply.locator(".msg-body")).to_have_text("Echo: second question")
    expect(bodies(page)).to_have_count(4)
    button(reply, "Previous version").click()
    expect(last(page, "assistant").locator(".sibling-count")).to_have_text("1 / 2")
    button(last(page, "assistant"), "Next version").click()
    expect(last(page, "assistant").locator(".sibling-count")).to_have_text("2 / 2")


def test_edit_a_message_keeps_the_earlier_version(page):
    chat(page)
    send(page, "one")
    expect(last(page, "assistant").locator(".msg-body")).to_have_text("Echo: one")
    send(page, "two")
    expect(last(page, "assistant").locator(".msg-body")).to_have_text("Echo: two")
    first = page.locator(".msg-user").first
    button(first, "Edit this message").click()
    first.get_by_label("Edit your message").fill("ONE, edited")
    button(first, "Save and send").click()
    expect(bodies(page)).to_have_text(["ONE, edited", "Echo: ONE, edited"])
    edited = page.locator(".msg-user").first
    expect(edited.locator(".sibling-count")).to_have_text("2 / 2")
    button(edited, "Previous version").click()
    expect(bodies(page)).to_have_text(["one", "Echo: one", "two", "Echo: two"])


def test_the_agent_picker_chooses_the_conversations_agent(page):
    chat(page)
    picker = page.get_by_label("Agent")
    expect(picker).to_be_visible()
    expect(picker).to_have_value("echo")
    picker.select_option("shout")
    send(page, "hello there")
    expect(last(page, "assistant").locator(".msg-body")).to_have_text("HELLO THERE !")
    page.reload()
    expect(page.get_by_label("Agent")).to_have_value("shout")


def test_controls_are_accessible_and_pictured(page, tmp_path):
    chat(page)
    send(page, "Which lighthouse is the oldest still in use?")
    expect(last(page, "assistant").locator(".msg-body")).to_contain_text("lighthouse")
    button(last(page, "assistant"), "Regenerate this reply").click()
    expect(last(page, "assistant").locator(".sibling-count")).to_have_text("2 / 2")
    button(last(page, "assistant"), "Good reply").click()
    expect(last(page, "assistant").locator(".feedback-form")).to_be_visible()
    assert run_axe(page) == []
    page.locator("#message").fill("Thanks! And the tallest?")
    page.locator("#message").blur()
    assert screenshot(page, "chat-controls.png", tmp_path).stat().st_size > 10_000
