"""`deeprec checkpoints list|pull`: runs and checkpoints in S3 (the moto server) ranked best first,
pulled in parallel and verified, whole or not at all, resumed after an interruption, and object
keys that would escape DEST refused."""

from __future__ import annotations

import json
import os

import boto3
import pytest
import torch

from deeprecognition import storage
from deeprecognition.cli import main
from deeprecognition.errors import InputError
from deeprecognition.runs import pull as pull_module
from deeprecognition.runs.catalog import best, best_checkpoint, list_runs
from deeprecognition.runs.checkpoint import load_state, write_checkpoint
from deeprecognition.runs.pull import pull

from .conftest import BUCKET

# run -> checkpoint name -> metrics, as the classifier and the GAN write them
RUNS = {
    "cnn-a": {
        f"checkpoint_00000{e}": {"epoch": e, "step": 10 * (e + 1), "val/mean_accuracy": acc}
        for e, acc in enumerate((0.6, 0.8, 0.7))
    },
    "cnn-b": {"checkpoint_000000": {"epoch": 0, "step": 10, "val/mean_accuracy": 0.9}},
    "sweep/trial_1/gan": {
        "checkpoint_000100": {"iteration": 100},
        "checkpoint_000200": {"iteration": 200, "fid": 40.5},
        "checkpoint_000300": {"iteration": 300, "fid": 55.0},
    },
}


def _upload_folder(local: str, uri: str) -> None:
    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f:
            storage.write_bytes_atomic(storage.join(uri, name), f.read())


@pytest.fixture(scope="module")
def store(s3, tmp_path_factory) -> str:
    """Run storage in S3 holding RUNS, each checkpoint with real state.pt, config.json, metrics.json
    and checksums.json, plus the run files a run leaves beside them."""
    root = f"s3://{BUCKET}/ckpt-store"
    scratch = tmp_path_factory.mktemp("checkpoints")
    for run, checkpoints in RUNS.items():
        for i, (name, metrics) in enumerate(checkpoints.items()):
            state = {"config": {"name": run}, "model": {"w": torch.full((20_000,), float(i))}, **metrics}
            write_checkpoint(str(scratch / run / name), state, metrics)
            _upload_folder(str(scratch / run / name), f"{root}/{run}/{name}")
        storage.write_bytes_atomic(
            f"{root}/{run}/metrics.jsonl", b"".join(json.dumps(m).encode() + b"\n" for m in checkpoints.values())
        )
    return root


