"""Figure 1: the overhead of the service over a bare Tornado WebSocket echo.

The full service (JWT auth, the rate limit checked in the database on every
message, transcripts in SQLite, the ``echo`` agent) and the bare handler of
``benchmarks.bare_echo`` run side by side; the same load generator drives
each in turn, in alternating rounds: ``clients`` sockets (one user each),
each sending its next message when the reply to the last one arrived.
Throughput is the ratio of the medians over the rounds; latency the
difference of the median p99s.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import harness
from .harness import PYTHON, ServerProcess, chat_path, median

TARGETS = {"throughput_ratio": 0.5, "p99_extra_ms": 5.0}


def bare_server(workdir: Path) -> ServerProcess:
    server = ServerProcess([], workdir / "bare.log")
    server.argv = [PYTHON, "-m", "benchmarks.bare_echo", "--port", str(server.port)]
    return server


def service_server(workdir: Path, db_url: str, app_dir: Path | None = None,
                   name: str = "service", overlay: dict | None = None) -> ServerProcess:
    """The service with the echo agent (not started yet), ``overlay`` laid over its config."""
    config = harness.write_config(workdir, db_url, {"backend": "echo"}, overlay=overlay)
    return ServerProcess.service(config, workdir / f"{name}.log", app_dir)


def run(workdir: Path, size: dict, variants: dict[str, Path] | None = None,
        configs: dict[str, dict] | None = None) -> dict:
    """``variants``: other copies of the service (name -> folder), measured in
    the same rounds as the service and the bare handler, each on its own database.
    ``configs``: config sections laid over a variant's (name -> sections), e.g.
    this very tree with quotas on (benchmarks/quotas.yaml), and the memories
    its users save first (``benchmark.memories``, see harness.split_overlay)."""
    clients, rounds = size["clients"], size["rounds"]
    duration, warmup = size["duration"], size["warmup"]
    variants = variants or {}
    configs = configs or {}
    with contextlib.ExitStack() as stack:
        servers = {"bare": bare_server(workdir)}
        tokens, memories = {}, {}
        for name, app_dir in {"service": None, **variants}.items():
            db = stack.enter_context(harness.database("sqlite", workdir / name))
            tokens[name] = harness.prepare_users(db.url, clients, app_dir=app_dir)
            sections, memories[name] = harness.split_overlay(configs.get(name, {}))
            servers[name] = service_server(workdir, db.url, app_dir, name, sections)
        tokens["bare"] = tokens["service"]
        for server in ServerProcess.start_all(list(servers.values())):
            stack.callback(server.stop)
        for name, saved in memories.items():
            harness.save_memories(servers[name].port, tokens[name], saved)
        rows = {name: [] for name in servers}
        for index in range(rounds):
            order = list(servers.items())
            if index % 2:
                order.reverse()  # neither side always runs first
            for name, server in order:
                targets = [{"port": server.port, "path": chat_path(f"c{index}-{n}", token)}
                           for n, token in enumerate(tokens[name])]
                cpu = harness.cpu_seconds(server.pid)
                row = harness.chat_load(targets, workdir, duration, warmup,
                                        size.get("loadgen_processes", 1))
                # The server's CPU per message (the warm-up's messages included,
                # uncounted: a slight overestimate, the same for every server):
                # steadier than throughput on a machine others load.
                row["cpu_us_per_msg"] = ((harness.cpu_seconds(server.pid) - cpu) * 1e6
                                         / max(1.0, row["msgs_per_s"] * duration))
                rows[name].append(row)
        service_rss = harness.rss_kib(servers["service"].pid)
    bare_tput = median([r["msgs_per_s"] for r in rows["bare"]])
    service_tput = median([r["msgs_per_s"] for r in rows["service"]])
    bare_p99 = median([r["p99_ms"] for r in rows["bare"]])
    service_p99 = median([r["p99_ms"] for r in rows["service"]])
    round_ratios = [s["msgs_per_s"] / b["msgs_per_s"] for s, b in zip(rows["service"], rows["bare"])]
    # Ratios within each round (the two sides seconds apart), then the median
    # over rounds: slow changes in the machine's load cancel out.
    return {
        "clients": clients, "rounds": rounds, "duration_s": duration,
        "bare_msgs_per_s": bare_tput, "service_msgs_per_s": service_tput,
        "throughput_ratio": median(round_ratios),
        "round_ratios": round_ratios,
        "bare_p50_ms": median([r["p50_ms"] for r in rows["bare"]]),
        "service_p50_ms": median([r["p50_ms"] for r in rows["service"]]),
        "bare_p99_ms": bare_p99, "service_p99_ms": service_p99,
        "p99_extra_ms": median([s["p99_ms"] - b["p99_ms"]
                                for s, b in zip(rows["service"], rows["bare"])]),
        "errors": sum(r["errors"] + r["broken_clients"] for v in rows.values() for r in v),
        "service_rss_mib": service_rss / 1024,
        "variants": {name: {
            "msgs_per_s": median([r["msgs_per_s"] for r in rows[name]]),
            "ratio_to_bare": median([v["msgs_per_s"] / b["msgs_per_s"]
                                     for v, b in zip(rows[name], rows["bare"])]),
            "ratio_to_service": median([v["msgs_per_s"] / s["msgs_per_s"]
                                        for v, s in zip(rows[name], rows["service"])]),
            "round_ratios_to_service": [v["msgs_per_s"] / s["msgs_per_s"]
                                        for v, s in zip(rows[name], rows["service"])],
            "p99_ms": median([r["p99_ms"] for r in rows[name]]),
            "round_cpu_ratios_to_service": [v["cpu_us_per_msg"] / s["cpu_us_per_msg"]
                                            for v, s in zip(rows[name], rows["service"])],
        } for name in variants},
        "rounds_detail": rows,
    }


def report(result: dict) -> list[tuple[str, str, str]]:
    """(figure, measured, target) rows for the summary table."""
    return [
        ("Service / bare Tornado echo, throughput",
         f"**{result['throughput_ratio']:.2f}x** ({result['service_msgs_per_s']:.0f} vs "
         f"{result['bare_msgs_per_s']:.0f} msg/s)", f">= {TARGETS['throughput_ratio']}x"),
        ("Service - bare, p99 latency",
         f"**{result['p99_extra_ms']:+.1f} ms** ({result['service_p99_ms']:.1f} vs "
         f"{result['bare_p99_ms']:.1f} ms)", f"<= +{TARGETS['p99_extra_ms']:.0f} ms"),
    ]
