"""A smoke run of the benchmark suite (benchmarks/): tiny sizes, no timing assertions.

It only keeps the benchmarks working: servers start, load generators connect
and finish, results have the figures the report prints. The model figure
runs on the tiny test model (tests/tiny_model.py) without the peer; the real
figures come from ``make bench``.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import connections, harness, local_model, overhead, report, scaleout

from .tiny_model import save_tiny_model

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


def test_connections(workdir):
    result = connections.run(workdir, SMOKE["connections"])
    size = SMOKE["connections"]
    assert result["connections"] == size["connections"] and result["failures"] == 0
    assert result["still_open_at_end"] == size["connections"]
    assert result["probe_count"] == size["probes"]
    assert finite(result["kib_per_connection"], result["p99_connect_ms"])


def test_scaleout_on_sqlite(workdir):
    result = scaleout.run(workdir, SMOKE["scaleout"])
    rows = result["table"]["sqlite/instances"]
    assert set(rows) == {"1", "2"}
    assert all(row["msgs_per_s"] > 0 and row["errors"] == 0 for row in rows.values())


def test_model_figure_on_the_tiny_model(workdir):
    folder = save_tiny_model(workdir / "tiny-model")
    size = {**SMOKE["model"], "hf_folder": str(folder), "data_dir": str(workdir / "data"),
            "agent_options": {"model_path": str(folder), "cache_dir": None}}
    result = local_model.run(workdir, size)
    assert result["batch_replies_not_ok"] == 0
    assert finite(result["raw_tok_s"], result["single_tok_s"], result["batch_tok_s"])
    assert result["connect_probes"] == size["probes"]
    assert any("skipped" in note for note in result["notes"])
    assert [row[0] for row in local_model.report(result)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_model_figure_measures_a_variant(workdir):
    """--variant for figure 3: this tree again, as another copy, in the same rounds."""
    folder = save_tiny_model(workdir / "tiny-model")
    size = {**SMOKE["model"], "hf_folder": str(folder), "data_dir": str(workdir / "data"),
            "agent_options": {"model_path": str(folder), "cache_dir": None}}
    result = local_model.run(workdir, size, {"again": harness.REPO})
    again = result["variants"]["again"]
    assert again["replies_not_ok"] == 0 and finite(again["batch_vs_service"])
    assert any("variant `again`" in line for line in bench_main.details("model", result))
