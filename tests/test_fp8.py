"""FP8 compute (`precision.fp8`) on the CPU: which layers convert, float8 against bf16 numerics, artifacts and merged
exports identical in layout to a bf16 run's, and the start-up refusals. tests/gpu/test_cuda.py runs the same
comparison with the GPU kernels.

Tolerances, for the tiny NVILA (random weights, bf16 weights under bf16 autocast, LoRA B drawn non-zero so every
LoRA tensor gets a gradient), relative L2 error of fp8 against the bf16 model on the same batch, derived in
tests/tolerances.py from float8's unit roundoff (e4m3 2^-4, e5m2 2^-3; tests/TOLERANCES.md has the table):
    logits < the rms error of a product of two e4m3-rounded operands, sqrt(2/3) 2^-4 = 0.051
    gradients < that of the forward and the backward's own product (e5m2 gradient x e4m3 operand) in quadrature:
        tensorwise 0.096, rowwise (all e4m3) 0.072
    loss: |d loss| <= 2 max|d logit| per token, at the logits' bound
(measured: logits 0.029..0.039, gradients tensorwise 0.052..0.059, rowwise 0.041..0.049, loss 1e-5..3e-4).
The CPU kernel of `torch._scaled_mm` and torchao's emulation (`emulate=True`) form the same float8 products exactly
and differ only in the float32 accumulation order and where the scales are applied (oneDNN on AMX CPUs, ATen's
float32 fallback elsewhere): a few bf16 output roundings flip, and each later float8 cast turns a one-bf16-rounding
difference into at most 2 sqrt(u_bf16 u_float8) relative rms (`tolerances.flips`): 0.031 for e4m3 (logits),
0.044 for e5m2 (tensorwise gradients). Measured 1.1e-3 / 1.4e-2 with oneDNN's order, 0 with ATen's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nvila_ft.adapters import AdapterPolicy, PolicyError, apply_policy, load_for_policy
from nvila_ft.adapters.artifacts import save_adapters
from nvila_ft.adapters.merge import export_merged
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.training import fp8
from nvila_ft.training.config import ConfigError, Precision
from nvila_ft.training.fp8 import FP8_LAYERS_FILE, convert_llm_to_float8, has_float8_compute
from tests.test_adapters import LLM_LINEARS, probe_batch
from tests.test_cli import run_cli
from tests.tolerances import UBF16, UE4M3, flips, product_rms

pytest.importorskip("torchao")

# nvila-8b-tiny's Qwen2: hidden 64, 4 heads of 16 (k/v: 2 heads -> 32 wide), intermediate 128, vocab 2048, 2 layers:
# every decoder linear is a multiple of 16; lm_head is never converted.
EXPECTED = sorted(f"llm.model.layers.{i}.{m}" for i in range(2) for m in LLM_LINEARS)
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# the logits carry the error of float8 products of two e4m3 operands (embeddings and lm_head stay bf16)
LOGITS_TOLERANCE = product_rms(E4M3, E4M3)  # 0.051


def grad_output_dtype(recipe: str) -> torch.dtype:
    return fp8.float8_config(recipe).cast_config_grad_output.target_dtype  # tensorwise e5m2, rowwise e4m3


def grad_tolerance(recipe: str) -> float:
    """The forward's product error and the backward's own (float8 gradient x e4m3 operand), in quadrature."""
    return (product_rms(E4M3, E4M3) ** 2 + product_rms(grad_output_dtype(recipe), E4M3) ** 2) ** 0.5  # 0.096 / 0.072


def tiny_policy(method: str) -> AdapterPolicy:
    return AdapterPolicy(llm={"method": method, "dropout": 0.0}, mm_projector={"method": "full"})


def tiny(checkpoint, method: str, dtype=torch.bfloat16):
    policy = tiny_policy(method)
    model = apply_policy(load_for_policy(checkpoint, policy, dtype=dtype, device="cpu"), policy)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; non-zero, every LoRA tensor has a gradient to compare
                param.normal_(0, 0.02)
    return model


def float8_modules(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if type(m).__name__ == "Float8Linear"]


def step(model, batch):
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss), out.logits.detach().float(), grads


def relative(a: dict | torch.Tensor, b: dict | torch.Tensor) -> float:
    if isinstance(b, dict):
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5 / sum(float(v.pow(2).sum()) for v in b.values()) ** 0.5
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ which layers
@pytest.mark.parametrize("method", ["lora", "dora", "full", "frozen"])
def test_exactly_the_llm_decoder_linears_convert(tiny_checkpoints, method):
    from peft.tuners.lora import LoraLayer

    model = tiny(tiny_checkpoints["nvila-8b-tiny"], method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    conversion = convert_llm_to_float8(model, "tensorwise")

    assert sorted(conversion.converted) == EXPECTED
    assert conversion.kept == {"llm.lm_head": "output head"}
    assert conversion.summary() == "fp8 compute: 14 of 15 LLM linears converted (tensorwise)"
    assert not float8_modules(model.vision_tower) and not float8_modules(model.mm_projector)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # same parameters, same names
    found = float8_modules(model.llm)
    assert len(found) == 14
    if method in ("lora", "dora"):
        # the frozen base inside each PEFT LoRA layer; LoRA A/B stay plain linears that PEFT still drives
        assert all(name.endswith(".base_layer") for name in found)
        lora_layers = [m for m in model.llm.modules() if isinstance(m, LoraLayer)]
        assert len(lora_layers) == 14 and all(type(m.get_base_layer()).__name__ == "Float8Linear" for m in lora_layers)
        assert all(type(m.lora_A["default"]) is nn.Linear and type(m.lora_B["default"]) is nn.Linear for m in lora_layers)
    else:
        assert not any("base_layer" in name for name in found)


def test_shapes_that_are_not_multiples_of_16_stay_16_bit():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)
    model = SimpleNamespace(llm=Qwen2ForCausalLM(config))
    conversion = convert_llm_to_float8(model, "rowwise")
    assert sorted(conversion.converted) == sorted(f"llm.model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert conversion.kept == {
        "llm.model.layers.0.mlp.gate_proj": "shape 72x64 is not a multiple of 16",
        "llm.model.layers.0.mlp.up_proj": "shape 72x64 is not a multiple of 16",
        "llm.model.layers.0.mlp.down_proj": "shape 64x72 is not a multiple of 16",
        "llm.lm_head": "output head",
    }
    assert conversion.summary() == "fp8 compute: 4 of 8 LLM linears converted (rowwise)"


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp8_loss_logits_and_gradients_match_bf16(tiny_checkpoints, recipe, method, monkeypatch):
    """FP8 emulation against bf16 on the same batch, within the tolerances of the module docstring."""
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    model = tiny(checkpoint, method)
    reference = copy.deepcopy(model)
    emulated = copy.deepcopy(model)
    loss_bf16, logits_bf16, grads_bf16 = step(reference, batch)

    convert_llm_to_float8(model, recipe)  # torch._scaled_mm's CPU kernel
    loss, logits, grads = step(model, batch)
    # loss = mean(logsumexp(z) - z_label): |d loss| <= 2 max|dz|, with |dz| at the logits' bound of max|z|
    assert abs(loss - loss_bf16) / loss_bf16 < 2 * LOGITS_TOLERANCE * float(logits_bf16.abs().max()) / loss_bf16
    assert relative(logits, logits_bf16) < LOGITS_TOLERANCE
    assert relative(grads, grads_bf16) < grad_tolerance(recipe)
    assert relative(grads, grads_bf16) > UBF16  # more than one bf16 rounding: the matmuls really ran in float8
    assert all(g.abs().sum() > 0 for g in grads.values())

    config = fp8.float8_config
    monkeypatch.setattr(fp8, "float8_config", lambda name: dataclasses.replace(config(name), emulate=True))
    convert_llm_to_float8(emulated, recipe)  # torchao's emulation: dequantize, float32 matmul
    _, logits_emulated, grads_emulated = step(emulated, batch)
    # same float8 products, other float32 accumulation order / scale placement: bf16 roundings flip, and the next float8
    # cast turns a one-bf16-rounding difference into <= 2 sqrt(u_bf16 u_float8) (e4m3 forward, the recipe's gradient
    # dtype backward); a scale applied wrongly (not inverted, one operand only, 10% off) fails by 3x or more
    assert relative(logits_emulated, logits) < flips(torch.bfloat16, E4M3)  # 0.031
    assert relative(grads_emulated, grads) < flips(torch.bfloat16, grad_output_dtype(recipe))  # 0.044 / 0.031


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoints):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    model = tiny(checkpoint, "full")
    convert_llm_to_float8(model, "tensorwise")
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()  # what the Trainer calls (non-reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.llm.modules())
    _, _, plain_grads = step(model, batch)
    _, _, checkpointed_grads = step(checkpointed, batch)
    # the recompute repeats each layer's forward with the same ops on the same values (same amax, same float8 scales)
    # and the backward is the same: bit-identical on any machine. Not a rounding bound: one flipped bf16 rounding
    # would grow through the float8 casts to `flips`-size differences, so only equality tells a checkpointing bug
    assert relative(checkpointed_grads, plain_grads) == 0


# ------------------------------------------------------------------ artifacts and merged export
def tensor_layout(folder) -> dict[str, dict[str, str]]:
    """{file: {key: dtype}} of every safetensors file under a folder."""
    layout = {}
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            layout[str(file.relative_to(folder))] = {k: str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    return layout


@pytest.mark.parametrize("method", ["lora", "full"])
def test_adapters_and_merged_export_are_laid_out_as_a_bf16_run(tiny_checkpoints, tmp_path, method):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    for precision in ("bf16", "fp8"):
        model = tiny(checkpoint, method)
        if precision == "fp8":
            convert_llm_to_float8(model, "tensorwise")
            step(model, batch)
        save_adapters(model, tiny_policy(method), tmp_path / precision / "adapters")
        report = export_merged(model, tmp_path / precision / "merged", batch)
        assert report.max_abs_diff <= report.tolerance
        assert not has_float8_compute(model)  # the merged model multiplies in its own dtype
        if precision == "fp8":
            assert "without float8 compute" in report.reference
            with torch.no_grad():
                largest = float(model(**batch).logits.abs().max())
            # float8 and bf16 rounding, as trained: a product of two e4m3-rounded factors is off by at most
            # (1 + u)^2 - 1 ~ 2 u_e4m3 = 2^-3 of its terms, at the logits' scale (at least 1)
            assert 0 < report.quantization_gap < 2 * UE4M3 * max(largest, 1.0)
    for kind in ("adapters", "merged"):
        bf16, float8 = tensor_layout(tmp_path / "bf16" / kind), tensor_layout(tmp_path / "fp8" / kind)
        assert bf16 and float8 == bf16, kind


# ------------------------------------------------------------------ refusals
def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)


@pytest.mark.parametrize("capability, name", [((8, 0), "NVIDIA A100-SXM4-80GB"), ((8, 6), "NVIDIA RTX A6000"), ((7, 0), "Tesla V100")])
def test_gpus_without_fp8_are_refused_naming_the_fix(monkeypatch, capability, name):
    fake_gpu(monkeypatch, capability, name)
    with pytest.raises(ConfigError) as err:
        Precision(weights="bfloat16", autocast="bf16", fp8="tensorwise").check()
    message = str(err.value)
    assert "\n" not in message
    assert f"{name} is sm_{capability[0]}{capability[1]}" in message
    assert "use precision=bf16, or an sm_89+ GPU" in message and "L4, L40, H100, H200" in message
    Precision(weights="bfloat16", autocast="bf16").check()  # the same GPU without fp8 is fine
    Precision(weights="bfloat16", autocast="bf16", fp8="tensorwise").check(training=False)  # evaluating an fp8 run too


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_gpus_pass(monkeypatch, capability):
    fake_gpu(monkeypatch, capability, "an FP8 GPU")
    for recipe in ("tensorwise", "rowwise"):
        precision = Precision(weights="bfloat16", autocast="bf16", fp8=recipe)
        precision.check()
        AdapterPolicy().check(precision=precision)


@pytest.mark.parametrize(
    "precision, policy, message",
    [
        (dict(fp8="blockwise"), None, "precision.fp8 = 'blockwise'; use tensorwise, rowwise or null"),
        (dict(weights="float16", fp8="tensorwise"), None, "not float16; use precision=fp8"),
        (dict(weights="bfloat16", autocast="fp16", fp8="tensorwise"), None, "not float16; use precision=fp8"),
        (dict(fp8="tensorwise"), AdapterPolicy(llm={"method": "qlora"}), "adapters.llm.method = qlora stores them quantized"),
        (dict(fp8="rowwise"), AdapterPolicy(llm={"method": "fp8_lora"}), "adapters.llm.method = fp8_lora stores them quantized"),
    ],
)
def test_combinations_that_cannot_work_are_one_line_errors(precision, policy, message, monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")  # fp16 autocast on the CPU has an error of its own
    with pytest.raises(PolicyError if policy is not None else ConfigError, match=re.escape(message)) as err:
        settings = Precision(**{"weights": "bfloat16", "autocast": "bf16", **precision})
        settings.check()
        policy.check(precision=settings)
    assert "\n" not in str(err.value)


def test_cpu_runs_the_same_numerics():
    precision = Precision(weights="bfloat16", autocast="bf16", fp8="rowwise")
    precision.check()
    AdapterPolicy(llm={"method": "full"}).check(precision=precision)


# ------------------------------------------------------------------ the command line
RUN = ["adapters=ln_vit_lora_llm", "task.train.num_records=16", "trainer.per_device_train_batch_size=4", "trainer.logging_steps=1",
       "trainer.save_steps=1", "trainer.eval_steps=2", "eval.max_records=2", "eval.before_training=false"]
CPU = ["precision.fp8_on_cpu=true"]  # without CUDA, the float8 numerics on the CPU are asked for


def test_lora_finetune_resume_and_export_with_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_cli")
    cache = root / "cache"
    run = root / "fp8"
    first = run_cli(["finetune", "precision=fp8", "precision.fp8=rowwise", *CPU, "trainer.gradient_checkpointing=true",
                     "trainer.max_steps=2", *RUN, f"hydra.run.dir={run}"], root, cache)
    assert "fp8 compute: 14 of 15 LLM linears converted (rowwise); kept in bfloat16: llm.lm_head (output head)" in first.stdout
    assert sorted((run / FP8_LAYERS_FILE).read_text().splitlines()) == EXPECTED  # one a line, in model order
    run_cli(["finetune", f"run={run}", "trainer.resume=true", "trainer.max_steps=3"], root, cache)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3

    exported = run_cli(["export", f"run={run}", f"hydra.run.dir={root / 'export'}"], root, cache)
    assert "probe check" in exported.stdout
    bf16 = root / "bf16"
    run_cli(["finetune", "precision=bf16", "trainer.max_steps=1", *RUN, f"hydra.run.dir={bf16}"], root, cache)
    run_cli(["export", f"run={bf16}", f"hydra.run.dir={root / 'export_bf16'}"], root, cache)
    assert not (bf16 / FP8_LAYERS_FILE).exists()
    layout = tensor_layout(run / "export-merged")
    assert layout and layout == tensor_layout(bf16 / "export-merged")
    assert tensor_layout(run / "final") == tensor_layout(bf16 / "final")


def test_fp8_with_a_quantized_llm_is_refused_before_loading(tmp_path):
    from tests.test_cli import one_line_error

    result = run_cli(["finetune", "precision=fp8", "adapters=ln_vit_qlora_llm", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path,
                     tmp_path / "cache", check=False)
    assert "adapters.llm.method = qlora stores them quantized; use adapters.llm.method=lora" in one_line_error(result)
    assert not (tmp_path / "r" / "base").exists()
