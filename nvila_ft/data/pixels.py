"""Turning a tile (PIL image) into the normalised tensor SigLIP expects, as SiglipImageProcessor does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PixelNormalizer:
    """Resize to `size` x `size` (skipped when already that size), rescale to [0, 1], normalise per channel.

    Arithmetic follows transformers' SiglipImageProcessor: rescale in float64 then cast to float32,
    normalise in float32.
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_preprocessor_config(cls, config: dict[str, Any], size: int) -> "PixelNormalizer":
        """Build from `vision_tower/preprocessor_config.json`; `size` is the tile size the model uses."""
        return cls(
            size=size,
            mean=tuple(config.get("image_mean", cls.mean)),
            std=tuple(config.get("image_std", cls.std)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
        )

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """Background of the official `pad` mode: the mean colour, truncated to integers."""
        return tuple(int(m * 255) for m in self.mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=self.resample, reducing_gap=None)
        array = (np.asarray(image, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
