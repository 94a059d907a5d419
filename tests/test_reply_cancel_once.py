"""A reply is cancelled once: a second cancel (a cancel request read again by
the next flush while the first is still saving the reply) must not interrupt
the save, or the listeners get an error instead of the cancelled frame."""

from __future__ import annotations

import asyncio

from tornado_app.replies import LiveReply


def test_a_second_cancel_does_not_interrupt_the_save():
    async def body():
        live = LiveReply("r1", "m1", 1, 1, 1)
        saving, saved = asyncio.Event(), asyncio.Event()
        release = asyncio.Event()

        async def generate():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                saving.set()
                await release.wait()  # the save of the cancelled reply
                saved.set()
                raise

        live.task = asyncio.create_task(generate())
        live.started = True
        await asyncio.sleep(0)
        assert live.cancel() is True
        await saving.wait()
        assert live.cancel() is True  # already cancelling: accepted, nothing more is done
        release.set()
        await asyncio.gather(live.task, return_exceptions=True)
        assert saved.is_set()

    asyncio.run(body())
