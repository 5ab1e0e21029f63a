"""The official NVILA `config.json` (model_type "llava_llama"), read as data.

Every original key is kept in `raw` so that a saved checkpoint carries the same top-level config back;
the properties below give the values the forward pass needs, with the official class defaults where a
released config omits a key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from nvila_ft.errors import UserError

# Official `image_encoder` / `video_encoder` targets (hydra `_target_` strings in the checkpoint) mapped
# to the names of our own encoders.
ENCODER_TARGETS = {
    "BasicImageEncoder": "image",
    "BasicVideoEncoder": "video",
    "TSPVideoEncoder": "tsp_video",
}
DEFAULT_IMAGE_ENCODER = {"_target_": "llava.model.encoders.BasicImageEncoder"}
DEFAULT_VIDEO_ENCODER = {"_target_": "llava.model.encoders.BasicVideoEncoder"}

# Projector types whose first module is a k x k spatial-to-channel block, with their k.
STC_PROJECTORS = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
IMAGE_MODES = ("dynamic_s2", "dynamic", "resize", "pad", "default")


class CheckpointError(UserError, ValueError):
    """A directory or config that is not a loadable NVILA checkpoint; the message names the file and field."""


@dataclass(frozen=True)
class EncoderSpec:
    """One media encoder from the config: `kind` in {"image", "video", "tsp_video"} and its arguments."""

    kind: str
    start_tokens: str | None = None
    end_tokens: str | None = "\n"
    sep_tokens: str | None = None
    pool_sizes: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def parse(cls, value: Any, key: str) -> "EncoderSpec":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"config.json: `{key}` is not valid JSON ({err}): {value!r}") from None
        if not isinstance(value, dict) or "_target_" not in value:
            raise CheckpointError(f"config.json: `{key}` must be a dict with `_target_`, got {value!r}")
        name = str(value["_target_"]).rsplit(".", 1)[-1]
        if name not in ENCODER_TARGETS:
            raise CheckpointError(
                f"config.json: `{key}._target_` = {value['_target_']!r} is not a known NVILA encoder "
                f"(known: {', '.join(ENCODER_TARGETS)})"
            )
        kind = ENCODER_TARGETS[name]
        unknown = set(value) - {"_target_", "start_tokens", "end_tokens", "sep_tokens", "pool_sizes"}
        if unknown:
            raise CheckpointError(f"config.json: `{key}` has unknown arguments {sorted(unknown)}")
        pools = tuple(tuple(int(p) for p in size) for size in value.get("pool_sizes", ()))
        if kind == "tsp_video" and (not pools or any(len(p) != 3 or min(p) < 1 for p in pools)):
            raise CheckpointError(f"config.json: `{key}.pool_sizes` must be a list of [t, h, w] >= 1, got {pools}")
        return cls(
            kind=kind,
            start_tokens=value.get("start_tokens"),
            end_tokens=value.get("end_tokens", "\n"),
            sep_tokens=value.get("sep_tokens"),
            pool_sizes=pools,
        )


@dataclass
class NVILAConfig:
    """Top-level config plus the three sub-folder configs, each exactly as read from disk."""

    raw: dict[str, Any]
    llm: dict[str, Any]
    vision_tower: dict[str, Any]
    mm_projector: dict[str, Any]
    preprocessor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- media layout
    @property
    def image_aspect_ratio(self) -> str:
        mode = self.raw.get("image_aspect_ratio") or "default"
        return mode if mode in IMAGE_MODES else "default"

    @property
    def dynamic_s2(self) -> bool:
        return bool(self.raw.get("dynamic_s2", False))

    @property
    def s2_scales(self) -> list[int]:
        scales = self.raw.get("s2_scales")
        if scales is None:
            return []
        if isinstance(scales, str):
            scales = [s for s in scales.split(",") if s.strip()]
        return sorted(int(s) for s in scales)

    @property
    def s2_min_tiles(self) -> int:
        """The fewest tiles a Dynamic-S2 image takes at its largest scale: that scale's grid over the smallest."""
        scales = self.s2_scales
        return (scales[-1] // scales[0]) ** 2 if self.dynamic_s2 and scales else 1

    @property
    def s2_resize_output_to_scale_idx(self) -> int:
        return int(self.raw.get("s2_resize_output_to_scale_idx", 0) or 0)

    @property
    def min_tiles(self) -> int:
        return int(self.raw.get("min_tiles") or 1)

    @property
    def max_tiles(self) -> int:
        return int(self.raw.get("max_tiles") or 12)

    @property
    def llm_context(self) -> tuple[str, int] | None:
        """The LLM's context as llm/config.json gives it: (the key it is under, its value), or None."""
        for key in ("model_max_length", "tokenizer_model_max_length", "max_position_embeddings"):
            if self.llm.get(key):
                return key, int(self.llm[key])
        return None

    @property
    def num_video_frames(self) -> int:
        return int(self.raw.get("num_video_frames") or 8)

    @property
    def fps(self) -> float:
        return float(self.raw.get("fps") or 0.0)

    @property
    def image_encoder(self) -> EncoderSpec:
        return EncoderSpec.parse(self.raw.get("image_encoder") or DEFAULT_IMAGE_ENCODER, "image_encoder")

    @property
    def video_encoder(self) -> EncoderSpec:
        return EncoderSpec.parse(self.raw.get("video_encoder") or DEFAULT_VIDEO_ENCODER, "video_encoder")

    # ----------------------------------------------------------------- vision tower
    @property
    def tile_size(self) -> int:
        """Side of one square tile fed to the vision tower (448 for the released models)."""
        return int(self.vision_tower["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision_tower["patch_size"])

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision_tower["hidden_size"])

    @property
    def select_layer(self) -> int:
        return int(self.raw.get("mm_vision_select_layer", -2))

    @property
    def vision_layers_used(self) -> int:
        """SigLIP encoder layers that run: those up to the selected one (26 of 27 with the official -2)."""
        layers = int(self.vision_tower["num_hidden_layers"])
        return self.select_layer % (layers + 1) if self.select_layer < 0 else self.select_layer

    @property
    def select_feature(self) -> str:
        return self.raw.get("mm_vision_select_feature") or "patch"

    # ----------------------------------------------------------------- projector / llm
    @property
    def projector_type(self) -> str:
        return self.mm_projector.get("mm_projector_type") or self.raw.get("mm_projector_type", "")

    @property
    def stc_factor(self) -> int:
        """k of the k x k spatial-to-channel block (1 when the projector has none)."""
        return STC_PROJECTORS.get(self.projector_type, 1)

    @property
    def mm_hidden_size(self) -> int:
        """Projector input width: SigLIP width times the number of S2 scales that are concatenated."""
        return self.vision_hidden_size * (len(self.s2_scales) if self.dynamic_s2 else 1)

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def hidden_size(self) -> int:
        """The LLM width (what DeepSpeed's "auto" bucket sizes are computed from)."""
        return self.llm_hidden_size

    @property
    def vocab_size(self) -> int:
        return int(self.llm["vocab_size"])

    @property
    def tokens_per_tile(self) -> int:
        """LLM positions produced by one tile before the end token: ceil(n/k)^2 for n x n patches."""
        side = math.ceil(self.patches_per_side / self.stc_factor)
        return side * side

    @property
    def model_dtype(self) -> torch.dtype:
        name = str(self.raw.get("model_dtype") or self.llm.get("torch_dtype") or "torch.bfloat16")
        name = name.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"config.json: `model_dtype` = {name!r} is not a torch dtype")
        return dtype

    @property
    def chat_template(self) -> str | None:
        return self.raw.get("chat_template")

    @property
    def time_token_ids(self) -> list[int]:
        return list(self.raw.get("time_token_ids") or [])

    @property
    def soft_ce_std(self) -> float:
        return float(self.raw.get("soft_ce_std", 1.0) or 1.0)

    @property
    def family(self) -> str:
        """Human-readable family name, derived from the layout (never from a model name)."""
        if self.dynamic_s2:
            return "NVILA (Dynamic-S2)"
        if self.image_aspect_ratio == "dynamic":
            return "NVILA-Lite (dynamic tiles)"
        if self.video_encoder.kind == "tsp_video":
            return "NVILA-Video (temporal pooling)"
        return f"NVILA ({self.image_aspect_ratio} images)"

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise CheckpointError for a config this implementation would run wrongly."""
        arch = " ".join(self.vision_tower.get("architectures") or [self.vision_tower.get("model_type", "")])
        if "siglip" not in arch.lower():
            raise CheckpointError(f"vision_tower/config.json: only SigLIP towers are supported, got {arch!r}")
        if self.llm.get("model_type") != "qwen2":
            raise CheckpointError(
                f"llm/config.json: `model_type` is {self.llm.get('model_type')!r}; NVILA uses a Qwen2 LLM ('qwen2')"
            )
        for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            if key not in self.vision_tower:
                raise CheckpointError(f"vision_tower/config.json: missing `{key}`")
        for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
            if key not in self.llm:
                raise CheckpointError(f"llm/config.json: missing `{key}`")
        if self.tile_size % self.patch_size:
            raise CheckpointError("vision_tower/config.json: `image_size` must be a multiple of `patch_size`")
        if self.select_feature != "cls_patch":
            raise CheckpointError(
                f"config.json: `mm_vision_select_feature` = {self.select_feature!r}; SigLIP has no CLS token, so only "
                "'cls_patch' (keep every patch token) gives a square token grid"
            )
        layers = int(self.vision_tower["num_hidden_layers"])
        if not -(layers + 1) <= self.select_layer <= layers:
            raise CheckpointError(
                f"config.json: `mm_vision_select_layer` = {self.select_layer} is outside the tower's {layers} layers"
            )
        resolution = self.raw.get("vision_resolution", -1)
        if resolution not in (None, -1, self.tile_size):
            raise CheckpointError(
                f"config.json: `vision_resolution` = {resolution} (position-embedding resizing) is not supported"
            )
        if self.raw.get("s2"):
            raise CheckpointError("config.json: static S2 (`s2: true`) is not used by NVILA and is not supported")
        known = set(STC_PROJECTORS) | {"linear", "identity"}
        if self.projector_type not in known and not _is_mlp_gelu(self.projector_type):
            raise CheckpointError(
                f"mm_projector/config.json: `mm_projector_type` = {self.projector_type!r} is not supported "
                f"(supported: {', '.join(sorted(known))}, mlp<N>x_gelu)"
            )
        if self.dynamic_s2:
            scales = self.s2_scales
            if len(scales) < 2 or any(s % scales[0] for s in scales):
                raise CheckpointError(f"config.json: `s2_scales` must be multiples of the smallest scale, got {scales}")
            if scales[0] != self.tile_size:
                raise CheckpointError(
                    f"config.json: the smallest S2 scale ({scales[0]}) must equal the tower's tile size ({self.tile_size})"
                )
            if not -len(scales) <= self.s2_resize_output_to_scale_idx < len(scales):
                raise CheckpointError("config.json: `s2_resize_output_to_scale_idx` is outside `s2_scales`")
        if self.image_aspect_ratio == "dynamic_s2" and not self.dynamic_s2:
            raise CheckpointError("config.json: `image_aspect_ratio` is 'dynamic_s2' but `dynamic_s2` is not true")
        if self.min_tiles < 1 or self.max_tiles < self.min_tiles:
            raise CheckpointError(f"config.json: need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        self.image_encoder, self.video_encoder  # noqa: B018 - parse now so errors surface at load

    def to_dict(self) -> dict[str, Any]:
        """The top-level config.json as read (every original key, in order)."""
        return dict(self.raw)


def _is_mlp_gelu(name: str) -> bool:
    return name.startswith("mlp") and name.endswith("x_gelu") and name[3:-6].isdigit()
