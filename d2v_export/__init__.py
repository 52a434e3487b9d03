"""d2v-export: export, quantize, compile and validate Data2Vec models."""

import os as _os

__version__ = "0.1.0"

# PyTorch's OpenMP threads busy-wait after each call and fight the runtimes' threads when the reference
# and the artifacts are timed round-robin in one process (measured on tiny text, 2 cores: OpenVINO
# 0.17 ms alone, 3.8 ms interleaved with active waiting, 0.25 ms with passive). libgomp reads this when
# torch loads, so it is set here, before any torch import; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
