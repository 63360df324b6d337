"""Population-based training of the GAN: the gan_pbt smoke sweep (2 CPU trials, each a Ray Train
run, synchronous PBT at iteration 10) exploits, each exploited trial continues in a run of its own
from its donor's checkpoint with its new learning rates, `--json` lists the exploits, and the best
schedule replays as one run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from deeprecognition.cli import main
from deeprecognition.sweep.pbt import Exploit, lineage, read_exploits
from deeprecognition.sweep.replay import segments
from deeprecognition.sweep.trial import Handed, Start, TrialPlan, trial_start

GAN_PBT = str(Path(__file__).resolve().parents[1] / "tune_configs" / "gan_pbt.yaml")


def _state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "state.pt"), "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _iterations(run: str) -> list[int]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["iteration"] for line in f]


def _lrs(state: dict) -> tuple[float, float]:
    return state["opt_g"]["param_groups"][0]["lr"], state["opt_d"]["param_groups"][0]["lr"]


def test_gan_pbt_smoke_sweep_exploits_continue_from_the_donor_and_the_best_schedule_replays(
    faces64, judge, tmp_path, capsys
):
    args = ["tune", GAN_PBT, "--data", faces64, "--storage", str(tmp_path), "--smoke"]
    args += ["--set", f"eval.classifier={judge}", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    sweep, trials = out["path"], {t["trial_id"]: t for t in out["trials"]}
    assert len(trials) == 2 and all(t["progress"] == "15/15 iterations" for t in trials.values())
    exploited = [t for t in trials.values() if t["exploits"]]
    assert exploited  # synchronous PBT at iteration 10: the worse takes the better's checkpoint
    for trial in exploited:
        (exploit,) = trial["exploits"]
        donor = trials[exploit["from_trial"]]
        assert exploit["from_trial"] != trial["trial_id"] and exploit["iteration"] == 10
        assert exploit["checkpoint"].startswith(os.path.join(sweep, "trials", donor["trial_id"], "checkpoint_"))
        assert _state(exploit["checkpoint"])["iteration"] == 10
        # A run of its own, whose counter continued from the donor's checkpoint, not from 0.
        assert exploit["run"] == f"{trial['trial_id']}-g1"
        assert _iterations(os.path.join(sweep, "trials", exploit["run"])) == list(range(11, 16))
        assert trial["checkpoint"].startswith(os.path.join(sweep, "trials", exploit["run"], "checkpoint_"))
        # The new values, applied after the donor's optimiser state loaded: not the donor's lr.
        final = _state(trial["checkpoint"])
        assert final["iteration"] == 15
        new = (exploit["config"]["lr_g"], exploit["config"]["lr_d"])
        assert _lrs(final) == pytest.approx(new) and trial["config"] == exploit["config"]
        assert _lrs(_state(exploit["checkpoint"])) != pytest.approx(new)
        assert trial["schedule"][-1] == {"iteration": 10, "config": exploit["config"]}
    assert open(os.path.join(sweep, "results.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(sweep, "best_schedule.json")) as f:
        schedule = json.load(f)
    assert schedule == out["best_schedule"] and schedule[0]["iteration"] == 0

    # The replay: one run, its values changing where the best model's lineage changed them.
    assert main(args[:-1] + ["--replay", "--json"]) == 0
    replay = json.loads(capsys.readouterr().out)
    assert replay["run"] == os.path.join(sweep, "replay") and replay["schedule"] == schedule
    assert _iterations(replay["run"]) == list(range(1, 16))
    last = schedule[-1]["config"]
    assert _lrs(_state(replay["checkpoint"])) == pytest.approx((last["lr_g"], last["lr_d"]))


def test_a_driver_continues_its_own_run_and_starts_a_new_one_from_a_donors_checkpoint(tmp_path):
    plan = TrialPlan(kind="gan", base={}, fields={"lr_g": "optim.lr_g"}, metric="fid", runs=str(tmp_path))
    donor = Handed("b_00001", "b_00001", str(tmp_path / "b_00001" / "checkpoint_x"), 10)
    assert trial_start(plan, "a_00000", {"lr_g": 1e-4}, None) == Start("a_00000")  # a fresh trial
    # Restarted with its own checkpoint (--resume, a lost node, a pause): its own run, no record.
    own = Handed("a_00000", "a_00000-g1", str(tmp_path / "a_00000-g1" / "checkpoint_y"), 20)
    assert trial_start(plan, "a_00000", {"lr_g": 1e-4}, own) == Start("a_00000-g1")
    assert read_exploits(str(tmp_path), "a_00000") == []
    first = trial_start(plan, "a_00000", {"lr_g": 2e-4}, donor)
    assert first == Start("a_00000-g1", donor.checkpoint)
    # The same exploit's driver restarted before it reported: the same run, recorded once.
    assert trial_start(plan, "a_00000", {"lr_g": 2e-4}, donor) == first
    later = Handed("c_00002", "c_00002-g1", str(tmp_path / "c_00002-g1" / "checkpoint_z"), 30)
    assert trial_start(plan, "a_00000", {"lr_g": 3e-4}, later) == Start("a_00000-g2", later.checkpoint)
    assert read_exploits(str(tmp_path), "a_00000") == [
        Exploit(10, "b_00001", {"lr_g": 2e-4}, donor.checkpoint, "a_00000-g1"),
        Exploit(30, "c_00002", {"lr_g": 3e-4}, later.checkpoint, "a_00000-g2"),
    ]


def test_the_best_schedule_follows_each_exploit_back_to_its_donors_run():
    # c took b's first run's checkpoint at 10; b took a's first run's at 20 (b-g1); a then took
    # b-g1's at 30 (a-g1). a's model: a's first values to 20, b's exploit's to 30, then its own.
    histories = {
        "a": [Exploit(30, "b", {"lr": 3}, "R/b-g1/checkpoint_3", "a-g1")],
        "b": [Exploit(20, "a", {"lr": 2}, "R/a/checkpoint_2", "b-g1")],
        "c": [Exploit(10, "b", {"lr": 4}, "R/b/checkpoint_1", "c-g1")],
    }
    initial = {"a": {"lr": 1}, "b": {"lr": 5}, "c": {"lr": 6}}
    assert lineage("a", 1, histories, initial) == [
        {"iteration": 0, "config": {"lr": 1}},
        {"iteration": 20, "config": {"lr": 2}},
        {"iteration": 30, "config": {"lr": 3}},
    ]
    assert lineage("c", 1, histories, initial) == [
        {"iteration": 0, "config": {"lr": 5}},
        {"iteration": 10, "config": {"lr": 4}},
    ]
    assert segments(lineage("a", 1, histories, initial), 40) == [(20, {"lr": 1}), (30, {"lr": 2}), (40, {"lr": 3})]
