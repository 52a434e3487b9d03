"""Whole recordings through an audio bundle: overlapping windows, the overlap's frames dropped, one stitched output.

The CTC chunking of transformers' ``AutomaticSpeechRecognitionPipeline`` (``chunk_length_s``,
``stride_length_s``), made frame-exact: the feature encoder's total stride (``hop``, 320 samples for
every Data2Vec audio checkpoint) divides every window start, so local frame ``j`` of the window that
starts at sample ``s`` is global frame ``s // hop + j``. Each window keeps only the frames of its middle
(``stride`` samples of context dropped on each side, none at the recording's ends), the kept frames tile
the recording exactly once, and a frame-level head (CTC logits, frame classes) is decoded once over the
concatenation — which has as many frames as the model run on the whole recording.

    plan = windows(len(values), window=160000, stride=26560)
    logits = stitch([run(values[w.start:w.stop])[0, w.keep_from:w.keep_to] for w in plan])

Arithmetic on sample counts plus one concatenation; ``d2v_export.deploy.predict`` runs it, the bundle README repeats it in a few lines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

HOP = 320  # samples per frame of the wav2vec2-style feature encoder: prod(conv_stride) = 5 * 2**6
RECEPTIVE = 400  # samples the first frame sees: its receptive field with conv_kernel (10, 3, 3, 3, 3, 2, 2)
# context dropped on each side of a window: transformers' default stride_length_s = chunk_length_s / 6
STRIDE_FRACTION = 1 / 6


@dataclass(frozen=True)
class Encoder:
    """The feature encoder's frame geometry."""

    hop: int = HOP
    receptive: int = RECEPTIVE

    def frames(self, samples: int) -> int:
        """Frames the encoder gives for ``samples`` input samples (``_get_feat_extract_output_lengths``)."""
        return 0 if samples < self.receptive else (samples - self.receptive) // self.hop + 1


def encoder_of(folder: Path) -> Encoder:
    """The frame geometry of a bundle's ``config.json`` (``conv_stride``, ``conv_kernel``); the default without one."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        strides, kernels = [int(s) for s in config["conv_stride"]], [int(k) for k in config["conv_kernel"]]
    except (OSError, ValueError, KeyError, TypeError):
        return Encoder()
    if len(strides) != len(kernels) or not strides or min(strides + kernels) < 1:
        return Encoder()
    receptive = 1
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        receptive = (receptive - 1) * stride + kernel
    return Encoder(math.prod(strides), receptive)


@dataclass(frozen=True)
class Window:
    """Samples ``[start, stop)`` of the recording; its local frames ``[keep_from, keep_to)`` are kept."""

    start: int
    stop: int
    keep_from: int
    keep_to: int


def sizes(longest: int, encoder: Encoder = Encoder()) -> tuple[int, int]:
    """(window, stride) in samples for a bundle whose longest input is ``longest``: the window is the longest
    input rounded down to whole frames, the stride ``STRIDE_FRACTION`` of it (whole frames, at least one)."""
    window = longest // encoder.hop * encoder.hop
    stride = max(encoder.hop, int(window * STRIDE_FRACTION) // encoder.hop * encoder.hop)
    if window - 2 * stride < encoder.hop:
        raise ValueError(f"a {longest}-sample longest input is too short to chunk with {stride}-sample strides")
    return window, stride


def windows(length: int, window: int, stride: int, encoder: Encoder = Encoder()) -> list[Window]:
    """Windows over a ``length``-sample recording whose kept frames tile ``encoder.frames(length)`` exactly once.

    Window ``i`` starts at ``i * step`` (``step = window - 2 * stride``, whole frames); the last one ends at
    the recording's end (its start rounded up to a whole frame, so it is at most ``window`` long) and keeps
    every frame after the previous window's last kept frame."""
    hop = encoder.hop
    if window % hop or stride % hop or window - 2 * stride < hop:
        raise ValueError(
            f"window {window} and stride {stride} must be whole frames ({hop} samples) with window > 2 * stride"
        )
    total = encoder.frames(length)
    if encoder.frames(window) < (window - stride) // hop:
        raise ValueError(
            f"stride {stride} is shorter than the encoder's receptive field ({encoder.receptive} samples) allows"
        )
    if length <= window:
        return [Window(0, length, 0, total)]
    step, margin = window - 2 * stride, stride // hop
    plan: list[Window] = []
    done = 0  # global frames kept so far
    start = 0
    while start + window < length:
        keep_to = start // hop + margin + step // hop
        plan.append(Window(start, start + window, done - start // hop, keep_to - start // hop))
        done, start = keep_to, start + step
    last = -(-(length - window) // hop) * hop
    plan.append(Window(last, length, done - last // hop, total - last // hop))
    return plan


def stitch(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The kept frames of every window, in order: (frames, ...) as if the recording had been run at once."""
    return np.concatenate(list(parts), axis=0)
