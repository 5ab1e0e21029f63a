"""Training steps at real NVILA dimensions (random weights, no download): nvila-ft beside a plain baseline.

Each run is one process (its own peak RSS). A policy from `adapters/` is trained in one of four ways (`--modes`):
`levers` (nvila-ft with every memory lever the policy and model allow: selective loss, checkpointing of both
components, 8-bit AdamW, 16-bit trained tensors, the input embedding table in host memory, lm_head and a frozen /
LayerNorm-tuned vision tower in int8 rows), `nvila-ft` (its defaults: selective loss, float32 trained tensors),
`none` (nvila-ft with no lever) and `baseline` (the model loaded in the compute dtype, one `LoraConfig` applied with
PEFT's `get_peft_model`, the other trainable parts unfrozen by hand, torch AdamW over every trainable tensor, the
full loss: what the default `Trainer` step does). One JSON line per run:

- peak_tensor_bytes: what an accelerator would hold at the step's peak. CPU: the peak of the profiler's memory
  timeline over one step (tensors only; `profiler_peak_bytes`) less the embedding table kept in host memory
  (`host_table_bytes`, which a GPU's counter never sees); GPU: `max_memory_allocated` (and reserved) over one step;
  both after a first step created the optimizer states;
- peak_before_optimizer_bytes (CPU): the same over forward and backward only (bitsandbytes' 8-bit AdamW has no fused
  CPU kernel: its CPU update holds float32 copies of the largest tensor, which a GPU's fused update does not);
  planned_gpu_allocated_bytes: the planner's tensor peak of the same run on a GPU;
- peak_rss_bytes: the process's peak resident memory (includes the pages of the memory-mapped checkpoint);
  peak_anonymous_bytes: the peak of what the process allocated (RssAnon, sampled); load_*: the same at the end of
  loading, and its seconds;
- step_seconds: the median of the timed steps; tokens_per_second: LLM positions / step_seconds; losses: every
  step's loss (warm-up, timed steps, profiled step);
- planned_bytes / plan_error_percent: nvila-ft's planner for the same run, its tensor bytes (without the CUDA
  context and allocator slack, which neither measure counts);
- mfu: on a GPU, model FLOPs (6 x LLM parameters x positions; attention and the vision tower left out, so it
  understates) / step time / the GPU's dense bf16 peak.

    .venv/bin/python bench/real_dims.py --preset nvila-lite-2b --policies ln_vit_lora_llm --out bench/results/cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # name: (image size or None, video frames or None, question words, checkpointing, image tiled, answer)
    # one 448x448 image: one tile for NVILA-Lite (121 visual tokens, ~200 positions); Dynamic-S2 NVILA-8B still
    # tiles it at every scale (1 + 4 + 9 tiles, 2,304 visual tokens): ~2,350 positions
    "official": ((448, 448), None, 44, (), True, "A short answer to learn from, as in VQA."),
    # the paper's Table 5 sample: batch 1, one 448x448 tile (256 visual tokens at NVILA-8B/15B: the single-tile
    # path of the official code, as for a video frame or a multi-image prompt), ~300 LLM positions
    "paper": ((448, 448), None, 16, (), False, "A short answer to learn from, as in VQA."),
    # a realistic medical sample: one 1024x768 radiograph through Dynamic-S2 (6 + 5 tiles, 1,536 visual tokens
    # at NVILA-8B), a question and a two-sentence answer
    "medical": ((1024, 768), None, 12, (), True,
                "There is a focal consolidation in the right lower lobe, consistent with pneumonia. No pleural effusion or pneumothorax is seen."),
    "s2": ((1344, 896), None, 512, ("vision_tower", "llm"), True, "A short answer to learn from, as in VQA."),  # 3,073 positions (8B)
    "video": (None, 8, 256, (), True, "A short answer to learn from, as in VQA."),  # an 8-frame video
}
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def conversation(setting: str, workdir: Path) -> list[dict]:
    size, frames, words, _, _, answer = SETTINGS[setting]
    rng = np.random.default_rng(0)
    content: list[dict] = []
    if size is not None:
        content.append({"type": "image", "image": Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))})
    if frames is not None:  # a folder of frames (a video the processor reads like a file; needs no PyAV)
        clip = workdir / f"clip-{frames}"
        if not (clip / f"{frames - 1:03d}.png").is_file():
            clip.mkdir(parents=True, exist_ok=True)
            for index in range(frames):
                Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(clip / f"{index:03d}.png")
        content.append({"type": "video", "video": str(clip)})
    content.append({"type": "text", "text": " ".join(["word"] * words)})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def checkpoint_dir(preset: str, dtype: torch.dtype, workdir: Path) -> Path:
    """Random weights of the preset's released dimensions, written once shard by shard (bench/random_checkpoint.py)."""
    from random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(preset, dtype, workdir / f"{preset}-{str(dtype).removeprefix('torch.')}")