def test_list_ranks_runs_and_checkpoints_best_first(store, capsys):
    runs = list_runs(store)
    assert [r.name for r in runs] == [
        "sweep/trial_1/gan",
        "cnn-b",
        "cnn-a",
    ]  # FID-ranked first, then by validation accuracy
    gan, _, cnn_a = runs
    assert [c.name for c in gan.checkpoints] == [
        "checkpoint_000200",
        "checkpoint_000300",
        "checkpoint_000100",
    ]  # no FID: last
    assert [c.name for c in cnn_a.checkpoints] == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000000"]
    assert cnn_a.best.metrics["val/mean_accuracy"] == 0.8 and cnn_a.best.position() == "epoch 1 (step 20)"
    assert cnn_a.bytes == sum(c.bytes for c in cnn_a.checkpoints) + storage.size(f"{store}/cnn-a/metrics.jsonl")
    assert list_runs(f"{store}/cnn-a/checkpoint_000002")[0].best.metrics["epoch"] == 2  # one checkpoint lists too
    assert main(["checkpoints", "list", store]) == 0
    out = capsys.readouterr().out
    assert "ranked by fid (lower is better)" in out and "* checkpoint_000001" in out and "iteration 200" in out
    assert main(["checkpoints", "list", f"{store}/cnn-a", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (
        listed["ranked_by"] == "val/mean_accuracy"
        and [c["name"] for c in listed["checkpoints"]][0] == "checkpoint_000001"
    )


def test_best_is_refused_across_runs_ranked_by_different_metrics(store):
    with pytest.raises(InputError, match="ranked by different metrics"):
        best(store)
    assert best(f"{store}/sweep").name == "checkpoint_000200"
    with pytest.raises(InputError, match="no checkpoint named"):
        pull(store, "/nonexistent", checkpoint="checkpoint_999999")


def test_pull_best_verifies_every_file_and_loads(store, tmp_path, capsys):
    assert main(["checkpoints", "pull", f"{store}/cnn-a", str(tmp_path), "--best"]) == 0
    assert "pulled" in capsys.readouterr().out
    dest = tmp_path / "checkpoint_000001"
    assert sorted(os.listdir(dest)) == ["checksums.json", "config.json", "metrics.json", "state.pt"]
    assert load_state(str(dest))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000001"]  # no partial folder left
    again = pull(f"{store}/cnn-a", str(tmp_path), best=True)
    assert again.up_to_date and again.fetched == 0


def test_pull_a_run_in_parallel_byte_identical_with_sha256_and_md5_checks(store, tmp_path):
    report = pull(f"{store}/sweep/trial_1/gan", str(tmp_path), workers=4)
    assert report.dest == str(tmp_path / "gan") and report.fetched == report.files == 13
    # The trainer's sha256 for checkpoint files, S3's ETag (an MD5 for single PUTs) for the rest.
    assert report.checks == {"sha256": 9, "md5": 4}
    for rel in storage.walk(f"{store}/sweep/trial_1/gan"):
        assert (tmp_path / "gan" / rel).read_bytes() == storage.read_bytes(f"{store}/sweep/trial_1/gan/{rel}"), rel


def test_an_interrupted_pull_leaves_no_complete_looking_folder_and_the_next_resumes(store, tmp_path, monkeypatch):
    real_copy, copies = pull_module._copy, []

    def interrupted_after_five(uri, out, advance):
        if len(copies) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the pull
        copies.append(uri)
        real_copy(uri, out, advance)

    monkeypatch.setattr(pull_module, "_copy", interrupted_after_five)
    with pytest.raises(KeyboardInterrupt):
        pull(f"{store}/cnn-a", str(tmp_path), workers=1)
    assert os.listdir(tmp_path) == [".cnn-a.partial"]
    partial = tmp_path / ".cnn-a.partial"
    done = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
    assert len(done) == 5 and not any(name.endswith(".download") for name in done)
    # A file that rotted in place (same size, other bytes) is fetched again, not kept.
    rotten = next(p for p in partial.rglob("state.pt"))
    rotten.write_bytes(bytes(len(rotten.read_bytes())))
    monkeypatch.setattr(pull_module, "_copy", real_copy)
    report = pull(f"{store}/cnn-a", str(tmp_path), workers=3)
    assert report.kept == 4 and report.fetched == report.files - 4
    assert os.listdir(tmp_path) == ["cnn-a"]
    for rel in storage.walk(f"{store}/cnn-a"):
        assert (tmp_path / "cnn-a" / rel).read_bytes() == storage.read_bytes(f"{store}/cnn-a/{rel}"), rel


def test_pull_refuses_a_different_existing_dest(store, tmp_path):
    (tmp_path / "cnn-b" / "checkpoint_000000").mkdir(parents=True)
    (tmp_path / "cnn-b" / "checkpoint_000000" / "state.pt").write_bytes(b"something else")
    with pytest.raises(InputError, match="already exists and differs"):
        pull(f"{store}/cnn-b", str(tmp_path))


@pytest.mark.parametrize("key", ["evil/../../outside.txt", "evil//etc/passwd", "evil/./x"])
def test_object_keys_that_would_escape_dest_are_refused(s3, tmp_path, key):
    run = f"escape-{abs(hash(key))}"
    client = boto3.client("s3", endpoint_url=s3)
    client.put_object(Bucket=BUCKET, Key=f"{run}/fine.txt", Body=b"ok")
    client.put_object(Bucket=BUCKET, Key=f"{run}/{key}", Body=b"gotcha")
    with pytest.raises(InputError, match="refusing") as refused:
        pull(f"s3://{BUCKET}/{run}", str(tmp_path / "dest"))
    assert key in str(refused.value)
    assert not (tmp_path / "dest").exists() and not (tmp_path / "outside.txt").exists()


def test_a_run_with_only_an_interrupted_checkpoint_says_so(tmp_path):
    folder = tmp_path / "run" / "checkpoint_000003"
    write_checkpoint(str(folder), {"epoch": 3, "config": {}}, {"epoch": 3})
    os.remove(folder / "checksums.json")  # what a killed upload leaves: the list is written last
    with pytest.raises(
        InputError, match=r"holds no complete checkpoints \(1 partial: checkpoint_000003: no readable checksums.json"
    ):
        best_checkpoint(str(tmp_path / "run"))
