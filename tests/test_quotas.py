"""Token and cost quotas: reserve, then settle; exact under concurrency.

The store's reservations on both databases, then a service with the fake
agent: the refusal frame, what counts, cost, /api/me/usage. The processes
and instances tests are in test_quota_scale_out.py.
"""

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from tornado_app import quotas
from tornado_app.store import QuotaRequest
from tornado_app.store.models import ReplyStream
from tornado_app.store.quotas import _STANDING
from tornado_app.store.quotas import Bound, Limits

from .helpers import ADMIT, get, saved_messages, seed_old_schema
from .test_metrics import scrape, value

# Replies are saved (and counted) at the real time: the tests' "now" is it too.
NOW = time.time()
NOW_DAY = datetime.fromtimestamp(NOW, timezone.utc).date()


@pytest.fixture
def quota_store(limiter_store):
    """A Store on an empty database of each kind, with users u1 (1) and u2 (2)."""
    return limiter_store


async def admit(store, user_id, bound, limits, now=NOW, lease=60.0):
    """One message through Store.admit with a fixed quota bound."""
    conversation = await store.open_conversation(user_id, "quota")
    request = QuotaRequest(lambda rows, memories: Bound(*bound), limits,
                           datetime.fromtimestamp(now, timezone.utc).date())
    return await store.admit(conversation, user_id, "a message", now=now, messages=1_000_000,
                             per_seconds=1.0, after_id=0, history_limit=10,
                             quota=request, **{**ADMIT, "lease_seconds": lease})


async def settle(store, admission, user_id, tokens_in, tokens_out, cost=None):
    conversation = await store.open_conversation(user_id, "quota")
    await store.finish_reply(admission.reply_id, conversation, user_id, admission.message_id,
                             ["done"], False, content="done", status="ok", agent="fake",
                             model="m", tokens_in=tokens_in, tokens_out=tokens_out, cost=cost)


async def standing(store, user_id, limits=Limits(), now=NOW):
    return await store.quota_standing(user_id, limits, now,
                                      datetime.fromtimestamp(now, timezone.utc).date())


@pytest.mark.gen_test
async def test_reservations_stop_at_the_daily_limit(quota_store):
    limits = Limits(tokens_per_day=100)
    results = [await admit(quota_store, 1, (40,), limits) for _ in range(3)]
    assert [r.over_quota is None for r in results] == [True, True, False]
    refused = results[2]
    assert refused.message_id is None  # nothing saved
    assert refused.over_quota.reserved_tokens == 80
    assert refused.over_quota.tokens_per_day == 100
    # The other user's quota is their own.
    assert (await admit(quota_store, 2, (100,), limits)).over_quota is None


@pytest.mark.gen_test
async def test_a_saved_reply_replaces_its_reservation_by_what_it_spent(quota_store):
    limits = Limits(tokens_per_day=100)
    first = await admit(quota_store, 1, (40,), limits)
    await settle(quota_store, first, 1, 10, 5)
    now = await standing(quota_store, 1, limits)
    assert (now.tokens_today, now.tokens_month, now.reserved_tokens) == (15, 15, 0)
    assert [(await admit(quota_store, 1, (40,), limits)).over_quota is None
            for _ in range(3)] == [True, True, False]


@pytest.mark.gen_test
async def test_month_and_cost_limits(quota_store):
    spent = await admit(quota_store, 1, (50, 0.5), Limits())
    await settle(quota_store, spent, 1, 30, 20, cost=0.4)
    month = Limits(tokens_per_day=1000, tokens_per_month=80)
    refused = await admit(quota_store, 1, (40,), month)  # 50 + 40 > 80
    assert refused.over_quota.tokens_month == 50
    assert refused.over_quota.tokens_per_month == 80
    assert (await admit(quota_store, 1, (30,), month)).over_quota is None
    cost = Limits(cost_per_month=1.0)
    assert (await admit(quota_store, 1, (1, 0.7), cost)).over_quota is not None  # 0.4 + 0.7
    assert (await admit(quota_store, 2, (1, 0.7), cost)).over_quota is None


@pytest.mark.gen_test
async def test_expired_reservations_no_longer_count(quota_store):
    limits = Limits(tokens_per_day=100)
    assert (await admit(quota_store, 1, (80,), limits, lease=10)).over_quota is None
    assert (await admit(quota_store, 1, (80,), limits, now=NOW + 9)).over_quota is not None
    # Its process stopped renewing it (killed): ten seconds on, it is gone.
    assert (await admit(quota_store, 1, (80,), limits, now=NOW + 11)).over_quota is None


