"""`deeprec checkpoints pull URI DEST`: a run, one checkpoint or the best one, from S3 (or another
local folder) into DEST, in parallel, verified, and whole or not at all.

- Files land in DEST/.NAME.partial, which is renamed to DEST/NAME only once every file is there
  and verified: an interrupted pull never leaves a folder that looks complete, and the next pull
  keeps the files already verified and fetches the rest.
- Every file's size is checked. Its content is checked against the sha256 in its checkpoint's
  checksums.json (written by the trainer before Ray uploads the folder), else against S3's ETag
  where that is an MD5: a single PUT (storage.write_bytes_atomic's run files) or a one-part
  multipart upload. Larger multipart ETags hash parts of a size S3 does not record: size only.
- Object keys become paths under DEST: a key that is absolute or climbs out with ".." is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from deeprecognition import storage
from deeprecognition.errors import InputError
from deeprecognition.runs import catalog
from deeprecognition.runs.checkpoint import CHECKSUMS, file_digest

CHUNK = 8 << 20
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-1)?$")


@dataclass(frozen=True)
class RemoteFile:
    rel: str  # path under what is pulled, "/"-separated, checked by safe_parts
    size: int
    sha256: str | None = None
    etag: str | None = None  # only an ETag that is an MD5 of the bytes (see the module doc)

    @property
    def check(self) -> str:
        return "sha256" if self.sha256 else "md5" if self.etag else "size"

    def matches(self, path: str) -> bool:
        """Whether a local file holds exactly these bytes, as far as size and digests tell."""
        if not os.path.isfile(path) or os.path.getsize(path) != self.size:
            return False
        if self.sha256:
            return file_digest(path) == self.sha256
        if self.etag:
            md5 = file_digest(path, "md5")
            # A one-part multipart upload's ETag is the MD5 of that part's MD5, then "-1".
            return self.etag in (md5, hashlib.md5(bytes.fromhex(md5)).hexdigest() + "-1")
        return True


@dataclass(frozen=True)
class PullReport:
    source: str
    dest: str  # the complete local folder
    files: int
    bytes: int
    fetched: int  # files downloaded by this pull
    kept: int  # files an interrupted pull had already verified
    checks: dict[str, int] = field(default_factory=dict)  # files verified by sha256 / md5 / size alone
    up_to_date: bool = False  # DEST already held all of it: nothing fetched
    seconds: float = 0.0
    retries: int = 0  # storage operations retried (connections reset or cut, throttling), each also logged


def safe_parts(source: str, rel: str) -> list[str]:
    """The path components of an object key, refusing one that would land outside DEST."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise InputError(
            f"{source.rstrip('/')}/{rel}",
            "object key is absolute or climbs out with '..': refusing to write it under DEST",
        )
    return parts


def plan(source: str) -> list[RemoteFile]:
    """Every file under `source`, with what each one's content is checked against."""
    objects = storage.walk(source)
    if not objects:
        raise InputError(source, "nothing to pull: no files under it")
    for rel in objects:
        safe_parts(source, rel)
    partial = catalog.incomplete_checkpoints(source, objects)
    if partial:
        folder, why = min(partial.items())
        raise InputError(
            _uri(source, folder),
            f"an incomplete checkpoint ({why}): not pulling it; pull whole ones with --best or --checkpoint NAME, or "
            "wait for the upload to end",
        )
    sums = _checksums(source, [rel for rel in objects if posixpath.basename(rel) == CHECKSUMS])
    return [
        RemoteFile(rel, o.size, sums.get(rel), o.etag if o.etag and _MD5_ETAG.match(o.etag) else None)
        for rel, o in sorted(objects.items())
    ]


def _checksums(source: str, sidecars: list[str]) -> dict[str, str]:
    """{rel: sha256} from every checksums.json under `source`."""
    sums = {}
    for rel in sidecars:
        folder = posixpath.dirname(rel)
        listed = json.loads(storage.read_bytes(storage.join(source, *rel.split("/"))))
        sums.update({posixpath.join(folder, name): entry["sha256"] for name, entry in listed.items()})
    return sums


