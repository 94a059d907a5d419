"""MCP servers as tool sources: real SDK servers (tests/mcp_test_server.py) on
loopback, over Streamable HTTP (one process for the module) and stdio (a child
the service supervises), reached through tornado_app.mcp_servers."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tornado_app.config import ConfigError, McpServerSettings, McpSettings, load_settings
from tornado_app.mcp_servers import McpServers, plugin_tool_names
from tornado_app.mcp_tools import tool_name
from tornado_app.tools import ToolContext, ToolError

from tornado_app.analytics import make_filters, run_report

from .conftest import openai_settings
from .helpers import saved_tool_steps
from .openai_upstream import FakeOpenAI
from .servers import _preexec, clean_env, cli, free_port, one_line_error, write_config

SCRIPT = str(Path(__file__).with_name("mcp_test_server.py"))
WAIT = 20.0


class McpHttpServer:
    """``mcp_test_server.py http PORT`` (or ``sse PORT``) as a child process."""

    def __init__(self, port: int, log: Path, mode: str = "http"):
        self.port = port
        self.mode = mode
        self.url = f"http://127.0.0.1:{port}/{'sse' if mode == 'sse' else 'mcp'}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "McpHttpServer":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, SCRIPT, self.mode, str(self.port)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=clean_env(), preexec_fn=_preexec())
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)  # polling a port that is not open yet: nothing to await
        raise AssertionError(f"MCP test server did not listen:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    server = McpHttpServer(free_port(), tmp_path_factory.mktemp("mcp") / "http.log").start()
    yield server
    server.stop()


def http(server: McpHttpServer, name: str = "web", **options) -> McpServerSettings:
    return McpServerSettings(name=name, url=server.url, **options)


def stdio(name: str = "local", **options) -> McpServerSettings:
    return McpServerSettings(name=name, command=sys.executable, args=[SCRIPT, "stdio"], **options)


def context(username: str = "alice") -> ToolContext:
    return ToolContext(user_id=1, username=username, conversation="c1",
                       deadline=asyncio.get_running_loop().time() + 30,
                       memories=None, messages=None)


async def until(servers: McpServers, predicate, timeout: float = WAIT) -> None:
    """Wait for the servers to reach a state (each change wakes the check)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await servers.next_change()


def connected(servers: McpServers, *names: str):
    return lambda: all(servers.states().get(name) == "connected" for name in names)


async def call(servers: McpServers, name: str, arguments: dict, username: str = "alice"):
    tool = servers.tools()[name]
    return await tool.call(tool.validate(arguments), context(username))


@pytest.fixture
def mcp(io_loop):
    """``mcp(*server_settings)``: McpServers, closed after the test."""
    made: list[McpServers] = []

    def make(*servers: McpServerSettings) -> McpServers:
        made.append(McpServers(McpSettings(servers=list(servers))))
        return made[-1]

    yield make
    for servers in made:
        io_loop.run_sync(servers.close)


# Discovery and names


def test_names_are_model_safe():
    assert tool_name("web", "lookup") == "web__lookup"
    assert tool_name("web", "files/read.v2") == "web__files_read_v2"
    assert len(tool_name("web", "x" * 100)) == 64


@pytest.mark.gen_test(timeout=30)
async def test_http_tools_are_discovered_with_description_and_schema(mcp, http_server):
    servers = mcp(http(http_server))
    await until(servers, connected(servers, "web"))
    tools = servers.tools()
    assert {"web__lookup", "web__slow", "web__fail", "web__header", "web__big"} <= set(tools)
    lookup = tools["web__lookup"]
    assert lookup.description == "Population of a city."
    assert lookup.schema()["properties"]["city"]["type"] == "string"
    assert lookup.schema()["required"] == ["city"]


@pytest.mark.gen_test(timeout=30)
async def test_allow_keeps_only_the_named_tools(mcp, http_server):
    servers = mcp(http(http_server, allow=["lookup", "header"]))
    await until(servers, connected(servers, "web"))
    assert set(servers.tools()) == {"web__lookup", "web__header"}


