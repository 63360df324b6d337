"""Shared test infrastructure: one moto S3 server on 127.0.0.1, one local Ray cluster and one small
synthetic CelebA (packed once) for the whole run; real-data tests need DEEPREC_CELEBA_ROOT."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import boto3
import numpy as np
import pytest

from deeprecognition.celeba.annotations import write_annotations
from deeprecognition.celeba.synthetic import write_synthetic
from deeprecognition.shards.encode import ImageFormat
from deeprecognition.shards.pack import PackOptions, PackReport, pack

SYNTH_N = 240
# Every multi-rank test run: a collective that waits this long fails its test instead of hanging CI.
COLLECTIVE_TIMEOUT_S = 60
SYNTH_SEED = 7
# Small shards, so that even a 240-image dataset has several per split.
TEST_PACK = PackOptions(samples_per_shard=25)
BUCKET = "deeprec-test"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    celeba = os.environ.get("DEEPREC_CELEBA_ROOT")
    skip_real = pytest.mark.skip(reason="set DEEPREC_CELEBA_ROOT to a CelebA copy to run real-data tests")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    has_cuda = _has_cuda()
    for item in items:
        if "real_data" in item.keywords and not (celeba and os.path.isdir(celeba)):
            item.add_marker(skip_real)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def shard_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The node-local shard cache of this run alone (every process of it, Ray's included, inherits
    the variable): shards cached by an earlier run would hide S3 reads a test counts or faults."""
    folder = str(tmp_path_factory.mktemp("shard-cache"))
    os.environ["DEEPREC_CACHE_DIR"] = folder
    return folder


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A real S3 server (moto) on 127.0.0.1 with one bucket; its URL is in AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # Fake credentials through the standard chain (environment), set before Ray starts so that
    # Ray's workers inherit them exactly as cluster nodes inherit an instance role.
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=url,
    )
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3: str) -> Iterator[None]:
    """One local Ray for the whole run (address="local": never someone else's cluster), its
    dashboard on a port of its own that its processes are told (raycluster._start_local_ray: Ray
    Train's placement-group cleaner would otherwise ask whichever dashboard holds 8265)."""
    import ray

    from deeprecognition.raycluster import _free_local_port

    port = _free_local_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("synth-celeba"))
    write_synthetic(root, n=SYNTH_N, seed=SYNTH_SEED)
    return root


@pytest.fixture(scope="session")
def packed(ray_cluster: None, synth_root: str, tmp_path_factory: pytest.TempPathFactory) -> PackReport:
    """The synthetic CelebA packed once with TEST_PACK into a local folder."""
    return pack(synth_root, str(tmp_path_factory.mktemp("packed")), TEST_PACK)


@pytest.fixture(scope="session")
def faces64(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """1,200 synthetic faces at 64 px: enough for a CNN to learn Male in a few CPU seconds."""
    src = str(tmp_path_factory.mktemp("s1200"))
    write_synthetic(src, n=1200, seed=3)
    return pack(
        src, str(tmp_path_factory.mktemp("p1200")), PackOptions(image=ImageFormat(size=64), samples_per_shard=200)
    ).dest


@pytest.fixture(scope="session")
def judge(faces64: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small CNN trained on Male, Smiling and Attractive: FID features and attribute rates."""
    from deeprecognition.classifier.loop import train_loop_per_worker
    from deeprecognition.config import ClassifierConfig, apply_overrides, to_dict

    runs = tmp_path_factory.mktemp("judge")
    overrides = [
        f"data.data={faces64}",
        f"storage={runs}",
        "name=judge",
        "data.task=Male,Smiling,Attractive",
        "data.batch_size=32",
        "data.loader_workers=0",
        "model.layers=3",
        "optim.epochs=2",
    ]
    train_loop_per_worker(to_dict(apply_overrides(ClassifierConfig(), overrides)))
    return str(runs / "judge")


def repartitioned(root: str, dest: str, n: int, partition: Callable[[int], int], size: int = 64) -> str:
    """A synthetic CelebA of n faces whose official partition is `partition(i)` for image i
    (0 train, 1 val, 2 test), packed at `size` px: datasets with an empty or one-image split."""
    ann = write_synthetic(root, n=n, seed=11)
    write_annotations(
        root, dataclasses.replace(ann, partition=np.array([partition(i) for i in range(n)], dtype=np.uint8))
    )
    return pack(root, dest, PackOptions(image=ImageFormat(size=size), samples_per_shard=50)).dest
