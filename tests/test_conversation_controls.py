"""Conversation controls over protocol v2 (issue 15), on SQLite and PostgreSQL:
feedback (socket and HTTP), regenerate and edit as branches, switching
branches, the prompt following the active branch, the history API's path
and tree, and the agent chosen per conversation. v1 clients see none of it.
"""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import AsyncHTTPClient

from tornado_app.config import load_settings

from .helpers import get, saved_messages

V2 = ["ai-chat.v2"]
SPEC_FIELDS = {"type", "message", "timestamp"}


@pytest.fixture
def settings(settings, second_agent, request):
    marker = request.node.get_closest_marker("rate_limit")
    settings.rate_limit.messages = marker.args[0] if marker else 1000
    settings.rate_limit.per_seconds = 3600
    settings.agent.selectable = ["fake", "fake2"]
    return settings


async def v2_client(connect, client_id="c1", user="alice"):
    """A v2 socket, past its welcome and its agent frame (conftest's connect)."""
    return await connect(client_id, user=user, subprotocols=V2)


async def exchange(client, content: str) -> tuple[str, str, str]:
    """Send a message; its (message_id, reply_id, reply text)."""
    await client.send({"content": content})
    return await answered(client)


async def answered(client) -> tuple[str, str, str]:
    ack = await client.receive_type("ack")
    final = await client.receive_type("ai_response")
    assert final["reply_id"] == ack["reply_id"]
    return ack["message_id"], ack["reply_id"], final["message"]


async def history(base_url, token, client_id="c1", whole=False) -> list[dict]:
    query = "?all=1" if whole else ""
    response = await get(f"{base_url}/api/conversations/{client_id}/messages{query}",
                         Authorization=f"Bearer {token}")
    assert response.code == 200, response.body
    return json.loads(response.body)["messages"]