def load_policy(name: str):
    from nvila_ft.adapters import AdapterPolicy

    return AdapterPolicy.from_yaml(str(ROOT / "adapters" / f"{name}.yaml"))


# ----------------------------------------------------------------------------------------------- the two ways
def nvila_ft_model(checkpoint: Path, policy, dtype: torch.dtype, shape, device: str):
    """The policy's loader and adapters, trained tensors in float32 unless `shape.trainable_float32` is off, the
    run shape's loss, checkpointing and frozen-weight storage."""
    from nvila_ft.adapters import apply_policy, load_for_policy
    from nvila_ft.adapters.frozen_storage import store_frozen_weights

    model = apply_policy(load_for_policy(checkpoint, policy, dtype, device), policy)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float() if shape.trainable_float32 else param.data.to(dtype)  # precision.trainable_float32
    model.selective_loss = shape.selective_loss  # trainer.selective_loss
    if shape.checkpointing:
        model.activation_checkpointing_enable(components=shape.checkpointing)  # trainer.gradient_checkpointing
    return store_frozen_weights(model, shape.storage)  # trainer.offload_embeddings, precision.*_bits


def run_shape(mode: str, setting: str, policy, config, dtype: torch.dtype, device: str):
    """What each way of running sets: `levers` every memory lever the policy and model allow, `nvila-ft` the
    defaults (selective loss, float32 trained tensors), `none` nvila-ft with no lever, `baseline` the plain way."""
    from nvila_ft.training.planner import RunShape

    checkpointing = SETTINGS[setting][3]
    shape = RunShape(weights_dtype=dtype, checkpointing=checkpointing, selective_loss=mode in ("nvila-ft", "levers"),
                     cuda=device == "cuda", trainable_float32=mode in ("nvila-ft", "none"))
    if mode != "levers":
        return shape
    tied = bool(config.llm.get("tie_word_embeddings", False))
    shape = replace(shape, checkpointing=("vision_tower", "llm"), optim="adamw_bnb_8bit")
    for lever in ({"offload_embeddings": True}, {"lm_head_bits": 8}, {"vision_tower_bits": 8}):
        if not replace(shape, **lever).storage.problems(policy, tied):
            shape = replace(shape, **lever)
    return shape


def baseline_model(checkpoint: Path, policy, dtype: torch.dtype, device: str):
    """The plain way: PEFT's get_peft_model with one LoraConfig, the rest unfrozen by hand."""
    from peft import LoraConfig, get_peft_model

    from nvila_ft.adapters import load_for_policy
    from nvila_ft.adapters.policy import AdapterPolicy, ComponentPolicy

    # the base as loaded for the policy (a quantized LLM is quantized on load, bitsandbytes' standard path)
    frozen = AdapterPolicy(name="plain", vision_tower=ComponentPolicy(method="frozen"), mm_projector=ComponentPolicy(method="frozen"),
                           llm=policy.llm if policy.llm.method == "qlora" else ComponentPolicy(method="frozen"))
    model = load_for_policy(checkpoint, frozen, dtype, device)
    model.requires_grad_(False)
    patterns = []
    for name, prefix in (("llm", r"llm\.model\.layers\.\d+\..*"), ("vision_tower", r"vision_tower\..*encoder\.layers\.\d+\..*")):
        component = getattr(policy, name)
        if component.method in ("lora", "dora", "qlora", "fp8_lora"):
            patterns.append(prefix + r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|out_proj|fc1|fc2)")
    rank = max((getattr(policy, n).r for n in ("llm", "vision_tower") if getattr(policy, n).method not in ("frozen", "layernorm", "full")), default=16)
    if patterns:
        dora = any(getattr(policy, n).method == "dora" or getattr(policy, n).options.get("dora", False) for n in ("llm", "vision_tower"))
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05, use_dora=dora,
                            target_modules="|".join(f"({p})" for p in patterns))
        model = get_peft_model(model, config)
    for name, module in (("vision_tower", model.vision_tower), ("mm_projector", model.mm_projector), ("llm", model.llm)):
        method = getattr(policy, name).method
        for param_name, param in module.named_parameters():
            if method == "full" or (method == "layernorm" and "norm" in param_name):
                param.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------- one run
