"""DoRA on a quantized base (qlora / fp8_lora), trained, then merged and exported, and the export check that compares
the merged model with the model as it was trained.

An untrained DoRA adapter cannot show a lost magnitude vector: its magnitudes still equal the column norms of the
base weight, which is what a re-wrap without them starts from. Here the magnitudes move (a few optimizer steps, or
set by hand) before anything is exported.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nvila_ft.adapters import AdapterPolicy
from nvila_ft.adapters.apply import get_component
from nvila_ft.adapters.merge import ExportError, export_merged
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from tests.test_adapters import LLM_LINEARS, loaded, probe_batch

# float32 (unit roundoff u = 2^-24 = 6e-8): the merged weights round W + s*BA (DoRA: times m / |W + s*BA|) a few
# times per element, and a logit of the tiny LLM (hidden 64, MLP 128, 2 layers) passes through sequential dot
# products of about 1000 terms in all (per layer q/k/v 64, scores 16, values ~100 positions, o 64, gate/up 64,
# down 128; lm_head 64): to first order 1000 u = 6e-5 of the logits' scale, so 1e-4 of the largest logit.
FLOAT32_MERGE_RTOL = 1e-4


def dora_policy(method: str, compute_dtype: str = "float32") -> AdapterPolicy:
    """DoRA on the LLM's quantized base, everything else frozen. compute_dtype float32: the 4-bit layers dequantize
    to the very float32 weights the merge goes into and multiply in float32, so the trained and the merged model
    differ by float32 rounding alone."""
    llm = {"method": method, "dora": True, "alpha": 16}
    if method == "qlora":
        llm["quantization"] = {"bits": 4, "quant_type": "nf4", "compute_dtype": compute_dtype}
    return AdapterPolicy(vision_tower={"method": "frozen"}, mm_projector={"method": "frozen"}, llm=llm)


def dora_layers(model) -> dict[str, torch.nn.Module]:
    """Every adapted LLM linear, by its plain name (model.layers.<i>.<module>)."""
    layers = model.llm.base_model.model.model.layers
    return {f"{i}.{m}": layers[i].get_submodule(m) for i in range(len(layers)) for m in LLM_LINEARS}


def magnitudes(model) -> dict[str, torch.Tensor]:
    return {name: layer.lora_magnitude_vector["default"].weight for name, layer in dora_layers(model).items()
            if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector}


def assert_quantized_base(layer: torch.nn.Module, method: str) -> None:
    base = layer.get_base_layer()
    if method == "qlora":
        assert type(base).__name__ == "Linear4bit" and base.weight.dtype == torch.uint8
    else:
        assert type(base).__name__ == "Float8StorageLinear" and base.weight.qdata.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("method", ["qlora", "fp8_lora"])
def test_quantized_dora_trains_its_magnitudes_and_the_export_keeps_them(tiny_checkpoints, tmp_path, method):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = loaded(checkpoint, dora_policy(method))
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))

    # dora=true on a quantized base gives every adapted linear a trainable magnitude vector (not plain LoRA)
    layers = dora_layers(model)
    assert len(layers) == 2 * len(LLM_LINEARS)
    for layer in layers.values():
        assert_quantized_base(layer, method)
    found = magnitudes(model)
    assert set(found) == set(layers), sorted(set(layers) - set(found))
    assert all(m.requires_grad for m in found.values())

    # two steps at a high learning rate: every magnitude gets a gradient and moves
    start = {name: m.detach().clone() for name, m in found.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in found.values())
        optimizer.step()
    model.eval()
    moved = {name for name, m in magnitudes(model).items() if not torch.equal(m, start[name])}
    assert moved == set(layers)
    with torch.no_grad():
        trained = model(**batch).logits.float()

    # the export, reloaded from disk, answers like the trained model: only float32 rounding apart (see dora_policy)
    report = export_merged(model, tmp_path / "merged", batch)
    exported = NVILAForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = exported(**batch).logits.float()
    scale = max(float(trained.abs().max()), 1.0)
    assert float((logits - trained).abs().max()) <= FLOAT32_MERGE_RTOL * scale
    assert report.quantization_gap is not None and report.quantization_gap <= FLOAT32_MERGE_RTOL * scale


def rewrap_without_magnitudes(model, name, base):
    """`merge.rewrap` with the DoRA magnitudes left out of the copied adapter: they restart from the 16-bit base's
    column norms, the magnitudes of an untrained adapter."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    module = get_component(model, name)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items() if "lora_magnitude_vector" not in k}
    wrapped = get_peft_model(base, copy.deepcopy(module.peft_config["default"]))
    set_peft_model_state_dict(wrapped, adapter)
    return wrapped.train(module.training)


@pytest.mark.parametrize("method, compute_dtype", [("qlora", "bfloat16"), ("fp8_lora", None)])
def test_export_check_refuses_a_rewrap_that_drops_the_dora_magnitudes(tiny_checkpoints, tmp_path, monkeypatch, method, compute_dtype):
    """The check compares with the model as it was trained, not with the same adapter re-wrapped by the same code on
    the 16-bit base, so what the re-wrap loses shows. qlora with its default bfloat16 compute: the allowed
    quantization gap (4-bit kernels in bfloat16) does not hide it either."""
    from nvila_ft.adapters import merge as merge_module

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = loaded(checkpoint, dora_policy(method, compute_dtype or "float32")).eval()
    with torch.no_grad():  # an adapter that has moved: LoRA B non-zero, magnitudes 0.5x to 1.5x their start
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * (2 * torch.rand_like(param) - 1))
    monkeypatch.setattr(merge_module, "rewrap", rewrap_without_magnitudes)
    with pytest.raises(ExportError, match=r"differ from the adapted model on the quantized llm base, as trained .* nothing was written"):
        export_merged(model, tmp_path / "merged", probe_batch(NVILAProcessor.from_pretrained(checkpoint)))
    assert not (tmp_path / "merged").exists()
