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
from deeprecognition.gan.conditions import Draw, LabelBank, attribute_names, flip_columns
from deeprecognition.gan.models import draws_with_ema, to_uint8
from deeprecognition.gan.step import build_models
from deeprecognition.runs.catalog import best_checkpoint
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.shards.loader import parse_conditions

EDIT_TILE = 128  # px: edit grids scale small faces up to this, so that each tile's label fits


def grid_png(images: Tensor, labels: list[str] | None = None, columns: int | None = None) -> bytes:
    """A grid PNG of (N, 3, S, S) uint8 images, `columns` wide or ceil(sqrt(N)) (6x6 for 36);
    optional labels are written on each tile."""
    from PIL import Image, ImageDraw

    n, _, size, _ = images.shape
    side = columns or math.ceil(math.sqrt(n))  # columns; rows only as many as needed
    grid = torch.zeros((3, math.ceil(n / side) * size, side * size), dtype=torch.uint8)
    for i, img in enumerate(images.cpu()):
        row, col = divmod(i, side)
        grid[:, row * size : (row + 1) * size, col * size : (col + 1) * size] = img
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if labels:
        draw = ImageDraw.Draw(picture)
        for i, label in enumerate(labels):
            row, col = divmod(i, side)
            at = (col * size + 4, row * size + 2)
            draw.rectangle(draw.textbbox(at, label), fill=(0, 0, 0))  # readable on a white face too
            draw.text(at, label, fill=(255, 255, 0))
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
    generator: nn.Module,
    latent: int,
    n: int,
    seed: int,
    part: slice = slice(None),
    batch_size: int = 250,
    labels: Tensor | None = None,
) -> Tensor:
    """(n, 3, S, S) uint8 faces from seeded latents: the same seed gives the same faces. `part`: only
    those of the n (a rank's share), the same faces as in the whole set. A conditional generator
    is asked for `labels`, (n, K), the whole set's."""
    faces = list(face_batches(generator, latent, n, seed, part, batch_size, labels))
    return torch.cat(faces) if faces else torch.zeros((0, 3, 0, 0), dtype=torch.uint8)


@torch.no_grad()
def face_batches(
    generator: nn.Module,
    latent: int,
    n: int,
    seed: int,
    part: slice = slice(None),
    batch_size: int = 250,
    labels: Tensor | None = None,
) -> Iterator[Tensor]:
    """draw_faces' faces a batch at a time, for sets too large to hold (50k at 128 px is 2.4 GB)."""
    latents = torch.randn(n, latent, generator=torch.Generator().manual_seed(seed))[part]
    asked = labels[part] if labels is not None else None
    device = next(generator.parameters()).device
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].to(device)
        faces = generator(z) if asked is None else generator(z, asked[start : start + batch_size].to(device))
        yield to_uint8(faces.float()).cpu()


@dataclass
class TrainedGan:
    generator: nn.Module  # in eval mode
    config: GanConfig
    iteration: int
    image_size: int
    checkpoint: str
    fixed_latents: Tensor  # the run's mosaic latents
    bank: LabelBank | None = None  # conditional: the training faces' label vectors

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
        generator, _ = build_models(cfg, state["image_size"])
        generator.load_state_dict(state["ema" if (draws_with_ema(cfg.model.arch) if ema is None else ema) else "G"])
        bank = LabelBank.restored(state["label_bank"]) if cfg.model.conditional else None
        return cls(
            generator.to(device).eval(),
            cfg,
            state["iteration"],
            state["image_size"],
            folder,
            state["fixed_latents"],
            bank,
        )

    def labels(self, n: int, conditions: str, seed: int, what: str = "--attrs") -> Draw | None:
        """`n` label vectors with `conditions` ("Smiling=1,Male=0"), the rest drawn from the data;
        None for an unconditional model, which refuses conditions."""
        if self.bank is None:
            if conditions:
                raise ValueError(f"{what}: {self.checkpoint} is not conditional (trained without --conditional)")
            return None
        return self.bank.draw(n, parse_conditions(conditions, self.bank.attributes, what), seed)

    def faces(self, n: int, seed: int = 0, conditions: str = "") -> Tensor:
        draw = self.labels(n, conditions, seed)
        return draw_faces(self.generator, self.config.model.latent, n, seed, labels=draw.labels if draw else None)

    @torch.no_grad()
    def edits(self, names: list[str], n: int, seed: int = 0, conditions: str = "") -> Tensor:
        """Rows of `n` faces, each a fixed (z, a) with a drawn from the data (under `conditions`):
        the face as drawn, then one face per name with that attribute flipped; (n * (1 + len), 3, S, S)."""
        draw = self.labels(n, conditions, seed, "--edit")
        if draw is None:
            raise ValueError(f"--edit: {self.checkpoint} is not conditional (trained without --conditional)")
        columns = [
            self.bank.attributes.index(a) for a in attribute_names(",".join(names), self.bank.attributes, "--edit")
        ]
        z = torch.randn(n, self.config.model.latent, generator=torch.Generator().manual_seed(seed))
        device = next(self.generator.parameters()).device
        z = z.repeat_interleave(1 + len(columns), 0).to(device)
        return to_uint8(self.generator(z, flip_columns(draw.labels, columns).to(device)).float()).cpu()


def generate_grid(
    checkpoint: str,
    out: str,
    n: int = 36,
    seed: int = 0,
    ema: bool | None = None,
    latest: bool = False,
    attrs: str = "",
    edit: str = "",
) -> TrainedGan:
    """Write a grid of `n` generated faces to `out` (local or s3://), a conditional model's with the
    attributes `attrs` fixed; with `edit` ("Smiling,Male") `n` rows of edits instead, tiles labelled
    with the flipped attribute's new value. Returns the loaded GAN (a run's best checkpoint, or with
    `latest` its latest)."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gan = TrainedGan.load(checkpoint, ema=ema, device=device, latest=latest)
    if not edit:
        storage.write_bytes_atomic(out, grid_png(gan.faces(n, seed, attrs)))
        return gan
    names = [a.strip() for a in edit.split(",") if a.strip()]
    faces = gan.edits(names, n, seed, attrs)
    storage.write_bytes_atomic(
        out, grid_png(_enlarged(faces), _edit_labels(gan, names, n, seed, attrs), 1 + len(names))
    )
    return gan


def _enlarged(faces: Tensor, at_least: int = EDIT_TILE) -> Tensor:
    """Faces scaled up by a whole factor (nearest) to at least `at_least` px, room for a tile's label."""
    scale = max(1, math.ceil(at_least / faces.shape[-1]))
    return faces.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def _edit_labels(gan: TrainedGan, names: list[str], n: int, seed: int, attrs: str) -> list[str]:
    """ "as drawn", then "+Smiling" or "-Smiling": what each edit tile's flip made of the attribute."""
    labels = gan.labels(n, attrs, seed, "--edit").labels
    tiles = []
    for row in labels:
        tiles.append("as drawn")
        tiles += [("-" if row[gan.bank.attributes.index(a)] else "+") + a for a in names]
    return tiles
