"""Where a run's workers go, and waiting for room for them.

A worker holds one GPU and the CPUs its DataLoader decodes on, on the GPU type asked for; a run
that fits on one node is packed onto one node (DDP's gradient all-reduce across nodes costs more
than the step). Before Ray Train starts, the driver waits for that capacity itself, with a line
every minute: on an autoscaling cluster a GPU node boots in minutes, while Ray Train gives a
worker group 60 s and charges a timeout to a failure budget that never resets.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deeprecognition.errors import DeepRecError

if TYPE_CHECKING:
    from ray.train import ScalingConfig

    from deeprecognition.config import ClassifierConfig, GanConfig

# Ray Train's own wait for a worker group's placement group (constants.py in ray/train/v2), which
# the driver hands to its controller. A restart after a lost node waits this long for a new node.
RAY_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ACCELERATOR_PREFIX = "accelerator_type:"


class CapacityTimeout(DeepRecError):
    """The cluster did not make room for the run's workers within scale.start_timeout_s."""


@dataclass(frozen=True)
class Placement:
    workers: int  # workers to wait for: all of them, or an elastic run's minimum
    max_workers: int
    per_worker: dict[str, float]  # Ray resources of one worker, the GPU type's marker included
    strategy: str  # STRICT_PACK | PACK | SPREAD

    def describe(self) -> str:
        """`2 workers of {GPU: 1, CPU: 3, H100} (STRICT_PACK)`."""
        shown = ", ".join(
            k[len(ACCELERATOR_PREFIX) :] if k.startswith(ACCELERATOR_PREFIX) else f"{k}: {v:g}"
            for k, v in self.per_worker.items()
        )
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} of {{{shown}}} ({self.strategy})"


def worker_resources(cfg: ClassifierConfig | GanConfig) -> dict[str, float]:
    """One GPU and 1 + loader_workers CPUs per GPU worker: the DataLoader's decoding processes are
    real CPUs that the scheduler and the autoscaler must count. A CPU worker keeps Ray's 1 CPU, so
    a laptop's local Ray places as many ranks as it has cores."""
    scale = cfg.scale
    if not scale.gpu:
        return {"CPU": 1.0}
    resources = {"GPU": 1.0, "CPU": float(1 + cfg.data.loader_workers)}
    if scale.gpu_type:
        resources[ACCELERATOR_PREFIX + scale.gpu_type] = 0.001  # what Ray's accelerator_type adds
    return resources


def node_shapes() -> list[dict[str, float]]:
    """The resources of every node this cluster has or its autoscaler can start (one per type)."""
    import ray
    from ray._private.state import state

    shapes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    config = state.get_cluster_config()
    for group in config.node_group_configs if config else ():
        if group.max_count:
            shapes.append(dict(group.resources))
    return shapes


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in need.items())


def choose_strategy(need: dict[str, float], shapes: list[dict[str, float]], spread: bool) -> str:
    """SPREAD when asked; STRICT_PACK when some node (present or launchable) holds every worker;
    else PACK: as few nodes as Ray can manage."""
    if spread:
        return "SPREAD"
    return "STRICT_PACK" if any(_fits(need, shape) for shape in shapes) else "PACK"


def plan(cfg: ClassifierConfig | GanConfig, shapes: list[dict[str, float]] | None = None) -> Placement:
    """The placement of a checked config on the connected cluster (`shapes`: its nodes, by default)."""
    scale = cfg.scale
    per_worker = worker_resources(cfg)
    need = {k: v * scale.num_workers for k, v in per_worker.items()}
    strategy = choose_strategy(need, node_shapes() if shapes is None else shapes, scale.spread)
    return Placement(scale.elastic_min or scale.num_workers, scale.num_workers, per_worker, strategy)


