"""SIGHUP reloads the ``memory`` section (app.Service.reload_memory), on
SQLite and PostgreSQL: ``max_items`` and ``prompt_share`` apply to the next
request; the key does not change (memories saved before stay readable, and a
new key waits for a restart). Plus the real signal on a server process."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient

from .helpers import run_async, wait_for_log
from .servers import add_users, token, write_config


async def call(base_url, method, path, token, body=None):
    response = await AsyncHTTPClient().fetch(
        f"{base_url}{path}", method=method, raise_error=False,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=json.dumps(body) if body is not None else None)
    return response.code, json.loads(response.body)


def write(config, settings, tmp_path, memory: dict) -> None:
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "database": {"url": settings.database.url},
        "auth": {"jwt_secret": settings.jwt_secret}, "agent": {"backend": "fake"},
        "memory": memory}))


@pytest.mark.gen_test(timeout=60)
async def test_sighup_applies_max_items_and_prompt_share_and_keeps_the_key(
        service, settings, base_url, connect, fake_agent, token_for, tmp_path, caplog):
    fake_agent.context_tokens, fake_agent.reply_tokens = 400, 100  # a budget of 300 tokens
    alice = token_for("alice")
    client = await connect("c1", user="alice")
    for index in range(3):  # 30 tokens each: all fit in 0.25 of 300
        assert (await call(base_url, "PUT", f"/api/memories/fact{index}", alice,
                           {"value": f"{index}" * 110}))[0] == 200
    key = settings.memory_key
    config = tmp_path / "config.yaml"
    write(config, settings, tmp_path, {"max_items": 3, "prompt_share": 0.15,
                                       "key": "another-key-" + "k" * 40})
    service.config_path = str(config)
    service.reload_agents()  # what SIGHUP calls

    assert (service.settings.memory.max_items, service.memories.max_items) == (3, 3)
    code, body = await call(base_url, "PUT", "/api/memories/fact3", alice, {"value": "x"})
    assert code == 409 and body["error"] == "memory_full"
    await client.send({"content": "hello"})
    await client.receive_type("ai_response")
    system = fake_agent.history[-1].messages[0]["content"]
    assert "- fact2: " in system and "fact1" not in system  # 45 of 300 tokens: one line
    # The key stays: what was saved before reads back, and the log says why.
    assert settings.memory_key == key
    code, body = await call(base_url, "GET", "/api/memories", alice)
    assert [m["value"] for m in body["memories"]] == ["0" * 110, "1" * 110, "2" * 110]
    assert "memory.key / memory.key_file changed" in caplog.text

    write(config, settings, tmp_path, {"max_items": 10})  # back to the default share
    service.reload_agents()
    assert (await call(base_url, "PUT", "/api/memories/fact3", alice, {"value": "x"}))[0] == 200
    await client.send({"content": "again"})
    await client.receive_type("ai_response")
    assert "- fact1: " in fake_agent.history[-1].messages[0]["content"]


def test_a_real_sighup_reloads_memory_max_items(tmp_path, servers):
    config = write_config(tmp_path, memory={"max_items": 5})
    add_users(config, "alice")
    alice = token(config, "alice")
    server = servers(config)

    async def save(key):
        return (await call(server.base_url, "PUT", f"/api/memories/{key}", alice,
                           {"value": "v"}))[0]

    assert run_async(save("one")) == 200
    data = yaml.safe_load(config.read_text())
    data["memory"] = {"max_items": 1}
    config.write_text(yaml.safe_dump(data))
    os.kill(server.pid, signal.SIGHUP)
    wait_for_log(server, "memory now: max_items 1")
    assert run_async(save("two")) == 409
