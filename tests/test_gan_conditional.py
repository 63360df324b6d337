"""The attribute-conditional GAN: G(z, a) and D(x, a) for every architecture, the projection term's
sign, the auxiliary head's losses, label vectors drawn from the data's joint (constrained, and a
combination the data never has), `generate --attrs` / `--edit`, and a two-rank run whose logged
control accuracies `evaluate-gan --control` reproduces. The CPU run on the real sample: README."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from deeprecognition.classifier.models import InputNorm
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.cli import main
from deeprecognition.config import apply_overrides, conditional_dcgan, to_dict
from deeprecognition.gan.conditions import LabelBank, flip_columns, mosaic_labels, mosaic_rows
from deeprecognition.gan.control import CONTROL_SEED, contrasted, controlled
from deeprecognition.gan.generate import TrainedGan
from deeprecognition.gan.models import ConditionalDiscriminator, build_gan
from deeprecognition.gan.step import gan_step, make_nets
from deeprecognition.runs.checkpoint import load_state

from .collectives import assert_same_collectives, run_ranks
from .conftest import COLLECTIVE_TIMEOUT_S
from .test_gan import gan_config

K = 5  # attributes in the small models below
ATTRS = "Male,Smiling,Attractive"  # what the test judge scores


def _labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2, (n, K), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("arch,width", [("paper", 64), ("dcgan", 8), ("resnet", 4)])
def test_every_architecture_draws_and_judges_with_and_without_conditions(arch, width):
    torch.manual_seed(0)
    z = torch.randn(3, 16)
    G, D = build_gan(arch, 16, 32, width)
    assert D(G(z)).shape == (3, 1)
    for head, logits in (("projection", 1), ("auxiliary", 1 + K)):
        G, D = build_gan(arch, 16, 32, width, conditions=K, embed=8, head=head)
        faces = G(z, _labels(3))
        assert faces.shape == (3, 3, 32, 32) and faces.abs().max() <= 1
        assert D(faces, _labels(3)).shape == (3, logits)
        # The labels reach the faces: other attributes, other faces from the same noise.
        assert not torch.allclose(faces, G(z, 1 - _labels(3)))


@pytest.mark.parametrize("arch,width", [("paper", 64), ("dcgan", 8), ("resnet", 4)])
def test_the_projection_term_flips_sign_with_the_attribute(arch, width):
    """logit = head(phi) + sum_k s_k <v_k, phi>: attribute k at 1 and at 0 sit symmetrically around
    the logit without it, 2 <v_k, phi> apart."""
    torch.manual_seed(0)
    _, D = build_gan(arch, 16, 32, width, conditions=K, embed=8)
    D.eval()  # the study's D has dropout
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        phi = D.base.features(x)
        plain = D.base.head(phi)
        v = D.conditions.weight  # (F, K): v_k is column k, spectrally normalised where D is
        signs = 2 * _labels(4) - 1
        on, off, without = signs.clone(), signs.clone(), signs.clone()
        on[:, 2], off[:, 2], without[:, 2] = 1, -1, 0
        middle = plain + (without @ v.T * phi).sum(1, keepdim=True)  # every other attribute's term
        term = phi @ v[:, 2:3]  # <v_k, phi>
        on, off = (on + 1) / 2, (off + 1) / 2  # back to labels in {0, 1}
        torch.testing.assert_close(D(x, on), middle + term, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(D(x, off), middle - term, rtol=1e-4, atol=1e-4)
        assert (D(x, on) - D(x, off)).abs().min() > 0


def test_an_unknown_head_is_refused_by_name():
    with pytest.raises(ValueError, match="projection"):
        ConditionalDiscriminator(build_gan("dcgan", 8, 32, 4)[1], K, "hydra", True)


def test_the_auxiliary_head_learns_the_real_faces_attributes():
    """A few D steps on one fixed batch: the attribute logits move toward the real labels."""
    cfg = apply_overrides(
        conditional_dcgan(),
        [
            "model.width=8",
            "data.batch_size=8",
            "model.attributes=Male,Smiling",
            "model.condition_head=auxiliary",
            "optim.lr_d=1e-3",
        ],
    )
    bank = LabelBank(("Male", "Smiling"), torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8))
    nets = make_nets(cfg, 32, torch.device("cpu"), bank)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)
    # Faces with the first attribute bright, the others dark: something to learn.
    real = (50 + 150 * labels[:, :1, None, None] + 20 * torch.rand(8, 3, 32, 32)).to(torch.uint8)
    noise = torch.Generator().manual_seed(0)

    def attribute_loss() -> float:
        with torch.no_grad():
            logits = nets.D(real.float() / 127.5 - 1, labels)[:, 1:]
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))

    before = attribute_loss()
    for i in range(1, 31):
        gan_step(cfg, nets, [real], noise, i, [labels])
    assert attribute_loss() < 0.5 * before
    with pytest.raises(ValueError, match="label batch"):
        gan_step(cfg, nets, [real], noise, 31)  # a conditional step without labels


def _correlated_bank(n: int = 4000) -> LabelBank:
    """Male in half the rows; Heavy_Makeup in 90% of the non-male rows and 5% of the male ones;
    no row has Bald=1 with Male=0."""
    draw = torch.Generator().manual_seed(0)
    male = (torch.rand(n, generator=draw) < 0.5).to(torch.uint8)
    makeup = (torch.rand(n, generator=draw) < torch.where(male == 1, 0.05, 0.9)).to(torch.uint8)
    bald = male * (torch.rand(n, generator=draw) < 0.2).to(torch.uint8)
    return LabelBank(("Male", "Heavy_Makeup", "Bald"), torch.stack([male, makeup, bald], 1))


def test_constrained_draws_keep_the_constraints_and_follow_the_datas_joint_for_the_rest():
    bank = _correlated_bank()
    women = bank.draw(2000, {"Male": 0}, seed=1)
    assert (women.labels[:, 0] == 0).all() and women.support == int((bank.rows[:, 0] == 0).sum())
    assert women.labels[:, 1].mean() == pytest.approx(0.9, abs=0.03)  # as correlated as the data
    assert (women.labels[:, 2] == 0).all()
    men = bank.draw(2000, {"Male": 1}, seed=1)
    assert men.labels[:, 1].mean() == pytest.approx(0.05, abs=0.02)
    assert bank.draw(2000, {}, seed=1).labels[:, 1].mean() == pytest.approx(0.475, abs=0.04)
    assert torch.equal(bank.draw(50, {"Male": 0}, seed=1).labels, bank.draw(50, {"Male": 0}, seed=1).labels)


def test_a_combination_the_data_never_has_is_forced_on_draws_from_the_whole_data(caplog):
    bank = _correlated_bank()
    with caplog.at_level(logging.WARNING):
        draw = bank.draw(1000, {"Male": 0, "Bald": 1}, seed=2)
    assert draw.support == 0 and "no training face has Male=0,Bald=1" in caplog.text
    assert (draw.labels[:, 0] == 0).all() and (draw.labels[:, 2] == 1).all()
    assert draw.labels[:, 1].mean() == pytest.approx(0.475, abs=0.05)  # the whole data's rate


def test_a_label_bank_survives_a_checkpoint_and_the_mosaic_asks_for_its_rows():
    bank = _correlated_bank(1001)
    back = LabelBank.restored(bank.saved())
    assert back.attributes == bank.attributes and torch.equal(back.rows, bank.rows)
    rows = mosaic_rows("", bank.attributes)  # Smiling and Eyeglasses are not among these attributes
    assert rows == [{}] * 6
    rows = mosaic_rows("Male=1;Male=0,Bald=0", bank.attributes)
    labels = mosaic_labels(bank, rows, seed=0)
    assert labels.shape == (36, 3) and (labels[:6, 0] == 1).all() and (labels[6:12, [0, 2]] == 0).all()
    with pytest.raises(ValueError, match="schedule.mosaic_conditions: Smiling is not among"):
        mosaic_rows("Smiling=1", bank.attributes)


def test_flip_columns_lays_out_each_face_then_its_edits():
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    edits = flip_columns(labels, [0, 2])
    assert edits.tolist() == [[0, 1, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]]


class _Painter(torch.nn.Module):
    """A conditional "generator" whose channel k shows attribute k (white at 1, black at 0) for the
    attributes it obeys, black for the others."""

    def __init__(self, obeys: tuple[bool, ...]) -> None:
        super().__init__()
        self.obeys = torch.tensor(obeys, dtype=torch.float32)
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where draw_faces looks for the device

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shown = torch.zeros(len(z), 3, 8, 8)
        shown[:, : labels.shape[1]] = (labels * self.obeys)[:, :, None, None]
        return shown * 2 - 1


class _ChannelJudge(torch.nn.Module):
    """Scores attribute k positive when channel k is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :2].mean((2, 3)) - 0.5) * 100


