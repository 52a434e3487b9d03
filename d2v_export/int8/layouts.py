"""Exact export-time layouts: PyTorch modules swapped, for the export only, for equivalent ones whose
ONNX graph runs faster.

Three layouts today.

**Audio: the feature encoder, time-major.** In transformers, Data2Vec audio's feature encoder is seven strided
1-D convolutions over [batch, channels, time], each followed by a LayerNorm over channels between two
transposes and a GELU. Exported as is, ONNX Runtime runs those convolutions through its slow int8
convolution kernels (ConvInteger / QLinearConv) and every layer pays two transposes. Time-major, each
convolution after the first is one MatMul over [batch, time, kernel × channels] frames (strided
whole strides as contiguous slices reshaped, the taps past them as strided slices), the LayerNorm is an
ordinary last-axis one, and no transposes remain inside the encoder. The first convolution too: the raw
waveform is one channel, so its windows are the signal reshaped into strides (kernel 10 = two strides
of 5); its MatMul stays float in the INT8 recipes (the layer that reads the raw input).

Measured on audio base, batch 1, 1 s, 2 threads (2-core AMD EPYC, AVX-512 VNNI, loaded
machine, fastest of 40 interleaved runs): ONNX Runtime static INT8 167 → 71 ms, dynamic INT8 178 →
77 ms, fp32 354 → 270 ms; OpenVINO static INT8 unchanged within noise (docs/PERFORMANCE.md).

**Text: the last layer for the first token only.** Sequence classification and multiple choice read
only the first token (``<s>``) of the last layer: its classification head takes ``features[:, 0]``,
the pooler ``hidden[:, 0]``. So the last layer needs keys and values for every token but its query,
attention output, LayerNorms and feed-forward block for the first token only: 10 of its 12
hidden² products per token are skipped, ~7 % of the model's matmul work at 128 tokens. The layer's
own modules compute it with transformers' eager attention (the one d2v-export loads models with);
only the shapes change.

**Vision image classification: the last feed-forward output projection after the pooling.** With mean
pooling (every released Data2Vec vision classifier), the head reads LayerNorm(mean of the last layer's patch
tokens) only. The last layer adds ``lambda_2 * (W2 g_t + b2)`` to each token ``t``; the mean of that over the
patch tokens is ``lambda_2 * (W2 mean(g) + b2)``, so W2 runs once on the mean instead of on 196 tokens (one of
the model's 36 big products per token, ~2.8 % of its matmul work at 224 px). Token values other than the patch
mean are no longer those of the original layer, which is why only this head, whose sole output is the logits,
gets it.

Same products and sums in another order (or fewer rows of them): ``export.export`` checks the exported
graph against the *original* module at several shapes (the head's tolerance), so a layout can never
change what a model computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

ENCODER_CLASS = "Data2VecAudioFeatureEncoder"
TIME_MAJOR = "audio feature encoder time-major (its convolutions as MatMul)"
FIRST_TOKEN = "last layer for the first token only (the head reads no other)"
MEAN_POOLED = "last feed-forward output projection after the mean pooling (the head reads only the patch-token mean)"
# heads whose outputs read only the first token of the last layer
FIRST_TOKEN_HEADS = ("Data2VecTextForSequenceClassification", "Data2VecTextForMultipleChoice")


def _plain_conv(layer: Any) -> bool:
    conv = getattr(layer, "conv", None)
    return (
        conv is not None
        and hasattr(layer, "layer_norm")
        and hasattr(layer, "activation")
        and conv.groups == 1
        and tuple(conv.padding) == (0,)
        and tuple(conv.dilation) == (1,)
        and conv.padding_mode == "zeros"
    )


def _frames(hidden: Any, kernel: int, stride: int) -> Any:
    """[batch, time, channels] -> [batch, steps, kernel × channels]: the windows a strided convolution reads, tap
    major. Whole strides are contiguous slices reshaped (no copy per tap); only the taps past the last whole stride
    (kernel % stride of them) are strided slices."""
    import torch

    batch, channels = hidden.shape[0], hidden.shape[2]
    steps = (hidden.shape[1] - kernel) // stride + 1
    whole, rest = divmod(kernel, stride)
    pieces = [
        hidden[:, j * stride : j * stride + steps * stride].reshape(batch, steps, stride * channels)
        for j in range(whole)
    ]
    first = whole * stride
    pieces += [hidden[:, first + i : first + i + stride * (steps - 1) + 1 : stride] for i in range(rest)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


def _time_major_encoder(encoder: Any) -> Any:
    """A module computing what ``encoder`` (a Data2VecAudioFeatureEncoder) computes, time-major from the waveform on."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, conv_layer: Any) -> None:
            super().__init__()
            conv = conv_layer.conv
            out_ch, in_ch, kernel = conv.weight.shape
            self.kernel, self.stride = int(kernel), int(conv.stride[0])
            self.linear = nn.Linear(in_ch * kernel, out_ch, bias=conv.bias is not None)
            with torch.no_grad():  # frame layout: kernel tap major, channel minor
                self.linear.weight.copy_(conv.weight.permute(0, 2, 1).reshape(out_ch, kernel * in_ch))
                if conv.bias is not None:
                    self.linear.bias.copy_(conv.bias)
            self.layer_norm = conv_layer.layer_norm
            self.activation = conv_layer.activation

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, time, channels]
            return self.activation(self.layer_norm(self.linear(_frames(hidden, self.kernel, self.stride))))

    class TimeMajorEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer(layer) for layer in encoder.conv_layers)

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            hidden = input_values[:, :, None]  # the waveform: one channel, already time-major
            for layer in self.layers:
                hidden = layer(hidden)
            return hidden.transpose(1, 2)  # the caller's layout: [batch, channels, time]

    return TimeMajorEncoder().eval()


