"""Real multi-process runs: `torchrun --nproc_per_node 2` on localhost (gloo, DeepSpeed's CPU accelerator).

Two processes with a micro-batch of 2 against one process with a micro-batch of 4 (the same global batch): the
same loss at every step, the same eval_loss at every evaluation during training, the same best checkpoint, the
same final adapters and merged export, every record read exactly once, evaluation over the whole validation set
exactly once; media that differ between processes under ZeRO-3; QLoRA under ZeRO-3; a process killed mid-step or
mid-save, and the run resumed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import run_cli
from tests.tolerances import TINY_FORWARD, TINY_TRAIN_STEP, accumulation, scale_of, unit_roundoff, worst

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # several processes per test: the slow tier (make test-slow, run by .ci/run)
HOOKS = Path(__file__).parent / "distributed_hooks"
# dropout off: two processes draw different dropout masks than one
# one epoch of 32 training records (global batch 4: 8 steps); eval_loss every 2 steps over the 8 validation records
# in batches of 3, which do not divide them (two processes get [0-2] [3-5], then [6 7 0] [1 2 3]: accelerate repeats
# records 0-3 to fill the last batches); 7 of the 8 validation records answered (7 does not divide over 2 processes)
COMMON = [
    "task.train.num_records=40", "task.val_fraction=0.2", "trainer.max_steps=-1", "trainer.num_train_epochs=1",
    "trainer.save_steps=2", "trainer.eval_steps=2", "trainer.per_device_eval_batch_size=3", "trainer.logging_steps=1",
    "adapters.llm.dropout=0", "eval.before_training=false", "eval.max_records=7",
]
# the best checkpoint by the highest eval_loss: eval_loss falls over the epoch, so the best is checkpoint-2, not the
# last one, and load_best_model_at_end restores it (with DeepSpeed, into its float32 master copies too)
EARLIEST_BEST = ["trainer.greater_is_better=true"]
# eval_loss: the same records' float32 forward (TINY_FORWARD reductions, tests/tolerances.py) with weights from up to
# 8 float32 training steps (TINY_TRAIN_STEP each), whose sums two processes split otherwise (a gradient over 2 + 2
# records, not 4): each run lies within accumulation(n) of the exact value over that whole chain, relative, so the two
# differ by twice that
EVAL_RTOL = 2 * accumulation(8 * TINY_TRAIN_STEP + TINY_FORWARD)
# the training loss at each step: the same chain (the weights of the steps before, then the step's forward)
LOSS_RTOL = EVAL_RTOL
# Trained tensors are compared after AdamW with epsilon 1. (With the usual 1e-8, Adam divides each gradient by its
# own running size, so where one cancels to nearly zero its rounding decides the step's sign: nothing short of 2 lr a
# step bounds that element, and it happened: 1.2e-5 apart under ZeRO-3 after 4 steps.) Gradients are clipped to norm
# 1 (trainer.max_grad_norm), so each element is at most 1, and two reduction orders of a step's gradient differ by at
# most delta = 2 accumulation(TINY_TRAIN_STEP) per element. With epsilon 1 >= sqrt(v), the update
# lr m / (sqrt(v) + 1) moves by at most lr (|dm| + |m| |d sqrt(v)|): |dm| <= delta (m averages the gradients), and
# |m| <= C sqrt(v) (C^2: the largest ratio of m's bias-corrected weights to v's over these steps), |dv| <= 2 delta, so
# |m| |d sqrt(v)| <= C |dv| / 2 <= C delta; each step adds lr (1 + C) delta. (A difference's effect on later
# gradients is second order: lr times the curvature times it.) DeepSpeed's CPU Adam (ZeRO-Offload) is the same update.
ADAM_LR, STEPS = 0.05, 8
ADAM = ["+trainer.extra.adam_epsilon=1.0", f"trainer.learning_rate={ADAM_LR}"]


def trained_atol(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    ratio = max((1 - beta1) * beta1 ** (t - i) / (1 - beta1**t) / ((1 - beta2) * beta2 ** (t - i) / (1 - beta2**t))
                for t in range(1, STEPS + 1) for i in range(1, t + 1))
    return steps * ADAM_LR * (1 + ratio**0.5) * 2 * accumulation(TINY_TRAIN_STEP)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[str], cwd: Path, cache: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    environment = dict(os.environ, NVILA_FT_CACHE=str(cache), HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(HOOKS), str(Path(__file__).parents[1])]), **(env or {}))
    # --standalone: torchrun takes a free port itself (no window in which another process can take it)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "nvila_ft.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def trainer_state(run: Path) -> dict:
    return json.loads((sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1] / "trainer_state.json").read_text())


def losses(run: Path, key: str = "loss") -> list[float]:
    return [entry[key] for entry in trainer_state(run)["log_history"] if key in entry]


def best_checkpoint(run: Path) -> str:
    return Path(trainer_state(run)["best_model_checkpoint"]).name


def adapters(run: Path, folder: str = "final") -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted((run / folder).rglob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_adapters(run: Path, reference: Path, atol: float, folder: str = "final") -> None:
    """Every saved adapter tensor within `atol` (0: bit for bit); they are float32 (trainable tensors always are)."""
    mine, theirs = adapters(run, folder), adapters(reference, folder)
    assert mine.keys() == theirs.keys() and len(mine) > 20
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype == torch.float32, key
        torch.testing.assert_close(mine[key], theirs[key], atol=atol, rtol=0, msg=key)


def held_out(cache: Path) -> set[str]:
    """The origins of the validation records COMMON's task holds out (demo_scan's 40 records, 20%, seed 0)."""
    from nvila_ft.domains.builtin import BuiltinData
    from nvila_ft.domains.task import Task

    task = Task(name="demo_scan", train=BuiltinData("scan", 40, cache_dir=str(cache / "builtin")), val_fraction=0.2)
    validation = {record.origin for record in task.load(0).validation}
    assert len(validation) == 8
    return validation


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    """The one-process reference: micro-batch 4."""
    run = tmp_path_factory.mktemp("single") / "run"
    run_cli(["finetune", *COMMON, *ADAM, *EARLIEST_BEST, "trainer.per_device_train_batch_size=4", f"hydra.run.dir={run}"],
            run.parent, cache)
    return run


@pytest.mark.parametrize("option", ["none", "zero2", "zero3", "zero3_offload"])
def test_two_processes_give_the_one_process_result(option, single, cache, tmp_path):
    run = tmp_path / "run"
    seen = tmp_path / "seen"
    torchrun(["finetune", *COMMON, *ADAM, *EARLIEST_BEST, f"deepspeed={option}", "trainer.per_device_train_batch_size=2",
              f"hydra.run.dir={run}"], tmp_path, cache, env={"NVILA_TEST_SEEN": str(seen)})
    # the same loss at every step (the logged loss is the global batch's), in float32
    assert losses(run) == pytest.approx(losses(single), rel=LOSS_RTOL) and len(losses(run)) == 8
    # the same eval_loss at every evaluation (each validation record counted once), hence the same best checkpoint,
    # restored at the end: final/ is checkpoint-2's adapters, and the last checkpoint's agree too
    assert losses(run, "eval_loss") == pytest.approx(losses(single, "eval_loss"), rel=EVAL_RTOL) and len(losses(run, "eval_loss")) == 4
    assert best_checkpoint(run) == best_checkpoint(single) == "checkpoint-2"
    assert_same_adapters(run, single, trained_atol(2))  # checkpoint-2's, restored
    assert_same_adapters(run, single, trained_atol(8), "checkpoint-8/adapters")
    final, best = adapters(run), adapters(run, "checkpoint-2/adapters")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    # every training record read exactly once in the epoch, each process its own half; besides, each evaluation
    # read two batches of 3 validation records on each process
    validation = held_out(cache)
    every = {rank: (tmp_path / f"seen.rank{rank}").read_text().split() for rank in (0, 1)}
    reads = {rank: [origin for origin in every[rank] if origin not in validation] for rank in (0, 1)}
    assert len(reads[0]) == len(reads[1]) == 16 and len(set(reads[0]) | set(reads[1])) == 32
    assert len(every[0]) - 16 == len(every[1]) - 16 == 4 * 2 * 3
    # evaluation over the validation records once: 7 over 2 processes, each answered once, in order
    mine = [json.loads(line) for line in (run / "predictions_after_training.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (single / "predictions_after_training.jsonl").read_text().splitlines()]
    assert [r["origin"] for r in mine] == [r["origin"] for r in theirs] and len(mine) == len(set(r["origin"] for r in mine)) == 7
    assert [r["prediction"] for r in mine] == [r["prediction"] for r in theirs]
    # shared files from process 0 only, each process its own log
    assert (run / "cli.log").is_file() and (run / "cli-rank1.log").is_file() and (run / ".hydra" / "config.yaml").is_file()
    if option == "zero3":  # the export of a ZeRO-3 run holds whole, gathered weights and passes the merge check
        merged, reference = tmp_path / "merged", tmp_path / "reference"
        run_cli(["export", f"run={run}", f"export.output={merged}", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, cache)
        run_cli(["export", f"run={single}", f"export.output={reference}", f"hydra.run.dir={tmp_path / 'y'}"], tmp_path, cache)
        # W0 + (alpha / r) B A with alpha = r (ln_vit_lora_llm: r 16): B and A each within trained_atol(2), so B A
        # within r trained (max|A| + max|B|); a tensor trained as it is, within trained_atol(2); then the merge's own
        # r + 1 roundings and the export dtype's, at |W|, on each side
        trained = adapters(single)
        r, lora = 16, max(scale_of(v) for k, v in trained.items() if "lora_" in k)
        for component in ("llm", "vision_tower", "mm_projector"):
            a, b = load_file(str(merged / component / "model.safetensors")), load_file(str(reference / component / "model.safetensors"))
            assert a.keys() == b.keys() and all(v.numel() > 0 for v in a.values())
            for key in a:
                moved = max(trained_atol(2), r * trained_atol(2) * 2 * lora)
                rounding = 2 * (worst(r + 1) + unit_roundoff(b[key].dtype)) * scale_of(b[key])
                torch.testing.assert_close(a[key], b[key], atol=moved + rounding, rtol=0, msg=f"{component}/{key}")


def test_deepspeed_launcher_and_two_nodes_give_the_one_process_losses(single, cache, tmp_path):
    environment = dict(os.environ, NVILA_FT_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = ["finetune", *COMMON, *ADAM, "trainer.per_device_train_batch_size=2"]
    # the deepspeed launcher (on a CPU it starts --num_gpus processes), which passes --local_rank first
    launched = tmp_path / "deepspeed"
    subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                    "--module", "nvila_ft.cli", *args, f"hydra.run.dir={launched}"], cwd=tmp_path, env=environment,
                   check=True, capture_output=True, timeout=600)
    # two "nodes" of one process each, as on a cluster: the same command with --node_rank 0 and 1
    nodes = tmp_path / "nodes"
    port = str(free_port())
    processes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                          "-m", "nvila_ft.cli", *args, f"hydra.run.dir={nodes}"],
                         cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=600) for p in processes] == [0, 0]
    for run in (launched, nodes):
        assert losses(run) == pytest.approx(losses(single), rel=LOSS_RTOL), run
        assert losses(run, "eval_loss") == pytest.approx(losses(single, "eval_loss"), rel=EVAL_RTOL), run
        assert (run / "cli-rank1.log").is_file()


def test_text_only_image_and_video_on_different_processes_under_zero3(tmp_path, cache):
    from PIL import Image

    from nvila_ft.data.media import write_video

    (tmp_path / "media").mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "media" / "red.png")
    write_video([Image.new("RGB", (32, 32), (20 * i, 0, 0)) for i in range(8)], tmp_path / "media" / "clip.mp4")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [
        {"id": "text", "conversations": turn("Say hi.", "hi")},
        {"id": "image", "image": "red.png", "conversations": turn("<image>\nColour?", "red")},
        {"id": "video", "video": "clip.mp4", "conversations": turn("<video>\nWhat happens?", "it gets red")},
        {"id": "text2", "conversations": turn("Say bye.", "bye")},
    ]
    (tmp_path / "media" / "data.json").write_text(json.dumps(records))
    common = ["task=vqa", f"task.train.path={tmp_path / 'media' / 'data.json'}", "task.val_fraction=0", "trainer.max_steps=4",
              "trainer.save_steps=4", "trainer.eval_steps=null", "trainer.logging_steps=1", "adapters.llm.dropout=0", *ADAM]
    one = tmp_path / "one"
    run_cli(["finetune", *common, "trainer.per_device_train_batch_size=2", f"hydra.run.dir={one}"], tmp_path, cache)
    seen = tmp_path / "seen"
    two = tmp_path / "two"
    torchrun(["finetune", *common, "deepspeed=zero3", "trainer.per_device_train_batch_size=1", f"hydra.run.dir={two}"],
             tmp_path, cache, env={"NVILA_TEST_SEEN": str(seen)})
    kind = ["text", "image", "video", "text"]
    reads = [[kind[int(o.rsplit("[", 1)[1].rstrip("]"))] for o in (tmp_path / f"seen.rank{r}").read_text().split()] for r in (0, 1)]
    steps = list(zip(*reads))  # (what process 0 read, what process 1 read) at each step
    assert {step for step in steps if "text" in step and step[0] != step[1]} & {("text", "image"), ("image", "text")}, steps
    assert {step for step in steps if "text" in step and step[0] != step[1]} & {("text", "video"), ("video", "text")}, steps
    assert losses(two) == pytest.approx(losses(one), rel=LOSS_RTOL)
    assert_same_adapters(two, one, trained_atol(4))


def test_qlora_under_zero3_and_refusals_on_every_process(tmp_path, cache):
    run = tmp_path / "qlora"
    storage = ["adapters=ln_vit_qlora_llm", "adapters.llm.quantization.storage_dtype=bfloat16", "precision=bf16"]
    torchrun(["finetune", *COMMON, *storage, "deepspeed=zero3", "trainer.per_device_train_batch_size=2",
              f"hydra.run.dir={run}"], tmp_path, cache)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    assert len(losses(run)) == 8 and all(loss == loss for loss in losses(run))  # finite: no NaN
    refused = torchrun(["finetune", *COMMON, "adapters=ln_vit_fp8_lora_llm", "deepspeed=zero3",
                        f"hydra.run.dir={tmp_path / 'fp8'}"], tmp_path, cache, check=False)
    errors = [line for line in refused.stderr.splitlines() if ": error: " in line]
    assert {line.split(":")[0] for line in errors} == {"nvila-ft finetune (rank 0)", "nvila-ft finetune (rank 1)"}
    assert all("fp8_lora float8 weight tensors cannot be sharded by ZeRO-3; use deepspeed=zero2" in line for line in errors)
    assert not (tmp_path / "fp8" / "base").exists()  # refused before any weight loaded
    missing = torchrun(["finetune", *COMMON], tmp_path, cache, check=False)
    assert "needs the same run directory: add hydra.run.dir=<dir>" in missing.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """An uninterrupted two-process run of 6 steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    torchrun(["finetune", *COMMON, "trainer.max_steps=6", "trainer.per_device_train_batch_size=2", f"hydra.run.dir={run}"],
             run.parent, cache)
    return run


