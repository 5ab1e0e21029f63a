"""`nvila-ft plan`: the same overrides as finetune, an answer before anything heavy loads, a verdict and the
cheapest changes that make a run fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.presets import preset_config
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from nvila_ft.model.tokenizer import load_tokenizer

GIB = 2**30


def plan_cli(*args: str, cwd: Path, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "nvila_ft.cli", "plan", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def released_8b(tmp_path_factory):
    """model=nvila_8b with no checkpoint on disk, bf16, micro-batch 1, on a 24 GiB card: too big as it stands."""
    cwd = tmp_path_factory.mktemp("plan")
    args = ["model=nvila_8b", "precision=bf16", "trainer.per_device_train_batch_size=1", "adapters=ln_vit_lora_llm",
            "plan.gpu_memory=24", "--json"]
    return json.loads(plan_cli(*args, cwd=cwd, check_rc=3).stdout), cwd  # 3: does not fit


def test_default_run_plan_measures_every_record_and_writes_nothing(tmp_path):
    result = plan_cli("--json", cwd=tmp_path)
    plan = json.loads(result.stdout)
    assert plan["records"]["total"] == plan["records"]["measured"] == 850  # demo_scan's training split
    # the sequence is what the processor makes of the task's records: 64-66 positions, 14 Dynamic-S2 tiles
    assert plan["sequence"]["max"]["positions"] == 66 and plan["sequence"]["max"]["tiles"] == 14
    assert plan["plans"]["max"]["fits"] and plan["changes"] == []
    assert list(tmp_path.iterdir()) == []  # no run directory, no log
    table = plan_cli(cwd=tmp_path).stdout
    assert "planned GPU memory:" in table and ": fits" in table and "p95" in table


def test_released_model_without_checkpoint_gets_a_verdict_and_ranked_changes(released_8b):
    plan, _ = released_8b
    assert "nvila-8b" in plan["model"]
    sequence = plan["sequence"]["max"]
    # Dynamic-S2 at 448/896/1344: 1 + 4 + 9 tiles; 3x3 tiles of 16x16 tokens after 2x2 STC + text
    assert sequence["tiles"] == 14 and 2304 < sequence["positions"] < 2400
    items = {}
    for line in plan["plans"]["p95"]["lines"]:
        items[line["item"]] = items.get(line["item"], 0) + line["bytes"]
    assert 16.0e9 < items["weights"] < 17.5e9  # NVILA-8B in bf16: about 8.2 billion parameters, 2 bytes each
    assert not plan["plans"]["max"]["fits"]
    changes = plan["changes"]
    assert changes and changes[-1]["fits"] and not any(c["fits"] for c in changes[:-1])
    totals = [c["together_bytes"] for c in changes]
    assert totals == sorted(totals, reverse=True) and totals[-1] <= 24 * GIB
    assert all(c["alone_bytes"] < plan["plans"]["max"]["total_bytes"] for c in changes)


def test_the_suggested_changes_are_a_run_that_finetune_accepts_and_that_fits(released_8b):
    """Applying every suggested override makes a configuration that passes finetune's checks and plans as fitting."""
    plan, cwd = released_8b
    suggested = [o for change in plan["changes"] for o in change["overrides"]]
    base = ["model=nvila_8b", "precision=bf16", "trainer.per_device_train_batch_size=1", "adapters=ln_vit_lora_llm"]
    from hydra import compose, initialize_config_dir

    from nvila_ft.cli import config_dir, register_config_groups
    from nvila_ft.commands.common import build
    from nvila_ft.training.run_checks import check_run

    register_config_groups()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*base, *suggested, "run_dir=unused", "model.path=null"])
    check_run(build(cfg, "adapters"), build(cfg, "precision"), build(cfg, "trainer"), build(cfg, "deepspeed"))
    again = json.loads(plan_cli(*base, *suggested, "plan.gpu_memory=24", "--json", cwd=cwd).stdout)
    assert again["plans"]["max"]["total_bytes"] == plan["changes"][-1]["together_bytes"]


