"""Timing shared by the benchmarks: steps timed in turn, round after round,
so that they share the machine's noise (another job, a frequency change)."""
import time
from typing import Callable, List, Sequence


def interleaved_times(steps: Sequence[Callable[[], None]], repeats: int,
                      warmup: int = 3) -> List[List[float]]:
    """Run every step ``warmup`` times, then ``repeats`` rounds of each step
    once in turn.

    Returns:
        list[list[float]]: per step, the seconds of each timed round.
    """
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return times
