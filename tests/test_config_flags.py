"""The train commands' flags are built from the configs' fields: each flag sets its field and no
other, shows that field's default, and a field declared with a flag is a flag; choice fields refuse
a value outside their Literal by name."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from deeprecognition.cli.flags import add_flags, given_flags
from deeprecognition.config import (
    GAN_PRESETS,
    ClassifierConfig,
    GanConfig,
    apply_overrides,
    from_dict,
    option,
    settings,
    to_dict,
)

from .test_cli import config_flags, run_cli

BASES = {"classifier": ClassifierConfig(), "gan": GAN_PRESETS["paper-gan"]()}
# Values the configs' checks accept where the generic one (below) would not, and the flags a value
# needs beside it; a new flag whose generic value the config refuses fails here until listed.
VALUES = {
    "--task": "paper4",
    "--where": "Male=1",
    "--weights": "none",
    "--threshold": "0.25",
    "--condition-attributes": "stgan13",
    "--eval-control": "Male",
}
NEEDS = {
    "--gpu-type": ["--gpu"],
    "--fid-features": ["--classifier", "ckpt"],
    "--eval-control": ["--conditional", "--classifier", "ckpt"],
}


def flat(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in document.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


def another_value(action: argparse.Action, current: Any) -> list[str]:
    """The command-line words that set this flag's field to a value other than `current`."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch
        return [flag]
    if flag in VALUES:
        return [flag, VALUES[flag]]
    if action.choices:
        return [flag, next(c for c in action.choices if c != current)]
    if action.type is int:
        return [flag, str((current or 0) + 1)]
    if action.type is float:
        return [flag, str(current / 2 if current else 0.5)]
    return [flag, f"changed-{current}"]


FLAGS = [(job, action) for job in BASES for action in config_flags(job)]


@pytest.mark.parametrize(("job", "action"), FLAGS, ids=[f"{job}{a.option_strings[0]}" for job, a in FLAGS])
def test_each_train_flag_sets_its_field_and_no_other(job, action, capsys):
    before = flat(to_dict(BASES[job]))
    assert action.dest in before, f"{action.option_strings[0]} names no config field"
    words = another_value(action, before[action.dest])
    needs = NEEDS.get(words[0], [])
    code, out, err = run_cli(capsys, "train", job, *words, *needs, "--dry-run")
    assert code == 0, err
    after = flat(json.loads(out))
    changed = {key for key in before if after[key] != before[key]}
    flags_of = {a.dest: a.option_strings[0] for _, a in FLAGS}
    assert changed - {action.dest} <= {f for f, flag in flags_of.items() if flag in needs}
    assert action.dest in changed
    expected = True if action.nargs == 0 else (action.type or str)(words[1])
    assert after[action.dest] == expected


def test_every_flag_of_today_is_still_there():
    """README's and the tests' spellings."""
    placement = {"--num-workers", "--gpu", "--max-failures", "--elastic", "--start-timeout", "--gpu-type", "--spread"}
    common = {"--data", "--batch-size", "--checkpoint-every", "--storage", "--name"} | placement
    expected = {
        "classifier": common | {"--task", "--model", "--layers", "--freeze", "--weights", "--epochs", "--lr"},
        "gan": common
        | {"--where", "--arch", "--loss", "--latent", "--iterations", "--mosaic-every", "--where-classifier"}
        | {"--threshold", "--eval-every", "--classifier", "--inception-weights", "--eval-samples"},
    }
    expected["classifier"].add("--steps-per-epoch")
    for job, flags in expected.items():
        assert flags <= {a.option_strings[0] for a in config_flags(job)}, job


@pytest.mark.parametrize("job", BASES)
def test_the_help_shows_each_fields_default_in_the_commands_base_config(job):
    values = flat(to_dict(BASES[job]))
    for action in config_flags(job):
        value = values[action.dest]
        if isinstance(value, bool) or value in (None, ""):
            assert "[default" not in action.help, action.option_strings
        else:
            assert action.help.endswith(f"[default: {value}]"), (action.option_strings, action.help)
    gan = {a.option_strings[0]: a.help for a in config_flags("gan")}
    assert gan["--batch-size"].endswith("[default: 16]")  # paper-gan's, not the classifier's 64