def test_world_size_divides_what_zero_shards(released_8b):
    _, cwd = released_8b

    def weights(*extra: str) -> int:
        plan = json.loads(plan_cli("model=nvila_8b", "precision=bf16", "trainer.per_device_train_batch_size=1",
                                   "adapters=ln_vit_lora_llm", "plan.gpu_memory=200", "--json", *extra, cwd=cwd).stdout)
        return sum(line["bytes"] for line in plan["plans"]["p95"]["lines"] if line["item"] == "weights")

    single, sharded = weights("deepspeed=zero3", "plan.world_size=1"), weights("deepspeed=zero3", "plan.world_size=8")
    # two Qwen2-7B decoder layers gathered (with prefetch) in bf16: 233,057,792 weights + 1,441,792 LoRA (r=16)
    gathered = 2 * (233_057_792 + 1_441_792) * 2
    # each of the three components' weights is divided by 8 and rounded up to a whole byte: at most 1 byte each
    assert 0 <= sharded - gathered - single / 8 < 3


@pytest.mark.parametrize("override, says", [
    ("task=vqa", "task.train.path"),
    ("model.s2_scales=abc", "model.s2_scales"),
    ("model.max_tiles=4", "needs at least 9 tiles"),
    ("model.video_pool_sizes=[[4,1,1]]", "does not pool in time"),
])
def test_plan_errors_are_one_line(tmp_path, override, says):
    result = plan_cli(override, cwd=tmp_path, check_rc=1)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and says in result.stderr, result.stderr


def test_remeasured_processor_follows_a_changed_configuration():
    """The planner's "fewer tiles" change measures the records again under the new configuration."""
    import numpy as np
    from PIL import Image

    from nvila_ft.model.settings import with_settings

    config = preset_config("nvila-lite-2b")
    processor = NVILAProcessor(load_tokenizer(TINY_TOKENIZER_DIR), config)
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(np.zeros((1000, 1400, 3), np.uint8))},
                                         {"type": "text", "text": "What is this?"}]}, {"role": "assistant", "content": "x"}]
    fewer = processor.with_config(with_settings(config, max_tiles=4))
    assert fewer.measure(chat).tiles < processor.measure(chat).tiles
    assert fewer.measure(chat).positions == fewer.process(chat).length


def test_packed_rows_add_up_what_each_packed_row_holds():
    from nvila_ft.training.planning import packed_rows
    from nvila_ft.training.planner import SampleDemand

    samples = [SampleDemand(6, 1, 2), SampleDemand(4, 0, 3), SampleDemand(5, 2, 1)]
    # first fit, longest first: [6, 4] fill a row of 10, [5] starts another
    assert packed_rows(samples, 10) == [SampleDemand(10, 1, 5), SampleDemand(5, 2, 1)]


def test_verdict_and_changes_at_the_budget_boundary():
    """A plan exactly at the budget fits (no changes asked for); one byte over gets changes that end at the first
    combination that fits, each of which saves memory alone."""
    import torch

    from nvila_ft.training.planning import fitting_changes, one_line
    from nvila_ft.training import planner
    from nvila_ft.training.planner import Line, Plan, RunShape, SampleDemand

    sample = SampleDemand(64, 14, 3)
    shape = RunShape(cuda=False)
    plans = {"p95": Plan([Line("llm", "weights", 100)], sample, shape), "max": Plan([Line("llm", "weights", 200)], sample, shape)}
    assert one_line(plans, 200).endswith(": fits")
    assert one_line(plans, 199).endswith(": fits at p95 only") and one_line(plans, 100).endswith(": fits at p95 only")
    assert one_line(plans, 99).endswith(": does not fit")

    from tests.test_planner import ROOT, preset_policy

    config = preset_config("nvila-8b-tiny")
    policy = preset_policy(ROOT / "adapters" / "ln_vit_lora_llm.yaml")
    shape = RunShape(weights_dtype=torch.float32, cuda=False, micro_batch=4)
    current = planner.plan(config, policy, sample, shape).total
    args = (lambda c: sample, lambda p, s: True)
    assert fitting_changes(config, policy, shape, current, current, *args) == []
    rows = fitting_changes(config, policy, shape, current - 1, current, *args)
    assert rows and rows[-1]["fits"] and rows[-1]["together_bytes"] <= current - 1
    assert not any(row["fits"] for row in rows[:-1]) and all(row["alone_bytes"] < current for row in rows)
