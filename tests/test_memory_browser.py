"""The chat page's Memory panel in a real Chromium: list, add, edit, delete,
only the signed-in user's (one server and one browser for the module; see
test_browser.py for the set-up)."""

from __future__ import annotations

import pytest

from .helpers import expect, log_in, run_axe
from .servers import PASSWORD, add_users, serving, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("memory-browser"))
    add_users(config, "alice", "bob")
    with serving(config) as server:
        yield server


def open_panel(page, username):
    log_in(page, username, PASSWORD)
    expect(page.locator("#status")).to_have_text("Connected")
    page.locator("#memory-toggle").click()
    expect(page.locator("#memory-panel")).to_be_visible()
    expect(page.locator("#memory-toggle")).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#memory-key")).to_be_focused()


def save(page, key, value):
    """Save through the form, and wait until it is saved (the form is cleared)."""
    page.locator("#memory-key").fill(key)
    page.locator("#memory-value").fill(value)
    page.locator("#memory-save").click()
    expect(page.locator("#memory-key")).to_have_value("")


def test_list_add_edit_and_delete_memories(page, browser, browser_context_args):
    open_panel(page, "alice")
    expect(page.locator("#memory-empty")).to_be_visible()
    save(page, "birthday", "March 15")
    save(page, "city", "<b>Lyon</b>")  # shown as text, never as HTML
    items = page.locator(".memory-item")
    expect(items).to_have_count(2)
    expect(items.nth(0).locator(".memory-value")).to_have_text("March 15")
    expect(items.nth(1).locator(".memory-value")).to_have_text("<b>Lyon</b>")
    expect(page.locator("#memory-empty")).to_be_hidden()
    expect(page.locator("#memory-key")).to_have_value("")
    assert run_axe(page) == []  # the open panel, with its list, has no violations

    # Edit: the form takes the memory; saving replaces it.
    page.get_by_role("button", name="Edit birthday").click()
    expect(page.locator("#memory-key")).to_have_value("birthday")
    expect(page.locator("#memory-value")).to_have_value("March 15")
    page.locator("#memory-value").fill("March 16")
    page.locator("#memory-save").click()
    expect(page.locator("#memory-key")).to_have_value("")
    expect(items.nth(0).locator(".memory-value")).to_have_text("March 16")
    expect(items).to_have_count(2)

    # The server's refusals are shown readably.
    save(page, "k" * 64, "v" * 1000)
    expect(items).to_have_count(3)
    page.locator("#memory-key").fill("x")
    page.locator("#memory-value").fill("   ")
    page.locator("#memory-save").click()
    expect(page.locator("#memory-error")).to_have_text("Give both a name and what to remember.")

    page.get_by_role("button", name="Delete city").click()
    expect(items).to_have_count(2)
    expect(page.locator(".memory-key")).to_have_text(["birthday", "k" * 64])

    # They are the server's: a reload shows them, another user sees none.
    page.reload()
    expect(page.locator("#status")).to_have_text("Connected")
    page.locator("#memory-toggle").click()
    expect(page.locator(".memory-item")).to_have_count(2)
    other = browser.new_context(**browser_context_args).new_page()
    try:
        open_panel(other, "bob")
        expect(other.locator("#memory-empty")).to_be_visible()
        expect(other.locator(".memory-item")).to_have_count(0)
    finally:
        other.context.close()


def test_log_out_closes_the_panel(page):
    open_panel(page, "bob")
    save(page, "name", "Bob")
    expect(page.locator(".memory-item")).to_have_count(1)
    page.locator("#logout").click()
    expect(page.locator("#login-view")).to_be_visible()
    expect(page.locator("#memory-panel")).to_be_hidden()
