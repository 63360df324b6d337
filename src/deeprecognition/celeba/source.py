"""Where a CelebA copy keeps its files: the three layouts people download, read in place.

- torchvision: ROOT/list_attr_celeba.txt, list_eval_partition.txt, identity_CelebA.txt (optional)
  and img_align_celeba/ or the official img_align_celeba.zip;
- google-drive (the official release): ROOT/Anno/list_attr_celeba.txt, Anno/identity_CelebA.txt,
  Eval/list_eval_partition.txt and Img/img_align_celeba/ or Img/img_align_celeba.zip;
- kaggle: ROOT/list_attr_celeba.csv, list_eval_partition.csv and img_align_celeba/img_align_celeba/
  (or img_align_celeba/ when the archive was unpacked one level less).

A zip is read where it lies (locally or on S3, by random access), never extracted to disk.
"""

from __future__ import annotations

import posixpath
import zipfile
from abc import ABC, abstractmethod
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

    def close(self) -> None:
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


class _ZipReader(ImageReader):
    """The zip is opened once; members are read by name through its central directory."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._file = storage.open_read(uri)
        try:
            self._zip = zipfile.ZipFile(self._file)
            self._members = _zip_members(uri, self._zip)
        except zipfile.BadZipFile as err:
            self._file.close()
            raise InputError(uri, f"not a readable zip ({err}); download it again") from None
        except BaseException:
            self._file.close()
            raise

    def names(self) -> dict[str, int]:
        return {name: info.file_size for name, info in self._members.items()}

    def read(self, name: str) -> bytes:
        info = self._members.get(name)
        if info is None:
            raise FileNotFoundError(f"image {name} is not in {self.uri}")
        return self._zip.read(info)

    def close(self) -> None:
        self._zip.close()
        self._file.close()


def open_images(source: CelebASource) -> ImageReader:
    """A reader for the images of source; close it (or use it in a with block) when done."""
    return _ZipReader(source.images) if source.images.endswith(".zip") else _FolderReader(source.images)
