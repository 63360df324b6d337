"""The node-local shard cache: shards of an S3 dataset fetched once per node, whatever reads them
(processes racing on an empty cache, loader workers over several epochs, a 4-trial sweep submitted
to a cluster node), never seen half written, evicted least recently used first under the cap, and a
bad cached copy fetched again. S3 is moto behind a counting proxy (tests/faultproxy.py)."""

from __future__ import annotations

import csv
import hashlib
import logging
import multiprocessing
import os
import threading

import boto3
import pytest

from deeprecognition import storage
from deeprecognition.errors import CorruptShardError
from deeprecognition.shards import cache as cache_module
from deeprecognition.shards.cache import ShardCache
from deeprecognition.shards.loader import LoaderConfig, make_loader, read_shard
from deeprecognition.shards.manifest import MANIFEST, ShardInfo

from .celeba_fixtures import upload_folder
from .conftest import BUCKET
from .faultproxy import FaultProxy
from .rayhead import REPO
from .test_jobs import head, submit_and_wait  # noqa: F401 - head is a fixture: a Ray head of this module's own

# HTTP status lines and headers: a few hundred bytes per request on top of each object's bytes.
HEADERS_SLACK = 64 * 1024


@pytest.fixture(scope="module")
def remote(packed, s3) -> str:
    """The session's synthetic dataset, uploaded to S3 as it is (the same manifest and shards)."""
    uri = f"s3://{BUCKET}/cached"
    upload_folder(packed.dest, uri, s3)
    return uri


@pytest.fixture
def proxy(s3, monkeypatch):
    """A proxy that only counts (no faults) between this process, and any it starts, and S3."""
    counting = FaultProxy.before(s3, cut_every=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", counting.url)
    yield counting
    counting.stop()


def cache_in(folder) -> ShardCache:
    return ShardCache(str(folder), cap_bytes=10**12)


def _read_in_another_process(
    folder: str, uri: str, shard: ShardInfo, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue
) -> None:
    start.wait()  # every process finds the cache empty at the same moment
    out.put(hashlib.sha256(cache_in(folder).read(uri, shard)).hexdigest())


def test_processes_racing_on_an_empty_cache_get_the_exact_shard_downloaded_once(packed, remote, proxy, tmp_path):
    shard = packed.manifest.splits["train"].shards[0]
    uri, path = storage.join(remote, shard.name), cache_in(tmp_path).path(shard)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    readers = [
        ctx.Process(target=_read_in_another_process, args=(str(tmp_path), uri, shard, start, out)) for _ in range(4)
    ]
    sizes_seen: set[int] = set()
    racing = threading.Event()

    def watch() -> None:  # whenever the cached file is there, it is whole
        while not racing.is_set():
            try:
                sizes_seen.add(os.path.getsize(path))
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    for reader in readers:
        reader.start()
    digests = [out.get(timeout=120) for _ in readers]
    for reader in readers:
        reader.join()
    racing.set()
    watcher.join()
    assert digests == [shard.sha256] * 4 and all(r.exitcode == 0 for r in readers)
    assert sizes_seen == {shard.bytes}
    assert (
        shard.bytes <= proxy.bytes_to_client < 2 * shard.bytes
    )  # one download: the others waited for its lock, then hit
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"{shard.sha256}.tar", f"{shard.sha256}.tar.lock", ".evict.lock"]
    )  # no temp file left


def test_loader_workers_read_an_s3_dataset_once_over_several_epochs(packed, remote, proxy, tmp_path):
    config = LoaderConfig(data=remote, split="train", batch_size=16, num_workers=2, cache=str(tmp_path))
    loader = make_loader(config, rank=0, world_size=1)
    keys = []
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        keys.append(sorted(k for batch in loader for k in batch.keys))
    local = make_loader(
        LoaderConfig(data=packed.dest, split="train", batch_size=16, num_workers=0), rank=0, world_size=1
    )
    local.dataset.set_epoch(2)
    assert keys[2] == sorted(k for batch in local for k in batch.keys)  # the same epochs as from local disk
    split_bytes = sum(s.bytes for s in packed.manifest.splits["train"].shards)
    small = os.path.getsize(os.path.join(packed.dest, MANIFEST)) + packed.manifest.labels.bytes
    # Without the cache: 3 epochs x the split, each shard hashed on every read.
    assert split_bytes <= proxy.bytes_to_client <= split_bytes + small + HEADERS_SLACK
    assert {f"{s.sha256}.tar" for s in packed.manifest.splits["train"].shards} <= set(os.listdir(tmp_path))