@pytest.mark.gen_test
async def test_renewal_keeps_a_reservation_and_its_reply_id_alone(quota_store):
    limits = Limits(tokens_per_day=100)
    held = await admit(quota_store, 1, (80,), limits, lease=10)
    await admit(quota_store, 2, (80,), limits, lease=10)
    await quota_store.renew_leases("test", NOW + 8, 10, [held.reply_id])
    assert (await standing(quota_store, 1, now=NOW + 15)).reserved_tokens == 80
    assert (await standing(quota_store, 2, now=NOW + 15)).reserved_tokens == 0  # not renewed
    assert (await admit(quota_store, 1, (80,), limits, now=NOW + 15)).over_quota is not None
    assert (await admit(quota_store, 2, (80,), limits, now=NOW + 15)).over_quota is None


@pytest.mark.gen_test
async def test_a_reservation_is_held_by_its_replys_stream(quota_store):
    reserved = await admit(quota_store, 1, (40, 0.25), Limits(tokens_per_day=100))
    conversation = await quota_store.open_conversation(2, "free")
    free = await quota_store.admit(conversation, 2, "no quota", now=NOW, messages=1_000_000,
                                   per_seconds=1.0, after_id=0, history_limit=10, **ADMIT)
    async with quota_store.engine.connect() as conn:
        rows = (await conn.execute(select(ReplyStream.reply_id, ReplyStream.reserved_tokens,
                                          ReplyStream.reserved_cost))).all()
    rows = {row.reply_id: (row.reserved_tokens, row.reserved_cost) for row in rows}
    assert rows == {reserved.reply_id: (40, 0.25), free.reply_id: (None, None)}
    await settle(quota_store, reserved, 1, 10, 5)
    assert (await standing(quota_store, 1)).reserved_tokens == 0  # ended with the stream


@pytest.mark.gen_test
async def test_live_reservations_are_summed_from_their_index(quota_store):
    if quota_store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's plan")
    values = {"uid": 1, "now": NOW, "today": str(NOW_DAY),
              "month_start": str(NOW_DAY.replace(day=1)), "default_day": 1,
              "default_month": None, "default_cost": None}

    def plan(sync):
        compiled = _STANDING.compile(dialect=sync.dialect)
        params = compiled.construct_params(values)
        return sync.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}",
                                    tuple(params[name] for name in compiled.positiontup)).all()

    async with quota_store.engine.connect() as conn:
        plan = await conn.run_sync(plan)
    details = " | ".join(row[-1] for row in plan)
    reserved = "USING INDEX ix_reply_streams_live_reserved (user_id=? AND lease_until>?)"
    assert details.count(reserved) == 2, details


@pytest.mark.gen_test
async def test_overrides_replace_the_config_limits(quota_store):
    limits = Limits(tokens_per_day=100)
    assert await quota_store.set_quota("u1", 10, None, None, None)
    assert (await admit(quota_store, 1, (20,), limits)).over_quota is not None
    assert await quota_store.set_quota("u1", None, None, None, True)
    assert (await admit(quota_store, 1, (10_000,), limits)).over_quota is None
    assert not await quota_store.set_quota("nobody", 1, None, None, None)


@pytest.mark.gen_test
async def test_concurrent_reservations_grant_exactly_what_fits(quota_store):
    limits = Limits(tokens_per_day=95)
    results = await asyncio.gather(*(admit(quota_store, 1, (10,), limits) for _ in range(40)),
                                   *(admit(quota_store, 2, (10,), limits) for _ in range(5)))
    assert sum(r.over_quota is None for r in results[:40]) == 9
    assert all(r.over_quota is None for r in results[40:])


