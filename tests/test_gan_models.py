"""The GANs: shapes and ranges per arch and size, refusals, hand-checked losses and label noise,
EMA arithmetic, standing statistics, the uint8 <-> tanh round trip, and a discriminator that learns
in one step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deeprecognition.gan.models import (
    DCGANDiscriminator,
    DCGANGenerator,
    PaperDiscriminator,
    PaperGenerator,
    build_gan,
    d_loss,
    ema_copy,
    g_loss,
    standing_statistics,
    to_tanh_range,
    to_uint8,
    update_ema,
)

LATENT = {"paper": 32, "dcgan": 128}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("arch", "size"), [("paper", 64), ("dcgan", 64), ("dcgan", 128)])
def test_generator_images_are_in_tanh_range_and_discriminator_gives_one_logit(arch, size):
    torch.manual_seed(0)
    gen, disc = build_gan(arch, LATENT[arch], size)
    with torch.no_grad():
        images = gen(torch.randn(2, LATENT[arch]))
        logits = disc(images)
    assert images.shape == (2, 3, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0  # not a constant image
    assert logits.shape == (2, 1)
    assert torch.isfinite(logits).all()


def test_paper_gan_at_128_px_has_the_study_shapes():
    # On the meta device shapes propagate without the ~100 GFLOP per image of the 512-wide convs.
    with torch.device("meta"):
        gen, disc = build_gan("paper", 32, 128)
        images = gen(torch.randn(2, 32))
        logits = disc(images)
    assert images.shape == (2, 3, 128, 128)
    assert logits.shape == (2, 1)
    ups = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 3  # 16 -> 32 -> 64 -> 128
    assert [m.stride for m in disc.modules() if isinstance(m, nn.Conv2d)].count((2, 2)) == 4


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: PaperGenerator(32, 128), 14_953_987),
        (lambda: PaperDiscriminator(128), 4_218_881),
        (lambda: DCGANGenerator(128, 128), 13_245_315),
        (lambda: DCGANDiscriminator(128), 11_162_561),
        (lambda: DCGANGenerator(128, 64), 3_806_083),
        (lambda: DCGANDiscriminator(64), 2_764_737),
    ],
)
def test_parameter_counts(build, expected):
    with torch.device("meta"):
        assert n_params(build()) == expected


def test_dcgan_channels_halve_from_width_times_8_at_64_px():
    gen = DCGANGenerator(128, 64, width=64)
    ups = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in ups] == [512, 256, 128, 64, 3]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gen.modules()) == 4


def test_dcgan_discriminator_is_spectrally_normalised_without_batch_norm():
    disc = DCGANDiscriminator(64)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5  # 64 -> 32 -> 16 -> 8 -> 4, then the 4x4 logit conv
    assert all(hasattr(c, "parametrizations") and "weight" in c.parametrizations for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())


def test_build_gan_refuses_unknown_arch_and_bad_sizes():
    with pytest.raises(ValueError, match="stylegan"):
        build_gan("stylegan", 32, 64)
    for size in (16, 48, 100):
        with pytest.raises(ValueError, match=str(size)):
            build_gan("dcgan", 128, size)
    with pytest.raises(ValueError, match="96"):
        build_gan("paper", 32, 96)


def test_hinge_losses_match_hand_computed_values():
    real = torch.tensor([[2.0], [0.5], [-1.0]])
    fake = torch.tensor([[-2.0], [0.0], [1.5]])
    # real: relu(1 - r) = 0, 0.5, 2 -> 2.5/3; fake: relu(1 + f) = 0, 1, 2.5 -> 3.5/3
    assert d_loss(real, fake, "hinge").item() == pytest.approx(6.0 / 3)
    assert g_loss(fake, "hinge").item() == pytest.approx(0.5 / 3)  # -mean(-2, 0, 1.5)


def test_bce_losses_without_noise_are_torch_bce():
    real = torch.tensor([[2.0], [0.5], [-1.0]])
    fake = torch.tensor([[-2.0], [0.0], [1.5]])
    expected = F.binary_cross_entropy(torch.sigmoid(real), torch.ones(3, 1))
    expected = expected + F.binary_cross_entropy(torch.sigmoid(fake), torch.zeros(3, 1))
    assert d_loss(real, fake, "bce").item() == pytest.approx(expected.item(), rel=1e-5)
    # Non-saturating: -log(sigmoid(f)), large when D spots the fakes.
    non_saturating = -torch.log(torch.sigmoid(fake)).mean()
    assert g_loss(fake, "bce").item() == pytest.approx(non_saturating.item(), rel=1e-5)


def test_bce_label_noise_moves_targets_toward_the_other_class_deterministically():
    real = torch.tensor([[3.0], [1.0], [2.0], [0.5]])
    fake = torch.tensor([[-3.0], [-1.0], [-2.0], [-0.5]])
    noise = 0.05

    def noisy(seed: int) -> float:
        return d_loss(real, fake, "bce", label_noise=noise, generator=torch.Generator().manual_seed(seed)).item()

    # The targets are 1 - noise * u and noise * u, u the generator's own draws in that order.
    draws = torch.Generator().manual_seed(11)
    real_target = 1 - noise * torch.rand(real.shape, generator=draws)
    fake_target = noise * torch.rand(fake.shape, generator=draws)
    expected = F.binary_cross_entropy_with_logits(real, real_target)
    expected = expected + F.binary_cross_entropy_with_logits(fake, fake_target)
    assert noisy(11) == pytest.approx(expected.item(), rel=1e-6)
    assert noisy(11) == noisy(11) and noisy(11) != noisy(12)  # the generator decides, and is used
    # For correct logits BCE grows as its target moves toward the other class, so the loss lies
    # between the noiseless one (targets 1 and 0) and the one with every target moved the full
    # `noise` (1 - noise and noise): no target moves past that, none moves the wrong way.
    clean = d_loss(real, fake, "bce").item()
    furthest = F.binary_cross_entropy_with_logits(real, torch.full_like(real, 1 - noise))
    furthest = (furthest + F.binary_cross_entropy_with_logits(fake, torch.full_like(fake, noise))).item()
    for seed in range(20):
        assert clean < noisy(seed) < furthest
    assert d_loss(real, fake, "bce", label_noise=0.0, generator=torch.Generator().manual_seed(11)).item() == clean


def test_unknown_loss_is_refused():
    logits = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="wgan"):
        d_loss(logits, logits, "wgan")
    with pytest.raises(ValueError, match="wgan"):
        g_loss(logits, "wgan")


def toy() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_copy_is_frozen_and_in_eval_mode():
    model = toy().train()
    ema = ema_copy(model)
    assert not ema.training
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched
    assert ema[0].weight.data_ptr() != model[0].weight.data_ptr()


def test_update_ema_moves_parameters_by_one_minus_decay_and_copies_buffers():
    torch.manual_seed(0)
    model = toy()
    ema = ema_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 3))  # changes the BN running statistics
    before = [p.clone() for p in ema.parameters()]

    update_ema(ema, model, decay=0.9)

    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, b + 0.1 * (p - b))
        assert not torch.equal(e, b)
    for e, b in zip(ema.buffers(), model.buffers()):
        torch.testing.assert_close(e, b.to(e.dtype), rtol=0, atol=0)


def test_ema_unwraps_distributed_data_parallel(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = nn.Linear(3, 2)
        wrapped = nn.parallel.DistributedDataParallel(model)
        ema = ema_copy(wrapped)
        assert isinstance(ema, nn.Linear)
        with torch.no_grad():
            model.weight.add_(1.0)
        before = ema.weight.clone()
        update_ema(ema, wrapped, decay=0.5)
        torch.testing.assert_close(ema.weight, (before + model.weight) / 2)
    finally:
        dist.destroy_process_group()


def test_uint8_and_tanh_range_round_trip_exactly():
    values = torch.arange(256, dtype=torch.uint8)
    tanh = to_tanh_range(values)
    assert tanh.dtype == torch.float32
    assert tanh[0].item() == -1.0 and tanh[-1].item() == 1.0
    assert torch.equal(to_uint8(tanh), values)
    # Generator outputs can only touch the ends, but clamping keeps stray values valid.
    clamped = to_uint8(torch.tensor([-1.5, 1.5]))
    assert torch.equal(clamped, torch.tensor([0, 255], dtype=torch.uint8))


def test_one_discriminator_step_lowers_its_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    gen, disc = build_gan("dcgan", 128, 32)
    real = to_tanh_range(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        fake = gen(torch.randn(4, 128))
    opt = torch.optim.SGD(disc.parameters(), lr=0.05)

    def loss() -> torch.Tensor:
        return d_loss(disc(real), disc(fake), "hinge")

    # In eval mode spectral norm reuses its power-iteration vectors: the same function both times.
    disc.eval()
    with torch.no_grad():
        before = loss().item()
    opt.zero_grad()
    loss().backward()
    opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before - 1e-3


def test_the_contact_sheet_shows_at_most_25_mosaics_evenly_spaced_with_the_last():
    from deeprecognition.gan.generate import evenly_spaced

    assert evenly_spaced([50, 100, 150]) == [50, 100, 150]
    picked = evenly_spaced(list(range(50, 100_001, 50)))
    assert len(picked) <= 25 and picked[0] == 50 and picked[-1] == 100_000
    gaps = {b - a for a, b in zip(picked, picked[1:-1])}
    assert len(gaps) == 1  # even spacing up to the last


def test_the_ema_warms_up_then_keeps_its_decay():
    from deeprecognition.gan.models import ema_decay_at

    assert ema_decay_at(0.999, 0) == 0.1  # the first update nearly copies G
    assert ema_decay_at(0.999, 90) == 0.91
    assert ema_decay_at(0.999, 100_000) == 0.999


def test_standing_statistics_measure_batchnorm_for_the_ema_weights():
    """The EMA generator's BatchNorm statistics were copied from G, measured under G's weights:
    after standing_statistics its first BatchNorm normalises its own activations (mean ~0, std ~1
    per channel on new latents, in eval mode), which the copied statistics do not."""
    torch.manual_seed(0)
    G = DCGANGenerator(latent=16, image_size=32, width=8)
    with torch.no_grad():
        for _ in range(40):  # G's running statistics, in train mode: its own activations
            G(torch.randn(256, 16))
    ema = ema_copy(G)
    with torch.no_grad():
        ema.net[0].weight.mul_(3.0)  # the EMA weights have moved away from G's
    first_norm = ema.net[1]

    def normalised_first_layer() -> torch.Tensor:
        out = {}
        # A copy: the in-place ReLU after it would zero the negative half.
        handle = first_norm.register_forward_hook(lambda module, inputs, output: out.update(y=output.clone()))
        with torch.no_grad():
            ema.eval()(torch.randn(2048, 16, generator=torch.Generator().manual_seed(9)))
        handle.remove()
        return out["y"].transpose(0, 1).flatten(1)  # (C, N*H*W)

    copied = normalised_first_layer()
    assert copied.std(1).mean() > 1.5  # G's statistics, under weights three times as large
    weights = {k: v.clone() for k, v in ema.named_parameters()}
    buffers = {k: v.clone() for k, v in ema.named_buffers()}
    standing_statistics(ema, latent=16, samples=1024, batch_size=128)
    assert not ema.training and first_norm.momentum == 0.1  # left as it was found, in eval mode
    # Only BatchNorm's running statistics change: every one of them, and no weight.
    assert all(torch.equal(v, weights[k]) for k, v in ema.named_parameters())
    changed = {k for k, v in ema.named_buffers() if not torch.equal(v, buffers[k])}
    assert changed == {k for k in buffers if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    standing = normalised_first_layer()
    assert standing.mean(1).abs().max() < 0.1 and (standing.std(1) - 1).abs().max() < 0.1
