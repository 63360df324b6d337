"""`deeprec train` as a person runs it on a laptop: two commands at once, each starting a local Ray
of its own, both finish; the console shows one line per epoch, and Ray's internals only with -v."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from deeprecognition.raycluster import console_env, ray_console

EPOCHS = 2
# What a user cannot act on: Ray's warnings and errors, its C++ core's error lines, tracebacks.
UNACTIONABLE = re.compile(r"ERROR|WARNING|Warning|Traceback|Failed to query|core_worker\.cc|\] E ")
# The lines Ray printed on every run before (from a `make demo`), which the console now leaves out.
RAY_LINES = (
    "\x1b[36m(RayTrainWorker pid=12029)\x1b[0m Reporting training result 3: TrainingReport(checkpoint=None, "
    "metrics={'epoch': 2}) from rank 0",
    "\x1b[36m(TrainController pid=11884)\x1b[0m [2026-12-01 16:22:54,828 E 11884 11923] core_worker.cc:2465: Actor "
    "with class name: "
    "'PreemptionWatcher' and ID: 'f70181b03358216e5831b6fc01000000' has constructor arguments in the object store and "
    "max_restarts > 0.",
    "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: "
    "2c226e6fa776b78679e670154980944621fa5abb1eca9159807c1082 "
    "with address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be a result of "
    "using a large number of actors.",
)
OUR_LINE = "epoch 1/2  loss 0.6915  val acc 0.6224 (majority 0.5663)  77 img/s"


def _laptop_env(ray_tmpdir: str) -> dict[str, str]:
    """This process's environment as a user's shell has it: no Ray setting (the test session's
    ray.init sets some here), and one temp dir for both commands, as /tmp/ray is on a laptop; the
    test session's Ray keeps its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_TMPDIR": ray_tmpdir}


def _lines(output: str) -> list[str]:
    return [
        line for line in re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines() if line.strip()
    ]  # Ray colours its prefixes


@pytest.fixture(scope="module")
def two_runs(packed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, list[str]]]]:
    """`deeprec train classifier` twice at once, the second with -v: name -> (exit code, console lines)."""
    runs = tmp_path_factory.mktemp("console-runs")
    ray_tmpdir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    train = [
        "train",
        "classifier",
        "--data",
        packed.dest,
        "--layers",
        "1",
        "--num-workers",
        "1",
        "--epochs",
        str(EPOCHS),
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "16",
        "--storage",
        str(runs),
        "--set",
        "data.loader_workers=0",
    ]
    commands = {"quiet": [*train, "--name", "quiet"], "verbose": ["-v", *train, "--name", "verbose"]}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "deeprecognition", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_laptop_env(ray_tmpdir),
        )
        for name, argv in commands.items()
    }
    yield {name: _finish(proc) for name, proc in procs.items()}
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


def _finish(proc: subprocess.Popen) -> tuple[int, list[str]]:
    output, _ = proc.communicate()
    return proc.returncode, _lines(output)


def _epoch_lines(lines: list[str], epoch: int) -> list[str]:
    return [line for line in lines if re.search(rf"\bepoch {epoch}/{EPOCHS}  loss ", line)]


def test_two_local_runs_at_once_both_finish(two_runs):
    for name, (code, lines) in two_runs.items():
        assert code == 0, "\n".join(lines[-40:])
        assert any(line.startswith(f"run {name} finished") for line in lines), name


def test_a_run_prints_one_line_per_epoch_and_nothing_a_user_cannot_act_on(two_runs):
    _, lines = two_runs["quiet"]
    assert [line for line in lines if UNACTIONABLE.search(line)] == []
    for epoch in range(1, EPOCHS + 1):
        assert len(_epoch_lines(lines, epoch)) == 1, lines
    assert len(lines) == EPOCHS + 1, lines  # the epochs and the run's summary: nothing of Ray's


def test_verbose_shows_rays_internals_and_each_epoch_once(two_runs):
    _, lines = two_runs["verbose"]
    assert any("Started training worker group" in line for line in lines)  # Ray Train's controller, at INFO
    assert any("Reporting training result" in line for line in lines)  # Ray Train's worker, unfiltered
    for epoch in range(1, EPOCHS + 1):
        assert len(_epoch_lines(lines, epoch)) == 1, (
            lines
        )  # a worker's print once, not from its stdout and again its stderr


def test_the_console_leaves_out_rays_unactionable_lines_only_and_folds_none():
    env = console_env(verbose=False, attaching=False)
    skip, allow = re.compile(env["RAY_DEDUP_LOGS_SKIP_REGEX"]), re.compile(env["RAY_DEDUP_LOGS_ALLOW_REGEX"])
    assert all(skip.search(line) and not allow.search(line) for line in RAY_LINES)  # Ray reads allow first
    assert allow.search(OUR_LINE) and not skip.search(
        OUR_LINE
    )  # printed as it comes, never folded with another trial's
    # The same error about another actor (one of ours, say) is one to act on.
    other_actor = RAY_LINES[1].replace("PreemptionWatcher", "Session")
    assert allow.search(other_actor) and not skip.search(other_actor)
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert env["RAY_AUTH_MODE"] == "token"  # chosen, so Ray does not warn that it chose it


def test_verbose_or_a_cluster_address_leave_rays_settings_alone():
    env = console_env(verbose=True, attaching=True)
    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in env and "RAY_DEDUP_LOGS_ALLOW_REGEX" not in env  # Ray's own folding
    assert "RAY_AUTH_MODE" not in env  # the cluster's own auth, whatever it is


def test_the_settings_last_as_long_as_the_command_and_a_users_own_win(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    before = dict(os.environ)
    with ray_console(verbose=False):
        assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine"
        assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert dict(os.environ) == before  # in-process callers (tests) keep their environment
