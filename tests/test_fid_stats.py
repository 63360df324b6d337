"""The real set's FID statistics and their cache beside the dataset: the moments are the features'
own, the cache is read instead of computed, its key names the set, every rank agrees on a hit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from deeprecognition import storage
from deeprecognition.gan import fid_stats
from deeprecognition.gan.fid_stats import Reference, cached, frechet_distance, moments, stats_uri

from .collectives import assert_same_collectives, run_ranks
from .conftest import COLLECTIVE_TIMEOUT_S


def test_a_reference_holds_the_features_moments_and_a_seeded_subset_for_kid(monkeypatch):
    features = torch.randn(50, 8) * 3 + 1
    reference = Reference.of(features)
    assert torch.allclose(reference.mean, torch.from_numpy(features.double().numpy().mean(0)))
    assert torch.allclose(reference.cov, torch.from_numpy(np.cov(features.double().numpy(), rowvar=False)))
    assert reference.count == 50 and torch.equal(reference.kid_features, features)  # small sets: all of them
    assert frechet_distance(reference.moments, moments(features)) == pytest.approx(0, abs=1e-9)
    monkeypatch.setattr(fid_stats, "KID_KEEP", 20)
    kept = Reference.of(features).kid_features
    rows = [int((features == row).all(1).nonzero()) for row in kept]
    assert len(set(rows)) == 20 and rows == sorted(rows)  # distinct rows of the set, in its order
    assert torch.equal(Reference.of(features).kid_features, kept)  # the same ones every time


@pytest.fixture
def dataset(tmp_path) -> str:
    (tmp_path / "manifest.json").write_text('{"plan_id": "a"}')
    return str(tmp_path)


def test_statistics_are_computed_once_then_read_and_their_key_names_the_set(dataset):
    key = {"split": "train", "samples": 40, "features": "inception:standard"}
    uri = stats_uri(dataset, "reference-40", key)
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.randn(40, 16, generator=torch.Generator().manual_seed(len(calls)))

    first = cached(uri, key, compute, torch.device("cpu"))
    again = cached(uri, key, compute, torch.device("cpu"))
    assert len(calls) == 1 and again.count == 40
    assert torch.equal(first.cov, again.cov) and torch.equal(first.kid_features, again.kid_features)
    assert uri.startswith(storage.join(dataset, "fid_stats", "reference-40-"))
    assert stats_uri(dataset, "reference-40", {**key, "samples": 41}) != uri
    assert stats_uri(dataset, "reference-40", {**key, "features": "classifier:/runs/judge"}) != uri
    with open(storage.join(dataset, "manifest.json"), "w") as f:  # the dataset packed anew in its place
        f.write('{"plan_id": "b"}')
    assert stats_uri(dataset, "reference-40", key) != uri


def test_a_dataset_that_cannot_be_written_to_costs_a_warning_not_the_run(dataset, monkeypatch, caplog):
    def refused(uri: str, data: bytes) -> None:
        raise PermissionError(f"{uri}: read-only bucket")

    monkeypatch.setattr(storage, "write_bytes_atomic", refused)
    uri = stats_uri(dataset, "reference-4", {})
    with caplog.at_level(logging.WARNING):
        reference = cached(uri, {}, lambda: torch.randn(4, 3), torch.device("cpu"))
    assert reference.count == 4 and not storage.exists(uri)
    assert "not cached" in caplog.text and "read-only bucket" in caplog.text


def _rank_with_a_late_file(rank: int, world_size: int, uri: str) -> list[float]:
    """Rank 1 looks before the file appears (another trial saving it), rank 0 after."""
    if rank == 1:
        storage.exists = lambda _: False
    computed = cached(uri, {}, lambda: torch.arange(12.0).reshape(6, 2) * (rank + 1), torch.device("cpu"))
    return computed.mean.tolist()


def test_ranks_that_see_the_file_differently_all_compute_instead_of_parting_ways(dataset):
    uri = stats_uri(dataset, "reference-6", {})
    cached(uri, {}, lambda: torch.zeros(6, 2), torch.device("cpu"))  # the file is there for rank 0
    results = run_ranks(_rank_with_a_late_file, 2, args=(uri,), timeout_s=COLLECTIVE_TIMEOUT_S)
    assert_same_collectives([r.record for r in results])
    # Both computed, each its own features here (a real compute gathers the same ones on every rank).
    assert [r.value for r in results] == [[5.0, 6.0], [10.0, 12.0]]
