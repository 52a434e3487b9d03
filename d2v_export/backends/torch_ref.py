"""The fp32 PyTorch reference: what every artifact is compared with, and timed beside."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import RunnerBase

NAME = "pytorch-fp32"


class TorchRunner(RunnerBase):
    def __init__(self, wrapper: Any, outputs: tuple[str, ...], threads: int) -> None:
        import torch

        self.name = NAME
        self.wrapper = wrapper.eval()
        self.outputs = outputs
        self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.wrapper(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
        return {name: t.detach().float().numpy() for name, t in zip(self.outputs, out)}

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._previous_threads)
