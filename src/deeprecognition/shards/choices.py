"""The decode choice of a run's loader, importable without torch: the configs (and so
`deeprec --help`, which builds its flags from them) read it, and device_decode.py acts on it."""

from __future__ import annotations

from typing import Literal, get_args

# data.decode: JPEGs decoded by the loader's CPU workers, or on the training GPU.
Decode = Literal["cpu", "gpu"]
DECODES: tuple[str, ...] = get_args(Decode)
NEEDS_GPU = "data.decode=gpu needs scale.gpu=true (--gpu) and a CUDA device"
