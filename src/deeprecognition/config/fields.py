"""How a config field is declared, checked and changed: `option` (type, default, help, flag),
`from_dict` (a plain dict back to the typed config, every field checked by name), overrides
(`--set a.b=v`), and `settings`, the command line's view of a config (cli/flags.py).

A config crosses into Ray as a plain dict (`to_dict`) and is rebuilt, with every field checked, on
the first line of the worker loop (`from_dict`), so a typo fails on the driver, not in a worker.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, flag: bool | str = False, metavar: str | None = None) -> Any:
    """A config field with its help. With `flag` it is also an option of `deeprec train`: True
    names it after the field (batch_size: --batch-size), a string names it outright (--model)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar})


def with_default(section: type, name: str, default: Any) -> Any:
    """`section`'s field `name` under another default: its help and flag stay declared there."""
    [inherited] = [f for f in dataclasses.fields(section) if f.name == name]
    return field(default=default, metadata=inherited.metadata)


def check_fields(
    positives: tuple[tuple[str, float | None], ...], non_negatives: tuple[tuple[str, float], ...] = ()
) -> None:
    """Refuse, by dotted field name, a count or rate that must be positive and is not (None passes:
    "not set"), or a negative one where 0 means "off". Choices are the Literal types' (from_dict)."""
    for name, count in positives:
        if count is not None and count <= 0:
            raise ValueError(f"{name} must be positive, got {count}")
    for name, count in non_negatives:
        if count < 0:
            raise ValueError(f"{name} must be 0 (off) or more, got {count}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _options(kind: Any) -> tuple[Any, ...]:
    """The types a field accepts: (int, NoneType) for `int | None`, (kind,) for any other."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def _type_name(option: Any) -> str:
    if typing.get_origin(option) is Literal:
        return f"one of {', '.join(map(str, typing.get_args(option)))}"
    return getattr(option, "__name__", str(option))


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """value as `kind` (str from the command line, or a JSON value), or a ValueError naming the field."""
    options = _options(kind)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
        if type(None) in options:
            return None
        raise ValueError(f"{where} cannot be empty")
    for accepted in (o for o in options if o is not type(None)):
        if typing.get_origin(accepted) is Literal:
            if value in typing.get_args(accepted):
                return value
        elif accepted is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif accepted is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
                return int(value)
        elif accepted is float and not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        elif accepted is str and isinstance(value, str):
            return value
    raise ValueError(f"{where} must be {' or '.join(map(_type_name, options))}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Rebuild a (nested) config dataclass, refusing unknown fields and wrong types by name."""
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(prefix + u for u in sorted(unknown))}; "
            f"known: {', '.join(prefix + k for k in sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name} must be a mapping of its fields")
            kwargs[name] = from_dict(kind, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)


# Fields that configs of older checkpoints may hold and this release no longer has (the loader's
# shuffle buffer went with epoch permutations): dropped when such a checkpoint is loaded.
RETIRED_FIELDS = ("data.shuffle_buffer",)


def from_checkpoint(cls: type[T], data: dict[str, Any]) -> T:
    """A checkpoint's config: from_dict, less the retired fields an older release wrote."""
    data = copy.deepcopy(data)
    for dotted in RETIRED_FIELDS:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return from_dict(cls, data)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """["model.layers=4", "optim.lr=3e-4"] applied to a copy of cfg, each checked by field type."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: write FIELD=VALUE, e.g. model.layers=4")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: unknown field {key!r}")
        node[leaf] = value
    return from_dict(type(cfg), data)


@dataclass(frozen=True)
class Setting:
    """A leaf field of a config as a command line sees it."""

    path: str  # dotted, as overrides name it: "model.layers"
    kinds: tuple[Any, ...]  # the types it accepts (_options): (int, NoneType), (Literal["cpu", "gpu"],), ...
    value: Any  # in the config it was read from: that command's default
    help: str
    flag: str | None  # "--layers"; None: set with --set only
    metavar: str | None


def settings(cfg: Any, prefix: str = "") -> list[Setting]:
    """Every leaf field of the config `cfg`, its sections' fields under dotted paths, in order."""
    found: list[Setting] = []
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            found += settings(value, f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        flag = f"--{f.name.replace('_', '-')}" if meta.get("flag") is True else meta.get("flag") or None
        found.append(
            Setting(prefix + f.name, _options(hints[f.name]), value, meta.get("help", ""), flag, meta.get("metavar"))
        )
    return found
