"""Figure 2: many concurrent, authenticated, idle connections on one process.

``connections`` sockets (one user each, every one through the whole
authentication: JWT, user lookup, conversation opened) are opened from
several load-generator processes and kept open. Then:

- memory: the server's RSS with all of them open, minus its RSS before
  (after a few warm-up connections), per connection;
- latency: new clients connect one after the other (``probes`` of them, at
  ``probe_rate`` a second) while all the others are open; the p99 of their
  time from the TCP connect to the welcome frame.

The open-file limit is raised in the benchmark's own processes only
(``harness.raise_nofile``). Every socket is closed at the end.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from . import harness
from .harness import PYTHON, LoadGen, chat_path, percentile

TARGETS = {"kib_per_connection": 30.0, "p99_connect_ms": 50.0}


def run(workdir: Path, size: dict, variants: dict[str, Path] | None = None) -> dict:
    """``variants``: other copies of the service (name -> folder), each
    measured the same way right after this one, on its own database."""
    result = _measure(workdir / "service", size)
    result["variants"] = {}
    for name, app_dir in (variants or {}).items():
        row = _measure(workdir / name, size, app_dir)
        row["kib_ratio_to_service"] = row["kib_per_connection"] / result["kib_per_connection"]
        row["p99_ratio_to_service"] = row["p99_connect_ms"] / result["p99_connect_ms"]
        row["ramp_ratio_to_service"] = row["ramp_connects_per_s"] / result["ramp_connects_per_s"]
        result["variants"][name] = row
    return result


def _measure(workdir: Path, size: dict, app_dir: Path | None = None) -> dict:
    count, processes = size["connections"], size["client_processes"]
    probes = size["probes"]
    workdir.mkdir(parents=True, exist_ok=True)
    with harness.database("sqlite", workdir) as db:
        tokens = harness.prepare_users(db.url, count + probes, app_dir=app_dir)
        config = harness.write_config(workdir, db.url, {"backend": "echo"},
                                      **_room_for(count + probes + 100, app_dir))
        with harness.ServerProcess.service(config, workdir / "connections.log",
                                           app_dir) as server:
            # Warm up: the first connections import and allocate what every later one reuses.
            warm = size.get("warmup_sockets", 20)
            harness.run_loadgens([_probe_spec(server, tokens[count:count + warm], 0.0)], workdir)
            time.sleep(size.get("settle_seconds", 1.0))
            baseline_kib = harness.rss_kib(server.pid)
            started = time.perf_counter()
            gens = [LoadGen(_idle_spec(server, part, size), workdir)
                    for part in harness.split(list(enumerate(tokens[:count])), processes)]
            opened, ramp_ms, failures = 0, [], 0
            try:
                for gen in gens:
                    ready = gen.read()
                    opened += ready["connected"]
                    failures += ready["failures"]
                    ramp_ms += ready["connect_ms"]
                ramp_seconds = time.perf_counter() - started
                time.sleep(2 * size.get("settle_seconds", 1.0))  # buffers, the first pings
                loaded_kib = harness.rss_kib(server.pid)
                [probe] = harness.run_loadgens(
                    [_probe_spec(server, tokens[count:], 1.0 / size["probe_rate"])], workdir)
                for gen in gens:
                    gen.send("close")
                still_open = sum(gen.read()["still_open"] for gen in gens)
            finally:
                for gen in gens:
                    gen.finish()
    return {
        "connections": opened, "failures": failures, "still_open_at_end": still_open,
        "client_processes": processes,
        "baseline_rss_mib": baseline_kib / 1024, "loaded_rss_mib": loaded_kib / 1024,
        "kib_per_connection": (loaded_kib - baseline_kib) / max(opened, 1),
        "ramp_seconds": ramp_seconds, "ramp_connects_per_s": opened / ramp_seconds,
        "ramp_p99_connect_ms": percentile(ramp_ms, 99),
        "probe_count": len(probe["connect_ms"]), "probe_failures": probe["failures"],
        "p50_connect_ms": percentile(probe["connect_ms"], 50),
        "p99_connect_ms": percentile(probe["connect_ms"], 99),
    }


def _room_for(sockets: int, app_dir: Path | None = None) -> dict:
    """Config that lets this many sockets in, where the service (this copy,
    or the variant's in ``app_dir``) caps them."""
    code = ("from tornado_app.config import Settings; "
            "limits = Settings.model_fields.get('limits'); "
            "print(limits is not None and "
            "'connections_per_process' in limits.annotation.model_fields)")
    capped = subprocess.run([PYTHON, "-c", code], cwd=app_dir or harness.REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    return {"limits": {"connections_per_process": sockets}} if capped == "True" else {}


def _idle_spec(server, part, size) -> dict:
    return {"mode": "idle", "connect_concurrency": size.get("connect_concurrency", 50),
            "targets": [{"port": server.port, "path": chat_path("idle", token)}
                        for _index, token in part],
            "max_seconds": size.get("max_seconds", 600)}


def _probe_spec(server, tokens, interval: float) -> dict:
    return {"mode": "probe", "interval": interval, "count": len(tokens),
            "targets": [{"port": server.port, "path": chat_path("probe", token)}
                        for token in tokens],
            "max_seconds": 120 + len(tokens) * interval}


def report(result: dict) -> list[tuple[str, str, str]]:
    return [
        (f"RSS per idle connection ({result['connections']:,} open)",
         f"**{result['kib_per_connection']:.1f} KiB** ({result['baseline_rss_mib']:.0f} -> "
         f"{result['loaded_rss_mib']:.0f} MiB)", f"<= {TARGETS['kib_per_connection']:.0f} KiB"),
        ("p99 connect-to-welcome, all open",
         f"**{result['p99_connect_ms']:.1f} ms** (p50 {result['p50_connect_ms']:.1f} ms, "
         f"{result['probe_count']} new clients, {result['probe_failures']} refused)",
         f"<= {TARGETS['p99_connect_ms']:.0f} ms"),
    ]
