"""Profile the service under the load of figure 1: ``python -m benchmarks.profile``.

It starts the service (echo agent, SQLite) and a load generator, records the
server with py-spy for ``--seconds`` and prints where the time goes: the
functions with the most samples (own time and total time), per thread. The
raw collapsed stacks are kept for flame graphs (``--raw FILE``). ``--config
FILE`` lays a YAML file's config sections over the service's (e.g.
benchmarks/quotas.yaml, as ``--variant-config`` does for figure 1; the
memories of benchmarks/memory.yaml are saved by every user first).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from . import harness, overhead
from .harness import chat_path


def record(pid: int, seconds: float, raw: Path, idle: bool = False) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
            "--rate", "200", "--format", "raw", "--output", str(raw), "--threads"]
    if idle:
        argv.append("--idle")
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(raw: Path, top: int = 25) -> str:
    own, total = collections.Counter(), collections.Counter()
    threads = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        count = int(count)
        frames = stack.split(";")
        samples += count
        threads[frames[0]] += count
        own[_short(frames[-1])] += count
        for frame in set(_short(f) for f in frames[1:]):
            total[frame] += count
    lines = [f"{samples} samples"]
    lines += [f"  thread {name}: {100 * n / samples:.1f}%" for name, n in threads.most_common(5)]
    lines.append("own time:")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("total time:")
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in total.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py:123)"
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name})" if where else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--idle", action="store_true", help="include idle (waiting) samples")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--config", type=Path, help="YAML config sections laid over the "
                        "service's (a --variant-config file, its memories saved first)")
    args = parser.parse_args()
    overlay = yaml.safe_load(args.config.read_text(encoding="utf-8")) if args.config else {}
    sections, memories = harness.split_overlay(overlay)
    workdir = Path(tempfile.mkdtemp(prefix="tornado-app-profile-"))
    raw = args.raw or workdir / "profile.raw"
    with harness.database(args.database, workdir) as db:
        tokens = harness.prepare_users(db.url, args.clients)
        with overhead.service_server(workdir, db.url, overlay=sections) as service:
            harness.save_memories(service.port, tokens, memories)
            targets = [{"port": service.port, "path": chat_path(f"p{n}", token)}
                       for n, token in enumerate(tokens)]
            result = {}
            load = threading.Thread(target=lambda: result.update(harness.chat_load(
                targets, workdir, args.seconds + 2, 1.0)))
            load.start()
            threading.Event().wait(1.5)
            record(service.pid, args.seconds, raw, args.idle)
            load.join()
    print(f"load: {result.get('msgs_per_s', 0):.0f} msg/s, p99 {result.get('p99_ms', 0):.1f} ms")
    print(summarize(raw))
    print(f"raw stacks: {raw}")
    shutil.rmtree(workdir, ignore_errors=True) if args.raw else None


if __name__ == "__main__":
    main()