def test_eviction_keeps_the_cache_under_its_cap_least_recently_used_first(packed, remote, tmp_path):
    a, b, c = packed.manifest.splits["train"].shards[:3]
    cache = ShardCache(str(tmp_path), cap_bytes=a.bytes + b.bytes + c.bytes - 1)  # room for two of them
    read = lambda shard: read_shard(remote, shard, cache)  # noqa: E731
    read(a)
    held = read(b)
    read(a)  # a hit: a is now more recent than b
    read(c)
    cached = {name for name in os.listdir(tmp_path) if name.endswith(".tar")}
    assert cached == {f"{a.sha256}.tar", f"{c.sha256}.tar"}
    assert sum(os.path.getsize(tmp_path / name) for name in cached) <= cache.cap_bytes
    # b's file is gone from the folder, not from this process: Linux keeps an unlinked file's
    # bytes while it is mapped.
    assert hashlib.sha256(held).hexdigest() == b.sha256


def test_a_corrupted_cached_shard_is_caught_and_fetched_again(packed, remote, proxy, tmp_path, monkeypatch, caplog):
    shard = packed.manifest.splits["val"].shards[0]
    cache = cache_in(tmp_path)
    read_shard(remote, shard, cache)
    fetched_once = proxy.bytes_to_client
    with open(cache.path(shard), "r+b") as f:  # a disk error, a hand edit
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    monkeypatch.setattr(cache_module, "_VERIFIED", {})  # as a new process finds it: checked once there
    with caplog.at_level(logging.WARNING, logger="deeprecognition.shards.cache"):
        raw = read_shard(remote, shard, cache)
    assert hashlib.sha256(raw).hexdigest() == shard.sha256
    assert (
        f"shard {shard.name}: the cached copy {cache.path(shard)} is bad" in caplog.text
        and "fetching it again" in caplog.text
    )
    assert proxy.bytes_to_client >= fetched_once + shard.bytes  # fetched again ...
    with open(cache.path(shard), "rb") as f:  # ... and the good copy is in place
        assert hashlib.sha256(f.read()).hexdigest() == shard.sha256


def test_a_bad_shard_in_s3_stops_the_read_and_leaves_nothing_in_the_cache(packed, s3, tmp_path):
    uri = f"s3://{BUCKET}/cached-bad"
    upload_folder(packed.dest, uri, s3)
    shard = packed.manifest.splits["test"].shards[0]
    data = bytearray(open(os.path.join(packed.dest, shard.name), "rb").read())
    data[2000] ^= 0xFF
    boto3.client("s3", endpoint_url=s3).put_object(Bucket=BUCKET, Key=f"cached-bad/{shard.name}", Body=bytes(data))
    with pytest.raises(CorruptShardError, match=f"shard {shard.name}: its sha256 does not match the manifest"):
        read_shard(uri, shard, cache_in(tmp_path))
    assert [name for name in os.listdir(tmp_path) if not name.endswith(".lock")] == []


def test_a_two_trial_sweep_on_one_node_reads_the_dataset_from_s3_about_once(head, packed, remote, s3, tmp_path):  # noqa: F811
    # A sweep submitted as a job: its runtime env sends every process of it (the sweep's driver,
    # the 2 trials' drivers, their Train workers) to S3 through the counting proxy.
    counting = FaultProxy.before(s3, cut_every=0)
    cache = tmp_path / "node-cache"
    sweeps = tmp_path / "sweeps"
    sweep = tmp_path / "cnn_layers.yaml"  # the shipped file's depths 1 and 2: two trials share the cache
    with open(os.path.join(REPO, "tune_configs", "cnn_layers.yaml")) as f:
        sweep.write_text(f.read().replace("{grid: [1, 2, 3, 4]}", "{grid: [1, 2]}"))
    args = [
        "tune",
        str(sweep),
        "--data",
        remote,
        "--storage",
        str(sweeps),
        "--smoke",
        "--set",
        f"data.cache={cache}",
    ]
    try:
        submit_and_wait(head, "cached-sweep", args, counting.url)
    finally:
        counting.stop()
    with open(sweeps / "cnn_layers-smoke" / "results.csv") as f:
        assert sorted((row["status"], row["layers"]) for row in csv.DictReader(f)) == [
            ("finished", str(n)) for n in (1, 2)
        ]
    shards = [s for split in packed.manifest.splits.values() for s in split.shards]
    dataset = sum(s.bytes for s in shards)
    # Each of the 2 trials reads the manifest and the label index a few times (driver checks, one
    # per loader); those are the same with or without the cache.
    small = os.path.getsize(os.path.join(packed.dest, MANIFEST)) + packed.manifest.labels.bytes
    assert counting.bytes_to_client <= dataset + 2 * 8 * small + HEADERS_SLACK, (
        counting.bytes_to_client,
        dataset,
        small,
    )
    assert set(os.listdir(cache)) - {".evict.lock"} <= {
        f"{s.sha256}.tar{lock}" for s in shards for lock in ("", ".lock")
    }