@pytest.mark.parametrize("where", ["step", "save"])
def test_a_killed_process_ends_the_job_and_the_run_resumes(where, straight, tmp_path, cache):
    killed = tmp_path / "killed"
    start = time.monotonic()
    # rank 1 dies in step 5 (after checkpoint-4 is complete), or rank 0 dies while writing checkpoint-4
    kill = "1:4:step" if where == "step" else "0:4:save"
    result = torchrun(["finetune", *COMMON, "trainer.max_steps=6", "trainer.per_device_train_batch_size=2",
                       f"hydra.run.dir={killed}"], tmp_path, cache, env={"NVILA_TEST_KILL": kill}, check=False, timeout=300)
    assert result.returncode != 0 and time.monotonic() - start < 120  # the other process did not hang
    assert (killed / "checkpoint-2" / "COMPLETE").is_file() and not (killed / "final").exists(), result.stderr[-3000:]
    assert (killed / "checkpoint-4" / "COMPLETE").is_file() == (where == "step")
    torchrun(["finetune", f"run={killed}", "trainer.resume=true"], tmp_path, cache)
    assert json.loads((killed / "metrics.json").read_text())["steps"] == 6
    # the same data order, schedule and processes as the uninterrupted run, the states restored bit for bit: the same
    # operations on the same values (AdamW here), so the same bits
    assert_same_adapters(killed, straight, 0.0)

    def rates(run: Path) -> list[float]:
        history = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
        return [entry["learning_rate"] for entry in history if "learning_rate" in entry]

    assert rates(killed) == rates(straight)
