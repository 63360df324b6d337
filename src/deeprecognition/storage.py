"""Storage URIs as plain strings: local paths, file:// and s3://bucket/key.

One small module so that every reader and writer in the project agrees on three things:
- S3 is reached through fsspec/s3fs with credentials from the standard AWS chain only and the
  endpoint from AWS_ENDPOINT_URL (AWS_ENDPOINT_URL_S3 first), so any S3-compatible store works;
- transient failures (connection reset, a response cut mid-stream, throttling) are retried with
  exponential backoff, and every retry is counted and logged, never swallowed;
- a write becomes visible only when complete: a temp file renamed into place locally, a single PUT
  or a completed multipart upload on S3.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Per-process tally of retried operations ({"read_bytes": 2, ...}); tests and benchmarks read it.
RETRIES: Counter[str] = Counter()

MAX_ATTEMPTS = 6
BACKOFF_S = 0.2


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(local_path(uri), *parts)


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def set_endpoint_url(url: str | None) -> None:
    """Make --endpoint-url visible to this process and to every Ray worker it starts."""
    if url:
        os.environ["AWS_ENDPOINT_URL"] = url


def filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    if not is_remote(uri):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), os.path.abspath(local_path(uri))
    scheme, _, path = uri.partition("://")
    if scheme not in ("s3", "s3a"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    import s3fs

    client_kwargs = {"endpoint_url": endpoint_url()} if endpoint_url() else {}
    # s3fs caches instances per arguments and per process, so this is cheap after the first call.
    # botocore's "standard" mode retries throttling and 5xx with backoff; our `retrying` adds the
    # failures it does not cover (connections reset or cut mid-body) and counts them.
    config_kwargs = {"retries": {"max_attempts": 5, "mode": "standard"}}
    # No listing cache: other processes write the same bucket (Ray's uploads, other ranks, other
    # users), and s3fs would answer "not found" for an object created after it listed the folder.
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs, use_listings_cache=False)
    # s3fs would silently retry a body cut mid-stream itself; one attempt there lets `retrying`
    # see the failure, back off, count it and log it.
    fs.retries = 1
    _count_botocore_retries(fs.s3)
    return fs, path


def _count_botocore_retries(client: Any) -> None:
    """Count and log the retries botocore makes on its own (throttling, 5xx, a connection dropped
    before the response), which it logs at debug level only: every retry shows in RETRIES."""
    if getattr(client, "_deeprec_counts_retries", False):
        return

    def on_response(
        event_name: str,
        context: dict,
        exception: BaseException | None = None,
        response_dict: dict | None = None,
        **_: Any,
    ) -> None:
        attempt = (context.get("retries") or {}).get("attempt", 1)
        if attempt > 1:
            what = f"s3 {event_name.rsplit('.', 1)[-1]}"
            RETRIES[what] += 1
            log.warning(
                "storage: %s retried by botocore (attempt %d) after %s",
                what,
                attempt,
                context.get("deeprec_last_failure", "a failure"),
            )
        if exception is not None or (response_dict or {}).get("status_code", 200) >= 400:
            context["deeprec_last_failure"] = (
                f"{type(exception).__name__}: {exception}"
                if exception is not None
                else f"HTTP {response_dict['status_code']}"
            )

    client.meta.events.register("response-received.s3", on_response)
    client._deeprec_counts_retries = True


def retry_count() -> int:
    """Storage retries so far in this process, ours and botocore's; a report counts the difference."""
    return sum(RETRIES.values())


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return True
    name = type(err).__name__
    return any(
        marker in name
        for marker in ("Connection", "Timeout", "Payload", "IncompleteRead", "ResponseStreaming", "Throttl", "SlowDown")
    )


