"""Task-aware drift between a reference (PyTorch fp32) and a candidate (ONNX, OpenVINO, INT8).

Pure numpy. ``compute`` takes the outputs of both on the same samples and returns plain floats;
``judge`` compares them with a budget. Every batch row of every sample is one item.
The kind of metric comes from ``Head.metric`` (see heads.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np

from .confidence import DEFAULT_CONFIDENCE, Count, Paired, bounds
from ..spec import D2VError, ExitCode


@dataclass(frozen=True)
class MetricDef:
    name: str
    higher_is_better: bool
    description: str


def _defs(*rows: tuple[str, bool, str]) -> dict[str, MetricDef]:
    return {n: MetricDef(n, h, d) for n, h, d in rows}


METRICS: dict[str, MetricDef] = _defs(
    ("max_abs_error", False, "largest |candidate - reference| over all outputs and samples"),
    ("mean_abs_error", False, "mean |candidate - reference| over all output elements"),
    ("top1_agreement", True, "fraction of items whose argmax class is the same"),
    ("top5_overlap", True, "mean |top5(ref) & top5(cand)| / 5 (k = min(5, classes))"),
    ("logit_cosine", True, "mean cosine similarity of the logit vectors, per item or position"),
    ("reference_accuracy", True, "accuracy of the reference against the labels"),
    ("candidate_accuracy", True, "accuracy of the candidate against the labels"),
    ("accuracy_drop", False, "reference_accuracy - candidate_accuracy (0..1)"),
    ("cer", False, "character error rate of candidate transcripts against reference transcripts"),
    ("wer", False, "word error rate of candidate transcripts against reference transcripts"),
    ("frame_agreement", True, "fraction of CTC frames whose argmax token is the same"),
    ("reference_cer", False, "CER of the reference against the label transcripts"),
    ("candidate_cer", False, "CER of the candidate against the label transcripts"),
    ("cer_increase", False, "candidate_cer - reference_cer"),
    ("reference_wer", False, "WER of the reference against the label transcripts"),
    ("candidate_wer", False, "WER of the candidate against the label transcripts"),
    ("wer_increase", False, "candidate_wer - reference_wer"),
    ("token_agreement", True, "fraction of (unmasked) positions whose argmax label is the same"),
    ("span_exact_match", True, "fraction of items whose best answer span is the same"),
    ("start_agreement", True, "fraction of items whose argmax start position is the same"),
    ("end_agreement", True, "fraction of items whose argmax end position is the same"),
    ("top1_token_agreement", True, "fraction of (masked) positions whose argmax token is the same"),
    ("kl_divergence", False, "mean KL(reference || candidate) of the token distributions, per position"),
    ("pixel_agreement", True, "fraction of pixels whose argmax class is the same"),
    ("miou", True, "mean IoU of the two argmax masks over classes present in either"),
    ("embedding_cosine", True, "mean cosine similarity per item, worst output"),
    ("min_cosine", True, "cosine similarity of the worst single item"),
)

DEFAULT_BUDGETS: dict[str, dict[str, float]] = {
    "classification": {"top1_agreement": 0.98, "logit_cosine": 0.99, "accuracy_drop": 0.005},
    "ctc": {"cer": 0.02, "wer": 0.05, "wer_increase": 0.003, "cer_increase": 0.003},
    "token-classification": {"token_agreement": 0.97},
    "question-answering": {"span_exact_match": 0.9},
    "language-model": {"top1_token_agreement": 0.9, "kl_divergence": 0.1},
    "segmentation": {"pixel_agreement": 0.95, "miou": 0.85},
    "embedding": {"embedding_cosine": 0.99},
}

# Random weights (presets): a random model's transcripts and its answers against labels are noise, so
# metrics built on them measure nothing and must not gate. They are still computed and reported, marked
# as information with the reason; what gates instead is agreement of the outputs themselves. Data: one
# reason per metric, and the gates that replace them per metric kind (``budgets``).
NOT_MEANINGFUL_ON_RANDOM_WEIGHTS: dict[str, str] = {
    "cer": "random weights: transcripts of an untrained model are noise, so their character error rate measures nothing",
    "wer": "random weights: transcripts of an untrained model are noise, so their word error rate measures nothing",
    "cer_increase": "random weights: an untrained model's error against label transcripts measures nothing",
    "wer_increase": "random weights: an untrained model's error against label transcripts measures nothing",
    "accuracy_drop": "random weights: an untrained model's accuracy against labels measures nothing",
}
RANDOM_WEIGHT_GATES: dict[str, dict[str, float]] = {
    "ctc": {"logit_cosine": 0.99},  # the per-frame logits must still agree
}

MAX_ANSWER_TOKENS = 30  # longest answer span, in tokens, for span_exact_match


# ---------------------------------------------------------------------------------- budgets


# Budgets are inclusive, and a value within this of its limit counts as at the limit: float rounding
# (0.87 - 0.865 = 0.0050000000000000044) must not fail a metric that is exactly at its budget. Relative
# to the limit when that is over 1; far below one sample's share of any count metric (1/n, n < 10^8).
BUDGET_EPSILON = 1e-9


def within(value: float, limit: float, higher_is_better: bool) -> bool:
    """``value`` meets an inclusive ``limit`` (a lower bound when higher is better), up to float rounding; NaN never does."""
    slack = BUDGET_EPSILON * max(1.0, abs(limit))
    return value >= limit - slack if higher_is_better else value <= limit + slack


@dataclass(frozen=True)
class Judgement:
    """A budget's verdict on measured metrics; ``bounds`` and ``unresolved`` only for metrics that count answers."""

    passed: bool
    failed: tuple[str, ...]  # over budget (with the confidence asked for, where the metric has counts)
    unresolved: tuple[str, ...] = ()  # within budget as measured or by the noise, but too few items to show it
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (lower, upper), one-sided each
    confidence: Mapping[str, float] = field(default_factory=dict)  # metric -> the confidence its bounds were taken at