def _judge_of_channels() -> TrainedClassifier:
    return TrainedClassifier(_ChannelJudge(), InputNorm("cnn"), ("Male", "Smiling"), 8, "channels", None, None)


def test_control_edits_and_contrast_measure_what_the_painter_obeys():
    """An exact painter: control and edits 1.0; one that ignores Smiling (always drawn without it):
    Smiling's control 0.5, its edits right only where the flip turned it off."""
    bank = LabelBank(("Male", "Smiling"), torch.randint(0, 2, (500, 2), generator=torch.Generator().manual_seed(0)))
    judge = _judge_of_channels()
    exact = controlled(_Painter((True, True)), 4, bank, judge, ["Male", "Smiling"], 200)
    assert exact["control_mean_accuracy"] == 1 and exact["edit_mean_accuracy"] == 1
    half = controlled(_Painter((True, False)), 4, bank, judge, ["Male", "Smiling"], 200)
    smiling = half["control"]["Smiling"]
    assert (smiling["rate_when_1"], smiling["rate_when_0"], smiling["accuracy"]) == (0, 0, 0.5)
    drawn = bank.draw(200, {}, CONTROL_SEED).labels
    assert smiling["edit_accuracy"] == pytest.approx(float(drawn[:, 1].mean()))  # the flips to 0
    assert half["control"]["Male"]["accuracy"] == 1
    assert half["control_mean_accuracy"] == 0.75
    contrast = contrasted(_Painter((True, True)), 4, bank, judge, "Male", 200, bank)
    assert (contrast["Male"]["rate_when_1"], contrast["Male"]["rate_when_0"]) == (1, 0)
    # Everything else fixed: Smiling does not move, whatever the data's correlation.
    assert (
        contrast["Smiling"]["rate_when_1"]
        == contrast["Smiling"]["rate_when_0"]
        == pytest.approx(float(drawn[:, 1].mean()))
    )
    assert contrast["Smiling"]["data_rate_when_1"] == pytest.approx(float(bank.rates({"Male": 1})[1]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.where_classifier=/x"], "data.where instead"),
        (["model.attributes=Male,Smiling", "schedule.mosaic_conditions=Bald=1"], "schedule.mosaic_conditions: Bald"),
        (["eval.control=Male"], "needs a judge"),
        (["model.conditional=false", "eval.control=Male"], "set model.conditional"),
        (["model.attributes=Male,Smilling"], "Smilling"),
    ],
)
def test_conditional_settings_are_checked_by_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(conditional_dcgan(), overrides).validate()


