"""Typed run configs: each field declared once (type, default, help, flag), the study's experiments
as presets, `--a.b=v` overrides checked by type. This package's names are the one config API:

- `fields`: how a field is declared (`option`), checked (`from_dict`) and overridden;
- `sections`: what both tasks share (run storage, the loader settings, scale);
- `classifier`, `gan`: each task's config and presets.
"""

from deeprecognition.config.classifier import (
    PRESETS,
    TASKS,
    ClassifierConfig,
    DataConfig,
    Freeze,
    ModelConfig,
    ModelName,
    OptimConfig,
    paper_cnn,
    paper_multilabel,
    paper_transfer,
    preset,
    task_attributes,
)
from deeprecognition.config.fields import (
    RETIRED_FIELDS,
    Setting,
    apply_overrides,
    check_fields,
    from_checkpoint,
    from_dict,
    option,
    settings,
    to_dict,
    with_default,
)
from deeprecognition.config.gan import (
    GAN_PRESETS,
    Arch,
    GanConfig,
    GanDataConfig,
    GanEvalConfig,
    GanLoss,
    GanModelConfig,
    GanOptimConfig,
    GanOptimizer,
    GanScheduleConfig,
    modern_dcgan,
    paper_gan,
)
from deeprecognition.config.sections import LoaderSettings, RunSettings, ScaleConfig, check_cache_and_decode

__all__ = [
    "GAN_PRESETS",
    "PRESETS",
    "RETIRED_FIELDS",
    "TASKS",
    "Arch",
    "ClassifierConfig",
    "DataConfig",
    "Freeze",
    "GanConfig",
    "GanDataConfig",
    "GanEvalConfig",
    "GanLoss",
    "GanModelConfig",
    "GanOptimConfig",
    "GanOptimizer",
    "GanScheduleConfig",
    "LoaderSettings",
    "ModelConfig",
    "ModelName",
    "OptimConfig",
    "RunSettings",
    "ScaleConfig",
    "Setting",
    "apply_overrides",
    "check_cache_and_decode",
    "check_fields",
    "from_checkpoint",
    "from_dict",
    "modern_dcgan",
    "option",
    "paper_cnn",
    "paper_gan",
    "paper_multilabel",
    "paper_transfer",
    "preset",
    "settings",
    "task_attributes",
    "to_dict",
    "with_default",
]
