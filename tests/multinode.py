"""One deeprec training run on a multi-node Ray cluster on this machine, while a node goes away.

`ray.cluster_utils.Cluster` starts a head (no CPUs: it only holds the driver and Ray Train's
controller) and two one-CPU worker nodes, each a raylet of its own: a training worker per node, as
on a cluster of one-GPU machines. Run by tests/test_multinode.py as a subprocess
(`python tests/multinode.py SPEC.json`), so that this cluster never meets the test session's Ray:

- `lose-node`: once Ray has registered the run's first checkpoint, the second node is killed outright
  (`remove_node(allow_graceful=False)`: a machine that dies); with `replace_after_s` a new node joins
  that long after (what the autoscaler does), else the run carries on with what is left;
- `drain-node`: once training has started, the second node is drained as a preemption with a
  deadline (the GCS call a `ray start` node makes on SIGTERM, and a spot-notice watcher or the
  autoscaler makes on AWS's two-minute warning); once Ray has registered the loops' preemption
  checkpoint, the node is reclaimed (killed), and replaced as above when asked.

The outcome (Ray's result or error, and what happened when) goes to SPEC["out"] as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

# Every process of this cluster inherits this environment. Ray Train's preemption watcher polls the
# GCS every 5 s by default; a worker group that cannot be placed (an elastic run deciding its size
# while the dead node's resources still count) is given up on after 60 s.
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
os.environ.pop("RAY_ADDRESS", None)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from deeprecognition.config import ClassifierConfig, GanConfig, from_dict  # noqa: E402
from deeprecognition.launch import run  # noqa: E402
from deeprecognition.storage import exists, join, read_bytes  # noqa: E402

# A dead raylet is declared dead after 3 missed 1 s health checks instead of 5 missed 3 s ones. The
# dashboard serves the state API that Ray Train's placement group cleaner watches the run with.
HEAD = {
    "num_cpus": 0,
    "include_dashboard": True,
    "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
}


def latest(run_uri: str) -> dict[str, Any] | None:
    """The metrics of the latest checkpoint Ray Train has registered for the run, from the snapshot
    its controller keeps in storage: what a restart resumes from. (A checkpoint already uploaded
    but not yet registered when its node dies is not resumed from.)"""
    try:
        snapshot = json.loads(read_bytes(join(run_uri, "checkpoint_manager_snapshot.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("metrics")


def wait_for(what: str, condition, fit: threading.Thread, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not fit.is_alive():
            raise RuntimeError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)


def drain(cluster: Cluster, node, deadline_s: float) -> None:
    """Mark a node as being preempted, as its SIGTERM handler or a spot-notice watcher does."""
    from ray.core.generated import autoscaler_pb2

    accepted, why = cluster.head_node.get_gcs_client().drain_node(
        node.node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot reclaim (test)",
        int((time.time() + deadline_s) * 1000),
    )
    assert accepted, why


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    cfg = from_dict(GanConfig if spec["kind"] == "gan" else ClassifierConfig, spec["config"])
    run_uri = join(cfg.storage, cfg.name)
    # Ray processes that look for "the" cluster (Ray Train's placement group cleaner does) must find
    # this one, not another Ray on the machine: the head's address is fixed first and exported.
    port = _free_port()
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    cluster = Cluster(
        initialize_head=True, head_node_args={**HEAD, "gcs_server_port": port, "dashboard_port": _free_port()}
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=True)
    cluster.wait_for_nodes()
    events: dict[str, Any] = {"started": time.time()}
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            result = run(cfg)
            outcome.update(metrics=result.metrics, error=repr(result.error) if result.error else None)
        except Exception as err:  # noqa: BLE001 - reported to the test as data
            outcome.update(metrics=None, error=f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=fit)
    thread.start()
    try:
        if spec["scenario"] == "lose-node":
            wait_for("registered checkpoint", lambda: latest(run_uri), thread)
        else:
            wait_for("training start", lambda: exists(join(run_uri, "training_options.json")), thread)
            time.sleep(spec.get("drain_after_s", 0))
            drain(cluster, nodes[1], spec["deadline_s"])
            events["drained"] = time.time()
            wait_for("preemption checkpoint", lambda: (latest(run_uri) or {}).get("preemption_checkpoint"), thread)
        events["latest_when_lost"] = latest(run_uri)
        cluster.remove_node(nodes[1], allow_graceful=False)
        events["lost"] = time.time()
        if spec.get("replace_after_s") is not None:
            time.sleep(spec["replace_after_s"])
            cluster.add_node(num_cpus=1)
            events["replaced"] = time.time()
    finally:
        thread.join()
        events["ended"] = time.time()
        with open(spec["out"], "w") as f:
            json.dump({**outcome, "events": events}, f, indent=1, default=str)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
