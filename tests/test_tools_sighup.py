"""Real server processes (``openai`` agent against a loopback fake) with
tools: the operator's path (a tool package installed while the server runs,
named in ``agent.tools``, SIGHUP, the next reply uses it), and the spec's
client script printing tool steps."""

from __future__ import annotations

import os
import signal

import yaml

from .helpers import connect_ws, install_late_tool, run_async, wait_for_log
from .openai_upstream import FakeOpenAI
from .servers import add_users, token, write_config


async def ask(server, user_token: str, content: str) -> dict:
    client = await connect_ws(server.ws_url("sighup", user_token))
    await client.receive()  # the welcome
    await client.send({"content": content})
    reply = await client.receive()
    client.close()
    return reply


def test_a_tool_installed_while_serving_is_used_after_sighup(tmp_path, servers):
    site = tmp_path / "site-packages"
    site.mkdir()
    with FakeOpenAI() as upstream:
        openai = {"base_url": upstream.base_url, "api_key": "sk-test", "max_retries": 0}
        config = write_config(tmp_path / "server",
                              agent={"backend": "openai", "tools": ["clock"], "openai": openai})
        add_users(config, "alice")
        user_token = token(config, "alice")
        server = servers(config, env={"PYTHONPATH": str(site)})

        install_late_tool(site)
        data = yaml.safe_load(config.read_text())
        data["agent"]["tools"] = ["clock", "late"]
        config.write_text(yaml.safe_dump(data))
        os.kill(server.pid, signal.SIGHUP)
        wait_for_log(server, "tools now: clock, late")

        upstream.tool_calls([("call_1", "late", "{}")])
        upstream.reply(["The late tool answered."])
        reply = run_async(ask(server, user_token, "Use the new tool"))
        assert reply["type"] == "ai_response" and reply["message"] == "The late tool answered."
        first, second = (request.json for request in upstream.requests)
        assert [tool["function"]["name"] for tool in first["tools"]] == ["clock", "late"]
        assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1",
                                          "content": "late tool here"}


def test_the_client_script_prints_tool_steps(tmp_path, servers):
    from .test_client_script import login_args, run_script

    with FakeOpenAI() as upstream:
        openai = {"base_url": upstream.base_url, "api_key": "sk-test", "max_retries": 0}
        config = write_config(tmp_path, agent={"backend": "openai", "tools": ["clock"],
                                               "openai": openai})
        add_users(config, "alice")
        server = servers(config)
        upstream.tool_calls([("call_1", "clock", "{}"), ("call_2", "nope", '{"x": "é"}')],
                            pieces=["Let me check. "])
        upstream.reply(["It is ", "Saturday."])
        result = run_script(*login_args(server.base_url), "--v2", "--stream",
                            "--message", "What day is it?")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("[ai] Let me check. ")
    tools = lines[start + 1:start + 5]
    # The calls run concurrently: the frames of the two may interleave.
    assert sorted(tools) == sorted(["[tool] clock {}", '[tool] nope {"x": "é"}',
                                    "[tool] clock: ok", "[tool] nope: failed"])
    assert tools.index("[tool] clock {}") < tools.index("[tool] clock: ok")
    assert tools.index('[tool] nope {"x": "é"}') < tools.index("[tool] nope: failed")
    assert lines[start + 5] == "[ai] It is Saturday."
