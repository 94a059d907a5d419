"""GET /metrics (Prometheus) and JSON log lines that follow one exchange."""

import io
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tornado_app.agents import AgentError
from tornado_app.config import LoggingSettings
from tornado_app.logs import setup_logging

from .helpers import connect_ws, get


async def scrape(base_url) -> dict:
    response = await get(f"{base_url}/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.gen_test
async def test_metrics_count_sockets_messages_latency_and_rejections(
    base_url, connect, fake_agent, ws_url
):
    before = await scrape(base_url)
    client = await connect()
    fake_agent.enqueue("fine")
    fake_agent.enqueue(error=AgentError("upstream", "down"))
    await client.send({"content": "one"})
    await client.receive()
    await client.send({"content": "two"})
    await client.receive()
    await client.send("not json")
    await client.receive()
    refused = await connect_ws(ws_url("x", "bad-token"))
    await refused.wait_closed()
    after = await scrape(base_url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # A difference, like the counters: the gauge is the process's, and a test
    # run earlier in this process may still be closing sockets of its own.
    assert delta("chat_open_sockets") == 1
    assert delta("chat_messages_total", outcome="ok") == 1
    assert delta("chat_messages_total", outcome="error") == 1
    assert delta("chat_messages_total", outcome="invalid") == 1
    assert delta("chat_errors_total", kind="upstream") == 1
    assert delta("chat_rejections_total", reason="auth") == 1
    assert delta("chat_reply_seconds_count", agent="fake") == 2
    assert delta("chat_first_token_seconds_count", agent="fake") == 1


@pytest.fixture
def json_log():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging(LoggingSettings(level="INFO", format="json"), stream=stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.mark.gen_test
async def test_json_log_lines_carry_the_exchange_and_conversation(json_log, connect, fake_agent):
    fake_agent.enqueue(error=AgentError("upstream", "down"))
    client = await connect("conv-7")
    await client.send({"content": "hi"})
    await client.receive()
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    failure = next(line for line in lines if "failed (upstream" in line["message"])
    assert failure["level"] == "WARNING"
    assert failure["user"] == "alice"
    assert isinstance(failure["conversation"], int)
    assert len(failure["exchange"]) == 8
    assert {"time", "logger"} <= set(failure)
