"""One CelebA image and its labels -> the members of one WebDataset sample."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from deeprecognition.shards.tario import npy_bytes

# CelebA's aligned images are 178x218; a centre crop keeps the middle 178x178 square.
SQUASH, CENTER_CROP = "squash", "center-crop"


@dataclass(frozen=True, kw_only=True)
class ImageFormat:
    size: int = 128
    resize: str = SQUASH
    encoding: str = "jpg"
    quality: int = 95


def decode_source(data: bytes) -> Image.Image:
    """Decode a source JPEG fully (a truncated file fails here, not later in training)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def resize(img: Image.Image, fmt: ImageFormat) -> Image.Image:
    if fmt.resize == CENTER_CROP:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    # Bilinear with Pillow's antialiasing on downscale; the study squashed with Keras' default.
    return img.resize((fmt.size, fmt.size), Image.BILINEAR)


def encode_image(img: Image.Image, fmt: ImageFormat) -> bytes:
    if fmt.encoding == "npy":
        return npy_bytes(np.asarray(img, dtype=np.uint8))
    buf = io.BytesIO()
    if fmt.encoding == "jpg":
        img.save(buf, format="JPEG", quality=fmt.quality)
    else:
        # Level 1: PNG's higher levels cost several times the encode time for a few % of size.
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sample_members(key: str, image: bytes, fmt: ImageFormat, attrs: np.ndarray, meta: dict) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.{fmt.encoding}", image),
        (f"{key}.attr.npy", npy_bytes(np.ascontiguousarray(attrs, dtype=np.uint8))),
        (f"{key}.meta.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
    ]
