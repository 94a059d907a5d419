"""The host's tool loop: one agent, one reply, any number of model turns.

An agent that supports tools (``Agent.supports_tools``) gets the enabled
tools' schemas in ``AgentRequest.tools`` and yields text pieces or
:class:`~tornado_app.tools.ToolCall` requests. The host, not the plugin:

- validates each call's arguments (``Tool.validate``); a bad call becomes an
  error result for the model, never a crash;
- runs the calls of one model turn concurrently, each within
  ``tools.timeout_seconds`` (and the reply's own deadline);
- gives the model a fixed text for a tool that raised or timed out (a
  ``ToolError``'s own text, which is safe by contract, otherwise);
- appends the calls and results to the prompt in the OpenAI chat format
  (agents convert it to their model's) and calls the model again, up to
  ``agent.max_tool_steps`` turns with tools; then once more without tools,
  for the final answer.

Text pieces go to the reply as they come, from every turn. Each finished
call is a :class:`Step` of the reply (saved with it, store/tool_steps.py)
and two events for its listeners (the v2 ``tool_call`` and ``tool_result``
frames). A call cut short by a cancel or the reply's deadline is not saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from .agents import Agent, AgentRequest
from .tools import Tool, ToolCall, ToolContext, ToolError, UserMemories, UserMessages

logger = logging.getLogger(__name__)

# Status of a step (tool_steps.status).
OK, ERROR, TIMEOUT = "ok", "error", "timeout"

# The fixed texts the model reads when a call went wrong.
TIMED_OUT = "error: the tool did not answer in time"
FAILED = "error: the tool failed"
UNKNOWN_TOOL = "error: there is no tool named {name}; use one of: {names}"
NOT_AN_OBJECT = "error: the arguments must be a JSON object"
INVALID = "error: invalid arguments: {details}"


@dataclass(frozen=True)
class Step:
    """One finished tool call of a reply."""

    turn: int  # the model turn that asked for it, from 0
    call_id: str
    name: str
    arguments: dict  # as the model wrote them ({} if they were not a JSON object)
    result: str  # what the model read
    status: str  # ok, error, timeout
    latency_ms: float

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True)
class ToolEvent:
    """A tool call starting (``result`` None) or ending, for a reply's listeners."""

    name: str
    call_id: str
    arguments: dict
    ok: bool | None = None  # None: the call is starting


@dataclass
class Caller:
    """Who the calls are made for: what :func:`tool_context` needs."""

    user_id: int
    username: str
    conversation: str  # client_id
    # This user's memories and messages (tornado_app.memory), set by ChatService.
    memories: UserMemories | None = None
    messages: UserMessages | None = None


def tool_context(caller: Caller, timeout: float, reply_deadline: float | None = None
                 ) -> ToolContext:
    """The one place a ToolContext is built: the caller's own data, nobody
    else's. Its deadline is the call's, or the reply's when that comes first."""
    deadline = asyncio.get_running_loop().time() + timeout
    if reply_deadline is not None:
        deadline = min(deadline, reply_deadline)
    return ToolContext(caller.user_id, caller.username, caller.conversation, deadline,
                       memories=caller.memories, messages=caller.messages)


def tool_specs(tools: dict[str, Tool]) -> list[dict]:
    """What the model is told of each tool: name, description, JSON Schema."""
    return [{"name": name, "description": tool.description, "parameters": tool.schema()}
            for name, tool in tools.items()]


def result_text(result: Any) -> str:
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False,
                                                              default=str)


