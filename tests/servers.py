"""Real processes for tests: ``python -m tornado_app --config F ...``, run as an operator runs it.

- ``write_config(folder, **sections)``: a config in ``folder`` (the SQLite file
  ``folder/data/chat.db``, a fixed secret, the echo agent, loopback) with
  sections merged over it; ``sqlite_url(folder)`` is that database's URL.
- ``Call(config, args, input, env)``: one CLI invocation; ``run_all(*calls)``
  runs them concurrently and ``cli(config, *args)`` one alone, as
  CompletedProcesses. ``ok(result)`` asserts success and returns stdout;
  ``one_line_error(result, code, *words)`` asserts the one-line failure.
- ``add_users(config, *names)``, ``token(config, name)`` and
  ``tokens(config, *names)`` use the CLI, as an operator would.
- ``ServerProcess(config)``: ``start()`` runs the server on a free port (or on
  the ``port`` its config or ``env`` gives) and waits for ``/healthz``;
  ``terminate()`` / ``kill()`` / ``signal()``; ``log()`` is what it wrote
  (stdout and stderr go to a file, so a chatty server never blocks on a full
  pipe); ``get()`` answers a GET; ``fd_count()`` and ``rss_kib()`` read /proc.
  ``serving(config)`` is one, started, killed on leaving the block; the
  ``servers`` fixture (conftest.py) starts them for one test. On Linux the
  servers also get SIGKILL if the test process itself dies (PR_SET_PDEATHSIG).

Every process runs in ``clean_env()``: the test process's own TORNADO_APP_*,
DATABASE_URL and CHAT_* variables never leak into it.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET = "process-test-secret-" + "r" * 40
PASSWORD = "correct horse battery"
START_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # what a service log line starts with
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables the service or the client script read."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("TORNADO_APP_", "CHAT_")) and name != "DATABASE_URL"
    }
    env.update(extra)
    return env


# Configs


def sqlite_url(folder: Path) -> str:
    """The database of a config written by ``write_config(folder)``."""
    return f"sqlite+aiosqlite:///{folder / 'data' / 'chat.db'}"


def write_config(folder: Path, **sections) -> Path:
    """``folder/config.yaml``; each keyword is a section merged over the defaults
    (None leaves that section out)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "data_dir": "data",
        "database": {"url": "sqlite:///data/chat.db"},  # sqlite_url(folder)
        "auth": {"jwt_secret": SECRET},
        "agent": {"backend": "echo"},
        "server": {"host": "127.0.0.1", "shutdown_grace_seconds": 2},
        # Enough for load tests; the rate limit has tests of its own.
        "rate_limit": {"messages": 1_000_000, "per_seconds": 1},
    }
    for name, values in sections.items():
        if values is None:
            data.pop(name, None)
        elif isinstance(values, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


# The command line


@dataclass
class Call:
    """One ``python -m tornado_app`` invocation, to run alone or with others."""

    config: Path | str
    args: tuple[str, ...]
    input: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "tornado_app", "--config", str(self.config), *self.args]
        return subprocess.Popen(
            command, text=True, cwd=ROOT, env=clean_env(**self.env),
            stdin=subprocess.DEVNULL if self.input is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )


def run_all(*calls: Call) -> list[subprocess.CompletedProcess]:
    """Run the calls concurrently (each start costs about a second); results in order."""
    procs = [call.start() for call in calls]
    results = []
    for call, proc in zip(calls, procs):
        try:
            out, err = proc.communicate(call.input, timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n[killed: did not finish in time]"
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def cli(config, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return run_all(Call(config, args, input, env))[0]


def ok(result: subprocess.CompletedProcess) -> str:
    """Assert the command succeeded; its output."""
    assert result.returncode == 0, (result.args, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Assert exit ``code`` and exactly one line on stderr (besides log lines)."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def add_users(config: Path, *names: str) -> None:
    """Add users through the CLI: the first alone (it creates the schema), then the rest at once."""
    if not names:
        return
    ok(cli(config, "users", "add", names[0], "--password-stdin", input=PASSWORD + "\n"))
    for result in run_all(*(Call(config, ("users", "add", name, "--password-stdin"), PASSWORD + "\n")
                            for name in names[1:])):
        ok(result)


def token(config: Path, name: str) -> str:
    return ok(cli(config, "token", name)).strip()


def tokens(config: Path, *names: str) -> dict[str, str]:
    """A token for each user, from the CLI (concurrently)."""
    results = run_all(*(Call(config, ("token", name)) for name in names))
    return {name: ok(result).strip() for name, result in zip(names, results)}


# Servers


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


class ServerProcess:
    """One ``python -m tornado_app`` server; its output goes to ``log_path``.

    ``port``: where the config or ``env`` makes it listen; by default a free
    port, passed with ``--port``. ``env``: variables for it (see clean_env).
    """

    def __init__(self, config: Path, log_path: Path | None = None, *,
                 port: int | None = None, env: dict[str, str] | None = None):
        self.config = Path(config)
        self.log_path = log_path or self.config.parent / "server.log"
        self.fixed_port = port
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    # Life cycle

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> "ServerProcess":
        """Start and wait for /healthz (a free port taken meanwhile: try another)."""
        for _attempt in range(attempts):
            self.port = self.fixed_port or free_port()
            port_flag = [] if self.fixed_port else ["--port", str(self.port)]
            with open(self.log_path, "ab") as log:
                log.write(f"--- starting on port {self.port}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tornado_app", "--config", str(self.config), *port_flag],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=ROOT, env=clean_env(**self.env), preexec_fn=_preexec(),
                )
            if self._wait_healthy(timeout):
                return self
            if self.fixed_port or "cannot listen" not in self.log():
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

    def get(self, path: str, timeout: float = 10, **headers: str) -> tuple[int, dict | None]:
        """(status, JSON body or None) of a GET; HTTP errors are answers too."""
        request = urllib.request.Request(self.base_url + path, headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout) as response:
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


@contextlib.contextmanager
def serving(config: Path, **options):
    """A started ServerProcess (options as for ServerProcess), killed on leaving the block."""
    server = ServerProcess(config, **options)
    try:
        yield server.start()
    finally:
        server.kill()
