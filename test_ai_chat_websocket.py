"""The spec's test script: log in, open the AI chat WebSocket, send messages, show the replies.

Usage:
    python test_ai_chat_websocket.py [--url http://127.0.0.1:8000]
        [--username U --password P] [--client-id ID] [--message TEXT ...]
        [--stream] [--v2] [--timeout SECONDS]

    CHAT_USERNAME=alice CHAT_PASSWORD=secret123 python test_ai_chat_websocket.py
    python test_ai_chat_websocket.py --username alice --password secret123 \\
        --message "Hello, AI!" --message "Tell me a joke" --stream

It logs in through ``POST /token``, connects to
``ws(s)://HOST/ws/ai/ai-chat/CLIENT_ID?token=...`` (wss for an https URL), then
sends each message in turn and waits for its reply, printing every frame as
``[system] ...``, ``[ai] ...`` or ``[error] ...``. With ``--stream`` the
messages ask for streaming and the reply is printed as it arrives. With
``--v2`` it asks for protocol v2 (the ``ai-chat.v2`` subprotocol) and prints
the ids the server gives each message and reply, as ``[ids] ...`` lines.

Exit codes: 0 when every message got an ``ai_response``; 1 otherwise (server
unreachable, login refused, socket closed, ``error`` frame, timeout), with one
line on stderr saying why; 2 for a usage mistake such as missing credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from urllib.parse import quote, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

DEFAULT_MESSAGES = ["Hello, AI!", "What can you do?", "Thank you, goodbye!"]
EXIT_FAILURE = 1
EXIT_USAGE = 2


class ChatFailure(Exception):
    """Why the run failed, as the one line to print."""


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Try the AI chat WebSocket API end to end.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--username", default=os.environ.get("CHAT_USERNAME"),
                        help="user name (default: $CHAT_USERNAME)")
    parser.add_argument("--password", default=os.environ.get("CHAT_PASSWORD"),
                        help="password (default: $CHAT_PASSWORD)")
    parser.add_argument("--client-id", default=f"test-client-{uuid.uuid4().hex[:8]}",
                        help="conversation id (reuse one to continue a conversation)")
    parser.add_argument("--message", action="append", dest="messages", metavar="TEXT",
                        help="a message to send; repeat for several (default: a short greeting set)")
    parser.add_argument("--stream", action="store_true", help="ask for the reply in chunks")
    parser.add_argument("--v2", action="store_true",
                        help="speak protocol v2 (subprotocol ai-chat.v2) and print the ids")
    parser.add_argument("--timeout", type=positive_seconds, default=30.0,
                        help="seconds to wait for login, connection and each reply (default 30)")
    return parser.parse_args(argv)


async def login(base_url: str, username: str, password: str, timeout: float) -> str:
    body = json.dumps({"username": username, "password": password})
    request = HTTPRequest(f"{base_url}/token", method="POST", body=body,
                          headers={"Content-Type": "application/json"},
                          connect_timeout=timeout, request_timeout=timeout)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    if response.code == 200:
        return json.loads(response.body)["access_token"]
    try:
        reason = json.loads(response.body)["error_description"]
    except (ValueError, KeyError, TypeError):
        reason = response.reason
    if response.code == 401:
        raise ChatFailure(f"login refused for user {username!r} (401): {reason}")
    raise ChatFailure(f"login failed: HTTP {response.code}: {reason}")


def websocket_url(base_url: str, client_id: str, token: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return (f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws/ai/ai-chat/"
            f"{quote(client_id, safe='')}?token={quote(token, safe='')}")


async def next_frame(conn: WebSocketClientConnection, timeout: float, waiting_for: str) -> dict:
    try:
        raw = await asyncio.wait_for(conn.read_message(), timeout)
    except asyncio.TimeoutError:
        raise ChatFailure(f"timed out after {timeout:g} s waiting for {waiting_for}") from None
    if raw is None:
        if conn.close_code is None:
            raise ChatFailure(f"connection lost while waiting for {waiting_for}")
        raise ChatFailure(f"connection closed by the server with code {conn.close_code}"
                          f" ({conn.close_reason or 'no reason given'})")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        frame = json.loads(raw)
    except ValueError:
        raise ChatFailure(f"the server sent a frame that is not JSON: {raw[:80]!r}") from None
    if not isinstance(frame, dict):
        raise ChatFailure(f"the server sent a frame that is not a JSON object: {raw[:80]!r}")
    return frame


V2 = "ai-chat.v2"
IDS = ("message_id", "reply_id")


def show(frame: dict) -> None:
    kind = frame.get("type", "?")
    label = "ai" if kind == "ai_response" else kind
    print(f"[{label}] {frame.get('message', frame)}", flush=True)


def show_tool(frame: dict) -> None:
    name = frame.get("name", "?")
    if frame.get("type") == "tool_call":
        print(f"[tool] {name} {json.dumps(frame.get('arguments', {}), ensure_ascii=False)}",
              flush=True)
    else:
        print(f"[tool] {name}: {'ok' if frame.get('ok') else 'failed'}", flush=True)


def show_ids(frame: dict, chunks: int = 0) -> None:
    """Protocol v2: the ids a frame carries (an ack's, or a reply's end)."""
    ids = " ".join(f"{name}={frame[name]}" for name in IDS if name in frame)
    if ids:
        extra = f" chunks={chunks}" if chunks else ""
        print(f"[ids] {frame.get('type')}: {ids}{extra}", flush=True)


async def exchange(conn: WebSocketClientConnection, number: int, text: str, stream: bool,
                   timeout: float) -> int:
    """Send one message; print frames until its reply and return how many chunks
    it came in. Raise ChatFailure when no reply comes."""
    print(f"[you] {text}", flush=True)
    message = {"content": text, "stream": True} if stream else {"content": text}
    try:
        await conn.write_message(json.dumps(message))
    except WebSocketClosedError:
        pass  # the next read reports the close code
    deadline = asyncio.get_running_loop().time() + timeout
    streamed, chunks, line_open = "", 0, False
    while True:
        left = max(deadline - asyncio.get_running_loop().time(), 0.001)
        frame = await next_frame(conn, left, f"the reply to message {number}")
        kind = frame.get("type")
        if kind == "ack":
            show_ids(frame)
            continue
        if kind == "ai_response_chunk":
            print(("[ai] " if not line_open else "") + str(frame.get("message", "")),
                  end="", flush=True)
            streamed += str(frame.get("message", ""))
            chunks, line_open = chunks + 1, True
            continue
        if line_open:
            print(flush=True)  # end the streamed line
            line_open = False
        if kind in ("tool_call", "tool_result"):  # v2, streamed: the agent uses a tool
            show_tool(frame)
            continue
        if kind == "ai_response":
            if frame.get("message") != streamed:  # not already shown chunk by chunk
                show(frame)
            show_ids(frame, chunks)
            return chunks
        show(frame)
        show_ids(frame)
        if kind == "error":
            raise ChatFailure(f"message {number} got an error instead of a reply: "
                              f"{frame.get('message')}")
        streamed = ""  # a system frame (e.g. a cancelled reply); keep waiting


async def run(args: argparse.Namespace) -> str:
    base_url = args.url.rstrip("/")
    token = await login(base_url, args.username, args.password, args.timeout)
    request = HTTPRequest(websocket_url(base_url, args.client_id, token),
                          connect_timeout=args.timeout, request_timeout=args.timeout)
    try:
        conn = await websocket_connect(request, subprotocols=[V2] if args.v2 else None)
    except HTTPClientError as exc:
        raise ChatFailure(f"WebSocket handshake refused: HTTP {exc.code} {exc.message}") from None
    if args.v2 and conn.selected_subprotocol != V2:
        conn.close(1000, "done")
        raise ChatFailure("the server does not speak protocol v2 (ai-chat.v2)")
    try:
        show(await next_frame(conn, args.timeout, "the welcome message"))
        messages = args.messages or DEFAULT_MESSAGES
        chunks = 0
        for number, text in enumerate(messages, start=1):
            chunks += await exchange(conn, number, text, args.stream, args.timeout)
    finally:
        conn.close(1000, "done")
    return f"ok: {len(messages)} message(s) answered" + (
        f" in {chunks} streamed chunk(s)" if args.stream else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.username or not args.password:
        print("error: no credentials: pass --username and --password, "
              "or set CHAT_USERNAME and CHAT_PASSWORD", file=sys.stderr)
        return EXIT_USAGE
    if urlsplit(args.url).scheme not in ("http", "https") or not urlsplit(args.url).netloc:
        print(f"error: --url must be an http:// or https:// URL, not {args.url!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = asyncio.run(run(args))
    except ChatFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except HTTPClientError as exc:  # 599: connect or request timeout
        print(f"error: no answer from {args.url}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, StreamClosedError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        print(f"error: cannot connect to {args.url}: {why} (is the server running?)",
              file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback: one line, whatever went wrong
        print(f"error: unexpected failure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
