"""Storage: atomic writes, retries counted, URIs, and tar members that try to escape."""

from __future__ import annotations

import os

import pytest

from deeprecognition import storage
from deeprecognition.errors import CorruptShardError
from deeprecognition.shards.tario import iter_members, iter_samples, tar_bytes

from .conftest import BUCKET


def test_transient_errors_are_retried_counted_and_permanent_ones_raised(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    before = storage.RETRIES["unit"]
    assert storage.retrying("unit", flaky) == "ok"
    assert storage.RETRIES["unit"] - before == 2
    with pytest.raises(FileNotFoundError):
        storage.retrying("unit", lambda: (_ for _ in ()).throw(FileNotFoundError("gone")))
    assert storage.RETRIES["unit"] - before == 2


def test_a_failed_local_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = str(tmp_path / "a.bin")
    storage.write_bytes_atomic(target, b"old")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt  # stands in for an interruption after the bytes, before the rename

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes_atomic(target, b"new")
    assert open(target, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_s3_round_trip_and_listing(s3):
    root = f"s3://{BUCKET}/storage"
    storage.write_bytes_atomic(storage.join(root, "x.bin"), b"12345")
    assert storage.read_bytes(storage.join(root, "x.bin")) == b"12345"
    assert storage.list_sizes(root) == {"x.bin": 5}
    assert storage.exists(storage.join(root, "x.bin"))
    storage.remove(storage.join(root, "x.bin"))
    assert storage.list_names(root) == []


def test_join_keeps_s3_uris_intact():
    assert storage.join("s3://b/p/", "q", "r.tar") == "s3://b/p/q/r.tar"
    assert storage.join("file:///tmp/x", "y") == "/tmp/x/y"


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/passwd", "a/../../b.jpg"])
def test_tar_members_escaping_the_archive_are_refused(name):
    data = tar_bytes([("000001.jpg", b"x"), (name, b"y")])
    with pytest.raises(CorruptShardError, match="escapes the archive"):
        list(iter_members(data, "train-000000.tar"))


def test_tar_samples_group_consecutive_members_by_key():
    data = tar_bytes([("000001.jpg", b"a"), ("000001.attr.npy", b"b"), ("000002.jpg", b"c")])
    assert [(k, {e: bytes(v) for e, v in f.items()}) for k, f in iter_samples(data, "s")] == [
        ("000001", {"jpg": b"a", "attr.npy": b"b"}),
        ("000002", {"jpg": b"c"}),
    ]
    with pytest.raises(CorruptShardError, match="truncated"):
        list(iter_members(data[:700], "s"))
