"""The ``openai`` agent: OpenAI's API, or any OpenAI-compatible server.

It streams Chat Completions through the official SDK (``AsyncOpenAI``), so
it works with api.openai.com and with vLLM, Ollama, the llama.cpp server,
``transformers serve`` or TGI through ``agent.openai.base_url``.

Failures become :class:`AgentError` with a fixed text per kind: an upstream
body or the API key never reaches a message, and so never a log line or a
client. When the host cancels the reply, the HTTP stream is closed.

Tools: native function calling. The host's tools go out as
``tools=[{"type": "function", "function": {...}}]``; the model's
``tool_calls`` (streamed as ``delta.tool_calls`` fragments whose
``arguments`` arrive in pieces, or whole with ``agent.openai.stream: false``)
come back as ToolCall requests, and the host's ``tool`` messages carry their
``tool_call_id`` as the API wants.
"""

from __future__ import annotations

import logging
import os
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from tornado_app.agents import Agent, AgentError, AgentRequest, Usage
from tornado_app.config import ConfigError
from tornado_app.hookspecs import hookimpl
from tornado_app.tools import ToolCall

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local servers want some key in the header and accept any.
PLACEHOLDER_KEY = "not-needed"
NO_KEY = (
    "agent.openai.api_key: no API key; set OPENAI_API_KEY or "
    "TORNADO_APP_AGENT__OPENAI__API_KEY (or point agent.openai.base_url at a "
    "server that needs none)"
)

# The fixed, safe texts of the failures (never the upstream's own words).
RATE_LIMITED = "the model server is rate limiting requests (HTTP 429)"
TIMED_OUT = "the model server did not answer within agent.openai.timeout_seconds"
NO_CONNECTION = "cannot connect to the model server at agent.openai.base_url"
BAD_REPLY = "the model server sent a malformed reply"
EMPTY_REPLY = "the model server sent no reply (not an event stream?)"
UPSTREAM_ERROR = "the model server reported an error"


class OpenAIOptions(BaseModel):
    """The ``agent.openai`` section."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("gpt-4o-mini", min_length=1)
    # None: https://api.openai.com/v1. Any OpenAI-compatible server, e.g.
    # http://127.0.0.1:8001/v1 (vLLM) or http://127.0.0.1:11434/v1 (Ollama).
    base_url: str | None = None
    # None: the OPENAI_API_KEY environment variable.
    api_key: SecretStr | None = None
    # Per network operation (connect, each read); the SDK's default is 10 minutes.
    # agent.timeout_seconds bounds the whole reply, retries included.
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    # Retries of a failed request (429, 5xx, timeout, connection), with backoff.
    max_retries: int = Field(2, ge=0, le=5)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    # The model's context window; the host trims history to fit it.
    context_tokens: int = Field(8192, ge=256)
    # Stream the reply (false: ask for it whole; the user then gets it at once).
    stream: bool = True
    # Offer the host's tools (agent.tools) to the model: false for a server
    # or model without function calling.
    tools: bool = True

    @field_validator("base_url", "api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An empty environment override (VAR=) means "not set", not "".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8001/v1")
        return value

    @model_validator(mode="after")
    def _reply_fits_context(self) -> OpenAIOptions:
        if self.max_tokens >= self.context_tokens:
            raise ValueError("max_tokens must be smaller than context_tokens")
        return self


def resolve_api_key(options: OpenAIOptions, environ=None) -> str:
    """The key from the options, else OPENAI_API_KEY, else a placeholder for a
    custom server; with no key for api.openai.com, a ConfigError."""
    environ = os.environ if environ is None else environ
    if options.api_key is not None and options.api_key.get_secret_value():
        return options.api_key.get_secret_value()
    if environ.get("OPENAI_API_KEY"):
        return environ["OPENAI_API_KEY"]
    if options.base_url is None:
        raise ConfigError(NO_KEY)
    return PLACEHOLDER_KEY


def safe_url(url: str) -> str:
    """``url`` without credentials or a query, fit for a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


