"""Reading and writing the official NVILA checkpoint layout.

```
<root>/config.json                      top-level "llava_llama" config
<root>/llm/                             Qwen2ForCausalLM (+ tokenizer files, generation_config.json)
<root>/vision_tower/                    SiglipVisionModel (+ preprocessor_config.json)
<root>/mm_projector/                    MultimodalProjector (`layers.<i>.*` keys)
```
Loading is strict (a missing or unexpected weight names itself); saving writes the same file set, key
names, shapes and dtypes, copies tokenizer and processor files byte for byte, and goes through a
temporary directory so that an interrupted save never leaves a loadable half-model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvila_ft.atomic import atomic_directory, write_json
from nvila_ft.model.config import CheckpointError, NVILAConfig
from nvila_ft.model.projector import MultimodalProjector
from nvila_ft.model.vision_tower import drop_unused, unused_keys

COMPONENTS = ("llm", "vision_tower", "mm_projector")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
VISION_PREFIX = "vision_model."
DEFAULT_SHARD_SIZE = "5GB"  # transformers' default when the released checkpoints were written


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local checkpoint directory; a hub id is downloaded only when a network is allowed."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not offline:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text))
    raise CheckpointError(f"{text}: no such checkpoint directory" + (" (HF_HUB_OFFLINE is set)" if offline else ""))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({{...}}), found {type(value).__name__}")
    return value


def read_config(root: str | os.PathLike) -> NVILAConfig:
    """Read and check the four configs of a checkpoint directory."""
    root = Path(root)
    if not (root / "config.json").is_file():
        raise CheckpointError(
            f"{root}: not an NVILA checkpoint (no config.json; expected config.json, llm/, vision_tower/, mm_projector/)"
        )
    raw = _read_json(root / "config.json")
    model_type = raw.get("model_type")
    if model_type != "llava_llama":
        hint = ""
        if model_type in ("nvila", "nvila_lite", "vila") or "auto_map" in raw:
            hint = " This looks like an '-hf' remote-code export; use the original layout (llm/, vision_tower/, mm_projector/)."
        raise CheckpointError(f"{root / 'config.json'}: `model_type` is {model_type!r}, expected 'llava_llama'.{hint}")
    for name in COMPONENTS:
        if not (root / name / "config.json").is_file():
            raise CheckpointError(f"{root}: missing {name}/config.json (an NVILA checkpoint has llm/, vision_tower/, mm_projector/)")
    preprocessor_path = root / "vision_tower" / "preprocessor_config.json"
    parts = dict(
        llm=_read_json(root / "llm" / "config.json"),
        vision_tower=_read_json(root / "vision_tower" / "config.json"),
        mm_projector=_read_json(root / "mm_projector" / "config.json"),
        preprocessor=_read_json(preprocessor_path) if preprocessor_path.is_file() else {},
    )
    try:
        return NVILAConfig(raw=raw, **parts)
    except CheckpointError as err:  # its messages name the file inside the checkpoint ("llm/config.json: ...")
        raise CheckpointError(f"{root}/{err}") from None
    except (ValueError, TypeError) as err:  # a field of the wrong kind ("max_tiles": "many")
        raise CheckpointError(f"{root}: a config.json field has a value of the wrong kind ({err})") from None


def read_extra_files(root: str | os.PathLike) -> dict[str, bytes]:
    """Every non-weight, non-config file of the component folders (tokenizer, processor, generation config)."""
    files = {}
    for name in COMPONENTS:
        for path in sorted((Path(root) / name).iterdir()):
            if path.is_file() and path.name != "config.json" and not path.name.endswith(WEIGHT_SUFFIXES):
                files[f"{name}/{path.name}"] = path.read_bytes()
    return files


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise CheckpointError(f"{folder}: weights do not match the config ({'; '.join(problems)})")


def _require_safetensors(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        raise CheckpointError(
            f"{folder}: no .safetensors weights (found {found or 'none'}); nvila-ft loads safetensors only"
        )


def _load_transformers_model(
    cls: type, folder: Path, dtype: torch.dtype, attn_implementation: str, skipped: Any = None, **kwargs: Any
) -> Any:
    """A stock transformers model from a component folder: local, safetensors only, strict on weight names except
    those `skipped(keys)` returns (weights deliberately not built)."""
    _require_safetensors(folder)
    # transformers reports the skipped weights in a warning table; the strict check below is the report
    quiet = contextlib.nullcontext() if skipped is None else _without_load_report()
    with quiet:
        model, info = cls.from_pretrained(
            str(folder),
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    if skipped is not None:
        info = dict(info, unexpected_keys=sorted(set(info.get("unexpected_keys") or ()) - set(skipped(list(info.get("unexpected_keys") or ())))))
    _check_loading_info(folder, info)
    return model


@contextlib.contextmanager
def _without_load_report() -> Iterator[None]:
    """transformers' LOAD REPORT warning left out (its logger's level is left alone: transformers reads it)."""
    logger = logging.getLogger("transformers.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_llm(root: Path, dtype: torch.dtype, attn_implementation: str = "sdpa", **kwargs: Any) -> torch.nn.Module:
    """The Qwen2 LLM from `llm/`; extra kwargs (quantization_config, device_map) go to `from_pretrained`."""
    from transformers import Qwen2ForCausalLM

    return _load_transformers_model(Qwen2ForCausalLM, root / "llm", dtype, attn_implementation, **kwargs)


def load_vision_tower(root: Path, dtype: torch.dtype, attn_implementation: str = "sdpa", **kwargs: Any) -> torch.nn.Module:
    """SigLIP from `vision_tower/` without what cannot affect the selected layer's features (the later encoder
    layers, `post_layernorm`, the pooling head are never built; `save_checkpoint` copies them through from this
    checkpoint); extra kwargs (quantization_config, device_map) go to `from_pretrained`."""
    from transformers import SiglipVisionModel

    used = read_config(root).vision_layers_used
    model = _load_transformers_model(
        SiglipVisionModel, root / "vision_tower", dtype, attn_implementation,
        skipped=lambda keys: unused_keys(keys, used), num_hidden_layers=used, vision_use_head=False, **kwargs,
    )
    return drop_unused(model, used)


def iter_safetensors(folder: Path, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a folder's `model.safetensors` or sharded `model-*.safetensors` (via the index), one
    tensor in memory at a time; only `keys` when given."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: not found")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if keys is None or key in keys:
                    yield key, handle.get_tensor(key)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's `model.safetensors` or sharded `model-*.safetensors`."""
    return dict(iter_safetensors(folder))


