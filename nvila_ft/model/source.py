"""Where a run's base model comes from: a checkpoint directory, or a tiny preset (pretrained or random)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from nvila_ft.atomic import atomic_directory, atomic_write_json
from nvila_ft.model.checkpoint import read_config, resolve_checkpoint
from nvila_ft.model.config import CheckpointError, NVILAConfig
from nvila_ft.model.settings import ModelSettings, with_settings


@dataclass
class ModelSource(ModelSettings):
    """path: an official-layout checkpoint (a hub id only when a network is allowed); when it is set the preset
    is ignored, so `model.path=<dir>` works with any model option. preset: a named architecture, either with the
    pretrained weights shipped with nvila-ft (`pretrained`, tiny presets) or randomly initialised from `seed`.
    The scale-then-compress knobs (`max_tiles`, ...) are `ModelSettings`' (nvila_ft.model.settings)."""

    path: str | None = None
    preset: str | None = None
    pretrained: bool = False
    seed: int = 0
    attn_implementation: str = "sdpa"

    def config(self) -> NVILAConfig:
        """The configuration the run uses, from config files only (the checkpoint's, or the preset's), with the
        knobs applied and checked."""
        if self.path is not None:
            config = read_config(resolve_checkpoint(self.path))
        else:
            from nvila_ft.model.presets import preset_config  # deferred: presets import the model (transformers)

            config = preset_config(self.preset)
        return with_settings(config, **self.settings())

    def check(self) -> None:
        if self.path is None and self.preset is None:
            raise CheckpointError("set model.path (a checkpoint directory) or model.preset")
        if self.path is None:
            from nvila_ft.model.presets import PRESETS
            from nvila_ft.model.pretrained import pretrained_checkpoint

            if self.preset not in PRESETS:
                raise CheckpointError(f"model.preset = {self.preset!r} is not a preset ({', '.join(PRESETS)})")
            if self.pretrained:
                pretrained_checkpoint(self.preset)
        self.config()  # fails now, naming the file or the setting, if it is not a checkpoint or cannot take a knob

    def checkpoint(self, build_dir: str | Path) -> Path:
        """The checkpoint directory. A preset is written into `build_dir` (a run's `base/`) once and reused, so a
        run keeps the exact base its adapters were trained on. With knobs set, `build_dir` gets the checkpoint's
        folders (linked, not copied) and a config.json carrying them."""
        if self.path is not None and not self.settings():
            return resolve_checkpoint(self.path)
        target = Path(build_dir)
        if not (target / "config.json").is_file():
            try:
                if self.path is not None:
                    self._write_overlay(target)
                else:
                    self._write_preset(target)
            except OSError:
                # another process of a distributed launch wrote it at the same moment; its copy is complete
                if not (target / "config.json").is_file():
                    raise
        elif self.settings():
            built = read_config(target)
            if built.to_dict() != with_settings(built, **self.settings()).to_dict():
                raise CheckpointError(f"{target} was built with other model settings than {self.settings()}; "
                                      "start a new run to change them")
        return target

    def _write_overlay(self, target: Path) -> None:
        """The checkpoint's files linked into `target`, with a config.json that carries this run's knobs."""
        source = resolve_checkpoint(self.path)
        with atomic_directory(target) as staging:
            for entry in source.iterdir():
                if entry.name != "config.json":
                    (staging / entry.name).symlink_to(entry.resolve())
            (staging / "config.json").write_text(json.dumps(self.config().to_dict(), indent=2) + "\n")  # fsynced on exit

    def _write_preset(self, target: Path) -> None:
        from nvila_ft.model.presets import save_preset_checkpoint
        from nvila_ft.model.pretrained import pretrained_checkpoint

        if self.pretrained:
            with atomic_directory(target) as staging:
                shutil.copytree(pretrained_checkpoint(self.preset), staging, dirs_exist_ok=True)
                self._write_settings(staging)
            return
        with atomic_directory(target) as staging:  # the base appears whole, knobs included, or not at all
            save_preset_checkpoint(staging, self.preset, seed=self.seed, overwrite=True)
            self._write_settings(staging)

    def _write_settings(self, folder: Path) -> None:
        if self.settings():
            atomic_write_json(folder / "config.json", with_settings(read_config(folder), **self.settings()).to_dict())
