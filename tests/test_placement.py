"""Where a run's workers go (resources, GPU type, packing) and the driver's wait for room for them."""

from __future__ import annotations

import pytest

from deeprecognition.config import ClassifierConfig, GanConfig, apply_overrides
from deeprecognition.runs.placement import (
    CapacityTimeout,
    Placement,
    choose_strategy,
    plan,
    scaling_config,
    wait_for_capacity,
    worker_resources,
)

# Node shapes of cluster/aws.yaml's GPU types (what the autoscaler can start)
L40S = {"CPU": 8, "GPU": 1, "accelerator_type:L40S": 1}
A100x8 = {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}


def gpu_run(*overrides: str, kind: type = ClassifierConfig) -> ClassifierConfig | GanConfig:
    return apply_overrides(kind(), ["scale.gpu=true", *overrides]).validate()


def test_a_gpu_worker_holds_a_gpu_and_a_cpu_per_loader_process_on_the_gpu_type_asked_for():
    assert worker_resources(gpu_run("data.loader_workers=6")) == {"GPU": 1, "CPU": 7}
    assert worker_resources(gpu_run("data.loader_workers=2", "scale.gpu_type=A100", kind=GanConfig)) == {
        "GPU": 1,
        "CPU": 3,
        "accelerator_type:A100": 0.001,
    }
    assert worker_resources(apply_overrides(ClassifierConfig(), ["data.loader_workers=6"])) == {
        "CPU": 1
    }  # a laptop's ranks


def test_a_run_that_fits_on_one_node_is_packed_onto_it_and_spread_only_when_asked():
    need = {"GPU": 8, "CPU": 24}
    assert choose_strategy(need, [L40S, A100x8], spread=False) == "STRICT_PACK"
    assert choose_strategy(need, [L40S], spread=False) == "PACK"  # no node holds 8 GPUs: as few nodes as possible
    assert choose_strategy(need, [L40S, A100x8], spread=True) == "SPREAD"
    # The GPU type counts: 2 L40S ranks fit no single L40S node, even with an 8-GPU A100 node about.
    two_l40s = plan(gpu_run("scale.num_workers=2", "scale.gpu_type=L40S"), shapes=[L40S, A100x8])
    assert two_l40s.strategy == "PACK" and two_l40s.per_worker == {"GPU": 1, "CPU": 3, "accelerator_type:L40S": 0.001}


def test_the_scaling_config_carries_the_placement():
    cfg = gpu_run("scale.num_workers=8", "scale.elastic_min=4", "scale.gpu_type=A100", "data.loader_workers=5")
    placement = plan(cfg, shapes=[A100x8])
    scaling = scaling_config(cfg, placement)
    assert placement.workers == 4 and scaling.num_workers == (4, 8) and scaling.placement_strategy == "STRICT_PACK"
    assert scaling.accelerator_type == "A100" and scaling.resources_per_worker == {"GPU": 1, "CPU": 6}
    assert (
        scaling._resources_per_worker_not_none == placement.per_worker
    )  # what Ray reserves is what the driver waited for


def test_a_gpu_type_without_gpus_is_refused_by_field():
    with pytest.raises(ValueError, match=r"scale.gpu_type=H100 needs scale.gpu=true \(--gpu\)"):
        apply_overrides(GanConfig(), ["scale.gpu_type=H100"]).validate()


def test_the_driver_waits_for_room_says_so_every_interval_and_gives_up_after_the_timeout(ray_cluster):
    import ray

    lines: list[str] = []
    too_big = Placement(workers=2, max_workers=2, per_worker={"CPU": 1000.0}, strategy="PACK")
    with pytest.raises(
        CapacityTimeout,
        match=r"no room for 2 workers of \{CPU: 1000\} \(PACK\) after 3 s \(the cluster has [\d.]+/4 CPU free\)",
    ):
        wait_for_capacity(too_big, timeout_s=3, every_s=1, say=lines.append)
    assert lines[0].startswith("waiting for 2 workers of {CPU: 1000} (PACK): the cluster has")
    assert any(line.startswith("still waiting (") for line in lines)
    # Its placement group is gone: nothing of the cluster stays held for a run that never started.
    groups = ray.util.placement_group_table().values()
    assert not [g for g in groups if g["state"] != "REMOVED" and g["bundles"] and g["bundles"][0].get("CPU") == 1000.0]
    fits = Placement(workers=1, max_workers=1, per_worker={"CPU": 1.0}, strategy="STRICT_PACK")
    lines.clear()
    assert wait_for_capacity(fits, timeout_s=30, say=lines.append) < 30 and lines == []  # room now: no line at all


def test_rays_own_start_timeout_is_the_runs_while_it_starts_and_an_elastic_runs_stays_rays(monkeypatch):
    import os

    from deeprecognition.runs.placement import RAY_START_TIMEOUT_ENV, ray_start_timeout

    monkeypatch.delenv(RAY_START_TIMEOUT_ENV, raising=False)
    with ray_start_timeout(1800):
        assert os.environ[RAY_START_TIMEOUT_ENV] == "1800"  # what Ray hands the run's controller
    assert RAY_START_TIMEOUT_ENV not in os.environ  # a later run in this process (a test's driver) starts clean
    with ray_start_timeout(None):
        assert RAY_START_TIMEOUT_ENV not in os.environ
    monkeypatch.setenv(RAY_START_TIMEOUT_ENV, "10")  # the operator's
    with ray_start_timeout(1800):
        assert os.environ[RAY_START_TIMEOUT_ENV] == "10"
