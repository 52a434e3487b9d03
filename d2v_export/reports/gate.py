"""The verdict of a finished run as one line a user can act on, with the exit code of ``Report.exit_code``.

    report = pipeline.run(spec, shapes, options)
    problem = gate.failure(report, options)   # None when the run passed every gate
    if problem is not None:
        raise problem                          # a D2VError: message + code (5, 8 or 7)

The order is ``spec.verdict_code``'s: drift first, then the device profile's latency budget, then the
baseline. ``matrix.exit_code`` applies the same rule to a matrix.
"""

from __future__ import annotations

from typing import Any

from ..measure.confidence import describe
from ..spec import D2VError, ExitCode, Report


def failure(report: Report, options: Any) -> D2VError | None:
    """The first gate ``report`` fails, as a D2VError naming the variants, the numbers and a fix; None when it passed.

    ``options`` is the ``RunOptions`` of the run (its output folder, INT8 options, profile and baseline
    go into the message).
    """
    code = report.exit_code
    output = options.output
    if code is ExitCode.DRIFT_BUDGET:
        bad = []
        for v in report.variants:
            if not v.drift.passed:
                worst = ", ".join(
                    f"{m} {v.drift.metrics.get(m, float('nan')):.4g}{describe(v.drift.bounds, v.drift.confidence, m)} vs {v.drift.budget.get(m, float('nan')):g}"
                    for m in v.drift.failed
                )
                bad.append(f"{v.artifact} ({worst})")
        int8 = options.int8
        return D2VError(
            f"drift over budget: {'; '.join(bad)}; see {output / 'report.md'}"
            + ("" if int8 is not None and int8.fallback else "; try --fallback auto")
            + (", --quant dynamic" if int8 is None or int8.mode == "static" else "")
            + " or loosen a budget with --max-drift",
            code,
        )
    if code is ExitCode.LATENCY_BUDGET:
        over = [
            f"{v.artifact} {v.latency_budget['detail']}"
            for v in report.variants
            if v.latency_budget and v.latency_budget.get("passed") is False
        ]
        name = getattr(options.profile, "name", options.profile)
        return D2VError(f"over the latency budget of profile {name}: {'; '.join(over)}", code)
    if code is ExitCode.REGRESSION:
        from .compare import describe_regressions

        assert report.comparison is not None
        worse = "; ".join(describe_regressions(report.comparison))
        return D2VError(f"regression against {options.baseline}: {worse}; see {output / 'comparison.md'}", code)
    return None