def judge(
    metrics: Mapping[str, float],
    budget: Mapping[str, float],
    evidence: Mapping[str, Count | Paired] | None = None,
    confidence: Mapping[str, float] | None = None,
) -> Judgement:
    """Judge ``metrics`` against ``budget``: lower bound for higher-is-better metrics, upper bound otherwise.

    Budgets are inclusive (``within``). A budget key absent from ``metrics`` is ignored; a NaN value fails.
    A metric with ``evidence`` (the counts behind it) fails only when its confidence bound on the favourable
    side is beyond the limit — over budget with ``confidence[metric]`` (default ``DEFAULT_CONFIDENCE``; 0 judges
    the measured value alone) — and is *unresolved* when only the bound on the other side is.
    """
    failed, unresolved, found, levels = [], [], {}, {}
    for name, limit in budget.items():
        if name not in metrics:
            continue
        higher = METRICS[name].higher_is_better if name in METRICS else False
        level = (confidence or {}).get(name, DEFAULT_CONFIDENCE)
        proof = (evidence or {}).get(name)
        if proof is None or level <= 0 or math.isnan(metrics[name]):
            if not within(metrics[name], limit, higher):
                failed.append(name)
            continue
        low, high = found[name] = bounds(proof, level)
        levels[name] = level
        favourable, unfavourable = (high, low) if higher else (low, high)
        if not within(favourable, limit, higher):
            failed.append(name)
        elif not within(unfavourable, limit, higher):
            unresolved.append(name)
    return Judgement(not failed, tuple(failed), tuple(unresolved), found, levels)


