"""Latency statistics (bench.stats) against samples whose percentiles are known by hand."""

from __future__ import annotations

import random
import statistics

import pytest

from d2v_export.measure import bench


def test_percentiles_mean_and_stdev_of_known_samples() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100 ms, shuffled: order must not matter
    random.Random(0).shuffle(values)
    s = bench.stats(values, batch=2, shape={"batch": 2})
    # linear interpolation between order statistics (numpy's default; docs/report-schema.md)
    assert s.p50 == pytest.approx(50.5)  # the median, not the fastest run (1.0) nor the first sample
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert s.mean == pytest.approx(50.5)
    assert s.stdev == pytest.approx(statistics.stdev(range(1, 101)))  # sample stdev (n - 1): 29.011...
    assert s.n == 100 and s.batch == 2 and s.samples_ms == tuple(values)  # raw timings kept in run order
    assert s.throughput == pytest.approx(1000.0 * 2 / 50.5)


def test_a_skewed_sample_separates_median_mean_and_tail() -> None:
    # nine steady runs and one stall: the median ignores the stall, the mean and the tail do not
    values = [10.0, 12.0, 11.0, 10.0, 13.0, 10.0, 11.0, 12.0, 10.0, 110.0]
    s = bench.stats(values, batch=1, shape={})
    assert s.p50 == pytest.approx(11.0)
    assert s.mean == pytest.approx(20.9)
    assert s.p90 == pytest.approx(13.0 + 0.1 * (110.0 - 13.0))  # between the 9th (13) and 10th (110) order statistic
    assert s.p99 == pytest.approx(13.0 + 0.91 * (110.0 - 13.0))
    assert s.p50 <= s.p90 <= s.p99 <= max(values)


def test_odd_count_and_single_sample() -> None:
    s = bench.stats([3.0, 1.0, 2.0], batch=1, shape={})
    assert (s.p50, s.p90, s.p99, s.mean) == pytest.approx((2.0, 2.8, 2.98, 2.0))
    one = bench.stats([4.5], batch=1, shape={})
    assert (one.p50, one.p90, one.p99, one.mean, one.stdev, one.n) == (4.5, 4.5, 4.5, 4.5, 0.0, 1)
