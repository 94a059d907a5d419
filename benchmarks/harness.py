"""What every figure shares: server processes, databases, users, statistics.

Servers are started as real processes (``python -m tornado_app --config ...``)
with their log in a file, never a pipe nobody reads. Users are written
straight into the benchmark database without passwords (token-only users),
so that preparing 10,000 of them takes a second instead of 10,000 argon2
hashes; their JWTs are issued with the benchmark's own secret.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
# The service's code: this checkout, or another copy of it (a variant with a
# proposed change, measured side by side with this one; see --variant).
APP_DIR = Path(os.environ.get("BENCH_APP_DIR", REPO))
PYTHON = sys.executable
HOST = "127.0.0.1"
SECRET = "benchmark-secret-" + "b" * 40
POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL",
    os.environ.get("TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"),
)
# Rate limit of the benchmark users: one message per nanosecond, so it is
# checked on every message (the statement runs) but never refuses one.
NO_LIMIT = {"messages": 1_000_000_000, "per_seconds": 1.0}


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (inherited by children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# Statistics


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values) -> float:
    return percentile(values, 50)


def latency_summary(values_ms) -> dict:
    return {
        "n": len(values_ms),
        "p50_ms": percentile(values_ms, 50),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": max(values_ms) if values_ms else float("nan"),
    }


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used so far (user and system, all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Databases and users


@dataclass
class BenchDatabase:
    url: str
    kind: str  # "sqlite" or "postgresql"


@contextmanager
def database(kind: str, workdir: Path):
    """A fresh database of that kind; a PostgreSQL one is dropped afterwards."""
    if kind == "sqlite":
        workdir.mkdir(parents=True, exist_ok=True)
        yield BenchDatabase(f"sqlite+aiosqlite:///{workdir / 'bench.db'}", kind)
        return
    name = f"tornado_app_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        # make_url keeps a query string (?host=/var/run/postgresql for the Unix socket).
        url = make_url(POSTGRES_ADMIN_URL).set(database=name)
        yield BenchDatabase(url.render_as_string(hide_password=False), kind)
    finally:
        asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _postgres_admin(statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await admin.dispose()


def postgres_available() -> bool:
    try:
        asyncio.run(_postgres_admin("SELECT 1"))
        return True
    except Exception:
        return False


def prepare_users(url: str, count: int, prefix: str = "bench",
                  app_dir: Path | None = None) -> list[str]:
    """Create the schema and ``count`` token-only users; return their tokens.
    With ``app_dir`` (a variant), that copy's own code creates its schema."""
    if app_dir is not None and Path(app_dir).resolve() != REPO:
        code = ("import json, sys; from benchmarks import harness; "
                "print(json.dumps(harness.prepare_users(sys.argv[1], int(sys.argv[2]), sys.argv[3])))")
        result = subprocess.run([PYTHON, "-c", code, url, str(count), prefix], cwd=app_dir,
                                capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])
    return asyncio.run(_prepare_users(url, count, prefix))


async def _prepare_users(url: str, count: int, prefix: str) -> list[str]:
    from tornado_app.store import Store
    from tornado_app.store.models import User, utcnow
    from tornado_app.store.schema import ensure_schema

    store = Store.from_url(url)
    try:
        await ensure_schema(store.engine)
        names = [f"{prefix}{index:05d}" for index in range(count)]
        rows = [{"username": name, "password_hash": None, "is_admin": False,
                 "disabled": False, "created_at": utcnow()} for name in names]
        async with store.engine.begin() as conn:
            for start in range(0, len(rows), 1000):
                await conn.execute(User.__table__.insert(), rows[start:start + 1000])
    finally:
        await store.close()
    return [issue_token(name) for name in names]


def issue_token(username: str, ttl_minutes: int = 24 * 60) -> str:
    """A token as POST /token issues it (HS256; sub, iat, exp, jti), signed
    with the benchmark's secret: the public contract, not the service's code."""
    import jwt

    now = int(time.time())
    payload = {"sub": username, "iat": now, "exp": now + 60 * ttl_minutes,
               "jti": uuid.uuid4().hex}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def query(url: str, sql: str, **params) -> list:
    """Rows of one SQL query on the benchmark database (read from the outside)."""
    async def run() -> list:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return list(await conn.execute(text(sql), params))
        finally:
            await engine.dispose()

    return asyncio.run(run())


# Server processes


