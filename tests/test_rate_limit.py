"""The per-user rate limit: one atomic SQL statement, exact under concurrency."""

import asyncio
import functools

import pytest

from .helpers import take_rate_limit


@pytest.mark.gen_test
async def test_burst_then_steady_rate(limiter_store):
    take = functools.partial(take_rate_limit, limiter_store)
    # 3 messages per 30 s: a burst of 3, then one every 10 s.
    results = [await take(1, 1000.0, 3, 30.0) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert results[3].retry_after == pytest.approx(10.0)
    assert not (await take(1, 1009.9, 3, 30.0)).allowed
    assert (await take(1, 1010.0, 3, 30.0)).allowed
    assert not (await take(1, 1010.0, 3, 30.0)).allowed


@pytest.mark.gen_test
async def test_denied_messages_do_not_push_the_limit_further(limiter_store):
    take = functools.partial(take_rate_limit, limiter_store)
    for _ in range(2):
        assert (await take(1, 0.0, 2, 10.0)).allowed
    for _ in range(5):
        assert not (await take(1, 1.0, 2, 10.0)).allowed
    assert (await take(1, 5.0, 2, 10.0)).allowed


@pytest.mark.gen_test
async def test_users_are_limited_separately(limiter_store):
    take = functools.partial(take_rate_limit, limiter_store)
    assert (await take(1, 0.0, 1, 60.0)).allowed
    assert not (await take(1, 0.0, 1, 60.0)).allowed
    assert (await take(2, 0.0, 1, 60.0)).allowed


@pytest.mark.gen_test
async def test_concurrent_takes_grant_exactly_the_limit(limiter_store):
    limit = 7
    results = await asyncio.gather(
        *(take_rate_limit(limiter_store, 1, 500.0, limit, 60.0) for _ in range(40))
    )
    assert sum(r.allowed for r in results) == limit


@pytest.fixture
def settings(settings):
    settings.rate_limit.messages = 3
    settings.rate_limit.per_seconds = 600
    settings.rate_limit.max_rejections = 3
    return settings


@pytest.mark.gen_test
async def test_message_over_the_limit_gets_error_and_skips_the_agent(connect, fake_agent):
    client = await connect()
    for i in range(3):
        await client.send({"content": f"m{i}"})
        assert (await client.receive())["type"] == "ai_response"
    await client.send({"content": "one too many"})
    frame = await client.receive()
    assert frame["type"] == "error"
    assert frame["message"].startswith("Rate limit exceeded: try again in ")
    assert len(fake_agent.history) == 3


@pytest.mark.gen_test
async def test_bad_frames_do_not_count(connect, fake_agent):
    client = await connect()
    for _ in range(10):
        await client.send("not json")
        assert (await client.receive())["type"] == "error"
    for i in range(3):
        await client.send({"content": f"m{i}"})
        assert (await client.receive())["type"] == "ai_response"


@pytest.mark.gen_test
async def test_sending_on_while_limited_closes_with_1008(connect, settings):
    client = await connect()
    for i in range(3):
        await client.send({"content": f"m{i}"})
        await client.receive()
    for _ in range(settings.rate_limit.max_rejections):
        await client.send({"content": "more"})
    assert await client.wait_closed() == 1008
    assert client.close_reason == "Rate limit exceeded"


@pytest.mark.gen_test
async def test_concurrent_sockets_of_one_user_share_the_limit(connect, fake_agent):
    clients = [await connect(f"c{i}") for i in range(4)]

    async def burst(client):
        for i in range(2):
            await client.send({"content": f"m{i}"})
        return [(await client.receive())["type"] for _ in range(2)]

    outcomes = await asyncio.gather(*(burst(c) for c in clients))
    kinds = [kind for outcome in outcomes for kind in outcome]
    assert kinds.count("ai_response") == 3
    assert kinds.count("error") == 5
    assert len(fake_agent.history) == 3


class ReferenceGCRA:
    """The limiter's contract in plain Python: a burst of ``messages``, then
    one message every ``per_seconds / messages`` seconds."""

    def __init__(self, messages: int, per_seconds: float):
        self.interval = per_seconds / messages
        self.tolerance = per_seconds - self.interval
        self.tat = None

    def take(self, now: float) -> bool:
        start = now if self.tat is None else max(self.tat, now)
        if start - now > self.tolerance + 1e-6:
            return False
        self.tat = start + self.interval
        return True


@pytest.mark.gen_test(timeout=120)
async def test_limiter_matches_the_reference_model(limiter_store):
    """Hypothesis: random limits and arrival times; SQL decides as the reference does."""
    from hypothesis import HealthCheck, given, settings as hypothesis_settings
    from hypothesis import strategies as st
    from sqlalchemy import delete

    from tornado_app.store.models import RateLimit

    decisions = []

    @hypothesis_settings(max_examples=60, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        messages=st.integers(1, 10),
        per_seconds=st.sampled_from([1.0, 2.5, 10.0, 60.0]),
        gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=40),
    )
    def check(messages, per_seconds, gaps):
        reference = ReferenceGCRA(messages, per_seconds)
        now = 1_000.0
        times = []
        for gap in gaps:
            now += round(gap, 3)
            times.append(now)
        decisions.append((messages, per_seconds, times, [reference.take(t) for t in times]))

    check()

    async with limiter_store.engine.begin() as conn:
        await conn.execute(delete(RateLimit))
    for index, (messages, per_seconds, times, expected) in enumerate(decisions):
        user_id = 1 if index % 2 == 0 else 2
        async with limiter_store.engine.begin() as conn:
            await conn.execute(delete(RateLimit))
        got = [
            (await take_rate_limit(limiter_store, user_id, t, messages, per_seconds)).allowed
            for t in times
        ]
        assert got == expected, (messages, per_seconds, times)