def test_windows_and_refusal_wording():
    windows = quotas.Windows.at(datetime(2026, 11, 28, 23, 59, tzinfo=timezone.utc).timestamp())
    assert quotas.iso(windows.day_resets) == "2026-11-29T00:00:00Z"
    assert quotas.iso(windows.month_resets) == "2026-12-01T00:00:00Z"
    december = quotas.Windows.at(datetime(2026, 12, 31, 12, tzinfo=timezone.utc).timestamp())
    assert quotas.iso(december.month_resets) == "2027-01-01T00:00:00Z"

    class Standing:
        tokens_today, tokens_month, cost_month = 480, 900, 1.25
        reserved_tokens, reserved_cost = 0, 0.0
        tokens_per_day, tokens_per_month, cost_per_month = 500, 1000, 2.0

    s = Standing()
    assert quotas.refusal(s, Bound(30), windows, "USD") == (
        "Token quota reached: 480 of 500 tokens used today; it resets at 2026-11-29T00:00:00Z.")
    s.tokens_per_day = None
    assert quotas.refusal(s, Bound(130), windows, "USD") == (
        "Token quota reached: 900 of 1000 tokens used this month; "
        "it resets at 2026-12-01T00:00:00Z.")
    assert quotas.refusal(s, Bound(10, 1.0), windows, "EUR") == (
        "Cost quota reached: 1.25 of 2.00 EUR used this month; "
        "it resets at 2026-12-01T00:00:00Z.")


