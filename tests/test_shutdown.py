"""Graceful shutdown: replies in flight finish, then every socket gets 1001."""

import asyncio

import pytest

from .helpers import saved_messages


@pytest.mark.gen_test
async def test_stop_lets_replies_finish_then_closes_with_1001(service, connect, fake_agent, store):
    gate = asyncio.Event()
    fake_agent.enqueue("finished in time", gate=gate)
    busy = await connect("busy")
    idle = await connect("idle", user="bob")
    await busy.send({"content": "long question"})
    await fake_agent.received()
    stopping = asyncio.ensure_future(service.stop())
    await asyncio.sleep(0.1)
    gate.set()
    assert (await busy.receive())["message"] == "finished in time"
    assert await busy.wait_closed() == 1001
    assert await idle.wait_closed() == 1001
    assert busy.close_reason == "Server shutting down"
    await stopping


@pytest.mark.gen_test
async def test_a_reply_past_the_grace_time_is_saved_as_cancelled(service, settings, connect, fake_agent):
    settings.server.shutdown_grace_seconds = 0.2
    fake_agent.enqueue("partial ", *["more "] * 100, delay=0.1)
    client = await connect()
    await client.send({"content": "long", "stream": True})
    await client.receive_type("ai_response_chunk")
    conversation_id = await service.store.open_conversation(1, "client-1")
    # Read through a second engine: stop() disposes of the service's own.
    from tornado_app.store import Store

    reader = Store.from_url(settings.database.url)
    await service.stop()
    assert await client.wait_closed() == 1001
    saved = await saved_messages(reader, conversation_id)
    await reader.close()
    assert [r.role for r in saved] == ["user", "assistant"]
    assert saved[-1].status == "cancelled"
    assert saved[-1].content.startswith("partial ")


@pytest.mark.gen_test
async def test_no_new_connections_after_stop(service, ws_url):
    from tornado.websocket import websocket_connect

    await service.stop()
    with pytest.raises((ConnectionRefusedError, OSError)):
        await websocket_connect(ws_url())


@pytest.mark.gen_test
async def test_the_replies_loop_stops_when_cancelled_as_it_wakes(service, connect, fake_agent):
    """Python 3.11's asyncio.wait_for drops a cancel that comes in the loop
    turns right after the event it waits for is set: stop() then waited for
    the replies' background loop for ever. Each offset in turns is tried."""
    fake_agent.enqueue("never", gate=asyncio.Event())
    client = await connect()
    await client.send({"content": "hang"})
    await fake_agent.received()  # a live reply: the loop waits with a timeout
    replies = service.replies
    for turns in range(5):
        await asyncio.sleep(0.02)  # the loop is back in its timed wait
        [loop] = replies._tasks
        replies._wake.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        loop.cancel()
        done, _ = await asyncio.wait([loop], timeout=2)
        assert done, f"a cancel {turns} turn(s) after the wake-up was lost"
        replies.start_background()
