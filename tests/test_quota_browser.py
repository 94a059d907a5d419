"""The chat page shows what is left of a quota once less than a fifth remains,
and a message over the quota as a readable notice (real Chromium, live server)."""

from __future__ import annotations

import datetime

import pytest
from sqlalchemy import insert, select

from tornado_app.store.models import QuotaUsage, User

from .helpers import expect, on_engine
from .servers import add_users, cli, ok, serving, sqlite_url, write_config
from .test_browser import logged_in, send

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quota-browser")
    config = write_config(folder, quota={"tokens_per_day": 2000})
    add_users(config, "alice", "bob")
    # bob has spent 1 800 of his 2 000 tokens today; alice nothing.
    ok(cli(config, "users", "quota", "bob", "--tokens-per-day", "2000"))

    async def spend(engine):
        async with engine.begin() as conn:
            bob = (await conn.execute(select(User.id).where(User.username == "bob"))).scalar()
            await conn.execute(insert(QuotaUsage).values(
                user_id=bob, day=datetime.datetime.now(datetime.timezone.utc).date(),
                tokens=1800, cost=0.0))

    on_engine(sqlite_url(folder), spend)
    with serving(config) as server:
        yield server


def test_what_is_left_shows_under_a_fifth_and_refusals_read_as_notices(page):
    logged_in(page, "bob")
    left = page.locator("#quota-left")
    expect(left).to_contain_text("200 tokens left today (resets ")
    send(page, "hello")  # its prompt and largest reply (about 1 000 tokens) do not fit
    tomorrow = datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=1)
    expect(page.locator(".msg-warning .msg-body")).to_have_text(
        f"Token quota reached: 1800 of 2000 tokens used today; it resets at {tomorrow}T00:00:00Z.")
    expect(page.locator(".msg-assistant")).to_have_count(0)


def test_nothing_is_shown_with_most_of_the_quota_left(page):
    logged_in(page, "alice")
    send(page, "hello")
    expect(page.locator(".msg-assistant").last.locator(".msg-body")).to_have_text("Echo: hello")
    expect(page.locator("#quota-left")).to_be_hidden()
