"""A job submitted to a cluster that has no room for its workers yet, as on an autoscaling cluster
whose GPU nodes boot from zero: a head with no CPU (`ray start --head --num-cpus 0`), the job
submitted with `ray job submit`, and the only worker node joining 75 s later. Ray Train's own wait
for a worker group is lowered to 10 s on the cluster, as a slow node beats its 60 s default the
same way: without the driver's own wait, the run would end in `ControllerError: The worker group
startup timed out` after its controller's 3 retries."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from deeprecognition.runs.catalog import list_runs
from deeprecognition.runs.placement import RAY_START_TIMEOUT_ENV

from .rayhead import RayHead, smoke_classifier_args

NODE_JOINS_AFTER_S = 75


@pytest.fixture
def empty_head() -> Iterator[RayHead]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env[RAY_START_TIMEOUT_ENV] = "10"
    head = RayHead.start(env, num_cpus=0)
    yield head
    head.stop()


def test_a_job_waits_for_the_worker_node_that_joins_after_ray_trains_start_timeout(empty_head, packed, tmp_path):
    joins = threading.Timer(NODE_JOINS_AFTER_S, empty_head.join_node, kwargs={"num_cpus": 2})
    joins.start()
    try:
        done = empty_head.submit(
            [
                "python",
                "-m",
                "deeprecognition",
                *smoke_classifier_args(packed.dest, str(tmp_path), "cold", "--preset", "paper-cnn"),
            ],
            "cold-start",
            runtime_env={"py_modules": ["src/deeprecognition"]},
        )
    finally:
        joins.cancel()
    info = empty_head.job("cold-start")
    logs = empty_head.jobs_cli("logs", "cold-start").stdout
    assert done.returncode == 0 and info["status"] == "SUCCEEDED", (
        f"{info['status']}: {info.get('message')}\n{logs[-4000:]}"
    )
    # The wait is visible: what the run waits for and what the cluster has, then a line a minute.
    assert "waiting for 1 worker of {CPU: 1} (PACK): the cluster has 0/0 CPU free" in logs
    assert "still waiting (6" in logs and "placed after" in logs
    [run] = list_runs(str(tmp_path))
    assert run.name == "cold" and run.latest.metrics["step"] == 2
