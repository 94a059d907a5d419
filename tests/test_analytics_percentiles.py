"""Percentiles, on both databases, against a Python reference: the database's
p50/p95 of latency and time to first token must equal ``statistics.quantiles``
over the same replies, for every report and filter."""

from __future__ import annotations

import random
import statistics
from datetime import datetime, timedelta

import pytest

from tornado_app.analytics import make_filters, run_report
from tornado_app.store.models import Conversation, Message, User
from tornado_app.store.schema import ensure_schema

from .test_analytics import NOW


# Percentiles: the database's against Python's statistics.quantiles, which
# implements the same definition (method="inclusive": numpy's "linear").


def reference(values: list[float]) -> tuple[float | None, float | None]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[94]


AGENTS = [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("transformers", "smol")]


async def load_random_replies(engine, seed: int = 7) -> list[dict]:
    """~600 replies over six days by three users and three agent/models, with
    ties (whole milliseconds), missing TTFTs, errors and cancellations."""
    rng = random.Random(seed)
    await ensure_schema(engine)
    rows: list[dict] = []
    async with engine.begin() as conn:
        for n in range(3):
            user_id = (await conn.execute(User.__table__.insert().values(
                username=f"u{n}", password_hash=None, is_admin=False, disabled=False,
                created_at=NOW - timedelta(days=30)).returning(User.id))).scalar_one()
            conversation_id = (await conn.execute(Conversation.__table__.insert().values(
                user_id=user_id, client_id="c", created_at=NOW - timedelta(days=30),
            ).returning(Conversation.id))).scalar_one()
            for _ in range(200):
                agent, model = rng.choice(AGENTS[: 2 + n % 2])
                asked = NOW - timedelta(minutes=rng.randrange(6 * 24 * 60))
                status = rng.choices(["ok", "error", "cancelled"], [90, 6, 4])[0]
                latency = float(rng.randrange(50, 3000) // 7 * 7)  # ties on purpose
                ttft = None if status == "error" or rng.random() < 0.1 else float(
                    rng.randrange(1, 400))
                question = (await conn.execute(Message.__table__.insert().values(
                    conversation_id=conversation_id, user_id=user_id, role="user",
                    content="q", status="ok", created_at=asked).returning(Message.id))).scalar_one()
                row = {"user": f"u{n}", "agent": agent, "model": model, "status": status,
                       "latency_ms": latency, "ttft_ms": ttft,
                       "created_at": asked + timedelta(milliseconds=latency)}
                await conn.execute(Message.__table__.insert().values(
                    conversation_id=conversation_id, user_id=user_id, role="assistant",
                    content="a", reply_to_id=question, status=status, agent=agent, model=model,
                    latency_ms=latency, ttft_ms=ttft, created_at=row["created_at"]))
                rows.append(row)
    return rows


def expected(rows, **match) -> dict:
    chosen = [r for r in rows if r["status"] == "ok"
              and all(r[k] == v for k, v in match.items() if k not in ("since",))
              and r["created_at"] >= match.get("since", datetime.min)]
    p50, p95 = reference([r["latency_ms"] for r in chosen])
    t50, t95 = reference([r["ttft_ms"] for r in chosen])
    return {"latency_p50_ms": p50, "latency_p95_ms": p95, "ttft_p50_ms": t50, "ttft_p95_ms": t95}


def percentiles_of(row: dict) -> dict:
    return {k: row[k] for k in ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms")}


def close(found: dict, wanted: dict) -> bool:
    return found.keys() == wanted.keys() and all(
        (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-6)
        for a, b in ((found[k], wanted[k]) for k in found))


@pytest.mark.gen_test(timeout=60)
async def test_percentiles_match_the_python_reference(db_store):
    rows = await load_random_replies(db_store.engine)

    async def run(name, **filters):
        return (await run_report(db_store.engine, name, make_filters(now=NOW, **filters),
                                 now=NOW)).as_json()

    assert close(percentiles_of((await run("summary"))["summary"]), expected(rows))
    since = NOW - timedelta(hours=50)  # a partial day at the start
    assert close(percentiles_of((await run("summary", since="50h"))["summary"]),
                 expected(rows, since=since))
    assert close(percentiles_of((await run("summary", user="u1"))["summary"]),
                 expected(rows, user="u1"))
    assert close(percentiles_of((await run("summary", agent="openai"))["summary"]),
                 expected(rows, agent="openai"))
    for row in (await run("agents"))["agents"]:
        assert close(percentiles_of(row), expected(rows, agent=row["agent"], model=row["model"]))
    for row in (await run("agents", user="u0", since="3d"))["agents"]:
        assert close(percentiles_of(row), expected(
            rows, agent=row["agent"], model=row["model"], user="u0",
            since=NOW - timedelta(days=3)))
    for row in (await run("daily"))["daily"]:
        day = [r for r in rows if r["created_at"].date() == row["day"]]
        assert close(percentiles_of(row), expected(day)), row["day"]
