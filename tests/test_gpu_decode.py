"""`data.decode=gpu`: the loader hands over each batch's JPEG files and the training side decodes them
on its device. Without a GPU the same decode runs on the CPU (libjpeg-turbo, as the CPU path), so
the batches must be identical; the refusals name the field and what to change."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from deeprecognition.classifier.loop import train_loop_per_worker
from deeprecognition.config import ClassifierConfig, GanConfig, apply_overrides, to_dict
from deeprecognition.gan.data import real_batches, reference_faces
from deeprecognition.launch import check_before_workers
from deeprecognition.shards.device_decode import EncodedImages, decode_on, images_on, require_cuda
from deeprecognition.shards.loader import LoaderConfig, ShardStream, make_loader
from deeprecognition.shards.manifest import read_manifest, write_manifest

CPU = torch.device("cpu")


def epoch_batches(config: LoaderConfig, epoch: int) -> list:
    loader = make_loader(config, rank=0, world_size=1)
    loader.dataset.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("split, training", [("train", True), ("val", False)])
def test_encoded_batches_decoded_on_the_device_equal_the_cpu_paths(packed, split, training):
    # Two DataLoader workers: the encoded batches cross process boundaries as the real ones do.
    config = LoaderConfig(
        data=packed.dest,
        split=split,
        training=training,
        batch_size=16,
        num_workers=2,
        seed=3,
        targets=("Male", "Smiling"),
    )
    decoded = epoch_batches(config, epoch=1)
    encoded = epoch_batches(dataclasses.replace(config, decode="gpu"), epoch=1)
    assert len(encoded) == len(decoded) > 1
    for cpu, enc in zip(decoded, encoded):
        assert isinstance(enc.images, EncodedImages) and enc.images.data.dtype == torch.uint8
        assert len(enc.images.offsets) == len(enc.keys) + 1
        images = images_on(enc.images, CPU)
        assert enc.keys == cpu.keys and torch.equal(enc.targets, cpu.targets)
        assert images.dtype == torch.uint8 and images.shape == cpu.images.shape == (len(cpu.keys), 3, 128, 128)
        assert images.is_contiguous(
            memory_format=torch.channels_last
        )  # the layout the loops' channels_last models take
        assert torch.equal(images, cpu.images)


def test_gpu_decoding_refuses_datasets_that_are_not_jpeg(packed, tmp_path):
    dest = str(tmp_path / "png")
    shutil.copytree(packed.dest, dest)
    manifest = read_manifest(dest)
    write_manifest(
        dest, dataclasses.replace(manifest, image=dataclasses.replace(manifest.image, encoding="png", quality=None))
    )
    message = "data.decode=gpu decodes JPEG datasets only .*stores png images: use data.decode=cpu"
    with pytest.raises(ValueError, match=message):  # in the worker: the loader
        ShardStream(LoaderConfig(data=dest, decode="gpu"), rank=0, world_size=1)
    cfg = apply_overrides(ClassifierConfig(), [f"data.data={dest}", "data.decode=gpu", "scale.gpu=true"])
    with pytest.raises(ValueError, match=message):  # on the driver, before any worker starts
        check_before_workers(cfg)


@pytest.mark.parametrize("kind", [ClassifierConfig, GanConfig])
def test_gpu_decoding_without_scale_gpu_is_refused_by_the_config(kind):
    with pytest.raises(
        ValueError,
        match=r"^data.decode=gpu needs scale.gpu=true \(--gpu\) and a CUDA device; this run has scale.gpu=false",
    ):
        apply_overrides(kind(), ["data.decode=gpu"]).validate()
    with pytest.raises(ValueError, match="data.decode must be one of cpu, gpu, got 'nvjpeg'"):
        apply_overrides(kind(), ["data.decode=nvjpeg"]).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for workers without CUDA")
def test_gpu_decoding_on_a_worker_without_cuda_is_refused_by_both_loops(packed, tmp_path):
    message = r"data.decode=gpu needs scale.gpu=true \(--gpu\) and a CUDA device; torch.cuda is not available here"
    with pytest.raises(ValueError, match=message):
        require_cuda("gpu", CPU)
    overrides = [
        f"data.data={packed.dest}",
        f"storage={tmp_path}",
        "data.decode=gpu",
        "scale.gpu=true",
        "data.loader_workers=0",
    ]
    with pytest.raises(ValueError, match=message):  # the classifier's loop, before it reads any data
        train_loop_per_worker(to_dict(apply_overrides(ClassifierConfig(), overrides)))
    with pytest.raises(ValueError, match=message):  # the GAN's real faces
        next(real_batches(apply_overrides(GanConfig(), overrides), 0, 1, CPU))


def test_the_gan_reference_set_is_decoded_on_the_cpu_where_there_is_no_gpu(packed):
    # `deeprec evaluate-gan` of a GPU-decoded run on a machine without CUDA: the same faces.
    base = apply_overrides(GanConfig(), [f"data.data={packed.dest}", "data.where=", "data.cache=off"])
    gpu_run = apply_overrides(base, ["data.decode=gpu", "scale.gpu=true"])
    plain, from_gpu_run = (reference_faces(cfg, 30, CPU) for cfg in (base, gpu_run))
    assert plain.keys == from_gpu_run.keys and torch.equal(plain.images, from_gpu_run.images)


@pytest.mark.gpu
def test_nvjpeg_decodes_a_batch_into_the_cpu_paths_layout_and_values(packed):
    device = torch.device("cuda")
    config = LoaderConfig(data=packed.dest, split="val", training=False, batch_size=32, num_workers=0)
    [cpu, *_] = epoch_batches(config, epoch=0)
    [enc, *_] = epoch_batches(dataclasses.replace(config, decode="gpu"), epoch=0)
    images = decode_on(enc.images, device)
    assert (
        images.device.type == "cuda"
        and images.shape == cpu.images.shape
        and images.is_contiguous(memory_format=torch.channels_last)
    )
    # nvJPEG's IDCT is not libjpeg-turbo's: the same pixels within a level or two, not bit for bit.
    difference = (images.cpu().int() - cpu.images.int()).abs()
    assert difference.float().mean() < 1.0 and difference.max() <= 16
