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
from nvila_ft.adapters.artifacts import save_adapters
from nvila_ft.adapters.optim import parameter_groups
from nvila_ft.adapters.policy import METHODS
from tests.test_adapters import BASE_LR, actual_trainable, loaded
from tests.tolerances import worst


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
    model = loaded(checkpoint, AdapterPolicy(llm={"method": "rslora", "r": 4, "alpha": 8}))
    scalings = {layer.scaling["default"] for layer in model.llm.modules() if isinstance(getattr(layer, "scaling", None), dict)}
    assert scalings == {8 / math.sqrt(4)}  # LoRA's would be 8 / 4
    lora = loaded(checkpoint, AdapterPolicy(llm={"method": "lora", "r": 4, "alpha": 8}))
    assert actual_trainable(model) == actual_trainable(lora)
    save_adapters(model, tmp_path / "out")
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
