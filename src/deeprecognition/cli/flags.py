"""Dataclass fields as command-line flags: the fields that declare one (config.option) become
flags typed by their annotations, with their help and default, and the flags given become
`FIELD=VALUE` overrides. `deeprec train` builds its flags from the configs, `deeprec bench` from
BenchOptions."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

from deeprecognition.config import Setting, settings


def add_flags(parser: argparse.ArgumentParser, options: Any, *, overrides: bool = False) -> tuple[str, ...]:
    """A flag for each field of the dataclass `options` that declares one (config.option), grouped
    by section, typed by its annotation, its help ending in the value `options` holds. That value is
    the flag's default, or with `overrides` None: only the flags given become overrides
    (given_flags). Returns the flags' fields, dotted: they are the flags' dests."""
    flags = [s for s in settings(options) if s.flag]
    groups: dict[str, Any] = {"": parser}
    for s in flags:
        section = s.path.rpartition(".")[0]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        default = None if overrides else s.value
        group.add_argument(s.flag, dest=s.path, default=default, help=_flag_help(s), **_flag_kind(s))
    return tuple(s.path for s in flags)


def _flag_kind(s: Setting) -> dict[str, Any]:
    """argparse's action, type, choices and metavar for the field's type; a type without a
    command-line form, or a switch that could only turn on what is on already, is refused here, as
    the parser is built."""
    kinds = [k for k in s.kinds if k is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else None
    metavar = s.metavar or s.flag.removeprefix("--").upper().replace("-", "_")
    if kind is bool and not s.value:
        return {"action": "store_true"}
    if get_origin(kind) is Literal:
        return {"choices": get_args(kind)}
    if get_origin(kind) is tuple:
        return {"type": _comma_list(get_args(kind)[0]), "metavar": "A,B"}
    if kind in (int, float, str):
        return {"type": kind, "metavar": metavar}
    raise TypeError(f"{s.path}: no flag for a field of type {' | '.join(map(str, s.kinds))} defaulting to {s.value!r}")


def _comma_list(kind: type) -> Callable[[str], tuple]:
    """`16,128` as (16, 128): a tuple field's flag."""

    def parse(text: str) -> tuple:
        return tuple(kind(item) for item in text.split(","))

    parse.__name__ = f"comma list of {kind.__name__}"  # argparse's "invalid ... value" names it
    return parse


def _flag_help(s: Setting) -> str:
    """The field's help and, unless it is a switch or unset, its value (argparse %-formats help)."""
    text = s.help.replace("%", "%%")
    if isinstance(s.value, bool) or s.value in (None, ""):
        return text
    return f"{text} [default: {','.join(map(str, s.value)) if isinstance(s.value, tuple) else s.value}]"


def set_only_fields(cfg: Any) -> str:
    """The fields of `cfg` without a flag, each with its value and help: train's epilog."""
    lines = ["fields without a flag, each set with --set FIELD=VALUE (shown with its default):"]
    for s in (s for s in settings(cfg) if not s.flag):
        head = f"  {s.path}={'none' if s.value is None else s.value}".ljust(35) + " "
        lines.append(textwrap.fill(s.help, width=118, initial_indent=head, subsequent_indent=" " * 36))
    return "\n".join(lines)


def given_flags(args: argparse.Namespace) -> list[str]:
    """FIELD=VALUE for each config flag on the command line. An absent flag, a switch too, is None;
    0 and "" are values, and whether the config accepts them is for its validate() to say."""
    return [f"{path}={value}" for path in args.config_fields if (value := getattr(args, path)) is not None]
