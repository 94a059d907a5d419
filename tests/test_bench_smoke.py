"""A smoke run of the benchmark suite (benchmarks/): tiny sizes, no timing assertions.

It only keeps the benchmarks working: servers start, load generators connect
and finish, results have the figures the report prints. The model figure
runs on the tiny test model (tests/tiny_model.py) without the peer; the real
figures come from ``make bench``.
"""

from __future__ import annotations

import math

import pytest
import yaml

from benchmarks import __main__ as bench_main
from benchmarks import connections, harness, local_model, overhead, report, scaleout

from .tiny_model import TOOLS_TEMPLATE, save_tiny_model

SMOKE = bench_main.SIZES["smoke"]


@pytest.fixture
def workdir(tmp_path):
    harness.raise_nofile()
    return tmp_path


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_overhead_and_report(workdir):
    result = overhead.run(workdir, SMOKE["overhead"])
    assert result["errors"] == 0
    assert result["service_msgs_per_s"] > 0 and result["bare_msgs_per_s"] > 0
    assert finite(result["throughput_ratio"], result["p99_extra_ms"])
    rows = overhead.report(result)
    section = report.render(report.machine(), "smoke", rows,
                            bench_main.details("overhead", result))
    doc = workdir / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written findings\n")
    report.write(section, doc)
    report.write(section, doc)  # a second run replaces the section, keeps the rest
    text = doc.read_text()
    assert text.count(report.END) == 1 and "hand-written findings" in text
    assert "throughput" in text
    flags = report.machine()["cpu_flags"]  # what decides figure 3, beside the CPU's name
    assert flags and f"({flags})" in text


def test_connections(workdir):
    result = connections.run(workdir, SMOKE["connections"])
    size = SMOKE["connections"]
    assert result["connections"] == size["connections"] and result["failures"] == 0
    assert result["still_open_at_end"] == size["connections"]
    assert result["probe_count"] == size["probes"]
    assert finite(result["kib_per_connection"], result["p99_connect_ms"])


def test_connections_with_a_variant(workdir):
    """--variant in figure 2: another copy (here this one again) measured the same way."""
    size = SMOKE["connections"]
    result = connections.run(workdir, size, {"copy": harness.REPO})
    row = result["variants"]["copy"]
    assert row["connections"] == size["connections"] and row["failures"] == 0
    assert finite(row["kib_ratio_to_service"], row["p99_ratio_to_service"],
                  row["ramp_ratio_to_service"])
    assert "variant `copy`" in "\n".join(bench_main.details("connections", result))


def test_scaleout_on_sqlite(workdir):
    result = scaleout.run(workdir, SMOKE["scaleout"])
    rows = result["table"]["sqlite/instances"]
    assert set(rows) == {"1", "2"}
    assert all(row["msgs_per_s"] > 0 and row["errors"] == 0 for row in rows.values())


def overlay(name: str) -> dict:
    """A --variant-config file of benchmarks/, as __main__ reads it."""
    return yaml.safe_load((harness.REPO / "benchmarks" / name).read_text())


