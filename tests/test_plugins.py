"""The plugin system: built-ins, third-party entry points, config validation."""

import re

import pytest

from tornado_app.agents import (
    DEFAULT_PLUGINS,
    available_agents,
    get_plugin_manager,
    validate_agent_settings,
)
from tornado_app.config import ConfigError, load_settings

from .helpers import saved_messages


def test_built_in_plugins_are_ordinary_plugins():
    manager = get_plugin_manager()
    for name in DEFAULT_PLUGINS:
        assert manager.has_plugin(name)
    assert "echo" in available_agents()


def test_third_party_plugin_is_found_through_its_entry_point():
    """examples/tornado-app-shout is installed by `make install` like any package."""
    manager = get_plugin_manager()
    assert manager.has_plugin("shout")  # the entry point's name
    spec = available_agents()["shout"]
    assert spec.plugin == "shout"


def refusal(tmp_path, **environ) -> str:
    """What validate_agent_settings says about settings with these overrides
    (``agent__backend="nope"`` for TORNADO_APP_AGENT__BACKEND=nope)."""
    environ = {f"TORNADO_APP_{k.upper()}": v for k, v in environ.items()}
    environ["TORNADO_APP_DATA_DIR"] = str(tmp_path)
    settings = load_settings(None, environ)
    with pytest.raises(ConfigError) as error:
        validate_agent_settings(settings, available_agents())
    return str(error.value)


def test_unknown_backend_lists_the_available_ones(tmp_path):
    message = refusal(tmp_path, agent__backend="nope")
    assert message.startswith("agent.backend: unknown agent 'nope'; available: ")
    assert "echo" in message and "shout" in message


def test_unknown_fallback_is_refused(tmp_path):
    assert re.search(r"agent.fallbacks\[1\]: unknown agent 'nope'",
                     refusal(tmp_path, agent__fallbacks="[echo, nope]"))


def test_plugin_options_are_validated_by_the_plugin(tmp_path):
    assert re.search(r"^agent.echo.delay_seconds: ",
                     refusal(tmp_path, agent__echo__delay_seconds="-1"))
    assert re.search(r"^agent.echo.typo: unknown key; .*prefix",
                     refusal(tmp_path, agent__echo__typo="1"))


def test_an_options_section_for_no_agent_is_refused(tmp_path):
    assert re.search(r"^agent.nosuch: unknown key", refusal(tmp_path, agent__nosuch__x="1"))


class TestShoutEndToEnd:
    @pytest.fixture
    def settings(self, settings):
        settings.agent.backend = "shout"
        return settings

    @pytest.mark.gen_test
    async def test_chat_through_the_third_party_agent(self, connect, store):
        client = await connect()
        await client.send({"content": "hello there"})
        assert (await client.receive())["message"] == "HELLO THERE !"
        reply = (await saved_messages(store, 1))[-1]
        assert (reply.agent, reply.model) == ("shout", "shout-1")
