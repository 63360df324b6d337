"""kill -9 in the middle of a write, for real: Ray's own checkpoint upload and `checkpoints pull`
stopped through a store that stalls (tests/faultproxy.py), then run again. Nothing partial is ever
taken for whole; the rerun completes exactly. The other faults: test_faults.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from deeprecognition import storage
from deeprecognition.errors import InputError
from deeprecognition.runs.catalog import best_checkpoint, list_runs
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.runs.pull import pull

from .conftest import BUCKET
from .damage import truncate
from .fault_fixtures import fake_checkpoint, proxy_to, tree
from .rayhead import REPO, _session_members


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout_s: float = 120) -> None:
    """SIGKILL `proc` and everything it started once `ready()` holds."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"{what}: the process ended first:\n{proc.stdout.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    for pid in _session_members(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.wait()


UPLOAD = """
import sys
from ray.train.v2._internal.execution.storage import _upload_to_fs_path, get_fs_and_path
fs, path = get_fs_and_path(sys.argv[2])
_upload_to_fs_path(sys.argv[1], fs, path)
"""


def test_kill_9_during_a_checkpoint_upload_leaves_nothing_taken_for_a_checkpoint(s3, tmp_path):
    run = f"s3://{BUCKET}/killed-upload"
    fake_checkpoint(tmp_path / "ok", 0)
    fake_checkpoint(tmp_path / "killed", 1, values=3_000_000)
    for name in os.listdir(tmp_path / "ok"):  # the run already has a whole checkpoint
        storage.write_bytes_atomic(f"{run}/checkpoint_000000/{name}", (tmp_path / "ok" / name).read_bytes())
    # Ray's own upload of the next checkpoint, through a store that stops answering once state.pt is under way
    proxy = proxy_to(s3, cut_every=0, stall_request_after=500_000)
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url)
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOAD, str(tmp_path / "killed"), f"{run}/checkpoint_000001"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Killed once the small files are up and state.pt is stuck: a folder without checksums.json
        # or state.pt yet is no checkpoint folder at all (never listed, not even as incomplete).
        small = ("metrics.json", "checksums.json")
        _kill_when(
            proc,
            lambda: proxy.stalls > 0 and all(storage.exists(f"{run}/checkpoint_000001/{n}") for n in small),
            "upload under way",
        )
    finally:
        proxy.stop()
    left = set(storage.list_names(f"{run}/checkpoint_000001"))
    assert "metrics.json" in left and left < set(
        os.listdir(tmp_path / "killed")
    )  # S3 shows whole objects, never whole folders
    [listed] = list_runs(run)
    assert [c.name for c in listed.checkpoints] == ["checkpoint_000000"]
    [(name, why)] = listed.incomplete
    assert name == "checkpoint_000001" and (
        "missing: an interrupted upload" in why or "no readable checksums.json" in why
    )
    assert best_checkpoint(run).endswith("checkpoint_000000")  # what evaluate and generate load
    with pytest.raises(InputError, match="checkpoint_000001: an incomplete checkpoint"):
        pull(run, str(tmp_path / "pulled"))
    # On a local disk a killed copy leaves a short file in place: seen and refused the same way.
    local = tmp_path / "local-run"
    shutil.copytree(tmp_path / "ok", local / "checkpoint_000000")
    shutil.copytree(tmp_path / "killed", local / "checkpoint_000001")
    truncate(str(local / "checkpoint_000001" / "state.pt"), 1_000_000)
    assert "checkpoint_000001" in dict(list_runs(str(local))[0].incomplete)
    with pytest.raises(InputError, match="do not match its checksums.json"):
        load_state(str(local / "checkpoint_000001"))
    # The rerun uploads it whole: from then on it is a checkpoint like any other.
    subprocess.run(
        [sys.executable, "-c", UPLOAD, str(tmp_path / "killed"), f"{run}/checkpoint_000001"], check=True, timeout=120
    )
    assert [c.name for c in list_runs(run)[0].checkpoints] == ["checkpoint_000001", "checkpoint_000000"]
    assert load_state(f"{run}/checkpoint_000001")["epoch"] == 1


def test_kill_9_during_a_pull_leaves_no_whole_looking_folder_and_the_rerun_is_exact(s3, tmp_path):
    run = f"s3://{BUCKET}/killed-pull/run"
    for e in range(2):
        fake_checkpoint(tmp_path / "src" / f"checkpoint_00000{e}", e, values=2_000_000)
        for name in os.listdir(tmp_path / "src" / f"checkpoint_00000{e}"):
            storage.write_bytes_atomic(
                f"{run}/checkpoint_00000{e}/{name}", (tmp_path / "src" / f"checkpoint_00000{e}" / name).read_bytes()
            )
    dest = tmp_path / "dest"
    proxy = proxy_to(s3, cut_every=0, stall_response_after=2_000_000)  # every download hangs 2 MB in
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deeprecognition", "checkpoints", "pull", run, str(dest), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )
    try:
        _kill_when(proc, lambda: proxy.stalls >= 2, "two downloads under way")
    finally:
        proxy.stop()
    assert os.listdir(dest) == [".run.partial"]  # nothing named like the run until all of it is verified
    with pytest.raises(InputError, match="no complete checkpoints"):
        list_runs(str(dest))
    report = pull(run, str(dest))
    assert report.fetched + report.kept == report.files == 8
    assert tree(dest / "run") == {
        f"{c}/{k}": v for c in os.listdir(tmp_path / "src") for k, v in tree(tmp_path / "src" / c).items()
    }
    assert os.listdir(dest) == ["run"]
