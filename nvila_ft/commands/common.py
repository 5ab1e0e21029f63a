"""What the commands share: building config objects from the Hydra configuration, a run's configuration as it
ran, and running a training recipe on them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nvila_ft.legacy_targets import current_targets
from nvila_ft.recipes.base import Recipe, RunConfig
from nvila_ft.training.config import ConfigError

log = logging.getLogger("nvila_ft")


def build(cfg: DictConfig, where: str) -> Any:
    """Instantiate the config node `cfg.<where>` (`_target_` + arguments); None or an empty node
    (`adapters=none`) is None. Values are checked against the built object's annotations first, and a
    constructor's own ValueError/TypeError becomes a ConfigError naming the node."""
    node = current_targets(cfg.get(where))  # a run made by an earlier version may name moved classes
    if node is None or len(node) == 0:
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from nvila_ft.commands.config_types import check_node

    check_node(node, where)
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            message = str(cause)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from cause
        raise


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# the config objects of a training run: RunConfig's field, the section it is built from
RUN_SECTIONS = (("policy", "adapters"), ("precision", "precision"), ("trainer", "trainer"), ("deepspeed", "deepspeed"),
                ("logger", "logger"), ("source", "model"), ("task", "task"), ("data", "data"), ("eval", "eval"))


def run_recipe(cfg: DictConfig, recipe: Callable[..., Recipe], *sections: str) -> float | None:
    """Run a training recipe on this command's configuration (or, with run=<dir>, on that run's own, with this
    command's overrides on top): every config object is built first, then the recipe's own `sections`, in order.
    Returns the recipe's objective (what a sweep optimises)."""
    if cfg.run:
        cfg = run_config(cfg.run, cfg)
    config = RunConfig(run_dir=Path(cfg.run or cfg.run_dir).absolute(), seed=cfg.seed, cpu_threads=cfg.cpu_threads,
                       values=plain(cfg), **{name: build(cfg, where) for name, where in RUN_SECTIONS})
    return recipe(config, *(build(cfg, where) for where in sections)).run()


def run_config(run: str | Path, current: DictConfig) -> DictConfig:
    """A run's configuration as it ran, with this command's own overrides on top.

    The run's `.hydra/config.yaml` holds every group already composed, so a run made with the user's own task or
    policy folder (`hydra.searchpath`) needs nothing outside its directory. Each key this command overrode on
    its command line (a group such as `task=...` or a value such as `eval.max_records=4`) is taken from
    `current`, the configuration Hydra composed for this command.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = Path(run)
    saved_file = run / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"{run}: not an nvila-ft run directory (no .hydra/config.yaml)")
    saved = OmegaConf.load(saved_file)
    choices = _group_choices(run)
    OmegaConf.set_struct(saved, False)
    for override in OverridesParser.create().parse_overrides(cli_overrides()):
        key = override.key_or_group
        if key in ("run", "run_dir") or key.startswith("hydra") or override.package:
            continue
        if key in choices and override.value() == choices[key]:
            continue  # the group the run already used, with the run's own settings of it
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if isinstance(node, DictConfig):
                node.pop(leaf, None)
            continue
        OmegaConf.update(saved, key, OmegaConf.select(current, key), merge=False, force_add=True)
    _add_missing_settings(saved, current, skip=set(choices))
    saved.run, saved.run_dir = str(run), str(run)
    OmegaConf.set_struct(saved, True)
    return saved


def _add_missing_settings(saved: DictConfig, current: DictConfig, skip: set[str]) -> None:
    """Settings a run made by an older nvila-ft lacks (new in this version) get this version's defaults; the
    groups it was composed from (`skip`) are the run's own and are left as they are."""
    for key in current:
        if key in skip:
            continue
        if key not in saved:
            saved[key] = current[key]
        elif isinstance(saved[key], DictConfig) and isinstance(current[key], DictConfig):
            _add_missing_settings(saved[key], current[key], set())


def _group_choices(run: Path) -> dict[str, str]:
    """{group: option} the run was composed from (`task: vqa`, ...), from its `.hydra/hydra.yaml`."""
    hydra_file = run / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices", default=None) or {}
    return {str(k): str(v) for k, v in choices.items()}


def cli_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task]
