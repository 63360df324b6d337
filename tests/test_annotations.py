"""The annotation readers: exact round trips with the writers, and every refusal names file and line."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from deeprecognition.celeba.annotations import (
    Annotations,
    build_annotations,
    format_attr_txt,
    format_pairs_txt,
    parse_attr_csv,
    parse_attr_txt,
    parse_pairs_csv,
    parse_pairs_txt,
)
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES
from deeprecognition.errors import InputError

from .celeba_fixtures import format_attr_csv, format_partition_csv, make_annotations

ANN = make_annotations(n=8)
ATTR_TXT = format_attr_txt(ANN.image_files, ANN.attrs)  # line 1 count, 2 header, 3-10 rows
PARTITION_TXT = format_pairs_txt(ANN.image_files, ANN.partition)  # lines 1-8
IDENTITY_TXT = format_pairs_txt(ANN.image_files, ANN.identity)
ATTR_CSV = format_attr_csv(ANN)  # line 1 header, 2-9 rows


def edit(data: bytes, line: int, change: Callable[[str], str]) -> bytes:
    """data with its 1-based line replaced by change(line), line ends kept."""
    end = b"\r\n" if b"\r\n" in data else b"\n"
    lines = data.split(end)
    lines[line - 1] = change(lines[line - 1].decode()).encode()
    return end.join(lines)


def set_cell(data: bytes, line: int, col: int, value: str) -> bytes:
    """data with cell col (0 = image name) of line set to value, in the file's own separator."""
    sep = "," if b"," in data else None

    def change(text: str) -> str:
        cells = text.split(sep)
        cells[col] = value
        return (sep or " ").join(cells)

    return edit(data, line, change)


def refusal(parse: Callable[..., object], data: bytes, *args: str) -> InputError:
    with pytest.raises(InputError) as info:
        parse(data, "/data/celeba/the_file", *args)
    return info.value


def assert_names(err: InputError, line: int, *fragments: str) -> None:
    assert err.path == "/data/celeba/the_file" and err.line == line
    message = str(err)
    assert message.startswith(f"/data/celeba/the_file, line {line}: "), message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------
# Round trips


def test_attr_txt_round_trip() -> None:
    names, attrs = parse_attr_txt(ATTR_TXT, "a.txt")
    assert names == ANN.image_files
    assert attrs.dtype == np.uint8 and attrs.shape == (8, 40)
    assert np.array_equal(attrs, ANN.attrs)


@pytest.mark.parametrize("what", ["partition", "identity"])
def test_pairs_txt_round_trip(what: str) -> None:
    want = getattr(ANN, what)
    names, values = parse_pairs_txt(format_pairs_txt(ANN.image_files, want), "p.txt", what)
    assert names == ANN.image_files
    assert values.dtype == want.dtype and np.array_equal(values, want)


@pytest.mark.parametrize(
    "variant",
    [
        lambda d: d.replace(b"\r\n", b"\n"),
        lambda d: d + b"\r\n  \r\n\r\n",
        lambda d: d.replace(b"\r\n", b"\n") + b"\n\n",
        lambda d: d.rstrip(b"\r\n"),
        lambda d: d.replace(b" ", b"   ").replace(b"\r\n", b" \t\r\n"),
    ],
    ids=["lf", "crlf-trailing-blank-lines", "lf-trailing-blank-lines", "no-final-line-end", "extra-blanks"],
)
def test_attr_txt_variants_parse_the_same(variant: Callable[[bytes], bytes]) -> None:
    names, attrs = parse_attr_txt(variant(ATTR_TXT), "a.txt")
    assert names == ANN.image_files and np.array_equal(attrs, ANN.attrs)
    names, values = parse_pairs_txt(variant(PARTITION_TXT), "p.txt", "partition")
    assert names == ANN.image_files and np.array_equal(values, ANN.partition)


def test_attr_columns_in_another_order_come_back_in_celeba_order() -> None:
    order = np.random.default_rng(1).permutation(40)
    lines = [
        "8",
        " ".join(CELEBA_ATTRIBUTES[i] for i in order),
        *(" ".join([name, *("1" if v else "-1" for v in row[order])]) for name, row in zip(ANN.image_files, ANN.attrs)),
    ]
    names, attrs = parse_attr_txt("\n".join(lines).encode(), "a.txt")
    assert names == ANN.image_files and np.array_equal(attrs, ANN.attrs)


@pytest.mark.parametrize("absent", [-1, 0])
def test_attr_csv_round_trip(absent: int) -> None:
    names, attrs = parse_attr_csv(format_attr_csv(ANN, absent), "a.csv")
    assert names == ANN.image_files
    assert attrs.dtype == np.uint8 and np.array_equal(attrs, ANN.attrs)


