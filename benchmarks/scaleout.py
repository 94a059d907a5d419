"""Figure 4: scale-out, messages/s for 1, 2 and 4 server processes.

The service of figure 1 (echo agent, no rate limit reached), as ``N``
separate server processes on ``N`` ports sharing one database, SQLite (one
file) and PostgreSQL (a database created for the run and dropped after).
The ``clients`` sequential senders are spread round robin over the
processes. Each figure is a ratio against 1 process on the same database
in the same run.

When the service has ``--processes N`` (one port, N workers), that form is
measured too (``mode = "processes"``); until then only separate instances,
which is also how instances on several machines share one PostgreSQL.

``variants`` (``--variant NAME=DIR``): other copies of the service, each
measured as one process on each database in the same run as this tree's,
so that a change is compared with the tree before it.
The PostgreSQL to SQLite ratio (one process) is reported for each copy.

That ratio is issue 17's target, and one pass of each swung by 15% between
runs on one machine (982-1,545 msg/s for PostgreSQL). So one instance on
each database is measured ``one_process_rounds`` times, the two alternating
(the order flips every round): the ratio is the median of the per-round
ratios, and the table's one-process rows are each database's median round.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import harness
from .harness import PYTHON, ServerProcess, chat_path


def supports_processes_flag() -> bool:
    try:
        out = subprocess.run([PYTHON, "-m", "tornado_app", "--help"], capture_output=True,
                             text=True, cwd=harness.APP_DIR, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--processes" in out


def start_instances(config: Path, count: int, workdir: Path, tag: str,
                    app_dir: Path | None = None) -> list[ServerProcess]:
    return ServerProcess.start_all(
        [ServerProcess.service(config, workdir / f"{tag}-{index}.log", app_dir)
         for index in range(count)])


def start_workers(config: Path, count: int, workdir: Path, tag: str) -> list[ServerProcess]:
    server = ServerProcess.service(config, workdir / f"{tag}.log")
    server.argv += ["--processes", str(count)]
    return [server.start()]


def measure(kind: str, count: int, mode: str, workdir: Path, size: dict,
            variant: tuple[str, Path] | None = None, round_index: int = 0) -> dict:
    tag = (f"{kind}-{mode}-{count}" + (f"-{variant[0]}" if variant else "")
           + (f"-round{round_index}" if round_index else ""))
    with harness.database(kind, workdir / tag) as db:
        # A variant's own code makes its schema (its revision may differ).
        tokens = harness.prepare_users(db.url, size["clients"],
                                       app_dir=variant[1] if variant else None)
        config = harness.write_config(workdir, db.url, {"backend": "echo"})
        if variant is not None:
            servers = start_instances(config, count, workdir, tag, variant[1])
        else:
            start = start_instances if mode == "instances" else start_workers
            servers = start(config, count, workdir, tag)
        try:
            targets = [{"port": servers[n % len(servers)].port,
                        "path": chat_path(f"s{n}", token)} for n, token in enumerate(tokens)]
            result = harness.chat_load(targets, workdir, size["duration"], size["warmup"],
                                       size.get("loadgen_processes", 1))
        finally:
            for server in servers:
                server.stop()
    return result


def run(workdir: Path, size: dict, variants: dict[str, Path] | None = None) -> dict:
    kinds = ["sqlite"]
    skipped = []
    if size.get("postgresql", True):
        if harness.postgres_available():
            kinds.append("postgresql")
        else:
            skipped.append(f"PostgreSQL not reachable at {harness.POSTGRES_ADMIN_URL}")
    modes = ["instances"]
    if "processes" in size.get("modes", ["processes"]) and supports_processes_flag():
        modes.append("processes")
    table = {}
    others = {name: {} for name in variants or {}}
    firsts = one_process_rounds(kinds, workdir, size)
    for kind in kinds:
        for mode in modes:
            rows = {}
            for count in size["processes"]:
                if mode == "instances" and count == 1:
                    rows[count] = _median_round(firsts[kind])
                else:
                    rows[count] = measure(kind, count, mode, workdir, size)
                if mode == "instances" and count == 1:
                    for name, app_dir in (variants or {}).items():
                        others[name][kind] = _row(
                            measure(kind, 1, mode, workdir, size, (name, app_dir)),
                            rows[count]["msgs_per_s"])
            base = rows[size["processes"][0]]["msgs_per_s"]
            table[f"{kind}/{mode}"] = {str(count): _row(r, base) for count, r in rows.items()}
    rounds = _round_ratios(firsts)
    return {"clients": size["clients"], "duration_s": size["duration"], "table": table,
            "variants": others, "pg_to_sqlite": _pg_to_sqlite(rounds, others),
            "pg_to_sqlite_rounds": rounds, "skipped": skipped}


def one_process_rounds(kinds: list[str], workdir: Path, size: dict) -> dict[str, list[dict]]:
    """One instance on each database, ``one_process_rounds`` times, alternating."""
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for index in range(size.get("one_process_rounds", 1)):
        for kind in (kinds if index % 2 == 0 else kinds[::-1]):
            results[kind].append(measure(kind, 1, "instances", workdir, size,
                                         round_index=index))
    return results


def _median_round(results: list[dict]) -> dict:
    """The round with the median throughput (the lower middle one of an even count)."""
    ordered = sorted(results, key=lambda result: result["msgs_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def _round_ratios(firsts: dict[str, list[dict]]) -> list[float]:
    """PostgreSQL / SQLite of each round (none without PostgreSQL)."""
    if "postgresql" not in firsts:
        return []
    return [pg["msgs_per_s"] / lite["msgs_per_s"]
            for pg, lite in zip(firsts["postgresql"], firsts["sqlite"])]


def _row(result: dict, base: float) -> dict:
    return {"msgs_per_s": result["msgs_per_s"], "ratio": result["msgs_per_s"] / base,
            "p99_ms": result["p99_ms"], "errors": result["errors"] + result["broken_clients"]}


def _pg_to_sqlite(rounds: list[float], others: dict) -> dict:
    """PostgreSQL's one process against SQLite's: for this tree the median of
    the rounds' ratios, for each variant its one pass."""
    ratios = {"service": harness.median(rounds)} if rounds else {}
    ratios.update({name: rows["postgresql"]["msgs_per_s"] / rows["sqlite"]["msgs_per_s"]
                   for name, rows in others.items() if {"sqlite", "postgresql"} <= rows.keys()})
    return ratios