def scaling_config(cfg: ClassifierConfig | GanConfig, placement: Placement) -> ScalingConfig:
    from ray.train import ScalingConfig

    resources = {k: v for k, v in placement.per_worker.items() if not k.startswith(ACCELERATOR_PREFIX)}
    workers = (placement.workers, placement.max_workers) if cfg.scale.elastic_min else placement.max_workers
    return ScalingConfig(
        num_workers=workers,
        use_gpu=cfg.scale.gpu,
        resources_per_worker=resources,
        accelerator_type=cfg.scale.gpu_type or None,
        placement_strategy=placement.strategy,
    )


def check_gpu_type(name: str) -> None:
    """A GPU type Ray knows (its accelerator_type names), spelled as Ray spells it."""
    if not name:
        return
    from ray.util.accelerators import accelerators

    known = sorted({v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)})
    if name not in known:
        close = [k for k in known if k.lower() == name.lower()]
        hint = (
            f"did you mean {close[0]}?"
            if close
            else f"Ray's names: {', '.join(k for k in known if not k.startswith(('AMD', 'Intel', 'TPU', 'aws')))} ..."
        )
        raise ValueError(f"scale.gpu_type {name!r} is not a GPU type Ray knows: {hint}")


@contextlib.contextmanager
def ray_start_timeout(seconds: int | None) -> Iterator[None]:
    """Ray Train's own wait for a worker group, as long as ours while the block creates the run's
    controller (Ray hands the driver's value to it): it waits that long again when it restarts a
    group after a lost node. None, for an elastic run, keeps Ray's: its timeouts are how an elastic
    run moves on to a size the cluster has. An operator's explicit setting (the variable in the
    node's environment) stands. Set only for the block, so a later run in this process starts from
    the environment as it was."""
    if seconds is None or RAY_START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[RAY_START_TIMEOUT_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(RAY_START_TIMEOUT_ENV, None)


def cluster_summary(placement: Placement) -> str:
    """What the cluster has free and in all of the resources the run asks for, and what its
    autoscaler could add."""
    import ray

    from deeprecognition.raycluster import cluster_capacity

    free, total, most = ray.available_resources(), ray.cluster_resources(), cluster_capacity()
    keys = [k for k in placement.per_worker if not k.startswith(ACCELERATOR_PREFIX)]
    now = ", ".join(f"{free.get(k, 0):g}/{total.get(k, 0):g} {k}" for k in keys)
    grows = [f"{most[k]:g} {k}" for k in keys if most.get(k, 0) > total.get(k, 0)]
    return f"the cluster has {now} free" + (f"; its autoscaler can grow it to {', '.join(grows)}" if grows else "")


def wait_for_capacity(
    placement: Placement, timeout_s: float, every_s: float = 60, say: Callable[[str], None] = print
) -> float:
    """Hold a placement group of the run's shape until the cluster can place it (its demand is what
    makes an autoscaler start nodes), then free it for Ray Train; a line every `every_s` while
    waiting. Returns the seconds waited; CapacityTimeout after `timeout_s`."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [placement.per_worker] * placement.workers
    group = placement_group(bundles, strategy=placement.strategy)
    start = time.monotonic()
    try:
        if group.wait(timeout_seconds=min(2.0, timeout_s)):
            return time.monotonic() - start
        say(f"waiting for {placement.describe()}: {cluster_summary(placement)}")
        while (left := timeout_s - (time.monotonic() - start)) > 0:
            if group.wait(timeout_seconds=min(every_s, left)):
                waited = time.monotonic() - start
                say(f"{placement.describe()} placed after {_minutes(waited)}")
                return waited
            if timeout_s - (time.monotonic() - start) > 0:
                say(
                    f"still waiting ({_minutes(time.monotonic() - start)}) for {placement.describe()}: "
                    f"{cluster_summary(placement)}"
                )
        raise CapacityTimeout(
            f"no room for {placement.describe()} after {_minutes(timeout_s)} ({cluster_summary(placement)}): "
            "raise --start-timeout, lower --num-workers, or add nodes (cluster/README.md)"
        )
    finally:
        remove_placement_group(group)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{math.floor(seconds / 60)} min {seconds % 60:.0f} s"
