"""Where a batch's JPEGs are decoded: by the loader's CPU workers (`data.decode=cpu`, the default) or
on the training GPU (`data.decode=gpu`), so that a node with few cores per GPU is not bound by its
CPUs' decoding. With gpu the loader's workers only walk the shards and hand over each batch's JPEG
files as one flat buffer (EncodedImages); `images_on` decodes them on the device with nvJPEG, into
the layout the CPU path produces: uint8 (B, 3, H, W) in channels_last memory.

Why (measured earlier on one H200, README "Scaling"): cnn3 at batch 256 wants 39,700 img/s; CPU
decoding with 8-15 loader workers fed it 27,000-29,600; nvJPEG decoded 45,000-49,000 img/s of our
shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from deeprecognition.shards.choices import DECODES, NEEDS_GPU


class EncodedImages(NamedTuple):
    """A batch's JPEG files back to back: one buffer crosses from a DataLoader worker as one
    shared-memory segment and is pinned as one copy, where a list of B tensors would be B of each."""

    data: torch.Tensor  # (N,) uint8, the files concatenated
    offsets: torch.Tensor  # (B + 1,) int64: file i is data[offsets[i] : offsets[i + 1]]


def encoded(payloads: Sequence[memoryview]) -> EncodedImages:
    """The stored JPEG files of a (non-empty) batch, as they are in the shard."""
    sizes = torch.tensor([0, *(len(p) for p in payloads)], dtype=torch.int64)
    return EncodedImages(torch.frombuffer(bytearray().join(payloads), dtype=torch.uint8), sizes.cumsum(0))


def stack_channels_last(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, 3, H, W) in channels_last memory from B (3, H, W) images. Decoders hand back HWC memory
    viewed as CHW: stacking the HWC views is a plain memcpy, where stacking CHW would be a strided
    transpose (a quarter of the CPU loader's throughput); channels_last is what the GPU step wants."""
    return torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)


def decode_on(images: EncodedImages, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W), channels_last, on `device` (nvJPEG on CUDA; libjpeg-turbo on the CPU,
    the CPU path's own decoder, which is how this is tested without a GPU)."""
    bounds = images.offsets.tolist()
    files = [
        images.data[start:stop] for start, stop in zip(bounds, bounds[1:])
    ]  # views: decode_jpeg reads them on the host
    if device.type == "cuda":
        # nvJPEG may be handed output memory that kernels queued on this stream still read and
        # overwrite it before they run (reported in pytorch/vision#9606): let them finish first.
        torch.cuda.current_stream(device).synchronize()
    return stack_channels_last(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))


def images_on(images: torch.Tensor | EncodedImages, device: torch.device) -> torch.Tensor:
    """A batch's images as uint8 (B, 3, H, W) on `device`: decoded there when the loader handed over
    JPEG files, else copied (asynchronously when the loader pinned them)."""
    if isinstance(images, EncodedImages):
        return decode_on(images, device)
    return images.to(device, non_blocking=True)


def check_decode(decode: str, encoding: str) -> None:
    """Refuse a decode setting the dataset's image encoding cannot have."""
    if decode not in DECODES:
        raise ValueError(f"data.decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode == "gpu" and encoding != "jpg":
        raise ValueError(
            f"data.decode=gpu decodes JPEG datasets only (nvJPEG), and this one stores {encoding} images: "
            "use data.decode=cpu, or pack the dataset with --format jpg"
        )


def require_cuda(decode: str, device: torch.device) -> None:
    """In the worker: refuse data.decode=gpu where the loop's device is not a CUDA device."""
    if decode == "gpu" and device.type != "cuda":
        found = (
            "torch.cuda is not available here" if not torch.cuda.is_available() else f"this worker trains on {device}"
        )
        raise ValueError(f"{NEEDS_GPU}; {found}: drop data.decode=gpu, or run with --gpu on a node with a GPU")
