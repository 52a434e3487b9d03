"""Latency: warm-up until timings settle, then timed rounds interleaved across runners.

Every round runs each runner once, in an order that rotates from round to round, so that slow machine
drift (frequency scaling, another process) hits the reference and every variant alike. The raw
timings are kept (``LatencyStats.samples_ms``) so that two reports can be compared statistically
(see compare.py).

Warm-up: at least ``warmup`` untimed rounds, then more until every runner has *settled* — the median
of its last ``settle_window`` warm-up timings is within ``settle_tolerance`` of the median of the
``settle_window`` before — or until ``max_warmup`` rounds / ``max_warmup_seconds`` (default: as
long as the timed budget ``seconds``, at least 2 s; a runner that
never settles is timed anyway; ``BenchResult.settled`` says so). PyTorch needs this: its first few
calls can be a hundred times slower than the steady state.

Timed rounds: at least ``min_iterations``, at most ``max_iterations``, stopping once ``seconds`` have
passed. A fixed count is ``min_iterations == max_iterations``; a pure time budget is a large
``max_iterations``.

In pairs (``measure_pairs``, the pipeline's choice for models whose fp32 weights exceed
``export.EXTERNAL_DATA_BYTES``): every variant is opened alone and timed interleaved with the already
open reference, then closed, so one artifact and the reference are resident at a time instead of all
of them. Each pair gets its share of the time budget (each runner about as much timed time as in one
table); a variant's speedup is taken against the reference timings of its own pair
(``BenchResult.pair_reference``), and the reference's reported latency pools all of its pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..backends.base import Runner
from ..spec import LatencyStats


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 3  # untimed rounds at least (ORT and OpenVINO allocate on the first runs)
    min_iterations: int = 10
    max_iterations: int = 200
    seconds: float = 8.0  # time budget for the timed rounds, all runners together
    settle_window: int = 5  # warm-up: compare the median of the last N timings with the N before
    settle_tolerance: float = 0.05  # ... and call it settled within this fraction
    max_warmup: int = 50  # warm-up rounds at most
    # warm-up time at most, all runners together; None: ``seconds``, at least 2 s
    max_warmup_seconds: float | None = None
    disable_gc: bool = True  # no Python garbage collection pauses inside timed runs
    # every artifact opened once more in a child process (d2v_export.measure.cold_start, about a second per variant at
    # tiny size): None measures it unless ``seconds`` is 0 (--bench-seconds 0, the quickest run)
    cold_start: bool | None = None

    @property
    def measures_cold_start(self) -> bool:
        return self.cold_start if self.cold_start is not None else self.seconds > 0


@dataclass(frozen=True)
class BenchResult:
    """Everything ``measure_full`` learned; ``measure`` returns only ``stats``."""

    stats: dict[str, LatencyStats]
    warmup_rounds: int
    settled: dict[str, bool] = field(default_factory=dict)  # False: hit the warm-up cap still drifting
    timed_rounds: int = 0
    seconds: float = 0.0  # wall time of the timed rounds
    # measured in pairs (``measure_pairs``): each variant's own pair's reference timings
    pair_reference: dict[str, LatencyStats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """For report.json: how the numbers were taken."""
        out: dict[str, object] = {
            "warmup_rounds": self.warmup_rounds,
            "settled": dict(self.settled),
            "timed_rounds": self.timed_rounds,
            "seconds": round(self.seconds, 3),
            "interleaved": True,
        }
        if self.pair_reference:
            out["interleaved"] = "in pairs with the reference"
            out["pair_reference_p50_ms"] = {name: round(s.p50, 4) for name, s in self.pair_reference.items()}
        return out


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
    return measure_full(runners, feed, batch=batch, shape=shape, settings=settings, progress=progress).stats


def measure_full(
    runners: Mapping[str, Runner],
    feed: Mapping[str, np.ndarray],
    *,
    batch: int,
    shape: Mapping[str, int],
    settings: BenchSettings = BenchSettings(),
    progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> BenchResult:
    """``measure`` plus the warm-up rounds, which runners settled and the timed wall time."""
    names = list(runners)
    if not names:
        return BenchResult({}, 0)
    gc_was_enabled = gc.isenabled()
    if settings.disable_gc:
        gc.collect()
        gc.disable()
    try:
        warm, settled = _warm_up(runners, feed, names, settings)
        timings: dict[str, list[float]] = {name: [] for name in names}
        started = time.perf_counter()
        rounds = 0
        while rounds < max(1, settings.max_iterations):
            for name in _order(names, rounds):
                t0 = time.perf_counter()
                runners[name].infer(feed)
                timings[name].append((time.perf_counter() - t0) * 1000.0)
            rounds += 1
            elapsed = time.perf_counter() - started
            progress(rounds, _expected_rounds(rounds, elapsed, settings))
            if rounds >= settings.min_iterations and elapsed >= settings.seconds:
                break
        elapsed = time.perf_counter() - started
    finally:
        if settings.disable_gc and gc_was_enabled:
            gc.enable()
    stats_by_name = {name: stats(values, batch=batch, shape=shape) for name, values in timings.items()}
    return BenchResult(stats_by_name, warm, settled, rounds, elapsed)


Opener = Callable[[], "contextlib.AbstractContextManager[Runner]"]


def measure_pairs(
    reference: tuple[str, Runner],
    candidates: Mapping[str, Opener],
    feed: Mapping[str, np.ndarray],
    *,
    batch: int,
    shape: Mapping[str, int],
    settings: BenchSettings = BenchSettings(),
    progress: Callable[[int, int], None] = lambda _done, _total: None,
    between: Callable[[], None] = lambda: None,
) -> BenchResult:
    """Each candidate opened alone (``candidates[name]()`` gives a context manager yielding its runner) and timed
    interleaved with the open ``reference`` (name, runner), then closed: one candidate resident at a time.

    Each pair's timed budget is ``settings.seconds * 2 / (candidates + 1)``, so every runner gets about
    the timed time it would get in one table. ``stats[reference]`` pools the reference's timings of all
    pairs; ``pair_reference[name]`` is the reference in ``name``'s pair, what its speedup is taken against.
    ``between`` runs after each candidate is closed (the pipeline hands freed memory back to the OS there).
    """
    ref_name, ref_runner = reference
    if not candidates:
        return measure_full(
            {ref_name: ref_runner}, feed, batch=batch, shape=shape, settings=settings, progress=progress
        )
    share = dataclasses.replace(settings, seconds=settings.seconds * 2 / (len(candidates) + 1))
    stats_by_name: dict[str, LatencyStats] = {}
    pair_reference: dict[str, LatencyStats] = {}
    pooled: list[float] = []
    settled: dict[str, bool] = {ref_name: True}
    warm = rounds = 0
    elapsed = 0.0
    for name, opener in candidates.items():
        with opener() as runner:
            one = measure_full(
                {ref_name: ref_runner, name: runner}, feed, batch=batch, shape=shape, settings=share, progress=progress
            )
        between()
        stats_by_name[name] = one.stats[name]
        pair_reference[name] = one.stats[ref_name]
        pooled += one.stats[ref_name].samples_ms
        settled[name] = one.settled.get(name, False)
        settled[ref_name] = settled[ref_name] and one.settled.get(ref_name, False)
        warm, rounds, elapsed = warm + one.warmup_rounds, rounds + one.timed_rounds, elapsed + one.seconds
    stats_by_name = {ref_name: stats(pooled, batch=batch, shape=shape), **stats_by_name}
    return BenchResult(stats_by_name, warm, settled, rounds, elapsed, pair_reference)


def _order(names: list[str], rounds: int) -> list[str]:
    k = rounds % len(names)
    return names[k:] + names[:k]


def _warm_up(
    runners: Mapping[str, Runner], feed: Mapping[str, np.ndarray], names: list[str], settings: BenchSettings
) -> tuple[int, dict[str, bool]]:
    """Untimed (for the report) rounds until every runner's timings stop drifting, or the cap."""
    history: dict[str, list[float]] = {name: [] for name in names}
    settled = {name: False for name in names}
    started = time.perf_counter()
    rounds = 0
    floor = max(0, settings.warmup)
    cap = max(floor, settings.max_warmup)
    while rounds < cap:
        for name in _order(names, rounds):
            t0 = time.perf_counter()
            runners[name].infer(feed)
            history[name].append(time.perf_counter() - t0)
        rounds += 1
        for name in names:
            settled[name] = is_settled(history[name], settings.settle_window, settings.settle_tolerance)
        if rounds >= floor and all(settled.values()):
            break
        if rounds >= floor and time.perf_counter() - started >= warmup_budget(settings):
            break
    if settings.settle_window <= 0:
        settled = {name: True for name in names}
    return rounds, settled


def warmup_budget(settings: BenchSettings) -> float:
    """Seconds the warm-up may take at most (after its ``warmup`` rounds)."""
    if settings.max_warmup_seconds is not None:
        return settings.max_warmup_seconds
    return max(2.0, settings.seconds)


def is_settled(values: list[float], window: int, tolerance: float) -> bool:
    """Median of the last ``window`` values within ``tolerance`` (a fraction) of the ``window`` before."""
    if window <= 0:
        return True
    if len(values) < 2 * window:
        return False
    last = statistics.median(values[-window:])
    before = statistics.median(values[-2 * window : -window])
    return before > 0 and abs(last - before) <= tolerance * before


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
