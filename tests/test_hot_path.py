"""The exchange's hot path (docs/benchmarks.md, figure 1): what keeps its
cost per message down without changing what a client sees."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.harness import REPO


def test_a_serving_process_freezes_its_startup_objects():
    """serve() freezes what start-up made: a full collection then walks only
    the objects made since (a real process, the app's modules imported)."""
    code = ("import gc; import tornado_app.app as app; before = gc.get_freeze_count(); "
            "app.freeze_startup_objects(); print(before, gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    before, after = map(int, out)
    assert before == 0 and after > 10_000
