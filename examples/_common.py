"""Helpers shared by the example training scripts: seeding, argument defaults, bookkeeping.

Not part of the d2v_export package; the scripts import it as a sibling module.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def parser(description: str, default_output: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=HERE / "out" / default_output,
        help=f"checkpoint folder (default examples/out/{default_output}); replaced if it exists",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation, shuffling and augmentation")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, fixed so that results repeat (1: on a shared 2-core machine a second thread mostly spins)",
    )
    p.add_argument("--quick", action="store_true", help="a handful of steps on a tiny subset (smoke test)")
    return p


def seed_everything(seed: int, threads: int) -> None:
    """Same seed + same thread count + same machine -> the same weights, bit for bit."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fresh_dir(path: Path) -> Path:
    import shutil

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """training.json; wall times on a shared machine mean little, so the CPU time and load go in too."""
    meta = dict(meta, cpu_seconds=round(time.process_time(), 1), load_average_1min=round(os.getloadavg()[0], 2))
    (Path(folder) / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 1)


_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[example {time.perf_counter() - _START:6.1f}s cpu {time.process_time():6.1f}s] {msg}", flush=True)


def check_loads(folder: Path, modality: str) -> Any:
    """Load the saved checkpoint the way d2v-export does; fail loudly if it cannot."""
    from d2v_export.models import load, parse_source
    from d2v_export.spec import Modality

    model = load(parse_source(str(folder), Modality(modality), None))
    if model.warnings:
        raise SystemExit(f"d2v_export loads {folder} with warnings: {model.warnings}")
    return model


def reader_accuracy(model: Any, path: Path) -> tuple[float, int]:
    """Accuracy of a loaded checkpoint on `path` read exactly as `d2v-export --eval path` reads it.

    Uses the package's own sample reader (its tokenizer/processor, bucketing and label parsing) and
    its label mapping, so a label the tool could not use fails here instead of in the fidelity run.
    """
    import torch

    from d2v_export.calibration import load_samples
    from d2v_export.pipeline import ShapeRequest, resolve_profile
    from d2v_export.convert.validate import usable_labels_for

    samples = load_samples(
        Path(path), model, resolve_profile(model, ShapeRequest()), split="evaluation", count=None, seed=0
    )
    if samples.skipped:
        raise SystemExit(f"d2v-export skips {len(samples.skipped)} of {path}: {samples.skipped[:3]}")
    labels = usable_labels_for(model, samples.labels)
    if labels is None:
        raise SystemExit(
            f"d2v-export finds no usable labels in {path} (got {samples.labels[:3] if samples.labels else None})"
        )
    right = 0
    with torch.no_grad():
        for feed, y in zip(samples.feeds, labels, strict=True):
            assert isinstance(y, int)
            logits = model.module(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
            right += int(int(logits.argmax(-1)[0]) == int(y))
    return right / len(labels), len(labels)
