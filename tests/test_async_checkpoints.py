"""Checkpoints and rank 0's writes that do not stall every rank: periodic checkpoints uploaded in the
background (Ray's ASYNC mode) that land whole and resume, the last one synchronous; classifiers
checkpointing every N epochs; the background writer's bounded queue and its errors; a metrics log
written in linear bytes that reads back as the history, each line once, across resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from deeprecognition import storage
from deeprecognition.cli import main
from deeprecognition.config import to_dict
from deeprecognition.errors import InputError
from deeprecognition.gan import loop as gan_loop
from deeprecognition.launch import run
from deeprecognition.runs import session as session_module
from deeprecognition.runs.background import BackgroundWriteError, BackgroundWriter
from deeprecognition.runs.catalog import list_runs
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.runs.report import METRICS_LOG, PARTS, RunLog, read_history
from deeprecognition.runs.session import UploadFolders

from .conftest import BUCKET
from .test_classifier import _train_worker_pids, config
from .test_gan import gan_config

# ----- the background writer -------------------------------------------------------------------


def test_the_background_writer_keeps_order_pushes_back_and_raises_a_failure_at_the_next_call():
    done, release = [], threading.Event()
    writer = BackgroundWriter(capacity=1)
    writer.submit("held", release.wait)  # the thread is busy with this one
    writer.submit("first", done.append, 1)  # the queue's one place
    third = threading.Thread(target=writer.submit, args=("second", done.append, 2))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # a full queue makes the loop wait: no unbounded memory behind a slow store
    release.set()
    third.join()
    writer.drain()
    assert done == [1, 2]

    def disk_full() -> None:
        raise OSError("No space left on device")

    writer.submit("mosaics/iter-000050.png", disk_full)
    writer.submit("metrics.jsonl", done.append, 3)  # skipped: the run stops with the failure
    with pytest.raises(BackgroundWriteError, match=r"mosaics/iter-000050.png failed: OSError: No space left") as failed:
        writer.drain()
    assert isinstance(failed.value.__cause__, OSError) and done == [1, 2]
    with pytest.raises(BackgroundWriteError):  # and at every call after
        writer.submit("anything", done.append, 4)
    with pytest.raises(BackgroundWriteError):
        writer.close()


def test_a_failed_mosaic_write_stops_the_gan_loop_with_its_error(faces64, tmp_path, monkeypatch):
    real_write = storage.write_bytes_atomic

    def store_refuses_mosaics(uri: str, data: bytes) -> None:
        if "/mosaics/" in uri:
            raise PermissionError(f"{uri}: access denied")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", store_refuses_mosaics)
    with pytest.raises(BackgroundWriteError, match=r"iter-000003.png failed: PermissionError"):
        gan_loop.train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 6)))


def test_at_most_two_checkpoint_folders_wait_for_their_upload(tmp_path):
    folders = UploadFolders(root=str(tmp_path))
    first, second = folders.next(), folders.next()
    for folder in (first, second):
        os.makedirs(folder)  # written, handed to Ray, not uploaded yet
    third: list[str] = []
    waiting = threading.Thread(target=lambda: third.append(folders.next()))
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive() and not third  # a third waits for an upload to end
    os.rmdir(first)  # what Ray does once that upload is done
    waiting.join()
    assert third[0] not in (first, second)


def test_a_killed_workers_checkpoint_folders_go_when_the_next_process_uploads(tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "UPLOADS", str(tmp_path))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    left = tmp_path / gone.stdout.strip() / "checkpoint-000002"  # what a worker killed mid-upload leaves
    left.mkdir(parents=True)
    folders = UploadFolders()
    assert folders.root == str(tmp_path / str(os.getpid())) and os.listdir(tmp_path) == [str(os.getpid())]


# ----- the metrics log -------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path, s3) -> str:
    return str(tmp_path / "run") if request.param == "local" else f"s3://{BUCKET}/logs/{tmp_path.name}/run"


def _log(log: RunLog, epochs: range, value: float) -> None:
    for epoch in epochs:
        log.log({"epoch": epoch, "step": 10 * epoch, "val/mean_accuracy": value})


def test_the_metrics_log_reads_back_as_the_history_across_resumes_each_line_once(run_uri, monkeypatch):
    with BackgroundWriter() as writer:  # the first run: epochs 0-5, then it dies (no close)
        _log(RunLog(run_uri, {"name": "r"}, resume_at=0, writer=writer), range(6), 0.1)
    assert [m["epoch"] for m in read_history(run_uri)] == list(range(6))
    if not storage.is_remote(run_uri):  # killed in the middle of an append: the cut line is not read
        with open(os.path.join(run_uri, METRICS_LOG), "ab") as f:
            f.write(b'{"epoch": 6, "st')
    assert [m["epoch"] for m in read_history(run_uri)] == list(range(6))

    # Every state a reader can meet while the resumed run folds the log (before each removal)
    seen, real_remove = [], storage.remove
    monkeypatch.setattr(storage, "remove", lambda uri: (seen.append(read_history(run_uri)), real_remove(uri)))
    written, real_write = [], storage.write_bytes_atomic
    monkeypatch.setattr(
        storage, "write_bytes_atomic", lambda uri, data: (written.append((uri, len(data))), real_write(uri, data))
    )

    with BackgroundWriter() as writer:  # resumed from the checkpoint of epoch 3: epochs 4 and 5 are trained again
        log = RunLog(run_uri, {"name": "r"}, resume_at=4, writer=writer)
        assert [(m["epoch"], m["val/mean_accuracy"]) for m in read_history(run_uri)] == [(e, 0.1) for e in range(4)]
        _log(log, range(4, 30), 0.2)
        writer.drain()
        assert [m["epoch"] for m in read_history(run_uri)] == list(range(30))
        log.close()
    expected = [(e, 0.1) for e in range(4)] + [(e, 0.2) for e in range(4, 30)]
    assert all([(m["epoch"], m["val/mean_accuracy"]) for m in state] in (expected[:4], expected) for state in seen)
    assert [(m["epoch"], m["val/mean_accuracy"]) for m in read_history(run_uri)] == expected
    # metrics.jsonl alone holds the whole history at the end, as users and docs read it
    whole = storage.read_bytes(storage.join(run_uri, METRICS_LOG)).decode().splitlines()
    assert [(m["epoch"], m["val/mean_accuracy"]) for m in map(json.loads, whole)] == expected
    assert not storage.list_names(storage.join(run_uri, PARTS))
    if storage.is_remote(run_uri):
        assert len(seen) == 6 + 1 + 26  # the first run's parts, the resume's marker, this run's parts
        # Linear: each line sent once in a part, then once more in the fold (a rewrite per flush: 13x).
        log_bytes = sum(n for uri, n in written if "/metrics.jsonl" in uri)
        assert log_bytes < 3 * len("\n".join(whole))


# ----- Ray Train runs ---------------------------------------------------------------------------


def _fit_killing_a_worker_after_a_checkpoint(cfg, run_uri: str):
    """Fit on Ray in a thread; SIGKILL the worker once the run has a whole checkpoint in storage
    (a background one), wait for the end; returns Ray's Result."""
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=run(cfg)))
    fit.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and fit.is_alive():
        try:
            if list_runs(run_uri)[0].checkpoints:
                break
        except InputError:  # no whole checkpoint yet
            time.sleep(0.1)
    victims = _train_worker_pids()
    assert victims, "no training worker alive after the first checkpoint"
    os.kill(min(victims), signal.SIGKILL)
    fit.join(timeout=400)
    return outcome["result"]


