"""Progress callbacks and a wall-clock timer shared by every long-running engine function."""

from __future__ import annotations

import time
from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: called as work advances (counts of layers, windows, runs...)."""

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: like :data:`ProgressFn`, with the name of the current stage."""


def stage_callback(progress: StageProgress | None, name: str) -> ProgressFn | None:
    """A ``(done, total)`` callback reporting to ``progress`` under the stage ``name``."""
    return None if progress is None else (lambda done, total: progress(name, done, total))


class Timer:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
