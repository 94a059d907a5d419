"""The baseline: a bare Tornado WebSocket handler that speaks the same JSON.

``python -m benchmarks.bare_echo --port P``. It sends the same welcome frame,
parses each client frame as the service does (JSON object, non-empty string
``content``) and answers the same ``ai_response`` frame (``"Echo: " +
content`` with a UTC timestamp), but without authentication, rate limit,
database, agent or task per message. The difference to the service is what
the service's own work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import tornado.web
import tornado.websocket

from tornado_app import frames


class BareEcho(tornado.websocket.WebSocketHandler):
    def get_compression_options(self):
        return None

    def open(self, client_id: str) -> None:
        self.write_message(frames.frame(frames.SYSTEM, frames.WELCOME.format(username=client_id)))

    def on_message(self, message) -> None:
        try:
            data = json.loads(message)
            content = data["content"]
            if not isinstance(content, str) or not content.strip():
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self.write_message(frames.frame(frames.ERROR, "Invalid message format"))
            return
        self.write_message(frames.frame(frames.AI_RESPONSE, "Echo: " + content))


class Health(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"status": "ok"})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = tornado.web.Application(
        [(r"/ws/ai/ai-chat/([^/]+)", BareEcho), (r"/healthz", Health)],
        websocket_ping_interval=20, websocket_ping_timeout=20, log_function=lambda _h: None,
    )
    server = app.listen(args.port, "127.0.0.1")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    server.stop()


if __name__ == "__main__":
    asyncio.run(main())
