"""Named NVILA architectures, built locally from a seed (no download).

Tiny presets (test fixtures and the demo) keep every architectural piece of a released family at toy
width; full-size presets have the released dimensions, for benchmarks and shape checks with random weights.

| preset            | mirrors          | images                          | projector               | video / lm_head      |
|-------------------|------------------|---------------------------------|-------------------------|----------------------|
| nvila-8b-tiny     | NVILA-8B         | Dynamic-S2, scales 32/64/96     | 2x2 STC mlp_downsample  | per frame            |
| nvila-lite-tiny   | NVILA-Lite-2B    | dynamic tiles + thumbnail       | 3x3 STC (4x4 padded 6x6)| per frame, tied head |
| nvila-video-tiny  | NVILA-8B-Video   | resize                          | 2x2 STC _fix            | TSP pooling [[8,1,1]]|
| nvila-8b-small    | NVILA-8B         | Dynamic-S2, scales 64/128/192   | 2x2 STC, 128/256 wide   | per frame (benchmarks)|
| nvila-8b, nvila-15b, nvila-lite-2b, nvila-lite-8b, nvila-lite-15b, nvila-8b-video: the released dimensions (SigLIP-so400m/14@448, Qwen2 / Qwen2.5) |

Configs use the key layout of the released checkpoints (transformers 4.46 style), so a saved preset goes
through exactly the loader a real checkpoint does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.projector import MultimodalProjector
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR, TOKENIZER_FILES
from nvila_ft.model.tokenizer import load_tokenizer

TINY_VOCAB = 2048  # the tiny tokenizer's on-disk size (NVILA's is 151648)
QWEN2_VOCAB = 151648

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
SIGLIP_SO400M_448 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 448, "patch_size": 14}
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": TINY_VOCAB}
# "small but not trivial": wide enough that compute, not per-call overhead, dominates a CPU step (benchmarks)
SMALL_VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 64, "patch_size": 8}
SMALL_LLM = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 8192, "vocab_size": TINY_VOCAB}
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768, "vocab_size": QWEN2_VOCAB}
# Qwen2.5-14B (NVILA-15B / NVILA-Lite-15B: "qwen25-14b" in the released vision_tower's _name_or_path); the
# vocabulary is NVILA's 151648 as for the 8B (inferred: read a real llm/config.json when you have one)
QWEN25_14B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "max_position_embeddings": 32768, "vocab_size": QWEN2_VOCAB, "rms_norm_eps": 1e-05}
QWEN2_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768, "vocab_size": QWEN2_VOCAB}


def _s2(tile: int) -> dict[str, Any]:
    return {
        "image_aspect_ratio": "dynamic_s2",
        "dynamic_s2": True,
        "s2_scales": f"{tile},{2 * tile},{3 * tile}",
        "s2_max_split_size": tile,
        "s2_resize_output_to_scale_idx": -1,
    }


LITE = {"image_aspect_ratio": "dynamic", "min_tiles": 1, "max_tiles": 12}
TSP_VIDEO = {
    "image_aspect_ratio": "resize",
    "video_encoder": {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]},
}


@dataclass(frozen=True)
class Preset:
    """A named architecture: the dimensions of its two stock models and NVILA's pieces between them.

    media: the top-level config keys of its image and video handling (Dynamic-S2, tiles, TSP pooling)."""

    vision: dict[str, Any]
    llm: dict[str, Any]
    projector: str
    media: dict[str, Any]
    num_video_frames: int = 8
    tied_lm_head: bool = False
    model_max_length: int = 4096


PRESETS: dict[str, Preset] = {
    "nvila-8b-tiny": Preset(vision=TINY_VISION, llm=TINY_LLM, projector="mlp_downsample", media=_s2(32)),
    "nvila-lite-tiny": Preset(vision=TINY_VISION, llm=TINY_LLM, projector="mlp_downsample_3x3_fix", media=LITE,
                              tied_lm_head=True),
    "nvila-video-tiny": Preset(vision=TINY_VISION, llm=TINY_LLM, projector="mlp_downsample_2x2_fix", media=TSP_VIDEO,
                               num_video_frames=16),
    "nvila-8b-small": Preset(vision=SMALL_VISION, llm=SMALL_LLM, projector="mlp_downsample", media=_s2(64),
                             model_max_length=8192),
    "nvila-8b": Preset(vision=SIGLIP_SO400M_448, llm=QWEN2_7B, projector="mlp_downsample", media=_s2(448),
                       model_max_length=8192),
    "nvila-15b": Preset(vision=SIGLIP_SO400M_448, llm=QWEN25_14B, projector="mlp_downsample", media=_s2(448),
                        model_max_length=8192),
    "nvila-lite-2b": Preset(vision=SIGLIP_SO400M_448, llm=QWEN2_1_5B, projector="mlp_downsample_3x3_fix", media=LITE,
                            tied_lm_head=True),
    "nvila-lite-8b": Preset(vision=SIGLIP_SO400M_448, llm=QWEN2_7B, projector="mlp_downsample_3x3_fix", media=LITE),
    "nvila-lite-15b": Preset(vision=SIGLIP_SO400M_448, llm=QWEN25_14B, projector="mlp_downsample_3x3_fix", media=LITE),
    "nvila-8b-video": Preset(vision=SIGLIP_SO400M_448, llm=QWEN2_7B, projector="mlp_downsample_2x2_fix", media=TSP_VIDEO,
                             num_video_frames=256, model_max_length=16384),
}
TINY_PRESETS = tuple(name for name in PRESETS if name.endswith("-tiny"))


def _llm_config(dims: dict, tied: bool, max_length: int, dtype: str) -> dict[str, Any]:
    vocab = dims["vocab_size"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab - 5,  # <|endoftext|>
        "eos_token_id": vocab - 3,  # <|im_end|>
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": dims["num_hidden_layers"],
        "model_max_length": max_length,
        "model_type": "qwen2",
        "rms_norm_eps": dims.get("rms_norm_eps", 1e-06),
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "tokenizer_model_max_length": max_length,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype,
        "transformers_version": "4.46.0",
        "use_cache": True,
        "use_sliding_window": False,
        **dims,
    }


def _vision_config(dims: dict, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["SiglipVisionModel"],
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model",
        "num_channels": 3,
        "num_image_tokens": (dims["image_size"] // dims["patch_size"]) ** 2,
        "projection_dim": 2048,
        "projector_hidden_act": "gelu_fast",
        "torch_dtype": dtype,
        "transformers_version": "4.46.0",
        "vision_use_head": False,
        **dims,
    }


def _preprocessor_config(tile: int) -> dict[str, Any]:
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": tile, "width": tile},
    }


def preset_config(name: str, dtype: torch.dtype = torch.float32) -> NVILAConfig:
    """The four configs of a preset, as they appear on disk."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    dtype_name = str(dtype).removeprefix("torch.")
    llm = _llm_config(preset.llm, preset.tied_lm_head, preset.model_max_length, dtype_name)
    vision = _vision_config(preset.vision, dtype_name)
    projector = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": preset.projector,
        "model_type": "v2l_projector",
        "torch_dtype": dtype_name,
        "transformers_version": "4.46.0",
    }
    scales = 3 if preset.media.get("dynamic_s2") else 1
    top = {
        "_name_or_path": f"presets/{name}",
        "architectures": ["LlavaLlamaModel"],
        "chat_template": None,
        "drop_path_rate": 0.0,
        "dynamic_s2": False,
        "fps": 0.0,
        "hidden_size": llm["hidden_size"],
        "image_encoder": {"_target_": "llava.model.encoders.BasicImageEncoder"},
        "interpolate_mode": "linear",
        "llm_cfg": copy.deepcopy(llm),
        "max_tiles": 12,
        "min_tiles": 1,
        "mm_hidden_size": vision["hidden_size"] * scales,
        "mm_projector_cfg": copy.deepcopy(projector),
        "mm_projector_lr": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "cls_patch",
        "mm_vision_select_layer": -2,
        "model_dtype": str(dtype),
        "model_type": "llava_llama",
        "num_time_tokens": 0,
        "resume_path": None,
        "s2": False,
        "soft_ce_std": 1.0,
        "time_token_format": "<t{t}>",
        "time_token_ids": [],
        "transformers_version": "4.46.0",
        "tune_language_model": True,
        "tune_mm_projector": True,
        "tune_vision_tower": True,
        "video_encoder": {"_target_": "llava.model.encoders.BasicVideoEncoder"},
        "vision_resolution": -1,
        "vision_tower_cfg": copy.deepcopy(vision),
        **copy.deepcopy(preset.media),
        "num_video_frames": preset.num_video_frames,
    }
    preprocessor = _preprocessor_config(vision["image_size"])
    return NVILAConfig(raw=top, llm=llm, vision_tower=vision, mm_projector=projector, preprocessor=preprocessor)


