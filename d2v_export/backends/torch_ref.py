"""The fp32 PyTorch reference: what every artifact is compared with, and timed beside.

``make_wrapper`` gives the eval-mode module with named inputs that the exporter traces and every
check runs; ``torch_forward`` runs it once; ``TorchRunner`` is the same as a ``Runner``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, cast

import numpy as np

from ..spec import REFERENCE, Modality
from .base import RunnerBase

if TYPE_CHECKING:
    from ..models import LoadedModel

NAME = REFERENCE
DEVICE = "CPU"  # where the reference runs: the model is never moved off the CPU (report.json environment.device)


def make_wrapper(model: LoadedModel) -> Any:
    """An eval-mode module with named inputs that returns the head's outputs as a tuple."""
    import torch

    head = model.head

    def pick(out: Any) -> tuple[Any, ...]:
        return tuple(getattr(out, name) for name in head.outputs)

    class VisionWrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(pixel_values=pixel_values, return_dict=True))

    class TextWrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(input_ids=input_ids, attention_mask=attention_mask, return_dict=True))

    class AudioWrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(input_values=input_values, attention_mask=attention_mask, return_dict=True))

    cls: type[torch.nn.Module] = {
        Modality.VISION: VisionWrapper,
        Modality.TEXT: TextWrapper,
        Modality.AUDIO: AudioWrapper,
    }[head.modality]
    if head.modality is Modality.AUDIO:
        mask_positional_convolutions(model.module)
        integer_frame_lengths(model.module)
    return cls(model.module).eval()


POSITIONAL_CLASS = "Data2VecAudioPositionalConvEmbedding"


def mask_positional_convolutions(module: Any) -> bool:
    """Make each row of a padded audio batch what that row gives alone: re-zero the padded frames before every layer of
    the positional convolution stack. True when a stack was swapped (once; a second call finds it swapped).

    transformers zeroes the padded frames once, before the stack (``Data2VecAudioEncoder``), but Data2Vec audio's stack
    has ``num_conv_pos_embeddings`` layers (5 at base), each a convolution with a bias, a LayerNorm and a GELU: after
    the first, the padded frames are no longer zero and the next layers read them into the last valid frames (as far as
    ``(layers - 1) * (conv_pos_kernel_size // 2)`` frames back), and through attention into every frame. Alone, those
    frames read zeros (the convolution's own padding). Re-zeroing the padded frames before each layer gives them zeros in
    a batch too. The encoder leaves padded frames exactly zero and no real frame is all zeros (it is a LayerNorm and a
    Linear with a bias away from the audio), so the frames that are all zeros are the padded ones: no mask is needed.
    An input with no padding is computed exactly as before.
    """
    import torch

    class PaddingExactPositionalConv(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.layers = cast(torch.nn.ModuleList, inner.layers)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [batch, frames, hidden]
            keep = (hidden_states != 0).any(dim=-1).unsqueeze(1).to(hidden_states.dtype)  # [batch, 1, frames]
            hidden_states = hidden_states.transpose(1, 2)
            for layer in self.layers:
                hidden_states = layer(hidden_states * keep)
            return hidden_states.transpose(1, 2)

    swapped = False
    for parent in list(module.modules()):
        inner = getattr(parent, "pos_conv_embed", None)
        if inner is not None and type(inner).__name__ == POSITIONAL_CLASS:
            parent.pos_conv_embed = PaddingExactPositionalConv(inner)
            swapped = True
    return swapped


def integer_frame_lengths(module: Any) -> None:
    """Count the frames of a sample length (``_get_feat_extract_output_lengths``) in integers only, in every audio model
    of ``module``.

    transformers writes ``torch.div(length - kernel, stride, rounding_mode="floor")``, which the exporter turns into a
    cast to float, a division and a floor. A float32 runtime gets the right count; one that runs float parts in bf16 or
    fp16 (OpenVINO INT8's default on a CPU with AMX/BF16, TensorRT's fp16 remainder) rounds 15990 / 5 and counts frames
    that do not exist: OpenVINO then refuses the frame mask's ScatterND (an index out of range). ``//`` on integers
    exports as an integer Div with a sign correction: the same counts, exactly, at every precision.
    """
    for inner in list(module.modules()):
        if callable(getattr(type(inner), "_get_feat_extract_output_lengths", None)) and hasattr(inner, "config"):
            inner._get_feat_extract_output_lengths = _frame_lengths(inner.config)


def _frame_lengths(config: Any) -> Any:
    def lengths(input_lengths: Any, add_adapter: bool | None = None) -> Any:
        for kernel, stride in zip(config.conv_kernel, config.conv_stride):
            input_lengths = (input_lengths - kernel) // stride + 1
        if config.add_adapter if add_adapter is None else add_adapter:
            for _ in range(config.num_adapter_layers):
                input_lengths = (input_lengths - 1) // config.adapter_stride + 1
        return input_lengths

    return lengths


def torch_forward(wrapper: Any, feeds: Mapping[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One inference of ``wrapper`` (fp32 numpy in, fp32 numpy out, named)."""
    import torch

    with torch.inference_mode():
        out = wrapper(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return {name: t.detach().float().numpy() for name, t in zip(names, out)}


class TorchRunner(RunnerBase):
    def __init__(self, wrapper: Any, outputs: tuple[str, ...], threads: int) -> None:
        import torch

        self.name = NAME
        self.wrapper = wrapper.eval()
        self.outputs = outputs
        self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return torch_forward(self.wrapper, feed, self.outputs)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._previous_threads)


# --------------------------------------------------------------------------------------- offload


_OFFLOADED = "_d2v_offloaded"  # on a wrapper whose weights are on disk: the file they are in


def offload(wrapper: Any, path: Any) -> None:
    """Write the wrapper's parameters to ``path`` and free them; the next forward (or ``restore``) reads them back.

    Between the evaluation reference and the latency stage nothing runs PyTorch (every check reuses its
    outputs), so at large size its fp32 weights need not sit beside the builds' copies: the pipeline
    offloads them there. The parameters keep their identity (tied weights stay tied); each one's data
    becomes an empty tensor until restored. A forward on an offloaded wrapper restores it first, so a
    caller that does need PyTorch still gets the real model, only later.
    """
    import torch

    if getattr(wrapper, _OFFLOADED, None) is not None:
        return
    params = dict(wrapper.named_parameters())
    torch.save({name: p.detach() for name, p in params.items()}, str(path))
    for p in params.values():
        p.data = torch.empty(0, dtype=p.dtype)
    setattr(wrapper, _OFFLOADED, str(path))
    if not getattr(wrapper, "_d2v_restore_hook", None):
        wrapper._d2v_restore_hook = wrapper.register_forward_pre_hook(_restore_hook)


def _restore_hook(module: Any, _args: Any) -> None:
    restore(module)  # a pre-hook that returned a value would replace the forward's arguments


def restore(wrapper: Any) -> bool:
    """Read back what ``offload`` wrote (memory-mapped: the pages load as they are touched); False when not offloaded."""
    import torch

    path = getattr(wrapper, _OFFLOADED, None)
    if path is None:
        return False
    saved = torch.load(path, mmap=True, weights_only=True)
    for name, p in wrapper.named_parameters():
        p.data = saved[name]
    setattr(wrapper, _OFFLOADED, None)
    return True


def offloaded(wrapper: Any) -> bool:
    return getattr(wrapper, _OFFLOADED, None) is not None
