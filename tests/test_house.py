"""The house's rules, checked on the source: imports run one way (cli at the top, errors at the
bottom), the run plumbing knows no task, the classifier knows no GAN, and no module or function
grows past what one reader holds in mind. Figures: `python tests/house.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

from .house import Module, arrows, read_modules, room, rooms

# Top to bottom; a room may import only rooms below it. `gan` sits above `classifier` because a
# GAN run may use a trained classifier (judge, filter, FID features); never the other way round.
LAYERS = (
    ("__main__",),
    ("cli",),
    ("bench",),
    ("sweep",),
    ("launch",),
    ("gan",),
    ("classifier",),
    ("runs",),
    ("config",),
    ("shards",),
    ("celeba",),
    ("raycluster", "storage"),
    ("errors",),
)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    return read_modules()


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_every_room_has_a_layer(modules):
    layered = {name for layer in LAYERS for name in layer}
    assert rooms(modules) - layered == set(), "a new top-level module or package: give it a place in LAYERS"


def test_imports_run_downward(modules):
    upward = sorted((src, to) for src, to in arrows(modules) if layer_of(to) <= layer_of(src))
    assert upward == [], f"imports against the layering (from, to): {upward}"


def test_no_cycle_between_modules(modules):
    """Within a room too: two modules importing each other (even under TYPE_CHECKING) mean one
    concern split in two, or a third module missing."""
    imports = {m.name: m.imports for m in modules}
    pairs = sorted((a, b) for a, deps in imports.items() for b in deps if a < b and a in imports.get(b, ()))
    assert pairs == []


def test_run_plumbing_knows_no_task(modules):
    runs = [m for m in modules if m.room == "runs"]
    assert runs, "runs/ moved: update this test"
    leaks = sorted((m.name, dep) for m in runs for dep in m.imports if room(dep) in ("classifier", "gan"))
    assert leaks == []


def test_modules_and_functions_stay_small(modules):
    test_modules = read_modules(TESTS)
    too_long = sorted((m.name, m.lines) for m in modules + test_modules if m.lines > MAX_MODULE_LINES)
    too_many = sorted(
        (f.where, f.lines) for m in modules + test_modules for f in m.functions if f.lines > MAX_FUNCTION_LINES
    )
    assert too_long == [], f"modules over {MAX_MODULE_LINES} lines"
    assert too_many == [], f"functions over {MAX_FUNCTION_LINES} lines"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checker itself: an upward import and a function-level import are both seen."""
    pkg = tmp_path / "deeprecognition"
    (pkg / "runs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runs" / "__init__.py").write_text("")
    (pkg / "runs" / "log.py").write_text("def f():\n    from deeprecognition.classifier import metrics\n")
    (pkg / "errors.py").write_text("from deeprecognition import storage\n")
    found = arrows(read_modules(pkg))
    assert found == {("runs", "classifier"), ("errors", "storage")}
