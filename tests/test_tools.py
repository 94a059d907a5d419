"""Tools as plugins: the registry, the config (agent.tools, tools.<name>),
SIGHUP, the built-in ``clock``, and the contract's defaults."""

from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tornado_app.agents import DEFAULT_PLUGINS, get_plugin_manager
from tornado_app.config import ConfigError, load_settings
from tornado_app.tool_loop import Caller, tool_context
from tornado_app.toolbox import Toolbox, available_tools, validate_tool_settings
from tornado_app.tools import Tool, ToolCall

from .helpers import install_late_tool, saved_tool_steps
from .servers import cli, one_line_error, write_config


def refusal(tmp_path, **environ) -> str:
    environ = {f"TORNADO_APP_{k.upper()}": v for k, v in environ.items()}
    environ["TORNADO_APP_DATA_DIR"] = str(tmp_path)
    settings = load_settings(None, environ)
    with pytest.raises(ConfigError) as error:
        validate_tool_settings(settings, available_tools())
    assert "\n" not in str(error.value)
    return str(error.value)


def test_clock_is_a_built_in_plugin_registered_like_any_other():
    assert "plugins.clock_tool" in DEFAULT_PLUGINS
    assert get_plugin_manager().has_plugin("plugins.clock_tool")
    assert available_tools()["clock"].plugin == "plugins.clock_tool"


def test_unknown_tool_names_are_a_one_line_config_error(tmp_path):
    message = refusal(tmp_path, agent__tools="[clock, nope]")
    assert message.startswith("agent.tools[1]: unknown tool 'nope'; available: ")
    assert "clock" in message


def test_tool_option_sections_are_validated_by_the_tool(tmp_path):
    assert refusal(tmp_path, tools__clock__x="1") == "tools.clock: this tool takes no options"
    assert re.match(r"tools.nope: unknown key; use timeout_seconds or a tool's section: .*clock",
                    refusal(tmp_path, tools__nope__x="1"))


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = Field("", max_length=3)


class Shout(Tool):
    description = "Shout."

    class Arguments(BaseModel):
        text: str

    def __init__(self, options):
        self.options = options
        self.closed = False

    async def call(self, arguments, context):
        return self.options.prefix + arguments.text.upper()

    async def close(self):
        self.closed = True


class ShoutPlugin:
    def __init__(self):
        self.made = []

    from tornado_app.hookspecs import hookimpl

    @hookimpl
    def register_tools(self, register):
        def make(options, settings):
            self.made.append(Shout(options))
            return self.made[-1]

        register("shout_tool", make, options=Options)


@pytest.fixture
def shout_plugin():
    plugin = ShoutPlugin()
    manager = get_plugin_manager()
    manager.register(plugin, name="shout-tool-test")
    yield plugin
    manager.unregister(plugin)


def test_options_models_are_applied_and_reported_at_their_key(tmp_path, shout_plugin):
    assert refusal(tmp_path, tools__shout_tool__prefix="toolong").startswith(
        "tools.shout_tool.prefix: String should have at most 3 characters")
    assert refusal(tmp_path, tools__shout_tool__typo="1").startswith(
        "tools.shout_tool.typo: unknown key; remove it or use one of: prefix")


@pytest.mark.gen_test
async def test_the_toolbox_builds_swaps_and_closes_tools(tmp_path, shout_plugin):
    def settings(**environ):
        environ = {f"TORNADO_APP_{k.upper()}": v for k, v in environ.items()}
        return load_settings(None, {"TORNADO_APP_DATA_DIR": str(tmp_path), **environ})

    box = Toolbox(settings(agent__tools="[shout_tool]", tools__shout_tool__prefix=">"))
    with box.lease() as tools:
        assert list(tools) == ["shout_tool"] and tools["shout_tool"].name == "shout_tool"
        assert await tools["shout_tool"].call(Shout.Arguments(text="hi"), None) == ">HI"
        first = tools["shout_tool"]
        box.swap(settings(agent__tools="[shout_tool, clock]", tools__shout_tool__prefix=">"))
        with box.lease() as again:
            assert again["shout_tool"] is first  # same options: kept
        box.swap(settings(agent__tools="[clock]"))
        assert not first.closed  # still in use by the first lease
    await asyncio.sleep(0)
    assert first.closed
    with pytest.raises(ConfigError):
        box.swap(settings(agent__tools="[nope]"))
    with box.lease() as tools:
        assert list(tools) == ["clock"]  # a refused config changes nothing
    await box.close()


