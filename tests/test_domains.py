"""Domain packs and the data-source kit: one registry row per pack, nothing else enumerates domains, and task
configs written before the packs moved (old `_target_` paths, in stored run directories) build the same tasks."""

from __future__ import annotations

import ast
from pathlib import Path

from omegaconf import OmegaConf

import nvila_ft
from nvila_ft.commands.common import build
from nvila_ft.data.kit import DataSource
from nvila_ft.domains.registry import DOMAINS, GENERATORS, METRICS, SOURCES
from nvila_ft.legacy_targets import MOVED_TARGETS, current_targets

PACKAGE = Path(nvila_ft.__file__).parent
PACKS = PACKAGE / "domains"

# The demo task and a mixture as task YAMLs named them before the domain packs (tasks/demo.yaml, pretrain_tiny.yaml).
OLD_TASK = """
_target_: nvila_ft.data.task.Task
name: demo_shapes
train:
  _target_: nvila_ft.data.sources.Mixture
  sources:
    - {_target_: nvila_ft.data.builtin.BuiltinData, dataset: shapes, num_records: 12, seed: 0, cache_dir: CACHE}
    - {_target_: nvila_ft.data.builtin.BuiltinData, dataset: scan, num_records: 8, seed: '${seed}', cache_dir: CACHE}
validation: {path: null, media_root: null}
val_fraction: 0.25
metrics: [accuracy, closed_accuracy]
"""


def _task_config(text: str, cache: Path):
    return OmegaConf.create({"seed": 3, "task": OmegaConf.create(text.replace("CACHE", str(cache)))})


def test_old_targets_build_the_same_task_and_records(tmp_path):
    old = _task_config(OLD_TASK, tmp_path)
    new_text = OLD_TASK
    for before, after in MOVED_TARGETS.items():
        new_text = new_text.replace(before, after)
    assert "nvila_ft.data.task" not in new_text and "nvila_ft.domains.builtin.BuiltinData" in new_text
    new = _task_config(new_text, tmp_path)
    old_task, new_task = build(old, "task"), build(new, "task")
    assert type(old_task) is type(new_task) and type(old_task).__module__ == "nvila_ft.domains.task"
    assert [type(s) for s in old_task.train.sources] == [type(s) for s in new_task.train.sources]
    old_data, new_data = old_task.load(seed=3), new_task.load(seed=3)
    assert old_data.train == new_data.train and old_data.validation == new_data.validation
    assert len(old_data.train) + len(old_data.validation) == 20
    # the stored config itself is left as it was written; interpolations still resolve against it
    assert old.task._target_ == "nvila_ft.data.task.Task" and old_task.train.sources[1].seed == 3


def test_the_rewrite_reaches_lists_and_leaves_other_targets_alone():
    node = OmegaConf.create({"a": {"_target_": "nvila_ft.data.sources.LlavaJson", "path": "???"},
                             "b": [{"c": {"_target_": "nvila_ft.data.medical.MedicalVQA"}}, 1, "x"],
                             "d": {"_target_": "my.own.Source"}})
    rewritten = current_targets(node)
    assert rewritten.a._target_ == "nvila_ft.data.llava.LlavaJson" and OmegaConf.is_missing(rewritten.a, "path")
    assert rewritten.b[0].c._target_ == "nvila_ft.domains.medical.sources.MedicalVQA"
    assert rewritten.d._target_ == "my.own.Source"
    assert current_targets(None) is None


def test_every_moved_target_exists_and_every_task_yaml_names_current_paths():
    from hydra.utils import get_object

    for new in MOVED_TARGETS.values():
        assert get_object(new) is not None
    for file in (PACKAGE.parent / "tasks").glob("*.yaml"):
        assert not any(old in file.read_text() for old in MOVED_TARGETS), file


def test_each_pack_folder_is_one_registry_row():
    folders = {p.name for p in PACKS.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == {domain.name for domain in DOMAINS}
    assert {"closed_accuracy", "action_exact_match", "iou_accuracy", "exact_match"} <= set(METRICS)
    assert {"shapes", "scan", "robot_video", "grounding", "preference"} <= set(GENERATORS)


def test_every_package_ships_in_the_wheel():
    """pyproject lists its packages (conf/, tasks/ and adapters/ ship under other names): every folder of nvila_ft
    with an __init__.py, a new domain pack or the method modules among them, must be listed or the wheel lacks it."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(init.parent.relative_to(PACKAGE.parent).parts) for init in PACKAGE.rglob("__init__.py")}
    assert {f"nvila_ft.domains.{domain.name}" for domain in DOMAINS} <= folders
    assert sorted(folders - listed) == []


def test_only_the_registry_enumerates_domains():
    """Adding a domain is a folder and a registry row: the data floor, the generic metrics and the domains floor's
    shared modules (tasks, built-in data, baselines, scoring) import no pack; only registry.py does."""
    packs = tuple(f"nvila_ft.domains.{domain.name}" for domain in DOMAINS)
    generic = [PACKAGE / "metrics.py", *sorted((PACKAGE / "data").glob("*.py")), *sorted(PACKS.glob("*.py"))]
    importers = set()
    for path in generic:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(packs):
                importers.add(path.name)
    assert importers == {"registry.py"}


def test_registered_sources_follow_the_data_source_protocol():
    for source in SOURCES:
        for name in ("records", "subset_files", "write_subset"):
            assert callable(getattr(source, name, None)), (source, name)
    assert {"records", "subset_files", "write_subset"} <= set(DataSource.__dict__)
