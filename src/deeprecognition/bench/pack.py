"""`deeprec bench pack`: pack throughput per core, one shard built in this process."""

from __future__ import annotations

import time

from deeprecognition.celeba.source import find_source, load_annotations, open_images
from deeprecognition.shards.pack import PackOptions, build_shard
from deeprecognition.shards.plan import make_plan


def bench_pack(src: str, limit: int, options: PackOptions | None = None) -> dict:
    """Build one shard of `limit` images in this process: pack throughput per core."""
    options = options or PackOptions(samples_per_shard=limit, allow_missing=True)
    source = find_source(src)
    ann = load_annotations(source)
    with open_images(source) as images:
        present = images.names()
    shard = max(make_plan(source, ann, present, options).shards, key=lambda s: len(s.files))
    start = time.perf_counter()
    data, skipped = build_shard(source, shard, options.image, options.strict)
    seconds = time.perf_counter() - start
    samples = len(shard.files) - len(skipped)
    return {
        "images_per_s": round(samples / seconds, 1),
        "samples": samples,
        "bytes_per_image": round(len(data) / max(samples, 1)),
        "encoding": options.image.encoding,
        "size": options.image.size,
    }