@pytest.mark.gen_test(timeout=30)
async def test_a_changed_tool_list_is_picked_up(mcp, http_server):
    servers = mcp(http(http_server))
    await until(servers, connected(servers, "web"))
    added = f"extra_{uuid.uuid4().hex[:6]}"
    assert await call(servers, "web__grow", {"name": added}) == f"added {added}"
    await until(servers, lambda: f"web__{added}" in servers.tools())
    assert await call(servers, f"web__{added}", {}) == f"{added} here"


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_an_older_server_over_sse(mcp, tmp_path):
    old = McpHttpServer(free_port(), tmp_path / "sse.log", mode="sse").start()
    try:
        servers = mcp(McpServerSettings(name="old", url=old.url, transport="sse",
                                        user_header="X-Chat-User"))
        await until(servers, connected(servers, "old"))
        assert await call(servers, "old__lookup", {"city": "Kyiv"}) == \
            '{"city": "Kyiv", "population": 4000}'
        assert await call(servers, "old__header", {"name": "X-Chat-User"}, "carol") == "carol"
        # Tool list changes are followed over SSE too.
        assert await call(servers, "old__grow", {"name": "later"}) == "added later"
        await until(servers, lambda: "old__later" in servers.tools())
    finally:
        old.stop()


# Arguments and results


@pytest.mark.gen_test(timeout=30)
async def test_arguments_are_checked_against_the_servers_schema(mcp, http_server):
    servers = mcp(http(http_server))
    await until(servers, connected(servers, "web"))
    lookup = servers.tools()["web__lookup"]
    with pytest.raises(ValueError, match="city"):
        lookup.validate({})
    with pytest.raises(ValueError, match="city: 3 is not of type 'string'"):
        lookup.validate({"city": 3})
    assert lookup.validate({"city": "Oslo"}) == {"city": "Oslo"}


@pytest.mark.gen_test(timeout=30)
async def test_results_structured_cut_and_binary(mcp, http_server):
    servers = mcp(http(http_server, max_result_chars=100))
    await until(servers, connected(servers, "web"))
    assert await call(servers, "web__lookup", {"city": "Oslo"}) == \
        '{"city": "Oslo", "population": 4000}'
    long = await call(servers, "web__big", {"chars": 5000})
    assert long == "x" * 100 + "\n[cut: 100 of 5000 characters shown]"
    assert await call(servers, "web__pixel", {}) == "[image image/png, 28 bytes, not shown]"


@pytest.mark.gen_test(timeout=30)
async def test_a_raising_tool_is_an_error_for_the_model(mcp, http_server):
    servers = mcp(http(http_server))
    await until(servers, connected(servers, "web"))
    with pytest.raises(ToolError, match="no such city"):
        await call(servers, "web__fail", {"message": "no such city"})
    # The connection is unharmed.
    assert "Oslo" in await call(servers, "web__lookup", {"city": "Oslo"})


@pytest.mark.gen_test(timeout=30)
async def test_a_slow_call_times_out(mcp, http_server):
    servers = mcp(http(http_server, timeout_seconds=0.5))
    await until(servers, connected(servers, "web"))
    started = time.monotonic()
    # A TimeoutError: the host's loop records it as a timeout, like its own.
    with pytest.raises(TimeoutError, match="no answer in 0.5 s"):
        await call(servers, "web__slow", {"seconds": 10})
    assert time.monotonic() - started < 5
    assert await call(servers, "web__slow", {"seconds": 0}) == "slept 0.0"


@pytest.mark.gen_test(timeout=30)
async def test_calls_run_concurrently_and_a_cancelled_one_harms_nothing(mcp, http_server):
    servers = mcp(http(http_server))
    await until(servers, connected(servers, "web"))
    started = time.monotonic()
    results = await asyncio.gather(*(call(servers, "web__slow", {"seconds": 2})
                                     for _ in range(3)))
    assert results == ["slept 2.0"] * 3
    assert time.monotonic() - started < 5.5  # one after another: 6 s
    # The host's own timeout (or a cancel) ends a call from outside.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(servers, "web__slow", {"seconds": 10}), 0.3)
    assert "Oslo" in await call(servers, "web__lookup", {"city": "Oslo"})
    assert servers.states() == {"web": "connected"}


