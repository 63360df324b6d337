"""`deeprec generate CKPT --n 36 --out grid.png`: faces from a trained GAN checkpoint (a checkpoint
folder, or a run folder's best by FID, `--latest` its latest; local or s3://), as a square grid PNG."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.config import GanConfig, from_checkpoint
from deeprecognition.errors import InputError
from deeprecognition.gan.models import build_gan, draws_with_ema, to_uint8
from deeprecognition.runs.catalog import best_checkpoint
from deeprecognition.runs.checkpoint import load_state


def grid_png(images: Tensor, labels: list[str] | None = None) -> bytes:
    """A grid PNG of (N, 3, S, S) uint8 images, ceil(sqrt(N)) columns (6x6 for 36); optional
    labels are written on each tile."""
    from PIL import Image, ImageDraw

    n, _, size, _ = images.shape
    side = math.ceil(math.sqrt(n))  # columns; rows only as many as needed
    grid = torch.zeros((3, math.ceil(n / side) * size, side * size), dtype=torch.uint8)
    for i, img in enumerate(images.cpu()):
        row, col = divmod(i, side)
        grid[:, row * size : (row + 1) * size, col * size : (col + 1) * size] = img
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if labels:
        draw = ImageDraw.Draw(picture)
        for i, label in enumerate(labels):
            row, col = divmod(i, side)
            draw.text((col * size + 4, row * size + 2), label, fill=(255, 255, 0))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def evenly_spaced(iterations: list[int], tiles: int = 25) -> list[int]:
    """Up to `tiles` of the iterations, evenly spaced, always with the last."""
    iterations = sorted(iterations)
    step = max(1, math.ceil(len(iterations) / tiles))
    return sorted(set(iterations[::step][: tiles - 1] + iterations[-1:]))


def contact_sheet_png(mosaics: dict[int, bytes], tile_size: int = 256) -> bytes:
    """Mosaics over time on one sheet: each shrunk to `tile_size` px and labelled with its iteration."""
    import numpy as np
    from PIL import Image

    tiles = []
    for it in sorted(mosaics):
        picture = (
            Image.open(io.BytesIO(mosaics[it])).convert("RGB").resize((tile_size, tile_size), Image.Resampling.LANCZOS)
        )
        tiles.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))
    return grid_png(torch.stack(tiles), [f"iter {it}" for it in sorted(mosaics)])


def mosaic_name(iteration: int) -> str:
    """The file name of a run's mosaic at `iteration`, in its mosaics folder."""
    return f"iter-{iteration:06d}.png"


def write_mosaic(uri: str, faces: Tensor) -> None:
    storage.write_bytes_atomic(uri, grid_png(faces))


def write_contact_sheet(folder: str) -> None:
    """contact-sheet.png in a run's mosaics `folder`, from up to 25 of its mosaics; none: no sheet."""
    written = [int(n[5:-4]) for n in storage.list_names(folder) if n.startswith("iter-")]
    # A long run writes thousands of mosaics: read only the ones the sheet shows.
    chosen = {it: storage.read_bytes(storage.join(folder, mosaic_name(it))) for it in evenly_spaced(written)}
    if chosen:
        storage.write_bytes_atomic(storage.join(folder, "contact-sheet.png"), contact_sheet_png(chosen))


@torch.no_grad()
def draw_faces(
    generator: nn.Module, latent: int, n: int, seed: int, part: slice = slice(None), batch_size: int = 250
) -> Tensor:
    """(n, 3, S, S) uint8 faces from seeded latents: the same seed gives the same faces. `part`: only
    those of the n (a rank's share), the same faces as in the whole set."""
    faces = list(face_batches(generator, latent, n, seed, part, batch_size))
    return torch.cat(faces) if faces else torch.zeros((0, 3, 0, 0), dtype=torch.uint8)


def face_batches(
    generator: nn.Module, latent: int, n: int, seed: int, part: slice = slice(None), batch_size: int = 250
) -> Iterator[Tensor]:
    """draw_faces' faces a batch at a time, for sets too large to hold (50k at 128 px is 2.4 GB)."""
    latents = torch.randn(n, latent, generator=torch.Generator().manual_seed(seed))[part]
    device = next(generator.parameters()).device
    for z in latents.split(batch_size):
        yield to_uint8(generator(z.to(device)).float()).cpu()


@dataclass
class TrainedGan:
    generator: nn.Module  # in eval mode
    config: GanConfig
    iteration: int
    image_size: int
    checkpoint: str
    fixed_latents: Tensor  # the run's mosaic latents

    @classmethod
    def load(
        cls, uri: str, ema: bool | None = None, device: torch.device | str = "cpu", latest: bool = False
    ) -> TrainedGan:
        """A checkpoint folder, or a run folder's best checkpoint (catalog's ranking: the lowest FID
        once measured, else the latest) or with `latest` its latest; plain data only (weights_only).
        ema=None draws as the run's mosaics did: the EMA generator for dcgan, G for the study's."""
        folder = best_checkpoint(uri, latest)
        state = load_state(folder)
        if "G" not in state or "image_size" not in state:
            raise InputError(
                folder, "is not a GAN checkpoint (no G or image_size): give one written by `deeprec train gan`"
            )
        cfg = from_checkpoint(GanConfig, state["config"])
        generator, _ = build_gan(cfg.model.arch, cfg.model.latent, state["image_size"], cfg.model.width)
        generator.load_state_dict(state["ema" if (draws_with_ema(cfg.model.arch) if ema is None else ema) else "G"])
        return cls(
            generator.to(device).eval(), cfg, state["iteration"], state["image_size"], folder, state["fixed_latents"]
        )

    def faces(self, n: int, seed: int = 0) -> Tensor:
        return draw_faces(self.generator, self.config.model.latent, n, seed)


def generate_grid(
    checkpoint: str, out: str, n: int = 36, seed: int = 0, ema: bool | None = None, latest: bool = False
) -> TrainedGan:
    """Write a grid of `n` generated faces to `out` (local or s3://); returns the loaded GAN (a
    run's best checkpoint, or with `latest` its latest)."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gan = TrainedGan.load(checkpoint, ema=ema, device=device, latest=latest)
    storage.write_bytes_atomic(out, grid_png(gan.faces(n, seed)))
    return gan
