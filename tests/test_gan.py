"""The GAN loop and its tools: mosaics in storage, weights_only checkpoints, continuing a run, the
data filters, FID/KID and attribute rates, `generate` and `evaluate-gan`, DDP on Ray with a kill.
One iteration of the loop (gan_step) on its own: test_gan_step.py."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
from PIL import Image

from deeprecognition import storage
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.cli import main
from deeprecognition.config import apply_overrides, modern_dcgan, to_dict
from deeprecognition.errors import InputError
from deeprecognition.gan.data import judged_positive, reference_faces
from deeprecognition.gan.inception import STANDARD
from deeprecognition.gan.loop import train_loop_per_worker
from deeprecognition.gan.metrics import INCEPTION_FILE, NOT_COMPARABLE, evaluate_gan, pick_extractor
from deeprecognition.launch import run
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.shards.loader import LoaderConfig, make_loader

from .conftest import BUCKET, COLLECTIVE_TIMEOUT_S
from .test_classifier import _train_worker_pids, fit_killing_a_worker


def gan_config(data: str, storage_uri: str, iterations: int, *overrides: str):
    """A small DCGAN (width 16, batch 8) on all faces: quick on CPU."""
    base = [
        f"data.data={data}",
        f"storage={storage_uri}",
        "name=g",
        f"optim.iterations={iterations}",
        "data.batch_size=8",
        "data.where=",
        "data.loader_workers=0",
        "model.width=16",
        "schedule.mosaic_every=3",
        "schedule.checkpoint_every=3",
        "schedule.log_every=1",
        f"scale.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]
    return apply_overrides(modern_dcgan(), base + list(overrides))


@pytest.fixture(scope="module")
def learnt(faces64, judge, tmp_path_factory) -> dict:
    """A DCGAN evaluated after 1 iteration, then continued to 150 with metrics every 75."""
    runs = tmp_path_factory.mktemp("learnt")
    common = [
        "model.width=32",
        "data.batch_size=16",
        "schedule.mosaic_every=50",
        "schedule.log_every=25",
        "eval.samples=200",
        f"eval.classifier={judge}",
        "eval.features=classifier",  # the standard network takes ~0.08 s a face on CPU
    ]
    train_loop_per_worker(to_dict(gan_config(faces64, str(runs), 1, *common)))
    first = evaluate_gan(str(runs / "g"), classifier=judge, features="classifier", samples=200)
    train_loop_per_worker(
        to_dict(gan_config(faces64, str(runs), 150, *common, "schedule.eval_every=75", "schedule.checkpoint_every=75"))
    )
    return {
        "run": str(runs / "g"),
        "first": first,
        "last": evaluate_gan(str(runs / "g"), classifier=judge, features="classifier", samples=200, latest=True),
    }


def test_gan_run_writes_mosaics_checkpoints_and_continues_at_its_iteration(faces64, tmp_path, capsys):
    train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 6)))
    run_dir = tmp_path / "g"
    assert sorted(os.listdir(run_dir / "mosaics")) == ["contact-sheet.png", "iter-000003.png", "iter-000006.png"]
    mosaic = Image.open(run_dir / "mosaics" / "iter-000006.png")
    assert mosaic.size == (6 * 64, 6 * 64)  # the study's 6x6 grid of 64 px faces
    state = load_state(str(run_dir / "checkpoint_000006"))
    assert state["iteration"] == 6 and state["image_size"] == 64 and state["fixed_latents"].shape == (36, 128)
    assert {"G", "D", "ema", "opt_g", "opt_d", "config"} <= set(state) and "rng" not in set(
        state
    )  # streams come from (seed, rank, step)
    capsys.readouterr()
    train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 9)))
    assert "resuming from iteration 6" in capsys.readouterr().out
    iterations = [json.loads(line)["iteration"] for line in open(run_dir / "metrics.jsonl")]
    assert iterations == list(range(1, 10))
    resumed = load_state(str(run_dir / "checkpoint_000009"))
    assert resumed["fixed_latents"].equal(state["fixed_latents"])  # mosaics stay comparable across the resume
    assert json.loads((run_dir / "report.json").read_text())["iteration"] == 9
    sheet = Image.open(run_dir / "mosaics" / "contact-sheet.png")
    assert sheet.size == (2 * 256, 2 * 256)  # three mosaics, shrunk to 256 px tiles, two columns


def test_fid_against_the_data_falls_as_the_gan_learns(learnt, judge):
    first, last = learnt["first"], learnt["last"]
    assert first["iteration"] == 1 and last["iteration"] == 150
    assert last["fid"] < 0.5 * first["fid"] and last["kid"] < first["kid"]
    assert NOT_COMPARABLE in last["feature_extractor"] and judge in last["feature_extractor"]
    assert set(last["attribute_rate"]) == set(last["data_attribute_rate"]) == {"Male", "Smiling", "Attractive"}
    assert all(0 <= r <= 1 for r in [*last["attribute_rate"].values(), *last["data_attribute_rate"].values()])
    # The same metrics were logged during training, every --eval-every iterations
    logged = [json.loads(line) for line in open(os.path.join(learnt["run"], "metrics.jsonl"))]
    evaluated = [m for m in logged if "fid" in m]
    assert [m["iteration"] for m in evaluated] == [75, 150]
    assert {"kid", "rate/Male", "data_rate/Attractive"} <= set(evaluated[-1])
    assert evaluated[-1]["fid"] < first["fid"]


def test_evaluate_gan_and_generate_from_the_command_line(learnt, judge, tmp_path, capsys):
    command = ["evaluate-gan", learnt["run"], "--latest", "--classifier", judge, "--fid-features", "classifier"]
    assert main([*command, "--samples", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"fid", "kid", "feature_extractor", "attribute_rate", "data_attribute_rate", "samples"} <= set(result)
    assert result["samples"] == 60 and result["iteration"] == 150
    grids = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main(["generate", learnt["run"], "--out", str(tmp_path / f"{name}.png"), "--seed", seed]) == 0
        grids[name] = (tmp_path / f"{name}.png").read_bytes()
    assert Image.open(io.BytesIO(grids["a"])).size == (6 * 64, 6 * 64)
    assert grids["a"] == grids["b"] and grids["a"] != grids["c"]  # the seed decides the faces
    assert main(["generate", learnt["run"], "--n", "10", "--out", str(tmp_path / "ten.png")]) == 0
    assert Image.open(tmp_path / "ten.png").size == (4 * 64, 3 * 64)
    assert main(["evaluate-gan", learnt["run"], "--fid-features", "classifier"]) == 2  # no classifier to take them from
    assert "--classifier" in capsys.readouterr().err


def _train_split(data: str) -> list:
    loader = make_loader(
        LoaderConfig(
            data=data, split="train", training=False, batch_size=64, num_workers=0, targets=("Attractive", "Male")
        )
    )
    return list(loader)


def test_the_classifier_filter_keeps_exactly_the_faces_it_judges_positive(faces64, judge):
    classifier = TrainedClassifier.load(judge)
    batches = _train_split(faces64)
    # One face at a time: the truth the batched filter must reproduce.
    scores = {
        k: classifier.probabilities(b.images[i : i + 1])[0, 2].item() for b in batches for i, k in enumerate(b.keys)
    }
    ordered = sorted(scores.values())
    threshold = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2  # between two faces: no ties
    kept = list(judged_positive(batches, classifier, "Attractive", threshold, batch_size=16))
    assert [k for b in kept for k in b.keys] == [k for b in batches for k in b.keys if scores[k] >= threshold]
    assert all(len(b.keys) == 16 for b in kept[:-1]) and 0 < len(kept[-1].keys) <= 16
    with pytest.raises(ValueError, match="scores 3 attributes: name one"):
        next(judged_positive(batches, classifier, "", 0.5, 16))


def test_the_gan_learns_from_exactly_the_faces_its_filters_select(faces64, judge):
    labels = {k: tuple(t.tolist()) for b in _train_split(faces64) for k, t in zip(b.keys, b.targets)}
    cfg = gan_config(faces64, "unused", 1, "data.where=Attractive=1,Male=0")
    chosen = reference_faces(cfg, 10**6, torch.device("cpu"))
    assert set(chosen.keys) == {k for k, (attractive, male) in labels.items() if attractive == 1 and male == 0}
    judged = reference_faces(
        apply_overrides(cfg, [f"data.where_classifier={judge}", "data.classifier_attribute=Smiling"]),
        10**6,
        torch.device("cpu"),
    )
    classifier = TrainedClassifier.load(judge)
    assert set(judged.keys) < set(chosen.keys)
    assert bool((classifier.probabilities(judged.images)[:, 1] >= 0.5).all())


def _random_inception_file(path: str) -> None:
    """A weights file in the FID Inception format (random values: the real one cannot be downloaded here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None)  # no download
        patch.setattr(
            fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
        )  # keep the random init
        torch.save(fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_fid_features_are_the_standard_network_by_default_a_file_or_a_classifier_and_hostile_files_are_refused(
    tmp_path,
):
    cpu = torch.device("cpu")
    assert "standard" in pick_extractor("inception", STANDARD, None, cpu).name
    with pytest.raises(ValueError, match="--classifier"):
        pick_extractor("classifier", STANDARD, None, cpu)
    own = tmp_path / INCEPTION_FILE
    _random_inception_file(str(own))
    extractor = pick_extractor("inception", str(own), None, cpu)
    assert str(own) in extractor.name and NOT_COMPARABLE not in extractor.name and extractor.source.endswith(str(own))
    assert extractor.features(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).shape == (2, 2048)
    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(InputError, match="refused: not a plain-data weights file"):
        pick_extractor("inception", str(hostile), None, cpu)
    with pytest.raises(InputError, match="no such Inception weights file"):
        pick_extractor("inception", str(tmp_path / "absent.pth"), None, cpu)


def test_two_worker_gan_on_ray_evaluates_keeps_ranks_identical_and_writes_to_s3(faces64, judge, s3, tmp_path):
    # Evaluation on: before, rank 0 alone computed FID and hung in torchmetrics' sync.
    result = run(
        gan_config(
            faces64,
            f"s3://{BUCKET}/gan-runs",
            6,
            "name=ddp",
            "scale.num_workers=2",
            "schedule.eval_every=3",
            "eval.samples=40",
            f"eval.classifier={judge}",
        )
    )
    assert result.error is None
    assert result.metrics["iteration"] == 6 and result.metrics["ranks_in_sync"] is True and result.metrics["fid"] > 0
    run_uri = f"s3://{BUCKET}/gan-runs/ddp"
    assert {"iter-000003.png", "iter-000006.png", "contact-sheet.png"} <= set(storage.list_names(f"{run_uri}/mosaics"))
    assert main(["generate", run_uri, "--out", str(tmp_path / "grid.png")]) == 0  # straight from S3
    assert Image.open(tmp_path / "grid.png").size == (6 * 64, 6 * 64)


def test_a_killed_gan_worker_is_replaced_and_the_run_finishes_at_its_iteration(faces64, tmp_path):
    iterations = 40
    cfg = gan_config(
        faces64,
        str(tmp_path),
        iterations,
        "name=killed",
        "scale.num_workers=2",
        "scale.max_failures=1",
        "schedule.checkpoint_every=5",
        "schedule.mosaic_every=10",
    )
    run_dir = tmp_path / "killed"
    result, victim = fit_killing_a_worker(cfg, run_dir)
    assert result.error is None
    assert result.metrics["iteration"] == iterations and result.metrics["ranks_in_sync"] is True
    # Every iteration logged exactly once: the lost ones were trained again from the checkpoint.
    assert [json.loads(line)["iteration"] for line in open(run_dir / "metrics.jsonl")] == list(range(1, iterations + 1))
    assert victim not in _train_worker_pids()


def _sync_probe(rank: int, init_file: str, perturb: bool, out: str) -> None:
    """One of two gloo ranks: whether ranks_in_sync sees the ranks' weights agree."""
    import torch.distributed as dist

    from deeprecognition.gan.loop import ranks_in_sync
    from deeprecognition.runs.session import Session

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    nets = [torch.nn.Linear(3, 2) for _ in ("G", "D", "ema")]
    if perturb and rank == 1:
        nets[1].bias.data[0] += 1e-6  # one weight of one rank, barely off
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(str(ranks_in_sync(nets, Session(rank, 2, torch.device("cpu"), False, out))))
    dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_the_rank_sync_check_sees_one_weight_off_on_one_rank(tmp_path, perturb):
    import torch.multiprocessing as mp

    mp.spawn(_sync_probe, args=(str(tmp_path / "init"), perturb, str(tmp_path)), nprocs=2)
    assert {(tmp_path / f"rank{r}").read_text() for r in range(2)} == {str(not perturb)}


def test_bench_gan_measures_both_architectures_and_a_conditional_one(capsys):
    presets = ["--gan-presets", "paper-gan,dcgan,dcgan-conditional"]
    assert main(["bench", "gan", "--size", "32", "--batch-sizes", "2", "--steps", "1", *presets, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["arch"], r["batch_size"]) for r in report["results"]] == [("paper", 2), ("dcgan", 2), ("dcgan", 2)]
    plain, conditional = report["results"][1:]
    assert conditional["params_g"] > plain["params_g"] and conditional["params_d"] > plain["params_d"]
    assert all(r["images_per_s"] > 0 and r["iterations_per_s"] > 0 for r in report["results"])
    assert report["image_size"] == 32 and report["device"]


def test_zero_schedules_mean_at_the_last_iteration_only(faces64, tmp_path):
    train_loop_per_worker(
        to_dict(
            gan_config(
                faces64,
                str(tmp_path),
                4,
                "schedule.mosaic_every=0",
                "schedule.checkpoint_every=0",
                "schedule.log_every=0",
            )
        )
    )
    run_dir = tmp_path / "g"
    assert sorted(os.listdir(run_dir / "mosaics")) == ["contact-sheet.png", "iter-000004.png"]
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_")) == ["checkpoint_000004"]
    assert [json.loads(line)["iteration"] for line in open(run_dir / "metrics.jsonl")] == [4]


def test_a_continued_gan_takes_the_configs_learning_rates_and_betas(faces64, tmp_path, capsys):
    train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 3)))
    capsys.readouterr()
    train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 6, "optim.lr_g=0.0001", "optim.beta2=0.99")))
    out = capsys.readouterr().out
    assert (
        "G lr 0.0002 -> 0.0001" in out
        and "G betas (0, 0.9) -> (0, 0.99)" in out
        and "D betas (0, 0.9) -> (0, 0.99)" in out
    )
    state = load_state(str(tmp_path / "g" / "checkpoint_000006"))
    assert [g["lr"] for g in state["opt_g"]["param_groups"]] == [0.0001] and [
        g["lr"] for g in state["opt_d"]["param_groups"]
    ] == [0.0002]
    assert tuple(state["opt_d"]["param_groups"][0]["betas"]) == (0.0, 0.99)
