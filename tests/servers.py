"""Real server processes for tests: ``python -m tornado_app --config F --port P``.

- ``write_config(folder, **sections)``: a config in ``folder`` (SQLite under
  ``folder/data``, a fixed secret, the echo agent, loopback) with sections
  merged over it.
- ``ServerProcess(config)``: ``start()`` runs the server on a free port and
  waits for ``/healthz``; ``terminate()`` / ``kill()`` / ``signal()``;
  ``log()`` is what it wrote (stdout and stderr go to a file, so a chatty
  server never blocks on a full pipe); ``fd_count()`` and ``rss_kib()``
  read /proc.
- ``add_users(config, *names)``, ``token(config, name)`` and
  ``tokens(config, *names)`` use the CLI, as an operator would.
- The ``servers`` fixture starts ServerProcesses and kills whatever is still
  running when the test ends, passed or failed. On Linux the servers also
  get SIGKILL if the test process itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = "reliability-test-secret-" + "r" * 40
PASSWORD = "correct horse battery"
START_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TORNADO_APP_* variables (the config file rules)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORNADO_APP_")}
    env.update(extra)
    return env


def write_config(folder: Path, **sections) -> Path:
    """``folder/config.yaml``; each keyword is a section merged over the defaults."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "data_dir": "data",
        "database": {"url": "sqlite+aiosqlite:///data/chat.db"},
        "auth": {"jwt_secret": SECRET},
        "agent": {"backend": "echo"},
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2},
        # Enough for load tests; the rate limit has tests of its own.
        "rate_limit": {"messages": 1_000_000, "per_seconds": 1},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _preexec():
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits: only safe
    # from the main thread, which lives as long as the test process.
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return _die_with_parent
    return None


def cli(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """Run one CLI command; assert it succeeded."""
    result = subprocess.run(
        [sys.executable, "-m", "tornado_app", "--config", str(config), *args],
        input=input, text=True, capture_output=True, cwd=ROOT, env=clean_env(),
        timeout=CLI_TIMEOUT,
    )
    assert result.returncode == 0, (args, result.stderr)
    return result


def cli_all(config: Path, calls: list[tuple[tuple[str, ...], str | None]]) -> list[str]:
    """Run CLI commands ``(args, stdin)`` concurrently; their outputs, in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tornado_app", "--config", str(config), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT, env=clean_env(),
        )
        for args, _input in calls
    ]
    outputs = []
    try:
        for proc, (args, input_) in zip(procs, calls):
            out, err = proc.communicate(input_, timeout=CLI_TIMEOUT)
            assert proc.returncode == 0, (args, err)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def add_users(config: Path, *names: str) -> None:
    """Add users through the CLI: the first alone (it creates the schema), then the rest at once."""
    if not names:
        return
    cli(config, "users", "add", names[0], "--password-stdin", input=PASSWORD + "\n")
    cli_all(config, [(("users", "add", name, "--password-stdin"), PASSWORD + "\n")
                     for name in names[1:]])


def token(config: Path, name: str) -> str:
    return cli(config, "token", name).stdout.strip()


def tokens(config: Path, *names: str) -> dict[str, str]:
    """A token for each user, from the CLI (concurrently)."""
    outputs = cli_all(config, [(("token", name), None) for name in names])
    return {name: out.strip() for name, out in zip(names, outputs)}


class ServerProcess:
    """One ``python -m tornado_app`` server; its output goes to ``log_path``."""

    def __init__(self, config: Path, log_path: Path | None = None):
        self.config = Path(config)
        self.log_path = log_path or self.config.parent / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    # Life cycle

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> "ServerProcess":
        """Start on a free port and wait for /healthz (a port taken meanwhile: try another)."""
        for _attempt in range(attempts):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                log.write(f"--- starting on port {self.port}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tornado_app", "--config", str(self.config),
                     "--port", str(self.port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=ROOT, env=clean_env(), preexec_fn=_preexec(),
                )
            if self._wait_healthy(timeout):
                return self
            if "cannot listen" not in self.log():
                break
        raise AssertionError(f"server did not start (exit {self.proc.returncode}):\n{self.log()}")

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status, _body = self.get("/healthz", timeout=1)
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.05)  # polling a port that is not open yet: nothing to await
        self.kill()
        raise AssertionError(f"no /healthz answer within {timeout} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if not self.running:
            return self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server ignored SIGTERM for {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # Talking to it

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, client_id: str, token: str | None = None) -> str:
        query = f"?token={token}" if token else ""
        return f"ws://127.0.0.1:{self.port}/ws/ai/ai-chat/{client_id}{query}"

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict | None]:
        """(status, JSON body) of a GET; HTTP errors are answers too."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.base_url + path, timeout=timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _json(exc.read())

    # Resources, from /proc

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def _json(body: bytes) -> dict | None:
    try:
        return json.loads(body)
    except ValueError:
        return None


@pytest.fixture
def servers():
    """``servers(config) -> ServerProcess`` started; all killed at teardown."""
    started: list[ServerProcess] = []

    def start(config: Path, **kwargs) -> ServerProcess:
        server = ServerProcess(config, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