class OpenAIAgent(Agent):
    def __init__(self, options: OpenAIOptions, api_key: str):
        super().__init__()
        self.options = options
        self.supports_tools = options.tools
        self.model = options.model
        self.context_tokens = options.context_tokens
        self.reply_tokens = options.max_tokens
        self.base_url = options.base_url or DEFAULT_BASE_URL
        # Cleared for good when a server refuses stream_options (older servers).
        self._ask_usage = True
        # The base URL is passed explicitly: the config, not OPENAI_BASE_URL, decides.
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=self.base_url,
            timeout=options.timeout_seconds,
            max_retries=options.max_retries,
        )

    async def stream(self, request: AgentRequest) -> AsyncIterator[str | ToolCall]:
        if not self.options.stream:
            for piece in await self._whole(request):
                yield piece
            return
        stream = await self._open(request)
        received = False
        calls: dict[int, list] = {}  # index -> [id, name, argument pieces]
        # Leaving this block (end, error, or the host cancelling the task)
        # closes the HTTP response, so the server stops generating.
        async with stream:
            try:
                async for chunk in stream:
                    received = True
                    text = _read_chunk(chunk, request.usage, calls)
                    if text:
                        yield text
            except AgentError:
                raise
            except Exception as exc:
                raise _agent_error(exc) from None
        if not received:
            raise AgentError("bad_reply", EMPTY_REPLY)
        for index in sorted(calls):
            call_id, name, pieces = calls[index]
            if not name:
                raise AgentError("bad_reply", BAD_REPLY)
            yield ToolCall(call_id or f"call_{index}", name, "".join(pieces))

    async def _whole(self, request: AgentRequest) -> list[str | ToolCall]:
        """The reply asked for without streaming: its text, then its calls."""
        try:
            answer = await self._create(request, stream=False)
            return _read_completion(answer, request.usage)
        except AgentError:
            raise
        except Exception as exc:
            raise _agent_error(exc) from None

    async def _open(self, request: AgentRequest):
        try:
            try:
                return await self._create(request)
            except openai.BadRequestError as exc:
                if not (self._ask_usage and _mentions_stream_options(exc)):
                    raise
            logger.warning(
                "openai agent: %s refuses stream_options; token usage will be estimated",
                safe_url(self.base_url),
            )
            self._ask_usage = False
            return await self._create(request)
        except Exception as exc:
            raise _agent_error(exc) from None

    async def _create(self, request: AgentRequest, stream: bool = True):
        extra: dict[str, Any] = {}
        if stream and self._ask_usage:
            extra["stream_options"] = {"include_usage": True}
        if request.tools:
            extra["tools"] = [{"type": "function", "function": tool} for tool in request.tools]
        return await self.client.chat.completions.create(
            model=self.options.model,
            messages=request.messages,
            max_tokens=self.options.max_tokens,
            temperature=self.options.temperature,
            stream=stream,
            **extra,
        )

    async def close(self) -> None:
        await self.client.close()


def _read_chunk(chunk: Any, usage: Usage, calls: dict[int, list]) -> str:
    """The text of one streamed chunk; fills ``usage`` from the usage chunk
    and gathers ``delta.tool_calls`` fragments into ``calls``.

    The SDK does not validate replies, so the shape is checked here.
    """
    if not isinstance(chunk, ChatCompletionChunk):
        raise AgentError("bad_reply", BAD_REPLY)
    _read_usage(chunk.usage, usage)
    choices = chunk.choices
    if choices is None and chunk.usage is not None:
        return ""  # some servers leave choices out of the usage chunk
    if not isinstance(choices, list):
        raise AgentError("bad_reply", BAD_REPLY)
    if not choices:
        return ""
    delta = getattr(choices[0], "delta", None)
    text = getattr(delta, "content", None)
    if delta is None or not (text is None or isinstance(text, str)):
        raise AgentError("bad_reply", BAD_REPLY)
    for fragment in getattr(delta, "tool_calls", None) or ():
        _add_fragment(fragment, calls)
    # Reasoning models' thoughts (reasoning_content) are not shown to users.
    return text or ""