def report(result: dict) -> list[tuple[str, str, str]]:
    out = []
    for name, rows in result["table"].items():
        cells = ", ".join(f"{count}: {row['msgs_per_s']:.0f} msg/s ({row['ratio']:.2f}x)"
                          for count, row in rows.items())
        out.append((f"Scale-out, {name} (processes: msg/s, ratio to 1)", cells, "-"))
    for name, rows in result.get("variants", {}).items():
        cells = ", ".join(f"{kind}: {row['msgs_per_s']:.0f} msg/s ({row['ratio']:.2f}x this "
                          f"tree), p99 {row['p99_ms']:.0f} ms" for kind, row in rows.items())
        out.append((f"Scale-out, variant `{name}`, 1 process", cells, "-"))
    rounds = result.get("pg_to_sqlite_rounds", [])
    for name, ratio in result.get("pg_to_sqlite", {}).items():
        cell = f"{ratio:.2f}x"
        if name == "service" and len(rounds) > 1:
            cell += " (median of rounds " + ", ".join(f"{r:.2f}" for r in rounds) + ")"
        out.append((f"Scale-out, PostgreSQL / SQLite, 1 process ({name})", cell, ">= 0.6x"))
    for why in result["skipped"]:
        out.append(("Scale-out, PostgreSQL", f"not measured: {why}", "-"))
    return out
