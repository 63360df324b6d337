"""SNGAN's ResNets (gan/resnet.py), DiffAugment (gan/diffaugment.py), n_dis D steps per G step
(gan/step.py) and the sngan presets: shapes and spectral norm at 32/64/128 px, Mimicry's sizes at
width 64, each augmentation's effect, its gradient and its seed, the optimisers' step counts, and
a few iterations of the loop on two gloo ranks with their collectives compared."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deeprecognition.celeba.synthetic import write_synthetic
from deeprecognition.config import GAN_PRESETS, apply_overrides, to_dict
from deeprecognition.gan.diffaugment import OPS, brightness, contrast, cutout, diff_augment, saturation, translation
from deeprecognition.gan.models import build_gan, draws_with_ema, to_tanh_range
from deeprecognition.gan.resnet import ResNetDiscriminator, ResNetGenerator, UpBlock
from deeprecognition.gan.step import gan_step, make_nets
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.shards.encode import ImageFormat
from deeprecognition.shards.pack import PackOptions, pack

from .collectives import assert_same_collectives, run_ranks
from .conftest import COLLECTIVE_TIMEOUT_S


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("size", "ups"), [(32, 3), (64, 4), (128, 5)])
def test_resnet_shapes_depth_and_spectral_norm_at_each_size(size, ups):
    torch.manual_seed(0)
    gen, disc = build_gan("resnet", 16, size, width=4)
    with torch.no_grad():
        images = gen(torch.randn(3, 16))
        logits = disc(images)
    assert images.shape == (3, 3, size, size) and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0
    assert logits.shape == (3, 1) and torch.isfinite(logits).all()
    assert sum(isinstance(m, UpBlock) for m in gen.modules()) == ups
    layers = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) >= 3 * ups  # every block's two convs (and shortcuts), and the logit's linear
    assert all("weight" in getattr(m, "parametrizations", {}) for m in layers)
    assert not any(hasattr(m, "parametrizations") for m in gen.modules())  # G has batch norm instead
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())


@pytest.mark.parametrize(
    ("size", "g_params", "d_params", "top"),
    [(32, 4_276_739, 1_053_825, 256), (64, 12_220_675, 10_141_441, 1024), (128, 32_150_787, 29_017_857, 1024)],
)
def test_width_64_gives_mimicrys_sngan_sizes(size, g_params, d_params, top):
    """At 64 and 128 px Mimicry's SNGAN-64/128 (ngf = ndf = 1024), at 32 px its CIFAR SNGAN-32."""
    with torch.device("meta"):
        gen, disc = ResNetGenerator(128, size, 64), ResNetDiscriminator(size, 64)
    assert (n_params(gen), n_params(disc)) == (g_params, d_params)
    assert gen.linear.out_features == 4 * 4 * top
    assert disc.linear.in_features == (128 if size == 32 else 1024)


def test_resnet_refuses_a_size_without_a_plan_and_draws_with_its_ema():
    with pytest.raises(ValueError, match="256"):
        build_gan("resnet", 128, 256, width=4)
    assert draws_with_ema("resnet") and draws_with_ema("dcgan") and not draws_with_ema("paper")


def _images(seed: int = 0, n: int = 4, side: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("op", [brightness, saturation, contrast, translation, cutout])
def test_each_augmentation_changes_every_image_keeps_the_shape_and_passes_gradients(op):
    x = _images().requires_grad_(True)
    torch.manual_seed(1)
    out = op(x)
    assert out.shape == x.shape
    assert all(not torch.equal(a, b) for a, b in zip(out.detach(), x.detach()))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_each_image_by_at_most_an_eighth_with_zeros_coming_in():
    x = _images(n=6)
    torch.manual_seed(2)
    out = translation(x)
    for a, b in zip(x, out):
        matches = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(b, _shifted(a, dy, dx))  # 32 px: up to int(32 / 8 + 0.5) = 4 pixels
        ]
        assert len(matches) == 1


