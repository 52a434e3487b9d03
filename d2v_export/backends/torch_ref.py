"""The fp32 PyTorch reference: what every artifact is compared with, and timed beside.

``make_wrapper`` gives the eval-mode module with named inputs that the exporter traces and every
check runs; ``torch_forward`` runs it once; ``TorchRunner`` is the same as a ``Runner``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..spec import REFERENCE, Modality
from .base import RunnerBase

if TYPE_CHECKING:
    from ..models import LoadedModel

NAME = REFERENCE


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

        def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return pick(self.inner(input_values=input_values, return_dict=True))

    cls: type[torch.nn.Module] = {Modality.VISION: VisionWrapper, Modality.TEXT: TextWrapper, Modality.AUDIO: AudioWrapper}[head.modality]
    return cls(model.module).eval()


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
