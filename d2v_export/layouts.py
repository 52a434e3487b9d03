"""Exact export-time layouts: PyTorch modules swapped, for the export only, for equivalent ones whose
ONNX graph runs faster.

The one layout today is Data2Vec audio's feature encoder. In transformers it is seven strided 1-D
convolutions over [batch, channels, time], each followed by a LayerNorm over channels between two
transposes and a GELU. Exported as is, ONNX Runtime runs those convolutions through its slow int8
convolution kernels (ConvInteger / QLinearConv) and every layer pays two transposes. Time-major, each
convolution after the first is one MatMul over [batch, time, kernel × channels] frames (strided
slices, or a plain reshape where kernel == stride), the LayerNorm is an ordinary last-axis one, and no
transposes remain inside the encoder. The first convolution (the raw waveform, one input channel, kept
float by the INT8 recipes) stays a convolution.

Same products and sums in another order: ``export.export`` checks the exported graph against the
*original* module at several shapes (the head's tolerance), so a layout can never change what a model
computes. Measured on audio base, batch 1, 1 s, 2 threads (2-core AMD EPYC, AVX-512 VNNI, loaded
machine, fastest of 40 interleaved runs): ONNX Runtime static INT8 167 → 71 ms, dynamic INT8 178 →
77 ms, fp32 354 → 270 ms; OpenVINO static INT8 unchanged within noise (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

ENCODER_CLASS = "Data2VecAudioFeatureEncoder"
TIME_MAJOR = "audio feature encoder time-major (its convolutions as MatMul)"


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


def _time_major_encoder(encoder: Any) -> Any:
    """A module computing what ``encoder`` (a Data2VecAudioFeatureEncoder) computes, time-major after its first layer."""
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
            k, s = self.kernel, self.stride
            steps = (hidden.shape[1] - k) // s + 1
            if k == s:
                frames = hidden[:, : steps * s].reshape(hidden.shape[0], steps, k * hidden.shape[2])
            else:
                frames = torch.cat([hidden[:, j : j + s * (steps - 1) + 1 : s] for j in range(k)], dim=-1)
            return self.activation(self.layer_norm(self.linear(frames)))

    class TimeMajorEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = encoder.conv_layers[0]
            self.layers = nn.ModuleList(Layer(layer) for layer in encoder.conv_layers[1:])

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            hidden = self.first(input_values[:, None]).transpose(1, 2)
            for layer in self.layers:
                hidden = layer(hidden)
            return hidden.transpose(1, 2)  # the caller's layout: [batch, channels, time]

    return TimeMajorEncoder().eval()


@contextlib.contextmanager
def export_layouts(module: Any) -> Iterator[tuple[str, ...]]:
    """Swap in the faster equivalent modules for the duration of an export; yields what was applied."""
    swaps = []
    for name, child in list(module.named_modules()):
        if type(child).__name__ != ENCODER_CLASS or len(child.conv_layers) < 2 or not all(map(_plain_conv, child.conv_layers[1:])):
            continue
        parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        attr = name.rpartition(".")[2]
        swaps.append((parent, attr, child))
    try:
        for parent, attr, child in swaps:
            setattr(parent, attr, _time_major_encoder(child))
        yield (TIME_MAJOR,) if swaps else ()
    finally:
        for parent, attr, child in swaps:
            setattr(parent, attr, child)
