"""Which checkpoint of a run is "the last": by step number (checkpoint-10 after checkpoint-9, which sorting the names
gets wrong), complete ones only. Resume (finetune, dpo) and the commands that read a run's adapters without a
`final/` (export, evaluate, predict, prune) all take it."""

from __future__ import annotations

from nvila_ft.recipes.runs import checkpoint_to_resume, trained_adapters
from nvila_ft.training.trainer import ADAPTERS_DIR, COMPLETE_MARKER, complete_checkpoints


def make_run(root, steps, complete):
    """A run folder with `checkpoint-<step>` folders holding adapters; those in `complete` carry the marker."""
    for step in steps:
        folder = root / f"checkpoint-{step}"
        (folder / ADAPTERS_DIR).mkdir(parents=True)
        (folder / ADAPTERS_DIR / "adapter_policy.json").write_text("{}")
        if step in complete:
            (folder / COMPLETE_MARKER).write_text(f"step {step}\n")
    return root


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    run = make_run(tmp_path, steps=[1, 2, 9, 10, 11, 100], complete=[1, 2, 9, 10, 100])
    assert [p.name for p in complete_checkpoints(run)] == [f"checkpoint-{s}" for s in (1, 2, 9, 10, 100)]


def test_resume_and_the_run_adapters_take_step_10_over_9_and_skip_an_incomplete_11(tmp_path):
    run = make_run(tmp_path, steps=[9, 10, 11], complete=[9, 10])  # 11: the run was stopped while writing it
    assert checkpoint_to_resume(run) == str(run / "checkpoint-10")
    assert trained_adapters(run) == run / "checkpoint-10" / ADAPTERS_DIR  # export / evaluate / predict without final/
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10", "checkpoint-9"]  # the half-written one removed
