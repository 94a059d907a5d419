"""The built-in tools ``memory`` and ``recall``: the calling user's saved
memories, and the search of their own earlier messages.

Both work only through the ToolContext the host gives each call
(``context.memories``, ``context.messages``): the user's own data, nothing
else. Names, arguments and results are fixed (issue 14, section 3): clients
and tests rely on them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tornado_app.hookspecs import hookimpl
from tornado_app.tools import Tool, ToolContext

MAX_KEY = 64
MAX_VALUE = 1000


class MemoryArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["set", "get", "delete", "list"] = Field(
        description="set saves (or replaces) a value under a key; get reads one; "
                    "delete forgets one; list gives every key")
    key: str | None = Field(None, min_length=1, max_length=MAX_KEY,
                            description="the memory's name, e.g. 'birthday' (not for list)")
    value: str | None = Field(None, min_length=1, max_length=MAX_VALUE,
                              description="what to remember (set only)")

    @model_validator(mode="after")
    def _fits_the_action(self):
        if self.action != "list" and self.key is None:
            raise ValueError(f"{self.action} needs a key")
        if self.action == "set" and self.value is None:
            raise ValueError("set needs a value")
        if self.action != "set" and self.value is not None:
            raise ValueError("only set takes a value")
        return self


class MemoryTool(Tool):
    description = (
        "Save, read, delete or list facts the user wants remembered across all of "
        "their conversations (a birthday, a preference, a name). The saved memories are "
        "also shown to you in the system prompt. Use short keys such as 'birthday'."
    )
    Arguments = MemoryArguments

    async def call(self, arguments: MemoryArguments, context: ToolContext) -> dict:
        memories = context.memories
        key = arguments.key
        if arguments.action == "set":
            await memories.set(key, arguments.value)
            return {"saved": key}
        if arguments.action == "get":
            return {"key": key, "value": await memories.get(key)}
        if arguments.action == "delete":
            await memories.delete(key)  # deleting what is not there is no failure
            return {"deleted": key}
        return {"keys": [name for name, _value, _updated in await memories.list()]}


class RecallArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=500,
                       description="words the earlier messages must all contain")
    limit: int = Field(5, ge=1, le=20, description="most matches to return")


class RecallTool(Tool):
    description = (
        "Search the user's own earlier messages, in all of their conversations, for "
        "messages holding every word of the query; newest first, each with its "
        "conversation, role (user or assistant), a snippet and its time."
    )
    Arguments = RecallArguments

    async def call(self, arguments: RecallArguments, context: ToolContext) -> dict:
        return {"matches": await context.messages.search(arguments.query, arguments.limit)}


@hookimpl
def register_tools(register):
    register("memory", lambda options, settings: MemoryTool())
    register("recall", lambda options, settings: RecallTool())
