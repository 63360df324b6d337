"""Configs: presets build, overrides are type-checked, bad values fail on the driver by name."""

from __future__ import annotations

import pytest

from deeprecognition.config import PRESETS, ClassifierConfig, apply_overrides, from_dict, task_attributes, to_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_validates_and_round_trips(name):
    cfg = PRESETS[name]().validate()
    assert from_dict(ClassifierConfig, to_dict(cfg)) == cfg
    assert cfg.name == name


def test_tasks_resolve_to_attribute_names():
    assert task_attributes("paper4") == ("Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open")
    assert len(task_attributes("all40")) == 40
    assert task_attributes("Male, Smiling") == ("Male", "Smiling")
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Smilling'.*valid names"):
        task_attributes("Male,Smilling")


def test_overrides_are_coerced_by_field_type():
    cfg = apply_overrides(
        ClassifierConfig(),
        ["model.layers=4", "optim.lr=3e-4", "scale.gpu=true", "optim.steps_per_epoch=none", "model.weights=none"],
    )
    assert (cfg.model.layers, cfg.optim.lr, cfg.scale.gpu, cfg.optim.steps_per_epoch) == (4, 3e-4, True, None)
    assert cfg.model.weights == "none"  # a string field keeps the word, an optional one gets None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.layers=four", "model.layers must be int"),
        ("model.depth=3", "unknown field 'model.depth'"),
        ("model=3", "model must be a mapping"),
        ("optim.epochs", "write FIELD=VALUE"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(ClassifierConfig(), [override])


def test_validation_catches_impossible_values_before_any_worker():
    with pytest.raises(ValueError, match="model.layers must be 1..4"):
        apply_overrides(ClassifierConfig(), ["model.layers=7"]).validate()
    with pytest.raises(ValueError, match="unknown config field.*data.tsak"):
        from_dict(ClassifierConfig, {"data": {"tsak": "x"}})
