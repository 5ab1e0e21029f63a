"""Config `_target_`s of earlier nvila-ft versions, rewritten to where those classes live now.

Run directories keep the configuration they ran with (`.hydra/config.yaml`), so a run made before a class moved
still names its old dotted path; `current_targets` rewrites every such `_target_` of a config node before it
is checked and built.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

# old dotted path -> new dotted path
MOVED_TARGETS = {
    "nvila_ft.data.task.Task": "nvila_ft.domains.task.Task",
    "nvila_ft.data.builtin.BuiltinData": "nvila_ft.domains.builtin.BuiltinData",
    "nvila_ft.data.medical.MedicalVQA": "nvila_ft.domains.medical.sources.MedicalVQA",
    "nvila_ft.data.episodes.RobotEpisodes": "nvila_ft.domains.robotics.episodes.RobotEpisodes",
    "nvila_ft.data.referring.GroundingData": "nvila_ft.domains.grounding.referring.GroundingData",
    "nvila_ft.data.preferences.PreferenceJson": "nvila_ft.domains.preference.sources.PreferenceJson",
    "nvila_ft.data.sources.LlavaJson": "nvila_ft.data.llava.LlavaJson",
    "nvila_ft.data.sources.HFDataset": "nvila_ft.data.hf_dataset.HFDataset",
    "nvila_ft.data.sources.TableSource": "nvila_ft.data.tables.TableSource",
    "nvila_ft.data.sources.Mixture": "nvila_ft.data.mixture.Mixture",
    "nvila_ft.commands.plan.PlanOptions": "nvila_ft.training.planning.PlanOptions",
}


def current_targets(node: Any) -> Any:
    """A copy of `node` (a config node; anything else is returned as is) whose `_target_`s, at any depth and in
    lists too, name where their classes live now (`MOVED_TARGETS`); interpolations still resolve against the
    node's parent config."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    node = copy.deepcopy(node)
    with read_write(node):
        _rewrite(node)
    return node


def _rewrite(node: DictConfig | ListConfig) -> None:
    keys = list(node) if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # left for the checks and for Hydra to resolve
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            _rewrite(value)
        elif key == "_target_" and isinstance(node, DictConfig) and value in MOVED_TARGETS:
            node[key] = MOVED_TARGETS[value]