def budgets(
    kind: str, *, random_weights: bool, overrides: Mapping[str, float] | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """(the budget that gates, {metric: why it is only information}) for a metric kind.

    Defaults from ``DEFAULT_BUDGETS``; on random weights the metrics in ``NOT_MEANINGFUL_ON_RANDOM_WEIGHTS``
    become information and ``RANDOM_WEIGHT_GATES`` gate instead. An explicit override (``--max-drift``) always gates.
    """
    gate = dict(DEFAULT_BUDGETS.get(kind, {}))
    info: dict[str, str] = {}
    if random_weights:
        info = {m: NOT_MEANINGFUL_ON_RANDOM_WEIGHTS[m] for m in gate if m in NOT_MEANINGFUL_ON_RANDOM_WEIGHTS}
        gate = {m: v for m, v in gate.items() if m not in info} | RANDOM_WEIGHT_GATES.get(kind, {})
    gate |= dict(overrides or {})
    return gate, {m: why for m, why in info.items() if m not in gate}


def parse_budget(items: list[str]) -> dict[str, float]:
    """Parse ``["top1_agreement=0.99", "wer=0.05,cer=0.02"]`` into a budget (a confidence suffix is dropped: ``parse_drift``)."""
    return parse_drift(items)[0]


def parse_drift(items: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Parse ``["accuracy_drop=0.01@0.9", "wer=0.05"]`` into (budget, confidence per metric that named one).

    ``@C`` (0 or 0.5 <= C < 1): the metric fails only when over budget with confidence C (metrics that count
    answers: ``confidence``); ``@0`` judges the measured value alone.
    """
    budget: dict[str, float] = {}
    levels: dict[str, float] = {}
    valid = ", ".join(sorted(METRICS))
    for item in (p.strip() for raw in items for p in raw.split(",")):
        if not item:
            continue
        name, sep, text = (s.strip() for s in item.partition("="))
        if not sep or name not in METRICS:
            raise D2VError(
                f"bad budget '{item}': use METRIC=LIMIT[@CONFIDENCE] with METRIC one of: {valid}", ExitCode.USAGE
            )
        text, at, level = (s.strip() for s in text.partition("@"))
        budget[name] = _number(
            text, f"bad budget '{item}': '{text}' is not a number; use METRIC=LIMIT, e.g. {name}=0.99"
        )
        if at:
            levels[name] = _confidence(level, item)
    return budget, levels


def _number(text: str, problem: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise D2VError(problem, ExitCode.USAGE)
    return value


def _confidence(text: str, item: str) -> float:
    value = _number(
        text,
        f"bad confidence in '{item}': '{text}' is not a number; use e.g. @0.95, or @0 to judge the measured value alone",
    )
    if value != 0 and not 0.5 <= value < 1:
        raise D2VError(
            f"bad confidence in '{item}': {value:g} is outside 0.5..1; use e.g. @0.95, or @0 to judge the measured value alone",
            ExitCode.USAGE,
        )
    return value


# ---------------------------------------------------------------------------------- text


def ctc_greedy_decode(logits: np.ndarray, id2char: dict[int, str], blank: int = 0, delimiter: str = "|") -> str:
    """Best path of (frames, vocab) logits: argmax, collapse repeats, drop blanks, delimiter -> space."""
    ids = np.asarray(logits).argmax(-1).reshape(-1)
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    text = "".join(id2char.get(int(i), "") for i in ids[keep] if i != blank)
    return " ".join(text.replace(delimiter, " ").split())


def _edits(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance, one numpy row per element of ``a``."""
    if not a or not b:
        return max(len(a), len(b))
    vocab: dict[Hashable, int] = {}
    x = [vocab.setdefault(t, len(vocab)) for t in a]
    y = np.array([vocab.setdefault(t, len(vocab)) for t in b])
    idx = np.arange(len(y) + 1)
    row = idx.copy()
    for t in x:
        tmp = np.empty_like(row)
        tmp[0] = row[0] + 1
        tmp[1:] = np.minimum(row[1:] + 1, row[:-1] + (y != t))
        row = np.minimum.accumulate(tmp - idx) + idx  # insertions: new[j] = min_k<=j tmp[k] + j - k
    return int(row[-1])


def _rate(pairs: Sequence[tuple[Sequence[Hashable], Sequence[Hashable]]]) -> float:
    """Total edits / total reference length; empty references give 0 if hypotheses are empty, else 1."""
    total = sum(len(r) for r, _ in pairs)
    if total == 0:
        return 0.0 if all(len(h) == 0 for _, h in pairs) else 1.0
    return sum(_edits(r, h) for r, h in pairs) / total


def cer(ref: str, hyp: str) -> float:
    """Character error rate."""
    return _rate([(ref, hyp)])


def wer(ref: str, hyp: str) -> float:
    """Word error rate (words split on whitespace)."""
    return _rate([(ref.split(), hyp.split())])


# ---------------------------------------------------------------------------------- helpers


def _get(sample: dict[str, np.ndarray], name: str, i: int, side: str) -> np.ndarray:
    if name not in sample:
        raise D2VError(f"{side} sample {i} has no output '{name}' (has: {', '.join(sample) or 'none'})")
    return np.asarray(sample[name])


def _pairs(
    reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]], name: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(sample index, reference array, candidate array) for one output, shapes checked."""
    for i, (r, c) in enumerate(zip(reference, candidate)):
        a, b = _get(r, name, i, "reference"), _get(c, name, i, "candidate")
        if a.shape != b.shape:
            raise D2VError(f"output '{name}' of sample {i}: reference shape {a.shape} != candidate shape {b.shape}")
        yield i, a, b


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity over the last axis; two zero vectors count as 1, one zero vector as 0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    den = na * nb
    out = np.where(den > 0, dot / np.where(den > 0, den, 1.0), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return np.clip(out, -1.0, 1.0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_sum(r: np.ndarray, c: np.ndarray) -> float:
    """Sum over rows of KL(softmax(r) || softmax(c)), in chunks to bound memory."""
    step = max(1, (1 << 22) // max(1, r.shape[-1]))
    total = 0.0
    for s in range(0, len(r), step):
        lp, lq = _log_softmax(r[s : s + step]), _log_softmax(c[s : s + step])
        p = np.exp(lp)
        total += float(np.where(p > 0, p * (lp - lq), 0.0).sum())
    return total


class _Masks:
    """attention_masks per sample; a mask applies only where its shape is the (batch, seq) of the output."""

    def __init__(self, masks: list[np.ndarray] | None, samples: int) -> None:
        if masks is not None and len(masks) != samples:
            raise D2VError(f"got {len(masks)} attention masks for {samples} samples; pass one per sample")
        self.masks = masks

    def get(self, i: int, shape: tuple[int, ...]) -> np.ndarray | None:
        if self.masks is None:
            return None
        m = np.asarray(self.masks[i])
        return m.astype(bool) if m.shape == shape else None


def _rows(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(batch, seq, C) -> (positions, C), keeping positions where the mask is set."""
    return a[mask] if mask is not None else a.reshape(-1, a.shape[-1])


def _labels(labels: list[Any], items: int) -> list[Any]:
    if len(labels) != items:
        raise D2VError(f"got {len(labels)} labels for {items} items; pass one label per batch row")
    return labels


def _mean(total: float, n: int) -> float:
    return total / n if n else 1.0


Outputs = list[dict[str, np.ndarray]]
# A metric is a number, or the counts behind it where it counts answers (``confidence``): items, not
# positions — the answers of one item are one piece of evidence, the positions of one sequence are not independent.
Measured = float | Count | Paired


def _value(m: Measured) -> float:
    """The metric's value: k / n for a count (1.0 when there are no items), (lost - gained) / n for a paired difference."""
    if isinstance(m, Count):
        return _mean(m.k, m.n)
    if isinstance(m, Paired):
        return (m.lost - m.gained) / m.n if m.n else 0.0
    return m


# ---------------------------------------------------------------------------------- kinds


def _classification(
    ref: Outputs, cand: Outputs, names: tuple[str, ...], labels: list[Any] | None, **_unused: Any
) -> dict[str, Measured]:
    r = np.concatenate([a.reshape(-1, a.shape[-1]) for _, a, _ in _pairs(ref, cand, names[0])])
    c = np.concatenate([b.reshape(-1, b.shape[-1]) for _, _, b in _pairs(ref, cand, names[0])])
    k = min(5, r.shape[-1])
    rk, ck = np.argsort(-r, -1, kind="stable")[:, :k], np.argsort(-c, -1, kind="stable")[:, :k]
    out: dict[str, Measured] = {
        "top1_agreement": Count(int((r.argmax(-1) == c.argmax(-1)).sum()), len(r)),
        "top5_overlap": float((rk[:, :, None] == ck[:, None, :]).any(-1).sum(-1).mean() / k),
        "logit_cosine": float(_cosine(r, c).mean()),
    }
    if labels is not None:
        y = np.array([int(v) for v in _labels(labels, len(r))])
        rr, cr = r.argmax(-1) == y, c.argmax(-1) == y
        lost, gained = int((rr & ~cr).sum()), int((cr & ~rr).sum())
        out |= {
            "reference_accuracy": float(rr.mean()),
            "candidate_accuracy": float(cr.mean()),
            "accuracy_drop": Paired(lost, gained, len(r)),
        }
    return out


def _ctc(
    ref: Outputs,
    cand: Outputs,
    names: tuple[str, ...],
    labels: list[Any] | None,
    id2char: dict[int, str] | None,
    **_unused: Any,
) -> dict[str, float]:
    if id2char is None:  # every id its own symbol; WER then treats a transcript as one word
        vocab = _get(ref[0], names[0], 0, "reference").shape[-1]
        id2char = {i: chr(0xF0000 + i) for i in range(vocab)}
    rt: list[str] = []
    ct: list[str] = []
    same = frames = 0
    cos = 0.0
    for _, a, b in _pairs(ref, cand, names[0]):
        a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        cos += float(_cosine(a, b).sum())
        frames += a.shape[0] * a.shape[1]
        rt += [ctc_greedy_decode(x, id2char) for x in a]
        ct += [ctc_greedy_decode(x, id2char) for x in b]
    out = {
        "cer": _rate(list(zip(rt, ct))),
        "wer": _rate([(x.split(), y.split()) for x, y in zip(rt, ct)]),
        "frame_agreement": _mean(same, frames),
        "logit_cosine": _mean(cos, frames),
    }
    if labels is not None:  # compared case-insensitively, whitespace collapsed
        gold = [" ".join(str(s).upper().split()) for s in _labels(labels, len(rt))]
        for unit, pairs in (("cer", _vs(gold, rt, ct, list)), ("wer", _vs(gold, rt, ct, str.split))):
            rr, cr = _rate(pairs[0]), _rate(pairs[1])
            out |= {f"reference_{unit}": rr, f"candidate_{unit}": cr, f"{unit}_increase": cr - rr}
    return out


def _vs(
    gold: list[str], rt: list[str], ct: list[str], unit: Callable[[str], list[str]]
) -> tuple[list[tuple[list[str], list[str]]], ...]:
    """(reference pairs, candidate pairs) against the label transcripts, split into units."""
    return tuple([(unit(g), unit(h.upper())) for g, h in zip(gold, hyps)] for hyps in (rt, ct))


def _token_classification(
    ref: Outputs, cand: Outputs, names: tuple[str, ...], masks: _Masks, **_unused: Any
) -> dict[str, float]:
    same = n = 0
    cos = 0.0
    for i, a, b in _pairs(ref, cand, names[0]):
        m = masks.get(i, a.shape[:2])
        r, c = _rows(a, m), _rows(b, m)
        same += int((r.argmax(-1) == c.argmax(-1)).sum())
        cos += float(_cosine(r, c).sum())
        n += len(r)
    return {"token_agreement": _mean(same, n), "logit_cosine": _mean(cos, n)}


def _best_spans(start: np.ndarray, end: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(batch, 2) best (start, end) with start <= end < start + MAX_ANSWER_TOKENS, inside the mask."""
    seq = start.shape[-1]
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    valid = (j >= i) & (j - i < MAX_ANSWER_TOKENS)
    valid = np.broadcast_to(valid, (len(start), seq, seq))
    if mask is not None:
        valid = valid & mask[:, :, None] & mask[:, None, :]
    score = np.where(valid, start[:, :, None].astype(np.float64) + end[:, None, :], -np.inf)
    flat = score.reshape(len(start), -1).argmax(-1)
    return np.stack([flat // seq, flat % seq], -1)


def _question_answering(
    ref: Outputs, cand: Outputs, names: tuple[str, ...], masks: _Masks, **_unused: Any
) -> dict[str, Measured]:
    if len(names) < 2:
        raise D2VError(f"question-answering needs start and end logits, got outputs: {', '.join(names)}")
    s_name, e_name = ("start_logits", "end_logits") if {"start_logits", "end_logits"} <= set(names) else names[:2]
    span = st = en = n = 0
    for (i, rs, cs), (_, re_, ce) in zip(_pairs(ref, cand, s_name), _pairs(ref, cand, e_name)):
        rs, cs, re_, ce = (x.reshape(-1, x.shape[-1]) for x in (rs, cs, re_, ce))
        m = masks.get(i, rs.shape)
        span += int((_best_spans(rs, re_, m) == _best_spans(cs, ce, m)).all(-1).sum())
        st += int((rs.argmax(-1) == cs.argmax(-1)).sum())
        en += int((re_.argmax(-1) == ce.argmax(-1)).sum())
        n += len(rs)
    return {"span_exact_match": Count(span, n), "start_agreement": Count(st, n), "end_agreement": Count(en, n)}


def _language_model(
    ref: Outputs, cand: Outputs, names: tuple[str, ...], masks: _Masks, **_unused: Any
) -> dict[str, float]:
    same = n = 0
    kl = 0.0
    for i, a, b in _pairs(ref, cand, names[0]):
        m = masks.get(i, a.shape[:2])
        r, c = _rows(a, m), _rows(b, m)
        same += int((r.argmax(-1) == c.argmax(-1)).sum())
        kl += _kl_sum(r, c)
        n += len(r)
    return {"top1_token_agreement": _mean(same, n), "kl_divergence": max(0.0, kl / n) if n else 0.0}


def _segmentation(ref: Outputs, cand: Outputs, names: tuple[str, ...], **_unused: Any) -> dict[str, float]:
    same = n = 0
    classes = _get(ref[0], names[0], 0, "reference").shape[1]
    inter = union = np.zeros(classes, dtype=np.int64)
    for _, a, b in _pairs(ref, cand, names[0]):
        r, c = a.argmax(1).ravel(), b.argmax(1).ravel()
        eq = r == c
        same, n = same + int(eq.sum()), n + r.size
        i_ = np.bincount(r[eq], minlength=classes)
        inter, union = inter + i_, union + np.bincount(r, minlength=classes) + np.bincount(c, minlength=classes) - i_
    present = union > 0
    miou = float((inter[present] / union[present]).mean()) if present.any() else 1.0
    return {"pixel_agreement": _mean(same, n), "miou": miou}


def _embedding(ref: Outputs, cand: Outputs, names: tuple[str, ...], masks: _Masks, **_unused: Any) -> dict[str, float]:
    means: list[float] = []
    worst = 1.0
    for name in names:
        items: list[np.ndarray] = []
        for i, a, b in _pairs(ref, cand, name):
            if a.ndim >= 3:  # (batch, tokens, hidden): mean over tokens of the per-token cosine
                m = masks.get(i, a.shape[:2])
                cos = _cosine(a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1))
                if m is None:
                    items.append(cos.mean(-1))
                else:
                    items.append(np.where(m, cos, 0.0).sum(-1) / np.maximum(m.sum(-1), 1))
            else:
                items.append(_cosine(a.reshape(len(a), -1), b.reshape(len(b), -1)))
        per_item = np.concatenate(items) if items else np.ones(1)
        means.append(float(per_item.mean()))
        worst = min(worst, float(per_item.min()))
    return {"embedding_cosine": min(means, default=1.0), "min_cosine": worst}


_KINDS: dict[str, Callable[..., Mapping[str, Measured]]] = {
    "classification": _classification,
    "ctc": _ctc,
    "token-classification": _token_classification,
    "question-answering": _question_answering,
    "language-model": _language_model,
    "segmentation": _segmentation,
    "embedding": _embedding,
}


def compute_with_evidence(
    kind: str,
    reference: list[dict[str, np.ndarray]],
    candidate: list[dict[str, np.ndarray]],
    *,
    output_names: tuple[str, ...],
    labels: list[Any] | None = None,
    id2char: dict[int, str] | None = None,
    attention_masks: list[np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, Count | Paired]]:
    """Drift metrics of ``kind`` (a ``Head.metric``) plus max/mean absolute error over ``output_names``.

    ``labels``: one per batch row (class ids, or transcripts for ctc). ``attention_masks``: one
    (batch, seq) array per sample; positions where it is 0 are skipped (for fill-mask, pass the
    mask-token positions). A mask whose shape is not the output's (batch, seq) is ignored.
    Returns (values, the counts behind the values that count answers: for ``judge``'s confidence bounds).
    """
    if kind not in _KINDS:
        raise D2VError(f"unknown metric kind '{kind}'; choose one of: {', '.join(_KINDS)}")
    if not reference or len(reference) != len(candidate):
        raise D2VError(
            f"need the same, non-zero number of samples: reference {len(reference)}, candidate {len(candidate)}"
        )
    if not output_names:
        raise D2VError("no output names to compare; pass the head's outputs")
    worst, total, count = 0.0, 0.0, 0
    for name in output_names:
        for _, a, b in _pairs(reference, candidate, name):
            d = np.abs(np.subtract(a, b, dtype=np.result_type(a, b, np.float32)))
            if d.size:
                m = float(d.max())  # NaN propagates and then sticks
                worst = m if math.isnan(m) or m > worst else worst
                total += float(d.sum(dtype=np.float64))
                count += d.size
    measured = _KINDS[kind](
        reference,
        candidate,
        names=tuple(output_names),
        labels=labels,
        id2char=id2char,
        masks=_Masks(attention_masks, len(reference)),
    )
    values = {"max_abs_error": worst, "mean_abs_error": total / count if count else 0.0} | {
        k: _value(m) for k, m in measured.items()
    }
    return values, {k: m for k, m in measured.items() if isinstance(m, (Count, Paired))}


def compute(
    kind: str, reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]], **options: Any
) -> dict[str, float]:
    """The values of ``compute_with_evidence`` (same arguments) without the counts behind them."""
    return compute_with_evidence(kind, reference, candidate, **options)[0]


# The one number per task that fallback and accuracy control optimize (a CTC transcript is judged by
# its character error rate, everything else by agreement with the reference).
PRIMARY: dict[str, str] = {
    "classification": "top1_agreement",
    "ctc": "cer",
    "token-classification": "token_agreement",
    "question-answering": "span_exact_match",
    "language-model": "top1_token_agreement",
    "segmentation": "pixel_agreement",
    "embedding": "embedding_cosine",
}


def primary_score(
    kind: str,
    reference: list[dict[str, np.ndarray]],
    candidate: list[dict[str, np.ndarray]],
    *,
    output_names: tuple[str, ...],
    id2char: dict[int, str] | None = None,
) -> float:
    """The task's primary metric as a score: higher is better, 1.0 = identical to the reference."""
    name = PRIMARY[kind]
    value = float(compute(kind, reference, candidate, output_names=output_names, id2char=id2char)[name])
    return value if METRICS[name].higher_is_better else 1.0 - value


def allowed_drop(kind: str, budget: dict[str, float]) -> float:
    """How far the primary score may fall below 1.0 under ``budget`` (1 % when the budget does not name it)."""
    name = PRIMARY[kind]
    limit = budget.get(name)
    if limit is None:
        return 0.01
    return max(0.0, 1.0 - limit) if METRICS[name].higher_is_better else max(0.0, limit)


# ---------------------------------------------------------------------------------- drift score


def drift_score(drift: Mapping[str, Any] | None) -> float | None:
    """One number per variant for plots and the Pareto front: the share of the drift budget used.

    For each budget metric: an upper bound (errors) gives value / limit; a lower bound (agreement,
    cosine, at most 1) gives (1 - value) / (1 - limit). The score is the largest: 0 is identical to
    the reference, 1 is exactly at the budget, above 1 is over it. None when nothing is measured.
    """
    if not drift:
        return None
    metrics = drift.get("metrics") or {}
    budget = drift.get("budget") or {}
    worst: float | None = None
    for name, limit in budget.items():
        value = metrics.get(name)
        if limit is None:
            continue
        if value is None:
            if name in (drift.get("failed") or ()):
                return math.inf  # measured but not finite: over budget
            continue  # not measured (e.g. accuracy without labels): metrics.judge ignores it too
        higher = METRICS[name].higher_is_better if name in METRICS else False
        if higher:
            room = 1.0 - float(limit)
            used = (1.0 - float(value)) / room if room > 0 else (0.0 if value >= limit else math.inf)
        else:
            used = float(value) / float(limit) if limit > 0 else (0.0 if value <= 0 else math.inf)
        used = max(0.0, used)
        worst = used if worst is None else max(worst, used)
    return worst