async def put_feedback(base_url, reply_id, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await AsyncHTTPClient().fetch(f"{base_url}/api/replies/{reply_id}/feedback",
                                         method="PUT", body=data, headers=headers,
                                         raise_error=False)


def prompt_of(agent, index=-1) -> list[str]:
    """The contents of one request's messages after the system prompt."""
    return [m["content"] for m in agent.history[index].messages[1:]]


# Feedback


@pytest.mark.gen_test(timeout=30)
async def test_feedback_is_saved_replaced_and_removed(connect, base_url, token_for):
    client = await v2_client(connect)
    _, reply_id, _ = await exchange(client, "hi")
    await client.send({"action": "feedback", "reply_id": reply_id, "rating": 1,
                       "comment": "good"})
    thanks = await client.receive()
    assert (thanks["type"], thanks["message"], thanks["reply_id"]) == (
        "system", "Thanks for your feedback.", reply_id)
    reply = (await history(base_url, token_for("alice")))[-1]
    assert reply["feedback"] == {"rating": 1, "comment": "good"}

    await client.send({"action": "feedback", "reply_id": reply_id, "rating": -1})
    assert (await client.receive())["type"] == "system"
    reply = (await history(base_url, token_for("alice")))[-1]
    assert reply["feedback"] == {"rating": -1, "comment": None}

    await client.send({"action": "feedback", "reply_id": reply_id, "rating": 0})
    assert (await client.receive())["type"] == "system"
    assert (await history(base_url, token_for("alice")))[-1]["feedback"] is None


@pytest.mark.gen_test(timeout=30)
async def test_feedback_on_a_foreign_or_unknown_reply_or_out_of_range_saves_nothing(
    connect, base_url, token_for
):
    bob = await v2_client(connect, "c1", user="bob")
    _, bobs_reply, _ = await exchange(bob, "mine")
    alice = await v2_client(connect, "c1", user="alice")
    _, own_reply, _ = await exchange(alice, "hi")
    bad = [
        ({"action": "feedback", "reply_id": bobs_reply, "rating": 1},
         "There is no such reply of yours."),
        ({"action": "feedback", "reply_id": "0" * 32, "rating": 1},
         "There is no such reply of yours."),
        ({"action": "feedback", "reply_id": own_reply, "rating": 2},
         'Invalid feedback: "rating" must be 1, -1 or 0 (to remove it).'),
        ({"action": "feedback", "reply_id": own_reply, "rating": True},
         'Invalid feedback: "rating" must be 1, -1 or 0 (to remove it).'),
        ({"action": "feedback", "reply_id": own_reply, "rating": 1, "comment": "x" * 1001},
         'Invalid feedback: "comment" must be a string of at most 1000 characters.'),
    ]
    for frame, text in bad:
        await alice.send(frame)
        error = await alice.receive()
        assert (error["type"], error["message"]) == ("error", text)
        assert set(error) == SPEC_FIELDS
    assert (await history(base_url, token_for("alice")))[-1]["feedback"] is None
    assert (await history(base_url, token_for("bob")))[-1]["feedback"] is None


@pytest.mark.gen_test(timeout=30)
async def test_feedback_over_http(connect, base_url, token_for):
    alice = await v2_client(connect)
    _, reply_id, _ = await exchange(alice, "hi")
    bob = await v2_client(connect, user="bob")
    _, bobs_reply, _ = await exchange(bob, "mine")
    token = token_for("alice")

    response = await put_feedback(base_url, reply_id, {"rating": -1, "comment": "wrong"}, token)
    assert response.code == 200
    assert json.loads(response.body) == {"reply_id": reply_id, "rating": -1, "comment": "wrong"}
    assert (await history(base_url, token))[-1]["feedback"] == {"rating": -1,
                                                                 "comment": "wrong"}
    assert (await put_feedback(base_url, bobs_reply, {"rating": 1}, token)).code == 404
    assert (await put_feedback(base_url, "f" * 32, {"rating": 1}, token)).code == 404
    for body in ({"rating": 3}, {"comment": "no rating"}, [1], b"not json"):
        response = await put_feedback(base_url, reply_id, body, token)
        assert response.code == 422, body
        assert json.loads(response.body)["error"] == "invalid_request"
    assert (await put_feedback(base_url, reply_id, {"rating": 1})).code == 401
    assert (await history(base_url, token))[-1]["feedback"] == {"rating": -1,
                                                                 "comment": "wrong"}
    assert (await history(base_url, token_for("bob")))[-1]["feedback"] is None
    response = await put_feedback(base_url, reply_id, {"rating": 0}, token)
    assert response.code == 200
    assert (await history(base_url, token))[-1]["feedback"] is None


# Regenerate, edit, switch


@pytest.mark.gen_test(timeout=30)
async def test_regenerate_adds_a_sibling_reply_that_becomes_active(
    connect, fake_agent, base_url, token_for, store
):
    client = await v2_client(connect)
    await exchange(client, "first")
    message_id, first_reply, _ = await exchange(client, "second")
    fake_agent.enqueue("another answer")
    await client.send({"action": "regenerate"})
    again_message, second_reply, text = await answered(client)
    assert (again_message, text) == (message_id, "another answer")
    assert second_reply != first_reply
    # The same prompt as the first time: the reply it replaces is not in it.
    assert prompt_of(fake_agent) == prompt_of(fake_agent, 1) == [
        "first", "fake reply to: first", "second"]

    path = await history(base_url, token_for("alice"))
    assert [m["id"] for m in path][-2:] == [message_id, second_reply]
    assert path[-1]["siblings"] == [first_reply, second_reply]
    assert path[-1]["parent_id"] == message_id

    # By id: a branch from that reply's message.
    fake_agent.enqueue("third answer")
    await client.send({"action": "regenerate", "reply_id": first_reply})
    _, third_reply, _ = await answered(client)
    path = await history(base_url, token_for("alice"))
    assert path[-1]["id"] == third_reply
    assert path[-1]["siblings"] == [first_reply, second_reply, third_reply]
    # Every reply is kept and counted; the regenerated ones are marked.
    alice = await store.get_user("alice")
    rows = await saved_messages(store, await store.open_conversation(alice.id, "c1"))
    assert [row.regenerated for row in rows if row.role == "assistant"] == [
        False, False, True, True]


@pytest.mark.gen_test(timeout=30)
async def test_edit_branches_and_switch_brings_the_old_branch_back(
    connect, fake_agent, base_url, token_for
):
    client = await v2_client(connect)
    m1, r1, _ = await exchange(client, "one")
    m2, r2, _ = await exchange(client, "two")
    m3, r3, _ = await exchange(client, "three")
    await client.send({"action": "edit", "message_id": m2, "content": "TWO"})
    m2b, r2b, text = await answered(client)
    assert text == "fake reply to: TWO"
    assert prompt_of(fake_agent) == ["one", "fake reply to: one", "TWO"]

    token = token_for("alice")
    path = await history(base_url, token)
    assert [m["id"] for m in path] == [m1, r1, m2b, r2b]
    assert path[2]["siblings"] == [m2, m2b] and path[2]["parent_id"] == r1
    tree = await history(base_url, token, whole=True)
    assert {m["id"] for m in tree} == {m1, r1, m2, r2, m3, r3, m2b, r2b}

    # Back to the first version: its newest descendant becomes the leaf.
    await client.send({"action": "switch", "message_id": m2})
    switched = await client.receive()
    assert (switched["type"], switched["path"]) == ("system", [m1, r1, m2, r2, m3, r3])
    assert [m["id"] for m in await history(base_url, token)] == [m1, r1, m2, r2, m3, r3]
    # The prompt follows the active branch only.
    await exchange(client, "four")
    assert prompt_of(fake_agent) == [
        "one", "fake reply to: one", "two", "fake reply to: two", "three",
        "fake reply to: three", "four"]
    assert "TWO" not in json.dumps([r.messages for r in fake_agent.history[-1:]])

    await client.send({"action": "switch", "message_id": r2b})
    assert (await client.receive())["path"] == [m1, r1, m2b, r2b]
    await exchange(client, "five")
    assert prompt_of(fake_agent) == ["one", "fake reply to: one", "TWO", "fake reply to: TWO",
                                     "five"]


@pytest.mark.gen_test(timeout=30)
async def test_another_socket_follows_a_switch_at_its_next_message(connect, fake_agent):
    first = await v2_client(connect)
    second = await v2_client(connect)
    m1, _, _ = await exchange(first, "one")
    await exchange(second, "two")  # the second socket's copy now holds both exchanges
    await first.send({"action": "edit", "message_id": m1, "content": "ONE"})
    await answered(first)
    await exchange(second, "three")
    assert prompt_of(fake_agent) == ["ONE", "fake reply to: ONE", "three"]


@pytest.mark.gen_test(timeout=30)
async def test_unknown_targets_are_errors_and_change_nothing(connect, fake_agent, store):
    client = await v2_client(connect)
    await client.send({"action": "regenerate"})
    assert (await client.receive())["message"] == "There is no message to regenerate a reply to."
    m1, r1, _ = await exchange(client, "one")
    other = await v2_client(connect, "c2")
    _, foreign_reply, _ = await exchange(other, "elsewhere")
    cases = [
        ({"action": "regenerate", "reply_id": foreign_reply}, "There is no such reply of yours."),
        ({"action": "regenerate", "reply_id": m1}, "There is no such reply of yours."),
        ({"action": "edit", "message_id": r1, "content": "x"},
         "There is no such message of yours."),
        ({"action": "edit", "message_id": "nope", "content": "x"},
         "There is no such message of yours."),
        ({"action": "switch", "message_id": foreign_reply}, "There is no such message of yours."),
        ({"action": "edit", "message_id": m1, "content": "  "},
         'Invalid message format: "content" must be a non-empty string.'),
        ({"action": "switch"}, 'Invalid message format: "message_id" must be a message\'s id.'),
    ]
    for frame, text in cases:
        await client.send(frame)
        error = await client.receive()
        assert (error["type"], error["message"]) == ("error", text), frame
    assert len(fake_agent.history) == 2
    alice = await store.get_user("alice")
    conversation = await store.open_conversation(alice.id, "c1")
    assert len(await saved_messages(store, conversation)) == 2


@pytest.mark.rate_limit(2)
@pytest.mark.gen_test(timeout=30)
async def test_regenerate_and_edit_take_the_rate_limit(connect, fake_agent):
    client = await v2_client(connect)
    m1, _, _ = await exchange(client, "one")
    await client.send({"action": "regenerate"})
    await answered(client)
    for frame in ({"action": "regenerate"}, {"action": "edit", "message_id": m1,
                                              "content": "x"}):
        await client.send(frame)
        error = await client.receive()
        assert error["type"] == "error" and error["message"].startswith("Rate limit exceeded")
    assert len(fake_agent.history) == 2


# The agent per conversation


@pytest.mark.gen_test(timeout=30)
async def test_use_agent_answers_the_conversation_with_the_chosen_agent(
    connect, fake_agent, second_agent, service, store
):
    client = await connect("c1", subprotocols=V2, welcome=False)
    assert (await client.receive())["message"].startswith("Welcome")
    picker = await client.receive()
    assert (picker["type"], picker["message"], picker["agent"], picker["selectable"]) == (
        "system", "", "fake", ["fake", "fake2"])
    await client.send({"action": "use_agent", "agent": "fake2"})
    confirmed = await client.receive()
    assert (confirmed["message"], confirmed["agent"]) == ("Now answering with fake2.", "fake2")
    await exchange(client, "hi")
    assert len(second_agent.history) == 1 and not fake_agent.history
    # Another conversation of the same user keeps the backend.
    other = await v2_client(connect, "c2")
    await exchange(other, "hi")
    assert len(fake_agent.history) == 1
    # A reconnect sees the choice.
    again = await connect("c1", subprotocols=V2, welcome=False)
    await again.receive()  # the welcome
    assert (await again.receive())["agent"] == "fake2"

    await client.send({"action": "use_agent", "agent": "echo"})
    error = await client.receive()
    assert (error["type"], error["message"]) == (
        "error", "There is no agent 'echo' to choose; choose one of: fake, fake2.")

    # A reload that removes it: the next message says so and uses the backend.
    fresh = load_settings(None, {"TORNADO_APP_AGENT__BACKEND": "fake",
                                 "TORNADO_APP_AUTH__JWT_SECRET": "x" * 40})
    service.pool.swap(fresh)
    service.settings.agent = fresh.agent
    await client.send({"content": "after the reload"})
    notice = await client.receive()
    assert (notice["type"], notice["message"], notice["agent"]) == (
        "system", "fake2 is no longer available; now answering with fake.", "fake")
    await answered(client)
    assert len(fake_agent.history) == 2 and len(second_agent.history) == 1
    alice = await store.get_user("alice")
    rows = await saved_messages(store, await store.open_conversation(alice.id, "c1"))
    assert [row.agent for row in rows if row.role == "assistant"] == ["fake2", "fake"]
    await exchange(client, "and again")  # said once
    assert len(fake_agent.history) == 3


# v1 is unchanged


@pytest.mark.gen_test(timeout=30)
async def test_v1_sees_none_of_the_controls(connect, fake_agent):
    client = await connect(welcome=False)
    welcome = await client.receive()
    assert set(welcome) == SPEC_FIELDS
    for action in ("feedback", "regenerate", "edit", "switch", "use_agent"):
        await client.send({"action": action, "reply_id": "x", "message_id": "x",
                           "rating": 1, "content": "x", "agent": "fake2"})
        error = await client.receive()
        assert error["message"] == 'Invalid message format: the only action is "cancel".'
        assert set(error) == SPEC_FIELDS
    await client.send({"content": "hi"})
    reply = await client.receive()
    assert reply["type"] == "ai_response" and set(reply) == SPEC_FIELDS


def test_an_unknown_selectable_agent_is_a_one_line_config_error():
    from tornado_app import agents
    from tornado_app.config import ConfigError

    settings = load_settings(None, {"TORNADO_APP_AGENT__SELECTABLE": "[echo, nope]",
                                    "TORNADO_APP_AUTH__JWT_SECRET": "x" * 40})
    with pytest.raises(ConfigError) as failure:
        agents.validate_agent_settings(settings, agents.available_agents())
    assert str(failure.value).startswith("agent.selectable[1]: unknown agent 'nope'; available:")
