"""Hostile inputs refused before anything runs: checkpoints whose state would run code, sweep files
and configs with the wrong types or Python objects; and no credential in anything a run leaves
behind (its files in S3, its checkpoints, its output, Ray's logs). The other faults: test_faults.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import yaml

from deeprecognition import storage
from deeprecognition.classifier.loop import train_loop_per_worker
from deeprecognition.cli import main
from deeprecognition.config import ClassifierConfig, apply_overrides, from_dict, to_dict
from deeprecognition.errors import InputError
from deeprecognition.runs.checkpoint import load_state

from .conftest import BUCKET
from .fault_fixtures import fake_checkpoint
from .rayhead import REPO, smoke_classifier_args
from .test_sweep import GOOD

# ----- hostile inputs --------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_checkpoint(folder, marker) -> None:
    """A checkpoint folder that looks whole (its checksums match) but whose state.pt runs a command."""
    fake_checkpoint(folder, 0)
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
        ({"scheduler": 3}, "scheduler must be fifo, asha, pbt, or a mapping"),
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
                *smoke_classifier_args(packed.dest, runs, "leak-check", "--task", "Male"),
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
