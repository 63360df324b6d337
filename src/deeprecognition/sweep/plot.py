"""The sweep's plot: its metric against each searched field, one panel per field (validation
accuracy vs. layers for cnn_layers; FID vs. each learning rate, latent size, ... for the GAN); for a
pbt sweep its schedule instead: each mutated field over the iterations, a line per trial, a marker
at each exploit."""

from __future__ import annotations

import io
import math
from collections import defaultdict

from deeprecognition.sweep.results import FLOORS, SweepResult, TrialRow
from deeprecognition.sweep.spec import SearchField, SweepSpec


def _panel(ax, result: SweepResult, field: SearchField) -> None:
    points = [
        (t.config[field.short], t.metrics[result.metric], t.status) for t in result.trials if result.metric in t.metrics
    ]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
    categories = sorted({str(x) for x, _, _ in points})
    position = (lambda x: x) if numeric else (lambda x: categories.index(str(x)))
    for status, marker in (("finished", "o"), ("stopped", "x")):
        shown = [(position(x), y) for x, y, s in points if s == status]
        if shown:
            ax.scatter(*zip(*shown), marker=marker, label=f"{status}{' early' if status == 'stopped' else ''}")
    if field.dist.kind == "grid" and points:
        # Mean per grid value: the study's table as a curve (several samples or crossed grids average).
        by_value: dict = defaultdict(list)
        for x, y, _ in points:
            by_value[position(x)].append(y)
        xs = sorted(by_value)
        ax.plot(xs, [sum(by_value[x]) / len(by_value[x]) for x in xs], color="C0", alpha=0.6)
    floor = FLOORS.get(result.metric)
    floors = [t.metrics[floor] for t in result.trials if floor in t.metrics]
    if floors:
        ax.axhline(sum(floors) / len(floors), color="grey", linestyle=":", label="majority floor")
    if field.dist.kind == "loguniform":
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        # Labels at 1, 2 and 5 per decade: learning-rate ranges often span less than one decade.
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    elif field.dist.kind in ("grid", "choice"):
        ax.set_xticks(sorted({x for x, _, _ in points}))
    ax.set_xlabel(field.short)
    ax.set_ylabel(result.metric)
    ax.grid(alpha=0.3)


def _steps(trial: TrialRow, short: str) -> tuple[list[float], list]:
    """The trial's value of `short` as a step line, from iteration 0 to the last it reported."""
    xs, ys = [], []
    for entry in trial.schedule:
        if ys:  # hold the value up to the change
            xs.append(entry["iteration"])
            ys.append(ys[-1])
        xs.append(entry["iteration"])
        ys.append(entry["config"][short])
    xs.append(max(trial.metrics.get("iteration", 0), xs[-1]))
    ys.append(ys[-1])
    return xs, ys


def _schedule_panel(ax, result: SweepResult, field: SearchField) -> None:
    for i, trial in enumerate(result.trials):
        if not trial.schedule:
            continue
        xs, ys = _steps(trial, field.short)
        ax.plot(xs, ys, color=f"C{i % 10}", label=trial.trial_id)
        changes = [(e["iteration"], e["config"][field.short]) for e in trial.exploits]
        if changes:
            ax.scatter(*zip(*changes), color=f"C{i % 10}", marker="o", zorder=3)
    if field.dist.kind == "loguniform":
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(field.short)
    ax.set_title(f"{field.short} (o: an exploit)", fontsize=9)
    ax.grid(alpha=0.3)


def sweep_png(result: SweepResult, spec: SweepSpec) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pbt = spec.scheduler.name == "pbt"
    panels = [f for f in spec.search if f.field in spec.scheduler.mutate] if pbt else list(spec.search)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    for ax, field in zip(axes.flat, panels):
        (_schedule_panel if pbt else _panel)(ax, result, field)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    what = "the PBT schedule: searched values over iterations" if pbt else "by searched value"
    fig.suptitle(f"{result.name}: {result.metric} ({result.mode}), {what}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
