"""Wall-clock time of a cycle, split by activity, that survives a resume.

A training cycle spends its time in four activities: training steps (which
include compiling the steps for the cycle's depth), evaluation and
checkpointing. `Stopwatch` measures the training time as the time it runs,
less the time spent in `Stopwatch.pause` blocks, which is booked to their
activity instead. Its readings go into the checkpoint metadata and come back
through the constructor, so the times of a resumed cycle add up across the
interruption (the work lost at the interruption is not counted). The model is
big_vision's ``utils.Chrono``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping

# The activities a stopwatch books time to; all in seconds.
TRAIN = "train_seconds"  # steps, initialisation, interpolation, compiling
COMPILE = "compile_seconds"  # compiling the steps (also counted in TRAIN)
EVAL = "eval_seconds"  # evaluation on the test split
CHECKPOINT = "checkpoint_seconds"  # writing checkpoints
ACTIVITIES = (TRAIN, COMPILE, EVAL, CHECKPOINT)


class Stopwatch:
    """Seconds of one cycle by activity; training time runs unless paused.

    Args:
      seconds: readings to continue from (``to_dict`` of an earlier
        stopwatch, e.g. from a checkpoint); zeros if None. Activities missing
        from the mapping start at zero.
      clock: a function returning seconds (for tests); ``time.perf_counter``.
    """

    def __init__(self, seconds: Mapping[str, float] | None = None, clock=time.perf_counter):
        self._clock = clock
        self._totals = {name: float((seconds or {}).get(name, 0.0)) for name in ACTIVITIES}
        self._running_since = clock()

    @contextlib.contextmanager
    def pause(self, activity: str) -> Iterator[None]:
        """Books the time inside the block to ``activity`` instead of training.

        Raises:
          ValueError: for an activity other than EVAL or CHECKPOINT.
        """
        if activity not in (EVAL, CHECKPOINT):
            raise ValueError(f"a stopwatch pauses for {EVAL!r} or {CHECKPOINT!r}, not {activity!r}")
        self._totals[TRAIN] += self._clock() - self._running_since
        start = self._clock()
        try:
            yield
        finally:
            now = self._clock()
            self._totals[activity] += now - start
            self._running_since = now

    def add_compile_seconds(self, seconds: float) -> None:
        """Records compiling that happened while training time ran."""
        self._totals[COMPILE] += float(seconds)

    def to_dict(self) -> dict[str, float]:
        """The readings so far, seconds per activity (training up to now)."""
        readings = dict(self._totals)
        readings[TRAIN] += self._clock() - self._running_since
        return readings
