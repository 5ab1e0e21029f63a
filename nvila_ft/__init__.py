"""nvila-ft: fine-tune NVIDIA NVILA with a policy per component (vision tower, projector, LLM).

    from nvila_ft import NVILAForConditionalGeneration, NVILAProcessor, AdapterPolicy, apply_policy, load_for_policy

The names load on first use, so `import nvila_ft` (and the command line's start) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "NVILAForConditionalGeneration": "nvila_ft.model.modeling_nvila",
    "NVILAConfig": "nvila_ft.model.config",
    "MediaLayout": "nvila_ft.model.media_layout",
    "NVILAProcessor": "nvila_ft.data.processor",
    "AdapterPolicy": "nvila_ft.adapters.policy",
    "ComponentPolicy": "nvila_ft.adapters.policy",
    "QuantizationPolicy": "nvila_ft.adapters.policy",
    "apply_policy": "nvila_ft.adapters.apply",
    "load_for_policy": "nvila_ft.adapters.apply",
    "save_adapters": "nvila_ft.adapters.artifacts",
    "load_adapters": "nvila_ft.adapters.artifacts",
    "merge_adapters": "nvila_ft.adapters.merge",
    "export_merged": "nvila_ft.adapters.merge",
    "build_model": "nvila_ft.model.presets",
    "pretrained_checkpoint": "nvila_ft.model.pretrained",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nvila_ft' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
