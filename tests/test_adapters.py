"""Adapter policies on the tiny NVILA: every preset of `adapters/` end to end, plus the impossible combinations.

Expected trainable-parameter sets are written out from the architecture (layer counts, module names), not
read back from the code under test.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvila_ft.adapters import AdapterPolicy, PolicyError, apply_policy, format_report, load_for_policy, trainable_report
from nvila_ft.adapters.artifacts import load_adapters, save_adapters
from nvila_ft.adapters.merge import ExportError, export_merged
from nvila_ft.adapters.optim import parameter_groups
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from tests.tolerances import TINY_FORWARD, UBF16, likely, reordered, scale_of, worst

ROOT = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted(p for p in (ROOT / "adapters").glob("*.yaml") if p.stem != "none")  # none: no adapters at all
BASE_LR = 1e-3

# nvila-8b-tiny: SigLIP 3 layers, select layer -2 -> layers 0 and 1 are used; Qwen2 2 layers.
USED_VISION_LAYERS = (0, 1)
VISION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def vision_names(config) -> set[str]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(**config.vision_tower))
    names = {n.removeprefix("vision_model.") for n, _ in model.named_parameters()}
    return {n for n in names if not re.match(r"encoder\.layers\.2\.|post_layernorm\.", n)}  # unused by select -2


def expected_trainable(policy: AdapterPolicy, model) -> dict[str, set[str]]:
    config = model.config
    out = {}
    vision = policy.vision_tower.method
    out["vision_tower"] = {
        "frozen": set(),
        "layernorm": {f"encoder.layers.{i}.layer_norm{j}.{w}" for i in USED_VISION_LAYERS for j in (1, 2) for w in ("weight", "bias")},
        "full": vision_names(config),
        "lora": {f"encoder.layers.{i}.{m}.lora_{ab}.weight" for i in USED_VISION_LAYERS for m in VISION_LINEARS for ab in "AB"},
    }[vision]
    out["mm_projector"] = {"full": {f"layers.{i}.{w}" for i in (1, 2, 4) for w in ("weight", "bias")}, "frozen": set()}[
        policy.mm_projector.method
    ]
    llm = policy.llm.method
    lora = {f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in LLM_LINEARS for ab in "AB"}
    full = {n for n, _ in copy.deepcopy(model.llm).named_parameters()}
    out["llm"] = {
        "frozen": set(),
        "lora": lora,
        "rslora": lora,
        "loraplus": lora,
        "pissa": lora,
        "qlora": lora,
        "fp8_lora": lora,
        "dora": lora | {f"model.layers.{i}.{m}.lora_magnitude_vector.weight" for i in range(2) for m in LLM_LINEARS},
        "full": full,
    }[llm]
    return out


def actual_trainable(model) -> dict[str, set[str]]:
    out = {"vision_tower": set(), "mm_projector": set(), "llm": set()}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = next(c for c in out if name.startswith(c + "."))
        local = name[len(component) + 1 :]
        local = local.removeprefix("model.") if component == "vision_tower" else local
        local = local.replace("base_model.model.", "").replace(".default", "").removeprefix("vision_model.")
        out[component].add(local)
    return out


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A comparable copy; float8 (torchao) weights are compared through their dequantized values."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "dequantize"):
        return tensor.dequantize().detach().clone()
    return tensor.detach().clone()


def probe_batch(processor: NVILAProcessor, answer: str = "A red circle."):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    return processor(
        [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": answer}],
            [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        ]
    )


def loaded(checkpoint, policy):
    model = load_for_policy(checkpoint, policy, device="cpu")
    return apply_policy(model, policy)


@pytest.mark.parametrize("preset_file", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_end_to_end(preset_file, tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy.from_yaml(preset_file)
    assert policy.name == preset_file.stem
    model = loaded(checkpoint, policy)
    processor = NVILAProcessor.from_pretrained(checkpoint)
    batch = probe_batch(processor)

    # 1. exactly the expected parameters train
    assert actual_trainable(model) == expected_trainable(policy, model)
    report = {r.component: r for r in trainable_report(model)}
    assert sum(r.trainable for r in report.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "all" in format_report(list(report.values()))

    # 2. one optimizer group per (component, decay/no-decay), with the configured learning rates
    groups = parameter_groups(model, policy, BASE_LR, weight_decay=0.01)
    for group in groups:
        component, kind = group["name"].split("/")
        kind, _, times = kind.partition("@lr_x")  # LoRA+: its B matrices at a multiple of the component's rate
        component_policy = getattr(policy, component)
        assert group["lr"] == pytest.approx(component_policy.learning_rate(BASE_LR) * float(times or 1), rel=worst(2, torch.float64))
        assert group["weight_decay"] == (0.0 if kind == "no_decay" else 0.01)
        if component == "vision_tower" and component_policy.trains:
            assert group["lr"] == pytest.approx(BASE_LR * 0.1, rel=worst(2, torch.float64))  # one float64 product
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == sum(1 for p in model.parameters() if p.requires_grad)

    # 3. two optimizer steps change exactly the trainable parameters (LoRA A moves once B is non-zero)
    optimizer = torch.optim.AdamW(groups)
    before = {n: plain(p) for n, p in model.named_parameters()}
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], plain(p))}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}

    # 4. adapter artifacts reload onto the base checkpoint and give the same logits (fp32: exactly); PiSSA's is a LoRA
    # of the original base (W x + s [B, -B0] [A; A0] x against the trained W_res x + s B A x): the forward's bound
    with torch.no_grad():
        adapted = model(**batch).logits
    save_adapters(model, policy, tmp_path / "adapters")
    fresh = load_for_policy(checkpoint, policy, device="cpu")
    load_adapters(fresh, tmp_path / "adapters")
    exact = policy.llm.method != "pissa"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, adapted,
                                   **(dict(rtol=0, atol=0) if exact else reordered(TINY_FORWARD, scale_of(adapted))))

    # 5. merged export in the official layout reproduces the adapted model
    report = export_merged(model, tmp_path / "merged", batch)
    merged = NVILAForConditionalGeneration.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        logits = merged(**batch).logits
        torch.testing.assert_close(logits, model(**batch).logits, rtol=0, atol=0)  # `model` is now the merged one
    if report.quantization_gap is None:  # 16-bit bases: W x + s B A x against (W + s B A) x, float32, reordered
        torch.testing.assert_close(logits, adapted, **reordered(TINY_FORWARD, float(adapted.abs().max())))
    else:  # quantized base: checked against the trained model, the 4-bit kernels' gap (small) allowed on top
        assert float((logits - adapted).abs().max()) <= report.tolerance
        # the 4-bit layers compute in bfloat16: about 16 bf16 roundings reach a logit along the chain
        assert report.quantization_gap < likely(16, torch.bfloat16) * float(adapted.abs().max())


def test_llm_adapter_is_a_plain_peft_adapter_of_qwen2(tiny_checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy.from_yaml(ROOT / "adapters" / "ln_vit_lora_llm.yaml")
    model = loaded(checkpoint, policy)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    save_adapters(model, policy, tmp_path / "out")
    plain = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(checkpoint / "llm"), tmp_path / "out" / "llm").eval()
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model.llm(input_ids=ids).logits, rtol=0, atol=0)


def test_merged_llm_and_vision_load_with_plain_transformers(tiny_checkpoints, tmp_path):
    from transformers import Qwen2ForCausalLM, SiglipVisionModel

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy.from_yaml(ROOT / "adapters" / "lora_vit_lora_llm.yaml")
    model = loaded(checkpoint, policy)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    export_merged(model, tmp_path / "merged", probe_batch(NVILAProcessor.from_pretrained(checkpoint)))
    llm = Qwen2ForCausalLM.from_pretrained(tmp_path / "merged" / "llm")
    vision = SiglipVisionModel.from_pretrained(tmp_path / "merged" / "vision_tower")
    for ours, theirs in ((model.llm, llm), (model.vision_tower.model, vision)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    base = NVILAForConditionalGeneration.from_pretrained(checkpoint)
    assert not torch.equal(base.llm.model.layers[0].self_attn.q_proj.weight, llm.model.layers[0].self_attn.q_proj.weight)


def test_export_refuses_a_wrong_merge_and_keeps_the_target(tiny_checkpoints, tmp_path, monkeypatch):
    from nvila_ft.adapters import merge as merge_module

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy.from_yaml(ROOT / "adapters" / "ln_vit_lora_llm.yaml")
    model = loaded(checkpoint, policy)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("old export")
    original = merge_module.merge_adapters

    def broken_merge(m, qlora_merge="dequantized"):  # drops the LLM adapter instead of merging it
        m.llm = m.llm.unload()
        return original(m, qlora_merge)

    monkeypatch.setattr(merge_module, "merge_adapters", broken_merge)
    with pytest.raises(ExportError, match=r"differ from the adapted model by .* \(tolerance"):
        export_merged(model, target, probe_batch(NVILAProcessor.from_pretrained(checkpoint)), overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("mode", ["dequantized", "original"])
def test_qlora_merge_modes(tiny_checkpoints, tmp_path, mode):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy.from_yaml(ROOT / "adapters" / "frozen_vit_qlora_llm.yaml")
    model = loaded(checkpoint, policy)
    q_proj = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit" and q_proj.base_layer.weight.dtype == torch.uint8
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    delta = (q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight) * q_proj.scaling["default"]
    from nvila_ft.adapters.merge import dequantize

    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    with torch.no_grad():
        model(**batch)  # bitsandbytes repacks 4-bit weights for its CPU kernel here (absmax rounded to bf16)
    q_proj.base_layer.state_dict()  # ... and unpacks them when they are read
    dequantized = dequantize(q_proj.base_layer.weight, torch.float32)
    report = export_merged(model, tmp_path / mode, batch, qlora_merge=mode)
    merged = NVILAForConditionalGeneration.from_pretrained(tmp_path / mode).llm.model.layers[0].self_attn.q_proj.weight
    original = NVILAForConditionalGeneration.from_pretrained(checkpoint).llm.model.layers[0].self_attn.q_proj.weight
    base = dequantized if mode == "dequantized" else original
    rank = q_proj.lora_A["default"].weight.shape[0]  # B A sums r products, then one addition to the base
    torch.testing.assert_close(merged, base + delta, **reordered(rank + 2, scale_of(base + delta)))
    assert report.quantization_gap is not None and mode in report.reference


def test_qlora_8bit_and_qdora(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(
        vision_tower={"method": "qlora", "quantization": {"bits": 8}, "lr_ratio": 0.1},
        mm_projector={"method": "full"},
        llm={"method": "qlora", "dora": True},
    )
    model = loaded(checkpoint, policy)
    assert type(model.vision_tower.model.base_model.model.encoder.layers[0].mlp.fc1.base_layer).__name__ == "Linear8bitLt"
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    export_merged(model, tmp_path / "m", batch)
    with torch.no_grad():
        merged = NVILAForConditionalGeneration.from_pretrained(tmp_path / "m")(**batch).logits
    # the merged 16-bit model answers like the quantized one it came from, up to the quantization gap (int8
    # matmuls quantize activations too, so the gap is larger than with 4-bit alone); raw codes would be far off
    assert float((merged - adapted).abs().max()) < 0.25 * float(adapted.abs().max())


@pytest.mark.parametrize(
    "policy, message",
    [
        (dict(mm_projector={"method": "qlora"}), "mm_projector.method = qlora"),
        (dict(mm_projector={"method": "fp8_lora"}), "mm_projector.method = fp8_lora"),
        (dict(vision_tower={"method": "frozen"}, mm_projector={"method": "frozen"}, llm={"method": "frozen"}), "trains nothing"),
        (dict(llm={"method": "lora", "dora": True}), "method: dora"),
        (dict(llm={"method": "lora", "lr": 1e-4, "lr_ratio": 0.5}), "lr or lr_ratio"),
        (dict(llm={"method": "lora", "r": 0}), "rank must be >= 1"),
        (dict(llm={"method": "prefix_tuning"}), "choose one of"),
        (dict(llm={"method": "qlora", "quantization": {"bits": 3}}), "4 or 8"),
        (dict(llm={"method": "lora", "lr": 0.0}), "zero learning rate"),
    ],
)
def test_impossible_policies_fail_before_loading(policy, message):
    with pytest.raises(PolicyError, match=re.escape(message)):
        AdapterPolicy(**policy).check()


def test_policy_errors_that_need_the_model(tiny_checkpoints):
    from nvila_ft.model.presets import build_model

    with pytest.raises(PolicyError, match="load_for_policy"):
        apply_policy(build_model("nvila-8b-tiny"), AdapterPolicy(llm={"method": "qlora"}))
    with pytest.raises(PolicyError, match="adapters.llm"):
        apply_policy(build_model("nvila-8b-tiny"), AdapterPolicy(llm={"method": "lora", "target_modules": ["no_such_proj"]}))
    model = build_model("nvila-8b-tiny")
    model.config.mm_projector["mm_projector_type"] = "linear"
    with pytest.raises(PolicyError, match="no LayerNorm"):
        AdapterPolicy(mm_projector={"method": "layernorm"}).check(model.config)
    with pytest.raises(PolicyError, match=r"unknown keys \['rank'\]"):
        AdapterPolicy.from_dict({"llm": {"method": "lora", "rank": 8}})


def test_explicit_targets_and_per_component_ranks(tiny_checkpoints):
    policy = AdapterPolicy(
        vision_tower={"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
        llm={"method": "lora", "r": 6, "alpha": 12, "target_modules": ["q_proj", "v_proj", "lm_head"]},
    )
    model = loaded(tiny_checkpoints["nvila-8b-tiny"], policy)
    trainable = actual_trainable(model)
    assert {n for n in trainable["llm"] if "lm_head" in n} == {"lm_head.lora_A.weight", "lm_head.lora_B.weight"}
    assert model.llm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (6, 64)
    layers = model.vision_tower.model.base_model.model.encoder.layers
    assert len(layers) == 2  # the layer after the selected one is not loaded
    for layer in layers:  # explicit targets are taken as given, every layer
        assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (2, 32)


def test_unknown_lora_target_lists_the_valid_names(tiny_checkpoints):
    from nvila_ft.model.presets import build_model

    with pytest.raises(PolicyError) as error:
        apply_policy(build_model("nvila-8b-tiny"), AdapterPolicy(llm={"method": "lora", "target_modules": ["q_proj", "qproj"]}))
    assert str(error.value) == (
        "adapters.llm.target_modules: 'qproj' matches no layer of the llm; valid names: "
        "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )
    with pytest.raises(PolicyError, match="valid names: fc1, fc2, k_proj, out_proj, patch_embedding|valid names: fc1"):
        apply_policy(build_model("nvila-8b-tiny"), AdapterPolicy(vision_tower={"method": "lora", "target_modules": ["o_proj"]}))


def test_norms_biases_and_dora_magnitudes_are_the_only_undecayed_parameters(tiny_checkpoints):
    # which parameters land in the no-decay groups, found from the modules themselves (not the group names)
    policy = AdapterPolicy(vision_tower={"method": "full"}, mm_projector={"method": "full"}, llm={"method": "dora"})
    model = loaded(tiny_checkpoints["nvila-8b-tiny"], policy)
    groups = parameter_groups(model, policy, BASE_LR, weight_decay=0.1)
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    expected_undecayed = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, (torch.nn.LayerNorm,)) or "RMSNorm" in type(module).__name__ or name == "bias" \
                    or "lora_magnitude_vector" in module_name:
                expected_undecayed.add(id(param))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert undecayed == expected_undecayed and decayed == trainable - expected_undecayed
    assert len(undecayed) > 20 and len(decayed) > 20


@pytest.mark.parametrize("component", ["llm", "vision_tower"])
def test_8bit_qlora_export_after_a_forward_pass_holds_real_weights(tiny_checkpoints, tmp_path, component):
    # bitsandbytes moves the int8 row scales from the weight to the layer on the first forward pass; the merged
    # weights are checked against the checkpoint's own float weights plus the LoRA delta, not against our code
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    other = "vision_tower" if component == "llm" else "llm"
    policy = AdapterPolicy(**{component: {"method": "qlora", "quantization": {"bits": 8}}, other: {"method": "frozen"}})
    model = loaded(checkpoint, policy)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    if component == "llm":
        layer = model.llm.base_model.model.model.layers[0].self_attn.q_proj
        original = NVILAForConditionalGeneration.from_pretrained(checkpoint).llm.model.layers[0].self_attn.q_proj.weight
    else:
        layer = model.vision_tower.model.base_model.model.encoder.layers[0].mlp.fc1
        original = NVILAForConditionalGeneration.from_pretrained(checkpoint).vision_tower.model.encoder.layers[0].mlp.fc1.weight
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    with torch.no_grad():
        model(**batch)
    assert getattr(layer.base_layer.weight, "SCB", None) is None  # bitsandbytes has moved the scales
    export_merged(model, tmp_path / "m", batch)
    merged = NVILAForConditionalGeneration.from_pretrained(tmp_path / "m")
    weight = (merged.llm.model.layers[0].self_attn.q_proj if component == "llm" else merged.vision_tower.model.encoder.layers[0].mlp.fc1).weight
    # int8 absmax rounding: within one step (row absmax / 127; bitsandbytes keeps the scales in float16) of the
    # checkpoint's weight, where raw codes would be off by up to 127
    step = original.abs().amax(dim=1, keepdim=True) / 127
    error = ((weight - delta - original).abs() / step).max()
    assert error <= 1.0, error


def test_export_refuses_a_dequantization_that_does_not_match_the_checkpoint(tiny_checkpoints, tmp_path, monkeypatch):
    from nvila_ft.adapters import merge as merge_module

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(vision_tower={"method": "frozen"}, llm={"method": "qlora", "quantization": {"bits": 8}})
    model = loaded(checkpoint, policy)
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    raw_codes = lambda tensor, dtype, row_scales=None: tensor.detach().to(dtype)  # noqa: E731 - the old bug
    monkeypatch.setattr(merge_module, "dequantize", raw_codes)
    with pytest.raises(ExportError, match=r"differs from the checkpoint's .* nothing was written"):
        export_merged(model, tmp_path / "m", batch)
    assert not (tmp_path / "m").exists()


def test_export_refuses_a_merge_off_by_one_percent_of_the_adapter(tiny_checkpoints, tmp_path, monkeypatch):
    """The float32 check is tight: adapters merged at 101% of their scale (a wrong LoRA scaling) are refused."""
    from nvila_ft.adapters import merge as merge_module

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = loaded(checkpoint, AdapterPolicy.from_yaml(ROOT / "adapters" / "ln_vit_lora_llm.yaml"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    original = merge_module.merge_adapters

    def scaled_merge(m, qlora_merge="dequantized"):
        with torch.no_grad():
            for name, param in m.named_parameters():
                if "lora_B" in name:
                    param.mul_(1.01)
        return original(m, qlora_merge)

    monkeypatch.setattr(merge_module, "merge_adapters", scaled_merge)
    with pytest.raises(ExportError, match=r"differ from the adapted model"):
        export_merged(model, tmp_path / "m", probe_batch(NVILAProcessor.from_pretrained(checkpoint)))
    assert not (tmp_path / "m").exists()


def test_export_refuses_a_dequantization_off_by_a_factor_of_two(tiny_checkpoints, tmp_path, monkeypatch):
    """Not only raw codes: int8 weights dequantized at twice their scale differ from the checkpoint by about their
    own size, far over the limit (a quarter of the largest value); nothing is written."""
    from nvila_ft.adapters import merge as merge_module

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(vision_tower={"method": "frozen"}, llm={"method": "qlora", "quantization": {"bits": 8}})
    model = loaded(checkpoint, policy)
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    original = merge_module.dequantize
    monkeypatch.setattr(merge_module, "dequantize", lambda tensor, dtype, row_scales=None: 2 * original(tensor, dtype, row_scales))
    with pytest.raises(ExportError, match=r"differs from the checkpoint's .* nothing was written"):
        export_merged(model, tmp_path / "m", batch)
    assert not (tmp_path / "m").exists()


def test_merged_model_is_plain_and_frozen(tiny_checkpoints):
    """merge_adapters leaves no adapter tensor in any component (the projector's LoRA too) and nothing trainable
    (a merged model is an inference or reference model), keeps the logits, and carries no policy of its own (its
    caller holds the policy it went through)."""
    from nvila_ft.adapters.apply import get_component
    from nvila_ft.adapters.merge import merge_adapters
    from nvila_ft.adapters.policy import COMPONENTS

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(vision_tower={"method": "lora"}, mm_projector={"method": "lora"}, llm={"method": "lora"})
    model = loaded(checkpoint, policy).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        assert all(any("lora_" in n for n, _ in get_component(model, c).named_parameters()) for c in COMPONENTS)
        batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
        adapted = model(**batch).logits
        merge_adapters(model)
        merged = model(**batch).logits
    assert not any(p.requires_grad for p in model.parameters())
    assert not any("lora_" in name or "base_layer" in name for name, _ in model.named_parameters())
    assert not hasattr(model, "adapter_policy") and not hasattr(model, "merged_from_policy")
    torch.testing.assert_close(merged, adapted, **reordered(TINY_FORWARD, float(adapted.abs().max())))


def test_export_checks_the_dtype_it_writes(tiny_checkpoints, tmp_path):
    """A float32 run exported in bf16: the reported difference is that of the bf16 checkpoint written (reloaded
    here), not of a float32 merge, so the check sees the export's rounding."""
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    model = loaded(checkpoint, AdapterPolicy.from_yaml(ROOT / "adapters" / "ln_vit_lora_llm.yaml")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
        adapted = model(**batch).logits.float()
    report = export_merged(model, tmp_path / "bf16", batch, dtype=torch.bfloat16)
    written = NVILAForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = float((written(**batch).logits.float() - adapted).abs().max())
    assert diff > reordered(TINY_FORWARD, float(adapted.abs().max()))["atol"]  # bf16's rounding, beyond float32's
    # the report's difference is this one: the written bf16 weights through the same operations
    assert report.max_abs_diff == pytest.approx(diff, abs=2 * UBF16 * float(adapted.abs().max()))
