"""What a conditional GAN is asked for: vectors of CelebA attributes in {0, 1}, and where they come from.

Fake faces' labels follow the data's joint distribution: a `LabelBank` holds the label vectors of
the run's training faces (its where filter applied) and a draw picks whole rows of it, so that
correlated attributes (Male and Heavy_Makeup: -0.67) stay as correlated as in the data; coin flips
would ask for bearded women in lipstick as often as for anything else. A constrained draw fixes
some attributes and draws the rest from the rows that have those values. A combination no training
face has falls back to rows drawn from the whole bank with the named attributes forced on top, and
says so (`Draw.support` is 0): the model is then asked for something it never saw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deeprecognition.celeba.attributes import attribute_index
from deeprecognition.shards.loader import parse_conditions

log = logging.getLogger(__name__)

MOSAIC_SIDE = 6  # the study's 6x6 mosaic: rows of conditions, columns of fixed latents
# The mosaic's rows by default, those the model has: the four Male x Smiling combinations,
# Eyeglasses on, and plain draws from the data ({}).
DEFAULT_MOSAIC_ROWS: tuple[dict[str, int], ...] = (
    {"Male": 0, "Smiling": 0},
    {"Male": 0, "Smiling": 1},
    {"Male": 1, "Smiling": 0},
    {"Male": 1, "Smiling": 1},
    {"Eyeglasses": 1},
)


def attribute_names(text: str, attributes: Sequence[str], what: str) -> list[str]:
    """ "Smiling,Male" -> ["Smiling", "Male"], each one of the model's `attributes`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{what}: name at least one attribute")
    parse_conditions(",".join(f"{n}=1" for n in names), attributes, what)
    return names


@dataclass(frozen=True)
class Draw:
    labels: Tensor  # (n, K) float32 in {0, 1}
    support: int  # training faces with the fixed values (0: none; the rest came from the whole bank)


class LabelBank:
    """The training faces' label vectors over a conditional model's attributes, (N, K) uint8."""

    def __init__(self, attributes: Sequence[str], rows: Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != len(attributes) or not len(rows):
            raise ValueError(f"a label bank needs (N >= 1, {len(attributes)}) rows, got {tuple(rows.shape)}")
        self.attributes, self.rows = tuple(attributes), rows

    @classmethod
    def of_dataset(cls, data: str, where: dict[str, int], attributes: Sequence[str]) -> LabelBank:
        """From the dataset's label index: the train split's faces that pass `where`."""
        from deeprecognition.shards.loader import split_index
        from deeprecognition.shards.manifest import read_manifest

        index = split_index(data, read_manifest(data), "train")
        rows = index.matching((attribute_index(k), v) for k, v in where.items())
        if not len(rows):
            raise ValueError(f"no training faces in {data} match where={where}")
        columns = [attribute_index(a) for a in attributes]
        return cls(attributes, torch.from_numpy(np.ascontiguousarray(index.labels[rows][:, columns])))

    def to(self, device: torch.device | str) -> LabelBank:
        return LabelBank(self.attributes, self.rows.to(device))

    def saved(self) -> dict:
        """Plain data for a checkpoint, packed 8 labels a byte (all of CelebA's train split: 0.8 MB)."""
        bits = np.packbits(self.rows.cpu().numpy().astype(bool), axis=1)
        return {"attributes": list(self.attributes), "bits": torch.from_numpy(bits), "count": len(self.rows)}

    @classmethod
    def restored(cls, saved: dict) -> LabelBank:
        attributes = saved["attributes"]
        bits = np.unpackbits(saved["bits"].numpy(), axis=1, count=len(attributes))
        return cls(attributes, torch.from_numpy(bits[: saved["count"]]))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, K) float rows drawn with replacement on the bank's device (training's fake labels)."""
        picks = torch.randint(len(self.rows), (n,), generator=generator, device=self.rows.device)
        return self.rows[picks].float()

    def matching(self, fixed: dict[str, int]) -> Tensor:
        """The rows, as a (N,) bool mask, with every fixed attribute at its value."""
        keep = torch.ones(len(self.rows), dtype=torch.bool, device=self.rows.device)
        for name, value in fixed.items():
            keep &= self.rows[:, self.attributes.index(name)] == value
        return keep

    def draw(self, n: int, fixed: dict[str, int], seed: int) -> Draw:
        """`n` label vectors with the `fixed` values, the rest drawn (seeded) from the rows that have
        them; with no such row, from the whole bank with the fixed values forced."""
        keep = self.matching(fixed)
        support = int(keep.sum())
        pool = self.rows[keep] if support else self.rows
        if not support:
            named = ",".join(f"{k}={v}" for k, v in fixed.items())
            log.warning(
                "no training face has %s (of %d): the rest of its attributes come from the whole data", named, len(pool)
            )
        picks = torch.randint(len(pool), (n,), generator=torch.Generator().manual_seed(seed))
        labels = pool[picks.to(pool.device)].float()
        for name, value in fixed.items():
            labels[:, self.attributes.index(name)] = value
        return Draw(labels, support)

    def rates(self, fixed: dict[str, int]) -> Tensor:
        """(K,) each attribute's rate among the rows with the fixed values (NaN where there are none)."""
        keep = self.matching(fixed)
        return self.rows[keep].float().mean(0) if keep.any() else torch.full((len(self.attributes),), float("nan"))


def flip_columns(labels: Tensor, columns: Sequence[int]) -> Tensor:
    """The edit view: for each row of (n, K) `labels`, the row itself, then one copy per column with
    that attribute flipped; (n * (1 + len(columns)), K), face by face."""
    variants = [labels]
    for c in columns:
        flipped = labels.clone()
        flipped[:, c] = 1 - flipped[:, c]
        variants.append(flipped)
    return torch.stack(variants, 1).reshape(-1, labels.shape[1])


def mosaic_rows(spec: str, attributes: Sequence[str]) -> list[dict[str, int]]:
    """The mosaic's six rows of conditions: schedule.mosaic_conditions, or the default rows whose
    attributes the model has; missing rows are plain draws from the data."""
    if spec:
        rows = [parse_conditions(r, attributes, "schedule.mosaic_conditions") for r in spec.split(";") if r.strip()]
    else:
        rows = [dict(r) for r in DEFAULT_MOSAIC_ROWS if all(a in attributes for a in r)]
    if len(rows) > MOSAIC_SIDE:
        raise ValueError(f"schedule.mosaic_conditions: at most {MOSAIC_SIDE} rows, got {len(rows)}")
    return rows + [{}] * (MOSAIC_SIDE - len(rows))


def mosaic_labels(bank: LabelBank, rows: Sequence[dict[str, int]], seed: int) -> Tensor:
    """(36, K): row r's six tiles ask for rows[r], the rest drawn from the data (seeded, fixed for the run)."""
    return torch.cat([bank.draw(MOSAIC_SIDE, row, seed + r).labels for r, row in enumerate(rows)]).cpu()
