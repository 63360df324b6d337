"""Attach to the Ray cluster a command should use: the one in RAY_ADDRESS (or the job's own cluster
under `ray job submit`), else a local Ray of the command's own started on demand with every core of
this machine; let go of it when the command ends; and keep what Ray prints to what a user can act on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
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


# Worker lines of Ray's that no log level reaches and a user cannot act on: unless -v, the driver
# does not print them (the session's log files under RAY_TMPDIR keep them).
_UNACTIONABLE_RAY_LINES = (
    # Ray Train logs each report at INFO through a logger named by its file's path
    # (train/v2/_internal/execution/context.py:54, getLogger(__file__)): outside `ray.train`, whose
    # level RunConfig's LoggingConfig sets, in a worker whose root logger Ray Train sets to INFO.
    r"Reporting training result \d+: ",
    # Ray Train's own PreemptionWatcher (_internal/callbacks/preemption_callback.py:60) gets the
    # workers' actor handles, which Ray passes through the object store, and max_restarts=-1, so
    # Ray's core logs an error at each worker-group start. Only turning the watcher off avoids it,
    # and the loops use it for preemption notices.
    r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store",
    # The raylet, when a sweep's trials and their workers start at once on a few cores.
    r"PYTHON worker processes have been started on node: .* maximum expected startup concurrency",
)


@contextlib.contextmanager
def ray_console(verbose: bool) -> Iterator[None]:
    """Ray's settings of what it prints on this command's console, in the environment while the
    block runs: Ray reads them when it is imported and hands them to the processes it starts. A
    variable the user set is left as it is."""
    settings = {
        k: v
        for k, v in console_env(verbose, attaching=bool(os.environ.get("RAY_ADDRESS"))).items()
        if k not in os.environ
    }
    os.environ.update(settings)
    try:
        yield
    finally:
        for name in settings:
            os.environ.pop(name, None)


def console_env(verbose: bool, attaching: bool) -> dict[str, str]:
    """`attaching`: to RAY_ADDRESS's cluster, whose auth is the cluster's own."""
    env = (
        {} if attaching else {"RAY_AUTH_MODE": "token"}
    )  # Ray's default for a new local cluster: chosen, Ray does not warn it chose it
    # Ray's worker replaces sys.stdout (_private/workers/default_worker.py:286), which Ray Train's
    # print patch takes for a user's redirect and tees (train/v2/_internal/logging/patch_print.py:44):
    # each print of a training worker reached the console twice, from its stdout and its stderr.
    # Ray Train carries this variable from the driver to the controller and the workers.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if verbose:
        return env
    unactionable = "|".join(_UNACTIONABLE_RAY_LINES)
    # Every other line as it comes. Ray's deduplication (which alone applies the skip regex,
    # _private/ray_logging/__init__.py:272-287) folds lines that differ only in numbers and come
    # from different processes into one "[repeated Nx across cluster]" printed seconds later with
    # the last one's numbers: concurrent trials' epochs, a restarted worker group's.
    return env | {"RAY_DEDUP_LOGS_SKIP_REGEX": unactionable, "RAY_DEDUP_LOGS_ALLOW_REGEX": f"^(?!.*(?:{unactionable}))"}


def ensure_ray() -> None:
    """Attach to RAY_ADDRESS's cluster, else start a local Ray of this command's own (see
    `_start_local_ray`)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=worker_runtime_env(), log_to_driver=True, logging_level=ray_log_level())
    else:
        _start_local_ray()


def _start_local_ray() -> None:
    """A local Ray with its dashboard on a port of its own, which every process of the job is told.

    Ray Train's placement-group cleaner asks the state API (the dashboard) once a second whether the
    run's controller lives (train/v2/_internal/execution/controller/placement_group_cleaner.py:78),
    and `ray.util.state` finds a state API by what the machine shows, not by the cluster asking
    (dashboard/utils.py:710): RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else ray_current_cluster,
    else the one raylet `ps` shows and the dashboard address in its GCS. A Ray without a dashboard
    records port 8265 there all the same (dashboard/head.py:514), so the cleaner warned every second
    or, when another Ray's dashboard held 8265, found no such controller and removed our live run's
    workers; beside several Rays it stopped watching. Told its own dashboard, each Ray asks only
    itself, and two commands on one machine both finish. The second joining the first's Ray instead
    would die with the first command, which shuts its Ray down on exit."""
    import ray

    port = _free_local_port()
    env_vars = {
        **(worker_runtime_env() or {}).get("env_vars", {}),
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
    }
    log.info("starting a local Ray with %d CPUs, its dashboard on 127.0.0.1:%d", os.cpu_count() or 1, port)
    ray.init(
        address="local",
        runtime_env={"env_vars": env_vars},
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=True,
        logging_level=ray_log_level(),
    )


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_logging_config():
    """Ray Train's own messages (its `ray.train` loggers in the controller and the workers: worker
    group starts, each checkpoint's path) at Ray's log level."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=logging.getLevelName(ray_log_level()))


def ray_log_level() -> int:
    """Ray's own log level: its INFO messages when this package's are shown (`deeprec -v`),
    else warnings and errors."""
    return logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING


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
