"""The plugin system: built-ins, third-party entry points, config validation."""

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


def _settings(tmp_path, **environ):
    environ = {f"TORNADO_APP_{k.upper()}": v for k, v in environ.items()}
    environ["TORNADO_APP_DATA_DIR"] = str(tmp_path)
    return load_settings(None, environ)


def test_unknown_backend_lists_the_available_ones(tmp_path):
    settings = _settings(tmp_path, agent__backend="nope")
    with pytest.raises(ConfigError) as error:
        validate_agent_settings(settings, available_agents())
    message = str(error.value)
    assert message.startswith("agent.backend: unknown agent 'nope'; available: ")
    assert "echo" in message and "shout" in message


def test_unknown_fallback_is_refused(tmp_path):
    settings = _settings(tmp_path, agent__fallbacks="[echo, nope]")
    with pytest.raises(ConfigError, match=r"agent.fallbacks\[1\]: unknown agent 'nope'"):
        validate_agent_settings(settings, available_agents())


def test_plugin_options_are_validated_by_the_plugin(tmp_path):
    settings = _settings(tmp_path, agent__echo__delay_seconds="-1")
    with pytest.raises(ConfigError, match=r"^agent.echo.delay_seconds: "):
        validate_agent_settings(settings, available_agents())
    settings = _settings(tmp_path, agent__echo__typo="1")
    with pytest.raises(ConfigError, match=r"^agent.echo.typo: unknown key; .*prefix"):
        validate_agent_settings(settings, available_agents())


def test_an_options_section_for_no_agent_is_refused(tmp_path):
    settings = _settings(tmp_path, agent__nosuch__x="1")
    with pytest.raises(ConfigError, match=r"^agent.nosuch: unknown key"):
        validate_agent_settings(settings, available_agents())


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