def build_model(
    name: str = "nvila-8b-tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> NVILAForConditionalGeneration:
    """A randomly initialised NVILA of a preset; the same seed gives the same weights.

    device="meta" builds shapes only (no memory), e.g. to check key names of a full-size preset.
    Every preset uses the project's tiny tokenizer; full-size presets keep the real vocabulary size.
    """
    model = build_from_config(preset_config(name, dtype), seed, dtype, device)
    model.name_or_path = f"presets/{name}"
    return model


def build_from_config(
    config: NVILAConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> NVILAForConditionalGeneration:
    """An NVILA of any configuration with random weights (device="meta": shapes only, no memory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    tokenizer.model_max_length = int(config.llm.get("model_max_length") or 4096)
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    llm_config = {k: v for k, v in config.llm.items() if k != "architectures"}
    vision_config = {k: v for k, v in config.vision_tower.items() if k != "architectures"}
    with torch.random.fork_rng(devices=[]), placement:
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM(Qwen2Config(**llm_config, attn_implementation="sdpa"))
        vision = SiglipVisionModel(SiglipVisionConfig(**vision_config, attn_implementation="sdpa"))
        projector = MultimodalProjector(config.projector_type, config.mm_hidden_size, config.llm_hidden_size)
    model = NVILAForConditionalGeneration(
        config, llm.to(dtype), vision.to(dtype), projector.to(dtype), tokenizer, _extra_files(config)
    )
    return model.eval()


def _extra_files(config: NVILAConfig) -> dict[str, bytes]:
    """Tokenizer, generation and image-processor files of a preset checkpoint."""
    files = {f"llm/{name}": (TINY_TOKENIZER_DIR / name).read_bytes() for name in TOKENIZER_FILES}
    generation = {"bos_token_id": config.llm["bos_token_id"], "eos_token_id": config.llm["eos_token_id"], "transformers_version": "4.46.0"}
    files["llm/generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()
    files["vision_tower/preprocessor_config.json"] = (json.dumps(config.preprocessor, indent=2) + "\n").encode()
    return files


def save_preset_checkpoint(
    path: str | os.PathLike, name: str = "nvila-8b-tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Build a preset and write it in the official checkpoint layout."""
    return build_model(name, seed).save_pretrained(path, overwrite=overwrite)
