"""The method registry (`nvila_ft.adapters.methods`): methods declare their own options, old policy files still
load, and each method added beside the originals (rsLoRA, PiSSA, LoRA+) does what its paper and PEFT say.

The presets of the added methods also go through every per-preset test of tests/test_adapters.py (trainable names,
optimizer steps, adapter-only round trip, merged export in the official layout) and tests/test_planner.py (planned
bytes exact).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from nvila_ft.adapters import AdapterPolicy, PolicyError
from nvila_ft.adapters.methods import REGISTRY
from safetensors.torch import load_file

from nvila_ft.adapters import load_for_policy
from nvila_ft.adapters.artifacts import load_adapters, restore_adapter_weights, save_adapters
from nvila_ft.adapters.merge import export_merged
from nvila_ft.adapters.optim import parameter_groups
from nvila_ft.adapters.policy import METHODS
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from tests.test_adapters import BASE_LR, actual_trainable, loaded, probe_batch
from tests.tolerances import TINY_FORWARD, reordered, scale_of, worst


def test_every_method_is_one_registry_line():
    assert METHODS == tuple(REGISTRY)
    assert all(method.name == name for name, method in REGISTRY.items())


def test_a_method_option_is_given_beside_the_common_fields_and_saved_with_its_default():
    policy = AdapterPolicy(llm={"method": "qlora", "dora": True})
    assert policy.llm.options == {"rslora": False, "dora": True}
    saved = policy.to_dict()["llm"]
    assert saved["dora"] is True and saved["rslora"] is False and "options" not in saved
    assert AdapterPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


@pytest.mark.parametrize(
    "llm, message",
    [
        ({"method": "lora", "rank": 8}, "adapters.llm: unknown keys ['rank']"),
        ({"method": "frozen", "rslora": True}, "adapters.llm.rslora is an option of method lora / dora / "),
        ({"method": "frozen", "rslora": True}, ", not frozen; set adapters.llm.method to lora or leave rslora out"),
        ({"method": "lora", "dora": True}, "adapters.llm.dora applies to qlora/fp8_lora; for a 16-bit base use method: dora"),
        ({"method": "qlora", "dora": "yes"}, "adapters.llm.dora = 'yes': expected a bool"),
        ({"method": "rslora", "rslora": True}, "adapters.llm.rslora: method rslora always scales by alpha / sqrt(r); leave rslora out"),
    ],
)
def test_an_option_the_method_does_not_have_is_a_one_line_error_naming_the_fix(llm, message):
    with pytest.raises(PolicyError, match=re.escape(message)) as err:
        AdapterPolicy(llm=llm).check()
    assert "\n" not in str(err.value)


def test_policy_files_written_before_methods_declared_options_still_load():
    """Every component of an old adapter_policy.json holds `rslora` and `dora` (false unless set)."""
    common = {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": None, "exclude_modules": None, "lr": None,
              "lr_ratio": None, "weight_decay": None,
              "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "storage_dtype": "uint8"}}
    old = {"vision_tower": {"method": "layernorm", **common, "rslora": False, "dora": False},
           "mm_projector": {"method": "full", **common, "rslora": False, "dora": False},
           "llm": {"method": "qlora", **common, "rslora": True, "dora": True}, "name": "old"}
    policy = AdapterPolicy.from_dict(old)
    policy.check()
    assert policy.vision_tower.options == policy.mm_projector.options == {}
    assert policy.llm.options == {"rslora": True, "dora": True}


# ------------------------------------------------------------------ rsLoRA
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    rslora = AdapterPolicy(llm={"method": "rslora", "r": 4, "alpha": 8})
    model = loaded(checkpoint, rslora)
    scalings = {layer.scaling["default"] for layer in model.llm.modules() if isinstance(getattr(layer, "scaling", None), dict)}
    assert scalings == {8 / math.sqrt(4)}  # LoRA's would be 8 / 4
    lora = loaded(checkpoint, AdapterPolicy(llm={"method": "lora", "r": 4, "alpha": 8}))
    assert actual_trainable(model) == actual_trainable(lora)
    save_adapters(model, rslora, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "llm" / "adapter_config.json").read_text())["use_rslora"] is True


# ------------------------------------------------------------------ LoRA+
def test_loraplus_gives_the_b_matrices_of_its_component_ratio_times_its_learning_rate(tiny_checkpoints):
    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(vision_tower={"method": "lora", "lr_ratio": 0.1},
                           llm={"method": "loraplus", "lr_ratio": 0.5, "loraplus_lr_ratio": 8})
    model = loaded(checkpoint, policy)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, policy, BASE_LR, weight_decay=0.01)
    rates = {names[id(p)]: group["lr"] for group in groups for p in group["params"]}
    assert rates.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, rate in rates.items():
        component = name.split(".")[0]
        expected = {"vision_tower": 0.1, "mm_projector": 1.0, "llm": 0.5}[component] * BASE_LR
        if component == "llm" and "lora_B" in name:
            expected *= 8  # the LLM's B matrices only: the vision tower's LoRA is plain LoRA
        assert rate == pytest.approx(expected, rel=worst(2, torch.float64)), name
    assert {g["name"] for g in groups} >= {"llm/decay", "llm/decay@lr_x8", "vision_tower/decay"}
    default = AdapterPolicy(llm={"method": "loraplus"})
    assert default.llm.options["loraplus_lr_ratio"] == 16.0  # the paper's and PEFT's


def test_loraplus_ratio_must_be_positive():
    with pytest.raises(PolicyError, match=re.escape("adapters.llm.loraplus_lr_ratio = 0: must be > 0")):
        AdapterPolicy(llm={"method": "loraplus", "loraplus_lr_ratio": 0}).check()


# ------------------------------------------------------------------ PiSSA
def trained_pissa(checkpoint, policy: AdapterPolicy, batch: dict, steps: int = 3):
    model = loaded(checkpoint, policy)
    optimizer = torch.optim.AdamW(parameter_groups(model, policy, 1e-2))
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def test_pissa_starts_as_the_base_model_and_saves_a_lora_of_the_original_base(tiny_checkpoints, tmp_path):
    """W = W_res + s B0 A0: the adapted model at init is the base model (the residual's and the principal part's few
    roundings a weight are inside the forward's bound); after training, the saved adapter is a plain LoRA of the
    original checkpoint (rank 2r) that gives the trained model, and a resumed run (its own SVD) restored from it too."""
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    checkpoint = tiny_checkpoints["nvila-8b-tiny"]
    policy = AdapterPolicy(vision_tower={"method": "layernorm"}, llm={"method": "pissa", "r": 4, "alpha": 8, "dropout": 0.0})
    batch = probe_batch(NVILAProcessor.from_pretrained(checkpoint))
    with torch.no_grad():
        base = NVILAForConditionalGeneration.from_pretrained(checkpoint).eval()(**batch).logits
        start = loaded(checkpoint, policy).eval()
        torch.testing.assert_close(start(**batch).logits, base, **reordered(TINY_FORWARD, scale_of(base)))
    assert not torch.equal(start.llm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
                           Qwen2ForCausalLM.from_pretrained(checkpoint / "llm").model.layers[0].self_attn.q_proj.weight)  # residual

    model = trained_pissa(checkpoint, policy, batch)
    with torch.no_grad():
        trained = model(**batch).logits
    assert float((trained - base).abs().max()) > 100 * reordered(TINY_FORWARD, scale_of(base))["atol"]  # it learned
    bound = reordered(TINY_FORWARD, scale_of(trained))
    save_adapters(model, policy, tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "llm" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True

    # the adapter-only export on the ORIGINAL base: plain PEFT on plain Qwen2, and nvila-ft's loader
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        plain_llm = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(checkpoint / "llm"), tmp_path / "adapters" / "llm").eval()
        reference = model.llm(input_ids=ids).logits
        torch.testing.assert_close(plain_llm(input_ids=ids).logits, reference, **reordered(TINY_FORWARD, scale_of(reference)))
        fresh = load_adapters(load_for_policy(checkpoint, policy, device="cpu"), tmp_path / "adapters").model.eval()
        torch.testing.assert_close(fresh(**batch).logits, trained, **bound)

        # resuming: a new process applies the policy (another SVD: randomized here) and restores the checkpoint
        randomized = AdapterPolicy(vision_tower={"method": "layernorm"},
                                   llm={"method": "pissa", "r": 4, "alpha": 8, "dropout": 0.0, "pissa_niter": 1})
        resumed = loaded(checkpoint, randomized)
        restore_adapter_weights(resumed, randomized, tmp_path / "adapters")
        torch.testing.assert_close(resumed.eval()(**batch).logits, trained, **bound)
    save_adapters(resumed, randomized, tmp_path / "again")  # and it saves the same adapter again
    first, again = (load_file(str(tmp_path / d / "llm" / "adapter_model.safetensors")) for d in ("adapters", "again"))
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)

    # the merged export (official layout) is the trained model
    export_merged(model, tmp_path / "merged", batch)
    with torch.no_grad():
        merged = NVILAForConditionalGeneration.from_pretrained(tmp_path / "merged")(**batch).logits
    torch.testing.assert_close(merged, trained, **bound)


def test_pissa_refuses_deepspeed_and_a_negative_svd_iteration_count():
    from nvila_ft.training.config import Precision
    from nvila_ft.training.deepspeed import DeepSpeedConfig

    with pytest.raises(PolicyError, match=re.escape("adapters.llm.method = pissa converts its adapter")):
        AdapterPolicy(llm={"method": "pissa"}).check(precision=Precision(), deepspeed=DeepSpeedConfig(stage=2))
    with pytest.raises(PolicyError, match=re.escape("adapters.llm.pissa_niter = -1: must be >= 0")):
        AdapterPolicy(llm={"method": "pissa", "pissa_niter": -1}).check()


def test_the_policy_node_lists_every_option_so_overrides_need_no_plus(tmp_path):
    """`adapters.llm.dora=true` (a field before methods declared options) and every added method's option work as
    overrides of any preset; the options a component's method does not have, at their defaults, say nothing."""
    from omegaconf import OmegaConf

    defaults = AdapterPolicy.defaults()
    for key in ("rslora", "dora", "loraplus_lr_ratio", "pissa_niter"):
        assert all(key in defaults[name] for name in ("vision_tower", "mm_projector", "llm"))
    node = OmegaConf.merge(defaults, {"llm": {"method": "qlora"}}, OmegaConf.from_dotlist(["llm.dora=true"]))
    policy = AdapterPolicy.from_dict(OmegaConf.to_container(node))
    policy.check()
    assert policy.llm.options == {"rslora": False, "dora": True} and policy.vision_tower.options == {}
