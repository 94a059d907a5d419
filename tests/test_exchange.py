"""One exchange end to end: transcripts, streaming, cancel, errors, deadlines,
fallbacks, history and hot swap (the host's side of the agent contract)."""

import asyncio

import pytest

from tornado_app.agents import AgentError
from tornado_app.history import HISTORY_LIMIT

from .helpers import saved_messages


async def rows(store, client_id="client-1", user_id=1):
    conversation_id = await store.open_conversation(user_id, client_id)
    return await saved_messages(store, conversation_id)


@pytest.mark.gen_test
async def test_user_message_is_committed_before_the_agent_is_called(connect, fake_agent, store):
    gate = asyncio.Event()
    fake_agent.enqueue("the reply", gate=gate)
    client = await connect()
    await client.send({"content": "question"})
    await fake_agent.received()
    saved = await rows(store)
    assert [(r.role, r.content) for r in saved] == [("user", "question")]
    gate.set()
    assert (await client.receive())["message"] == "the reply"


@pytest.mark.gen_test
async def test_reply_is_saved_with_its_bookkeeping(connect, fake_agent, store):
    fake_agent.enqueue("Hello", " there", usage=(11, 2))
    client = await connect()
    await client.send({"content": "hi"})
    assert (await client.receive())["message"] == "Hello there"
    user_row, reply = await rows(store)
    assert (user_row.role, user_row.content, user_row.status) == ("user", "hi", "ok")
    assert (reply.role, reply.content, reply.status) == ("assistant", "Hello there", "ok")
    assert reply.reply_to_id == user_row.id
    assert (reply.agent, reply.model) == ("fake", "fake-model")
    assert (reply.tokens_in, reply.tokens_out) == (11, 2)
    assert reply.latency_ms >= reply.ttft_ms >= 0
    assert reply.user_id == user_row.user_id == 1


@pytest.mark.gen_test
async def test_tokens_are_counted_when_the_agent_reports_none(connect, fake_agent, store):
    fake_agent.enqueue("x" * 40)
    client = await connect()
    await client.send({"content": "y" * 80})
    await client.receive()
    reply = (await rows(store))[-1]
    assert reply.tokens_out == 10  # the base Agent's estimate: 4 characters a token
    assert reply.tokens_in > 20


@pytest.mark.gen_test
async def test_streaming_is_opt_in(connect, fake_agent):
    fake_agent.enqueue("a", "b", "c")
    fake_agent.enqueue("a", "b", "c")
    client = await connect()
    await client.send({"content": "plain"})
    assert (await client.receive()) | {"timestamp": None} == {
        "type": "ai_response", "message": "abc", "timestamp": None}
    await client.send({"content": "streamed", "stream": True})
    frames = [await client.receive() for _ in range(4)]
    assert [f["type"] for f in frames] == ["ai_response_chunk"] * 3 + ["ai_response"]
    assert [f["message"] for f in frames] == ["a", "b", "c", "abc"]
    assert all(set(f) == {"type", "message", "timestamp"} for f in frames)


@pytest.mark.gen_test
async def test_agent_failure_gives_a_safe_error_with_a_reference(connect, fake_agent, store):
    fake_agent.enqueue(error=AgentError("upstream", "upstream said: sk-secret-body"))
    client = await connect()
    await client.send({"content": "hi"})
    frame = await client.receive()
    assert frame["type"] == "error"
    assert "sk-secret" not in frame["message"]
    reply = (await rows(store))[-1]
    assert reply.status == "error"
    assert reply.error_ref and f"reference {reply.error_ref}" in frame["message"]
    await client.send({"content": "again"})
    assert (await client.receive())["type"] == "ai_response"


@pytest.mark.gen_test
async def test_a_bug_in_a_plugin_is_an_error_frame_not_a_dropped_socket(connect, fake_agent):
    fake_agent.enqueue("partial ", error=ZeroDivisionError("boom"))
    client = await connect()
    await client.send({"content": "hi"})
    frame = await client.receive()
    assert frame["type"] == "error"
    assert "boom" not in frame["message"]
    await client.send({"content": "still open"})
    assert (await client.receive())["type"] == "ai_response"


class TestDeadline:
    @pytest.fixture
    def settings(self, settings):
        settings.agent.timeout_seconds = 0.3
        return settings

    @pytest.mark.gen_test
    async def test_a_hung_agent_hits_the_deadline(self, connect, fake_agent, store):
        fake_agent.enqueue("never", gate=asyncio.Event())
        client = await connect()
        await client.send({"content": "hi"})
        frame = await client.receive()
        assert frame["type"] == "error"
        assert "did not answer in time" in frame["message"]
        assert (await rows(store))[-1].status == "error"


