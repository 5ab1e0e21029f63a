"""Training steps at real NVILA dimensions (random weights, no download): nvila-ft beside a plain baseline.

Each run is one process (its own peak RSS): a policy from `adapters/` trained either the nvila-ft way (the policy's
loader, trainable tensors in float32, logits only at supervised positions, the configured checkpointing and
optimizer) or the plain way (the model loaded in the compute dtype, one `LoraConfig` applied with PEFT's
`get_peft_model`, the other trainable parts unfrozen by hand, torch AdamW over every trainable tensor, the full
loss, no checkpointing: what the default `Trainer` step does). One JSON line per run:

- peak_tensor_bytes: CPU: the peak of the profiler's memory timeline over one step (tensors only); GPU:
  `max_memory_allocated` (and reserved) over one step; both after a first step created the optimizer states;
- peak_rss_bytes: the process's peak resident memory (CPU; includes the memory-mapped checkpoint);
- step_seconds: the median of the timed steps; tokens_per_second: LLM positions / step_seconds;
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
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # name: (image size or None, video frames or None, text words, checkpointing)
    # one 448x448 image: one tile for NVILA-Lite (121 visual tokens, ~200 positions); Dynamic-S2 NVILA-8B still
    # tiles it at every scale (1 + 4 + 9 tiles, 2,304 visual tokens), so the paper's "one tile, 256 tokens" is not
    # reproducible with the released 8B projector: its runs here are ~2,350 positions
    "official": ((448, 448), None, 44, ()),
    "s2": ((1344, 896), None, 512, ("vision_tower", "llm")),  # Dynamic-S2 at 1344x896: 3,073 positions (8B)
    "video": (None, 8, 256, ()),  # an 8-frame video
}
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def conversation(setting: str, workdir: Path) -> list[dict]:
    size, frames, words, _ = SETTINGS[setting]
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
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "A short answer to learn from, as in VQA."}]


def checkpoint_dir(preset: str, dtype: torch.dtype, workdir: Path) -> Path:
    from nvila_ft.model.presets import build_model

    target = workdir / f"{preset}-{str(dtype).removeprefix('torch.')}"
    if not (target / "config.json").is_file():  # random weights, initialised on the GPU when there is one (fast)
        build_model(preset, dtype=dtype, device="cuda" if torch.cuda.is_available() else None).save_pretrained(target)
    return target


def load_policy(name: str):
    from nvila_ft.adapters import AdapterPolicy

    return AdapterPolicy.from_yaml(str(ROOT / "adapters" / f"{name}.yaml"))


# ----------------------------------------------------------------------------------------------- the two ways
def nvila_ft_model(checkpoint: Path, policy, dtype: torch.dtype, checkpointing: tuple[str, ...], device: str, trainable_float32: bool = True):
    from nvila_ft.adapters import apply_policy, load_for_policy

    model = apply_policy(load_for_policy(checkpoint, policy, dtype, device), policy)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float() if trainable_float32 else param.data.to(dtype)  # precision.trainable_float32
    model.selective_loss = True  # trainer.selective_loss
    if checkpointing:
        model.activation_checkpointing_enable(components=checkpointing)  # trainer.gradient_checkpointing
    return model


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
        dora = any(getattr(policy, n).method == "dora" or getattr(policy, n).dora for n in ("llm", "vision_tower"))
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
def run(args) -> dict:
    from nvila_ft.adapters.optim import parameter_groups
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.training.peak import peak_bytes
    from nvila_ft.training.planner import RunShape, SampleDemand, plan

    device = args.device
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    policy = load_policy(args.policy)
    checkpointing = SETTINGS[args.setting][3]
    optim = "adamw_torch"
    if args.levers and args.mode == "nvila-ft":  # every memory lever: checkpointing of both, 8-bit AdamW, 16-bit trained tensors
        checkpointing, optim = ("vision_tower", "llm"), "adamw_bnb_8bit"
    checkpoint = checkpoint_dir(args.preset, dtype, args.workdir)
    if args.mode == "nvila-ft":
        model = nvila_ft_model(checkpoint, policy, dtype, checkpointing, device, trainable_float32=not args.levers)
        if args.fp8:  # precision=fp8: float8 matmuls in the LLM's linears (torchao Float8Linear)
            from nvila_ft.training.fp8 import convert_llm_to_float8

            convert_llm_to_float8(model, args.fp8)
        if optim == "adamw_bnb_8bit":  # trainer.optim=adamw_bnb_8bit: the Trainer's bitsandbytes AdamW8bit, same groups
            import bitsandbytes

            optimizer = bitsandbytes.optim.AdamW8bit(parameter_groups(model, policy, 1e-5))
        else:
            optimizer = torch.optim.AdamW(parameter_groups(model, policy, 1e-5))
    else:
        model = baseline_model(checkpoint, policy, dtype, device)
        if checkpointing:  # the setting asks for it: the Trainer's gradient_checkpointing=True, every layer
            (model.get_base_model() if hasattr(model, "get_base_model") else model).activation_checkpointing_enable()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    processor = NVILAProcessor.from_pretrained(checkpoint)
    chat = conversation(args.setting, args.workdir)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor(chat).items()}
    size = processor.measure(chat)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states exist from here on
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_bytes(step, device)
    seconds = statistics.median(times)
    shape = RunShape(weights_dtype=dtype, checkpointing=checkpointing, selective_loss=args.mode == "nvila-ft", cuda=device == "cuda",
                     optim=optim, trainable_float32=args.mode == "nvila-ft" and not args.levers)
    planned = plan(model.config, policy, SampleDemand(size.positions, size.tiles, size.supervised), shape).allocated
    out = {
        "preset": args.preset, "setting": args.setting, "policy": args.policy, "mode": args.mode, "precision": args.precision,
        "fp8_compute": args.fp8 if args.mode == "nvila-ft" else None, "levers": bool(args.levers and args.mode == "nvila-ft"),
        "optim": optim, "checkpointing": list(checkpointing), "device": device, "positions": size.positions, "tiles": size.tiles, "steps_timed": args.steps,
        "peak_tensor_bytes": peak, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": round(seconds, 3), "tokens_per_second": round(size.positions / seconds, 1),
        "planned_bytes": planned if args.mode == "nvila-ft" else None,
        "plan_error_percent": round(100 * (planned - peak) / peak, 1) if args.mode == "nvila-ft" else None,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device == "cuda":
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        from nvila_ft.adapters.apply import parameter_count

        llm_params = sum(parameter_count(p) for p in model.llm.parameters())  # 4-bit weights are stored packed
        flops = 6 * llm_params * size.positions
        name = torch.cuda.get_device_name(0)
        peak_flops = next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
        out["mfu"] = round(flops / seconds / peak_flops, 4) if peak_flops else None
        out["gpu"] = name
    return out


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
    parser.add_argument("--modes", nargs="+", default=["nvila-ft", "baseline"])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--fp8", choices=["tensorwise", "rowwise"], default=None, help="nvila-ft runs with precision=fp8")
    parser.add_argument("--levers", action="store_true",
                        help="nvila-ft runs with checkpointing of both components, 8-bit AdamW and 16-bit trained tensors")
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
                       "--steps", str(args.steps), "--device", args.device, "--workdir", str(args.workdir), "--mode", mode, "--policy", policy]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            line = lines[-1] if result.returncode == 0 and lines else json.dumps(
                {"preset": args.preset, "setting": args.setting, "policy": policy, "mode": mode, "error": result.stderr.strip().splitlines()[-1:] })
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(line + "\n")


if __name__ == "__main__":
    main()
