"""Protocol v2 (subprotocol ai-chat.v2) and replies that belong to their
conversation: ids on frames, the ack, resume and cancel by id, on one
instance, on SQLite and PostgreSQL. Several instances: test_durable_replies.py.
"""

from __future__ import annotations

import asyncio

import pytest

from .helpers import saved_messages

V2 = ["ai-chat.v2"]
SPEC_FIELDS = {"type", "message", "timestamp"}


@pytest.fixture
def settings(settings):
    settings.rate_limit.messages = 1000
    return settings


async def slow_reply(fake_agent, pieces=("one ", "two ", "three ", "four"), delay=0.15):
    """Script a reply that takes a while: a piece every ``delay`` seconds."""
    fake_agent.enqueue(*pieces, delay=delay)


# v1 sees the spec and nothing else


@pytest.mark.gen_test(timeout=30)
async def test_v1_frames_have_exactly_the_spec_fields_through_a_full_exchange(
    connect, fake_agent
):
    fake_agent.enqueue("Hello ", "there")
    fake_agent.enqueue("never ", "finished", delay=0.3)
    client = await connect(welcome=False)
    assert client.subprotocol is None
    frames = [await client.receive()]  # the welcome
    await client.send({"content": "hi", "stream": True})
    frames += await client.receive_until("ai_response")
    await client.send({"content": "again", "stream": True})
    frames.append(await client.receive())  # its first chunk
    await client.send({"action": "cancel"})
    frames += await client.receive_until("system")
    await client.send({"action": "cancel"})  # nothing left to cancel
    await client.send("not json")
    await client.send({"action": "resume", "reply_id": "x"})  # v2's action
    frames += [await client.receive() for _ in range(3)]
    assert [f["type"] for f in frames] == [
        "system", "ai_response_chunk", "ai_response_chunk", "ai_response",
        "ai_response_chunk", "system", "error", "error", "error"]
    assert frames[-1]["message"] == 'Invalid message format: the only action is "cancel".'
    for frame in frames:
        assert set(frame) == SPEC_FIELDS, frame


@pytest.mark.gen_test
async def test_an_unknown_subprotocol_gets_the_spec(connect):
    client = await connect(subprotocols=["chat.superchat", "ai-chat.v9"], welcome=False)
    assert client.subprotocol is None
    assert set(await client.receive()) == SPEC_FIELDS
    await client.send({"content": "hi"})
    assert set(await client.receive()) == SPEC_FIELDS


# v2: ids on every frame about a reply


@pytest.mark.gen_test
async def test_v2_is_echoed_and_every_frame_of_a_reply_carries_its_ids(
    connect, fake_agent, store
):
    fake_agent.enqueue("Hello ", "there", "!")
    client = await connect(subprotocols=V2)
    assert client.subprotocol == "ai-chat.v2"
    await client.send({"content": "hi", "stream": True})
    ack, *chunks, final = await client.receive_until("ai_response")
    assert (ack["type"], ack["message"]) == ("ack", "")
    assert set(ack) == SPEC_FIELDS | {"message_id", "reply_id"}
    message_id = ack["message_id"]
    reply_id = final["reply_id"]
    assert ack["reply_id"] == reply_id  # known at once: resume or cancel it by id
    assert [c["seq"] for c in chunks] == [0, 1, 2]
    for chunk in chunks:
        assert (chunk["type"], chunk["reply_id"], chunk["message_id"]) == (
            "ai_response_chunk", reply_id, message_id)
    assert "".join(c["message"] for c in chunks) == final["message"] == "Hello there!"
    assert set(final) == SPEC_FIELDS | {"reply_id", "message_id"}
    assert final["message_id"] == message_id != reply_id
    # The ids are the rows' own, as the history API gives them.
    rows = await saved_messages(store, await store.open_conversation(1, "client-1"))
    assert [(r.role, r.public_id) for r in rows] == [("user", message_id),
                                                      ("assistant", reply_id)]


@pytest.mark.gen_test
async def test_v2_ids_differ_between_replies(connect):
    client = await connect(subprotocols=V2)
    ids = set()
    for n in range(3):
        await client.send({"content": f"m{n}"})
        ack, final = await client.receive_until("ai_response")
        ids |= {ack["message_id"], final["reply_id"]}
    assert len(ids) == 6


