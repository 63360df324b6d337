"""One iteration of the GAN loop, gan_step, on a tiny DCGAN: each phase checked against the same
step computed by hand from what G and D were given (loss, gradients, element-wise clip, optimiser
step, the EMA), the study's Keras clipvalue, and D learning on a fixed batch within a few steps."""

from __future__ import annotations

import pytest
import torch

from deeprecognition.config import apply_overrides, modern_dcgan
from deeprecognition.gan.models import d_loss, ema_decay_at, g_loss, to_tanh_range
from deeprecognition.gan.step import clip_gradients, gan_step, make_nets


def test_the_studys_gradient_clipping_is_keras_clipvalue():
    """Keras' clipvalue=1.0 clips each gradient element; a norm clip would scale them all down."""
    layer = torch.nn.Linear(3, 1, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 0.5, -2.0]])
    clip_gradients(layer, 1.0)
    assert layer.weight.grad.tolist() == [[1.0, 0.5, -1.0]]
    clip_gradients(layer, 0.0)  # off
    assert layer.weight.grad.tolist() == [[1.0, 0.5, -1.0]]


def _tiny_gan(*overrides: str):
    """A DCGAN of width 8 at 32 px and batch 4 with its optimisers, built as the loop builds them."""
    cfg = apply_overrides(modern_dcgan(), ["model.width=8", "data.batch_size=4", *overrides])
    return cfg, make_nets(cfg, 32, torch.device("cpu"))


class _Forwards:
    """Every forward of a module: its state (parameters and buffers) and input as the call began,
    whether gradients were on, and its output."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[dict] = []
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.calls.append({"state": state, "input": args[0].detach().clone(), "grad": torch.is_grad_enabled()})

    def _after(self, module, args, output) -> None:
        self.calls[-1]["output"] = output.detach().clone()


def _same_optimizer(like: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """A fresh optimiser of `like`'s kind and hyperparameters over `params`."""
    return type(like)(params, **{k: v for k, v in like.param_groups[0].items() if k != "params"})


def _recorded_step(loss: str, clip: float) -> dict:
    """One gan_step of a tiny DCGAN on a fixed batch with every forward of G and D recorded: the
    calls by phase, the batch, the returned losses and the networks before and after."""
    cfg, nets = _tiny_gan(f"model.loss={loss}", f"optim.clip={clip}", "optim.label_noise=0")
    batch, iteration = cfg.data.batch_size, 5
    real = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g_start = {k: v.clone() for k, v in nets.G.named_parameters()}
    ema_start = [p.clone() for p in nets.ema.parameters()]
    g_calls, d_calls = _Forwards(nets.G), _Forwards(nets.D)
    losses = gan_step(cfg, nets, [real], torch.Generator().manual_seed(1), iteration)
    [fake] = [c for c in g_calls.calls if not c["grad"]]  # D's phase: G draws without gradients
    [g_phase] = [c for c in g_calls.calls if c["grad"]]
    [d_phase] = [c for c in d_calls.calls if len(c["input"]) == 2 * batch]  # real and fake together
    [judge] = [c for c in d_calls.calls if len(c["input"]) == batch]  # G's fakes in G's phase
    return {
        **{"cfg": cfg, "nets": nets, "real": real, "iteration": iteration, "losses": losses},
        **{"fake": fake, "g_phase": g_phase, "d_phase": d_phase, "judge": judge},
        **{"g_start": g_start, "ema_start": ema_start},
    }


