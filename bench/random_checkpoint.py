"""A random-weight checkpoint of a preset's released dimensions, written one shard at a time (no download).

`build_model(...).save_pretrained(...)` holds the whole model in memory: 16 GB for NVILA-8B and 30 GB for NVILA-15B
in bf16, more than a 24 GiB machine has. Here the model is built on the meta device and `save_checkpoint` writes
the official layout (configs, tokenizer files, keys) as usual, while each shard's tensors are drawn only when that
shard is written: weights N(0, 0.02), norm scales 1, biases 0. Peak memory is one shard (2 GB by default).

    .venv/bin/python bench/random_checkpoint.py --preset nvila-8b --out /tmp/nvila-real-dims/nvila-8b-bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from unittest import mock

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from nvila_ft.atomic import write_json
from nvila_ft.model import checkpoint as checkpoint_module
from nvila_ft.model.presets import build_model

SHARD_SIZE = "2GB"


def random_like(key: str, meta: torch.Tensor) -> torch.Tensor:
    """The tensor `key` of a random checkpoint: reproducible from its name, whatever shard it lands in."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(meta.shape, dtype=meta.dtype)
    if "norm" in key.lower() and meta.dim() == 1:
        return torch.ones(meta.shape, dtype=meta.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU draws numbers far faster than two CPU cores
    generator = torch.Generator(device).manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    return (torch.randn(meta.shape, generator=generator, dtype=torch.float32, device=device) * 0.02).to(meta.dtype).cpu()


def write_streamed(folder: Path, state: dict[str, torch.Tensor], max_shard_size: str = SHARD_SIZE) -> None:
    """`write_safetensors` for a state of meta tensors: each shard drawn, written and freed in turn."""
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: random_like(n, state[n]) for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))})


def write_random_checkpoint(preset: str, dtype: torch.dtype, target: Path) -> Path:
    """The checkpoint folder `target` (written once; an existing complete one is kept)."""
    if (target / "config.json").is_file():
        return target
    model = build_model(preset, dtype=dtype, device="meta")
    with mock.patch.object(checkpoint_module, "write_safetensors", lambda folder, state, max_shard_size=SHARD_SIZE: write_streamed(folder, state)):
        model.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nvila-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    write_random_checkpoint(args.preset, getattr(torch, args.dtype), args.out)
    print(f"{args.out}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