def load_projector(root: Path, config: NVILAConfig, dtype: torch.dtype) -> MultimodalProjector:
    folder = root / "mm_projector"
    _require_safetensors(folder)
    projector = MultimodalProjector(config.projector_type, config.mm_hidden_size, config.llm_hidden_size)
    state = read_safetensors(folder)
    expected = projector.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    _check_loading_info(folder, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched})
    projector.load_state_dict(state)
    return projector.to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _with_dtype(raw: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A sub-config with its dtype key(s) set to `dtype` (unchanged when it already says so)."""
    out = dict(raw)
    for key in ("torch_dtype", "dtype"):
        if key in out or key == "torch_dtype":
            out[key] = _dtype_name(dtype)
    return out


def write_safetensors(folder: Path, state: dict[str, torch.Tensor], max_shard_size: str = DEFAULT_SHARD_SIZE) -> None:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when larger than one shard."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        write_json(folder / "model.safetensors.index.json", index)


def official_keys(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module state-dict keys -> the keys of the released checkpoint (SigLIP's sit under `vision_model.`)."""
    if component != "vision_tower":
        return dict(state)
    return {k if k.startswith(VISION_PREFIX) else VISION_PREFIX + k: v for k, v in state.items()}


def module_keys(component: str, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released-checkpoint keys -> this module's keys (inverse of `official_keys`)."""
    if component != "vision_tower" or hasattr(module, "vision_model"):
        return dict(state)
    return {k.removeprefix(VISION_PREFIX): v for k, v in state.items()}


def plain_state_dict(module: torch.nn.Module, component: str) -> dict[str, torch.Tensor]:
    """State dict of an un-wrapped, un-quantized component; anything else is an error naming the fix."""
    if hasattr(module, "peft_config") or any("lora_" in n for n, _ in module.named_parameters()):
        raise CheckpointError(f"{component} still carries adapters; merge them before saving in the NVILA layout")
    if getattr(module, "is_quantized", False) or getattr(module, "is_loaded_in_4bit", False) or getattr(
        module, "is_loaded_in_8bit", False
    ):
        raise CheckpointError(f"{component} is quantized; merge into a 16-bit copy before saving in the NVILA layout")
    return module.state_dict()


def save_checkpoint(
    model: Any,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write `model` (an NVILAForConditionalGeneration) in the official layout, atomically.

    dtype defaults to the checkpoint's own dtype (`model_dtype`), whatever dtype the model was run in.
    """
    config: NVILAConfig = model.config
    dtype = dtype or config.model_dtype
    final = Path(path).absolute()
    llm_state = plain_state_dict(model.llm, "llm")
    if config.llm.get("tie_word_embeddings", False):
        llm_state.pop("lm_head.weight", None)
    vision_state = official_keys("vision_tower", plain_state_dict(model.vision_tower.model, "vision_tower"))
    vision_state |= dropped_vision_weights(model, vision_state)
    projector_state = plain_state_dict(model.mm_projector, "mm_projector")
    cast = lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}  # noqa: E731

    with atomic_directory(final, overwrite=overwrite) as staging:
        sub_configs = {}
        for name, state, raw in (
            ("llm", llm_state, config.llm),
            ("vision_tower", vision_state, config.vision_tower),
            ("mm_projector", projector_state, config.mm_projector),
        ):
            folder = staging / name
            folder.mkdir()
            write_safetensors(folder, cast(state), max_shard_size=max_shard_size)
            sub_configs[name] = raw if _declared_dtype(raw) == dtype else _with_dtype(raw, dtype)
            write_json(folder / "config.json", sub_configs[name])
        for relative, data in model.extra_files.items():
            (staging / relative).write_bytes(data)
        top = config.to_dict()
        for name in COMPONENTS:
            if isinstance(top.get(f"{name}_cfg"), dict) and sub_configs[name] is not getattr(config, name):
                top[f"{name}_cfg"] = _with_dtype(top[f"{name}_cfg"], dtype)
        if dtype != config.model_dtype:
            top["model_dtype"] = str(dtype)  # the dtype the official loader casts the model to
        if "_name_or_path" in top:
            top["_name_or_path"] = str(final)
        write_json(staging / "config.json", top)
    return final


def dropped_vision_weights(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official vision-tower tensors `state` lacks because the tower was loaded without them (`drop_unused`),
    read unchanged from the checkpoint the model was loaded from (`model.name_or_path`)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    raw = {k: v for k, v in model.config.vision_tower.items() if k != "architectures"}
    with torch.device("meta"):
        whole = SiglipVisionModel(SiglipVisionConfig(**raw))
    missing = set(official_keys("vision_tower", whole.state_dict())) - set(state)
    if not missing:
        return {}
    folder = Path(str(getattr(model, "name_or_path", ""))) / "vision_tower"
    found = dict(iter_safetensors(folder, missing)) if (folder / "config.json").is_file() else {}
    if len(found) != len(missing):
        raise CheckpointError(
            f"the vision tower was loaded without its unused weights ({', '.join(sorted(missing)[:3])}, ...) and "
            f"{folder} no longer has them; an export needs the checkpoint the model was loaded from"
        )
    return found


def _declared_dtype(raw: dict[str, Any]) -> torch.dtype | None:
    name = raw.get("torch_dtype") or raw.get("dtype")
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None
