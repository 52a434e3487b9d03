"""Padded batches give the answers single inputs give (issue 24 part 2), on every target and precision built here.

``validate.padding_check`` runs a batch of 3 inputs of different lengths, padded to the longest with the mask
(text: tokens; audio: samples, which the model reduces to a frame-level mask), and each input alone at its own length,
through one runner, and compares each row on its valid positions (tokens, or the frames of the row's own samples). fp32
holds within the export check's tolerance on every target; INT8 within the bounds below (docs/bundles.md "Padding and
masks" says why they are wider). Every audio head is checked on ONNX Runtime fp32 (each pools or reads frames its own
way); the speech recognition head on every target and precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export import backends
from d2v_export.backends.base import BuildRequest, PlanContext
from d2v_export.calibration import load_samples
from d2v_export.convert.export import export
from d2v_export.heads import HEADS, Head, audio_mask_note, head_for
from d2v_export.int8.quantize import make_recipe
from d2v_export.spec import Modality, Precision
from d2v_export.convert.validate import padding_check, shape_check

from .conftest import tiny

TEXT = head_for(Modality.TEXT, "token-classification")  # outputs per position: only the valid ones compare
AUDIO = head_for(Modality.AUDIO, "automatic-speech-recognition")
AUDIO_HEADS = [h for h in HEADS if h.modality is Modality.AUDIO]

# (target, mode): what the tool ships. None: fp32.
BUILDS: list[tuple[str, str | None]] = [
    ("onnxruntime", None),
    ("onnxruntime", "static"),
    ("onnxruntime", "dynamic"),
    ("openvino", None),
    ("openvino", "static"),
    ("tensorrt", "static"),
]
# The padded-vs-alone scaled difference an INT8 build is held to. Static INT8 has fixed scales: rows stay independent,
# within the export check's tolerance (measured: 0 on ORT, OpenVINO and the TensorRT simulation). Dynamic INT8
# computes each activation scale over the whole batch, so other rows change a row: measured 0.003 (text) and 0.019
# (audio, equal lengths) scaled; held to 0.05 (docs/bundles.md "Padding and masks").
DYNAMIC_BOUND = 0.05


def _available(target: str) -> None:
    if not backends.get(target).available():
        pytest.skip(f"{target} is not installed here")


class Built:
    """Tiny exports and their builds, made once per module."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, {}  # type: ignore[var-annotated]

    def graph(self, head: Head) -> Any:
        if head.key not in self.made:
            model, profile = tiny(head)
            graph = export(model, profile, self.root / head.key.replace("/", "-") / "fp32" / "model.onnx")
            feeds = tuple(load_samples(None, model, profile, split="calibration", count=6).feeds)
            self.made[head.key] = (model, profile, graph, feeds)
        return self.made[head.key]

    def artifact(self, head: Head, target: str, mode: str | None) -> Any:
        key = (head.key, target, mode)
        if key not in self.made:
            model, _, graph, feeds = self.graph(head)
            backend = backends.get(target)
            request = BuildRequest()
            if mode is not None:
                recipe = make_recipe(backend, mode, samples=len(feeds), modality=head.modality.value)
                request = backend.request(
                    PlanContext(defer_build=True), precision=Precision.INT8, quant=recipe, calibration=feeds, threads=2
                )
            self.made[key] = backend.compile(
                graph, self.root / f"{head.key.replace('/', '-')}-{target}-{mode}", request
            )
        return self.made[key]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("padding"))


@pytest.mark.parametrize("head", [TEXT, AUDIO], ids=lambda h: h.key)
@pytest.mark.parametrize("target,mode", BUILDS, ids=lambda x: str(x))
def test_padded_batch_equals_each_input_alone(head: Head, target: str, mode: str | None, built: Built) -> None:
    _available(target)
    model, profile, _, _ = built.graph(head)
    artifact = built.artifact(head, target, mode)
    with backends.get(target).runner(artifact, threads=2) as runner:
        result = padding_check(model, runner.infer, profile)
    assert result is not None
    print(f"{head.key} {target} {mode or 'fp32'}: {result.describe()}")
    assert len(set(result.lengths)) == 3, result.lengths  # three lengths: rows 2 and 3 are padded
    if head.modality is Modality.AUDIO:
        assert result.frames == (49, 33, 24), result.frames  # the frame-level mask: (n - 400) // 320 + 1
    bound = DYNAMIC_BOUND if mode == "dynamic" else head.tolerance
    assert result.error <= bound, result.describe()


@pytest.mark.parametrize("head", AUDIO_HEADS, ids=lambda h: h.key)
def test_every_audio_head_pads_exactly(head: Head, built: Built) -> None:
    """Each audio head reads the frame mask its own way (frames, mean pooling, x-vector statistics): all hold."""
    model, profile, graph, _ = built.graph(head)
    assert [t.name for t in graph.inputs] == ["input_values", "attention_mask"]
    assert graph.check.passed and graph.check.metrics["padding_scaled_error"] <= head.tolerance, graph.check.detail
    assert graph.check.detail.startswith("padded batch of 3 (lengths 16000, 10666, 8000 samples = 49, 33, 24 frames;")
    with backends.get("onnxruntime").runner(built.artifact(head, "onnxruntime", None), threads=2) as runner:
        result = padding_check(model, runner.infer, profile)
    assert result is not None and result.error <= head.tolerance, result.describe()
    print(f"{head.key} onnxruntime fp32: {result.describe()}")


