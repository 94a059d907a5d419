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
measured as one process on each database right after this tree's one
process, so that a change is compared with the tree before it in one run.
The PostgreSQL to SQLite ratio (one process) is reported for each copy.
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
            variant: tuple[str, Path] | None = None) -> dict:
    tag = f"{kind}-{mode}-{count}" + (f"-{variant[0]}" if variant else "")
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
    for kind in kinds:
        for mode in modes:
            rows = {}
            for count in size["processes"]:
                rows[count] = measure(kind, count, mode, workdir, size)
                if mode == "instances" and count == 1:
                    for name, app_dir in (variants or {}).items():
                        others[name][kind] = _row(
                            measure(kind, 1, mode, workdir, size, (name, app_dir)),
                            rows[count]["msgs_per_s"])
            base = rows[size["processes"][0]]["msgs_per_s"]
            table[f"{kind}/{mode}"] = {str(count): _row(r, base) for count, r in rows.items()}
    return {"clients": size["clients"], "duration_s": size["duration"], "table": table,
            "variants": others, "pg_to_sqlite": _pg_to_sqlite(table, others),
            "skipped": skipped}


def _row(result: dict, base: float) -> dict:
    return {"msgs_per_s": result["msgs_per_s"], "ratio": result["msgs_per_s"] / base,
            "p99_ms": result["p99_ms"], "errors": result["errors"] + result["broken_clients"]}


def _pg_to_sqlite(table: dict, others: dict) -> dict:
    """PostgreSQL's one process against SQLite's, for this tree and each variant."""
    copies = {"service": {kind: table[f"{kind}/instances"]["1"]
                          for kind in ("sqlite", "postgresql") if f"{kind}/instances" in table},
              **others}
    return {name: rows["postgresql"]["msgs_per_s"] / rows["sqlite"]["msgs_per_s"]
            for name, rows in copies.items() if {"sqlite", "postgresql"} <= rows.keys()}


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
    for name, ratio in result.get("pg_to_sqlite", {}).items():
        out.append((f"Scale-out, PostgreSQL / SQLite, 1 process ({name})", f"{ratio:.2f}x",
                    ">= 0.6x"))
    for why in result["skipped"]:
        out.append(("Scale-out, PostgreSQL", f"not measured: {why}", "-"))
    return out
