"""Where a CelebA copy keeps its files: the three layouts people download, read in place.

- torchvision: ROOT/list_attr_celeba.txt, list_eval_partition.txt, identity_CelebA.txt (optional)
  and img_align_celeba/ or the official img_align_celeba.zip;
- google-drive (the official release): ROOT/Anno/list_attr_celeba.txt, Anno/identity_CelebA.txt,
  Eval/list_eval_partition.txt and Img/img_align_celeba/ or Img/img_align_celeba.zip;
- kaggle: ROOT/list_attr_celeba.csv, list_eval_partition.csv and img_align_celeba/img_align_celeba/
  (or img_align_celeba/ when the archive was unpacked one level less).

A zip is read where it lies (locally or on S3), never extracted to disk: its central directory once,
then each member's exact byte range, many members at a time in offset order.
"""

from __future__ import annotations

import bisect
import errno
import io
import posixpath
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from deeprecognition import storage
from deeprecognition.celeba.annotations import Annotations, build_annotations, read_attr_file, read_pairs_file
from deeprecognition.errors import InputError


@dataclass(frozen=True)
class CelebASource:
    """The files of one CelebA copy; plain strings, so Ray tasks can receive it and open their own reader."""

    root: str  # as given (local path or s3:// URI)
    layout: str  # "torchvision" | "google-drive" | "kaggle"
    attr_file: str
    partition_file: str
    identity_file: str | None
    images: str  # the image folder, or the .zip holding it

    def fingerprint_files(self) -> list[str]:
        """The annotation files, whose bytes identify this copy's labels."""
        files = [self.attr_file, self.partition_file]
        return files if self.identity_file is None else [*files, self.identity_file]


@dataclass(frozen=True)
class _Layout:
    """Paths relative to the root; for identity and images, the first candidate present wins."""

    name: str
    attr: str
    partition: str
    identity: tuple[str, ...]
    images: tuple[str, ...]  # folders, or .zip files


_LAYOUTS = (
    _Layout(
        "torchvision",
        "list_attr_celeba.txt",
        "list_eval_partition.txt",
        ("identity_CelebA.txt",),
        ("img_align_celeba", "img_align_celeba.zip"),
    ),
    _Layout(
        "google-drive",
        "Anno/list_attr_celeba.txt",
        "Eval/list_eval_partition.txt",
        ("Anno/identity_CelebA.txt",),
        ("Img/img_align_celeba", "Img/img_align_celeba.zip"),
    ),
    _Layout(
        "kaggle",
        "list_attr_celeba.csv",
        "list_eval_partition.csv",
        ("identity_CelebA.csv", "identity_CelebA.txt"),
        ("img_align_celeba/img_align_celeba", "img_align_celeba"),
    ),
)


def _either(images: tuple[str, ...]) -> str:
    return " or ".join(rel if rel.endswith(".zip") else f"{rel}/" for rel in images)


def _is_images(uri: str) -> bool:
    if uri.endswith(".zip"):
        return storage.exists(uri) and not storage.isdir(uri)
    return storage.isdir(uri)


def _match(root: str, layout: _Layout) -> tuple[CelebASource | None, list[str]]:
    """The source if root has this layout, else None and what is missing."""
    attr, partition = storage.join(root, layout.attr), storage.join(root, layout.partition)
    missing = [rel for rel, uri in ((layout.attr, attr), (layout.partition, partition)) if not storage.exists(uri)]
    if missing:  # no need to look for images under a root without this layout's annotations
        return None, missing
    images = next((uri for uri in (storage.join(root, rel) for rel in layout.images) if _is_images(uri)), None)
    if images is None:
        return None, [_either(layout.images)]
    identity = next((uri for uri in (storage.join(root, rel) for rel in layout.identity) if storage.exists(uri)), None)
    return CelebASource(root, layout.name, attr, partition, identity, images), []


def find_source(root: str) -> CelebASource:
    """Detect which CelebA layout root has; InputError listing what each layout needs if none."""
    if not storage.isdir(root):
        raise InputError(root, "no such folder: give the folder that holds CelebA")
    report = []
    for layout in _LAYOUTS:
        source, missing = _match(root, layout)
        if source is not None:
            return source
        needs = ", ".join([layout.attr, layout.partition, _either(layout.images)])
        report.append(f"{layout.name} needs {needs} (missing: {', '.join(missing)})")
    raise InputError(root, "no CelebA layout found; " + "; ".join(report))


def load_annotations(source: CelebASource) -> Annotations:
    """The attributes, partition and (when there is an identity file) identities, joined by image."""
    image_files, attrs = read_attr_file(source.attr_file)
    partition = read_pairs_file(source.partition_file, "partition")
    if source.identity_file is None:
        return build_annotations(image_files, attrs, partition, None, source.partition_file)
    identity = read_pairs_file(source.identity_file, "identity")
    return build_annotations(image_files, attrs, partition, identity, source.partition_file, source.identity_file)


def _is_image_name(name: str) -> bool:
    # Hidden files: .DS_Store, macOS "._000001.jpg" shadows, half-written temp files.
    return not name.startswith(".") and name.lower().endswith(".jpg")