def _shifted(a: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = a[i + dy, j + dx], 0 outside."""
    padded = torch.nn.functional.pad(a, [4, 4, 4, 4])
    h, w = a.shape[1:]
    return padded[:, 4 + dy : 4 + dy + h, 4 + dx : 4 + dx + w]


def test_cutout_zeroes_one_square_of_at_most_half_the_side_and_nothing_else():
    x = _images(n=8) + 3  # no pixel is 0 before
    torch.manual_seed(3)
    out = cutout(x)
    for a, b in zip(x, out):
        zero = (b == 0).all(0)  # (H, W)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
        assert zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one rectangle
        assert torch.equal(b[:, ~zero], a[:, ~zero])


def test_the_same_seed_gives_the_same_augmentation_and_another_seed_another():
    x, policy = _images(), "color,translation,cutout"

    def augmented(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return diff_augment(x, policy)

    assert torch.equal(augmented(5), augmented(5))
    assert not torch.equal(augmented(5), augmented(6))
    assert diff_augment(x, "") is x
    assert set(OPS) == {"color", "translation", "cutout"}


def test_an_unknown_policy_is_refused_by_name_with_the_known_ones():
    with pytest.raises(ValueError, match="flip; policies: color, translation, cutout"):
        diff_augment(_images(), "color,flip")
    with pytest.raises(ValueError, match="model.diffaugment: unknown policy flip"):
        apply_overrides(GAN_PRESETS["sngan"](), ["model.diffaugment=color,flip"]).validate()
    with pytest.raises(ValueError, match="optim.n_dis must be positive"):
        apply_overrides(GAN_PRESETS["sngan"](), ["optim.n_dis=0"]).validate()


def test_the_sngan_presets_are_mimicrys_settings():
    for name, policy in (("sngan", ""), ("sngan-diffaug", "color,translation,cutout")):
        cfg = GAN_PRESETS[name]().validate()
        assert (cfg.name, cfg.model.arch, cfg.model.loss, cfg.model.latent, cfg.model.width) == (
            name,
            "resnet",
            "hinge",
            128,
            64,
        )
        assert (cfg.optim.optimizer, cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == (
            "adam",
            2e-4,
            2e-4,
            0.0,
            0.9,
        )
        assert (cfg.optim.n_dis, cfg.optim.clip, cfg.optim.label_noise, cfg.data.batch_size) == (5, 0.0, 0.0, 64)
        assert cfg.model.diffaugment == policy and cfg.data.where == ""
    assert GAN_PRESETS["dcgan"]().optim.n_dis == 1 and GAN_PRESETS["paper-gan"]().model.diffaugment == ""


def _tiny(preset: str, *overrides: str):
    cfg = apply_overrides(GAN_PRESETS[preset](), ["model.width=4", "data.batch_size=4", *overrides])
    return cfg, make_nets(cfg, 32, torch.device("cpu"))


def _faces(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _record_inputs(module: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_n_dis_steps_d_that_many_times_on_its_own_batches_and_g_once():
    cfg, nets = _tiny("sngan", "optim.n_dis=3")
    reals = [_faces(seed) for seed in (1, 2, 3)]
    d_inputs = _record_inputs(nets.D)
    gan_step(cfg, nets, reals, torch.Generator().manual_seed(0), 1)
    assert {nets.opt_d.state[p]["step"].item() for p in nets.D.parameters()} == {3.0}
    assert {nets.opt_g.state[p]["step"].item() for p in nets.G.parameters()} == {1.0}
    d_steps = [x for x in d_inputs if len(x) == 8]  # real and fake together
    assert len(d_steps) == 3
    for seen, real in zip(d_steps, reals):
        assert torch.equal(seen[:4], to_tanh_range(real))
    gan_step(cfg, nets, [_faces(s) for s in (4, 5, 6)], torch.Generator().manual_seed(0), 2)
    assert {nets.opt_d.state[p]["step"].item() for p in nets.D.parameters()} == {6.0}
    with pytest.raises(ValueError, match="n_dis=3 real batches, got 1"):
        gan_step(cfg, nets, reals[:1], torch.Generator(), 3)


def test_diffaugment_reaches_d_in_both_steps_and_g_learns_through_it():
    """D sees augmented reals and fakes in its step and augmented fakes in G's; G's loss reaches G
    through the transforms (its weights move)."""
    cfg, nets = _tiny("sngan-diffaug", "optim.n_dis=1")
    real = _faces(1)
    d_inputs, g_outputs = _record_inputs(nets.D), []
    nets.G.register_forward_hook(lambda m, args, out: g_outputs.append(out.detach().clone()))
    g_before = [p.detach().clone() for p in nets.G.parameters()]
    torch.manual_seed(0)
    gan_step(cfg, nets, [real], torch.Generator().manual_seed(0), 1)
    [d_step] = [x for x in d_inputs if len(x) == 8]
    [judged] = [x for x in d_inputs if len(x) == 4]
    assert d_step.shape == (8, 3, 32, 32) and judged.shape == (4, 3, 32, 32)
    assert not torch.equal(d_step[:4], to_tanh_range(real)) and not torch.equal(d_step[4:], g_outputs[0])
    assert not torch.equal(judged, g_outputs[1])
    assert all(not torch.equal(a, b) for a, b in zip(g_before, nets.G.parameters()))


@pytest.fixture(scope="module")
def faces32(ray_cluster, tmp_path_factory) -> str:
    """200 synthetic faces packed at 32 px."""
    src = str(tmp_path_factory.mktemp("s200-32"))
    write_synthetic(src, n=200, seed=5)
    dest = str(tmp_path_factory.mktemp("p200-32"))
    return pack(src, dest, PackOptions(image=ImageFormat(size=32), samples_per_shard=50)).dest


def _gan_rank(rank: int, world_size: int, config: dict) -> None:
    from deeprecognition.gan.loop import train_loop_per_worker

    train_loop_per_worker(config)


def test_two_ranks_train_the_resnet_with_diffaugment_and_n_dis_in_step(faces32, tmp_path):
    """4 iterations of sngan-diffaug (width 4, n_dis 2) on two gloo ranks: the same collectives in
    the same order, the ranks' weights identical at every checkpoint, checkpoints that load."""
    overrides = [
        f"data.data={faces32}",
        f"storage={tmp_path}",
        "name=r",
        "optim.iterations=4",
        "optim.n_dis=2",
        "model.width=4",
        "data.batch_size=4",
        "data.loader_workers=0",
        "schedule.mosaic_every=2",
        "schedule.checkpoint_every=2",
        "schedule.log_every=1",
        f"scale.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]
    cfg = apply_overrides(GAN_PRESETS["sngan-diffaug"](), overrides)
    results = run_ranks(_gan_rank, 2, args=(to_dict(cfg),), timeout_s=COLLECTIVE_TIMEOUT_S)
    assert_same_collectives([r.record for r in results])
    logged = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [m["iteration"] for m in logged] == [1, 2, 3, 4]
    assert [m["ranks_in_sync"] for m in logged if "ranks_in_sync" in m] == [True, True]
    for iteration in (2, 4):
        state = load_state(str(tmp_path / "r" / f"checkpoint_{iteration:06d}"))
        assert state["iteration"] == iteration and state["config"]["optim"]["n_dis"] == 2
        nets = make_nets(cfg, 32, torch.device("cpu"))
        nets.load(state)  # every network and optimiser state fits the resnet arch
        assert {nets.opt_d.state[p]["step"].item() for p in nets.D.parameters()} == {2.0 * iteration}
        assert {nets.opt_g.state[p]["step"].item() for p in nets.G.parameters()} == {float(iteration)}
    assert (tmp_path / "r" / "mosaics" / "contact-sheet.png").exists()
