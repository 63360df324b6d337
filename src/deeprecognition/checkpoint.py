"""One dict per checkpoint, in `state.pt` beside `config.json`; loading never runs code.

A state holds tensors, numbers, strings and plain containers only, so `torch.load(...,
weights_only=True)` reads it back: a checkpoint from shared storage cannot execute anything.
"""

from __future__ import annotations

import io
import json
import os
import random
from typing import Any

import torch

from deeprecognition import storage
from deeprecognition.errors import InputError

STATE = "state.pt"
CONFIG = "config.json"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(folder: str, state: dict[str, Any]) -> None:
    """state.pt and config.json into a local folder (Ray Train uploads it to the run's storage)."""
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, STATE))
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(state["config"], f, indent=1)


def load_state(checkpoint: str) -> dict[str, Any]:
    """The state dict of a checkpoint folder, local or s3://, refusing anything but plain data."""
    uri = storage.join(checkpoint, STATE)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(uri, "not found: a checkpoint folder holds state.pt and config.json") from None
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler's refusal comes in several types
        raise InputError(uri, f"refused: not a plain-data checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
