"""Quotas hold across processes and instances, and a killed process's
reservations free themselves. Real server processes (tests/servers.py) on
SQLite and on PostgreSQL, with the echo agent.
"""

import asyncio
import re
import signal
import time

import pytest
from sqlalchemy import func, select

from tornado_app.store.models import Message, QuotaUsage, ReplyStream, User

from .helpers import on_engine
from .servers import add_users, cli, ok, token, write_config
from .test_scale_out import open_clients

pytestmark = pytest.mark.slow

REFUSAL = re.compile(r"Token quota reached: \d+ of (\d+) tokens used today; "
                     r"it resets at \d{4}-\d\d-\d\dT00:00:00Z\.")


async def user_totals(engine, username: str) -> dict:
    """What the database holds of a user: messages, replies, their tokens,
    the quota counter and reservations left (on streams still open)."""
    m = Message.__table__
    async with engine.connect() as conn:
        user_id = (await conn.execute(select(User.id).where(User.username == username))).scalar()
        mine = m.c.user_id == user_id
        asked = (await conn.execute(select(func.count()).where(mine, m.c.role == "user"))).scalar()
        replies, tokens = (await conn.execute(select(
            func.count(), func.coalesce(func.sum(m.c.tokens_in + m.c.tokens_out), 0))
            .where(mine, m.c.role == "assistant"))).one()
        counted = (await conn.execute(select(func.coalesce(func.sum(QuotaUsage.tokens), 0))
                                      .where(QuotaUsage.user_id == user_id))).scalar()
        reserved = (await conn.execute(select(func.count()).where(
            ReplyStream.user_id == user_id, ReplyStream.finished_at.is_(None),
            ReplyStream.reserved_tokens.is_not(None)))).scalar()
    return {"asked": asked, "replies": replies, "tokens": tokens, "counted": counted,
            "reserved": reserved}


def test_daily_quota_is_exact_across_four_processes(tmp_path, any_db_url, servers):
    limit = 500
    config = write_config(
        tmp_path, database={"url": any_db_url}, server={"processes": 4},
        quota={"tokens_per_day": limit}, chat={"max_content_chars": 20},
        rate_limit={"messages": 1_000_000, "per_seconds": 3600, "max_rejections": 1},
        limits={"connections_per_user": 100},
    )
    add_users(config, "alice", "bob")
    # Bob's own, larger quota: his 10 messages fit in it whatever alice does.
    assert ok(cli(config, "users", "quota", "bob", "--tokens-per-day", "5000")) == (
        "quota of bob: day=5000\n")
    server = servers(config)
    alice, bob = token(config, "alice"), token(config, "bob")

    async def burst():
        flood = await open_clients(server, alice, 40)
        others = await open_clients(server, bob, 2, "bob")

        async def send_five(client):
            for i in range(5):
                await client.send({"content": f"message {i}"})
            return [await client.receive(timeout=60) for _ in range(5)]

        outcomes = await asyncio.gather(*(send_five(c) for c in flood + others))
        flat = [frame for outcome in outcomes[:40] for frame in outcome]
        return flat, [frame for outcome in outcomes[40:] for frame in outcome]

    frames, bob_frames = asyncio.run(burst())
    answered = [f for f in frames if f["type"] == "ai_response"]
    refused = [f for f in frames if f["type"] == "error"]
    assert len(answered) + len(refused) == 200  # every message answered one way or the other
    assert all(REFUSAL.fullmatch(f["message"]) and REFUSAL.fullmatch(f["message"])[1] == "500"
               for f in refused), refused[:3]
    # Quota refusals never close a socket (max_rejections is 1 here).
    assert [f["type"] for f in bob_frames] == ["ai_response"] * 10

    totals = on_engine(any_db_url, lambda engine: user_totals(engine, "alice"))
    assert totals["tokens"] <= limit
    assert totals["tokens"] > limit / 2  # the quota was used, not refused wholesale
    assert totals["replies"] == totals["asked"] == len(answered)  # nothing half-saved
    assert totals["counted"] == totals["tokens"] and totals["reserved"] == 0


def instance_config(tmp_path, db_url, name, **agent):
    return write_config(
        tmp_path / name, data_dir=str(tmp_path / name / "data"), database={"url": db_url},
        auth={"jwt_secret": "quota-secret-" + "q" * 40},
        limits={"lease_seconds": 3}, chat={"max_content_chars": 40},
        quota={"tokens_per_day": 60}, agent={"backend": "echo", "echo": agent},
    )


def test_a_killed_instances_reservation_frees_itself(tmp_path, any_db_url, servers):
    config_a = instance_config(tmp_path, any_db_url, "a")
    config_b = instance_config(tmp_path, any_db_url, "b", delay_seconds=1.0)
    add_users(config_a, "alice")
    a, b = servers(config_a), servers(config_b)
    alice = token(config_a, "alice")

    async def scenario():
        on_b = (await open_clients(b, alice, 1, "b"))[0]
        # A slow reply on B holds a reservation of about 40 of alice's 60 tokens.
        await on_b.send({"content": "one two three four five six", "stream": True})
        assert (await on_b.receive(timeout=15))["type"] == "ai_response_chunk"
        on_a = (await open_clients(a, alice, 1, "a"))[0]
        await on_a.send({"content": "hi"})
        refused = await on_a.receive(timeout=15)
        assert REFUSAL.fullmatch(refused["message"]), refused
        b.signal(signal.SIGKILL)
        b.wait(10)
        killed = time.monotonic()
        while time.monotonic() - killed < 15:
            await on_a.send({"content": "hi"})
            frame = await on_a.receive(timeout=15)
            if frame["type"] == "ai_response":
                return time.monotonic() - killed
            assert REFUSAL.fullmatch(frame["message"]), frame
            await asyncio.sleep(0.25)
        raise AssertionError("the killed instance's reservation never expired")

    freed_after = asyncio.run(scenario())
    assert freed_after < 3 + 2  # lease_seconds, plus the polling above