def resolve(uri: str, best: bool = False, checkpoint: str | None = None) -> str:
    """What to pull: the URI itself, its best checkpoint, or the checkpoint named `checkpoint`."""
    if best and checkpoint:
        raise ValueError("give --best or --checkpoint, not both")
    if best:
        return catalog.best(uri).uri
    if checkpoint:
        return catalog.find(uri, checkpoint).uri
    return uri.rstrip("/")


def pull(
    uri: str, dest: str, *, best: bool = False, checkpoint: str | None = None, workers: int = 8, progress: bool = False
) -> PullReport:
    """Pull a run, a checkpoint, or `best`/`checkpoint` of a run or storage folder, into DEST/NAME."""
    if storage.is_remote(dest):
        raise ValueError(f"DEST must be a local folder, not {dest}")
    start, retries_before = time.monotonic(), storage.retry_count()
    source = resolve(uri, best, checkpoint)
    name = posixpath.basename(source)
    if name in ("", ".", ".."):
        raise InputError(source, "name the folder to pull: its last path component becomes DEST/NAME")
    files = plan(source)
    final = os.path.join(storage.local_path(dest), name)
    partial = os.path.join(storage.local_path(dest), f".{name}.partial")
    report = {
        "source": source,
        "dest": final,
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "checks": dict(Counter(f.check for f in files)),
    }
    if os.path.exists(final):
        if all(f.matches(_local(final, f)) for f in files):
            return PullReport(**report, fetched=0, kept=len(files), up_to_date=True, seconds=time.monotonic() - start)
        raise InputError(final, f"already exists and differs from {source}: remove it, or pull into another DEST")
    os.makedirs(partial, exist_ok=True)
    _remove_strays(partial, {_local(partial, f) for f in files})
    todo = [f for f in files if not f.matches(_local(partial, f))]
    _fetch_all(source, partial, todo, workers, progress)
    os.replace(partial, final)
    return PullReport(
        **report,
        fetched=len(todo),
        kept=len(files) - len(todo),
        seconds=time.monotonic() - start,
        retries=storage.retry_count() - retries_before,
    )


def _uri(source: str, rel: str) -> str:
    return storage.join(source, *rel.split("/")) if rel else source


def _local(root: str, f: RemoteFile) -> str:
    return os.path.join(root, *f.rel.split("/"))


def _remove_strays(partial: str, wanted: set[str]) -> None:
    """Downloads cut short and files the source no longer has: only what is pulled gets renamed."""
    for folder, subfolders, names in os.walk(partial, topdown=False):
        for name in names:
            if os.path.join(folder, name) not in wanted:
                os.remove(os.path.join(folder, name))
        for sub in subfolders:
            if not os.listdir(os.path.join(folder, sub)):
                os.rmdir(os.path.join(folder, sub))


def _fetch_all(source: str, partial: str, todo: list[RemoteFile], workers: int, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(
        total=sum(f.size for f in todo), unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, desc="pull"
    ) as bar:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [
                pool.submit(_fetch, storage.join(source, *f.rel.split("/")), _local(partial, f), f, bar.update)
                for f in todo
            ]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _fetch(uri: str, target: str, f: RemoteFile, advance: Callable[[int], object]) -> None:
    """One file into a temp name beside its target, verified, then renamed into place."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Not mkstemp: its 0600 mode would stay on the pulled file; this one follows the umask.
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{secrets.token_hex(4)}.download")
    try:
        with open(tmp, "xb") as out:
            storage.retrying(f"pull {uri}", lambda: _copy(uri, out, advance))
        if not f.matches(tmp):
            raise InputError(uri, f"the downloaded bytes do not match ({f.check} check of {f.size} bytes): pull again")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _copy(uri: str, out, advance: Callable[[int], object]) -> None:
    """The whole object into `out`, from its start: a retry after a cut rewrites it."""
    out.seek(0)
    out.truncate()
    written = 0
    try:
        with storage.open_read(uri) as src:
            while block := src.read(CHUNK):
                out.write(block)
                written += len(block)
                advance(len(block))
    except BaseException:
        advance(-written)
        raise