def test_background_checkpoints_land_whole_resume_after_a_kill_and_the_last_is_there_when_fit_returns(faces64, s3):
    iterations, every = 300, 25
    run_uri = f"s3://{BUCKET}/async-runs/g"
    cfg = gan_config(
        faces64,
        f"s3://{BUCKET}/async-runs",
        iterations,
        "scale.num_workers=1",
        "scale.max_failures=1",
        f"schedule.checkpoint_every={every}",
        "schedule.log_every=5",
        "schedule.mosaic_every=100",
    )
    result = _fit_killing_a_worker_after_a_checkpoint(cfg, run_uri)
    assert result.error is None and result.metrics["iteration"] == iterations
    # The last checkpoint is synchronous: in storage, whole, when fit() returns.
    final = load_state(f"s3://{result.checkpoint.path}")
    assert final["iteration"] == iterations
    [listed] = list_runs(run_uri)
    assert listed.latest.uri == f"s3://{result.checkpoint.path}"
    # Ray keeps the latest two, whole. What else is listed is whole too: a checkpoint whose upload
    # ended just before the kill, which Ray never registered (a killed upload is never listed).
    assert [c.metrics["iteration"] for c in listed.checkpoints][:2] == [iterations, iterations - every]
    assert all(load_state(c.uri)["iteration"] == c.metrics["iteration"] for c in listed.checkpoints)
    # Resumed from a background checkpoint, then every iteration logged once: the lines after it were logged again.
    logged = [m["iteration"] for m in read_history(run_uri)]
    assert logged == list(range(5, iterations + 1, 5))
    assert [
        json.loads(line)["iteration"] for line in storage.read_bytes(f"{run_uri}/{METRICS_LOG}").decode().splitlines()
    ] == logged
    assert not storage.list_names(f"{run_uri}/{PARTS}")
    assert {"iter-000100.png", "iter-000200.png", "iter-000300.png", "contact-sheet.png"} <= set(
        storage.list_names(f"{run_uri}/mosaics")
    )


def test_a_classifier_checkpoints_every_n_epochs_and_logs_every_epoch(faces64, tmp_path):
    cfg = config(
        faces64,
        str(tmp_path),
        "name=every2",
        "optim.epochs=3",
        "optim.steps_per_epoch=3",
        "optim.checkpoint_every=2",
        "scale.keep_checkpoints=3",
    )
    result = run(cfg)
    assert result.error is None and result.metrics["epoch"] == 2
    [listed] = list_runs(str(tmp_path / "every2"))
    assert sorted(c.metrics["epoch"] for c in listed.checkpoints) == [1, 2] and not listed.incomplete  # epochs 2 and 3
    assert load_state(result.checkpoint.path)["epoch"] == 2
    assert [m["epoch"] for m in read_history(str(tmp_path / "every2"))] == [0, 1, 2]


def test_bench_checkpoint_times_both_modes_through_a_slow_link(capsys):
    assert (
        main(
            [
                "bench",
                "checkpoint",
                "--size-mb",
                "4",
                "--bandwidth-mbps",
                "8",
                "--steps",
                "1",
                "--compute-s",
                "0.5",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [len(result["blocked_s_each"][m]) for m in ("sync", "async")] == [1, 1]
    # The warm-up, one synchronous and one background checkpoint, all whole in the bench's S3
    assert result["complete_checkpoints"] == 3 and result["incomplete_checkpoints"] == 0
    assert result["uploaded_mb"] >= 3 * 4


def test_bench_checkpoint_without_moto_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "moto.server", None)  # as if moto were not installed
    assert main(["bench", "checkpoint"]) == 2
    assert "pip install -e '.[test]'" in capsys.readouterr().err
