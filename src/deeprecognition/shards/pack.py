"""`deeprec pack SRC DEST`: CelebA (any layout) -> WebDataset shards + manifest.json, in parallel.

Each shard is built by one Ray task and becomes visible only when complete (see storage). A task
also leaves a small record in DEST/_pack/ naming the plan it was built for, so that a rerun after a
crash or kill -9 keeps every shard whose bytes still match its record and rebuilds the rest. Shards
are byte-deterministic, so the resumed dataset equals an uninterrupted one. The manifest comes last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from deeprecognition import storage
from deeprecognition.celeba.attributes import SPLITS
from deeprecognition.celeba.source import CelebASource, find_source, load_annotations, open_images
from deeprecognition.errors import InputError
from deeprecognition.shards.encode import ImageFormat, decode_source, encode_image, resize, sample_members
from deeprecognition.shards.labels import write_labels
from deeprecognition.shards.manifest import (
    MANIFEST,
    SHARD_NAME,
    ImageInfo,
    LabelsInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    read_manifest,
    write_manifest,
)
from deeprecognition.shards.plan import PackOptions, PackPlan, ShardPlan, make_plan
from deeprecognition.shards.tario import tar_bytes

log = logging.getLogger(__name__)

RECORDS = "_pack"


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    undecodable: list[str]
    kept: bool  # True when an earlier run's shard was verified and kept
    retries: int = 0  # storage operations this task retried (each also logged where it ran)


@dataclass(frozen=True)
class PackReport:
    dest: str
    manifest: Manifest
    built: int
    kept: int
    seconds: float
    up_to_date: bool = False
    retries: int = 0  # storage operations retried by the shard tasks (connections reset or cut, throttling)

    @property
    def images_per_s(self) -> float:
        total = sum(s.samples for s in self.manifest.splits.values())
        return total / self.seconds if self.seconds > 0 else 0.0


def build_shard(source: CelebASource, shard: ShardPlan, fmt: ImageFormat, strict: bool) -> tuple[bytes, list[str]]:
    """The tar bytes of one shard, and the source files skipped because they do not decode."""
    members: list[tuple[str, bytes]] = []
    undecodable: list[str] = []
    # Read in whatever order the source serves best (a zip: by offset), packed in plan order. Read
    # failures stay out of the try below: an image that cannot be fetched is not an undecodable one.
    with open_images(source) as images:
        raw = images.read_many(shard.files)
    for i, file in enumerate(shard.files):
        try:
            img = decode_source(raw[file])
        except (OSError, SyntaxError, ValueError) as err:
            if strict:
                raise InputError(
                    storage.join(source.images, file),
                    f"does not decode as an image ({err}); without --strict it would be skipped and counted",
                ) from None
            log.warning("skipping %s: does not decode (%s)", file, err)
            undecodable.append(file)
            continue
        image = encode_image(resize(img, fmt), fmt)
        members += sample_members(file.rsplit(".", 1)[0], image, fmt, shard.attrs[i], shard.meta(i))
    return tar_bytes(members), undecodable


def _record_uri(dest: str, name: str) -> str:
    return storage.join(dest, RECORDS, name + ".json")


def _kept_shard(dest: str, shard: ShardPlan, plan_id: str) -> ShardResult | None:
    """The earlier run's result for this shard if its record and bytes still match, else None."""
    try:
        record = json.loads(storage.read_bytes(_record_uri(dest, shard.name)))
        data = storage.read_bytes(storage.join(dest, shard.name))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    info = ShardInfo(**record["info"])
    if record.get("plan") != plan_id or len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
        return None
    return ShardResult(info=info, undecodable=record["undecodable"], kept=True)


def ensure_shard(source: CelebASource, dest: str, shard: ShardPlan, options: PackOptions, plan_id: str) -> ShardResult:
    """Keep a verified shard from an earlier run, or build and write it (the shard, then its record)."""
    retries_before = storage.retry_count()  # a Ray worker runs one task at a time
    result = _ensure_shard(source, dest, shard, options, plan_id)
    return dataclasses.replace(result, retries=storage.retry_count() - retries_before)


def _ensure_shard(source: CelebASource, dest: str, shard: ShardPlan, options: PackOptions, plan_id: str) -> ShardResult:
    kept = _kept_shard(dest, shard, plan_id)
    if kept is not None:
        return kept
    data, undecodable = build_shard(source, shard, options.image, options.strict)
    skipped = set(undecodable)
    decoded = [i for i, f in enumerate(shard.files) if f not in skipped]
    info = ShardInfo(
        name=shard.name,
        samples=len(decoded),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        attribute_counts=shard.attrs[decoded].sum(axis=0, dtype=np.int64).tolist(),
    )
    storage.write_bytes_atomic(storage.join(dest, shard.name), data)
    record = {"plan": plan_id, "info": asdict(info), "undecodable": undecodable}
    storage.write_bytes_atomic(_record_uri(dest, shard.name), json.dumps(record).encode())
    return ShardResult(info=info, undecodable=undecodable, kept=False)


def _remove_records(dest: str) -> None:
    for name in storage.list_names(storage.join(dest, RECORDS)):
        storage.remove(storage.join(dest, RECORDS, name))
    storage.remove_empty_folder(storage.join(dest, RECORDS))