@pytest.mark.gen_test(timeout=30)
async def test_the_user_header_carries_the_callers_name_and_nothing_else(mcp, http_server):
    servers = mcp(http(http_server, name="scoped", user_header="X-Chat-User",
                       headers={"Authorization": "Bearer s3cret"}),
                  http(http_server, name="plain"))
    await until(servers, connected(servers, "scoped", "plain"))
    assert await call(servers, "scoped__header", {"name": "X-Chat-User"}, "alice") == "alice"
    assert await call(servers, "scoped__header", {"name": "X-Chat-User"}, "bob") == "bob"
    assert await call(servers, "scoped__header", {"name": "Authorization"}) == "Bearer s3cret"
    assert await call(servers, "plain__header", {"name": "X-Chat-User"}) == "(none)"


# Servers that fail


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_server_down_at_start_up_joins_when_it_comes_up(mcp, tmp_path, caplog):
    caplog.set_level(logging.INFO, "tornado_app.mcp_servers")
    late = McpHttpServer(free_port(), tmp_path / "late.log")
    servers = mcp(McpServerSettings(name="late", url=late.url))
    await until(servers, lambda: servers.states()["late"] == "down")
    assert servers.tools() == {}
    late.start()
    try:
        await until(servers, connected(servers, "late"))
        assert "late__lookup" in servers.tools()
    finally:
        late.stop()
    await until(servers, lambda: servers.states()["late"] == "down")
    assert servers.tools() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Once per outage, however many retries.
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("MCP server late unreachable (")


@pytest.mark.gen_test(timeout=30)
async def test_a_server_that_never_answers_blocks_no_other(mcp, http_server):
    with socket.socket() as silent:  # accepts connections (the backlog), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/mcp"
        servers = mcp(McpServerSettings(name="silent", url=url, timeout_seconds=0.5),
                      http(http_server))
        await until(servers, connected(servers, "web"))
        await until(servers, lambda: servers.states()["silent"] == "down")
        assert servers.connections["silent"].reason
        assert all(name.startswith("web__") for name in servers.tools())


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_a_stdio_server_is_supervised_and_restarted(mcp, caplog):
    caplog.set_level(logging.INFO, "tornado_app.mcp_servers")
    servers = mcp(stdio())
    await until(servers, connected(servers, "local"))
    assert await call(servers, "local__lookup", {"city": "Rome"}) == \
        '{"city": "Rome", "population": 4000}'
    with pytest.raises(ToolError):
        await call(servers, "local__crash", {})
    await until(servers, lambda: servers.states()["local"] != "connected")
    await until(servers, connected(servers, "local"))
    assert "Rome" in await call(servers, "local__lookup", {"city": "Rome"})
    lines = [r.getMessage() for r in caplog.records]
    assert "MCP server local: test server: crashing on purpose" in lines
    assert lines.count("MCP server local: test server: starting") == 2


@pytest.mark.gen_test(timeout=60)
async def test_reload_adds_and_removes_servers(mcp, http_server):
    servers = mcp(http(http_server))
    await until(servers, connected(servers, "web"))
    web = servers.connections["web"]
    await servers.reload(McpSettings(servers=[http(http_server), http(http_server, "more")]))
    assert servers.connections["web"] is web  # unchanged: kept connected
    await until(servers, connected(servers, "more"))
    await servers.reload(McpSettings(servers=[http(http_server, "more", allow=["lookup"])]))
    assert set(servers.states()) == {"more"}  # web removed, more changed: reconnected
    await until(servers, lambda: set(servers.tools()) == {"more__lookup"})


# Configuration


