"""The tool contract: what a tool plugin implements and what the host gives it.

Tools are offered by plugins exactly like agents, through the hook
``register_tools(register)`` (hookspecs.py): ``register(name, factory,
options=OptionsModel)``, where ``factory(options, settings)`` returns a
:class:`Tool`. The host, not the agent, runs every call: it validates the
arguments against the tool's pydantic model, applies ``tools.timeout_seconds``,
runs the calls of one model turn concurrently, saves each step, and hands the
results back to the model (docs/plugins.md, "Tools").

A tool sees only the calling user's data, through :class:`ToolContext`: never
the engine, the Store, or another user's rows.

An agent that supports tools yields :class:`ToolCall` requests among its text
pieces; tool_loop.py runs them and calls the model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel


class UserMemories(Protocol):
    """One user's saved memories (key -> value), decrypted; the only user's."""

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None:
        """Save (or replace) a memory. Raises ToolError when the user already
        has ``memory.max_items`` memories and ``key`` is not one of them."""

    async def delete(self, key: str) -> bool:
        """False when there was no such memory."""

    async def list(self) -> list[tuple[str, str, datetime]]:
        """(key, value, updated_at) of every memory, by key."""


class UserMessages(Protocol):
    """One user's saved messages, across all of their conversations."""

    async def search(self, query: str, limit: int) -> list[dict]:
        """Messages matching ``query`` (full-text), newest first: dicts with
        ``conversation`` (client_id), ``role``, ``content`` (a snippet of at
        most 300 characters) and ``timestamp`` (ISO 8601, UTC, ``Z``)."""


@dataclass(frozen=True)
class ToolContext:
    """What a call knows of its caller."""

    user_id: int
    username: str
    conversation: str  # the conversation's client_id
    deadline: float  # loop.time() by which the call must have returned
    # Filled in by the memory feature; None where it is not available.
    memories: UserMemories | None = None
    messages: UserMessages | None = None


@dataclass(frozen=True)
class ToolCall:
    """A model's request to call a tool, as an agent yields it. ``arguments``
    is the JSON object the model wrote: a dict, or its raw text (which the
    host parses, so that a malformed one becomes an error result)."""

    call_id: str
    name: str
    arguments: dict | str


class ToolError(Exception):
    """A failure the tool wants the model to read: its text becomes the error
    result (so it must hold nothing secret). Any other exception gives the
    model a fixed text instead."""


class Tool:
    """Base class for tools. Subclasses set ``description`` and ``Arguments``
    and implement :meth:`call`."""

    #: Set by the host to the name the tool was registered under.
    name: str = ""
    #: One paragraph for the model: what the tool does and when to use it.
    description: ClassVar[str] = ""
    #: The arguments; the JSON Schema the model sees is generated from it.
    Arguments: ClassVar[type[BaseModel]]

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the arguments, as models are given it."""
        return self.Arguments.model_json_schema()

    def validate(self, arguments: dict) -> Any:
        """Check the model's arguments; return what :meth:`call` receives.
        Raise ``ValueError`` (pydantic's ValidationError is one) with a text
        the model may read. A tool described by a plain JSON Schema (MCP)
        overrides this and :meth:`schema`."""
        return self.Arguments.model_validate(arguments)

    async def call(self, arguments: Any, context: ToolContext) -> dict | str:
        """Do it; return what the model should read (a dict becomes JSON).
        Raise :class:`ToolError` with a safe text for a failure the model may
        act on."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the tool holds (clients, files)."""