@pytest.mark.gen_test
async def test_v2_failed_and_cancelled_replies_end_with_their_ids(connect, fake_agent):
    from tornado_app.agents import AgentError

    fake_agent.enqueue("partial", error=AgentError("upstream", "the upstream failed"))
    await slow_reply(fake_agent)
    client = await connect(subprotocols=V2)
    await client.send({"content": "fail"})
    ack, error = await client.receive_until("error")
    assert error["message"].startswith("An error occurred while processing your message")
    assert (error["reply_id"], error["message_id"]) == (error["reply_id"], ack["message_id"])
    await client.send({"content": "cancel me", "stream": True})
    ack, chunk = [await client.receive() for _ in range(2)]
    await client.send({"action": "cancel"})
    cancelled = await client.receive_type("system")
    assert cancelled["message"] == "The reply was cancelled."
    assert (cancelled["reply_id"], cancelled["message_id"]) == (
        chunk["reply_id"], ack["message_id"])


class TestErrorsAboutAMessage:
    @pytest.fixture
    def settings(self, settings):
        settings.rate_limit.messages = 1
        settings.rate_limit.per_seconds = 600
        settings.chat.max_pending = 1
        return settings

    @pytest.mark.gen_test
    async def test_carry_no_ids(self, connect, fake_agent):
        fake_agent.enqueue("slow", delay=0.3)
        client = await connect(subprotocols=V2)
        await client.send("not json")
        bad = await client.receive()
        await client.send({"content": "first"})
        await client.send({"content": "second"})  # the queue holds one
        frames = await client.receive_until("ai_response")
        await client.send({"content": "third"})  # over the rate limit
        limited = await client.receive()
        # The queue's error comes at once: before or after the ack.
        assert sorted(f["type"] for f in frames) == ["ack", "ai_response", "error"]
        (queue_full,) = [f for f in frames if f["type"] == "error"]
        for frame in (bad, queue_full, limited):
            assert frame["type"] == "error" and set(frame) == SPEC_FIELDS, frame
        assert limited["message"].startswith("Rate limit exceeded")


# Resume


@pytest.mark.gen_test(timeout=30)
async def test_resume_a_reply_in_flight_from_another_socket(connect, fake_agent):
    await slow_reply(fake_agent)
    first = await connect("c1", subprotocols=V2)
    await first.send({"content": "go", "stream": True})
    _ack, chunk0, chunk1 = [await first.receive() for _ in range(3)]
    first.close()  # the page was reloaded
    second = await connect("c1", subprotocols=V2, welcome=False)
    welcome, agent, progress = [await second.receive() for _ in range(3)]
    assert welcome["message"].startswith("Welcome") and agent["agent"] == "fake"
    assert (progress["type"], progress["message"]) == ("system", "A reply is in progress.")
    assert progress["reply_id"] == chunk0["reply_id"]
    assert progress["message_id"] == chunk0["message_id"] and progress["seq"] >= 1
    await second.send({"action": "resume", "reply_id": chunk0["reply_id"], "after_seq": 1})
    rest = await second.receive_until("ai_response")
    chunks = [chunk0, chunk1] + rest[:-1]
    assert [c["seq"] for c in chunks] == [0, 1, 2, 3]
    assert "".join(c["message"] for c in chunks) == rest[-1]["message"] == "one two three four"
    assert rest[-1]["reply_id"] == chunk0["reply_id"]


@pytest.mark.gen_test(timeout=30)
async def test_resume_a_finished_reply_gives_the_missing_chunks_and_the_end(connect, fake_agent):
    fake_agent.enqueue("a", "b", "c", "d")
    client = await connect(subprotocols=V2)
    await client.send({"content": "go"})  # not streamed: the ack and the end only
    _ack, final = await client.receive_until("ai_response")
    await client.send({"action": "resume", "reply_id": final["reply_id"], "after_seq": 1})
    frames = await client.receive_until("ai_response")
    assert [(f["type"], f.get("seq"), f["message"]) for f in frames] == [
        ("ai_response_chunk", 2, "c"), ("ai_response_chunk", 3, "d"),
        ("ai_response", None, "abcd")]
    await client.send({"action": "resume", "reply_id": final["reply_id"]})  # from the start
    frames = await client.receive_until("ai_response")
    assert [f.get("seq") for f in frames] == [0, 1, 2, 3, None]


