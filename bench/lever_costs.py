"""What each memory lever costs in time, at NVILA-8B's real dimensions, each beside what it replaces in one process.

A whole 8B step on this CPU takes about a minute, too long to time every lever alone; each lever changes one part
of the step, so that part is timed with and without it (bf16, the paper's sample: 309 LLM positions, one 448 tile,
15 supervised positions; median of `--repeats` after a warm-up):

- lm_head in int8 rows: the selective loss's projection of the supervised rows, forward and backward (input
  gradient), 16-bit `nn.Linear` vs `Int8RowLinear`;
- the vision tower in int8 rows: one SigLIP layer's six linears on one tile (1,024 tokens), forward and backward,
  times the 26 layers used;
- the embedding table in host memory: the batch's rows gathered from the table (on a GPU the lever adds a copy of
  those rows from host memory; on the CPU there is nothing to copy);
- 8-bit AdamW: one update of the trainable tensors of LN/QLoRA at 8B (the projector, LoRA, the vision norms),
  torch AdamW vs bitsandbytes' AdamW8bit;
- checkpointing: one Qwen2-7B decoder layer at 309 positions, forward + backward with and without recomputing it
  (`torch.utils.checkpoint`), times 28 layers.

    .venv/bin/python bench/lever_costs.py --out bench/results/cpu_lever_costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from nvila_ft.adapters.frozen_storage import HostEmbedding, Int8RowLinear

VOCAB, WIDTH, POSITIONS, SUPERVISED = 151648, 3584, 309, 15
VISION_WIDTH, VISION_MLP, TILE_TOKENS, VISION_LAYERS, LLM_LAYERS = 1152, 4304, 1024, 26, 28


def timed(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(module: nn.Module, inputs: torch.Tensor):
    def work():
        x = inputs.detach().requires_grad_(True)
        module(x).float().square().mean().backward()
    return work


def lm_head(repeats: int) -> dict:
    plain = nn.Linear(WIDTH, VOCAB, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    rows = torch.randn(SUPERVISED, WIDTH, dtype=torch.bfloat16)
    sixteen = timed(forward_backward(plain, rows), repeats)
    stored = Int8RowLinear.from_linear(plain)
    del plain
    return {"lever": "precision.lm_head_bits=8", "without_s": sixteen, "with_s": timed(forward_backward(stored, rows), repeats)}


def vision(repeats: int) -> dict:
    shapes = [(VISION_WIDTH, VISION_WIDTH)] * 4 + [(VISION_WIDTH, VISION_MLP), (VISION_MLP, VISION_WIDTH)]
    linears = [nn.Linear(i, o, dtype=torch.bfloat16).requires_grad_(False) for i, o in shapes]
    tokens = {i: torch.randn(1, TILE_TOKENS, i, dtype=torch.bfloat16) for i, _ in shapes}

    def layer(modules):
        def work():
            for module, (i, _) in zip(modules, shapes):
                x = tokens[i].detach().requires_grad_(True)
                module(x).float().square().mean().backward()
        return work

    sixteen = timed(layer(linears), repeats) * VISION_LAYERS
    stored = [Int8RowLinear.from_linear(m) for m in linears]
    return {"lever": "precision.vision_tower_bits=8", "without_s": sixteen, "with_s": timed(layer(stored), repeats) * VISION_LAYERS}


def embeddings(repeats: int) -> dict:
    table = nn.Embedding(VOCAB, WIDTH, dtype=torch.bfloat16).requires_grad_(False)
    ids = torch.randint(0, VOCAB, (1, POSITIONS))
    host = HostEmbedding(table)
    return {"lever": "trainer.offload_embeddings=true", "without_s": timed(lambda: table(ids), repeats),
            "with_s": timed(lambda: host(ids), repeats)}


def optimizer(repeats: int) -> dict:
    import bitsandbytes as bnb

    # LN/QLoRA at NVILA-8B: the projector (LN 13,824; 13,824 x 3,584 + 3,584; 3,584 x 3,584 + 3,584), LoRA r=16 on
    # seven linears of 28 layers, the vision tower's norms (53 x 2 x 1,152): 102.9 M values
    lora = [(16, 3584), (3584, 16), (16, 3584), (512, 16), (16, 3584), (512, 16), (16, 3584), (3584, 16),
            (16, 3584), (18944, 16), (16, 3584), (18944, 16), (16, 18944), (3584, 16)] * LLM_LAYERS
    shapes = [(13824,), (13824,), (3584, 13824), (3584,), (3584, 3584), (3584,), *lora, *[(1152,)] * 106]
    params = [nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adamw = torch.optim.AdamW(params, lr=1e-5)
    plain = timed(adamw.step, repeats)
    del adamw
    eight = bnb.optim.AdamW8bit(params, lr=1e-5)
    return {"lever": "trainer.optim=adamw_bnb_8bit", "without_s": plain, "with_s": timed(eight.step, repeats),
            "values": sum(p.numel() for p in params)}


def checkpointing(repeats: int) -> dict:
    from torch.utils.checkpoint import checkpoint
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    config = Qwen2Config(hidden_size=WIDTH, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                         vocab_size=VOCAB, attn_implementation="sdpa")
    layer = Qwen2DecoderLayer(config, 0).to(torch.bfloat16).requires_grad_(False)
    layer.mlp.down_proj.weight.requires_grad_(True)  # something trains inside, as LoRA would
    hidden = torch.randn(1, POSITIONS, WIDTH, dtype=torch.bfloat16)
    positions = torch.arange(POSITIONS)[None]
    rotary = Qwen2RotaryEmbedding(config)(hidden, positions)

    def run(recompute: bool):
        def work():
            x = hidden.detach().requires_grad_(True)
            call = lambda h: layer(h, attention_mask=None, position_embeddings=rotary, position_ids=positions)  # noqa: E731
            out = checkpoint(call, x, use_reentrant=False) if recompute else call(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
        return work

    return {"lever": "trainer.gradient_checkpointing=true (LLM)", "without_s": timed(run(False), repeats) * LLM_LAYERS,
            "with_s": timed(run(True), repeats) * LLM_LAYERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for measure in (lm_head, vision, embeddings, optimizer, checkpointing):
        row = measure(args.repeats)
        row |= {"extra_s": round(row["with_s"] - row["without_s"], 3), "without_s": round(row["without_s"], 3), "with_s": round(row["with_s"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
