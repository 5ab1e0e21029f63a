"""The same paths as the CPU tests on a CUDA GPU: bf16, 4-bit kernels, FP8-capable hardware, generation.

Skipped on machines without CUDA (see tests/conftest.py); the CPU counterparts are test_adapters.py
(QLoRA on bitsandbytes' CPU backend, fp8_lora via torchao's CPU float8 casts) and test_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters.merge import export_merged
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from tests.tolerances import UBF16, likely

pytestmark = pytest.mark.gpu


def batch(processor: NVILAProcessor, answer: str | None = "A red square."):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return processor(messages, add_generation_prompt=answer is None).to("cuda")


def test_bf16_forward_matches_fp32_on_cuda(tiny_checkpoints):
    path = tiny_checkpoints["nvila-8b-tiny"]
    processor = NVILAProcessor.from_pretrained(path)
    fp32 = NVILAForConditionalGeneration.from_pretrained(path, device="cuda")
    bf16 = NVILAForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    inputs = batch(processor)
    with torch.no_grad():
        a, b = fp32(**inputs).logits, bf16(**inputs).logits.float()
    # bf16 weights and activations: ~84 bf16 roundings reach a logit (per SigLIP layer 17, per Qwen2 layer 18, patch
    # embedding, projector, head 14), each <= u_bf16 of the logits' scale; independent, the largest of ~1.6e5 logits
    # stays within the probabilistic bound LAMBDA sqrt(84) u_bf16 = 0.29 of max|logit| (tests/tolerances.py)
    assert (a - b).abs().max() < likely(84, torch.bfloat16) * a.abs().max()
    assert fp32.generate(**batch(processor, None), max_new_tokens=4).shape[0] == 1


@pytest.mark.parametrize("preset", ["ln_vit_qlora_llm", "lora_vit_qlora_llm"])
def test_qlora_trains_and_merges_on_cuda(tiny_checkpoints, tmp_path, preset):
    from pathlib import Path

    path = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy.from_yaml(Path(__file__).resolve().parents[2] / "adapters" / f"{preset}.yaml")
    model = apply_policy(load_for_policy(path, policy, dtype=torch.bfloat16, device="cuda"), policy)
    processor = NVILAProcessor.from_pretrained(path)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch(processor)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    report = export_merged(model, tmp_path / "merged", batch(processor))
    assert report.max_abs_diff <= report.tolerance


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 hardware (sm_89+)")
def test_fp8_base_lora_on_fp8_hardware(tiny_checkpoints):
    path = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(llm={"method": "fp8_lora"})
    model = apply_policy(load_for_policy(path, policy, dtype=torch.bfloat16, device="cuda"), policy)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch(NVILAProcessor.from_pretrained(path))).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 hardware (sm_89+)")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_compute_matches_bf16_on_fp8_hardware(tiny_checkpoints, recipe):
    """The CPU test (tests/test_fp8.py) with cuBLAS / CUTLASS float8 kernels: same tolerances against bf16."""
    import copy

    from nvila_ft.training.fp8 import convert_llm_to_float8

    path = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(llm={"method": "lora", "dropout": 0.0})
    model = apply_policy(load_for_policy(path, policy, dtype=torch.bfloat16, device="cuda"), policy)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    reference = copy.deepcopy(model)
    assert len(convert_llm_to_float8(model, recipe).converted) == 14
    inputs = batch(NVILAProcessor.from_pretrained(path))
    results = []
    for m in (reference, model):
        m.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(**inputs)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.requires_grad])
        results.append((float(out.loss), out.logits.detach().float(), grads))
    (loss_bf16, logits_bf16, grads_bf16), (loss, logits, grads) = results
    from tests.test_fp8 import LOGITS_TOLERANCE, grad_tolerance  # the CPU test's bounds (derived there)

    assert abs(loss - loss_bf16) / loss_bf16 < 2 * LOGITS_TOLERANCE * float(logits_bf16.abs().max()) / loss_bf16
    assert (logits - logits_bf16).norm() / logits_bf16.norm() < LOGITS_TOLERANCE
    assert UBF16 < (grads - grads_bf16).norm() / grads_bf16.norm() < grad_tolerance(recipe)