@pytest.mark.gen_test
async def test_resume_of_an_unknown_or_foreign_reply_is_an_error(connect):
    alice = await connect("c1", subprotocols=V2)
    await alice.send({"content": "mine"})
    _ack, final = await alice.receive_until("ai_response")
    bob = await connect("c1", user="bob", subprotocols=V2)
    for reply_id in (final["reply_id"], "0" * 32):
        await bob.send({"action": "resume", "reply_id": reply_id})
        error = await bob.receive()
        assert (error["type"], error["message"]) == ("error", "There is no such reply of yours.")
        assert set(error) == SPEC_FIELDS
    await bob.send({"action": "resume", "reply_id": 5})
    assert (await bob.receive())["message"] == (
        'Invalid message format: "reply_id" must be a reply\'s id.')
    await bob.send({"action": "resume", "reply_id": final["reply_id"], "after_seq": -2})
    assert (await bob.receive())["message"] == (
        'Invalid message format: "after_seq" must be an integer >= -1.')


class TestResumeAfterTheWindow:
    @pytest.fixture
    def settings(self, settings):
        settings.chat.resume_window_seconds = 0
        return settings

    @pytest.mark.gen_test
    async def test_a_forgotten_stream_resumes_as_one_chunk(self, connect, fake_agent, service):
        fake_agent.enqueue("a", "b", "c")
        client = await connect(subprotocols=V2)
        await client.send({"content": "go"})
        _ack, final = await client.receive_until("ai_response")
        await asyncio.sleep(0.01)
        await service.replies.sweep()  # forgets streams that ended before now
        assert await service.store.reply_state(final["reply_id"]) is None
        await client.send({"action": "resume", "reply_id": final["reply_id"]})
        frames = await client.receive_until("ai_response")
        assert [(f["type"], f.get("seq"), f["message"]) for f in frames] == [
            ("ai_response_chunk", 0, "abc"), ("ai_response", None, "abc")]


# Cancel by id


@pytest.mark.gen_test(timeout=30)
async def test_cancel_by_id_from_another_socket(connect, fake_agent, store):
    await slow_reply(fake_agent)
    asker = await connect("c1", subprotocols=V2)
    await asker.send({"content": "go", "stream": True})
    _ack, chunk = await asker.receive(), await asker.receive()
    other = await connect("c2", subprotocols=V2)
    await other.send({"action": "cancel", "reply_id": chunk["reply_id"]})
    for client in (asker, other):
        cancelled = await client.receive_type("system")
        assert cancelled["message"] == "The reply was cancelled."
        assert cancelled["reply_id"] == chunk["reply_id"]
    rows = await saved_messages(store, await store.open_conversation(1, "c1"))
    assert (rows[-1].status, rows[-1].public_id) == ("cancelled", chunk["reply_id"])


@pytest.mark.gen_test(timeout=30)
async def test_cancel_by_id_of_a_foreign_or_finished_reply_is_an_error(connect, fake_agent):
    await slow_reply(fake_agent)
    alice = await connect("c1", subprotocols=V2)
    await alice.send({"content": "go", "stream": True})
    _ack, chunk = await alice.receive(), await alice.receive()
    bob = await connect("c1", user="bob", subprotocols=V2)
    await bob.send({"action": "cancel", "reply_id": chunk["reply_id"]})
    assert (await bob.receive())["message"] == "There is no such reply of yours."
    final = (await alice.receive_until("ai_response"))[-1]  # alice's reply went on
    assert final["message"] == "one two three four"
    await alice.send({"action": "cancel", "reply_id": chunk["reply_id"]})
    assert (await alice.receive())["message"] == "There is no reply in progress to cancel."


@pytest.mark.gen_test
async def test_a_bug_while_saving_a_reply_ends_it_for_its_listeners(
    connect, fake_agent, service, monkeypatch
):
    async def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service.store, "finish_reply", broken)
    client = await connect(subprotocols=V2)
    await client.send({"content": "hi"})
    ack, end = await client.receive_until("error")
    assert end["message"] == "An unexpected error occurred while processing your message."
    assert end["reply_id"] == ack["reply_id"]
    monkeypatch.undo()
    await client.send({"content": "again"})  # the socket goes on
    assert (await client.receive_until("ai_response"))[-1]["message"] == "fake reply to: again"
