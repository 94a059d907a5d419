"""Memories through the service, on both databases: ``/api/memories`` as the
signed-in user (bearer or cookie), the memories in every prompt (within their
share of the context), admins kept out, and ``users forget`` on the CLI."""

from __future__ import annotations

import json
import os
import stat
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient

from tornado_app.memory import Memories, MemoryCipher
from tornado_app.store import Store

from .helpers import get, run_async
from .servers import Call, add_users, ok, one_line_error, run_all, sqlite_url, write_config

MAX_ITEMS = 3


@pytest.fixture
def settings(settings):
    settings.memory.max_items = MAX_ITEMS
    return settings


async def call(base_url: str, method: str, path: str, token: str | None = None,
               body=None, cookie: str | None = None):
    """(status, JSON body) of a request to the API."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = f"access_token={cookie}"
    if body is not None and not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    response = await AsyncHTTPClient().fetch(
        f"{base_url}{path}", method=method, headers=headers, raise_error=False,
        body=body if method == "PUT" else None, allow_nonstandard_methods=True)
    assert response.headers["Content-Type"].startswith("application/json"), response.body
    return response.code, json.loads(response.body)


@pytest.mark.gen_test(timeout=60)
async def test_users_manage_their_own_memories(base_url, make_user, token_for):
    await make_user("alice")
    await make_user("bob")
    alice, bob = token_for("alice"), token_for("bob")

    assert await call(base_url, "GET", "/api/memories", alice) == (200, {"memories": []})
    assert await call(base_url, "PUT", "/api/memories/birthday", alice,
                      {"value": "March 15"}) == (200, {"key": "birthday", "value": "March 15"})
    # Keys travel URL-encoded; the cookie works as well as the bearer.
    status, _ = await call(base_url, "PUT", "/api/memories/" + quote("favourite café/bar", safe=""),
                           cookie=alice, body={"value": "Le Zinc"})
    assert status == 200
    status, body = await call(base_url, "GET", "/api/memories", cookie=alice)
    assert status == 200
    assert [(m["key"], m["value"]) for m in body["memories"]] == [
        ("birthday", "March 15"), ("favourite café/bar", "Le Zinc")]
    assert body["memories"][0]["updated_at"].endswith("Z")
    # Replacing keeps one memory under the key.
    await call(base_url, "PUT", "/api/memories/birthday", alice, {"value": "March 16"})
    _, body = await call(base_url, "GET", "/api/memories", alice)
    assert [m["value"] for m in body["memories"]] == ["March 16", "Le Zinc"]
    # Bob sees none of it, and cannot delete it.
    assert await call(base_url, "GET", "/api/memories", bob) == (200, {"memories": []})
    assert (await call(base_url, "DELETE", "/api/memories/birthday", bob))[0] == 404

    assert await call(base_url, "DELETE", "/api/memories/birthday", alice) == (
        200, {"deleted": "birthday"})
    status, body = await call(base_url, "DELETE", "/api/memories/birthday", alice)
    assert (status, body["error"]) == (404, "not_found")
    # memory.max_items (3 here): a new key past it is refused, a replacement is not.
    for key in ("two", "three"):
        assert (await call(base_url, "PUT", f"/api/memories/{key}", alice, {"value": "v"}))[0] == 200
    status, body = await call(base_url, "PUT", "/api/memories/four", alice, {"value": "v"})
    assert (status, body["error"]) == (409, "memory_full")
    assert (await call(base_url, "PUT", "/api/memories/two", alice, {"value": "w"}))[0] == 200


@pytest.mark.gen_test(timeout=60)
async def test_bad_requests_get_json_errors(base_url, make_user, token_for):
    await make_user("alice")
    alice = token_for("alice")
    for token in (None, "not-a-token"):
        status, body = await call(base_url, "GET", "/api/memories", token)
        assert (status, body["error"]) == (401, "unauthorized")
        status, _ = await call(base_url, "PUT", "/api/memories/x", token, {"value": "v"})
        assert status == 401
    bad = [
        ("k" * 65, {"value": "v"}), (quote(" padded", safe=""), {"value": "v"}), ("a%0Ab", {"value": "v"}),
        ("ok", {"value": "v" * 1001}), ("ok", {"value": ""}), ("ok", {"value": 42}),
        ("ok", {"other": "v"}), ("ok", "not json"), ("ok", "[1, 2]"),
    ]
    for key, body in bad:
        status, answer = await call(base_url, "PUT", f"/api/memories/{key}", alice, body)
        assert status == 422, (key, body, answer)
        assert answer["error_description"]
    status, _ = await call(base_url, "DELETE", "/api/memories/" + "k" * 65, alice)
    assert status == 422
    status, _ = await call(base_url, "PUT", "/api/memories", alice, {"value": "v"})
    assert status == 422
    assert (await call(base_url, "GET", "/api/memories", alice))[1] == {"memories": []}


@pytest.mark.gen_test(timeout=60)
async def test_admins_cannot_read_other_users_memories(base_url, make_user, token_for):
    await make_user("alice")
    await make_user("root", admin=True)
    await call(base_url, "PUT", "/api/memories/secret", token_for("alice"),
               {"value": "the-canary-value"})
    root = token_for("root")
    assert await call(base_url, "GET", "/api/memories", root) == (200, {"memories": []})
    for path in ("/api/admin/analytics/export?format=json", "/api/admin/analytics/users",
                 "/api/admin/memories", "/api/admin/memories/alice"):
        response = await get(f"{base_url}{path}", Authorization=f"Bearer {root}")
        assert b"the-canary-value" not in response.body, path


@pytest.mark.gen_test(timeout=60)
async def test_a_memory_added_over_http_is_in_the_next_prompt(
        service, base_url, connect, fake_agent, token_for):
    alice = await connect("c1", user="alice")
    bob = await connect("c1", user="bob")
    await call(base_url, "PUT", "/api/memories/birthday", token_for("alice"),
               {"value": "March 15"})

    await alice.send({"content": "Hello"})
    frame = await alice.receive_type("ai_response")
    assert set(frame) == {"type", "message", "timestamp"}  # v1 frames are unchanged
    system = fake_agent.history[-1].messages[0]
    assert system["role"] == "system"
    assert system["content"].startswith(service.settings.agent.system_prompt.replace(
        "{username}", "alice"))
    assert system["content"].endswith(
        "\n\nWhat the user asked you to remember (key: value):\n- birthday: March 15")

    await bob.send({"content": "Hello"})
    await bob.receive_type("ai_response")
    assert "March 15" not in fake_agent.history[-1].messages[0]["content"]

    # The placeholder puts them in place; a deleted memory is gone from the next prompt.
    service.settings.agent.system_prompt = "Facts: {memories} End, {username}."
    await alice.send({"content": "Again"})
    await alice.receive_type("ai_response")
    assert fake_agent.history[-1].messages[0]["content"] == (
        "Facts: What the user asked you to remember (key: value):\n"
        "- birthday: March 15 End, alice.")
    await call(base_url, "DELETE", "/api/memories/birthday", token_for("alice"))
    await alice.send({"content": "Once more"})
    await alice.receive_type("ai_response")
    assert fake_agent.history[-1].messages[0]["content"] == "Facts:  End, alice."


@pytest.mark.gen_test(timeout=60)
async def test_trimming_keeps_the_system_prompt_and_its_memories_whole(
        service, base_url, connect, fake_agent, token_for):
    # 4 characters a token: a budget of 300 tokens, 75 of them for memories.
    fake_agent.context_tokens, fake_agent.reply_tokens = 400, 100
    service.memories.max_items = 10
    token = token_for("alice")
    client = await connect("c1", user="alice")
    for index in range(5):  # 30 tokens each: the newest two fit in 75
        await call(base_url, "PUT", f"/api/memories/fact{index}", token,
                   {"value": f"{index}" * 110})
    for index in range(6):  # a long history, more than the budget
        await client.send({"content": f"message {index} " + "z" * 300})
        await client.receive_type("ai_response")
    messages = fake_agent.history[-1].messages
    system = messages[0]["content"]
    assert "- fact4: " + "4" * 110 in system and "- fact3: " + "3" * 110 in system
    assert "fact2" not in system
    assert messages[-1]["content"].startswith("message 5")
    assert len(messages) < 12  # older turns were trimmed, not the system prompt
    used = sum(fake_agent.count_tokens(m["content"]) + 4 for m in messages)
    assert used <= 300


def test_users_forget_deletes_a_users_memories(tmp_path):
    config = write_config(tmp_path)
    add_users(config, "alice")
    key_file = tmp_path / "data" / "memory_key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600  # made on first run

    async def remember():
        store = Store.from_url(sqlite_url(tmp_path))
        try:
            user = await store.get_user("alice")
            memories = Memories(store, MemoryCipher(key_file.read_text().strip()), 10)
            await memories.of(user.id).set("birthday", "March 15")
            await memories.of(user.id).set("city", "Lyon")
        finally:
            await store.close()

    run_async(remember())
    forgot, nobody = run_all(Call(config, ("users", "forget", "alice")),
                             Call(config, ("users", "forget", "nobody")))
    assert ok(forgot).strip() == "deleted 2 memories of alice"
    one_line_error(nobody, 1, "no user named 'nobody'")

    async def count():
        store = Store.from_url(sqlite_url(tmp_path))
        try:
            return len(await store.list_memories((await store.get_user("alice")).id))
        finally:
            await store.close()

    assert run_async(count()) == 0
