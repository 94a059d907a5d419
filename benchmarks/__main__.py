"""``python -m benchmarks [--size full|quick|smoke] [--only FIGURES] [--no-write]``

Runs the figures, prints each as a ratio against its same-run baseline, and
writes them with the machine's description into docs/benchmarks.md (the
generated section only). ``make bench`` is the full run (under ~10 minutes
on 2 cores); ``make bench-quick`` (or ``BENCH_SIZE=quick``) a shorter one;
``smoke`` is what tests/test_bench_smoke.py runs (seconds, no model).

Figures: overhead (1), connections (2), model (3), scaleout (4).
``--variant NAME=DIR`` measures another copy of the service (a proposed
change) beside this one: in the same rounds in figures 1 and 3, right after
this one in figures 2 and 4; ``DIR`` may be this tree (``.``) and, in
figures 1 and 3, ``--variant-config NAME=FILE`` lays a YAML file's config
sections over that variant's (``make bench-quotas``: quotas on against off;
benchmarks/tools.yaml: the agent's tools on). The file's ``benchmark:
{memories: {key: value}}`` is no setting: each of the variant's users saves
those memories through the API before the rounds (benchmarks/memory.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import connections, harness, local_model, overhead, report, scaleout

SIZES = {
    "full": {
        "overhead": {"clients": 50, "rounds": 3, "duration": 8.0, "warmup": 2.0},
        "connections": {"connections": 10_000, "client_processes": 4, "probes": 200,
                        "probe_rate": 50},
        "model": {"users": 8, "rounds": 3, "peer_rounds": 3, "max_new_tokens": 128,
                  "probes": 100, "probe_interval": 0.05},
        "scaleout": {"clients": 50, "processes": [1, 2, 4], "duration": 6.0, "warmup": 1.5,
                     "one_process_rounds": 3},
    },
    "quick": {
        "overhead": {"clients": 50, "rounds": 1, "duration": 4.0, "warmup": 1.0},
        "connections": {"connections": 2_000, "client_processes": 2, "probes": 100,
                        "probe_rate": 50},
        "model": {"users": 8, "rounds": 1, "peer_rounds": 1, "max_new_tokens": 64,
                  "probes": 40, "probe_interval": 0.05},
        "scaleout": {"clients": 50, "processes": [1, 2], "duration": 3.0, "warmup": 1.0},
    },
    "smoke": {
        "overhead": {"clients": 4, "rounds": 1, "duration": 1.5, "warmup": 0.5},
        "connections": {"connections": 40, "client_processes": 2, "probes": 5,
                        "probe_rate": 50, "warmup_sockets": 3, "settle_seconds": 0.1},
        "model": {"users": 2, "rounds": 1, "max_new_tokens": 4, "probes": 3,
                  "probe_interval": 0.05, "peer": False, "warmup": False},
        "scaleout": {"clients": 4, "processes": [1, 2], "duration": 0.5, "warmup": 0.2,
                     "postgresql": False, "modes": ["instances"]},
    },
}
FIGURES = {
    "overhead": overhead,
    "connections": connections,
    "model": local_model,
    "scaleout": scaleout,
}


def details(name: str, result: dict) -> list[str]:
    """A few lines under the table, per figure."""
    if name == "overhead":
        out = [f"- Figure 1: {result['clients']} clients, {result['rounds']} rounds of "
               f"{result['duration_s']:.0f} s; per-round throughput ratios "
               + ", ".join(f"{r:.2f}" for r in result["round_ratios"])
               + f"; p50 {result['service_p50_ms']:.1f} ms (service) vs "
               f"{result['bare_p50_ms']:.1f} ms (bare); errors {result['errors']}."]
        for variant, row in result["variants"].items():
            out.append(f"  - variant `{variant}`: {row['msgs_per_s']:.0f} msg/s, "
                       f"{row['ratio_to_service']:.2f}x this tree, {row['ratio_to_bare']:.2f}x "
                       f"bare, p99 {row['p99_ms']:.1f} ms")
        return out
    if name == "connections":
        return [f"- Figure 2: {result['connections']:,} sockets from "
                f"{result['client_processes']} client processes opened in "
                f"{result['ramp_seconds']:.0f} s ({result['ramp_connects_per_s']:.0f}/s, "
                f"p99 {result['ramp_p99_connect_ms']:.0f} ms while ramping); failures "
                f"{result['failures']}, still open at the end {result['still_open_at_end']:,}."
                ] + [f"  - variant `{variant}`: {row['kib_per_connection']:.1f} KiB per socket "
                     f"({row['kib_ratio_to_service']:.2f}x this tree), p99 connect "
                     f"{row['p99_connect_ms']:.1f} ms ({row['p99_ratio_to_service']:.2f}x), "
                     f"{row['ramp_connects_per_s']:.0f} sockets/s "
                     f"({row['ramp_ratio_to_service']:.2f}x)"
                     for variant, row in result.get("variants", {}).items()]
    if name == "model":
        peer = (f"peer 1 client {result['peer_single_tok_s']:.1f} tok/s"
                if result["peer_single_tok_s"] else "peer not measured")
        if result.get("llama_single_tok_s"):
            peer += f"; llama-server 1 client {result['llama_single_tok_s']:.1f} tok/s"
        notes = f" Notes: {'; '.join(result['notes'])}." if result["notes"] else ""
        out = [f"- Figure 3: {result['users']} users, {result['max_new_tokens']} new tokens "
                f"at most, {result['rounds']} rounds; all three sides in {result['dtype']} (the "
                f"agent's `dtype: auto` here); raw `generate()` "
                f"{result['raw_tok_s']:.1f} tok/s; agent {result['batch_vs_raw']:.2f}x raw at "
                f"{result['users']} users; {result['users']} users while new sockets arrive (the "
                f"p99 connect-to-welcome batch) {result['probed_tok_s']:.1f} tok/s; "
                f"{peer}; service started (model loaded) in "
                f"{result['service_start_seconds']:.0f} s, RSS {result['service_rss_mib']:.0f} "
                f"MiB; replies not ok: {result['batch_replies_not_ok']}; prompt "
                f"{result['prompt_tokens']:.0f} tokens (median, {result['users']} users).{notes}"]
        for variant, row in result.get("variants", {}).items():
            out.append(f"  - variant `{variant}`: "
                       f"1 user {row['single_tok_s']:.1f} tok/s ({row['single_vs_service']:.2f}x "
                       f"this tree), {result['users']} users {row['batch_tok_s']:.1f} tok/s "
                       f"({row['batch_vs_service']:.2f}x this tree; rounds "
                       + ", ".join(f"{r:.2f}" for r in row["batch_round_ratios"])
                       + f"), TTFT {row['ttft_ms']:.0f} ms, replies not ok "
                       f"{row['replies_not_ok']}, prompt {row['prompt_tokens']:.0f} tokens")
        return out
    if name == "scaleout":
        return [f"- Figure 4: {result['clients']} clients spread over the processes, "
                f"{result['duration_s']:.0f} s each; p99 latency per row: "
                + "; ".join(f"{key} " + ", ".join(f"{n}: {row['p99_ms']:.0f} ms"
                                                  for n, row in rows.items())
                            for key, rows in result["table"].items()) + "."]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("BENCH_SIZE", "full"))
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                        help="comma-separated figures: " + ", ".join(FIGURES))
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also save the raw results here")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="another copy of the service to measure in every figure")
    parser.add_argument("--variant-config", action="append", default=[], metavar="NAME=FILE",
                        help="YAML config sections laid over variant NAME's config")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(FIGURES)
    unknown = [name for name in chosen if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    if os.environ.get("BENCH_PEER") == "0":
        SIZES[args.size]["model"]["peer"] = False
    if os.environ.get("BENCH_USERS"):  # figure 3's concurrent users (issue 17 asks 8 and 16)
        SIZES[args.size]["model"]["users"] = int(os.environ["BENCH_USERS"])
    variants = {name: Path(folder).resolve()
                for name, folder in (v.split("=", 1) for v in args.variant)}
    configs = {name: yaml.safe_load(Path(path).read_text(encoding="utf-8"))
               for name, path in (v.split("=", 1) for v in args.variant_config)}
    stray = sorted(set(configs) - set(variants))
    if stray:
        parser.error(f"--variant-config for no --variant: {', '.join(stray)}")

    harness.raise_nofile()
    info = report.machine()
    print(f"machine: {info['cpu']} ({info['cpu_flags']}), {info['cores']} cores, "
          f"{info['ram_gib']} GiB; Python {info['python']}, torch {info['torch']}; "
          f"load {info['load_average']}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="tornado-app-bench-"))
    rows, lines, results = [], [], {"machine": info, "size": args.size}
    try:
        for name in chosen:
            module = FIGURES[name]
            started = time.perf_counter()
            print(f"\n== {name} ({args.size}) ==", flush=True)
            size = SIZES[args.size][name]
            (workdir / name).mkdir(parents=True)
            if name in ("overhead", "model"):
                result = module.run(workdir / name, size, variants, configs)
            elif name in ("connections", "scaleout"):
                result = module.run(workdir / name, size, variants)
            else:
                result = module.run(workdir / name, size)
            results[name] = result
            for figure, measured, target in module.report(result):
                print(f"  {figure}: {measured.replace('**', '')}   (target {target})", flush=True)
            rows += module.report(result)
            lines += details(name, result)
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    if not args.no_write:
        report.write(report.render(info, args.size, rows, lines))
        print(f"\nwrote {report.DOC.relative_to(harness.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