def test_header_values_come_from_the_environment():
    raw = {"servers": [{"name": "gh", "url": "http://127.0.0.1:1/mcp",
                        "headers": {"Authorization": "Bearer ${GH_TOKEN}"}}]}
    environ = {"GH_TOKEN": "t0ken", "TORNADO_APP_MCP__SERVERS": _yaml(raw["servers"])}
    settings = load_settings(None, environ)
    assert settings.mcp.servers[0].headers == {"Authorization": "Bearer t0ken"}
    with pytest.raises(ConfigError, match=r"mcp.servers\[0\].headers.Authorization: "
                                          r"environment variable GH_TOKEN is not set"):
        load_settings(None, {"TORNADO_APP_MCP__SERVERS": _yaml(raw["servers"])})


def _yaml(value) -> str:
    import json

    return json.dumps(value)  # JSON is YAML


@pytest.mark.parametrize("server, words", [
    ({"name": "x", "url": "http://a/mcp", "command": "x"}, ["either url", "or command"]),
    ({"name": "x"}, ["either url"]),
    ({"name": "a__b", "command": "x"}, ["mcp.servers.name", "pattern"]),
    ({"name": "x", "command": "x", "user_header": "X-User"}, ["user_header needs"]),
    ({"name": "x", "url": "ftp://a"}, ["url must start with http"]),
    ({"name": "x", "command": "x", "timeout": 3}, ["mcp.servers.timeout: unknown key"]),
])
def test_bad_server_config_names_the_key(server, words):
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"TORNADO_APP_MCP__SERVERS": _yaml([server])})
    for word in words:
        assert word in str(caught.value)


def test_a_bad_server_config_stops_start_up_with_one_line(tmp_path):
    config = write_config(tmp_path, mcp={"servers": [{"name": "x", "url": "http://a/mcp",
                                                      "command": "x"}]})
    one_line_error(cli(config, "db", "current"), 2, "mcp.servers", "either url")


# The service: /readyz, /metrics, SIGHUP


def wait_for_readyz(server, expected: dict) -> None:
    """Poll /readyz until its ``mcp`` detail is ``expected``; it stays 200 meanwhile."""

    def check() -> bool:
        status, body = server.get("/readyz")
        assert status == 200, body  # MCP servers never make the service unready
        return body.get("mcp") == expected

    poll(check)


@pytest.mark.slow
def test_sighup_adds_and_removes_servers_and_readyz_names_their_state(
        tmp_path, servers, http_server):
    down = {"name": "gone", "url": f"http://127.0.0.1:{free_port()}/mcp"}
    config = write_config(tmp_path, mcp={"servers": [{"name": "web", "url": http_server.url},
                                                     down]})
    server = servers(config)
    wait_for_readyz(server, {"web": "connected", "gone": "down"})
    write_config(tmp_path, mcp={"servers": [{"name": "again", "url": http_server.url}]})
    server.signal(signal.SIGHUP)
    wait_for_readyz(server, {"again": "connected"})
    # The removed servers' connections close after the swap: their series go then.
    poll(lambda: 'server="web"' not in (text := server_text(server, "/metrics"))
         and 'server="gone"' not in text)
    assert 'chat_mcp_server_up{server="again"} 1.0' in server_text(server, "/metrics")
    assert "MCP server gone unreachable (" in server.log()


def poll(check, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)  # another process's background work: nothing to await


