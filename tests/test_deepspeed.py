"""DeepSpeed ZeRO-2 / ZeRO-3 (+CPU offload) through the Trainer, single process on CPU, with bf16: adapters saved in
float32 from DeepSpeed's master copies, the best checkpoint restored into them; and the start-up checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nvila_ft.adapters import AdapterPolicy, PolicyError
from nvila_ft.training.config import ConfigError, Precision
from nvila_ft.training.deepspeed import DeepSpeedConfig
from tests.test_cli import run_cli

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("option", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_finetune_with_zero(option, tmp_path, cache):
    run = tmp_path / option
    # bf16: DeepSpeed holds the model in bfloat16 and the trained values in its float32 master copies (no warmup: the
    # first step moves them)
    run_cli(
        ["finetune", f"deepspeed={option}", "precision=bf16", "adapters=ln_vit_lora_llm", "task.train.num_records=40",
         "trainer.max_steps=4", "trainer.warmup_ratio=0", "trainer.save_steps=2", "trainer.eval_steps=2",
         "trainer.per_device_train_batch_size=4", "eval.max_records=3", "eval.before_training=false", f"hydra.run.dir={run}"],
        tmp_path, cache,
    )
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    for folder in (run / "final", run / "checkpoint-4" / "adapters"):
        with safe_open(str(folder / "mm_projector" / "trained_weights.safetensors"), "pt") as handle:
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
        assert shapes["layers.2.weight"] == [64, 384], folder  # whole tensors, not ZeRO shards
    assert list((run / "checkpoint-4").glob("global_step4"))  # DeepSpeed's own optimizer state
    # trainable tensors saved in float32 as in one process, and the float32 values themselves (not bfloat16 values
    # widened): every tensor holds values bfloat16 cannot; final/ is the best checkpoint's, exactly (restored into the
    # master copies when it is checkpoint-2; tests/test_distributed.py makes sure of that case)
    best = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["best_model_checkpoint"]
    final, saved = tensors(run / "final"), tensors(Path(best) / "adapters")
    assert final.keys() == saved.keys() and len(final) > 20
    for key, value in final.items():
        assert value.dtype == torch.float32 and not torch.equal(value, value.bfloat16().float()), key
        assert torch.equal(value, saved[key]), key


def test_zero3_checks_fail_at_start():
    bf16 = Precision(weights="bfloat16", autocast="bf16")
    policy = AdapterPolicy(llm={"method": "qlora"})
    with pytest.raises(PolicyError, match=r"storage_dtype=bfloat16"):
        policy.check(precision=bf16, deepspeed=DeepSpeedConfig(stage=3))
    AdapterPolicy(llm={"method": "qlora", "quantization": {"storage_dtype": "bfloat16"}})
    AdapterPolicy(llm={"method": "qlora", "quantization": {"storage_dtype": "bfloat16"}}).check(precision=bf16, deepspeed=DeepSpeedConfig(stage=3))
    with pytest.raises(PolicyError, match="fp8_lora"):
        AdapterPolicy(llm={"method": "fp8_lora"}).check(precision=bf16, deepspeed=DeepSpeedConfig(stage=3))
    with pytest.raises(ConfigError, match="offload_params needs stage 3"):
        DeepSpeedConfig(stage=2, offload_params=True).check(bf16)
    config = DeepSpeedConfig(stage=3, offload_optimizer=True, offload_params=True).to_dict()
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