def parse_arguments(arguments: dict | str) -> dict | None:
    """The call's arguments as a dict; None if they are not a JSON object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


async def run_call(call: ToolCall, turn: int, tools: dict[str, Tool], caller: Caller,
                   timeout: float, emit, reply_deadline: float | None = None) -> Step:
    """Validate and run one call; every failure becomes an error result."""
    arguments = parse_arguments(call.arguments)
    emit(ToolEvent(call.name, call.call_id, arguments or {}))
    started = time.perf_counter()
    status, result = ERROR, None
    tool = tools.get(call.name)
    if tool is None:
        result = UNKNOWN_TOOL.format(name=call.name, names=", ".join(tools))
    elif arguments is None:
        result = NOT_AN_OBJECT
    else:
        try:
            valid = tool.validate(arguments)
        except ValueError as exc:
            result = INVALID.format(details=_details(exc))
        except Exception as exc:  # a plugin's validate() with a bug
            logger.error("tool %s: validate raised %s", tool.name, type(exc).__name__)
            result = FAILED
        else:
            context = tool_context(caller, timeout, reply_deadline)
            status, result = await _call(tool, valid, context, timeout)
    step = Step(turn, call.call_id, call.name, arguments or {}, result, status,
                (time.perf_counter() - started) * 1000)
    emit(ToolEvent(call.name, call.call_id, step.arguments, step.ok))
    return step


async def _call(tool: Tool, arguments: Any, context: ToolContext,
                timeout: float) -> tuple[str, str]:
    try:
        async with asyncio.timeout(timeout):
            return OK, result_text(await tool.call(arguments, context))
    except TimeoutError:
        logger.warning("tool %s timed out", tool.name)
        return TIMEOUT, TIMED_OUT
    except ToolError as exc:
        return ERROR, f"error: {exc}"
    except Exception as exc:
        # The type only: an exception's text may hold what the model must not read.
        logger.error("tool %s raised %s", tool.name, type(exc).__name__)
        return ERROR, FAILED


def _details(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: "key: message" for each, without the input
        return "; ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] if e["loc"]
                         else e["msg"] for e in errors(include_input=False))
    return str(exc)


def call_messages(calls: list[tuple[str, str, str]], results: list[tuple[str, str]],
                  text: str | None = None) -> list[dict]:
    """A model turn's calls (id, name, arguments as JSON) and their results
    (id, text), in the OpenAI chat format every agent receives."""
    return [{"role": "assistant", "content": text or None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": arguments}}
                for call_id, name, arguments in calls]},
            *({"role": "tool", "tool_call_id": call_id, "content": result}
              for call_id, result in results)]


def steps_messages(steps) -> list[dict]:
    """Saved or live steps (turn, call_id, name, arguments, result) as
    prompt messages, one assistant message per model turn."""
    messages, turn, calls, results = [], None, [], []
    for step in steps:
        if step.turn != turn and calls:
            messages += call_messages(calls, results)
            calls, results = [], []
        turn = step.turn
        arguments = step.arguments if isinstance(step.arguments, str) else json.dumps(
            step.arguments, ensure_ascii=False)
        calls.append((step.call_id, step.name, arguments))
        results.append((step.call_id, step.result))
    if calls:
        messages += call_messages(calls, results)
    return messages


@dataclass
class Tokens:
    """Tokens over every model call of a reply: the agent's counts where it
    reported them, the host's otherwise."""

    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, agent: Agent, request: AgentRequest, prompt_tokens: int, output: str) -> None:
        usage = request.usage
        self.tokens_in += usage.tokens_in if usage.tokens_in is not None else prompt_tokens
        if usage.tokens_out is not None:
            self.tokens_out += usage.tokens_out
        elif output:
            self.tokens_out += agent.count_tokens(output)


async def converse(agent: Agent, messages: list[dict], prompt_tokens: int, username: str,
                   live, tools: dict[str, Tool], caller: Caller, max_steps: int,
                   timeout: float, deadline: float | None = None) -> Tokens:
    """Run ``agent`` on the prompt, and its tool calls, until it answers
    without calling a tool (see the module). ``live`` is the LiveReply;
    ``deadline`` (loop time) the reply's, which shortens a call's timeout."""
    offered = tool_specs(tools) if tools and agent.supports_tools else []
    tokens = Tokens()
    turn = 0
    while True:
        with_tools = offered if turn < max_steps else []
        request = AgentRequest(list(messages), username, tools=with_tools)
        calls, text = [], []
        # aclosing: a cancel closes the agent's stream (an upstream HTTP
        # response, say) at once, not at garbage collection.
        async with contextlib.aclosing(agent.stream(request)) as pieces:
            async for piece in pieces:
                if isinstance(piece, ToolCall):
                    if with_tools:  # a call nobody offered it is ignored
                        calls.append(piece)
                elif piece:
                    live.take(piece)
                    text.append(piece)
                # A yield point: an agent that yields without awaiting must
                # not keep the event loop (and a cancel) waiting.
                await asyncio.sleep(0)
        said = "".join(text)
        asked = [json.dumps(parse_arguments(c.arguments) or {}, ensure_ascii=False)
                 for c in calls]
        tokens.add(agent, request, prompt_tokens, said + "".join(asked))
        if not calls:
            return tokens
        steps = await asyncio.gather(*(
            run_call(call, turn, tools, caller, timeout, live.tool_event, deadline)
            for call in calls))
        live.reply.steps.extend(steps)
        added = call_messages(
            [(c.call_id, c.name, a if isinstance(c.arguments, dict) else c.arguments)
             for c, a in zip(calls, asked)],
            [(step.call_id, step.result) for step in steps], said)
        messages = messages + added
        prompt_tokens += sum(agent.count_tokens(result_text(m)) for m in added)
        turn += 1
