"""How sure a drift verdict can be: exact confidence bounds for the metrics that count answers.

A metric such as ``top1_agreement`` or ``accuracy_drop`` is a count of answers over a few hundred items: one
answer that changes moves it by 1/n, and a budget of 0.005 on 240 items is crossed by two answers. Which two
answers flip depends on the CPU's kernels and the calibration seed, so a verdict taken on the measured value
alone is noise at the edge of the budget. The counts behind such a metric are kept as ``Count`` or
``Paired``; ``bounds`` turns them into one-sided confidence bounds, and ``metrics.judge`` fails a metric only
when its bound on the favourable side is still beyond the budget (over budget *with that confidence*), and
calls it *unresolved* when the bound on the other side is (too few items to show it is within budget).

    bounds(Count(k=236, n=240), 0.95)            # (0.9627..., 0.9945...): each bound one-sided at 95 %
    bounds(Paired(lost=2, gained=0, n=240), 0.95)

``Count``: k of n items agree (Clopper-Pearson bounds, exact). ``Paired``: an accuracy difference on the same
items, reference minus candidate: ``lost`` items the reference got right and the candidate wrong, ``gained``
the other way round; the difference is ``(lost - gained) / n`` = q (2 pi - 1), with q = (lost + gained) / n the
share of answers that changed and pi = lost / (lost + gained) the share of those that were lost. Both get
exact Clopper-Pearson bounds at half the error rate each (Bonferroni), so the combined bound holds at the
confidence asked for — the conditional exact test on the answers that changed (McNemar's), extended from
"no difference" to "no more than the budget".

The bounds are beta quantiles (scipy), exact for any number of items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

DEFAULT_CONFIDENCE = 0.95  # a metric fails only when it is over budget with this confidence (one-sided)


@dataclass(frozen=True)
class Count:
    """``k`` of ``n`` items (agreements, exact matches)."""

    k: int
    n: int


@dataclass(frozen=True)
class Paired:
    """An accuracy difference on the same ``n`` items: ``lost`` right -> wrong, ``gained`` wrong -> right."""

    lost: int
    gained: int
    n: int


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """(lower, upper) bounds of a proportion k/n, each one-sided at ``confidence`` (exact: beta quantiles)."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))
    upper = 1.0 if k >= n else float(beta.ppf(1.0 - alpha, k + 1, n - k))
    return lower, upper


def bounds(evidence: Count | Paired, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """(lower, upper) confidence bounds of the metric the evidence counts, each one-sided at ``confidence``."""
    if isinstance(evidence, Count):
        return clopper_pearson(evidence.k, evidence.n, confidence)
    half = 1.0 - (1.0 - confidence) / 2  # Bonferroni: two bounds, each at half the error rate
    changed = evidence.lost + evidence.gained
    q_low, q_high = clopper_pearson(changed, evidence.n, half)
    pi_low, pi_high = clopper_pearson(evidence.lost, changed, half) if changed else (0.0, 1.0)
    d_low, d_high = 2 * pi_low - 1, 2 * pi_high - 1  # the net share of the changed answers that were lost
    lower = d_low * (q_low if d_low >= 0 else q_high)
    upper = d_high * (q_high if d_high >= 0 else q_low)
    return lower, upper


def describe(found: Mapping[str, tuple[float, float]], levels: Mapping[str, float], name: str) -> str:
    """ " [0.962, 0.994] at 95 %": a metric's bounds as reports print them; "" for a metric without bounds."""
    pair = found.get(name)
    if not pair:
        return ""
    return f" [{pair[0]:.3g}, {pair[1]:.3g}] at {levels.get(name, DEFAULT_CONFIDENCE):.0%}"