@pytest.mark.gen_test
async def test_one_hung_reply_does_not_block_other_users(connect, fake_agent):
    fake_agent.enqueue("never", gate=asyncio.Event())
    stuck = await connect("c1", user="alice")
    await stuck.send({"content": "hang"})
    # The fake agent hands out its script in arrival order: bob's message
    # must not overtake alice's (PostgreSQL's group commit may admit it first).
    await fake_agent.received()
    other = await connect("c2", user="bob")
    await other.send({"content": "hi"})
    assert (await other.receive())["type"] == "ai_response"
    with pytest.raises(asyncio.TimeoutError):
        await stuck.receive(timeout=0.1)  # still waiting on its agent


@pytest.mark.gen_test
async def test_cancel_stops_the_reply_and_saves_the_partial_text(connect, fake_agent, store):
    fake_agent.enqueue("partial ", "rest", delay=0.2)
    client = await connect()
    await client.send({"content": "long one", "stream": True})
    assert (await client.receive())["message"] == "partial "
    await client.send({"action": "cancel"})
    frame = await client.receive()
    assert frame == frame | {"type": "system", "message": "The reply was cancelled."}
    reply = (await rows(store))[-1]
    assert (reply.status, reply.content) == ("cancelled", "partial ")
    await client.send({"content": "next"})
    assert (await client.receive())["type"] == "ai_response"


async def close_mid_reply(connect, fake_agent, store) -> list:
    """Close the socket after the first chunk; the rows once the reply is saved."""
    fake_agent.enqueue("partial ", "rest", delay=0.2)
    client = await connect()
    await client.send({"content": "long one", "stream": True})
    await client.receive()
    client.close()
    for _ in range(100):
        saved = await rows(store)
        if len(saved) == 2:
            break
        await asyncio.sleep(0.02)
    return saved


@pytest.mark.gen_test
async def test_a_reply_goes_on_when_its_socket_closes(connect, fake_agent, store):
    saved = await close_mid_reply(connect, fake_agent, store)
    assert (saved[-1].status, saved[-1].content) == ("ok", "partial rest")


class TestNotFinishingAfterDisconnect:
    @pytest.fixture
    def settings(self, settings):
        settings.chat.finish_after_disconnect = False
        return settings

    @pytest.mark.gen_test
    async def test_closing_the_socket_cancels_and_saves(self, connect, fake_agent, store):
        saved = await close_mid_reply(connect, fake_agent, store)
        assert (saved[-1].status, saved[-1].content) == ("cancelled", "partial ")


@pytest.mark.gen_test
async def test_messages_wait_for_the_agent_to_be_ready(connect, fake_agent):
    fake_agent.set_ready(False)
    client = await connect()  # the welcome comes at once
    await client.send({"content": "early"})
    with pytest.raises(asyncio.TimeoutError):
        await client.receive(timeout=0.2)
    fake_agent.set_ready()
    assert (await client.receive())["message"] == "fake reply to: early"


