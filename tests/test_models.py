"""The study's models: shapes, refusals, a CNN that learns, the ResNet50 freeze policies, and
backbone weights that load only as plain tensors."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torchvision
from torch import nn

from deeprecognition.classifier.cnn import PaperCNN
from deeprecognition.classifier.transfer import (
    FREEZE_POLICIES,
    ResNet50Transfer,
    imagenet_weight_paths,
    load_backbone_weights,
)
from deeprecognition.errors import InputError


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("num_outputs", [1, 40])
def test_cnn_has_the_paper_blocks_and_outputs_one_logit_per_label(layers, num_outputs):
    model = PaperCNN(layers, num_outputs, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256][:layers]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert model.dense.in_features == convs[-1].out_channels * (32 // 2**layers) ** 2
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_outputs) and out.dtype == torch.float32


def test_cnn_default_size_is_the_studys_128():
    assert PaperCNN(3, 5)(torch.randn(2, 3, 128, 128)).shape == (2, 5)


@pytest.mark.parametrize("layers", [0, 5, 7])
def test_cnn_refuses_layers_outside_1_to_4(layers):
    with pytest.raises(ValueError, match=f"model.layers must be 1..4, got {layers}"):
        PaperCNN(layers, 1)


def test_cnn_refuses_a_size_the_pools_cannot_halve():
    with pytest.raises(ValueError, match="image size 40 must be divisible by 2\\*\\*model.layers = 16"):
        PaperCNN(4, 1, image_size=40)
    PaperCNN(3, 1, image_size=40)  # 40 / 8 = 5: fine


def test_cnn_overfits_a_tiny_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8, 3)).float()
    model = PaperCNN(2, 3, image_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal((model(x) > 0).float(), y)


# --- ResNet50 transfer -------------------------------------------------------------------------


def keras_resnet50_layers() -> list[tuple[str, str | None]]:
    """Keras' ResNet50 layer list through conv3_block4 as (Keras name, torchvision module or None).

    In the order keras.applications.resnet lists them (a projection block's shortcut "0" beside its
    "3"), so it checks the hand-written mapping in transfer.py independently."""
    layers = [("input", None), ("conv1_pad", None), ("conv1_conv", "conv1"), ("conv1_bn", "bn1"), ("conv1_relu", None)]
    layers += [("pool1_pad", None), ("pool1_pool", None)]
    for stage, blocks in ((2, 3), (3, 4)):
        for b in range(blocks):
            k, t = f"conv{stage}_block{b + 1}_", f"layer{stage - 1}.{b}."
            layers += [(k + "1_conv", t + "conv1"), (k + "1_bn", t + "bn1"), (k + "1_relu", None)]
            layers += [(k + "2_conv", t + "conv2"), (k + "2_bn", t + "bn2"), (k + "2_relu", None)]
            if b == 0:
                layers += [(k + "0_conv", t + "downsample.0"), (k + "3_conv", t + "conv3")]
                layers += [(k + "0_bn", t + "downsample.1"), (k + "3_bn", t + "bn3")]
            else:
                layers += [(k + "3_conv", t + "conv3"), (k + "3_bn", t + "bn3")]
            layers += [(k + "add", None), (k + "out", None)]
    return layers


def frozen_param_names(model: ResNet50Transfer) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def models() -> dict[str, ResNet50Transfer]:
    torch.manual_seed(0)
    return {policy: ResNet50Transfer(num_outputs=3, freeze=policy, head_width=64) for policy in FREEZE_POLICIES}


def test_paper_freeze_is_exactly_kerass_first_45_layers(models):
    first_45 = keras_resnet50_layers()[:45]
    assert first_45[-1][0] == "conv3_block1_2_relu"
    expected = [module for _, module in first_45 if module]
    assert len(expected) == 26  # 13 convolutions and their 13 batch norms
    frozen = frozen_param_names(models["paper"])
    assert {n.rsplit(".", 1)[0] for n in frozen} == {f"backbone.{m}" for m in expected}


def test_freeze_all_and_none(models):
    backbone = {n for n, _ in models["all"].named_parameters() if n.startswith("backbone.")}
    assert frozen_param_names(models["all"]) == backbone and len(backbone) == 53 + 2 * 53  # convs, BN weight+bias
    assert frozen_param_names(models["none"]) == set()
    for model in models.values():
        assert all(p.requires_grad for p in model.head.parameters())


def test_unknown_freeze_policy_is_refused():
    with pytest.raises(ValueError, match="model.freeze must be one of all, none, paper; got 'half'"):
        ResNet50Transfer(3, freeze="half")


def bn_buffers(model: ResNet50Transfer) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running_" in n}


@pytest.mark.parametrize("policy", FREEZE_POLICIES)
def test_frozen_batch_norms_keep_their_statistics_in_train_mode(models, policy):
    model = models[policy].train()
    before = bn_buffers(model)
    model(torch.randn(4, 3, 64, 64))
    after = bn_buffers(model)
    frozen = {n.rsplit(".", 1)[0] for n in frozen_param_names(model)}
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved != (name.rsplit(".", 1)[0] in frozen), name
    assert model.head.training and model.backbone.layer4.training == (policy != "all")


def test_forward_is_head_of_features(models):
    model = models["paper"].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (2, 2048)
        assert torch.allclose(model(x), model.head(features))


# --- backbone weights ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = torchvision.models.resnet50().state_dict()
    path = str(tmp_path_factory.mktemp("weights") / "resnet50.pth")
    torch.save(state, path)
    return path, state


def test_none_means_random_init():
    assert load_backbone_weights("none") is None


def test_a_torchvision_state_dict_loads_without_fc_and_equals_the_file(resnet50_file):
    path, state = resnet50_file
    weights = load_backbone_weights(path)
    assert set(weights) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    model = ResNet50Transfer(2, freeze="all", head_width=8)
    model.backbone.load_state_dict(weights)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(InputError, match="refused: .*posix.system"):
        load_backbone_weights(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: only weights_only kept it out
    assert marker.exists()


def test_another_architecture_is_named_with_its_key_differences(tmp_path):
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(
        InputError,
        match=r"not a torchvision resnet50 state dict: \d+ missing keys \(layer1\.0\.bn3\.bias, .*wrong shape",
    ):
        load_backbone_weights(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(InputError, match="expected a resnet50 state dict .* got a Tensor"):
        load_backbone_weights(path)


def test_a_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(InputError, match="no such weights file") as err:
        load_backbone_weights(path)
    assert err.value.path == path


def test_imagenet_reads_torchvisions_cache_and_never_downloads(tmp_path, monkeypatch, resnet50_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    v2, v1 = (str(tmp_path / "hub" / "checkpoints" / f) for f in ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"))
    assert imagenet_weight_paths() == [v2, v1]
    with pytest.raises(InputError) as err:
        load_backbone_weights("imagenet")
    message = str(err.value)
    assert v2 in message and v1 in message and "--weights none" in message and "s3://" in message
    os.makedirs(os.path.dirname(v1))
    os.link(resnet50_file[0], v1)
    weights = load_backbone_weights("imagenet")
    assert torch.equal(weights["conv1.weight"], resnet50_file[1]["conv1.weight"])


def test_an_old_checkpoint_without_batch_norm_counters_still_loads(tmp_path, resnet50_file):
    buf = io.BytesIO()
    torch.save({k: v for k, v in resnet50_file[1].items() if not k.endswith("num_batches_tracked")}, buf)
    path = tmp_path / "old.pth"
    path.write_bytes(buf.getvalue())
    backbone = ResNet50Transfer(2, freeze="none", head_width=8).backbone
    backbone.load_state_dict(load_backbone_weights(str(path)))  # strict: every key accounted for
    assert torch.equal(backbone.bn1.running_var, resnet50_file[1]["bn1.running_var"])
