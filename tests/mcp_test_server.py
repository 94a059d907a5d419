"""A real MCP server for tests, written with the SDK's server side (MCPServer).

``python tests/mcp_test_server.py stdio`` serves on stdin/stdout;
``python tests/mcp_test_server.py http PORT`` serves Streamable HTTP on
127.0.0.1:PORT at ``/mcp``; ``sse PORT`` the older SSE transport at ``/sse``. Tools:

- ``lookup(city)``: structured content ``{"city": ..., "population": ...}``
  (the others answer text only);
- ``slow(seconds)``: answers after that long;
- ``fail(message)``: raises;
- ``header(name)``: that request header (HTTP), or ``(none)``;
- ``big(chars)``: a text of that many characters;
- ``pixel()``: an image (binary content);
- ``grow(name)``: adds a tool ``name`` and says the tool list changed;
- ``crash()``: writes a line to stderr and exits (stdio: the process dies).
"""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic import BaseModel

from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

server = MCPServer("test-server")


class City(BaseModel):
    city: str
    population: int


@server.tool(description="Population of a city.")
def lookup(city: str) -> City:
    return City(city=city, population=len(city) * 1000)


@server.tool(description="Waits, then answers.", structured_output=False)
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool(description="Always fails.", structured_output=False)
def fail(message: str) -> str:
    raise ToolError(message)  # its text reaches the client (another exception's does not)


@server.tool(description="A request header.", structured_output=False)
def header(name: str, ctx: Context) -> str:
    headers = ctx.headers or {}
    return headers.get(name.lower(), "(none)")


@server.tool(description="A long text.", structured_output=False)
def big(chars: int) -> str:
    return "x" * chars


@server.tool(description="A one-pixel PNG.")
def pixel() -> Image:
    return Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 20, format="png")


@server.tool(description="Adds a tool.", structured_output=False)
async def grow(name: str, ctx: Context) -> str:
    def added() -> str:
        return f"{name} here"

    server.add_tool(added, name=name, description=f"Added by grow: {name}.",
                    structured_output=False)
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        await ctx.notify_tools_changed()  # to subscriptions/listen streams
    else:
        await ctx.session.send_tool_list_changed()  # an older session's notification
    return f"added {name}"


@server.tool(description="Exits the server process.", structured_output=False)
def crash() -> str:
    print("test server: crashing on purpose", file=sys.stderr, flush=True)
    os._exit(3)


def main() -> None:
    print("test server: starting", file=sys.stderr, flush=True)
    if sys.argv[1] == "stdio":
        server.run("stdio")
    elif sys.argv[1] == "sse":
        server.run("sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))


if __name__ == "__main__":
    main()
