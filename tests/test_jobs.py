"""`deeprec` commands as jobs on a cluster: a Ray head of the test's own (`ray start --head` with a
dashboard), the `ray job submit` CLI, and `python -m deeprecognition ...` as the entrypoint, which
must attach to that head instead of starting a Ray of its own.

The head plays a cluster node: it has S3 credentials in its environment (a node's instance role)
but not the S3 endpoint, which comes with each job's runtime env, as it would for a non-AWS store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from deeprecognition.raycluster import worker_runtime_env
from deeprecognition.runs.catalog import list_runs
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.runs.pull import pull

from .conftest import BUCKET
from .rayhead import REPO, RayHead, smoke_classifier_args


@pytest.fixture(scope="module")
def head(s3: str) -> Iterator[RayHead]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    ray_head = RayHead.start(env, num_cpus=4)
    yield ray_head
    ray_head.stop()


def job_env(s3: str) -> dict:
    """The job's runtime env: the S3 endpoint, and this checkout's source for every process of the
    job (the working dir alone does not put a src/ layout package on the path)."""
    return {"env_vars": {"AWS_ENDPOINT_URL": s3}, "py_modules": ["src/deeprecognition"]}


def submit_and_wait(head: RayHead, submission_id: str, args: list[str], s3: str) -> dict:
    """Submit `python -m deeprecognition ARGS`, wait for the end, and return the job's record."""
    done = head.submit(["python", "-m", "deeprecognition", *args], submission_id, runtime_env=job_env(s3))
    info = head.job(submission_id)
    assert done.returncode == 0 and info["status"] == "SUCCEEDED", (
        f"{info['status']}: {info.get('message')}\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    )
    # The entrypoint's Ray registered with this head: a Ray started by the command would not.
    assert info["driver_info"] is not None, "the job's driver did not attach to the cluster it was submitted to"
    assert "succeeded" in head.jobs_cli("status", submission_id).stdout.lower()  # as a user watches it
    return info


def test_under_a_job_the_driver_leaves_the_jobs_own_env_vars_to_ray(monkeypatch):
    # ray.init refuses a runtime_env that sets a variable the submitted job's runtime env sets.
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "http://store:9000"}}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert worker_runtime_env() == {"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1"}}


def test_a_training_job_submitted_with_ray_job_submit_checkpoints_to_s3(head, packed, s3, tmp_path):
    runs = f"s3://{BUCKET}/jobs"
    submit_and_wait(
        head,
        "train-classifier",
        smoke_classifier_args(packed.dest, runs, "job-cnn", "--preset", "paper-cnn"),
        s3,
    )
    assert "run job-cnn finished" in head.jobs_cli("logs", "train-classifier").stdout
    [run] = list_runs(runs)
    assert run.name == "job-cnn" and len(run.checkpoints) == 1
    assert load_state(run.best.uri)["epoch"] == 0 and run.best.metrics["step"] == 2
    # Ray uploads checkpoints as multipart objects, whose ETags are no digest: the trainer's sha256s are.
    pulled = pull(runs, str(tmp_path), best=True)
    assert pulled.checks["sha256"] == 3 and os.path.isfile(os.path.join(pulled.dest, "state.pt"))


def test_a_smoke_sweep_submitted_with_ray_job_submit_reports_its_trial(head, packed, s3, tmp_path):
    # One depth of the study's table: the sweep machinery end to end, at the price of one trial.
    sweep = tmp_path / "one_depth.yaml"
    sweep.write_text(
        open(os.path.join(REPO, "tune_configs", "cnn_layers.yaml"))
        .read()
        .replace("{grid: [1, 2, 3, 4]}", "{grid: [2]}")
    )
    storage_uri = f"s3://{BUCKET}/job-sweeps"
    submit_and_wait(
        head,
        "tune-smoke",
        ["tune", str(sweep), "--data", packed.dest, "--storage", storage_uri, "--name", "depth2", "--smoke"],
        s3,
    )
    logs = head.jobs_cli("logs", "tune-smoke").stdout
    assert "val/mean_accuracy" in logs
    [run] = list_runs(f"{storage_uri}/depth2")
    assert run.latest.metrics["epoch"] == 1  # the smoke trial's 2 epochs, checkpointed to S3
