"""ResNet50 transfer learning: an ImageNet backbone, partly frozen, under a dense head.

The head is 3 x [Linear -> BatchNorm1d -> ReLU -> Dropout] (widths w, w/2, w/4), then one logit per
label (BCE-with-logits applies the sigmoids).

Freeze policies (`model.freeze`):
- "none": everything trains;
- "all": the whole backbone is a fixed feature extractor;
- "paper": what the Keras original froze, `for layer in base.layers[:45]: layer.trainable = False`.
  Keras' ResNet50 lists its layers as
      0-6    input, conv1_pad, conv1_conv, conv1_bn, conv1_relu, pool1_pad, pool1_pool   (stem)
      7-18   conv2_block1: 1_conv 1_bn 1_relu 2_conv 2_bn 2_relu 0_conv 3_conv 0_bn 3_bn add out
      19-28  conv2_block2: 1_conv 1_bn 1_relu 2_conv 2_bn 2_relu 3_conv 3_bn add out
      29-38  conv2_block3: (the same 10)
      39-50  conv3_block1: 1_conv 1_bn 1_relu 2_conv 2_bn 2_relu | 0_conv 3_conv 0_bn 3_bn add out
  (a block with a projection shortcut has 12 layers, the shortcut "0" listed beside "3"), so layers
  0-44 end at conv3_block1_2_relu: the stem, all of conv2 and the first two convolutions of
  conv3_block1. In torchvision names that is conv1, bn1, layer1 and layer2.0.{conv1,bn1,conv2,bn2};
  layer2.0's third convolution and its downsample shortcut train, like conv3_block1_3 and _0 did.

A frozen module also stays in eval mode whatever `train()` says: its BatchNorm layers use and keep
their ImageNet statistics, as a non-trainable BatchNormalization does in Keras (TF2).

Weights come from torchvision checkpoints only, loaded as plain tensors (`weights_only=True`), never
downloaded: `load_backbone_weights(spec)` then `model.backbone.load_state_dict(weights)`.
"""

from __future__ import annotations

import io
import os
import pickle
from functools import cache
from typing import get_args

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights, resnet50

from deeprecognition import storage
from deeprecognition.config import Freeze
from deeprecognition.errors import InputError

# torchvision's ImageNet normalisation, applied on the device by the training loop.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

FEATURES = 2048  # ResNet50's pooled feature width

FREEZE_POLICIES: tuple[str, ...] = get_args(Freeze)

# Backbone submodules each policy freezes ("" is the whole backbone); see the module docstring.
FROZEN_MODULES: dict[str, tuple[str, ...]] = {
    "all": ("",),
    "none": (),
    "paper": ("conv1", "bn1", "layer1", "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2"),
}

# Preferred first: V2 is torchvision's DEFAULT, so the file most likely already in a cache.
IMAGENET_WEIGHTS = (ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1)


def dense_block(c_in: int, c_out: int, dropout: float) -> list[nn.Module]:
    return [
        nn.Linear(c_in, c_out, bias=False),  # (B, c_out); no bias: BatchNorm's shift replaces it
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
    ]


class ResNet50Transfer(nn.Module):
    def __init__(self, num_outputs: int, freeze: str = "paper", head_width: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"model.freeze must be one of {', '.join(FREEZE_POLICIES)}; got {freeze!r}")
        if num_outputs < 1 or head_width < 4:
            raise ValueError(f"need num_outputs >= 1 and head_width >= 4, got {num_outputs} and {head_width}")
        self.backbone = resnet50(weights=None)
        # The pooled features, not ImageNet's 1000 classes: our head replaces fc.
        self.backbone.fc = nn.Identity()  # (B, 3, H, W) -> (B, 2048)
        w = head_width
        self.head = nn.Sequential(
            *dense_block(FEATURES, w, dropout),  # (B, w)
            *dense_block(w, w // 2, dropout),  # (B, w/2)
            *dense_block(w // 2, w // 4, dropout),  # (B, w/4)
            nn.Linear(w // 4, num_outputs),  # (B, num_outputs) logits
        )
        self.penultimate_dim = w // 4
        self.freeze = freeze
        self.frozen = tuple(self.backbone.get_submodule(name) for name in FROZEN_MODULES[freeze])
        for module in self.frozen:
            module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> ResNet50Transfer:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """Normalised float images (B, 3, H, W) -> pooled backbone features (B, 2048)."""
        return self.backbone(x)

    def penultimate(self, x: Tensor) -> Tensor:
        """Normalised float images -> the last hidden layer of the head (B, head_width/4)."""
        return self.head[:-1](self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_outputs) logits


def imagenet_weight_paths() -> list[str]:
    """Where torchvision keeps the ResNet50 ImageNet files it downloads (TORCH_HOME is honoured)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return [os.path.join(folder, os.path.basename(w.url)) for w in IMAGENET_WEIGHTS]


def load_backbone_weights(spec: str) -> dict[str, Tensor] | None:
    """Backbone weights from `none` (random init: None), `imagenet` (torchvision's cache) or a file.

    A file is a local path or s3:// URI to a torchvision resnet50 state dict; its fc.* keys are
    dropped. Nothing is ever downloaded.
    """
    if spec == "none":
        return None
    if spec == "imagenet":
        paths = imagenet_weight_paths()
        uri = next((p for p in paths if os.path.isfile(p)), None)
        if uri is None:
            raise InputError(
                paths[0],
                f"no ImageNet ResNet50 weights in torch's cache (looked for {' and '.join(paths)}); "
                "nothing is downloaded here: put torchvision's file there, "
                "or pass --weights PATH|s3://... or --weights none",
            )
    else:
        uri = spec
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(
            uri, "no such weights file; pass a torchvision resnet50 .pth, --weights imagenet or --weights none"
        ) from None
    return resnet50_backbone_state(uri, data)


def resnet50_backbone_state(uri: str, data: bytes) -> dict[str, Tensor]:
    """The backbone tensors of a torchvision resnet50 state dict file, checked key by key."""
    try:
        # weights_only: a checkpoint is data; unpickling anything else could run arbitrary code.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise InputError(uri, f"refused: not a plain tensor checkpoint ({_reason(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(uri, f"expected a resnet50 state dict (name -> tensor), got a {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = _backbone_shapes()
    # Old checkpoints predate BatchNorm's counter; BatchNorm fills it in when loading them.
    missing = sorted(k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    problems = [
        _summary(label, keys)
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise InputError(uri, f"not a torchvision resnet50 state dict: {'; '.join(problems)}")
    return state


@cache
def _backbone_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        reference = resnet50(weights=None)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}


def _summary(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} {label} keys ({shown})"


def _reason(err: BaseException) -> str:
    """The informative line of torch's long weights_only message (e.g. 'unsupported GLOBAL posix.system')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(err).__name__)
