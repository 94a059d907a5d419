"""MCP tools as host tools: names, schemas, argument checks, results.

A tool of an MCP server becomes a :class:`tornado_app.tools.Tool` named
``<server>__<tool>`` (see :func:`tool_name`), so the host's one tool loop runs
it like a plugin tool: same validation, timeouts, transcripts and frames.
Its arguments are checked against the server's own JSON Schema; its result
(text, structured content; binary content described) reaches the model as one
text cut at the server's ``max_result_chars``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import jsonschema
import mcp_types

from .tools import Tool, ToolContext, ToolError

if TYPE_CHECKING:
    from .mcp_servers import McpConnection

SEPARATOR = "__"
# What function names may hold for OpenAI and the chat templates of local models.
MAX_NAME_CHARS = 64
UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def tool_name(server: str, tool: str) -> str:
    """The model-safe name of ``tool`` of ``server``: ``<server>__<tool>``, every
    character other than letters, digits, ``_`` and ``-`` spelled ``_``, cut at 64."""
    return (server + SEPARATOR + UNSAFE.sub("_", tool))[:MAX_NAME_CHARS]


def cut(text: str, max_chars: int) -> str:
    """``text``, or its first characters and a marker that says how much was left out."""
    if len(text) <= max_chars:
        return text
    marker = f"\n[cut: {max_chars} of {len(text)} characters shown]"
    return text[:max_chars] + marker


def result_text(result: mcp_types.CallToolResult) -> str:
    """What the model reads: structured content as JSON, else the content blocks
    one after another; images, audio and blobs only described."""
    if result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(_block_text(block) for block in result.content)


def _block_text(block: Any) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, (mcp_types.ImageContent, mcp_types.AudioContent)):
        kind = "image" if isinstance(block, mcp_types.ImageContent) else "audio"
        return f"[{kind} {block.mime_type}, {_decoded_size(block.data)} bytes, not shown]"
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource link: {block.uri}]"
    if isinstance(block, mcp_types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, mcp_types.TextResourceContents):
            return resource.text
        mime = resource.mime_type or "application/octet-stream"
        return f"[resource {resource.uri}: {mime}, {_decoded_size(resource.blob)} bytes, not shown]"
    return f"[{getattr(block, 'type', 'unknown')} content, not shown]"


def _decoded_size(base64_text: str) -> int:
    return len(base64_text) * 3 // 4 - base64_text[-2:].count("=")


class McpTool(Tool):
    """One tool of one MCP server, as the host's tool loop sees it."""

    def __init__(self, connection: McpConnection, spec: mcp_types.Tool):
        self.connection = connection
        self.remote_name = spec.name
        self.name = tool_name(connection.name, spec.name)
        self.description = spec.description or f"{spec.name} (from the MCP server {connection.name})"
        self.input_schema = spec.input_schema
        validator = jsonschema.validators.validator_for(spec.input_schema)
        self._validator = validator(spec.input_schema)

    def schema(self) -> dict[str, Any]:
        return self.input_schema

    def validate(self, arguments: dict) -> dict:
        """The arguments themselves, once the server's JSON Schema accepts them."""
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "arguments"
            raise ValueError(f"{where}: {error.message}")
        return arguments

    async def call(self, arguments: dict, context: ToolContext) -> str:
        result = await self.connection.call_tool(self.remote_name, arguments, context.username)
        text = cut(result_text(result), self.connection.settings.max_result_chars)
        if result.is_error:
            raise ToolError(text)
        return text