@pytest.mark.gen_test
async def test_clock_gives_the_utc_time_and_weekday():
    from plugins.clock_tool import ClockTool

    tool = ClockTool()
    assert tool.schema() == {"additionalProperties": False, "properties": {},
                             "title": "NoArguments", "type": "object"}
    with pytest.raises(ValueError):
        tool.validate({"zone": "CET"})
    context = tool_context(Caller(1, "alice", "c1"), 10)
    result = await tool.call(tool.validate({}), context)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result["utc"])
    assert result["weekday"] in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                                 "Saturday", "Sunday")
    assert context.deadline - asyncio.get_running_loop().time() <= 10


def test_serve_refuses_an_unknown_tool_in_one_line(tmp_path):
    config = write_config(tmp_path, agent={"backend": "echo", "tools": ["clock", "nope"]})
    result = cli(config, "serve")
    one_line_error(result, 2, "agent.tools[1]: unknown tool 'nope'")


# SIGHUP: a tool named in agent.tools is used by the next reply


@pytest.fixture
def settings(settings, fake_agent):
    fake_agent.supports_tools = True
    return settings


@pytest.fixture
def late_package(tmp_path):
    """A tool package as pip would install it, in a folder not yet on
    sys.path; unregistered afterwards."""
    site = tmp_path / "site-packages"
    install_late_tool(site)
    yield site
    manager = get_plugin_manager()
    if manager.has_plugin("late"):
        manager.unregister(name="late")


@pytest.mark.gen_test(timeout=30)
async def test_install_a_tool_package_name_it_send_sighup_and_the_next_reply_uses_it(
        service, connect, fake_agent, store, settings, tmp_path, late_package, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"database: {{url: '{settings.database.url}'}}\n"
        f"auth: {{jwt_secret: '{settings.jwt_secret}'}}\n"
        "agent: {backend: fake, tools: [clock, late]}\n"
        "tools: {timeout_seconds: 3}\n")
    service.config_path = str(config)
    client = await connect("sighup")
    await client.send({"content": "before"})
    await client.receive_type("ai_response")
    assert fake_agent.history[0].tools == []
    service.reload_agents()  # not installed yet: refused, nothing changes
    assert service.settings.tools.timeout_seconds == 10
    monkeypatch.syspath_prepend(str(late_package))  # "pip install"
    service.reload_agents()
    assert service.settings.tools.timeout_seconds == 3
    fake_agent.enqueue(ToolCall("c1", "late", {}), ToolCall("c2", "clock", {}))
    fake_agent.enqueue("done")
    await client.send({"content": "after"})
    assert (await client.receive_type("ai_response"))["message"] == "done"
    assert [tool["name"] for tool in fake_agent.history[1].tools] == ["clock", "late"]
    tool_messages = [m for m in fake_agent.history[2].messages if m["role"] == "tool"]
    assert tool_messages[0]["content"] == "late tool here"
    assert [step.status for step in await saved_tool_steps(store)] == ["ok", "ok"]


# examples/tornado-app-units: a third-party tool package, installed by `make install`


@pytest.mark.gen_test
async def test_the_example_tool_package_is_found_through_its_entry_point(tmp_path):
    from tornado_app.toolbox import create_tool
    from tornado_app.tools import ToolError

    assert get_plugin_manager().has_plugin("units")  # the entry point's name
    spec = available_tools()["convert_units"]
    assert spec.plugin == "units"
    settings = load_settings(None, {"TORNADO_APP_DATA_DIR": str(tmp_path),
                                    "TORNADO_APP_AGENT__TOOLS": "[convert_units]",
                                    "TORNADO_APP_TOOLS__CONVERT_UNITS__PRECISION": "2"})
    validate_tool_settings(settings, available_tools())
    tool = create_tool(settings, spec)
    context = tool_context(Caller(1, "alice", "c1"), 10)
    miles = tool.validate({"value": 3.5, "from_unit": "mi", "to_unit": "km"})
    assert await tool.call(miles, context) == {"value": 5.63, "unit": "km"}
    boiling = tool.validate({"value": 100, "from_unit": "c", "to_unit": "f"})
    assert await tool.call(boiling, context) == {"value": 212.0, "unit": "f"}
    with pytest.raises(ToolError, match="cannot convert mass"):
        await tool.call(tool.validate({"value": 1, "from_unit": "kg", "to_unit": "m"}), context)
    with pytest.raises(ValueError):
        tool.validate({"value": 1, "from_unit": "parsec", "to_unit": "m"})
    assert set(tool.schema()["properties"]) == {"value", "from_unit", "to_unit"}
