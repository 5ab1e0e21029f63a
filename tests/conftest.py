"""Shared fixtures: tiny checkpoints written once per session, offline environment, no GPU assumptions."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; the CPU counterpart covers the same path with emulation")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{preset: path} of every tiny preset saved in the official layout (seed 0)."""
    from nvila_ft.model.presets import TINY_PRESETS, save_preset_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_preset_checkpoint(root / name, name) for name in TINY_PRESETS}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_processor():
    """The NVILA-8B tiny preset's processor (Dynamic-S2 tiling, the tiny tokenizer), no checkpoint on disk."""
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.presets import preset_config
    from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
    from nvila_ft.model.tokenizer import load_tokenizer

    return NVILAProcessor(load_tokenizer(TINY_TOKENIZER_DIR), preset_config("nvila-8b-tiny"))
