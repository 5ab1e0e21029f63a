"""Where a run's base model comes from: a checkpoint directory, or a tiny preset (pretrained or random)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from nvila_ft.model.checkpoint import read_config, resolve_checkpoint
from nvila_ft.model.config import CheckpointError


@dataclass
class ModelSource:
    """path: an official-layout checkpoint (a hub id only when a network is allowed); when it is set the preset
    is ignored, so `model.path=<dir>` works with any model option. preset: a named architecture, either with the
    pretrained weights shipped with nvila-ft (`pretrained`, tiny presets) or randomly initialised from `seed`."""

    path: str | None = None
    preset: str | None = None
    pretrained: bool = False
    seed: int = 0
    attn_implementation: str = "sdpa"

    def check(self) -> None:
        if self.path is None and self.preset is None:
            raise CheckpointError("set model.path (a checkpoint directory) or model.preset")
        if self.path is not None:
            read_config(resolve_checkpoint(self.path))  # fails now, naming the file, if it is not a checkpoint
            return
        from nvila_ft.model.presets import PRESETS

        if self.preset not in PRESETS:
            raise CheckpointError(f"model.preset = {self.preset!r} is not a preset ({', '.join(PRESETS)})")
        if self.pretrained:
            from nvila_ft.model.pretrained import pretrained_checkpoint

            pretrained_checkpoint(self.preset)

    def checkpoint(self, build_dir: str | Path) -> Path:
        """The checkpoint directory. A preset is written into `build_dir` (a run's `base/`) once and reused, so a
        run keeps the exact base its adapters were trained on."""
        if self.path is not None:
            return resolve_checkpoint(self.path)
        target = Path(build_dir)
        if not (target / "config.json").is_file():
            try:
                self._write_preset(target)
            except OSError:
                # another process of a distributed launch wrote it at the same moment; its copy is complete
                if not (target / "config.json").is_file():
                    raise
        return target

    def _write_preset(self, target: Path) -> None:
        if self.pretrained:
            from nvila_ft.atomic import atomic_directory
            from nvila_ft.model.pretrained import pretrained_checkpoint

            with atomic_directory(target) as staging:
                shutil.copytree(pretrained_checkpoint(self.preset), staging, dirs_exist_ok=True)
            return
        from nvila_ft.model.presets import save_preset_checkpoint

        save_preset_checkpoint(target, self.preset, seed=self.seed)