def _gan_rank(rank: int, world_size: int, config: dict) -> None:
    from deeprecognition.gan.loop import train_loop_per_worker

    train_loop_per_worker(config)


def test_two_ranks_train_a_conditional_gan_and_evaluate_gan_repeats_its_control(faces64, judge, tmp_path, capsys):
    """Under the multi-rank rules (same collectives on both ranks, short timeouts); then the
    checkpoint from the command line: the control the ranks logged, grids with --attrs and --edit."""
    cfg = gan_config(
        faces64,
        str(tmp_path),
        4,
        "model.conditional=true",
        f"model.attributes={ATTRS}",
        "schedule.eval_every=4",
        "schedule.checkpoint_every=4",
        "eval.samples=20",
        f"eval.classifier={judge}",
        "eval.features=classifier",
        "eval.control=Male,Smiling",
    )
    results = run_ranks(_gan_rank, 2, args=(to_dict(cfg),), timeout_s=COLLECTIVE_TIMEOUT_S)
    assert_same_collectives([r.record for r in results])
    logged = [json.loads(line) for line in open(tmp_path / "g" / "metrics.jsonl")][-1]
    assert logged["ranks_in_sync"] and 0 <= logged["control_mean_accuracy"] <= 1
    assert logged["score/conditional"] == pytest.approx(logged["fid"] + 100 * (1 - logged["control_mean_accuracy"]))
    checkpoint = str(tmp_path / "g" / "checkpoint_000004")
    state = load_state(checkpoint)
    assert state["fixed_labels"].shape == (36, 3) and state["label_bank"]["attributes"] == ATTRS.split(",")
    capsys.readouterr()
    evaluation = ["evaluate-gan", checkpoint, "--classifier", judge, "--fid-features", "classifier"]
    assert (
        main([*evaluation, "--samples", "20", "--control", "Male,Smiling", "--contrast", "Attractive", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    for name in ("Male", "Smiling"):  # one process, the same faces: the ranks' numbers
        control = result["control"][name]
        assert control["accuracy"] == pytest.approx(logged[f"control/{name}"])
        assert control["accuracy"] == pytest.approx((control["rate_when_1"] + 1 - control["rate_when_0"]) / 2)
        assert 0.5 <= control["judge_accuracy"] <= 1  # the judge was trained on these attributes
        assert 0 <= control["edit_accuracy"] <= 1 and control["judge_majority_baseline"] >= 0.5
    assert result["fid"] == pytest.approx(logged["fid"], rel=1e-4)
    assert set(result["contrast"]["Attractive"]) == {"Male", "Smiling", "Attractive"}
    _assert_grids(checkpoint, tmp_path, capsys)


def _assert_grids(checkpoint: str, tmp_path, capsys) -> None:
    assert (
        main(["generate", checkpoint, "--attrs", "Male=1,Smiling=0", "--n", "4", "--out", str(tmp_path / "a.png")]) == 0
    )
    assert Image.open(tmp_path / "a.png").size == (2 * 64, 2 * 64)
    assert main(["generate", checkpoint, "--edit", "Smiling,Male", "--n", "3", "--out", str(tmp_path / "e.png")]) == 0
    assert Image.open(tmp_path / "e.png").size == (3 * 128, 3 * 128)  # 3 columns of 128 px tiles, 3 rows
    gan = TrainedGan.load(checkpoint)
    seen = []
    gan.generator.register_forward_pre_hook(lambda module, args: seen.append(args))
    edits = gan.edits(["Smiling", "Male"], 3, seed=5)
    (z, labels), smiling, male = seen[0], 1, 0
    assert edits.shape == (9, 3, 64, 64)
    for row in range(3):  # one face per row: the same z, one attribute flipped per column
        zs, asked = z[3 * row : 3 * row + 3], labels[3 * row : 3 * row + 3]
        assert torch.equal(zs[0], zs[1]) and torch.equal(zs[0], zs[2])
        assert (asked[1] != asked[0]).nonzero().flatten().tolist() == [smiling]
        assert (asked[2] != asked[0]).nonzero().flatten().tolist() == [male]
    assert not torch.equal(z[0], z[3])
    with pytest.raises(ValueError, match="--attrs: Bald is not among"):
        gan.faces(2, conditions="Bald=1")


def test_a_sweep_ranked_on_control_needs_a_model_that_reports_it(tmp_path):
    from deeprecognition.sweep.spec import load_spec

    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        "preset: dcgan\nsearch: {optim.lr_g: {loguniform: [1.0e-4, 1.0e-3]}}\nmetric: score/conditional\nmode: min\n"
    )
    with pytest.raises(ValueError, match="s.yaml: metric score/conditional is reported by a conditional GAN"):
        load_spec(str(sweep))