def _add_fragment(fragment: Any, calls: dict[int, list]) -> None:
    """One piece of a streamed tool call: the first names it (id, name), the
    others bring more of its ``arguments``; ``index`` tells the calls apart."""
    index = getattr(fragment, "index", None)
    function = getattr(fragment, "function", None)
    call_id = getattr(fragment, "id", None)
    name = getattr(function, "name", None)
    arguments = getattr(function, "arguments", None)
    if not isinstance(index, int) or not all(
            value is None or isinstance(value, str) for value in (call_id, name, arguments)):
        raise AgentError("bad_reply", BAD_REPLY)
    call = calls.setdefault(index, [None, None, []])
    call[0] = call[0] or call_id
    call[1] = call[1] or name
    if arguments:
        call[2].append(arguments)


def _read_completion(answer: Any, usage: Usage) -> list[str | ToolCall]:
    """A whole (not streamed) answer: its text, then its tool calls."""
    if not isinstance(answer, ChatCompletion) or not isinstance(answer.choices, list):
        raise AgentError("bad_reply", BAD_REPLY)
    _read_usage(answer.usage, usage)
    if not answer.choices:
        raise AgentError("bad_reply", EMPTY_REPLY)
    message = getattr(answer.choices[0], "message", None)
    text = getattr(message, "content", None)
    if message is None or not (text is None or isinstance(text, str)):
        raise AgentError("bad_reply", BAD_REPLY)
    pieces: list[str | ToolCall] = [text] if text else []
    for index, call in enumerate(getattr(message, "tool_calls", None) or ()):
        function = getattr(call, "function", None)
        name = getattr(function, "name", None)
        arguments = getattr(function, "arguments", None)
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise AgentError("bad_reply", BAD_REPLY)
        pieces.append(ToolCall(getattr(call, "id", None) or f"call_{index}", name, arguments))
    return pieces


def _read_usage(reported: Any, usage: Usage) -> None:
    if reported is None:
        return
    tokens_in = getattr(reported, "prompt_tokens", None)
    tokens_out = getattr(reported, "completion_tokens", None)
    if not (_is_count(tokens_in) and _is_count(tokens_out)):
        raise AgentError("bad_reply", BAD_REPLY)
    usage.tokens_in, usage.tokens_out = tokens_in, tokens_out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _mentions_stream_options(exc: openai.BadRequestError) -> bool:
    # Only inspected, never logged or shown.
    return "stream_options" in f"{exc.message} {exc.body}"


def _agent_error(exc: Exception) -> AgentError | Exception:
    """The AgentError for an SDK failure, with a fixed text; other exceptions
    (bugs) are returned as they are, and the host logs only their type."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, openai.RateLimitError):
        return AgentError("rate_limited", RATE_LIMITED)
    if isinstance(exc, openai.APITimeoutError):  # before its base class
        return AgentError("timeout", TIMED_OUT)
    if isinstance(exc, openai.APIConnectionError):
        return AgentError("connection", NO_CONNECTION)
    if isinstance(exc, openai.APIResponseValidationError):
        return AgentError("bad_reply", BAD_REPLY)
    if isinstance(exc, openai.AuthenticationError):
        return AgentError("upstream", "the model server refused the API key (HTTP 401)")
    if isinstance(exc, openai.APIStatusError):
        return AgentError("upstream", f"the model server answered HTTP {int(exc.status_code)}")
    if isinstance(exc, ValueError):  # invalid JSON, bad UTF-8, a validation error
        return AgentError("bad_reply", BAD_REPLY)
    if isinstance(exc, openai.OpenAIError):  # e.g. an error event inside the stream
        return AgentError("upstream", UPSTREAM_ERROR)
    return exc


def create_openai_agent(options: OpenAIOptions, settings: Any) -> OpenAIAgent:
    agent = OpenAIAgent(options, resolve_api_key(options))
    logger.info(
        "openai agent: model %s at %s (timeout %ss, %d retries)",
        options.model, safe_url(agent.base_url), options.timeout_seconds, options.max_retries,
    )
    return agent


@hookimpl
def register_agents(register):
    register("openai", create_openai_agent, options=OpenAIOptions)
