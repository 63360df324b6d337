"""What a run leaves beside its checkpoints: the resolved config, a JSONL of metrics, TensorBoard
events, and at the end the test report (JSON + Markdown) and the learning curves (the study's
Figure 2). Written by rank 0, to local or S3 run storage alike."""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

from deeprecognition import storage
from deeprecognition.metrics import format_report

METRICS_LOG = "metrics.jsonl"


def read_history(run_uri: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(storage.join(run_uri, METRICS_LOG)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class RunLog:
    """Rank 0's record of a run. On resume it keeps the history up to the checkpoint's epoch:
    epochs trained after the last checkpoint were lost with the failure and are trained again."""

    def __init__(self, run_uri: str, config: dict[str, Any], resume_at: int, position: str = "epoch") -> None:
        from tensorboardX import SummaryWriter

        self.run_uri = run_uri
        self.history = [m for m in read_history(run_uri) if m[position] < resume_at]
        storage.write_bytes_atomic(storage.join(run_uri, "training_options.json"), json.dumps(config, indent=1).encode())
        self._tb_dir = tempfile.mkdtemp(prefix="deeprec-tb-")
        self._tb = SummaryWriter(self._tb_dir)

    def log(self, metrics: dict[str, Any], flush: bool = True) -> None:
        """Record one line; `flush` rewrites metrics.jsonl and the TensorBoard events in storage
        (S3 has no append: a long GAN schedule flushes at checkpoints, not every line)."""
        self.history.append(metrics)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step", "iteration"):
                self._tb.add_scalar(key, value, global_step=metrics["step"])
        if flush:
            self.flush()

    def flush(self) -> None:
        lines = "".join(json.dumps(m) + "\n" for m in self.history)
        storage.write_bytes_atomic(storage.join(self.run_uri, METRICS_LOG), lines.encode())
        self._tb.flush()
        for name in os.listdir(self._tb_dir):
            with open(os.path.join(self._tb_dir, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(self.run_uri, "tensorboard", name), f.read())

    def finish(self, test: dict[str, Any], title: str) -> None:
        storage.write_bytes_atomic(storage.join(self.run_uri, "report.json"), json.dumps(test, indent=1).encode())
        storage.write_bytes_atomic(storage.join(self.run_uri, "report.md"), format_report(test, title).encode())
        storage.write_bytes_atomic(storage.join(self.run_uri, "curves.png"), curves_png({title: self.history}))
        self._tb.close()


def curves_png(runs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Train and validation mean accuracy per epoch for one or more runs, with the majority floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, history) in enumerate(runs.items()):
        color = f"C{i}"
        epochs = [m["epoch"] + 1 for m in history]
        ax.plot(epochs, [m["val/mean_accuracy"] for m in history], color=color, marker="o", label=f"{label} val")
        ax.plot(epochs, [m["train/mean_accuracy"] for m in history], color=color, linestyle="--", label=f"{label} train")
        if history:
            ax.axhline(history[-1]["val/mean_majority_baseline"], color=color, linestyle=":", linewidth=1, label=f"{label} majority floor")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
