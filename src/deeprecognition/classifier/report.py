"""What a classifier run leaves at its end beside its log: the test report in Markdown (each metric
beside its majority floor) and the learning curves, the study's Figure 2 (train and validation
accuracy per epoch with the floor), which `deeprec curves RUN...` also draws for several runs."""

from __future__ import annotations

import io
from typing import Any

from deeprecognition import storage
from deeprecognition.classifier.metrics import format_report
from deeprecognition.runs.report import read_history


def report_files(test: dict[str, Any], title: str, history: list[dict[str, Any]]) -> dict[str, bytes]:
    """The files beside report.json: the test metrics as Markdown, the run's curves."""
    return {"report.md": format_report(test, title).encode(), "curves.png": curves_png({title: history})}


def curves_png(runs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Train and validation mean accuracy per epoch for one or more runs, with the majority floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, history) in enumerate(runs.items()):
        _plot_run(ax, label, history, color=f"C{i}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _plot_run(ax, label: str, history: list[dict[str, Any]], color: str) -> None:
    epochs = [m["epoch"] + 1 for m in history]
    ax.plot(epochs, [m["val/mean_accuracy"] for m in history], color=color, marker="o", label=f"{label} val")
    ax.plot(epochs, [m["train/mean_accuracy"] for m in history], color=color, linestyle="--", label=f"{label} train")
    if history:
        floor = history[-1]["val/mean_majority_baseline"]
        ax.axhline(floor, color=color, linestyle=":", linewidth=1, label=f"{label} majority floor")


def write_curves(run_uris: list[str], out: str) -> int:
    """One plot of the runs' logged epochs written to `out` (local or s3://); the number of runs.
    A run is labelled by its folder's name."""
    runs = {uri.rstrip("/").rsplit("/", 1)[-1]: read_history(uri) for uri in run_uris}
    empty = [name for name, history in runs.items() if not history]
    if empty:
        raise ValueError(f"no metrics.jsonl with epochs in run(s): {', '.join(empty)}")
    storage.write_bytes_atomic(out, curves_png(runs))
    return len(runs)
