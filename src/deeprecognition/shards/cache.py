"""The node-local shard cache: a remote dataset's shards are fetched from S3 once per node, then read
from local disk by every trial, rank, DataLoader worker and epoch on that node.

- Files are named by the shard's sha256 (`<sha256>.tar`): the name is the identity of the bytes, so
  a repacked dataset can never be served a stale file, an unchanged shard survives a rewritten
  manifest, and one pool with one cap serves every dataset a node trains on.
- A hit is the cached file, memory-mapped (one copy in the page cache for all the node's
  processes) and checked against the manifest once per process, as local shards are.
- A miss takes the shard's lock (`flock` on `<sha256>.lock`, a file never removed, so at most one
  process of the node downloads a shard; the others wait and then hit), downloads the shard,
  checks its size and sha256, writes it under a temp name and renames it into place: a reader sees
  the whole file or none.
- A cached file that fails its check (a disk error, a hand edit) is removed and fetched again, with
  a warning naming the shard; bytes from S3 that fail it stop the run, as without a cache.
- After a download, whole shards are evicted least recently used first (recency: the file's
  atime, set on every hit) until the cache is within `limit`. Linux keeps an unlinked file's bytes
  while any process has it open or mapped, so evicting a shard that another process is reading
  never changes what that process reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from deeprecognition import storage
from deeprecognition.errors import CorruptShardError
from deeprecognition.shards.manifest import ShardInfo

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPREC_CACHE_DIR"
CACHE_SETTINGS = ("auto", "off", "")  # or an absolute folder
# Full CelebA is 2.0 GB at 128 px JPEG and ~10 GB as raw npy: 50 GB holds it at any encoding, a
# few times over, and `limit` keeps a node's small root volume from filling up.
DEFAULT_CAP_GB = 50.0

Stamp = tuple[int, int, int]  # a local file's (inode, size, mtime_ns)

# Shard files this process has already checked, with the stamp it checked: training rereads every
# shard many times, and hashing is ~5% of a core's loader time.
_VERIFIED: dict[str, tuple[Stamp, str]] = {}


def check_shard(where: str, raw: bytes | mmap.mmap, shard: ShardInfo, stamp: Stamp | None) -> None:
    """Refuse bytes that are not the shard's (CorruptShardError naming it). A local file at `where`
    whose stamp is unchanged since this process checked it is not hashed again."""
    if stamp is not None and _VERIFIED.get(where) == (stamp, shard.sha256):
        return
    if len(raw) != shard.bytes:
        raise CorruptShardError(
            shard.name, f"{len(raw)} bytes, the manifest says {shard.bytes} (truncated or replaced)"
        )
    if hashlib.sha256(raw).hexdigest() != shard.sha256:
        raise CorruptShardError(shard.name, "its sha256 does not match the manifest (bytes changed since packing)")
    if stamp is not None:
        _VERIFIED[where] = (stamp, shard.sha256)


def default_folder() -> str:
    """DEEPREC_CACHE_DIR, else the user's cache folder: on disk (unlike a tmpfs /tmp) and, on the
    cluster, shared by every Ray process of a node (they all run as the image's one user)."""
    home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.environ.get(CACHE_ENV) or os.path.join(home_cache, "deeprecognition", "shards")


@dataclass(frozen=True)
class ShardCache:
    folder: str
    cap_bytes: int

    @classmethod
    def of(cls, setting: str, cap_gb: float) -> ShardCache | None:
        """`data.cache` as set: "auto" (default_folder()), "off" or "" (None), or a folder. Called
        where the loader runs, so "auto" is that node's folder, not the driver's."""
        if setting in ("off", ""):
            return None
        folder = default_folder() if setting == "auto" else setting
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"data.cache: cannot create the shard cache {folder} ({err.strerror}): set data.cache to a writable "
                "folder, or off"
            ) from None
        return cls(folder, int(cap_gb * 1e9))

    def path(self, shard: ShardInfo) -> str:
        return os.path.join(self.folder, f"{shard.sha256}.tar")

    def read(self, uri: str, shard: ShardInfo) -> mmap.mmap:
        """The shard's checked bytes, fetched from `uri` into the cache on a miss."""
        path = self.path(shard)
        hit = self._hit(path, shard, uri, under_lock=False)
        if hit is not None:
            return hit
        with _locked(path + ".lock"):
            hit = self._hit(path, shard, uri, under_lock=True)  # fetched by another process meanwhile?
            if hit is not None:
                return hit
            fetched = self._fetch(uri, shard, path)
        self._evict(keep=path)
        return fetched

    def _hit(self, path: str, shard: ShardInfo, uri: str, under_lock: bool) -> mmap.mmap | None:
        """The cached file, checked, or None. A bad one is removed only under the shard's lock: only
        lock holders rename files into place, so what is removed is the bad file, never a new one."""
        try:
            raw, stamp = storage.read_buffer(path)
        except FileNotFoundError:
            return None
        try:
            check_shard(path, raw, shard, stamp)
        except CorruptShardError as err:
            if under_lock:
                log.warning(
                    "shard %s: the cached copy %s is bad (%s): fetching it again from %s",
                    shard.name,
                    path,
                    err.problem,
                    uri,
                )
                _remove(path)
            return None
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: the mapping stays valid
            os.utime(path, ns=(time.time_ns(), stamp[2]))  # recency for eviction; mtime (in the stamp) kept
        return raw

    def _fetch(self, uri: str, shard: ShardInfo, path: str) -> mmap.mmap:
        """Download, check, write under a temp name, rename into place; the caller holds the lock."""
        for stale in glob.glob(
            os.path.join(self.folder, f".{shard.sha256}.*.tmp")
        ):  # a killed download's: nobody else writes them
            _remove(stale)
        raw = storage.read_bytes(uri)
        check_shard(uri, raw, shard, None)
        fd, tmp = tempfile.mkstemp(prefix=f".{shard.sha256}.", suffix=".tmp", dir=self.folder)
        try:
            # No fsync: a file that a crash leaves short fails its once-per-process check and is
            # fetched again.
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                st = os.fstat(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        _VERIFIED[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), shard.sha256)
        return mapped

    def limit(self, used: int) -> int:
        """Bytes the cache may hold: its cap, and never more than half the disk space that other
        files leave (`used`: what the cache holds now), so it cannot fill a node's disk."""
        return min(self.cap_bytes, (used + shutil.disk_usage(self.folder).free) // 2)

    def _evict(self, keep: str) -> None:
        """Remove least recently used shards until the cache is within its limit. `keep`, the shard
        just fetched, stays even when it alone is over: it is about to be read."""
        with _locked(os.path.join(self.folder, ".evict.lock")):
            files = sorted(_cached_files(self.folder), key=lambda f: f[2])  # oldest first
            used = sum(size for _, size, _ in files)
            limit = self.limit(used)
            for path, size, _ in files:
                if used <= limit:
                    break
                if path != keep:
                    _remove(path)
                    used -= size


def _cached_files(folder: str) -> Iterator[tuple[str, int, int]]:
    """(path, size, atime_ns) of each cached shard; temp and lock files are not shards."""
    for entry in os.scandir(folder):
        if entry.name.endswith(".tar") and not entry.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile
                st = entry.stat()
                yield entry.path, st.st_size, st.st_atime_ns


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on `path` for the block; the kernel releases it if the process dies."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