def test_prices_by_agent_and_model_with_wildcards():
    from tornado_app.config import PricingSettings

    pricing = quotas.Pricing(PricingSettings.model_validate({"models": {
        "openai/gpt-4o-mini": {"input_per_million": 0.15, "output_per_million": 0.6},
        "transformers/*": {"input_per_million": 1, "output_per_million": 2},
    }}))
    assert pricing.cost("openai", "gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert pricing.cost("transformers", "any/model", 500_000, 0) == pytest.approx(0.5)
    assert pricing.cost("openai", "gpt-4o", 10, 10) is None  # unpriced


# The service: the fake agent answers "fake reply to: <content>".


@pytest.fixture
def settings(settings):
    settings.quota.tokens_per_day = 60
    settings.rate_limit.max_rejections = 2
    settings.pricing = settings.pricing.model_validate(
        {"currency": "EUR", "models": {"fake/*": {"input_per_million": 1000,
                                                  "output_per_million": 2000}}})
    return settings


@pytest.fixture
def fake_agent(fake_agent):
    fake_agent.reply_tokens = 10  # the bound: the prompt and 10 tokens
    return fake_agent


async def replies_of(store, client_id="client-1"):
    conversation = await store.open_conversation(1, client_id)
    return [row for row in await saved_messages(store, conversation) if row.role == "assistant"]


def test_the_bound_counts_the_copys_turns_and_the_bytes_of_rows_read_anew(settings, fake_agent):
    from types import SimpleNamespace

    from tornado_app.chat import ChatService
    from tornado_app.history import History

    def row(row_id, role, content):
        return SimpleNamespace(id=row_id, role=role, content=content)

    pool = SimpleNamespace(every_agent=lambda: (fake_agent,))
    chat = ChatService(settings, None, pool, None, None)
    history = History(1)
    history.add([row(1, "user", "one two"), row(2, "assistant", "three four five")], 3, "six")
    user = SimpleNamespace(id=1, username="u1", quota_unlimited=None)
    request = chat._quota_request(user, history, "seven", NOW, None)
    copy = request.bound_of([], []).prompt_tokens
    first = fake_agent.count_tokens("one two") + quotas.TOKENS_PER_MESSAGE
    anew = row(4, "assistant", "h\u00e9llo")  # never counted: its 6 UTF-8 bytes
    assert request.bound_of([anew], []).prompt_tokens == copy + 6 + quotas.TOKENS_PER_MESSAGE
    # The copy read again in full (read_from): its rows count once, as counted.
    again = [row(1, "user", "one two"), row(2, "assistant", "three four five"),
             row(3, "user", "six"), anew]
    assert request.bound_of(again, []).prompt_tokens == copy + 6 + quotas.TOKENS_PER_MESSAGE
    # ... and a turn no longer on the branch (purged) no longer counts.
    assert request.bound_of(again[1:3], []).prompt_tokens == copy - first


@pytest.mark.gen_test(timeout=30)
async def test_a_message_over_the_quota_is_refused_with_its_reset(connect, fake_agent, store):
    client = await connect()
    await client.send({"content": "hi"})
    assert (await client.receive())["type"] == "ai_response"
    [reply] = await replies_of(store)
    used = reply.tokens_in + reply.tokens_out
    # The cost of the reply as priced when saved (EUR 1000 / 2000 per million).
    assert reply.cost == pytest.approx((reply.tokens_in * 1000 + reply.tokens_out * 2000) / 1e6)
    # With its history, the next prompt and reply no longer fit in 60 tokens.
    for _ in range(3):  # more than max_rejections: quota refusals do not close
        await client.send({"content": "hi"})
        frame = await client.receive()
        tomorrow = datetime.now(timezone.utc).date() + timedelta(days=1)
        assert frame == {"type": "error", "timestamp": frame["timestamp"], "message":
                         f"Token quota reached: {used} of 60 tokens used today; "
                         f"it resets at {tomorrow.isoformat()}T00:00:00Z."}
    assert len(fake_agent.history) == 1  # the agent never saw them
    conversation = await store.open_conversation(1, "client-1")
    assert len(await saved_messages(store, conversation)) == 2  # nothing else saved


@pytest.mark.gen_test(timeout=30)
async def test_refusals_are_counted_in_metrics_and_the_socket_stays_open(
        connect, base_url, fake_agent):
    before = await scrape(base_url)
    client = await connect()
    for _ in range(3):  # more than max_rejections
        await client.send({"content": "x" * 200})  # prompt + reply cannot fit in 60 tokens
        assert (await client.receive())["message"].startswith("Token quota reached: 0 of 60 ")
    await client.send({"action": "cancel"})
    assert (await client.receive())["type"] == "error"  # nothing to cancel, still open
    after = await scrape(base_url)
    assert (value(after, "chat_rejections_total", reason="quota")
            - value(before, "chat_rejections_total", reason="quota")) == 3
    assert (value(after, "chat_messages_total", outcome="quota")
            - value(before, "chat_messages_total", outcome="quota")) == 3
    assert value(after, "chat_rejections_total", reason="rate_limit") == value(
        before, "chat_rejections_total", reason="rate_limit")


@pytest.mark.gen_test(timeout=30)
async def test_cancelled_and_failed_replies_count_their_partial_tokens(connect, fake_agent,
                                                                       store):
    from tornado_app.agents import AgentError

    fake_agent.enqueue("partial ", "text", error=AgentError("upstream", "broke"))
    client = await connect()
    # A user's own quota applies at once, to open sockets too.
    assert await store.set_quota("alice", 10_000, None, None, None)
    await client.send({"content": "fail please"})
    assert (await client.receive())["type"] == "error"
    gate = asyncio.Event()
    fake_agent.enqueue("first ", "never", gate=gate)
    await client.send({"content": "cancel me", "stream": True})
    await fake_agent.received(2)
    await client.send({"action": "cancel"})
    assert (await client.receive())["message"] == "The reply was cancelled."
    failed, cancelled = await replies_of(store)
    assert (failed.status, cancelled.status) == ("error", "cancelled")
    assert failed.tokens_in > 0 and failed.tokens_out == fake_agent.count_tokens("partial text")
    assert cancelled.tokens_in > 0 and cancelled.tokens_out is not None
    usage = await standing(store, 1, Limits(tokens_per_day=60), now=time.time())
    assert usage.tokens_per_day == 10_000
    assert usage.tokens_today == sum(r.tokens_in + r.tokens_out for r in (failed, cancelled))
    assert usage.reserved_tokens == 0


@pytest.mark.gen_test(timeout=30)
async def test_me_usage_shows_the_signed_in_users_usage(connect, base_url, token_for, store):
    client = await connect()
    await client.send({"content": "hi"})
    await client.receive()
    [reply] = await replies_of(store)
    response = await get(f"{base_url}/api/me/usage", Authorization=f"Bearer {token_for()}")
    body = json.loads(response.body)
    tomorrow = datetime.now(timezone.utc).date() + timedelta(days=1)
    assert body["tokens_today"] == body["tokens_month"] == reply.tokens_in + reply.tokens_out
    assert body["cost_month"] == pytest.approx(reply.cost)
    assert body["limits"] == {"tokens_per_day": 60, "tokens_per_month": None,
                              "cost_per_month": None}
    assert body["resets"]["day"] == f"{tomorrow.isoformat()}T00:00:00Z"
    assert body["currency"] == "EUR"
    anonymous = await get(f"{base_url}/api/me/usage")
    assert anonymous.code == 401 and json.loads(anonymous.body)["error"] == "unauthorized"


# Migration 0007


@pytest.mark.gen_test(timeout=60)
async def test_migration_0007_counts_this_months_replies_and_goes_back(db_store):
    from sqlalchemy import inspect, text

    from tornado_app.store.schema import downgrade, upgrade

    engine = db_store.engine
    await upgrade(engine, "0004")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    long_ago = now - timedelta(days=62)
    async with engine.begin() as conn:
        await seed_old_schema(conn, "alice", at=now)
        for row_id, role, tokens, at in ((1, "user", None, now), (2, "assistant", 30, now),
                                         (3, "user", None, long_ago),
                                         (4, "assistant", 1000, long_ago)):
            await conn.execute(text(
                "INSERT INTO messages (id, public_id, conversation_id, user_id, role, content,"
                " status, reply_to_id, tokens_in, tokens_out, created_at) VALUES (:id, :pid, 1,"
                " 1, :role, 'x', 'ok', :to, :tokens, :tokens, :at)"),
                {"id": row_id, "pid": f"p{row_id}", "role": role, "tokens": tokens, "at": at,
                 "to": row_id - 1 if tokens else None})
    await upgrade(engine, "0007")
    async with engine.connect() as conn:
        usage = (await conn.execute(text("SELECT user_id, tokens, cost FROM quota_usage"))).all()
        turns = (await conn.execute(text(
            "SELECT reply_id, cost FROM chat_turns ORDER BY message_id"))).all()
    assert [tuple(row) for row in usage] == [(1, 60, 0)]  # this month's reply only
    assert [tuple(row) for row in turns] == [(2, None), (4, None)]
    await downgrade(engine, "0004")

    def shape(sync):
        found = inspect(sync)
        return (set(found.get_table_names()),
                {c["name"] for c in found.get_columns("users")},
                {c["name"] for c in found.get_columns("messages")})

    async with engine.connect() as conn:
        tables, user_columns, message_columns = await conn.run_sync(shape)
        kept = (await conn.execute(text("SELECT count(*) FROM chat_turns"))).scalar()
    assert not {"quota_usage", "quota_reservations"} & tables
    assert not any(c.startswith("quota_") for c in user_columns)
    assert "cost" not in message_columns
    assert kept == 2


@pytest.mark.gen_test(timeout=60)
async def test_migration_0012_moves_reservations_onto_their_streams_and_back(db_store):
    from sqlalchemy import text

    from tornado_app.store.schema import downgrade, upgrade

    engine = db_store.engine
    await upgrade(engine, "0011")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    async with engine.begin() as conn:
        await seed_old_schema(conn, "alice", at=now)
        await conn.execute(text(
            "INSERT INTO messages (id, public_id, conversation_id, user_id, role, content,"
            " status, created_at) VALUES (1, 'p1', 1, 1, 'user', 'x', 'ok', :at)"), {"at": now})
        for reply_id in ("held", "free"):
            await conn.execute(text(
                "INSERT INTO reply_streams (reply_id, conversation_id, user_id, message_id,"
                " instance, lease_until, last_seq, cancel_requested, created_at) VALUES"
                " (:rid, 1, 1, 1, 'i', :until, -1, false, :at)"),
                {"rid": reply_id, "until": NOW + 60, "at": now})
        await conn.execute(text(
            "INSERT INTO quota_reservations (reply_id, user_id, tokens, cost, expires_at)"
            " VALUES ('held', 1, 40, 0.5, :until)"), {"until": NOW + 60})
    await upgrade(engine, "0012")
    streams = "SELECT reply_id, reserved_tokens, reserved_cost FROM reply_streams ORDER BY 1"
    async with engine.connect() as conn:
        rows = (await conn.execute(text(streams))).all()
    assert [tuple(row) for row in rows] == [("free", None, None), ("held", 40, 0.5)]
    await downgrade(engine, "0011")
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM quota_reservations"))).all()
    assert [tuple(row) for row in rows] == [("held", 1, 40, 0.5, NOW + 60)]


async def put_json(url: str, body, token: str):
    from tornado.httpclient import AsyncHTTPClient

    return await AsyncHTTPClient().fetch(
        url, method="PUT", body=body if isinstance(body, str) else json.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        raise_error=False)


@pytest.mark.gen_test(timeout=30)
async def test_admins_read_and_set_a_users_quota(base_url, make_user, token_for, connect):
    await make_user("root", admin=True)
    await make_user("bob")
    admin, url = token_for("root"), f"{base_url}/api/admin/users/bob/quota"
    answer = await put_json(url, {"tokens_per_day": 1000, "cost_per_month": 2.5}, admin)
    assert answer.code == 200, answer.body
    body = json.loads(answer.body)
    assert body["overrides"] == {"tokens_per_day": 1000, "tokens_per_month": None,
                                 "cost_per_month": 2.5, "unlimited": False}
    assert body["limits"] == {"tokens_per_day": 1000, "tokens_per_month": None,
                              "cost_per_month": 2.5}
    body = json.loads((await put_json(url, {"unlimited": True}, admin)).body)
    assert body["overrides"]["unlimited"] and body["limits"]["tokens_per_day"] is None
    read = await get(url, Authorization=f"Bearer {admin}")
    assert json.loads(read.body)["overrides"]["tokens_per_day"] == 1000  # kept for later
    for bad, word in (({"tokens_per_day": -1}, "tokens_per_day"), ({"nope": 1}, "nope"),
                      ("[1]", "JSON object"), ({"tokens_per_day": 1.5}, "whole number"),
                      ({"unlimited": "yes"}, "unlimited")):
        answer = await put_json(url, bad, admin)
        assert answer.code == 400 and word in json.loads(answer.body)["error_description"]
    assert (await put_json(f"{base_url}/api/admin/users/nobody/quota", {}, admin)).code == 404
    assert (await put_json(url, {}, token_for("bob"))).code == 403
    assert (await get(url)).code == 401


def test_users_quota_on_the_command_line(tmp_path):
    from .servers import Call, add_users, cli, ok, one_line_error, run_all, write_config

    config = write_config(tmp_path)
    add_users(config, "alice", "bob")
    alice, bob = run_all(
        Call(config, ("users", "quota", "alice", "--tokens-per-day", "500",
                      "--cost-per-month", "1.5")),
        Call(config, ("users", "quota", "bob", "--unlimited")))
    assert ok(alice) == "quota of alice: day=500 cost=1.5\n"
    assert ok(bob) == "quota of bob: unlimited\n"
    listing = ok(cli(config, "users", "list")).splitlines()
    assert listing[0].split()[-1] == "QUOTA"
    assert listing[1].startswith("alice") and listing[1].endswith("day=500 cost=1.5")
    assert listing[2].startswith("bob") and listing[2].endswith("unlimited")
    reset, unknown, negative, unpriced = run_all(
        Call(config, ("users", "quota", "alice", "--reset")),
        Call(config, ("users", "quota", "carol", "--unlimited")),
        Call(config, ("users", "quota", "bob", "--tokens-per-day", "-3")),
        Call(config, ("analytics", "cost", "--unpriced", "--format", "json")))
    assert ok(reset) == "quota of alice: default\n"
    one_line_error(unknown, 1, "no user", "carol")
    one_line_error(negative, 1, "--tokens-per-day", "at least 0")
    unpriced = json.loads(ok(unpriced))
    assert unpriced["unpriced"] == [] and "totals" not in unpriced


# analytics cost


@pytest.mark.gen_test(timeout=60)
async def test_the_cost_report_sums_the_stored_costs_and_lists_unpriced_models(quota_store):
    from tornado_app.analytics import make_filters, run_report

    from .helpers import add_reply, add_user_message

    for user_id, agent, model, cost in ((1, "openai", "gpt-4o-mini", 0.25),
                                        (1, "openai", "gpt-4o-mini", 0.5),
                                        (2, "transformers", "smol", None)):
        conversation = await quota_store.open_conversation(user_id, "c")
        asked = await add_user_message(quota_store, conversation, user_id, "q")
        await add_reply(quota_store, conversation, user_id, asked, content="a", status="ok",
                        agent=agent, model=model, tokens_in=100, tokens_out=50, cost=cost)
    report = await run_report(quota_store.engine, "cost", make_filters(None, None, None, None))
    body = report.as_json()
    assert body["totals"] == {"replies": 3, "tokens_in": 300, "tokens_out": 150,
                              "cost": pytest.approx(0.75), "unpriced_replies": 1}
    today = datetime.now(timezone.utc).date().isoformat()
    assert [(r["day"], r["username"], r["model"], r["replies"], r["cost"])
            for r in body["by_day"]] == [(today, "u1", "gpt-4o-mini", 2, pytest.approx(0.75)),
                                          (today, "u2", "smol", 1, 0)]
    assert [(r["agent"], r["model"], r["replies"]) for r in body["unpriced"]] == [
        ("transformers", "smol", 1)]
    alone = await run_report(quota_store.engine, "cost", make_filters(None, None, "u2", None))
    assert alone.as_json()["totals"]["cost"] == 0