class AnonymousPeak:
    """The peak of the process's anonymous resident memory (RssAnon: what it allocated, without the pages of
    memory-mapped files that peak RSS also counts), sampled every 20 ms from /proc/self/status."""

    def __init__(self) -> None:
        self.peak = 0
        threading.Thread(target=self._watch, daemon=True).start()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return 0

    def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)


def run(args) -> dict:
    from nvila_ft.adapters.frozen_storage import HostEmbedding
    from nvila_ft.adapters.optim import parameter_groups
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.checkpoint import read_config
    from nvila_ft.training.peak import cpu_memory_timeline, peak_bytes
    from nvila_ft.training.planner import SampleDemand, plan

    anonymous = AnonymousPeak()
    device = args.device
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    policy = load_policy(args.policy)
    mode = "levers" if args.levers and args.mode == "nvila-ft" else args.mode
    checkpoint = checkpoint_dir(args.preset, dtype, args.workdir)
    shape = run_shape(mode, args.setting, policy, read_config(checkpoint), dtype, device)
    if mode == "levers" and args.lm_head_bits and shape.lm_head_bits != 16:
        shape = replace(shape, lm_head_bits=args.lm_head_bits)  # precision.lm_head_bits=4: NF4 rows
    start = time.perf_counter()
    if mode == "baseline":
        model = baseline_model(checkpoint, policy, dtype, device)
        if shape.checkpointing:  # the setting asks for it: the Trainer's gradient_checkpointing=True, every layer
            (model.get_base_model() if hasattr(model, "get_base_model") else model).activation_checkpointing_enable()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    else:
        model = nvila_ft_model(checkpoint, policy, dtype, shape, device)
        if args.fp8:  # precision=fp8: float8 matmuls in the LLM's linears (torchao Float8Linear)
            from nvila_ft.training.fp8 import convert_llm_to_float8

            convert_llm_to_float8(model, args.fp8)
        if shape.optim == "adamw_bnb_8bit":  # trainer.optim=adamw_bnb_8bit: the Trainer's bitsandbytes AdamW8bit, same groups
            import bitsandbytes

            optimizer = bitsandbytes.optim.AdamW8bit(parameter_groups(model, policy, 1e-5))
        else:
            optimizer = torch.optim.AdamW(parameter_groups(model, policy, 1e-5))
    load_seconds, load_rss, load_anonymous = time.perf_counter() - start, max_rss(), anonymous.peak
    model.train()
    processor = NVILAProcessor.from_pretrained(checkpoint, multi_image_tiling=SETTINGS[args.setting][4])
    chat = conversation(args.setting, args.workdir)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(chat).items()}
    tiles = sum(int(batch[k].shape[0]) for k in ("pixel_values", "video_pixel_values") if batch.get(k) is not None)
    sample = SampleDemand(int(batch["input_ids"].shape[-1]), tiles, int((batch["labels"][..., 1:] != -100).sum()))
    losses, optimizer_starts = [], []

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer_starts.append(time.time_ns() // 1000)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 5))

    step()  # warm-up: optimizer states exist from here on
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    if device == "cpu":  # the peak, and the peak before the optimizer step (forward and backward)
        moments, totals = cpu_memory_timeline(step)
        profiled = max(totals)
        before_optimizer = max(t for when, t in zip(moments, totals) if when < optimizer_starts[-1])
    else:
        profiled, before_optimizer = peak_bytes(step, device), None
    # tables kept in host memory (trainer.offload_embeddings): on a GPU max_memory_allocated never sees them; on the
    # CPU the profiler counts them like any tensor, so they are taken off to give what an accelerator would hold
    host = sum(m.table.numel() * m.table.element_size() for m in model.modules() if isinstance(m, HostEmbedding)) if device == "cpu" else 0
    peak = profiled - host
    seconds = statistics.median(times) if times else None
    planned = plan(model.config, policy, sample, shape).allocated if mode != "baseline" else None
    # the same run on a GPU (fused optimizer kernels: no CPU working copies in the update)
    planned_gpu = plan(model.config, policy, sample, replace(shape, cuda=True)).allocated if mode != "baseline" else None
    out = {
        "preset": args.preset, "setting": args.setting, "policy": args.policy, "mode": mode, "precision": args.precision,
        "fp8_compute": args.fp8 if mode != "baseline" else None, "levers": mode == "levers",
        "optim": shape.optim if mode != "baseline" else "adamw_torch", "checkpointing": list(shape.checkpointing), "selective_loss": shape.selective_loss,
        "trainable_float32": shape.trainable_float32 if mode != "baseline" else False,
        "offload_embeddings": shape.offload_embeddings, "lm_head_bits": shape.lm_head_bits, "vision_tower_bits": shape.vision_tower_bits,
        "device": device, "positions": sample.positions, "tiles": sample.tiles, "supervised": sample.supervised, "steps_timed": args.steps,
        "peak_tensor_bytes": peak, "profiler_peak_bytes": profiled if device == "cpu" else None, "host_table_bytes": host,
        "peak_before_optimizer_bytes": before_optimizer - host if before_optimizer is not None else None,
        "peak_rss_bytes": max_rss(), "peak_anonymous_bytes": anonymous.peak,
        "load_seconds": round(load_seconds, 1), "load_peak_rss_bytes": load_rss, "load_peak_anonymous_bytes": load_anonymous,
        "step_seconds": round(seconds, 3) if seconds else None, "tokens_per_second": round(sample.positions / seconds, 1) if seconds else None,
        "losses": losses, "planned_bytes": planned, "planned_gpu_allocated_bytes": planned_gpu,
        "plan_error_percent": round(100 * (planned - peak) / peak, 1) if planned else None,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device == "cuda":
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        from nvila_ft.adapters.apply import parameter_count

        llm_params = sum(parameter_count(p) for p in model.llm.parameters())  # 4-bit weights are stored packed
        flops = 6 * llm_params * sample.positions
        name = torch.cuda.get_device_name(0)
        peak_flops = next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
        out["mfu"] = round(flops / seconds / peak_flops, 4) if peak_flops and seconds else None
        out["gpu"] = name
    return out


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment() -> dict:
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cpus": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nvila-lite-2b")
    parser.add_argument("--setting", choices=list(SETTINGS), default="official")
    parser.add_argument("--policies", nargs="+", default=["ln_vit_lora_llm"])
    parser.add_argument("--modes", nargs="+", default=["levers", "none", "baseline"],
                        help="levers: nvila-ft with every memory lever; nvila-ft: its defaults; none: no lever; baseline: the plain way")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--fp8", choices=["tensorwise", "rowwise"], default=None, help="nvila-ft runs with precision=fp8")
    parser.add_argument("--levers", action="store_true", help="nvila-ft runs as --modes levers")
    parser.add_argument("--lm-head-bits", type=int, choices=[8, 4], default=None, help="lm_head storage of the levers runs (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nvila-real-dims")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.mode:  # one run, in this process
        print(json.dumps(run(args)), flush=True)
        return
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(json.dumps({"environment": environment(), "date": time.strftime("%Y-%m-%d")}) + "\n")
    for policy in args.policies:
        for mode in args.modes:
            command = [sys.executable, __file__, "--preset", args.preset, "--setting", args.setting, "--precision", args.precision,
                       *(["--fp8", args.fp8] if args.fp8 else []), *(["--levers"] if args.levers else []),
                       *(["--lm-head-bits", str(args.lm_head_bits)] if args.lm_head_bits else []),
                       "--steps", str(args.steps), "--device", args.device, "--workdir", str(args.workdir), "--mode", mode, "--policy", policy]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            line = lines[-1] if result.returncode == 0 and lines else json.dumps(
                {"preset": args.preset, "setting": args.setting, "policy": policy, "mode": mode, "returncode": result.returncode,
                 "error": result.stderr.strip().splitlines()[-1:]})
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(line + "\n")


if __name__ == "__main__":
    main()
