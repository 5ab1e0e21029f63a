"""Multirun sweeps (each job its own directory and W&B run), Optuna, and kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import SMALL_RUN, run_cli

QUICK = [o for o in SMALL_RUN if not o.startswith(("trainer.eval_steps", "eval."))] + ["eval.max_records=2", "trainer.eval_steps=null"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_two_by_two_multirun_with_wandb_offline(tmp_path, cache):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["finetune", "-m", "adapters=ln_vit_lora_llm,frozen_vit_lora_llm", "adapters.llm.r=4,8", "logger=wandb",
         "eval.before_training=false", f"hydra.sweep.dir={sweep}", *QUICK],
        tmp_path, cache,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4, result.stdout[-2000:]
    seen = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        config = json.loads((job / "final" / "adapter_policy.json").read_text())["policy"]
        seen.add((metrics["policy"], config["llm"]["r"]))
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and list(offline[0].glob("*.wandb")), job
        [table] = offline[0].glob("files/media/table/predictions_after_training_*.table.json")
        logged = json.loads(table.read_text())
        assert logged["columns"] == ["origin", "id", "question", "question_type", "reference", "prediction"]
        assert len(logged["data"]) == 2
        lora_a = load_file(str(job / "final" / "llm" / "adapter_model.safetensors"))
        rank = next(v for k, v in lora_a.items() if "lora_A" in k).shape[0]
        assert rank == config["llm"]["r"]
    assert seen == {(p, r) for p in ("ln_vit_lora_llm", "frozen_vit_lora_llm") for r in (4, 8)}
    run_ids = {next((job / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[-1] for job in jobs}
    assert len(run_ids) == 4


def test_optuna_sweep_over_the_vision_lr_ratio(tmp_path, cache):
    sweep = tmp_path / "optuna"
    result = run_cli(
        ["finetune", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
         "adapters.vision_tower.lr_ratio=interval(0.02,0.5)", f"hydra.sweep.dir={sweep}", *QUICK],
        tmp_path, cache,
    )
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "adapters.vision_tower.lr_ratio" in results, result.stdout[-2000:]
    ratios = {json.loads((job / "final" / "adapter_policy.json").read_text())["policy"]["vision_tower"]["lr_ratio"]
              for job in sweep.iterdir() if (job / "final").is_dir()}
    assert len(ratios) == 2 and all(0.02 <= r <= 0.5 for r in ratios)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no finally-style saving in nvila-ft catches BaseException)."""


def _finetune_in_process(args: list[str], monkeypatch, cache: Path, kill_at: int | None = None) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from nvila_ft import cli
    from nvila_ft.training.trainer import NVILATrainer

    monkeypatch.setenv("NVILA_FT_CACHE", str(cache))
    if kill_at is not None:
        original = NVILATrainer.training_step

        def step(self, *a, **k):
            if self.state.global_step == kill_at:
                raise Killed()
            return original(self, *a, **k)

        monkeypatch.setattr(NVILATrainer, "training_step", step)
    GlobalHydra.instance().clear()
    try:
        cli.main(["finetune", *args])
    finally:
        GlobalHydra.instance().clear()
        monkeypatch.undo()


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run / "final").rglob("*.safetensors")):
        tensors |= {f"{file.parent.name}/{k}": v for k, v in load_file(str(file)).items()}
    return tensors


def test_killed_run_resumes_to_the_same_adapter(tmp_path, cache, monkeypatch):
    common = ["adapters=lora_vit_lora_llm", "trainer.max_steps=8", "trainer.save_steps=4", "trainer.eval_steps=null",
              "trainer.logging_steps=1", "trainer.per_device_train_batch_size=4", "task.train.num_records=48",
              "eval.before_training=false", "eval.max_records=2"]
    _finetune_in_process([f"hydra.run.dir={tmp_path / 'straight'}", *common], monkeypatch, cache)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        _finetune_in_process([f"hydra.run.dir={interrupted}", *common], monkeypatch, cache, kill_at=6)
    assert (interrupted / "checkpoint-4" / "COMPLETE").is_file() and not (interrupted / "final").exists()
    half_written = interrupted / "checkpoint-6"  # a save cut short: no COMPLETE marker
    (half_written / "adapters").mkdir(parents=True)

    _finetune_in_process([f"run={interrupted}", "trainer.resume=true", f"hydra.run.dir={tmp_path / 'resume-log'}"], monkeypatch, cache)
    assert not half_written.exists()
    state = json.loads((interrupted / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    straight, resumed = _final_tensors(tmp_path / "straight"), _final_tensors(interrupted)
    assert straight.keys() == resumed.keys() and len(straight) > 10
    for key in straight:
        # the resumed run repeats the straight run's ops on the same values (weights, Adam moments, RNG restored bit for
        # bit from float32 files): exact on any machine
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    straight_lr = [e["learning_rate"] for e in json.loads((tmp_path / "straight" / "checkpoint-8" / "trainer_state.json").read_text())["log_history"] if "learning_rate" in e]
    resumed_lr = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert resumed_lr == straight_lr  # the scheduler's formula at the same steps: the same float64 operations


def test_resume_without_a_checkpoint_is_an_error(tmp_path, cache):
    result = run_cli(["finetune", "trainer.resume=true", f"hydra.run.dir={tmp_path / 'new'}"], tmp_path, cache, check=False)
    assert result.returncode == 1 and "no complete checkpoint" in result.stderr