@pytest.mark.gen_test
async def test_prompt_has_system_prompt_with_username_and_history(connect, fake_agent, settings):
    settings.agent.system_prompt = "Be brief with {username}."
    client = await connect()
    for text in ("one", "two"):
        await client.send({"content": text})
        await client.receive()
    messages = fake_agent.history[-1].messages
    assert messages[0] == {"role": "system", "content": "Be brief with alice."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "two"
    assert fake_agent.history[-1].username == "alice"


@pytest.mark.gen_test
async def test_history_is_trimmed_oldest_first_to_the_context(connect, fake_agent):
    client = await connect()
    for i in range(6):
        await client.send({"content": f"message {i} " + "w" * 100})
        await client.receive()
    # Each turn is ~30 estimated tokens; leave room for about two turns.
    fake_agent.context_tokens = fake_agent.reply_tokens + 150
    await client.send({"content": "last"})
    await client.receive()
    messages = fake_agent.history[-1].messages
    assert messages[0]["role"] == "system"
    assert messages[1]["role"] == "user"  # a cut never starts on a reply
    assert messages[-1]["content"] == "last"
    assert 3 <= len(messages) < 13
    kept = [m["content"][:9] for m in messages[1:-1] if m["role"] == "user"]
    assert kept == sorted(kept) and "message 5" in kept and "message 0" not in kept


@pytest.mark.gen_test
async def test_a_cut_history_keeps_its_first_turn_until_it_no_longer_fits(connect, fake_agent):
    """Past the context, prompts keep starting at the same turn (so a prompt
    cache finds that start), on a new socket for every message too; a cut that
    has to move moves on by CUT_SLACK of the budget, and every prompt fits."""
    from tornado_app.chat import CUT_SLACK, TOKENS_PER_MESSAGE

    fake_agent.context_tokens = fake_agent.reply_tokens + 300
    budget = fake_agent.context_tokens - fake_agent.reply_tokens
    firsts, sizes = [], []
    for i in range(18):  # within the tests' rate limit
        client = await connect("long-chat")  # a socket of its own: nothing carried over
        await client.send({"content": f"message {i:02} " + "w" * 100})
        await client.receive()
        client.close()
        messages = fake_agent.history[-1].messages
        assert messages[1]["role"] == "user" and messages[-1]["content"].startswith(
            f"message {i:02}")
        firsts.append(messages[1]["content"][:10])
        sizes.append(sum(fake_agent.count_tokens(m["content"]) + TOKENS_PER_MESSAGE
                         for m in messages))
    assert all(size <= budget for size in sizes)
    moves = [index for index in range(1, 18) if firsts[index] != firsts[index - 1]]
    assert len(moves) >= 2  # the history outgrew the budget more than once
    for index in moves:  # it moved on by at least the slack
        assert sizes[index] <= sizes[index - 1] - int(budget * CUT_SLACK) + 80  # + an exchange
    assert all(later - earlier >= 2 for earlier, later in zip(moves, moves[1:]))


@pytest.mark.gen_test
async def test_failed_replies_are_left_out_of_the_history(connect, fake_agent):
    fake_agent.enqueue(error=AgentError("upstream", "bad"))
    client = await connect()
    await client.send({"content": "first"})
    await client.receive()
    await client.send({"content": "second"})
    await client.receive()
    contents = [m["content"] for m in fake_agent.history[-1].messages]
    assert contents[1:] == ["first", "second"]


def test_history_limit_is_bounded():
    assert 0 < HISTORY_LIMIT <= 1000


class TestFallbacks:
    @pytest.fixture
    def settings(self, settings, second_agent):
        settings.agent.fallbacks = ["fake2"]
        return settings

    @pytest.mark.gen_test
    async def test_fallback_answers_when_the_backend_fails_first(
        self, connect, fake_agent, second_agent, store
    ):
        fake_agent.enqueue(error=AgentError("connection", "down"))
        second_agent.enqueue("from the fallback")
        client = await connect()
        await client.send({"content": "hi"})
        assert (await client.receive())["message"] == "from the fallback"
        reply = (await rows(store))[-1]
        assert (reply.agent, reply.model, reply.status) == ("fake2", "fake-model-2", "ok")

    @pytest.mark.gen_test
    async def test_no_fallback_after_the_first_token(self, connect, fake_agent, second_agent, store):
        fake_agent.enqueue("half a ", error=AgentError("upstream", "broke"))
        client = await connect()
        await client.send({"content": "hi"})
        assert (await client.receive())["type"] == "error"
        assert second_agent.history == []
        reply = (await rows(store))[-1]
        assert (reply.agent, reply.status, reply.content) == ("fake", "error", "half a ")


class TestHotSwap:
    @pytest.fixture
    def settings(self, settings, second_agent, tmp_path):
        path = tmp_path / "config.yaml"
        path.write_text(
            f"data_dir: {tmp_path / 'data'}\n"
            f"database: {{url: '{settings.database.url}'}}\n"
            f"auth: {{jwt_secret: '{settings.jwt_secret}'}}\n"
            "agent: {backend: fake2}\n"
        )
        self.config_path = path
        return settings

    @pytest.mark.gen_test
    async def test_swap_keeps_connections_and_finishes_in_flight_replies(
        self, service, connect, fake_agent, second_agent, store
    ):
        service.config_path = str(self.config_path)
        gate = asyncio.Event()
        fake_agent.enqueue("old agent's reply", gate=gate)
        client = await connect()
        await client.send({"content": "before"})
        await fake_agent.received()
        service.reload_agents()
        gate.set()
        assert (await client.receive())["message"] == "old agent's reply"
        await client.send({"content": "after"})
        assert (await client.receive())["message"] == "fake reply to: after"
        assert len(second_agent.history) == 1
        assert [r.agent for r in await rows(store) if r.role == "assistant"] == ["fake", "fake2"]
        await asyncio.sleep(0.05)
        assert fake_agent.closed  # retired once its last reply ended

    @pytest.mark.gen_test
    async def test_a_bad_config_on_reload_keeps_the_old_agent(self, service, connect, fake_agent):
        self.config_path.write_text("agent: {backend: nope}\n")
        service.config_path = str(self.config_path)
        service.reload_agents()
        client = await connect()
        await client.send({"content": "hi"})
        assert (await client.receive())["type"] == "ai_response"
        assert len(fake_agent.history) == 1