def write_config(workdir: Path, db_url: str, agent: dict, data_dir: Path | None = None,
                 overlay: dict | None = None, **sections) -> Path:
    """A service config for a benchmark: loopback, the benchmark secret, no rate limit.
    ``sections``, then ``overlay`` (a variant's, which may hold ``agent``), are laid
    over it key by key, nested mappings merged (so that ``agent: {tools: [...]}``
    keeps the agent's own options); ``agent`` itself is not changed."""
    config = {
        "data_dir": str(data_dir or workdir / "data"),
        "server": {"host": HOST},
        "database": {"url": db_url},
        "auth": {"jwt_secret": SECRET, "token_ttl_minutes": 24 * 60},
        "rate_limit": dict(NO_LIMIT),
        "agent": agent,
        "logging": {"level": "INFO"},
    }
    config = merged(merged(config, sections), overlay or {})
    path = workdir / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def merged(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on it, nested mappings merged; neither is changed."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def split_overlay(overlay: dict) -> tuple[dict, dict[str, str]]:
    """A ``--variant-config`` file: (the config sections laid over the variant's,
    the memories each benchmark user saves before the rounds). The memories are
    under ``benchmark: {memories: {key: value}}``, which is not a service setting."""
    sections = dict(overlay)
    memories = (sections.pop("benchmark", None) or {}).get("memories") or {}
    return sections, memories


def save_memories(port: int, tokens: list[str], memories: dict[str, str]) -> None:
    """Each user (by token) saves ``memories`` (key -> value) through the
    service's own API (``PUT /api/memories/{key}``), as a user of the Memory
    panel would; an answer other than 2xx raises urllib's HTTPError."""
    for token in tokens:
        for key, value in memories.items():
            request = urllib.request.Request(
                f"http://{HOST}:{port}/api/memories/{urllib.parse.quote(key, safe='')}",
                data=json.dumps({"value": value}).encode(), method="PUT",
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=30).close()


class ServerProcess:
    """A server in its own process, logging to a file; stopped with SIGTERM."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None,
                 ready_path: str = "/healthz", port: int | None = None, cwd: Path = REPO):
        self.argv = argv
        self.cwd = cwd
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.ready_path = ready_path
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @classmethod
    def service(cls, config: Path, log_path: Path, app_dir: Path | None = None,
                **kwargs) -> "ServerProcess":
        """``python -m tornado_app``, from ``app_dir`` (default: APP_DIR)."""
        server = cls([], log_path, cwd=app_dir or APP_DIR, **kwargs)
        server.argv = [PYTHON, "-m", "tornado_app", "--config", str(config),
                       "--port", str(server.port)]
        return server

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self.spawn()
        self.wait_ready(timeout)
        return self

    def spawn(self) -> "ServerProcess":
        """Start the process without waiting for it (see start_all)."""
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, preexec_fn=raise_nofile,
            )
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    @staticmethod
    def start_all(servers: list["ServerProcess"], timeout: float = 60.0) -> list["ServerProcess"]:
        """Start several servers at once (their start-ups overlap); all or none."""
        try:
            for server in servers:
                server.spawn()
            for server in servers:
                server.wait_ready(timeout)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# Load generator processes (benchmarks.loadgen)


class LoadGen:
    """One load-generator process: spec in, ``ready`` line, ``go``, JSON result out."""

    def __init__(self, spec: dict, workdir: Path):
        path = workdir / f"loadgen-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "benchmarks.loadgen", str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            cwd=REPO, text=True, bufsize=1, preexec_fn=raise_nofile,
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"load generator exited ({self.proc.returncode})")
        return json.loads(line)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run_loadgens(specs: list[dict], workdir: Path, start_in: float = 0.3) -> list[dict]:
    """Start the generators, wait until all are connected, start them together,
    and return their results (in the order of ``specs``)."""
    gens = [LoadGen(spec, workdir) for spec in specs]
    try:
        for gen in gens:
            ready = gen.read()
            if not ready.get("ready"):
                raise RuntimeError(f"load generator failed: {ready}")
        start = time.time() + start_in
        for gen in gens:
            gen.send(f"go {start}")
        return [gen.read() for gen in gens]
    finally:
        for gen in gens:
            gen.finish()


def split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` nearly equal, contiguous slices."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def chat_path(client_id: str, token: str) -> str:
    return f"/ws/ai/ai-chat/{client_id}?token={token}"


def chat_load(targets: list[dict], workdir: Path, duration: float, warmup: float,
              processes: int = 1, message: str = "hello benchmark", stream: bool = False) -> dict:
    """Sequential senders, one per target, spread over ``processes`` generators.

    Returns messages/s, latency percentiles and error counts."""
    specs = [{"mode": "chat", "targets": part, "duration": duration, "warmup": warmup,
              "message": message, "stream": stream, "connect_concurrency": 50,
              "max_seconds": warmup + duration + 120}
             for part in split(targets, processes) if part]
    results = run_loadgens(specs, workdir)
    latencies = [x for result in results for x in result["latencies_ms"]]
    replies = sum(result["replies"] for result in results)
    return {
        "msgs_per_s": replies / duration,
        **latency_summary(latencies),
        "errors": sum(result["errors"] for result in results),
        "broken_clients": sum(result["broken_clients"] for result in results),
    }
