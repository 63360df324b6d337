"""Faults injected for real, one test each: an object store that resets, cuts and throttles
connections (tests/faultproxy.py in front of the moto server) under pack, verify, Ray Train's own
checkpoint upload and restore, run files and `checkpoints pull`; corrupt and missing shards; kill -9
in the middle of a checkpoint upload and of a pull; checkpoints, sweep files and configs that would
run code or carry the wrong types; and no credential in anything a run leaves behind.

Elsewhere: the loader through the same proxy (test_loader.py), kill -9 during pack
(test_pack.py), tar members and object keys that try to escape (test_storage.py,
test_checkpoints.py), nodes lost and drained (test_multinode.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import yaml

from deeprecognition import storage
from deeprecognition.classifier.loop import train_loop_per_worker
from deeprecognition.cli import main
from deeprecognition.config import ClassifierConfig, apply_overrides, from_dict, to_dict
from deeprecognition.errors import CorruptShardError, InputError
from deeprecognition.runs.catalog import best_checkpoint, list_runs
from deeprecognition.runs.checkpoint import load_state, write_checkpoint
from deeprecognition.runs.pull import pull
from deeprecognition.runs.report import RunLog, read_history
from deeprecognition.runs.session import restore
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.manifest import read_manifest
from deeprecognition.shards.pack import pack

from .conftest import BUCKET, TEST_PACK
from .damage import flip_byte, truncate
from .faultproxy import FaultProxy
from .rayhead import _session_members
from .test_sweep import GOOD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _proxy(s3: str, **faults) -> FaultProxy:
    host, port = s3.removeprefix("http://").split(":")
    return FaultProxy((host, int(port)), **faults).start()


def _tree(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(root)
        for n in names
    }


def _checkpoint(folder, epoch: int, values: int = 1_000_000) -> dict:
    """A checkpoint folder as the trainer writes it (state.pt, config.json, metrics.json, checksums.json)."""
    state = {
        "config": {"name": "r"},
        "model": {"w": torch.arange(values, dtype=torch.float32) + epoch},
        "epoch": epoch,
        "step": 10 * (epoch + 1),
    }
    write_checkpoint(str(folder), state, {"epoch": epoch, "step": state["step"], "val/mean_accuracy": 0.5 + epoch / 10})
    return state


# ----- an object store that resets, cuts and throttles ------------------------------------------


def test_pack_and_verify_through_a_store_that_cuts_and_throttles_give_the_exact_dataset(
    packed, synth_root, s3, monkeypatch, capsys
):
    proxy = _proxy(s3, cut_every=4, cut_after=2000, throttle_every=5)
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
    states = {e: _checkpoint(tmp_path / "local" / f"checkpoint_00000{e}", e) for e in range(2)}
    proxy = _proxy(s3, cut_every=4, cut_after=3000, throttle_every=5, seed=1)
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
    pulled = _tree(tmp_path / "pulled" / "faulty-run")
    for e in states:
        assert {k.split("/", 1)[1]: v for k, v in pulled.items() if k.startswith(f"checkpoint_00000{e}/")} == _tree(
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


# ----- kill -9 in the middle of a write ---------------------------------------------------------


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
    _checkpoint(tmp_path / "ok", 0)
    _checkpoint(tmp_path / "killed", 1, values=3_000_000)
    for name in os.listdir(tmp_path / "ok"):  # the run already has a whole checkpoint
        storage.write_bytes_atomic(f"{run}/checkpoint_000000/{name}", (tmp_path / "ok" / name).read_bytes())
    # Ray's own upload of the next checkpoint, through a store that stops answering once state.pt is under way
    proxy = _proxy(s3, cut_every=0, stall_request_after=500_000)
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
        _checkpoint(tmp_path / "src" / f"checkpoint_00000{e}", e, values=2_000_000)
        for name in os.listdir(tmp_path / "src" / f"checkpoint_00000{e}"):
            storage.write_bytes_atomic(
                f"{run}/checkpoint_00000{e}/{name}", (tmp_path / "src" / f"checkpoint_00000{e}" / name).read_bytes()
            )
    dest = tmp_path / "dest"
    proxy = _proxy(s3, cut_every=0, stall_response_after=2_000_000)  # every download hangs 2 MB in
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
    assert _tree(dest / "run") == {
        f"{c}/{k}": v for c in os.listdir(tmp_path / "src") for k, v in _tree(tmp_path / "src" / c).items()
    }
    assert os.listdir(dest) == ["run"]


# ----- hostile inputs --------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_checkpoint(folder, marker) -> None:
    """A checkpoint folder that looks whole (its checksums match) but whose state.pt runs a command."""
    _checkpoint(folder, 0)
    buf = io.BytesIO()
    torch.save(
        {"model": _RunsCode(str(marker)), "epoch": 0, "config": {}}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL
    )
    (folder / "state.pt").write_bytes(buf.getvalue())
    sums = json.loads((folder / "checksums.json").read_text())
    sums["state.pt"] = {"bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    (folder / "checksums.json").write_text(json.dumps(sums))


def test_a_checkpoint_whose_state_would_run_code_is_refused_by_every_reader(packed, s3, tmp_path, capsys):
    marker = tmp_path / "owned"
    run = tmp_path / "runs" / "hostile"
    _hostile_checkpoint(run / "checkpoint_000000", marker)
    for name in os.listdir(run / "checkpoint_000000"):
        storage.write_bytes_atomic(
            f"s3://{BUCKET}/hostile/checkpoint_000000/{name}", (run / "checkpoint_000000" / name).read_bytes()
        )
    for where in (str(run / "checkpoint_000000"), f"s3://{BUCKET}/hostile/checkpoint_000000"):
        with pytest.raises(InputError, match="refused: not a plain-data checkpoint"):
            load_state(where)
    assert main(["evaluate", str(run), "--data", packed.dest]) == 2
    assert main(["generate", f"s3://{BUCKET}/hostile", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.count("refused: not a plain-data checkpoint") == 2
    cfg = apply_overrides(
        ClassifierConfig(),
        [f"storage={tmp_path / 'runs'}", "name=hostile", f"data.data={packed.dest}", "data.loader_workers=0"],
    )
    with pytest.raises(InputError, match="refused"):
        train_loop_per_worker(to_dict(cfg))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_samples": "4"}, "num_samples must be a whole number"),
        ({"trial": {"workers": "two"}}, "trial.workers must be int"),
        ({"set": {"optim.lr": [0.1, 0.2]}}, "optim.lr must be float"),
        ({"search": {"model.layers": {"grid": [1, "deep"]}}}, "model.layers must be int"),
        ({"preset": ["paper-cnn"]}, "preset must be one of"),
        ({"metric": {"name": "val/mean_accuracy"}}, "metric must be one"),
        ({"scheduler": 3}, "scheduler must be fifo, asha, or a mapping"),
        ({"search": ["model.layers"]}, "search must map"),
    ],
)
def test_a_sweep_file_with_unexpected_types_is_refused_in_one_line(change, message, packed, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**GOOD, **change}))
    assert main(["tune", str(tmp_path / "bad.yaml"), "--data", packed.dest, "--storage", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "sweeps").exists()


def test_a_sweep_file_that_would_build_python_objects_is_refused(packed, tmp_path, capsys):
    marker = tmp_path / "owned"
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump(GOOD) + f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    assert main(["tune", str(tmp_path / "bad.yaml"), "--data", packed.dest, "--storage", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "python/object" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"optim": {"epochs": [3]}}, "optim.epochs must be int"),
        ({"optim": {"lr": {"value": 1}}}, "optim.lr must be float"),
        ({"data": {"batch_size": True}}, "data.batch_size must be int"),
        ({"model": "cnn"}, "model must be a mapping"),
        ({"storage": 5}, "storage must be str"),
    ],
)
def test_a_config_with_unexpected_types_is_refused_by_field(config, message):
    # What a worker, `evaluate` and a resumed run rebuild from JSON (training_options.json, a checkpoint's config)
    with pytest.raises(ValueError, match=message):
        from_dict(ClassifierConfig, config)


# ----- no credential in anything a run leaves ---------------------------------------------------

ACCESS_KEY = "AKIADEEPRECLEAKCHECK"
SECRET_KEY = "deeprec/Secret+Key/never-in-a-log-9f3c"


def test_no_credential_in_the_runs_files_checkpoints_or_logs(packed, s3, tmp_path):
    runs = f"s3://{BUCKET}/credentials"
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, RAY_TMPDIR=ray_tmp)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "deeprecognition",
                "-v",
                "train",
                "classifier",
                "--data",
                packed.dest,
                "--task",
                "Male",
                "--epochs",
                "1",
                "--steps-per-epoch",
                "2",
                "--num-workers",
                "1",
                "--storage",
                runs,
                "--name",
                "leak-check",
                "--set",
                "data.loader_workers=0",
            ],
            env=env,
            capture_output=True,
            timeout=400,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        leaks = [
            f"{runs}/leak-check/{rel}"
            for rel in storage.walk(f"{runs}/leak-check")
            if _holds_secret(storage.read_bytes(f"{runs}/leak-check/{rel}"))
        ]
        leaks += [name for name, out in (("stdout", done.stdout), ("stderr", done.stderr)) if _holds_secret(out)]
        logs = [os.path.join(d, n) for d, _, names in os.walk(ray_tmp) for n in names]
        assert any(n.endswith(".log") or n.endswith(".out") for n in logs)
        leaks += [
            p for p in logs if os.path.isfile(p) and not os.path.islink(p) and _holds_secret(open(p, "rb").read())
        ]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert storage.exists(f"{runs}/leak-check/training_options.json") and leaks == []


def _holds_secret(data: bytes) -> bool:
    return ACCESS_KEY.encode() in data or SECRET_KEY.encode() in data