def retrying(what: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient storage errors with exponential backoff; count and log retries."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when not transient
            if attempt == MAX_ATTEMPTS or not _is_transient(err):
                raise
            RETRIES[what] += 1
            # Jittered: readers that fail together (pack tasks behind one cutting proxy or NAT) must not
            # retry in lockstep, or the same one lands on the same bad slot every round.
            delay = BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("storage: %s failed (%s: %s); retry %d in %.1fs", what, type(err).__name__, err, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return retrying(f"read {uri}", lambda: fs.cat_file(path))


def read_required(uri: str, what_it_is: str) -> bytes:
    """read_bytes, with a missing object reported as an InputError saying what belongs there."""
    from deeprecognition.errors import InputError

    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise InputError(uri, f"not found: {what_it_is}") from None


def read_buffer(uri: str) -> tuple[bytes | mmap.mmap, tuple[int, int, int] | None]:
    """A whole object for reading by offset, and for a local file its (inode, size, mtime_ns).

    Memory-mapped locally (no copy out of the page cache), fetched whole from S3 (one GET, retried
    as a unit; no stamp: every fetch is new bytes off the network)."""
    if is_remote(uri):
        return read_bytes(uri), None
    with open(local_path(uri), "rb") as f:
        st = os.fstat(f.fileno())
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
        return data, (st.st_ino, st.st_size, st.st_mtime_ns)


def read_ranges(uri: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, end) of each range of one object, exactly those: fetched concurrently on S3
    (one ranged GET each). Retried as a unit, but a retry fetches only the ranges that failed, and
    retries go on for as long as they make progress."""
    fs, path = filesystem(uri)
    got: dict[int, bytes] = {}

    def fetch_the_rest() -> None:
        todo = [i for i in range(len(ranges)) if i not in got]
        results = fs.cat_ranges(
            [path] * len(todo), [ranges[i][0] for i in todo], [ranges[i][1] for i in todo], on_error="return"
        )
        failures = []
        for i, result in zip(todo, results):
            if isinstance(result, BaseException):
                failures.append(result)
            else:
                got[i] = _exact_range(uri, ranges[i], result)
        if failures:  # a permanent failure first: retrying cannot help it
            raise next((err for err in failures if not _is_transient(err)), failures[0])

    # Many ranges at once: on a store that cuts some connections, an attempt often fails somewhere
    # while it fetches most of what is left: the read gives up only when a whole round of retries
    # fetches nothing.
    while len(got) < len(ranges):
        before = len(got)
        try:
            retrying(f"read ranges of {uri}", fetch_the_rest)
        except Exception as err:  # noqa: BLE001 - re-raised unless the attempts made progress
            if not _is_transient(err) or len(got) == before:
                raise
    return [got[i] for i in range(len(ranges))]


def _exact_range(uri: str, span: tuple[int, int], data: bytes) -> bytes:
    start, end = span
    if len(data) != end - start:
        raise ValueError(
            f"{uri}: asked for bytes {start}-{end}, got {len(data)}: the object is shorter than its reader expects "
            "(changed while read?)"
        )
    return data


def open_read(uri: str) -> IO[bytes]:
    """A seekable binary file (random access over S3, e.g. for a zip read in place)."""
    fs, path = filesystem(uri)
    return retrying(f"open {uri}", lambda: fs.open(path, "rb"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying(f"exists {uri}", lambda: fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying(f"isdir {uri}", lambda: fs.isdir(path))


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(retrying(f"size {uri}", lambda: fs.size(path)))


def _entries(uri: str) -> list[tuple[str, str, int]]:
    """(name, "file" or "directory", size) of what is directly inside a folder; [] when absent."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        if not os.path.isdir(path):
            return []
        return [
            (e.name, "file", e.stat().st_size) if e.is_file() else (e.name, "directory", 0) for e in os.scandir(path)
        ]

    def ls() -> list[tuple[str, str, int]]:
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [
            (e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"], int(e.get("size") or 0))
            for e in entries
            if not (e["type"] == "file" and e["name"].endswith("/") and not e.get("size"))  # a folder marker (see walk)
        ]

    return retrying(f"list {uri}", ls)


def list_names(uri: str) -> list[str]:
    """Names (not paths) of the files directly inside a folder, sorted; [] when it does not exist."""
    return sorted(name for name, kind, _ in _entries(uri) if kind == "file")


def list_sizes(uri: str) -> dict[str, int]:
    """{name: size} of the files directly inside a folder."""
    return {name: size for name, kind, size in _entries(uri) if kind == "file"}


def list_folders(uri: str) -> list[str]:
    """Names of the folders (S3: common prefixes) directly inside a folder, sorted."""
    return sorted(name for name, kind, _ in _entries(uri) if kind == "directory")


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None  # S3's ETag without its quotes; None for local files


def walk(uri: str) -> dict[str, ObjectInfo]:
    """Every file under a folder, recursively, keyed by its path relative to the folder with "/"
    separators, exactly as stored (an S3 key may hold "..": callers that write it must check).
    One paginated listing on S3; {} when the folder does not exist."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        found = {}
        for folder, _, names in os.walk(path):
            for name in names:
                full = os.path.join(folder, name)
                found[os.path.relpath(full, path).replace(os.sep, "/")] = ObjectInfo(os.path.getsize(full), None)
        return found

    def find() -> dict[str, ObjectInfo]:
        fs.invalidate_cache(path)
        prefix = path.rstrip("/") + "/"
        return {
            key[len(prefix) :]: ObjectInfo(int(e["size"]), (e.get("ETag") or "").strip('"') or None)
            for key, e in fs.find(path, detail=True).items()
            # Empty keys ending in "/" are folder markers (pyarrow writes one per folder), not files.
            if key.startswith(prefix) and e.get("type") == "file" and not (key.endswith("/") and not e["size"])
        }

    return retrying(f"walk {uri}", find)


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(local_path(uri), exist_ok=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write data so that the object is either absent, the previous version, or complete."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        # s3fs sends one PUT below its block size, else a multipart upload completed at the end:
        # either way S3 shows nothing under the key until the whole object is there.
        retrying(f"write {uri}", lambda: fs.pipe_file(path, data))
        return
    path = os.path.abspath(local_path(uri))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if retrying(f"exists {uri}", lambda: fs.exists(path)):
        retrying(f"remove {uri}", lambda: fs.rm_file(path))


def remove_empty_folder(uri: str) -> None:
    """Local folders outlive their files; S3 has no folders, so there is nothing to do there."""
    path = local_path(uri)
    if not is_remote(uri) and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


def is_temp_name(name: str) -> bool:
    """Names write_bytes_atomic uses for files still being written (left behind by a kill -9)."""
    return name.startswith(".") and name.endswith(".tmp")
