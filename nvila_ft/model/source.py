"""Where a run's base model comes from: a checkpoint directory, or a preset built locally from a seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nvila_ft.model.checkpoint import read_config, resolve_checkpoint
from nvila_ft.model.config import CheckpointError


@dataclass
class ModelSource:
    """path: an official-layout checkpoint (a hub id only when a network is allowed); when it is set the preset
    is ignored, so `model.path=<dir>` works with any model option. preset + seed: a model built locally."""

    path: str | None = None
    preset: str | None = None
    seed: int = 0
    attn_implementation: str = "sdpa"

    def check(self) -> None:
        if self.path is None and self.preset is None:
            raise CheckpointError("set model.path (a checkpoint directory) or model.preset")
        if self.path is None:
            from nvila_ft.model.presets import PRESETS

            if self.preset not in PRESETS:
                raise CheckpointError(f"model.preset = {self.preset!r} is not a preset ({', '.join(PRESETS)})")
        else:
            read_config(resolve_checkpoint(self.path))  # fails now, naming the file, if it is not a checkpoint

    def checkpoint(self, build_dir: str | Path) -> Path:
        """The checkpoint directory; a preset is built into `build_dir` once and reused afterwards."""
        if self.path is not None:
            return resolve_checkpoint(self.path)
        from nvila_ft.model.presets import save_preset_checkpoint

        target = Path(build_dir)
        if not (target / "config.json").is_file():
            try:
                save_preset_checkpoint(target, self.preset, seed=self.seed)
            except OSError:
                # another process of a distributed launch built it at the same moment; its copy is complete
                if not (target / "config.json").is_file():
                    raise
        return target
