"""``analytics tools``: calls, errors, timeouts and latency percentiles per
tool and per agent, with the usual filters; the JSON API; the CLI."""

from __future__ import annotations

import json

import pytest

from tornado_app.analytics import make_filters, run_report
from tornado_app.tool_loop import Step

from .helpers import ADMIT, get
from .servers import cli, ok, one_line_error, write_config


async def reply_with_steps(store, user, client_id, agent, steps):
    conversation = await store.open_conversation(user.id, client_id)
    admission = await store.admit(conversation, user.id, "q", now=0.0, messages=1000,
                                  per_seconds=1, after_id=0, history_limit=10, **ADMIT)
    await store.finish_reply(admission.reply_id, conversation, user.id, admission.message_id,
                             ["a"], False, steps=steps, content="a", status="ok", agent=agent)


def steps(name, *outcomes):
    return [Step(0, f"c{i}", name, {}, "r", status, latency)
            for i, (status, latency) in enumerate(outcomes)]


async def load_tool_calls(store):
    alice = await store.create_user("alice", None)
    bob = await store.create_user("bob", None)
    await reply_with_steps(store, alice, "a1", "openai", steps(
        "clock", ("ok", 10.0), ("ok", 20.0), ("timeout", 1000.0)))
    await reply_with_steps(store, alice, "a2", "transformers", steps(
        "lookup", ("error", 5.0)))
    await reply_with_steps(store, bob, "b1", "openai", steps("clock", ("ok", 30.0)))


@pytest.mark.gen_test(timeout=60)
async def test_tools_report_per_tool_and_per_agent(db_store):
    await db_store.ensure_schema()
    await load_tool_calls(db_store)
    report = (await run_report(db_store.engine, "tools", make_filters())).as_json()
    assert report["tools"] == [
        {"tool": "clock", "calls": 4, "errors": 1, "timeouts": 1, "error_rate": 0.25,
         "latency_p50_ms": 25.0, "latency_p95_ms": pytest.approx(854.5)},
        {"tool": "lookup", "calls": 1, "errors": 1, "timeouts": 0, "error_rate": 1.0,
         "latency_p50_ms": 5.0, "latency_p95_ms": 5.0},
    ]
    assert [(row["agent"], row["calls"], row["errors"]) for row in report["agents"]] == [
        ("openai", 4, 1), ("transformers", 1, 1)]
    by_user = (await run_report(db_store.engine, "tools", make_filters(user="bob"))).as_json()
    assert [(row["tool"], row["calls"]) for row in by_user["tools"]] == [("clock", 1)]
    by_agent = (await run_report(db_store.engine, "tools",
                                 make_filters(agent="transformers"))).as_json()
    assert [row["tool"] for row in by_agent["tools"]] == ["lookup"]
    later = (await run_report(db_store.engine, "tools", make_filters(since="2099-01-01")))
    assert later.as_json()["tools"] == [] and later.as_json()["agents"] == []


@pytest.mark.gen_test(timeout=60)
async def test_the_json_api_serves_the_tools_report(base_url, store, make_user, token_for):
    await load_tool_calls(store)
    await make_user("root", admin=True)
    response = await get(f"{base_url}/api/admin/analytics/tools?agent=openai",
                         Authorization=f"Bearer {token_for('root')}")
    assert response.code == 200
    body = json.loads(response.body)
    assert body["report"] == "tools" and body["filters"]["agent"] == "openai"
    assert [(row["tool"], row["calls"]) for row in body["tools"]] == [("clock", 4)]


def test_the_cli_prints_the_tools_report(tmp_path):
    config = write_config(tmp_path)
    assert "tool" in ok(cli(config, "analytics", "tools"))
    body = json.loads(ok(cli(config, "analytics", "tools", "--format", "json")))
    assert body["tools"] == [] and body["agents"] == []
    one_line_error(cli(config, "analytics", "tools", "--since", "soon"), 2, "since")
