"""The local model's thread tuner: which torch thread count decode steps use.

Its decisions come from step times, so these tests feed it times and a clock
of their own: what it would do on free cores, on a busy one, and in between.
"""

from __future__ import annotations

from plugins.transformers_threads import FIRST_WAIT, LONGEST_WAIT, WINDOW, ThreadTuner

from .test_transformers_agent import ask, collect, run, started_agent
from .test_transformers_agent import tiny_model_dir  # noqa: F401 (a fixture)


class Machine:
    """A fake clock and torch: a step of ``rows`` takes ``step_ms[threads]``."""

    def __init__(self, step_ms: dict[int, float]):
        self.now = 0.0
        self.step_ms = step_ms
        self.threads = 2
        self.calls: list[int] = []

    def set_threads(self, count: int) -> None:
        self.threads = count
        self.calls.append(count)

    def run(self, tuner: ThreadTuner, steps: int, rows: int = 8) -> list[int]:
        """The thread count of each step, as the engine would run them."""
        used = []
        for _ in range(steps):
            tuner.before_step(rows)
            used.append(self.threads)
            seconds = self.step_ms[self.threads] / 1e3
            self.now += seconds
            tuner.after_step(rows, seconds)
        return used


def tuner_on(machine: Machine, most: int = 2) -> ThreadTuner:
    return ThreadTuner(most, machine.set_threads, clock=lambda: machine.now)


def test_on_free_cores_it_keeps_every_thread_and_probes_ever_less_often():
    machine = Machine({2: 40.0, 1: 70.0})
    tuner = tuner_on(machine)
    used = machine.run(tuner, 2000)  # 80 s of steps
    assert tuner.threads == 2 and tuner.switches == 0
    probes = [i for i in range(1, len(used)) if used[i] == 1 and used[i - 1] == 2]
    assert all(used[i:i + WINDOW] == [1] * WINDOW for i in probes)
    # the waits double from FIRST_WAIT up to LONGEST_WAIT: 2, 4, 8, 16, 16, 16... s
    gaps = [(b - a) * 40.0 / 1e3 for a, b in zip(probes, probes[1:])]
    assert gaps[0] < gaps[1] < gaps[2] and max(gaps) < LONGEST_WAIT + 1
    assert used.count(1) <= WINDOW * (80 / LONGEST_WAIT + 4)  # about one step in a hundred
    assert probes[0] * 40.0 / 1e3 >= FIRST_WAIT
    assert machine.threads == 2  # every probe handed the threads back


def test_when_a_core_gets_busy_it_moves_to_one_thread_and_back_when_it_is_free():
    machine = Machine({2: 40.0, 1: 70.0})
    tuner = tuner_on(machine)
    machine.run(tuner, 500)
    machine.step_ms = {2: 180.0, 1: 60.0}  # another process takes a core
    used = machine.run(tuner, 200)
    assert tuner.threads == 1 and tuner.switches == 1
    assert used[-50:].count(1) >= 50 - WINDOW  # a probe of two threads may fall in them
    machine.step_ms = {2: 40.0, 1: 70.0}  # and leaves it
    used = machine.run(tuner, 1500)
    assert tuner.threads == 2 and tuner.switches == 2
    assert used[-50:].count(2) >= 50 - WINDOW


def test_a_difference_within_the_margin_is_no_reason_to_switch():
    machine = Machine({2: 40.0, 1: 38.0})  # one thread 5% faster: noise
    tuner = tuner_on(machine)
    machine.run(tuner, 1000)
    assert tuner.threads == 2 and tuner.switches == 0


def test_a_probe_compares_steps_of_one_batch_size_only():
    machine = Machine({2: 40.0, 1: 20.0})
    tuner = tuner_on(machine)
    rows = 1
    for _ in range(400):  # the batch changes size every third step: never 4 alike
        tuner.before_step(rows)
        machine.now += machine.step_ms[machine.threads] / 1e3
        tuner.after_step(rows, machine.step_ms[machine.threads] / 1e3)
        rows = rows % 3 + 1 if machine.now % 3 else rows
    assert tuner.switches == 0
    machine.run(tuner, 200, rows=5)  # then steady: it finds the faster count
    assert tuner.threads == 1


def test_a_probe_cut_short_by_a_new_batch_size_gives_the_threads_back():
    machine = Machine({2: 40.0, 1: 20.0})
    tuner = tuner_on(machine)
    while machine.threads == 2:  # until the first probe starts
        machine.run(tuner, 1, rows=8)
    tuner.before_step(3)  # a user left mid-probe
    assert machine.threads == 2 and tuner.threads == 2


def test_a_batch_that_ends_mid_probe_gives_the_threads_back():
    machine = Machine({2: 40.0, 1: 20.0})
    tuner = tuner_on(machine)
    while machine.threads == 2:
        machine.run(tuner, 1, rows=8)
    tuner.idle()  # the last reply finished
    assert machine.threads == 2 and tuner.switches == 0
    machine.run(tuner, 3, rows=8)  # a new batch starts its comparison afresh
    assert machine.threads == 2


def test_one_thread_to_begin_with_means_nothing_to_tune():
    machine = Machine({1: 50.0})
    machine.threads = 1
    tuner = tuner_on(machine, most=1)
    machine.run(tuner, 500)
    assert machine.calls == [] and not tuner.enabled


def test_the_engine_probes_one_thread_mid_reply_and_the_reply_is_the_same(
        tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from plugins import transformers_threads

    calls: list[int] = []
    real_set_threads = torch.set_num_threads

    def set_threads(count: int) -> None:
        calls.append(count)
        real_set_threads(count)

    monkeypatch.setattr(torch, "set_num_threads", set_threads)
    monkeypatch.setattr(transformers_threads, "FIRST_WAIT", 0.0)  # probe at once

    async def body(adapt: bool) -> tuple[str, list[int], int]:
        calls.clear()
        async with started_agent(tiny_model_dir, tmp_path, threads=2, max_new_tokens=24,
                                 adapt_threads=adapt) as agent:
            text = await collect(agent, ask("Tell me a story"))
            tuner = agent.engine.threads
            return text, list(calls), tuner.threads if tuner else 0

    steady, steady_calls, _ = run(body, False)
    assert steady_calls == [2]  # the load's own setting, nothing after
    tuned, tuned_calls, threads = run(body, True)
    assert tuned_calls[0] == 2 and 1 in tuned_calls[1:]  # a probe on one thread...
    assert tuned_calls[-1] == threads  # ...and at the end, the count chosen
    assert tuned == steady
