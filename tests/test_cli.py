"""The `deeprec` commands as a user runs them: output, exit codes, and errors without tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from deeprecognition.cli import _parser, main

from .conftest import BUCKET, SYNTH_N
from .rayhead import REPO


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_then_pack_verify_stats_on_s3_with_endpoint_flag(ray_cluster, s3, tmp_path, capsys, monkeypatch):
    src = str(tmp_path / "celeba")
    code, out, _ = run_cli(capsys, "synth", src, "--n", "30", "--seed", "2")
    assert code == 0 and "wrote 30 synthetic CelebA images" in out
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the flag alone must reach the S3 server (and Ray's tasks)
    dest = f"s3://{BUCKET}/cli"
    code, out, _ = run_cli(capsys, "pack", src, dest, "--samples-per-shard", "10", "--quiet", "--endpoint-url", s3)
    assert code == 0 and "packed train" in out and "0 kept" in out
    code, out, _ = run_cli(capsys, "verify", dest, "--endpoint-url", s3)
    assert code == 0 and out.startswith("OK: checked") and "30 samples" in out
    code, out, _ = run_cli(capsys, "stats", dest, "--json", "--endpoint-url", s3)
    stats = json.loads(out)
    assert sum(s["samples"] for s in stats.values()) == 30


def test_verify_exits_non_zero_naming_the_bad_shard(packed, tmp_path, capsys):
    dest = str(tmp_path / "ds")
    shutil.copytree(packed.dest, dest)
    bad = packed.manifest.splits["train"].shards[1].name
    with open(os.path.join(dest, bad), "r+b") as f:
        f.truncate(1000)
    code, out, _ = run_cli(capsys, "verify", dest)
    assert code == 1
    assert f"BAD {bad}:" in out and "1 bad shard(s)" in out


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "pack", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("deeprec pack: error: ") and "Traceback" not in err
    assert "list_attr_celeba.txt" in err  # says what was looked for
    code, _, err = run_cli(capsys, "stats", str(tmp_path / "out"))
    assert code == 2 and "manifest.json: not found" in err and "deeprec pack" in err


def test_module_entry_point_runs_as_ray_job_submit_would(packed):
    out = subprocess.run(
        [sys.executable, "-m", "deeprecognition", "stats", packed.dest, "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert sum(s["samples"] for s in json.loads(out).values()) == SYNTH_N


def test_bench_loader_reports_all_rates_with_the_same_sample_count(packed, capsys):
    code, out, _ = run_cli(capsys, "bench", "loader", packed.dest, "--limit", "100", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["samples"] >= 100
    for key in ("images_per_s", "baseline_images_per_s", "decode_limit_images_per_s", "webdataset_images_per_s"):
        assert result[key] > 0, key


def test_bench_pack_measures_one_shard_in_process(synth_root, capsys):
    code, out, _ = run_cli(capsys, "bench", "pack", synth_root, "--limit", "50", "--json")
    result = json.loads(out)
    assert code == 0 and result["samples"] == 50 and result["images_per_s"] > 0 and result["bytes_per_image"] > 1000


def test_tune_json_prints_the_document_alone_and_rays_worker_lines_on_stderr(packed, tmp_path):
    # Two trials whose workers print the same epoch lines: with -v Ray deduplicates them across the
    # two (as it does by default; without -v deeprec prints each as it comes) and holds them back
    # until its aggregation window ends or the driver disconnects. A long window makes it the
    # disconnect every time, as it is whenever the trials end within 5 s of each other.
    sweep = tmp_path / "two_depths.yaml"
    sweep.write_text(
        open(os.path.join(REPO, "tune_configs", "cnn_layers.yaml"))
        .read()
        .replace("{grid: [1, 2, 3, 4]}", "{grid: [1, 2]}")
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DEDUP_LOGS_AGG_WINDOW_S": "600"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprecognition",
            "-v",
            "tune",
            str(sweep),
            "--data",
            packed.dest,
            "--storage",
            str(tmp_path / "sweeps"),
            "--smoke",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,  # no RAY_ADDRESS: the command starts a local Ray of its own
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)  # one document and nothing else, or this raises
    assert [t["status"] for t in document["trials"]] == ["finished", "finished"]
    err = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)  # Ray colours its prefixes
    assert "Trial status:" in err  # Tune's progress
    assert re.search(
        r"\(RayTrainWorker pid=\d+\) epoch \d/2 .*\[repeated \dx across cluster\]", err
    )  # the workers' stdout


def _subcommand(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = subparsers.choices[name]
    return parser


def config_flags(job: str) -> list[argparse.Action]:
    """The flags of `deeprec train JOB` that set a config field, read from the parser: a new one is
    covered as it lands. Each one's dest is its field."""
    parser = _subcommand(_parser(), "train", job)
    fields = set(parser.get_default("config_fields"))
    return [action for action in parser._actions if action.dest in fields]


# Every numeric flag of both train commands.
NUMERIC_TRAIN_FLAGS = [
    (job, action.option_strings[0], action.dest)
    for job in ("classifier", "gan")
    for action in config_flags(job)
    if action.type in (int, float)
]


@pytest.mark.parametrize(
    ("job", "flag", "field"), NUMERIC_TRAIN_FLAGS, ids=[f"{job}{flag}" for job, flag, _ in NUMERIC_TRAIN_FLAGS]
)
def test_a_zero_train_flag_reaches_the_config(job, flag, field, capsys):
    code, out, err = run_cli(capsys, "train", job, flag, "0", "--dry-run")
    if code == 2:  # the config refuses 0, by name
        assert field in err, err
        return
    assert code == 0, err
    value = json.loads(out)
    for part in field.split("."):
        value = value[part]
    assert value == 0 and not isinstance(value, bool), f"{flag} 0 gave {field} = {value!r}"
