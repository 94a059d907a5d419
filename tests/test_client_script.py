"""test_ai_chat_websocket.py, the spec's client script, run as a user would run it.

One live server per module: ``python -m tornado_app`` as a real subprocess on a
free port, with a temporary SQLite database, the ``echo`` agent and a user made
through the CLI. The script runs as a subprocess against it; every failure must
be a non-zero exit and exactly one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .servers import PASSWORD, ROOT, add_users, clean_env, free_port, serving, write_config

SCRIPT = ROOT / "test_ai_chat_websocket.py"
MAX_CONTENT_CHARS = 50
TIMEOUT = 60  # seconds any one subprocess may take before the test fails


def alice_config(folder: Path, **echo_options) -> Path:
    """A config with the echo agent and the user alice, made through the CLI."""
    config = write_config(folder, agent={"backend": "echo", "echo": echo_options},
                          chat={"max_content_chars": MAX_CONTENT_CHARS})
    add_users(config, "alice")
    return config


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with serving(alice_config(tmp_path_factory.mktemp("live-server"), prefix="Echo: ")) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def slow_server_url(tmp_path_factory):
    """A server whose echo agent pauses 2 s before each word."""
    with serving(alice_config(tmp_path_factory.mktemp("slow-server"), delay_seconds=2)) as server:
        yield server.base_url


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env or clean_env(), cwd=ROOT, timeout=TIMEOUT)


def login_args(url: str, password: str = PASSWORD) -> list[str]:
    return ["--url", url, "--username", "alice", "--password", password]


def assert_failed_with_one_line(result: subprocess.CompletedProcess, *words: str,
                                code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    return lines[0]


def test_default_messages_all_answered(server_url):
    result = run_script(*login_args(server_url))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "[system] Welcome to AI Chat, alice! How can I assist you today?" in out
    assert "[ai] Echo: Hello, AI!" in out
    assert out.count("[ai] ") == 3
    assert out.rstrip().endswith("ok: 3 message(s) answered")


def test_given_messages_sent_in_order_in_one_conversation(server_url):
    result = run_script(*login_args(server_url), "--client-id", "script-conv",
                        "--message", "first", "--message", "second")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:5] == ["[you] first", "[ai] Echo: first", "[you] second", "[ai] Echo: second"]


def test_stream_prints_the_reply_once_from_its_chunks(server_url):
    result = run_script(*login_args(server_url), "--stream", "--message", "one two three")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Echo: one two three") == 1
    assert "[ai] Echo: one two three\n" in result.stdout
    # The echo agent streams word by word: "Echo: ", "one ", "two ", "three".
    assert "ok: 1 message(s) answered in 4 streamed chunk(s)" in result.stdout


def test_v2_prints_the_ids_of_each_message_and_reply(server_url):
    result = run_script(*login_args(server_url), "--v2", "--stream", "--message", "one two",
                        "--message", "three")
    assert result.returncode == 0, result.stderr
    ids = [line for line in result.stdout.splitlines() if line.startswith("[ids] ")]
    assert [line.split(":")[0] for line in ids] == ["[ids] ack", "[ids] ai_response"] * 2
    acks = [re.fullmatch(r"\[ids\] ack: message_id=(\w{32}) reply_id=(\w{32})", line)
            for line in ids[0::2]]
    ends = [re.fullmatch(r"\[ids\] ai_response: message_id=(\w{32}) reply_id=(\w{32})"
                         r" chunks=(\d+)", line) for line in ids[1::2]]
    assert all(acks) and all(ends), ids
    for ack, end in zip(acks, ends):
        assert ack.groups() == end.groups()[:2]  # the reply names the message it answers
    assert ends[0].group(3) == "3"  # "Echo: ", "one ", "two"
    assert len({ack.group(1) for ack in acks} | {ack.group(2) for ack in acks}) == 4
    assert "[ai] Echo: one two\n" in result.stdout
    assert "[agent] echo (selectable: echo)\n" in result.stdout


def test_credentials_from_the_environment(server_url):
    env = clean_env(CHAT_USERNAME="alice", CHAT_PASSWORD=PASSWORD)
    result = run_script("--url", server_url, "--message", "hi", env=env)
    assert result.returncode == 0, result.stderr
    assert "[ai] Echo: hi" in result.stdout


def test_missing_credentials_say_how_to_pass_them():
    result = run_script("--url", "http://127.0.0.1:9")
    assert_failed_with_one_line(result, "--username", "CHAT_USERNAME", code=2)


def test_wrong_password_is_one_line(server_url):
    result = run_script(*login_args(server_url, password="wrong password"))
    assert_failed_with_one_line(result, "login refused", "401")
    assert "[system]" not in result.stdout


def test_server_not_running_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_script(*login_args(url), "--timeout", "5")
    assert_failed_with_one_line(result, "cannot connect", url)


def test_error_frame_instead_of_a_reply_fails(server_url):
    too_long = "x" * (MAX_CONTENT_CHARS + 1)
    result = run_script(*login_args(server_url), "--message", "fine", "--message", too_long,
                        "--message", "never sent")
    line = assert_failed_with_one_line(result, "message 2", "error", "too long")
    assert "[ai] Echo: fine" in result.stdout
    assert "[error] Message too long" in result.stdout
    assert "never sent" not in result.stdout, line


def test_socket_closed_by_the_server_reports_the_code(server_url):
    # The server accepts, then closes with 1008 a client_id it refuses.
    result = run_script(*login_args(server_url), "--client-id", "not a valid id!")
    assert_failed_with_one_line(result, "closed", "1008", "Invalid client_id")


def test_silent_server_times_out_with_one_line():
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = run_script(*login_args(url), "--timeout", "0.5")
    assert_failed_with_one_line(result, "Timeout", url)
    assert time.monotonic() - started < 10


def test_reply_that_does_not_come_in_time_is_one_line(slow_server_url):
    started = time.monotonic()
    result = run_script(*login_args(slow_server_url), "--message", "hi", "--timeout", "0.5")
    assert_failed_with_one_line(result, "timed out", "reply to message 1")
    assert "[system] Welcome" in result.stdout
    assert time.monotonic() - started < 10
