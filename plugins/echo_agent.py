"""The ``echo`` agent: a deterministic reply for tests, benchmarks and demos.

It answers ``<prefix><the user's message>``, streamed word by word, with an
optional pause between words (to exercise streaming, cancel and shutdown).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from tornado_app.agents import Agent, AgentRequest
from tornado_app.hookspecs import hookimpl


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = "Echo: "
    delay_seconds: float = Field(0.0, ge=0, description="pause before each word")


class EchoAgent(Agent):
    model = "echo"

    def __init__(self, options: EchoOptions, max_content_chars: int = 4000):
        super().__init__()
        self.options = options
        # Its longest reply: the prefix and the longest message (quotas reserve it).
        self.reply_tokens = self.count_tokens(options.prefix + "x" * max_content_chars)

    async def stream(self, request: AgentRequest) -> AsyncIterator[str]:
        text = self.options.prefix + request.messages[-1]["content"]
        # Split after each space, so the pieces join back to the exact text.
        pieces = text.split(" ")
        for index, piece in enumerate(pieces):
            if self.options.delay_seconds:
                await asyncio.sleep(self.options.delay_seconds)
            yield piece if index == len(pieces) - 1 else piece + " "


@hookimpl
def register_agents(register):
    register("echo", lambda options, settings: EchoAgent(options, settings.chat.max_content_chars),
             options=EchoOptions)