def _first_token_layer(layer: Any) -> Any:
    """A module computing ``layer``'s (a Data2VecTextLayer's, eager attention) output for the first token only."""
    import torch
    from torch import nn

    import transformers

    attention = layer.attention.self
    width = attention.attention_head_size
    tuple_outputs = int(transformers.__version__.split(".")[0]) < 5  # transformers 4.x layers return (hidden, ...)

    class FirstTokenLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = layer

        def forward(self, hidden_states: Any, attention_mask: Any = None, *_args: Any, **_kwargs: Any) -> Any:
            batch, tokens = hidden_states.shape[0], hidden_states.shape[1]
            first = hidden_states[:, :1]
            query = attention.query(first).view(batch, 1, -1, width).transpose(1, 2)
            key = attention.key(hidden_states).view(batch, tokens, -1, width).transpose(1, 2)
            value = attention.value(hidden_states).view(batch, tokens, -1, width).transpose(1, 2)
            scores = torch.matmul(query, key.transpose(2, 3)) * (width**-0.5)  # transformers' eager attention
            if attention_mask is not None:
                mask = attention_mask[:, :, :1] if attention_mask.dim() == 4 else attention_mask
                scores = (
                    scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                    if mask.dtype == torch.bool
                    else scores + mask
                )
            context = torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2).reshape(batch, 1, -1)
            output = layer.feed_forward_chunk(layer.attention.output(context, first))
            return (output,) if tuple_outputs else output

    return FirstTokenLayer().eval()


def _pooled_output(output: Any) -> Any:
    """A module standing in for the last vision layer's feed-forward output projection (a Data2VecVisionOutput) whose
    result, added to every token, leaves the mean of the patch tokens exactly as it was: the projection is linear, so
    it is applied once to the mean of its inputs over the patch tokens instead of to every token."""
    from torch import nn

    class PooledOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = output.dense

        def forward(self, hidden_states: Any) -> Any:  # [batch, tokens, intermediate] -> [batch, 1, hidden]
            return self.dense(hidden_states[:, 1:].mean(1, keepdim=True))

    return PooledOutput().eval()


def _reads_patch_mean_only(module: Any) -> bool:
    """Image classification with mean pooling: the head reads LayerNorm(mean of the last layer's patch tokens) only."""
    inner: Any = getattr(module, "data2vec_vision", None)
    pooler = getattr(inner, "pooler", None)
    return (
        type(module).__name__ == "Data2VecVisionForImageClassification"
        and inner is not None
        and pooler is not None
        and getattr(pooler, "layernorm", None) is not None
        and type(getattr(inner, "layernorm", None)).__name__ == "Identity"
        and type(getattr(inner.encoder.layer[-1], "output", None)).__name__ == "Data2VecVisionOutput"
    )


Swap = tuple[Any, str, Any, Callable[[Any], Any], str]


def _swaps(module: Any) -> list[Swap]:
    """(parent, attribute, original, replacement factory, description) for every layout that applies."""
    found: list[Swap] = []
    for name, child in list(module.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        kind = type(child).__name__
        if kind == ENCODER_CLASS and len(child.conv_layers) > 1 and all(map(_plain_conv, child.conv_layers)):
            found.append((parent, attr, child, _time_major_encoder, TIME_MAJOR))
        if (
            kind == "Data2VecTextEncoder"
            and type(module).__name__ in FIRST_TOKEN_HEADS
            and not child.config.is_decoder
            and child.config._attn_implementation == "eager"
        ):
            found.append((child.layer, str(len(child.layer) - 1), child.layer[-1], _first_token_layer, FIRST_TOKEN))
    if _reads_patch_mean_only(module):
        last = module.data2vec_vision.encoder.layer[-1]
        found.append((last, "output", last.output, _pooled_output, MEAN_POOLED))
    return found


@contextlib.contextmanager
def export_layouts(module: Any) -> Iterator[tuple[str, ...]]:
    """Swap in the faster equivalent modules for the duration of an export; yields what was applied."""
    swaps = _swaps(module)
    try:
        for parent, attr, child, make, _what in swaps:
            setattr(parent, attr, make(child))
        yield tuple(what for *_rest, what in swaps)
    finally:
        for parent, attr, child, _make, _what in swaps:
            setattr(parent, attr, child)
