"""The pretrained tiny NVILAs shipped with nvila-ft: official layout, how they were made, and that the
recommended LoRA presets adapt them to a task they never saw (image-dependent answers, not the answer prior)."""

from __future__ import annotations

import json

import pytest
import torch

from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.pretrained import PRETRAINED_PRESETS, RECORD_FILE, pretrained_checkpoint
from nvila_ft.model.presets import build_model
from nvila_ft.model.source import ModelSource
from nvila_ft.model.vision_tower import drop_unused
from tests.test_cli import run_cli


@pytest.mark.parametrize("preset", PRETRAINED_PRESETS)
def test_shipped_checkpoint_is_an_official_layout_of_its_preset(preset, tmp_path):
    root = pretrained_checkpoint(preset)
    assert {p.name for p in root.iterdir()} == {"config.json", "llm", "vision_tower", "mm_projector", RECORD_FILE}
    sizes = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    assert sizes < 2.5e6  # a few MB in the package
    model = NVILAForConditionalGeneration.from_pretrained(root)
    random = build_model(preset, seed=0)
    drop_unused(random.vision_tower.model, random.vision_tower.num_layers_used)  # a loaded tower never holds them
    assert model.state_dict().keys() == random.state_dict().keys()
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), random.state_dict().values()))
    record = json.loads((root / RECORD_FILE).read_text())
    assert record["preset"] == preset and "task=pretrain_tiny" in record["command"] and record["steps"] > 0
    # a run copies it into its own base/ (a run keeps the exact base its adapters were trained on)
    base = ModelSource(preset=preset, pretrained=True).checkpoint(tmp_path / "base")
    assert (base / "llm" / "model.safetensors").read_bytes() == (root / "llm" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("adapters", ["ln_vit_lora_llm", "ln_vit_qlora_llm"])
def test_lora_presets_learn_a_new_visual_task_on_the_pretrained_model(tmp_path, adapters):
    # demo_scan is not in the pretraining mixture; its questions are balanced, so the question prior is ~0.5
    run = tmp_path / "run"
    # evaluation before training too: bitsandbytes must not repack the 4-bit weights for inference on the way
    overrides = [
        f"adapters={adapters}", "task=demo_scan", "task.train.num_records=400", "trainer.max_steps=200",
        "trainer.eval_steps=null", "trainer.save_steps=200", "eval.max_records=60", f"hydra.run.dir={run}",
    ]
    run_cli(["finetune", *overrides], tmp_path, tmp_path / "cache")
    metrics = json.loads((run / "metrics.json").read_text())
    accuracy = metrics["metrics"]["after_training"]["accuracy"]
    prior = metrics["image_blind_baselines"]["question_prior"]["accuracy"]
    assert accuracy >= prior + 0.3, (accuracy, prior)
    by_type = metrics["metrics_by_question_type"]["after_training"]
    assert by_type["lesion"]["accuracy"] > 0.75 and by_type["side"]["accuracy"] > 0.75, by_type
