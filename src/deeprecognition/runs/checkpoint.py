"""One dict per checkpoint, in `state.pt` beside `config.json`; loading never runs code.

A state holds tensors, numbers, strings and plain containers only, so `torch.load(...,
weights_only=True)` reads it back: a checkpoint from shared storage cannot execute anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import torch

from deeprecognition import storage
from deeprecognition.errors import InputError

STATE = "state.pt"
CONFIG = "config.json"
METRICS = "metrics.json"
# sha256 and size of the files above, computed here before Ray uploads the folder: `deeprec
# checkpoints pull` checks the bytes it receives against what the trainer wrote, which S3's ETags
# cannot tell (Ray's pyarrow uploads are multipart, whose ETag is not a digest of the object).
CHECKSUMS = "checksums.json"


def write_checkpoint(folder: str, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """state.pt, config.json, metrics.json and their checksums.json into a local folder (Ray Train
    uploads it to the run's storage); metrics.json lets the best checkpoint be found without
    loading any state."""
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, STATE))
    for name, content in ((CONFIG, state["config"]), (METRICS, metrics)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=1)
    paths = {name: os.path.join(folder, name) for name in (STATE, CONFIG, METRICS)}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump(
            {name: {"bytes": os.path.getsize(p), "sha256": file_digest(p)} for name, p in paths.items()}, f, indent=1
        )


def incomplete_reason(files: dict[str, int], checksums: dict[str, Any] | None) -> str | None:
    """Why a checkpoint folder holding `files` ({name: bytes}) is not whole, or None when it is.

    Ray uploads a checkpoint's files one by one (on S3 each appears only complete, on a local
    disk it grows in place), so a killed upload leaves a folder with some of them, or a short one:
    whole means checksums.json is there and every file it lists has its listed size."""
    if checksums is None:
        return f"no readable {CHECKSUMS}: an interrupted upload (or not written by deeprec train)"
    for name, entry in sorted(checksums.items()):
        if name not in files:
            return f"{name} is missing: an interrupted upload"
        if files[name] != entry["bytes"]:
            return f"{name} is {files[name]} bytes, {CHECKSUMS} says {entry['bytes']}: an interrupted upload"
    return None


def read_checksums(folder: str) -> dict[str, Any] | None:
    """A checkpoint folder's checksums.json, or None when it is absent or cut short."""
    try:
        listed = json.loads(storage.read_bytes(storage.join(folder, CHECKSUMS)))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    well_formed = isinstance(listed, dict) and all(
        isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
        for e in listed.values()
    )
    return listed if well_formed else None


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a local file, read in 8 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_state(checkpoint: str) -> dict[str, Any]:
    """The state dict of a checkpoint folder, local or s3://, refusing anything but plain data."""
    uri = storage.join(checkpoint, STATE)
    raw = storage.read_required(uri, "a checkpoint folder holds state.pt and config.json")
    expected = (read_checksums(checkpoint) or {}).get(STATE)
    if expected and (len(raw) != expected["bytes"] or hashlib.sha256(raw).hexdigest() != expected["sha256"]):
        raise InputError(
            uri,
            f"refused: {len(raw)} bytes that do not match its {CHECKSUMS} (an interrupted upload, or a changed file)",
        )
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler's refusal comes in several types
        raise InputError(
            uri, f"refused: not a plain-data checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