def server_text(server, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(server.base_url + path, timeout=10) as response:
        return response.read().decode()


# agent.tools entries


def test_agent_tools_name_mcp_servers_or_their_tools():
    settings = McpSettings(servers=[McpServerSettings(name="web", url="http://a/mcp")])
    names = ["clock", "mcp:web", "web__lookup", "other__x", "web"]
    assert plugin_tool_names(names, settings) == {0: "clock", 3: "other__x", 4: "web"}
    with pytest.raises(ConfigError, match=r"agent.tools\[1\]: 'mcp:files' names no server "
                                          r"of mcp.servers; configured: web"):
        plugin_tool_names(["clock", "mcp:files"], settings)


@pytest.mark.gen_test(timeout=30)
async def test_enabled_tools_follow_the_connected_servers(mcp, http_server):
    servers = mcp(http(http_server, allow=["lookup", "header", "slow"]),
                  http(http_server, name="two", allow=["lookup", "fail"]))
    await until(servers, connected(servers, "web", "two"))
    assert set(servers.enabled(["mcp:web", "two__fail", "two__nothing", "clock"])) == \
        {"web__lookup", "web__header", "web__slow", "two__fail"}


# End to end: the openai plugin (against a loopback upstream) calls MCP tools


@pytest.fixture
def upstream():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def settings(tmp_path, db_url, upstream, http_server):
    web = {"name": "web", "url": http_server.url, "user_header": "X-Chat-User",
           "allow": ["lookup", "header", "fail"]}
    return openai_settings(tmp_path, db_url, upstream,
                           TORNADO_APP_AGENT__TOOLS='["clock", "mcp:web"]',
                           TORNADO_APP_MCP__SERVERS=_yaml([web]))


@pytest.mark.gen_test(timeout=60)
async def test_the_openai_plugin_calls_mcp_tools_through_the_host_loop(
        service, connect, upstream, store):
    await until(service.mcp, connected(service.mcp, "web"))
    upstream.tool_calls([("call_1", "web__lookup", '{"city": "Oslo"}'),
                         ("call_2", "web__header", '{"name": "X-Chat-User"}'),
                         ("call_3", "web__fail", '{"message": "no luck"}'),
                         ("call_4", "web__lookup", '{"city": 5}')])
    upstream.reply(["Oslo has ", "4000 people."])
    client = await connect("mcp-e2e", subprotocols=["ai-chat.v2"])
    await client.send({"content": "How big is Oslo?", "stream": True})
    frames = await client.receive_until("ai_response")
    assert frames[-1]["message"] == "Oslo has 4000 people."
    results = {f["call_id"]: f for f in frames if f["type"] == "tool_result"}
    assert {k: (f["name"], f["ok"]) for k, f in results.items()} == {
        "call_1": ("web__lookup", True), "call_2": ("web__header", True),
        "call_3": ("web__fail", False), "call_4": ("web__lookup", False)}
    assert all("result" not in f for f in results.values())  # results stay off the page
    first, second = (request.json for request in upstream.requests)
    offered = {tool["function"]["name"]: tool["function"] for tool in first["tools"]}
    assert set(offered) == {"clock", "web__lookup", "web__header", "web__fail"}
    assert offered["web__lookup"]["description"] == "Population of a city."
    assert offered["web__lookup"]["parameters"]["required"] == ["city"]
    answers = {m["tool_call_id"]: m["content"] for m in second["messages"] if m["role"] == "tool"}
    assert answers["call_1"] == '{"city": "Oslo", "population": 4000}'
    assert answers["call_2"] == "alice"  # the user header reached the server
    assert answers["call_3"] == "error: Error executing tool fail: no luck"  # the server's text
    assert answers["call_4"].startswith("error: invalid arguments: city: 5 is not of type")
    steps = await saved_tool_steps(store)
    assert sorted((s.tool, s.status) for s in steps) == [
        ("web__fail", "error"), ("web__header", "ok"), ("web__lookup", "error"),
        ("web__lookup", "ok")]
    report = (await run_report(store.engine, "tools", make_filters())).as_json()
    assert {(row["tool"], row["calls"], row["errors"]) for row in report["tools"]} == {
        ("web__fail", 1, 1), ("web__header", 1, 0), ("web__lookup", 2, 1)}


@pytest.mark.gen_test(timeout=60)
async def test_a_server_that_is_down_leaves_its_tools_out_of_the_prompt(
        service, connect, upstream, http_server):
    await until(service.mcp, connected(service.mcp, "web"))
    await service.mcp.reload(McpSettings(servers=[McpServerSettings(
        name="web", url=f"http://127.0.0.1:{free_port()}/mcp")]))
    await until(service.mcp, lambda: service.mcp.states()["web"] == "down")
    upstream.reply(["Hi."])
    client = await connect("mcp-down")
    await client.send({"content": "Hello"})
    frame = await client.receive()
    assert frame == {"type": "ai_response", "message": "Hi.", "timestamp": frame["timestamp"]}
    [request] = upstream.requests
    assert [tool["function"]["name"] for tool in request.json["tools"]] == ["clock"]
