"""Faults injected for real, one test each: an object store that resets, cuts and throttles
connections (tests/faultproxy.py in front of the moto server) under pack, verify, Ray Train's own
checkpoint upload and restore, run files and `checkpoints pull`; corrupt and missing shards.

The other faults: kill -9 in the middle of a checkpoint upload and of a pull (test_faults_kill.py);
checkpoints, sweep files and configs that would run code or carry the wrong types, and no credential
in anything a run leaves behind (test_faults_hostile.py). Elsewhere: the loader through the same
proxy (test_loader.py), kill -9 during pack (test_pack.py), tar members and object keys that try to
escape (test_storage.py, test_checkpoints.py), nodes lost and drained (test_multinode.py).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from deeprecognition import storage
from deeprecognition.classifier.loop import train_loop_per_worker
from deeprecognition.cli import main
from deeprecognition.config import ClassifierConfig, apply_overrides, to_dict
from deeprecognition.errors import CorruptShardError
from deeprecognition.runs.catalog import list_runs
from deeprecognition.runs.report import RunLog, read_history
from deeprecognition.runs.session import restore
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.manifest import read_manifest
from deeprecognition.shards.pack import pack

from .conftest import BUCKET, TEST_PACK
from .damage import flip_byte, truncate
from .fault_fixtures import fake_checkpoint, proxy_to, tree

# ----- an object store that resets, cuts and throttles ------------------------------------------


def test_pack_and_verify_through_a_store_that_cuts_and_throttles_give_the_exact_dataset(
    packed, synth_root, s3, monkeypatch, capsys
):
    proxy = proxy_to(s3, cut_every=4, cut_after=2000, throttle_every=5)
    try:
        monkeypatch.setenv(
            "AWS_ENDPOINT_URL", proxy.url
        )  # the pack's Ray tasks get it too (raycluster.worker_runtime_env)
        report = pack(synth_root, f"s3://{BUCKET}/faulty-pack", TEST_PACK)
        assert main(["verify", f"s3://{BUCKET}/faulty-pack"]) == 0
    finally:
        proxy.stop()
    shas = lambda m: {s.name: s.sha256 for sp in m.splits.values() for s in sp.shards}  # noqa: E731
    assert shas(report.manifest) == shas(packed.manifest)  # byte for byte what a pack on a quiet disk gives
    assert report.retries > 0 and proxy.throttled > 0
    out = capsys.readouterr().out
    assert f"OK: checked {len(shas(packed.manifest))} shards" in out and "storage operations retried" in out


def test_checkpoints_run_files_and_pulls_through_a_store_that_cuts_and_throttles_are_exact(
    s3, tmp_path, monkeypatch, capsys
):
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import _upload_to_fs_path, get_fs_and_path

    run = f"s3://{BUCKET}/faulty-run"
    states = {e: fake_checkpoint(tmp_path / "local" / f"checkpoint_00000{e}", e) for e in range(2)}
    proxy = proxy_to(s3, cut_every=4, cut_after=3000, throttle_every=5, seed=1)
    retries_before = storage.retry_count()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        for (
            e
        ) in states:  # what ray.train.report runs to upload a checkpoint (pyarrow), and get_checkpoint to restore one
            fs, path = get_fs_and_path(f"{run}/checkpoint_00000{e}")
            _upload_to_fs_path(str(tmp_path / "local" / f"checkpoint_00000{e}"), fs, path)
            assert torch.equal(restore(Checkpoint(path, filesystem=fs))["model"]["w"], states[e]["model"]["w"])
        log = RunLog(run, {"name": "r"}, resume_at=0)
        for e in range(3):
            log.log({"epoch": e, "step": e, "val/mean_accuracy": 0.5})
        assert [m["epoch"] for m in read_history(run)] == [0, 1, 2]
        assert [c.metrics["epoch"] for c in list_runs(run)[0].checkpoints] == [1, 0]
        assert main(["checkpoints", "pull", run, str(tmp_path / "pulled")]) == 0
    finally:
        proxy.stop()
    assert proxy.cuts + proxy.throttled > 0 and storage.retry_count() > retries_before
    pulled = tree(tmp_path / "pulled" / "faulty-run")
    for e in states:
        assert {k.split("/", 1)[1]: v for k, v in pulled.items() if k.startswith(f"checkpoint_00000{e}/")} == tree(
            tmp_path / "local" / f"checkpoint_00000{e}"
        )
    out = capsys.readouterr().out
    assert "6 by sha256" in out and "storage operations were retried" in out


# ----- corrupt data ----------------------------------------------------------------------------


def test_flipped_truncated_missing_and_dangling_shards_are_named_by_loader_and_verify_then_repaired(
    packed, synth_root, tmp_path, capsys
):
    data = str(tmp_path / "ds")
    shutil.copytree(packed.dest, data)
    manifest = read_manifest(data)
    flipped, dangling = manifest.splits["train"].shards[0].name, manifest.splits["train"].shards[1].name
    truncated, missing = manifest.splits["val"].shards[0].name, manifest.splits["test"].shards[0].name
    flip_byte(os.path.join(data, flipped), 4000)
    truncate(os.path.join(data, truncated), 3000)
    os.remove(os.path.join(data, missing))
    os.rename(
        os.path.join(data, dangling), os.path.join(data, "train-000777.tar")
    )  # the manifest points to a name that is not there
    expected = {
        ("train", flipped): "sha256 does not match the manifest|missing: listed in",  # whichever the pass meets first
        ("val", truncated): "3000 bytes, the manifest says",
        ("test", missing): "missing: listed in",
    }
    for (split, shard), problem in expected.items():
        with pytest.raises(CorruptShardError, match=f"shard ({shard}|{dangling}): .*({problem})") as caught:
            # Evaluation reads every shard of the split once; training draws them and stops the same way.
            list(make_loader(LoaderConfig(data=data, split=split, training=False, num_workers=0)))
        assert caught.value.shard in (shard, dangling)
    assert main(["verify", data]) == 1
    out = capsys.readouterr().out
    for shard in (flipped, truncated, missing, dangling):
        assert f"BAD {shard}: " in out
    assert "UNLISTED train-000777.tar: in the folder but not in manifest.json" in out
    assert "4 bad shard(s)" in out
    os.remove(os.path.join(data, "manifest.json"))  # the repair the error message gives: pack again
    assert pack(synth_root, data, TEST_PACK).built == len(
        manifest.splits["train"].shards + manifest.splits["val"].shards + manifest.splits["test"].shards
    )
    assert main(["verify", data]) == 0 and "UNLISTED" not in capsys.readouterr().out


def test_training_stops_with_the_shards_name_and_writes_no_checkpoint_past_it(packed, tmp_path):
    data = str(tmp_path / "ds")
    shutil.copytree(packed.dest, data)
    bad = read_manifest(data).splits["val"].shards[-1].name
    truncate(os.path.join(data, bad), 2048)
    cfg = apply_overrides(
        ClassifierConfig(),
        [
            f"storage={tmp_path / 'runs'}",
            "name=stops",
            f"data.data={data}",
            "data.task=Male",
            "data.batch_size=16",
            "data.loader_workers=0",
            "optim.steps_per_epoch=2",
        ],
    )
    with pytest.raises(CorruptShardError, match=f"shard {bad}: 2048 bytes"):
        train_loop_per_worker(to_dict(cfg))
    assert not [
        n for n in os.listdir(tmp_path / "runs" / "stops") if n.startswith("checkpoint_")
    ]  # epoch 0 never counted as done