def test_csv_with_bom_and_crlf() -> None:
    data = b"\xef\xbb\xbf" + ATTR_CSV.replace(b"\n", b"\r\n")
    names, attrs = parse_attr_csv(data, "a.csv")
    assert names == ANN.image_files and np.array_equal(attrs, ANN.attrs)
    names, values = parse_pairs_csv(format_partition_csv(ANN).replace(b"\n", b"\r\n"), "p.csv", "partition")
    assert names == ANN.image_files and np.array_equal(values, ANN.partition)


def test_full_size_attr_file_parses() -> None:
    """202,599 rows, the size of the real file (parse speed is measured by benchmarks, not here)."""
    n = 202_599
    tail = ATTR_TXT.split(b"\r\n")[2][len("000001.jpg") :].decode()
    data = "\r\n".join([str(n), " ".join(CELEBA_ATTRIBUTES) + " ", *(f"{i:06d}.jpg{tail}" for i in range(1, n + 1))])
    names, attrs = parse_attr_txt(data.encode(), "a.txt")
    assert len(names) == n and names[-1] == "202599.jpg"
    assert np.array_equal(attrs[-1], ANN.attrs[0])


# ---------------------------------------------------------------------------------------------
# Refusals: each names the file and the 1-based line


@pytest.mark.parametrize(
    ("data", "line", "fragments"),
    [
        (edit(ATTR_TXT, 1, lambda _: "many"), 1, ["'many' is not a count"]),
        (edit(ATTR_TXT, 1, lambda _: "9"), 1, ["says 9 images", "hold 8 rows"]),
        (ATTR_TXT.rsplit(b"\r\n", 3)[0], 1, ["says 8 images", "hold 6 rows"]),
        (
            edit(ATTR_TXT, 2, lambda h: h.replace("Smiling", "Smiles")),
            2,
            ["unknown attributes: Smiles", "missing: Smiling"],
        ),
        (edit(ATTR_TXT, 2, lambda h: h.replace("Young", "Male")), 2, ["listed twice: Male", "missing: Young"]),
        (edit(ATTR_TXT, 5, lambda r: r[:-3]), 5, ["40 columns, expected 41"]),
        (edit(ATTR_TXT, 6, lambda r: r + "  1"), 6, ["42 columns, expected 41"]),
        # One row short and the next one long: the total cell count is right, the rows are not.
        (edit(edit(ATTR_TXT, 5, lambda r: r[:-3]), 6, lambda r: r + "  1"), 5, ["40 columns"]),
        (edit(ATTR_TXT, 7, lambda _: ""), 7, ["0 columns"]),
        (set_cell(ATTR_TXT, 7, 3, "0"), 7, ["Attractive is '0', expected -1 or 1"]),
        (set_cell(ATTR_TXT, 10, 40, "+1"), 10, ["Young is '+1'"]),
        (set_cell(ATTR_TXT, 8, 1, "yes"), 8, ["5_o_Clock_Shadow is 'yes'"]),
        (set_cell(ATTR_TXT, 8, 0, "000004.jpg"), 8, ["image 000004.jpg is listed twice (also on line 6)"]),
        (edit(ATTR_TXT, 9, lambda r: r.replace(".jpg", "é.jpg")), 9, ["byte 0xc3 is not ASCII"]),
        (b"8\r\n" + ATTR_TXT.split(b"\r\n")[1], 3, ["no image rows"]),
    ],
)
def test_attr_txt_refusals(data: bytes, line: int, fragments: list[str]) -> None:
    assert_names(refusal(parse_attr_txt, data), line, *fragments)


@pytest.mark.parametrize(
    ("data", "what", "line", "fragments"),
    [
        (set_cell(PARTITION_TXT, 4, 1, "3"), "partition", 4, ["partition is '3', expected 0 or 1 or 2"]),
        (set_cell(PARTITION_TXT, 2, 1, "0 1"), "partition", 2, ["3 columns, expected 2"]),
        (edit(PARTITION_TXT, 5, lambda _: " "), "partition", 5, ["0 columns"]),
        (set_cell(PARTITION_TXT, 7, 0, "000002.jpg"), "partition", 7, ["000002.jpg is listed twice (also on line 2)"]),
        (set_cell(IDENTITY_TXT, 3, 1, "0"), "identity", 3, ["identity '0' is not a positive integer"]),
        (set_cell(IDENTITY_TXT, 6, 1, "-4"), "identity", 6, ["'-4' is not a positive integer"]),
        (set_cell(IDENTITY_TXT, 2, 1, "x1"), "identity", 2, ["'x1' is not a positive integer"]),
        (set_cell(IDENTITY_TXT, 8, 1, "9999999999"), "identity", 8, ["'9999999999' is not a positive integer"]),
        (b"", "identity", 1, ["no image rows"]),
    ],
)
def test_pairs_txt_refusals(data: bytes, what: str, line: int, fragments: list[str]) -> None:
    assert_names(refusal(parse_pairs_txt, data, what), line, *fragments)