def test_audio_check_fails_when_the_mask_is_dropped(built: Built) -> None:
    """Audio zero-padded without a mask is not the clip alone (the zeros are heard as sound): the check sees it."""
    model, profile, _, _ = built.graph(AUDIO)
    with backends.get("onnxruntime").runner(built.artifact(AUDIO, "onnxruntime", None), threads=2) as runner:

        def without_mask(feed: Any) -> Any:
            return runner.infer(dict(feed, attention_mask=np.ones_like(feed["attention_mask"])))

        broken = padding_check(model, without_mask, profile)
    assert broken is not None and broken.error > 100 * model.head.tolerance, broken.describe()


def test_transformers_own_batched_audio_forward_leaks_padding() -> None:
    """Why the reference re-zeroes padded frames in the positional convolutions (torch_ref.mask_positional_convolutions):
    transformers' own module, given the mask, still moves a padded row's last frames; the swapped module does not."""
    import torch

    from d2v_export.backends.torch_ref import make_wrapper
    from d2v_export.models import load, parse_source

    lengths = (16000, 10666)
    rng = np.random.default_rng(0)
    values = torch.tensor(0.1 * rng.standard_normal((2, lengths[0])), dtype=torch.float32)
    values[1, lengths[1] :] = 0.0
    mask = torch.ones(2, lengths[0], dtype=torch.long)
    mask[1, lengths[1] :] = 0

    def gap(module: Any) -> float:
        with torch.inference_mode():
            both = module(input_values=values, attention_mask=mask).logits[1]
            alone = module(input_values=values[1:, : lengths[1]], attention_mask=mask[1:, : lengths[1]]).logits[0]
        return float((both[: alone.shape[0]] - alone).abs().max())

    model = load(parse_source("preset:tiny", Modality.AUDIO, AUDIO.task))
    plain = gap(model.module.eval())
    print(f"transformers batched vs alone: {plain:.3g}")
    make_wrapper(model)  # swaps the positional convolution stack in place
    assert plain > 0.01 and gap(model.module) < 1e-5, (plain, gap(model.module))


def test_a_checkpoint_without_a_mask_is_warned_about() -> None:
    from types import SimpleNamespace

    layer = SimpleNamespace(feat_extract_norm="layer")
    assert audio_mask_note(layer, SimpleNamespace(return_attention_mask=True)) is None
    assert "return_attention_mask=False" in (audio_mask_note(layer, SimpleNamespace(return_attention_mask=False)) or "")
    assert "feat_extract_norm='group'" in (audio_mask_note(SimpleNamespace(feat_extract_norm="group"), None) or "")


def test_the_check_fails_clearly_when_the_mask_is_dropped(built: Built) -> None:
    """The export check names the padded batch when the runtime ignores the mask: a Drift that fails, no exception."""
    model, profile, graph, _ = built.graph(TEXT)
    with backends.get("onnxruntime").runner(built.artifact(TEXT, "onnxruntime", None), threads=2) as runner:

        def without_mask(feed: Any) -> Any:
            return runner.infer(dict(feed, attention_mask=np.ones_like(feed["attention_mask"])))

        broken = padding_check(model, without_mask, profile)
        assert broken is not None and broken.error > model.head.tolerance, broken.describe()
        drift = shape_check(model, _reference(model), without_mask, profile, reference_outputs={})
    assert not drift.passed and "padding_scaled_error" in drift.failed
    assert drift.detail.startswith("padded batch of 3 (lengths 16, 10, 8; padded to the longest with the mask)"), (
        drift.detail
    )


def test_the_check_fails_when_padded_positions_are_compared(built: Built) -> None:
    """Comparing the padded positions too (what the check must not do) makes even fp32 fail: the slice is needed."""
    model, profile, _, _ = built.graph(TEXT)
    with backends.get("onnxruntime").runner(built.artifact(TEXT, "onnxruntime", None), threads=2) as runner:

        def alone_padded_to_the_longest(feed: Any) -> Any:
            n, longest = feed["input_ids"].shape[-1], 16
            if feed["input_ids"].shape[0] != 1 or n == longest:
                return runner.infer(feed)
            ids = np.pad(feed["input_ids"], ((0, 0), (0, longest - n)), constant_values=model.config.pad_token_id)
            return runner.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})

        result = padding_check(model, alone_padded_to_the_longest, profile)
    assert result is not None and result.error > model.head.tolerance, result.describe()


def _reference(model: Any) -> Any:
    from d2v_export.convert.export import make_wrapper

    return make_wrapper(model)


def test_bundle_readme_says_which_inputs_take_a_mask() -> None:
    from d2v_export.deploy.bundle import _padding_lines

    masked = [{"name": "input_values"}, {"name": "attention_mask"}]
    text = "\n".join(_padding_lines({"name": "onnxruntime-int8-dynamic", "model": {"modality": "text"}}))
    audio = "\n".join(_padding_lines({"name": "openvino-fp32", "model": {"modality": "audio"}, "inputs": masked}))
    old_audio = "\n".join(
        _padding_lines({"name": "openvino-fp32", "model": {"modality": "audio"}, "inputs": masked[:1]})
    )
    assert "pad id" in text and "`attention_mask`" in text and "whole batch" in text
    assert (
        "`input_values` and `attention_mask`" in audio
        and "frame-level mask" in audio
        and "`padding_value` 0.0" in audio
    )
    assert "whole batch" not in audio and "equals its answer alone" in audio
    assert "no attention mask" in old_audio
