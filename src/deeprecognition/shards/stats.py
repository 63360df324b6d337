"""`deeprec stats DATA`: per-split attribute distribution (the study's Figure 1), from the manifest.

The manifest carries per-shard positive counts, so this reads no shard: it is instant on S3 too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from deeprecognition import storage
from deeprecognition.shards.manifest import Manifest, read_manifest


@dataclass(frozen=True)
class SplitStats:
    samples: int
    positives: dict[str, int]

    def rate(self, name: str) -> float:
        return self.positives[name] / self.samples if self.samples else 0.0


def attribute_stats(manifest: Manifest) -> dict[str, SplitStats]:
    stats = {}
    for split, info in manifest.splits.items():
        counts = (
            np.sum([s.attribute_counts for s in info.shards], axis=0, dtype=np.int64)
            if info.shards
            else np.zeros(40, np.int64)
        )
        stats[split] = SplitStats(samples=info.samples, positives=dict(zip(manifest.attributes, counts.tolist())))
    return stats


def stats_json(stats: dict[str, SplitStats]) -> dict:
    return {
        split: {"samples": s.samples, "positives": s.positives, "rates": {n: round(s.rate(n), 6) for n in s.positives}}
        for split, s in stats.items()
    }


def format_table(stats: dict[str, SplitStats]) -> str:
    splits = list(stats)
    lines = [f"{'attribute':<20}" + "".join(f"{s + ' %':>10}" for s in splits)]
    lines.append(f"{'samples':<20}" + "".join(f"{stats[s].samples:>10d}" for s in splits))
    for name in next(iter(stats.values())).positives:
        lines.append(f"{name:<20}" + "".join(f"{100 * stats[s].rate(name):>10.1f}" for s in splits))
    return "\n".join(lines)


def plot_png(stats: dict[str, SplitStats]) -> bytes:
    """Grouped horizontal bars: share of positive images per attribute and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(stats.values())).positives)
    y = np.arange(len(names))
    height = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(8, 11))
    for i, (split, s) in enumerate(stats.items()):
        ax.barh(y + i * height, [100 * s.rate(n) for n in names], height, label=f"{split} ({s.samples:,})")
    ax.set_yticks(y + height * (len(stats) - 1) / 2, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images with the attribute (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title("CelebA attribute distribution per split")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def dataset_stats(dataset: str, plot: str | None = None) -> dict[str, SplitStats]:
    stats = attribute_stats(read_manifest(dataset))
    if plot:
        storage.write_bytes_atomic(plot, plot_png(stats))
    return stats