def _remove_leftovers(dest: str, plan: PackPlan) -> None:
    """Temp files of killed writers and shards of an older, different plan (never listed anywhere)."""
    planned = {s.name for s in plan.shards}
    for folder in (dest, storage.join(dest, RECORDS)):
        for name in storage.list_names(folder):
            stale_shard = SHARD_NAME.match(name.removesuffix(".json")) and name.removesuffix(".json") not in planned
            if storage.is_temp_name(name) or stale_shard:
                storage.remove(storage.join(folder, name))


def _run_tasks(
    source: CelebASource, dest: str, plan: PackPlan, options: PackOptions, progress: bool
) -> list[ShardResult]:
    import ray
    from tqdm import tqdm

    from deeprecognition.raycluster import cluster_cpus, ensure_ray, worker_runtime_env

    ensure_ray()
    limit = options.num_workers or cluster_cpus()
    # The endpoint travels with each task: the cluster may have started before --endpoint-url was given.
    task = ray.remote(num_cpus=1, max_retries=3)(ensure_shard).options(runtime_env=worker_runtime_env())
    todo = list(plan.shards)
    pending: dict = {}
    results: list[ShardResult] = []
    bar = tqdm(total=plan.total, unit="img", disable=not progress, desc="pack", smoothing=0.1)
    while todo or pending:
        while todo and len(pending) < limit:
            shard = todo.pop(0)
            pending[task.remote(source, dest, shard, options, plan.plan_id)] = shard
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                # The user's error (e.g. --strict on a bad JPEG), not Ray's wrapper and traceback.
                raise err.cause from None
            bar.update(results[-1].info.samples + len(results[-1].undecodable))
    bar.close()
    return results


def _label_rows(plan: PackPlan, undecodable: set[str]) -> np.ndarray:
    """Every packed sample's attributes in manifest order: the plan's, less the images that did not
    decode (plan.shards is in split order, each shard's files in tar order)."""
    rows = [shard.attrs[[f not in undecodable for f in shard.files]] for shard in plan.shards]
    return np.concatenate(rows) if rows else np.zeros((0, 40), np.uint8)


def _manifest(
    source: CelebASource, plan: PackPlan, options: PackOptions, results: list[ShardResult], labels: LabelsInfo
) -> Manifest:
    by_name = {r.info.name: r for r in results}
    splits = {}
    for split in SPLITS:
        infos = [by_name[s.name].info for s in plan.shards if s.split == split]
        splits[split] = SplitInfo(samples=sum(i.samples for i in infos), shards=infos)
    undecodable = sorted(f for r in results for f in r.undecodable)
    fmt = options.image
    return Manifest(
        image=ImageInfo(
            size=fmt.size,
            resize=fmt.resize,
            encoding=fmt.encoding,
            quality=fmt.quality if fmt.encoding == "jpg" else None,
        ),
        split_policy=plan.split_policy,
        splits=splits,
        skipped={
            "undecodable": len(undecodable),
            "undecodable_files": undecodable,
            "missing": len(plan.missing),
            "missing_files_first": plan.missing[:20],
        },
        source={
            "layout": source.layout,
            "root": source.root,
            "fingerprint": plan.source_fingerprint,
            "images_listed": plan.listed,
            "plan": plan.plan_id,
        },
        labels=labels,
    )


def pack(src: str, dest: str, options: PackOptions | None = None, progress: bool = False) -> PackReport:
    options = options or PackOptions()
    start, retries_before = time.perf_counter(), storage.retry_count()
    source = find_source(src)
    annotations = load_annotations(source)
    with open_images(source) as images:
        present = images.names()
    plan = make_plan(source, annotations, present, options)
    if storage.exists(storage.join(dest, MANIFEST)):
        existing = read_manifest(dest)
        if existing.source.get("plan") != plan.plan_id:
            raise InputError(
                storage.join(dest, MANIFEST),
                "DEST already holds a dataset packed from another source or with other options: pack into a new DEST, "
                "or delete this one first",
            )
        _remove_records(dest)  # left behind if an earlier run died right after its manifest
        if existing.labels is None:  # packed before the label index: add it, the shards stay
            labels = write_labels(dest, _label_rows(plan, set(existing.skipped["undecodable_files"])))
            write_manifest(dest, existing := dataclasses.replace(existing, labels=labels))
        return PackReport(
            dest=dest,
            manifest=existing,
            built=0,
            kept=len(plan.shards),
            seconds=time.perf_counter() - start,
            up_to_date=True,
        )
    _remove_leftovers(dest, plan)
    results = _run_tasks(source, dest, plan, options, progress)
    labels = write_labels(dest, _label_rows(plan, {f for r in results for f in r.undecodable}))
    manifest = _manifest(source, plan, options, results, labels)
    write_manifest(dest, manifest)
    _remove_records(dest)
    kept = sum(r.kept for r in results)
    retries = sum(r.retries for r in results) + storage.retry_count() - retries_before
    return PackReport(
        dest=dest,
        manifest=manifest,
        built=len(results) - kept,
        kept=kept,
        seconds=time.perf_counter() - start,
        retries=retries,
    )