ZERO_ONE_CSV = format_attr_csv(ANN, absent=0)  # its first row (line 2) has a 0: 40 random bits


@pytest.mark.parametrize(
    ("data", "line", "fragments"),
    [
        (edit(ATTR_CSV, 1, lambda h: h.replace("Smiling", "smiling")), 1, ["unknown attributes: smiling"]),
        (edit(ATTR_CSV, 4, lambda r: r + ",1"), 4, ["42 columns, expected 41"]),
        (set_cell(ATTR_CSV, 5, 2, "2"), 5, ["Arched_Eyebrows is '2', expected -1 or 0 or 1"]),
        (set_cell(ATTR_CSV, 9, 40, ""), 9, ["Young is ''"]),
        (set_cell(ATTR_CSV, 9, 0, "000001.jpg"), 9, ["000001.jpg is listed twice (also on line 2)"]),
        (set_cell(ZERO_ONE_CSV, 7, 5, "-1"), 7, ["mixes -1 and 0", "first -1 on line 7", "first 0 on line 2"]),
        (b"image_id," + ",".join(CELEBA_ATTRIBUTES).encode() + b"\n", 2, ["no image rows"]),
    ],
)
def test_attr_csv_refusals(data: bytes, line: int, fragments: list[str]) -> None:
    assert_names(refusal(parse_attr_csv, data), line, *fragments)


@pytest.mark.parametrize(
    ("data", "line", "fragments"),
    [
        (edit(format_partition_csv(ANN), 1, lambda _: "image_id partition"), 1, ["header of two columns"]),
        (set_cell(format_partition_csv(ANN), 3, 1, "5"), 3, ["partition is '5'"]),
        (edit(format_partition_csv(ANN), 9, lambda r: r + ",0"), 9, ["3 columns, expected 2"]),
    ],
)
def test_partition_csv_refusals(data: bytes, line: int, fragments: list[str]) -> None:
    assert_names(refusal(parse_pairs_csv, data, "partition"), line, *fragments)


# ---------------------------------------------------------------------------------------------
# Joining the files


def pairs(ann: Annotations, what: str, rows: list[int]) -> tuple[list[str], np.ndarray]:
    return [ann.image_files[i] for i in rows], getattr(ann, what)[rows]


def test_build_joins_by_name_and_ignores_extra_rows() -> None:
    bigger = make_annotations(n=12)
    shuffled = list(np.random.default_rng(2).permutation(12))  # the 8 images of ANN, 4 more, mixed
    ann = build_annotations(
        bigger.image_files[:8],
        bigger.attrs[:8],
        pairs(bigger, "partition", shuffled),
        pairs(bigger, "identity", shuffled[::-1]),
        "Eval/list_eval_partition.txt",
        "Anno/identity_CelebA.txt",
    )
    assert ann.image_files == bigger.image_files[:8]
    assert np.array_equal(ann.partition, bigger.partition[:8])
    assert np.array_equal(ann.identity, bigger.identity[:8])


def test_build_without_identity() -> None:
    ann = build_annotations(ANN.image_files, ANN.attrs, pairs(ANN, "partition", list(range(8))), None, "p.txt")
    assert ann.identity is None and np.array_equal(ann.partition, ANN.partition)


@pytest.mark.parametrize("what", ["partition", "identity"])
def test_build_refuses_images_absent_from_a_file(what: str) -> None:
    files = {"partition": "/c/Eval/list_eval_partition.txt", "identity": "/c/Anno/identity_CelebA.txt"}
    kept = [0, 1, 2, 4, 6, 7]  # 000004.jpg and 000006.jpg are absent
    given = {name: pairs(ANN, name, kept if name == what else list(range(8))) for name in files}
    with pytest.raises(InputError) as info:
        build_annotations(
            ANN.image_files, ANN.attrs, given["partition"], given["identity"], files["partition"], files["identity"]
        )
    assert info.value.path == files[what]
    assert f"no {what} for 2 of the 8 images" in str(info.value)
    assert "000004.jpg, 000006.jpg" in str(info.value)
