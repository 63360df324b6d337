"""CelebA annotation files: the official txt files and the Kaggle CSVs, read and written.

The official files have CRLF line ends. list_attr_celeba.txt: a count line, a header line of the 40
attribute names, then one row per image, "000001.jpg -1  1  1 ..." with runs of spaces.
list_eval_partition.txt and identity_CelebA.txt: "000001.jpg 0" rows, no count or header.
Kaggle's list_attr_celeba.csv and list_eval_partition.csv: a header row, then comma-separated rows;
some copies of the attribute CSV write absent attributes as 0 instead of -1.
The readers accept LF or CRLF, attribute columns in any order (returned in CelebA order), and
refuse anything else with an InputError naming the file and the 1-based line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deeprecognition import storage
from deeprecognition.celeba.attributes import ATTRIBUTE_INDEX, CELEBA_ATTRIBUTES
from deeprecognition.errors import InputError


@dataclass(frozen=True)
class Annotations:
    """Everything CelebA says about its images, in the order of the attribute file."""

    image_files: list[str]  # "000001.jpg", ...
    attrs: np.ndarray  # (N, 40) uint8 in {0, 1}, CelebA attribute order
    partition: np.ndarray  # (N,) uint8: 0 train, 1 val, 2 test
    identity: np.ndarray | None  # (N,) int32, or None when no identity file was given

    def __len__(self) -> int:
        return len(self.image_files)


def _crlf(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def format_attr_txt(image_files: list[str], attrs: np.ndarray) -> bytes:
    """list_attr_celeba.txt, byte-format identical to the official file."""
    rows = [f"{name} " + " ".join(f"{1 if v else -1:2d}" for v in row) for name, row in zip(image_files, attrs)]
    return _crlf([str(len(image_files)), " ".join(CELEBA_ATTRIBUTES) + " ", *rows])


def format_pairs_txt(image_files: list[str], values: np.ndarray) -> bytes:
    """list_eval_partition.txt / identity_CelebA.txt: "000001.jpg VALUE" per line."""
    return _crlf([f"{name} {int(v)}" for name, v in zip(image_files, values)])


def write_annotations(root: str, ann: Annotations) -> None:
    """Write the three official txt files into root (torchvision's flat layout)."""
    storage.write_bytes_atomic(storage.join(root, "list_attr_celeba.txt"), format_attr_txt(ann.image_files, ann.attrs))
    storage.write_bytes_atomic(
        storage.join(root, "list_eval_partition.txt"), format_pairs_txt(ann.image_files, ann.partition)
    )
    if ann.identity is not None:
        storage.write_bytes_atomic(
            storage.join(root, "identity_CelebA.txt"), format_pairs_txt(ann.image_files, ann.identity)
        )


# ---------------------------------------------------------------------------------------------
# Readers. A file is split into cells by numpy over its raw bytes (offsets of each cell, never one
# Python object per cell): the 202,599 x 41 cells of list_attr_celeba.txt parse in well under a
# second. Checks run on whole arrays; the first failing cell gives the line to name.

Pairs = tuple[list[str], np.ndarray]  # image names and their values, (N,) or (N, 40)
PairKind = Literal["partition", "identity"]

_BOM = b"\xef\xbb\xbf"  # spreadsheet exports of the Kaggle CSVs start with one
_TXT_ATTR_CODES = {b"-1": 0, b"1": 1}
_CSV_ATTR_CODES = {b"-1": 0, b"0": 0, b"1": 1}
_PARTITION_CODES = {b"0": 0, b"1": 1, b"2": 2}
_MAX_IDENTITY_DIGITS = 9  # keeps every identity inside int32


def _key(token: bytes) -> int:
    """A cell of one or two bytes as one integer; two-byte keys are >= 256, so the two never collide."""
    return token[0] if len(token) == 1 else token[0] * 256 + token[1]


@dataclass(frozen=True)
class _Table:
    """The data rows of one file, split: cell (row, col) is body[starts[row, col]:ends[row, col]]."""

    path: str
    body: bytes  # the data rows, each ending in LF
    first_line: int  # 1-based file line of row 0
    starts: np.ndarray  # (N, width) int64
    ends: np.ndarray  # (N, width) int64

    def error(self, row: int, message: str) -> InputError:
        return InputError(self.path, message, line=self.first_line + int(row))

    def cells(self, col: int) -> list[bytes]:
        return [self.body[s:e] for s, e in zip(self.starts[:, col].tolist(), self.ends[:, col].tolist())]

    def names(self) -> list[str]:
        names = [cell.decode() for cell in self.cells(0)]
        if len(set(names)) != len(names):
            self._refuse_duplicate(names)
        return names

    def _refuse_duplicate(self, names: list[str]) -> None:
        first: dict[str, int] = {}
        for row, name in enumerate(names):
            if name in first:
                line = self.first_line + first[name]
                raise self.error(row, f"image {name} is listed twice (also on line {line}); keep one row per image")
            first[name] = row

    def keys(self, cols: list[int]) -> np.ndarray:
        """(N, len(cols)) int32: each cell of at most two bytes as _key(cell), longer or empty ones -1."""
        buf = np.frombuffer(self.body, dtype=np.uint8)
        # Flat arrays first: gathering from a column subset of (N, width) costs several times more.
        starts, ends = self.starts.ravel(), self.ends.ravel()
        first = buf[starts].astype(np.int32)
        second = buf[np.minimum(starts + 1, len(buf) - 1)]
        length = ends - starts
        keys = np.where(length == 1, first, np.where(length == 2, first * 256 + second, -1))
        return keys.reshape(self.starts.shape)[:, cols]

    def decode(self, keys: np.ndarray, cols: list[int], codes: dict[bytes, int], columns: Sequence[str]) -> np.ndarray:
        """keys (N, K) of the cells in cols mapped through codes to uint8; a cell outside codes is refused."""
        out = np.full(keys.shape, 255, dtype=np.uint8)
        for token, code in codes.items():
            out[keys == _key(token)] = code
        bad = np.flatnonzero(out == 255)
        if len(bad):
            row, k = divmod(int(bad[0]), keys.shape[1])
            cell = self.body[self.starts[row, cols[k]] : self.ends[row, cols[k]]].decode()
            expected = " or ".join(token.decode() for token in codes)
            raise self.error(row, f"{columns[k]} is {cell!r}, expected {expected}")
        return out


def _text(data: bytes, path: str) -> bytes:
    """data with LF line ends, ending in exactly one; trailing blank lines dropped; non-ASCII refused."""
    data = data.removeprefix(_BOM)
    if not data.isascii():
        pos = int(np.flatnonzero(np.frombuffer(data, dtype=np.uint8) > 127)[0])
        line = data.count(b"\n", 0, pos) + 1
        raise InputError(path, f"byte 0x{data[pos]:02x} is not ASCII: is this a CelebA annotation file?", line=line)
    data = data.replace(b"\r\n", b"\n")
    end = data.find(b"\n", len(data.rstrip()))
    return (data[:end] if end >= 0 else data) + b"\n"


def _head(text: bytes, path: str, count: int, expected: str) -> tuple[list[bytes], bytes]:
    """The first count lines of text and the rest, which must hold at least one row."""
    *head, body = text.split(b"\n", count)
    if len(head) < count or not body.strip():
        raise InputError(path, f"no image rows: expected {expected}", line=len(head) + 1)
    return head, body


def _table(path: str, body: bytes, first_line: int, sep: bytes | None, width: int, columns: str) -> _Table:
    """Split body into cells; sep None: runs of blanks (official txt), b",": CSV. Rows must have width cells."""
    buf = np.frombuffer(body, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    if sep is None:  # the blanks of bytes.split(): space, and \t \n \v \f \r
        inside = ~((buf == ord(" ")) | ((buf >= ord("\t")) & (buf <= ord("\r"))))
        first, last = inside.copy(), inside.copy()
        first[1:] &= ~inside[:-1]
        last[:-1] &= ~inside[1:]
        starts, ends = np.flatnonzero(first), np.flatnonzero(last) + 1
    else:
        ends = np.flatnonzero((buf == ord("\n")) | (buf == ord(sep)))
        starts = np.concatenate(([0], ends[:-1] + 1))
    per_row = np.diff(np.searchsorted(starts, newlines, side="right"), prepend=0)
    bad = np.flatnonzero(per_row != width)
    if len(bad):
        row = int(bad[0])
        raise InputError(path, f"{per_row[row]} columns, expected {width} ({columns})", line=first_line + row)
    return _Table(path, body, first_line, starts.reshape(-1, width), ends.reshape(-1, width))


def _attr_order(header: list[str], path: str, line: int) -> list[int]:
    """Column indices that put the file's attribute columns in CelebA order."""
    unknown = [name for name in header if name not in ATTRIBUTE_INDEX]
    missing = [name for name in CELEBA_ATTRIBUTES if name not in header]
    twice = sorted({name for name in header if header.count(name) > 1})
    problems = [
        f"{what}: {', '.join(names)}"
        for what, names in (("unknown attributes", unknown), ("missing", missing), ("listed twice", twice))
        if names
    ]
    if problems:
        expected = " ".join(CELEBA_ATTRIBUTES)
        message = f"{'; '.join(problems)}; the header must name the 40 CelebA attributes: {expected}"
        raise InputError(path, message, line=line)
    return [header.index(name) for name in CELEBA_ATTRIBUTES]


def _attr_rows(
    path: str, header: list[str], header_line: int, body: bytes, sep: bytes | None, codes: dict[bytes, int]
) -> tuple[_Table, np.ndarray, np.ndarray]:
    """The table, the keys of the attribute cells and the (N, 40) uint8 attributes, both in CelebA order."""
    cols = [1 + i for i in _attr_order(header, path, header_line)]
    table = _table(path, body, header_line + 1, sep, 1 + len(header), f"the image name and {len(header)} attributes")
    keys = table.keys(cols)
    return table, keys, table.decode(keys, cols, codes, CELEBA_ATTRIBUTES)


def parse_attr_txt(data: bytes, path: str) -> Pairs:
    """list_attr_celeba.txt -> image names and (N, 40) uint8 0/1 attributes in CelebA order."""
    (count, header), body = _head(_text(data, path), path, 2, "a count line, the attribute names, then the rows")
    if not count.strip().isdigit():
        raise InputError(path, f"{count.decode()!r} is not a count: line 1 must hold the number of images", line=1)
    rows = body.count(b"\n")
    if rows != int(count):
        message = f"says {int(count)} images but lines 3-{rows + 2} hold {rows} rows; is the file cut?"
        raise InputError(path, message, line=1)
    table, _, attrs = _attr_rows(path, header.decode().split(), 2, body, None, _TXT_ATTR_CODES)
    return table.names(), attrs


def parse_attr_csv(data: bytes, path: str) -> Pairs:
    """Kaggle's list_attr_celeba.csv (image_id, then the 40 attributes as -1/1 or as 0/1)."""
    (header,), body = _head(_text(data, path), path, 1, "the header image_id,5_o_Clock_Shadow,... then the rows")
    names = [name.strip() for name in header.decode().split(",")[1:]]
    table, keys, attrs = _attr_rows(path, names, 1, body, b",", _CSV_ATTR_CODES)
    _check_one_convention(table, keys)
    return table.names(), attrs


def _check_one_convention(table: _Table, keys: np.ndarray) -> None:
    """Absent attributes are all -1 or all 0: a mix means two files were pasted together."""
    rows_with = [(keys == _key(token)).any(axis=1) for token in (b"-1", b"0")]
    if not all(has.any() for has in rows_with):
        return
    neg, zero = (int(has.argmax()) for has in rows_with)
    raise table.error(
        max(neg, zero),
        f"mixes -1 and 0 for absent attributes (first -1 on line {table.first_line + neg}, first 0 on line "
        f"{table.first_line + zero}); a file must use -1/1 or 0/1 throughout",
    )


def _pair_values(path: str, body: bytes, first_line: int, sep: bytes | None, what: PairKind) -> Pairs:
    table = _table(path, body, first_line, sep, 2, f"the image name and its {what}")
    if what == "partition":
        values = table.decode(table.keys([1]), [1], _PARTITION_CODES, ["partition"])[:, 0]
        return table.names(), values
    column = np.array(table.cells(1), dtype=bytes)
    ok = np.char.isdigit(column) & (np.char.str_len(column) <= _MAX_IDENTITY_DIGITS)
    identity = np.where(ok, column, b"0").astype(np.int32)
    bad = np.flatnonzero(~ok | (identity <= 0))
    if len(bad):
        raise table.error(bad[0], f"identity {column[bad[0]].decode()!r} is not a positive integer")
    return table.names(), identity


def parse_pairs_txt(data: bytes, path: str, what: PairKind) -> Pairs:
    """list_eval_partition.txt (values 0/1/2) or identity_CelebA.txt (positive ints)."""
    _, body = _head(_text(data, path), path, 0, f"rows of an image name and its {what}")
    return _pair_values(path, body, 1, None, what)


def parse_pairs_csv(data: bytes, path: str, what: PairKind) -> Pairs:
    """Kaggle's list_eval_partition.csv (image_id,partition), or an identity CSV of that shape."""
    (header,), body = _head(_text(data, path), path, 1, f"the header image_id,{what} then the rows")
    if len(header.split(b",")) != 2:
        raise InputError(path, f"expected a header of two columns, image_id,{what}", line=1)
    return _pair_values(path, body, 2, b",", what)


def read_attr_file(uri: str) -> Pairs:
    """The attribute file at uri, official txt or Kaggle CSV (told apart by the name)."""
    parse = parse_attr_csv if uri.endswith(".csv") else parse_attr_txt
    return parse(storage.read_bytes(uri), uri)


def read_pairs_file(uri: str, what: PairKind) -> Pairs:
    parse = parse_pairs_csv if uri.endswith(".csv") else parse_pairs_txt
    return parse(storage.read_bytes(uri), uri, what)


def _align(image_files: list[str], pairs: Pairs, path: str, what: PairKind) -> np.ndarray:
    """The values of pairs in the order of image_files; rows for other images are ignored."""
    names, values = pairs
    if names == image_files:
        return values
    index = {name: i for i, name in enumerate(names)}
    rows = np.array([index.get(name, -1) for name in image_files], dtype=np.int64)
    absent = np.flatnonzero(rows < 0)
    if len(absent):
        shown = ", ".join(image_files[i] for i in absent[:5])
        raise InputError(
            path,
            f"no {what} for {len(absent)} of the {len(image_files)} images of the attribute file (first: {shown}); "
            "use the annotation files of one CelebA release",
        )
    return values[rows]


def build_annotations(
    image_files: list[str],
    attrs: np.ndarray,
    partition: Pairs,
    identity: Pairs | None,
    partition_path: str,
    identity_path: str = "identity_CelebA.txt",
) -> Annotations:
    """Join the partition (and identity) rows onto the images of the attribute file, by name."""
    return Annotations(
        image_files=image_files,
        attrs=attrs,
        partition=_align(image_files, partition, partition_path, "partition"),
        identity=None if identity is None else _align(image_files, identity, identity_path, "identity"),
    )
