"""`fp8_lora` bases: float8 weights that keep no 16-bit copy of themselves for backward, same arithmetic as torchao."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")
from torchao.quantization import Float8WeightOnlyConfig, quantize_  # noqa: E402

from nvila_ft.adapters.float8_weights import Float8StorageLinear, keep_float8_for_backward  # noqa: E402


def saved_shapes_and_result(linear, inputs, autocast):
    shapes = []
    inputs.grad = None
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: (shapes.append((tuple(t.shape), t.dtype)), t)[1], lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), hooks:
        out = linear(inputs)
    (out.float() ** 2).sum().backward()
    return shapes, out.detach(), inputs.grad.clone()


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-input-autocast"])
@pytest.mark.parametrize("bias", [True, False])
def test_float8_weight_linear_equals_torchao_and_saves_no_16_bit_copy(autocast, bias):
    linear = torch.nn.Linear(96, 40, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    quantize_(linear, Float8WeightOnlyConfig())
    inputs = torch.randn(3, 5, 96, dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    plain_saved, plain_out, plain_grad = saved_shapes_and_result(linear, inputs, autocast)
    keep_float8_for_backward(linear)
    assert isinstance(linear, Float8StorageLinear) and isinstance(linear, torch.nn.Linear)
    saved, out, grad = saved_shapes_and_result(linear, inputs, autocast)
    assert torch.equal(out, plain_out) and torch.equal(grad, plain_grad)  # bit for bit
    # torchao's path saves the dequantized 16-bit weight [in, out]; this one only the float8 tensor itself
    assert ((96, 40), torch.bfloat16) in plain_saved
    assert saved == [((40, 96), torch.bfloat16)]  # the Float8Tensor (its nominal dtype), whose data are 1 byte each
    assert linear.weight.qdata.dtype == torch.float8_e4m3fn


def test_only_frozen_linears_are_converted():
    linear = torch.nn.Linear(16, 16)
    quantize_(linear.requires_grad_(False), Float8WeightOnlyConfig())
    linear.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        keep_float8_for_backward(linear)


def test_fp8_lora_policy_uses_it_on_every_float8_base(tiny_checkpoints):
    from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
    from tests.test_planner import ROOT

    policy = AdapterPolicy.from_yaml(str(ROOT / "adapters" / "ln_vit_fp8_lora_llm.yaml"))
    model = apply_policy(load_for_policy(tiny_checkpoints["nvila-8b-tiny"], policy, torch.bfloat16, "cpu"), policy)
    float8 = [m for m in model.llm.modules() if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata")]
    assert float8 and all(isinstance(m, Float8StorageLinear) for m in float8)


def test_default_targets_are_stored_in_float8_as_they_load_and_equal_conversion_after_loading(tiny_checkpoints):
    """fp8_lora with its default targets goes through transformers' torchao quantization on load (the whole 16-bit
    LLM is never in memory at once); named targets are converted after loading. Both give the same float8 weights,
    the same LoRA layers and the same trainable names."""
    from dataclasses import replace

    from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
    from nvila_ft.adapters.apply import is_quantized
    from nvila_ft.adapters.methods.fp8_lora import float8_on_load
    from tests.test_planner import ROOT

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    default = AdapterPolicy.from_yaml(str(ROOT / "adapters" / "ln_vit_fp8_lora_llm.yaml"))
    named = replace(default, llm=replace(default.llm, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert float8_on_load(default.llm) is not None and float8_on_load(named.llm) is None
    loaded = load_for_policy(checkpoint, default, torch.bfloat16, "cpu")
    assert is_quantized(loaded.llm)  # float8 straight from the loader
    assert not is_quantized(load_for_policy(checkpoint, named, torch.bfloat16, "cpu").llm)
    on_load = apply_policy(loaded, default)
    after = apply_policy(load_for_policy(checkpoint, named, torch.bfloat16, "cpu"), named)
    assert [n for n, p in on_load.named_parameters() if p.requires_grad] == [n for n, p in after.named_parameters() if p.requires_grad]
    weights = lambda model: {n: m.weight.dequantize() for n, m in model.llm.named_modules() if isinstance(m, Float8StorageLinear)}  # noqa: E731
    first, second = weights(on_load), weights(after)
    assert first.keys() == second.keys() and len(first) == 7 * 2  # seven linears in each of the two layers
    assert all(torch.equal(first[n], second[n]) for n in first)
