"""Latency: warm-up, then timed iterations, interleaved across runners so machine drift hits all alike."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .backends.base import Runner
from .spec import LatencyStats


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 3  # untimed rounds first (ORT and OpenVINO allocate on the first runs)
    min_iterations: int = 10
    max_iterations: int = 200
    seconds: float = 8.0  # time budget for the timed rounds, all runners together


def measure(
    runners: Mapping[str, Runner],
    feed: Mapping[str, np.ndarray],
    *,
    batch: int,
    shape: Mapping[str, int],
    settings: BenchSettings = BenchSettings(),
    progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> dict[str, LatencyStats]:
    """Time ``infer(feed)`` of every runner, round-robin (the order rotates each round)."""
    names = list(runners)
    for _ in range(settings.warmup):
        for name in names:
            runners[name].infer(feed)
    timings: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < settings.max_iterations:
        order = names[rounds % len(names):] + names[: rounds % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runners[name].infer(feed)
            timings[name].append((time.perf_counter() - t0) * 1000.0)
        rounds += 1
        elapsed = time.perf_counter() - started
        progress(rounds, _expected_rounds(rounds, elapsed, settings))
        if rounds >= settings.min_iterations and elapsed >= settings.seconds:
            break
    return {name: stats(values, batch=batch, shape=shape) for name, values in timings.items()}


def _expected_rounds(rounds: int, elapsed: float, settings: BenchSettings) -> int:
    if elapsed <= 0:
        return settings.min_iterations
    by_time = int(rounds * settings.seconds / elapsed) + 1
    return max(settings.min_iterations, min(settings.max_iterations, by_time))


def stats(values_ms: list[float], *, batch: int, shape: Mapping[str, int]) -> LatencyStats:
    arr = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = (float(np.percentile(arr, q)) for q in (50, 90, 99))
    return LatencyStats(
        p50=p50,
        p90=p90,
        p99=p99,
        mean=float(arr.mean()),
        stdev=float(statistics.stdev(values_ms)) if len(values_ms) > 1 else 0.0,
        n=len(values_ms),
        batch=batch,
        shape=dict(shape),
        samples_ms=tuple(round(v, 4) for v in values_ms),
    )