def test_model_figure_on_the_tiny_model(workdir):
    """Figure 3, with --variant: this tree again, as another copy, in the same rounds,
    and this tree with benchmarks/memory.yaml and benchmarks/tools.yaml laid over it
    (one run for all: loading models is the slow part). The tiny model's chat
    template takes tools, so that the tools reaching it show in its prompts."""
    folder = save_tiny_model(workdir / "tiny-model", chat_template=TOOLS_TEMPLATE)
    size = {**SMOKE["model"], "hf_folder": str(folder), "data_dir": str(workdir / "data"),
            "agent_options": {"model_path": str(folder), "cache_dir": None}}
    copies = {name: harness.REPO for name in ("again", "memory", "tools")}
    result = local_model.run(workdir, size, copies, {"memory": overlay("memory.yaml"),
                                                      "tools": overlay("tools.yaml")})
    assert result["batch_replies_not_ok"] == 0
    assert finite(result["raw_tok_s"], result["single_tok_s"], result["batch_tok_s"])
    assert result["connect_probes"] == size["probes"]
    # The rate set against the peers is measured under their load, without the
    # probes' new sockets: those arrive in a batch of their own, with its rate.
    detail = result["rounds_detail"]
    assert all(not row["connect_ms"] for row in detail["batch"])
    assert [len(row["connect_ms"]) for row in detail["probed"]] == [size["probes"]] * size["rounds"]
    assert finite(result["probed_tok_s"])
    assert any("skipped" in note for note in result["notes"])
    assert [row[0] for row in local_model.report(result)]
    variants = result["variants"]
    assert all(row["replies_not_ok"] == 0 and finite(row["batch_vs_service"])
               for row in variants.values())
    assert any("variant `again`" in line for line in bench_main.details("model", result))
    # The memories were saved and injected: every prompt of the memory variant
    # is longer, by at least the section's header (one token per byte here).
    assert variants["again"]["prompt_tokens"] == result["prompt_tokens"]
    assert variants["memory"]["prompt_tokens"] > result["prompt_tokens"] + 40
    # The tools reached the agent (their descriptions are in its prompts), and
    # the overlay kept the agent's own options.
    assert variants["tools"]["prompt_tokens"] > result["prompt_tokens"] + 100
    (config,) = (workdir / "tools").glob("config-*.yaml")
    agent = yaml.safe_load(config.read_text())["agent"]
    assert agent["tools"] == ["clock", "memory", "recall"]
    assert agent["transformers"]["model_path"] == str(folder)


def test_config_overlay_merges_nested_sections(workdir):
    """An overlay's ``agent: {tools: [...]}`` keeps the agent's own options, and
    the agent mapping handed in (shared by the variants) is not changed."""
    agent = {"backend": "transformers", "transformers": {"max_new_tokens": 8}}
    path = harness.write_config(workdir, "sqlite:///x.db", agent, overlay={
        "agent": {"tools": ["clock"], "transformers": {"threads": 1}},
        "memory": {"max_items": 5}})
    written = yaml.safe_load(path.read_text())
    assert written["agent"] == {"backend": "transformers", "tools": ["clock"],
                                "transformers": {"max_new_tokens": 8, "threads": 1}}
    assert written["memory"] == {"max_items": 5}
    assert agent == {"backend": "transformers", "transformers": {"max_new_tokens": 8}}
    sections, memories = harness.split_overlay(overlay("memory.yaml"))
    assert "benchmark" not in sections and "memory" in sections
    assert memories["birthday"] == "March 15"


def test_overhead_variant_with_a_config_overlay(workdir):
    """``--variant quotas=. --variant-config quotas=benchmarks/quotas.yaml``: this
    tree again, with quotas on and echo priced, beside the service without; and
    with benchmarks/memory.yaml, whose users saved their memories first."""
    import sqlite3

    result = overhead.run(workdir, SMOKE["overhead"],
                          {"quotas": harness.REPO, "memory": harness.REPO},
                          {"quotas": overlay("quotas.yaml"), "memory": overlay("memory.yaml")})
    assert result["errors"] == 0
    assert finite(result["variants"]["quotas"]["ratio_to_service"])
    with sqlite3.connect(workdir / "memory" / "bench.db") as db:
        (saved,) = db.execute("SELECT count(*) FROM memories").fetchone()
    seeded = harness.split_overlay(overlay("memory.yaml"))[1]
    assert saved == SMOKE["overhead"]["clients"] * len(seeded)
    # The servers' CPU per message, in the same rounds (steadier than throughput).
    assert all(ratio > 0 for ratio in result["variants"]["quotas"]["round_cpu_ratios_to_service"])

    def priced(name: str) -> tuple:
        with sqlite3.connect(workdir / name / "bench.db") as db:
            return db.execute("SELECT count(*), count(cost) FROM messages"
                              " WHERE role = 'assistant'").fetchone()

    replies, costed = priced("quotas")
    assert replies > 0 and costed == replies
    assert priced("service")[1] == 0