def test_the_help_lists_the_fields_without_a_flag(capsys):
    with pytest.raises(SystemExit):
        run_cli(capsys, "train", "classifier", "--help")
    out = capsys.readouterr().out
    assert "model.dense=128" in out and "cnn: units of the one dense layer" in out
    assert "data.sampling=epoch" in out and "--layers LAYERS" in out


def test_every_config_field_says_what_it_is_for():
    for cfg in (ClassifierConfig(), GanConfig()):
        assert [s.path for s in settings(cfg) if not s.help] == []


@pytest.mark.parametrize(
    ("kind", "override", "message"),
    [
        (ClassifierConfig, "model.freeze=half", "model.freeze must be one of all, none, paper, got 'half'"),
        (ClassifierConfig, "model.name=vgg", "model.name must be one of cnn, resnet50, got 'vgg'"),
        (ClassifierConfig, "data.sampling=shuffle", "data.sampling must be one of epoch, resample, got 'shuffle'"),
        (GanConfig, "model.arch=stylegan", "model.arch must be one of paper, dcgan, resnet, got 'stylegan'"),
        (GanConfig, "optim.optimizer=sgd", "optim.optimizer must be one of rmsprop, adam, got 'sgd'"),
    ],
)
def test_a_choice_field_refuses_a_value_outside_its_literal_by_name(kind, override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(kind(), [override])
    field_name, _, value = override.partition("=")
    section, leaf = field_name.split(".")
    with pytest.raises(ValueError, match=message):  # a worker's from_dict too
        from_dict(kind, {section: {leaf: value}})


def test_a_bad_choice_on_the_command_line_is_one_line_naming_the_field(capsys):
    code, _, err = run_cli(capsys, "train", "gan", "--set", "model.loss=wasserstein", "--dry-run")
    assert code == 2 and "model.loss must be one of bce, hinge, got 'wasserstein'" in err


# ----- the builder on a dataclass of its own -------------------------------------------------


@dataclass(kw_only=True)
class Inner:
    depth: int = option(2, "how deep", flag=True)
    mode: Literal["a", "b"] = option("a", "which way", flag=True)
    quiet: bool = option(False, "say nothing", flag="--hush")
    cap: int | None = option(None, "at most", flag=True, metavar="N")
    hidden: float = option(0.5, "set with --set only")


@dataclass(kw_only=True)
class Tiny:
    label: str = option("t", "what to call it", flag=True)
    inner: Inner = field(default_factory=Inner)


def tiny_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.set_defaults(config_fields=add_flags(parser, Tiny(), overrides=True))
    return parser


def test_a_field_declared_with_a_flag_becomes_that_flag():
    parser = tiny_parser()
    assert parser.get_default("config_fields") == ("label", "inner.depth", "inner.mode", "inner.quiet", "inner.cap")
    args = parser.parse_args(["--depth", "0", "--hush", "--mode", "b", "--cap", "7"])
    overrides = given_flags(args)
    assert overrides == ["inner.depth=0", "inner.mode=b", "inner.quiet=True", "inner.cap=7"]
    assert to_dict(apply_overrides(Tiny(), overrides))["inner"] == {
        "depth": 0,
        "mode": "b",
        "quiet": True,
        "cap": 7,
        "hidden": 0.5,
    }
    assert given_flags(parser.parse_args([])) == []
    helps = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert helps["--depth"].help == "how deep [default: 2]"
    assert helps["--cap"].metavar == "N" and helps["--cap"].type is int
    assert helps["--mode"].choices == ("a", "b")
    assert "--hidden" not in helps
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--mode", "c"])


@dataclass(kw_only=True)
class Unflaggable:
    z: complex = option(1j, "no command-line form", flag=True)


@dataclass(kw_only=True)
class StuckOn:
    on: bool = option(True, "a switch could never turn it off", flag=True)


@pytest.mark.parametrize("options", [Unflaggable(), StuckOn()])
def test_a_field_that_cannot_be_a_flag_is_refused_when_the_parser_is_built(options):
    with pytest.raises(TypeError, match="no flag for a field"):
        add_flags(argparse.ArgumentParser(), options)
