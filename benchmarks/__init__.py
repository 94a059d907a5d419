"""The benchmark suite: ``python -m benchmarks`` (``make bench``).

Every figure is a ratio against a baseline measured in the same run, because
the machines are shared and noisy. Servers and load generators each run in
their own processes, on loopback only, and every loop is bounded in time.
See docs/benchmarks.md for the figures and what was learnt from them.
"""