def _assert_step_by_hand(mine: torch.nn.Module, theirs: torch.nn.Module, loss: torch.Tensor, clip: float, like) -> None:
    """Backward of `loss` on `mine`, the element-wise clip and one step of an optimiser like `like`
    give `theirs`'s gradients and weights exactly; with a clip, it bound and every element is within it."""
    loss.backward()
    unclipped = max(p.grad.abs().max().item() for p in mine.parameters())
    clip_gradients(mine, clip)
    _same_optimizer(like, mine.parameters()).step()
    by_name = dict(mine.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(p.grad, by_name[name].grad, rtol=0, atol=0)
        assert torch.equal(p, by_name[name]), name
    if clip:
        assert unclipped > clip  # the limit binds at this step ...
        limit = torch.tensor(clip).item()  # (as a float32 gradient holds it)
        assert max(p.grad.abs().max().item() for p in theirs.parameters()) == limit  # ... and holds


CASES = [("hinge", 0.0), ("bce", 1e-3)]


@pytest.mark.parametrize(("loss", "clip"), CASES)
def test_d_learns_on_real_faces_in_tanh_range_and_gs_fakes_from_its_own_loss_alone(loss, clip):
    """D's phase of gan_step against the same computed by hand from what D was given: its loss, its
    gradients (none from G's loss), clipped to optim.clip, and its optimiser's step; nothing after it
    moves D, and G's phase sees D's updated weights."""
    step = _recorded_step(loss, clip)
    nets, batch, x = step["nets"], step["cfg"].data.batch_size, step["d_phase"]["input"]
    assert torch.equal(x[:batch], to_tanh_range(step["real"])) and torch.equal(x[batch:], step["fake"]["output"])
    _, ref = _tiny_gan()
    ref.D.load_state_dict(step["d_phase"]["state"])
    logits = ref.D(x)
    expected = d_loss(logits[:batch], logits[batch:], loss)
    assert step["losses"]["loss/d"].item() == expected.item()
    _assert_step_by_hand(ref.D, nets.D, expected, clip, nets.opt_d)
    assert all(torch.equal(step["judge"]["state"][name], p) for name, p in ref.D.named_parameters())


@pytest.mark.parametrize(("loss", "clip"), CASES)
def test_g_learns_through_the_updated_d_and_the_ema_follows_it(loss, clip):
    """G's phase against the same computed by hand: D's phase left G's weights alone; G's loss goes
    through the updated D; G's gradients, clipped, and its optimiser's step; the EMA moves toward the
    new G by 1 - its decay at this iteration and copies G's buffers."""
    step = _recorded_step(loss, clip)
    nets, g_phase = step["nets"], step["g_phase"]
    assert all(torch.equal(g_phase["state"][name], start) for name, start in step["g_start"].items())
    _, ref = _tiny_gan()
    ref.G.load_state_dict(g_phase["state"])
    ref.D.load_state_dict(step["judge"]["state"])
    fakes = ref.G(g_phase["input"])
    assert torch.equal(fakes.detach(), step["judge"]["input"])
    expected = g_loss(ref.D(fakes), loss)
    assert step["losses"]["loss/g"].item() == expected.item()
    _assert_step_by_hand(ref.G, nets.G, expected, clip, nets.opt_g)
    decay = ema_decay_at(step["cfg"].model.ema_decay, step["iteration"])
    for e, start, g in zip(nets.ema.parameters(), step["ema_start"], nets.G.parameters()):
        torch.testing.assert_close(e, start + (1 - decay) * (g - start))
        assert not torch.equal(e, start)
    assert all(torch.equal(e, g) for e, g in zip(nets.ema.buffers(), nets.G.buffers()))


def test_a_few_gan_steps_on_a_fixed_batch_teach_d_to_tell_it_from_the_fakes():
    """Ten steps on one real batch: D's hinge loss on it against G's faces from fixed latents falls
    and its scores for the two separate. With D's learning rate 0 neither happens (G learns to fool
    D): the measurement sees D learn, not time pass."""

    def after_ten_steps(lr_d: str) -> tuple[tuple[float, float], tuple[float, float]]:
        cfg, nets = _tiny_gan("data.batch_size=8", f"optim.lr_d={lr_d}")
        faces = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        real = to_tanh_range(faces)
        z = torch.randn(8, cfg.model.latent, generator=torch.Generator().manual_seed(9))

        def measure() -> tuple[float, float]:
            nets.D.eval()  # spectral norm's power iteration stays where training left it
            with torch.no_grad():
                on_real, on_fake = nets.D(real), nets.D(nets.G(z))
            nets.D.train()
            return d_loss(on_real, on_fake, "hinge").item(), (on_real.mean() - on_fake.mean()).item()

        before = measure()
        noise = torch.Generator().manual_seed(1)
        for iteration in range(1, 11):
            gan_step(cfg, nets, [faces], noise, iteration)
        return before, measure()

    (loss_before, gap_before), (loss_after, gap_after) = after_ten_steps("0.0002")
    assert loss_after < loss_before - 0.1 and gap_after > gap_before + 0.1
    (loss_before, gap_before), (loss_after, gap_after) = after_ten_steps("0")
    assert loss_after >= loss_before and gap_after <= gap_before
