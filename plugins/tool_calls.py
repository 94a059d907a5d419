"""Tool calls in a local model's text: the Hermes / Qwen format that chat
templates taking ``tools`` document, ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>``; and the host's OpenAI-format messages as those
templates want them (arguments as objects, text content never null)."""

from __future__ import annotations

import json
import secrets

from tornado_app.tools import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def template_takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, or one for tools
        return "tool_use" in template or "tools" in (template.get("default") or "")
    return isinstance(template, str) and "tools" in template


def to_template_messages(messages: list[dict]) -> list[dict]:
    """Copies of the host's messages in the form Hugging Face templates read."""
    converted = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        if "tool_calls" in message:
            message["tool_calls"] = [
                {"type": "function", "id": call["id"],
                 "function": {"name": call["function"]["name"],
                              "arguments": _object(call["function"]["arguments"])}}
                for call in message["tool_calls"]]
        converted.append(message)
    return converted


def _object(arguments) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class ToolCallParser:
    """Splits streamed text into text pieces and ToolCalls. Text that may be
    the start of ``<tool_call>`` is held back until the next piece tells."""

    def __init__(self, prefix: str | None = None):
        # Ids unique across the model turns of a reply (the template may show them).
        self._prefix = prefix if prefix is not None else f"call_{secrets.token_hex(3)}_"
        self._buffer = ""
        self._inside = False
        self._after_call = False  # newlines right after a call are the template's, not text
        self._count = 0

    def feed(self, piece: str) -> list[str | ToolCall]:
        self._buffer += piece
        out: list[str | ToolCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return out
                out.append(self._call(self._buffer[:end]))
                self._buffer = self._buffer[end + len(CLOSE):]
                self._inside, self._after_call = False, True
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip("\n")
                if not self._buffer:
                    return out
                self._after_call = False
            start = self._buffer.find(OPEN)
            if start >= 0:
                if start:
                    out.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN):]
                self._inside = True
                continue
            keep = _partial_tag(self._buffer)
            text, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[
                len(self._buffer) - keep:]
            if text:
                out.append(text)
            return out

    def close(self) -> list[str | ToolCall]:
        """The end of the text: an unclosed call is still read as one."""
        rest, self._buffer = self._buffer, ""
        if self._inside:
            self._inside = False
            return [self._call(rest)]
        return [rest] if rest else []

    def _call(self, body: str) -> ToolCall:
        self._count += 1
        call_id = f"{self._prefix}{self._count}"
        try:
            data = json.loads(body)
        except ValueError:
            return ToolCall(call_id, "", body.strip())  # the host answers: no such tool
        if not isinstance(data, dict):
            return ToolCall(call_id, "", body.strip())
        arguments = data.get("arguments", data.get("parameters", {}))
        return ToolCall(call_id, str(data.get("name", "")),
                        arguments if isinstance(arguments, (dict, str)) else json.dumps(arguments))


def _partial_tag(text: str) -> int:
    """Length of the longest end of ``text`` that begins ``<tool_call>``."""
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-length:]):
            return length
    return 0
