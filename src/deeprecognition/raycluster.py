"""Attach to the Ray cluster a command should use: the one in RAY_ADDRESS (or the job's own cluster
under `ray job submit`), else a local Ray started on demand with every core of this machine; and
let go of it when the command ends."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Variables a Ray worker on another node needs to reach the same object store as the driver.
# Credentials are deliberately absent: on a cluster they come from each node's instance role.
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def worker_runtime_env() -> dict | None:
    """The object-store settings of this process, as a Ray runtime_env for its tasks, less those
    the job's own runtime env already gives every worker."""
    job_env = _submitted_job_env_vars()
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k) and k not in job_env}
    return {"env_vars": env_vars} if env_vars else None


def _submitted_job_env_vars() -> dict[str, str]:
    """env_vars of `ray job submit --runtime-env-json`, which Ray hands the entrypoint in
    RAY_JOB_CONFIG_JSON_ENV_VAR: ray.init refuses a runtime_env that sets any of them again."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def ensure_ray(dashboard: bool = False) -> None:
    """`dashboard`: a local Ray with its dashboard, whose state API Ray needs to free the placement
    groups of the trials that ASHA stops (without it, later trials wait for workers forever)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = worker_runtime_env()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray with %d CPUs", os.cpu_count() or 1)
        ray.init(address="local", runtime_env=runtime_env, include_dashboard=dashboard, log_to_driver=True)


@contextlib.contextmanager
def shutdown_ray_started_inside() -> Iterator[None]:
    """Shut down on the way out a Ray that the block connected this process to (a local one it
    started, or RAY_ADDRESS's). Ray prints the worker lines it holds back for deduplication when it
    disconnects (`[repeated Nx across cluster]`; else at interpreter exit), so they are printed here,
    inside whatever redirect surrounds the block. A Ray this process had before (a test session's
    cluster) is left running."""
    connected_before = _ray_connected()
    try:
        yield
    finally:
        if not connected_before and _ray_connected():
            import ray

            ray.shutdown()


def _ray_connected() -> bool:
    # Without importing Ray (seconds) in commands that never use it.
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def cluster_capacity() -> dict[str, float]:
    """The most of each resource this cluster can ever hold: its autoscaler's node types at their
    max counts when it has an autoscaler (GPU nodes may not exist yet), else what it has now."""
    import ray
    from ray._private.state import state  # what Ray Train itself asks before placing workers

    return dict(state.get_max_resources_from_cluster_config() or ray.cluster_resources())


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
