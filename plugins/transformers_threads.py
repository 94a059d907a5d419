"""How many torch threads the local model's decode steps use, chosen by timing them.

torch's OpenMP threads wait for each other at the end of every operator. While
the cores are free, threads that wait by spinning briefly (OpenMP's default)
make a decode step 1.3-1.5x faster than threads that sleep. While another
process keeps a core busy, spinning turns against them: the thread a step
waits for is off the CPU, and the waiting one holds the other core. Steps then
took 2.5-4x as long as on one thread, which has nobody to wait for
(docs/agents/transformers.md, "Speed levers").

So the engine decodes on ``most`` threads, and now and then tries the other
count for a few steps of the same batch size, keeping whichever was faster.
A probe that loses doubles the time to the next one (up to ``LONGEST_WAIT``),
so a steady machine pays for about one slower step in a hundred.

This module has no torch import: the engine passes ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Callable

logger = logging.getLogger(__name__)

# Steps timed on each side of a comparison.
WINDOW = 4
# The other count must take at most this share of the current one's step time.
MARGIN = 0.9
# Seconds of decoding between probes: the first wait, and the longest.
FIRST_WAIT = 2.0
LONGEST_WAIT = 16.0


class ThreadTuner:
    """Chooses between ``most`` threads and one for each decode step.

    The engine calls :meth:`before_step` with the step's rows, runs the step,
    then calls :meth:`after_step` with its rows and wall seconds; and
    :meth:`idle` when its last row has left.
    """

    def __init__(self, most: int, set_threads: Callable[[int], None],
                 clock: Callable[[], float] = time.perf_counter):
        self.most = most
        self.threads = most  # the count in use outside probes
        self.switches = 0
        self._set_threads = set_threads
        self._clock = clock
        self._recent: list[float] = []  # the latest step times at self._rows on self.threads
        self._rows = 0
        self._probe: list[float] | None = None  # step times on the other count
        self._wait = FIRST_WAIT
        self._next_probe = clock() + self._wait

    @property
    def enabled(self) -> bool:
        return self.most > 1

    def _other(self) -> int:
        return 1 if self.threads == self.most else self.most

    def before_step(self, rows: int) -> None:
        if not self.enabled:
            return
        if self._probe is not None and rows != self._rows:
            self._end_probe()  # the batch changed: not comparable
        if (self._probe is None and rows == self._rows and len(self._recent) == WINDOW
                and self._clock() >= self._next_probe):
            self._probe = []
            self._set_threads(self._other())

    def after_step(self, rows: int, seconds: float) -> None:
        if not self.enabled:
            return
        if self._probe is None:
            if rows != self._rows:
                self._rows, self._recent = rows, []
            self._recent = (self._recent + [seconds])[-WINDOW:]
            return
        self._probe.append(seconds)
        if len(self._probe) < WINDOW:
            return
        probe, current = statistics.median(self._probe), statistics.median(self._recent)
        if probe <= MARGIN * current:
            logger.info("local model: decoding on %d torch thread(s) now: %.1f ms a step of %d "
                        "rows against %.1f ms on %d", self._other(), probe * 1e3, rows,
                        current * 1e3, self.threads)
            self.threads, self._recent = self._other(), self._probe
            self.switches += 1
            self._wait = FIRST_WAIT
        else:
            self._wait = min(2 * self._wait, LONGEST_WAIT)
        self._end_probe()

    def idle(self) -> None:
        """The batch emptied: a probe in progress ends without a verdict, so
        that the next prompt is prefilled on the count in use."""
        if self._probe is not None:
            self._end_probe()
        self._rows, self._recent = 0, []

    def _end_probe(self) -> None:
        self._probe = None
        self._set_threads(self.threads)
        self._next_probe = self._clock() + self._wait