class ImageReader(ABC):
    """Raw JPEG bytes by image name ("000001.jpg"), from a folder or a zip; a context manager."""

    @abstractmethod
    def names(self) -> dict[str, int]:
        """{image name: size in bytes} of the images present, from one listing."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes of one image; FileNotFoundError naming it when absent."""

    def read_many(self, names: Sequence[str]) -> dict[str, bytes]:
        """{name: bytes} of many images, fetched in the order the storage serves best."""
        return {name: self.read(name) for name in names}

    def close(self) -> None:  # noqa: B027 (a default, not abstract: a folder holds nothing open)
        """Release what the reader holds open (nothing for a folder)."""

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _FolderReader(ImageReader):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def names(self) -> dict[str, int]:
        return {name: size for name, size in storage.list_sizes(self.folder).items() if _is_image_name(name)}

    def read(self, name: str) -> bytes:
        try:
            return storage.read_bytes(storage.join(self.folder, name))
        except FileNotFoundError:
            raise FileNotFoundError(f"image {name} is not in {self.folder}") from None


def _zip_members(uri: str, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """{image name: member} of the images in the zip, which must all sit in one folder (or none)."""
    infos = [i for i in archive.infolist() if not i.is_dir() and _is_image_name(posixpath.basename(i.filename))]
    # Members are looked up by bare name, so a second folder could hide images behind the first.
    folders = sorted({posixpath.dirname(info.filename) for info in infos})
    if len(folders) > 1:
        shown = ", ".join(f"{folder or '(top level)'}/" for folder in folders[:5])
        raise InputError(uri, f"images in {len(folders)} folders ({shown}); expected one folder of images")
    return {posixpath.basename(info.filename): info for info in infos}


class _RangedFile(io.RawIOBase):
    """A read-only, seekable view of one object, for zipfile, that reads exact byte ranges
    (storage.read_ranges, retried); bytes `prefetched` first are served from memory. s3fs's own
    file would fetch a 50 MiB read-ahead block at every member out of order, outside our retries."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.size = storage.size(uri)
        self._pos = 0
        self._starts: list[int] = []  # prefetched spans, sorted by start
        self._spans: list[bytes] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:  # as a real file does: zipfile probes for the end records this way
            raise OSError(errno.EINVAL, f"seek to {base + offset} in {self.uri}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._check_open()
        start = self._pos
        end = self.size if size is None or size < 0 else min(self.size, start + size)
        if end <= start:
            return b""
        data = self._prefetched(start, end)
        if data is None:
            data = storage.read_ranges(self.uri, [(start, end)])[0]
        self._pos = end
        return data

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self.uri} was closed: open the images again")

    def _prefetched(self, start: int, end: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or end > self._starts[i] + len(self._spans[i]):
            return None
        return self._spans[i][start - self._starts[i] : end - self._starts[i]]

    @contextmanager
    def prefetched(self, spans: list[tuple[int, int]]) -> Iterator[None]:
        """Fetch the spans (sorted, not overlapping) at once; reads inside them cost no request."""
        self._check_open()
        self._starts, self._spans = [start for start, _ in spans], storage.read_ranges(self.uri, spans)
        try:
            yield
        finally:
            self._starts, self._spans = [], []


def _member_ends(archive: zipfile.ZipFile) -> dict[int, int]:
    """{local header offset: end of that member's bytes}: where the next member, or the central
    directory, starts. The span holds the local header whatever its own name and extra lengths
    (they may differ from the central directory's) and a data descriptor if there is one."""
    offsets = sorted({info.header_offset for info in archive.infolist()})
    return dict(zip(offsets, [*offsets[1:], archive.start_dir]))


class _ZipReader(ImageReader):
    """The central directory is read once; members are read by name, many at a time in offset
    order, each in its exact byte range, from a local zip or one on S3 alike."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._file = _RangedFile(uri)
        try:
            self._zip = zipfile.ZipFile(self._file)
            self._members = _zip_members(uri, self._zip)
        except zipfile.BadZipFile as err:
            raise InputError(uri, f"not a readable zip ({err}); download it again") from None
        self._ends = _member_ends(self._zip)

    def names(self) -> dict[str, int]:
        return {name: info.file_size for name, info in self._members.items()}

    def read(self, name: str) -> bytes:
        return self.read_many([name])[name]

    def read_many(self, names: Sequence[str]) -> dict[str, bytes]:
        infos = sorted((self._member(name) for name in names), key=lambda info: info.header_offset)
        with self._file.prefetched([(info.header_offset, self._ends[info.header_offset]) for info in infos]):
            return {posixpath.basename(info.filename): self._unpack(info) for info in infos}

    def _member(self, name: str) -> zipfile.ZipInfo:
        info = self._members.get(name)
        if info is None:
            raise FileNotFoundError(f"image {name} is not in {self.uri}")
        return info

    def _unpack(self, info: zipfile.ZipInfo) -> bytes:
        """The member's bytes, decompressed and checked against its CRC-32 (by zipfile)."""
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as err:
            raise InputError(
                self.uri,
                f"cannot read {info.filename} ({err}); download the zip again, or unzip it and give the folder",
            ) from None

    def close(self) -> None:
        self._zip.close()
        self._file.close()


def open_images(source: CelebASource) -> ImageReader:
    """A reader for the images of source; close it (or use it in a with block) when done."""
    return _ZipReader(source.images) if source.images.endswith(".zip") else _FolderReader(source.images)
