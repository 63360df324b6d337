"""Layout detection and in-place image reading for every CelebA layout people download."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

from deeprecognition.celeba.source import CelebASource, find_source, load_annotations, open_images
from deeprecognition.errors import InputError

from .celeba_fixtures import (
    INFO_ZIP_LOCAL_EXTRA,
    LAYOUT_CASES,
    assert_same_annotations,
    make_annotations,
    make_jpegs,
    upload_folder,
    write_file,
    write_folder,
    write_layout,
    write_zip,
)
from .conftest import BUCKET

ANN = make_annotations(n=6)
JPEGS = make_jpegs(ANN.image_files)


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_every_layout_gives_the_same_annotations_and_images(tmp_path, case: str) -> None:
    root = str(tmp_path / "celeba")
    want = write_layout(root, case, ANN, JPEGS)
    source = find_source(root)
    assert source.layout == LAYOUT_CASES[case]
    assert source.root == root
    assert source.images.endswith(".zip") == case.endswith("zip")
    assert_same_annotations(load_annotations(source), want)
    with open_images(source) as images:
        assert images.names() == {name: len(data) for name, data in JPEGS.items()}
        for name, data in JPEGS.items():
            assert images.read(name) == data


def test_source_paths_and_fingerprint_files(tmp_path) -> None:
    root = str(tmp_path)
    write_layout(root, "google-drive-zip", ANN, JPEGS)
    source = find_source(root)
    assert source == CelebASource(
        root=root,
        layout="google-drive",
        attr_file=os.path.join(root, "Anno", "list_attr_celeba.txt"),
        partition_file=os.path.join(root, "Eval", "list_eval_partition.txt"),
        identity_file=os.path.join(root, "Anno", "identity_CelebA.txt"),
        images=os.path.join(root, "Img", "img_align_celeba.zip"),
    )
    assert source.fingerprint_files() == [source.attr_file, source.partition_file, source.identity_file]


def test_kaggle_has_no_identity_unless_a_file_is_added(tmp_path) -> None:
    root = str(tmp_path)
    write_layout(root, "kaggle-nested", ANN, JPEGS)
    source = find_source(root)
    assert source.identity_file is None
    assert source.fingerprint_files() == [source.attr_file, source.partition_file]
    identity = "".join(f"{name} {i}\n" for name, i in zip(ANN.image_files, ANN.identity))
    write_file(os.path.join(root, "identity_CelebA.txt"), identity.encode())
    assert_same_annotations(load_annotations(find_source(root)), ANN)


def test_torchvision_folder_wins_over_the_zip_beside_it(tmp_path) -> None:
    root = str(tmp_path)
    write_layout(root, "torchvision-dir", ANN, JPEGS)
    write_zip(os.path.join(root, "img_align_celeba.zip"), {})
    assert find_source(root).images == os.path.join(root, "img_align_celeba")


def test_source_survives_pickling_into_a_task(tmp_path) -> None:
    root = str(tmp_path)
    write_layout(root, "torchvision-zip", ANN, JPEGS)
    source = pickle.loads(pickle.dumps(find_source(root)))
    assert source == find_source(root)
    with open_images(source) as images:
        assert images.read("000003.jpg") == JPEGS["000003.jpg"]


@pytest.mark.parametrize("zipped", [False, True])
def test_reading_an_absent_image_names_it(tmp_path, zipped: bool) -> None:
    write_layout(str(tmp_path), "torchvision-zip" if zipped else "torchvision-dir", ANN, JPEGS)
    with open_images(find_source(str(tmp_path))) as images, pytest.raises(FileNotFoundError, match="999999.jpg"):
        images.read("999999.jpg")


def test_hidden_and_foreign_files_are_not_images(tmp_path) -> None:
    folder = str(tmp_path / "img_align_celeba")
    write_layout(str(tmp_path), "torchvision-dir", ANN, JPEGS)
    write_folder(folder, {".DS_Store": b"x", "._000001.jpg": b"x", "notes.txt": b"x"})
    with open_images(find_source(str(tmp_path))) as images:
        assert sorted(images.names()) == ANN.image_files


def test_zip_without_a_folder_and_with_macos_shadows(tmp_path) -> None:
    path = str(tmp_path / "img_align_celeba.zip")
    write_layout(str(tmp_path), "torchvision-dir", ANN, {})  # annotations only
    write_zip(path, JPEGS, prefix="")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("__MACOSX/._000001.jpg", b"resource fork")
    with open_images(find_source(str(tmp_path))) as images:
        assert images.names() == {name: len(data) for name, data in JPEGS.items()}
        assert images.read("000001.jpg") == JPEGS["000001.jpg"]


@pytest.mark.parametrize(
    ("compression", "local_extra"),
    [(zipfile.ZIP_STORED, b""), (zipfile.ZIP_DEFLATED, b""), (zipfile.ZIP_DEFLATED, INFO_ZIP_LOCAL_EXTRA)],
    ids=["stored", "deflated", "deflated-info-zip-headers"],
)
def test_zip_on_s3_is_read_in_place_one_image_or_many(s3, tmp_path, compression: int, local_extra: bytes) -> None:
    root = str(tmp_path / "celeba")
    write_layout(root, "torchvision-dir", ANN, {})  # annotations only
    write_zip(os.path.join(root, "img_align_celeba.zip"), JPEGS, compression=compression, local_extra=local_extra)
    uri = f"s3://{BUCKET}/zip-in-place-{compression}-{len(local_extra)}"
    upload_folder(root, uri, s3)
    with open_images(find_source(uri)) as images:
        assert images.names() == {name: len(data) for name, data in JPEGS.items()}
        assert images.read("000004.jpg") == JPEGS["000004.jpg"]
        shuffled = ["000005.jpg", "000001.jpg", "000006.jpg", "000002.jpg"]
        assert images.read_many(shuffled) == {name: JPEGS[name] for name in shuffled}


def test_a_damaged_zip_member_is_named(tmp_path) -> None:
    path = str(tmp_path / "img_align_celeba.zip")
    write_layout(str(tmp_path), "torchvision-dir", ANN, {})  # annotations only
    write_zip(path, JPEGS)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("img_align_celeba/000003.jpg")
    with open(path, "r+b") as f:  # one flipped byte in the middle of the stored JPEG
        at = info.header_offset + 30 + len(info.filename) + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open_images(find_source(str(tmp_path))) as images:
        assert images.read("000002.jpg") == JPEGS["000002.jpg"]
        with pytest.raises(
            InputError, match=r"cannot read img_align_celeba/000003.jpg \(Bad CRC-32.*download the zip again"
        ) as caught:
            images.read_many(["000001.jpg", "000003.jpg"])
    assert caught.value.path == path


def test_zip_with_images_in_two_folders_is_refused(tmp_path) -> None:
    path = str(tmp_path / "img_align_celeba.zip")
    write_layout(str(tmp_path), "torchvision-dir", ANN, {})  # annotations only
    write_zip(path, JPEGS)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("more/000001.jpg", b"another face")
    with pytest.raises(InputError) as info:
        open_images(find_source(str(tmp_path)))
    assert info.value.path == path
    assert "images in 2 folders (img_align_celeba/, more/)" in str(info.value)


def test_a_broken_zip_is_refused_by_name(tmp_path) -> None:
    path = str(tmp_path / "img_align_celeba.zip")
    write_layout(str(tmp_path), "torchvision-dir", ANN, {})  # annotations only
    write_file(path, b"PK\x03\x04 cut short")
    with pytest.raises(InputError, match="not a readable zip") as info:
        open_images(find_source(str(tmp_path)))
    assert info.value.path == path


def test_zip_reader_closes(tmp_path) -> None:
    write_layout(str(tmp_path), "torchvision-zip", ANN, JPEGS)
    with open_images(find_source(str(tmp_path))) as images:
        images.read("000001.jpg")
    with pytest.raises(ValueError):
        images.read("000001.jpg")


def test_no_layout_lists_what_each_one_needs(tmp_path) -> None:
    write_file(str(tmp_path / "list_attr_celeba.txt"), b"")
    with pytest.raises(InputError) as info:
        find_source(str(tmp_path))
    message = str(info.value)
    assert info.value.path == str(tmp_path)
    torchvision = "list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/ or img_align_celeba.zip"
    assert f"torchvision needs {torchvision} (missing: list_eval_partition.txt)" in message
    assert "google-drive needs Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt" in message
    assert "kaggle needs list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/img_align_celeba/" in message


def test_annotations_without_images_say_so(tmp_path) -> None:
    write_layout(str(tmp_path), "google-drive-dir", ANN, {})  # annotations only
    with pytest.raises(InputError, match=r"\(missing: Img/img_align_celeba/ or Img/img_align_celeba.zip\)"):
        find_source(str(tmp_path))


def test_missing_root_is_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="no such folder") as info:
        find_source(str(tmp_path / "nowhere"))
    assert info.value.path == str(tmp_path / "nowhere")


def test_partition_file_lacking_an_image_is_named(tmp_path) -> None:
    write_layout(str(tmp_path), "google-drive-dir", ANN, JPEGS)
    partition = tmp_path / "Eval" / "list_eval_partition.txt"
    partition.write_bytes(b"".join(partition.read_bytes().splitlines(keepends=True)[:-1]))
    with pytest.raises(InputError, match="no partition for 1 of the 6 images.*000006.jpg") as info:
        load_annotations(find_source(str(tmp_path)))
    assert info.value.path == str(partition)


REAL_ROOT = os.environ.get("DEEPREC_CELEBA_ROOT")
FIRST_ROW = "-1 1 1 -1 -1 -1 -1 -1 -1 -1 -1 1 -1 -1 -1 -1 -1 -1 1 1 -1 1 -1 -1 1 -1 -1 1 -1 -1 -1 1 1 -1 1 -1 1 -1 -1 1"


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_ROOT, reason="DEEPREC_CELEBA_ROOT is not set")
def test_real_celeba_sample() -> None:
    source = find_source(REAL_ROOT)
    assert source.layout == "torchvision" and source.identity_file is not None
    ann = load_annotations(source)
    assert len(ann) == 202_599 and ann.attrs.shape == (202_599, 40)
    assert np.bincount(ann.partition).tolist() == [162_770, 19_867, 19_962]
    assert ann.image_files[0] == "000001.jpg" and ann.image_files[-1] == "202599.jpg"
    assert ann.attrs[0].tolist() == [1 if v == "1" else 0 for v in FIRST_ROW.split()]
    assert (ann.partition[0], ann.identity[0]) == (0, 2880)
    assert ann.identity.min() == 1 and ann.identity.max() == 10_177
    with open_images(source) as images:
        names = images.names()
        assert len(names) == 18_023
        assert set(names) <= set(ann.image_files)
        name = min(names)
        data = images.read(name)
        assert len(data) == names[name] and data[:3] == b"\xff\xd8\xff"
