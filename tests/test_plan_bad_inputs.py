"""A battery of user mistakes at the issue-8 surfaces (`nvila-ft plan`, the scale-then-compress knobs, FP8 / optimizer /
checkpointing / DeepSpeed settings), each through the real command line: exit code 1, exactly one stderr line that
names the key or the file and the fix, no traceback, nothing written. A few good inputs check that the refusals
did not take working runs with them, and that accepted knobs reach an exported model's config.json.

The commands run in this process (`nvila_ft.cli.main`, ~0.5 s a case instead of ~10 s for a fresh interpreter); no
case loads weights except the export check at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

TINY_DATA = ["task.train.num_records=16"]  # the default built-in task, small


def _run(args: list[str]) -> tuple[int, str, str]:
    """`nvila-ft <args>` in this process: (exit code, stdout, stderr); the process's logging and argv are kept."""
    from hydra.core.global_hydra import GlobalHydra

    from nvila_ft import cli

    out, err = io.StringIO(), io.StringIO()
    argv, root = sys.argv[:], logging.getLogger()
    handlers, levels = root.handlers[:], {name: logging.getLogger(name).level for name in ("", "nvila_ft")}
    code = 0
    # Hydra's logging set-up closes every handler the process has made (logging.shutdown); here that includes
    # handlers made by earlier tests, and some (absl's) close their stream unless it is the current sys.stderr: pytest's
    # capture file, while redirected ("lost sys.stderr" in the full suite). The call sees none of them.
    earlier = logging._handlerList[:]
    logging._handlerList[:] = []
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        logging._handlerList[:0] = earlier
        sys.argv[:] = argv
        root.handlers[:] = handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        GlobalHydra.instance().clear()
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad checkpoints and data files, a one-image LLaVA file with a large image, an offline environment."""
    import numpy as np
    from PIL import Image

    from nvila_ft.model.pretrained import pretrained_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "no_config").mkdir()
    (root / "broken_config").mkdir()
    (root / "broken_config" / "config.json").write_text("{not json")
    (root / "list_config").mkdir()
    (root / "list_config" / "config.json").write_text("[1, 2]")
    (root / "top_only").mkdir()
    (root / "top_only" / "config.json").write_text('{"model_type": "llava_llama"}')
    tiny = pretrained_checkpoint("nvila-lite-tiny")
    for name, edit in (("no_hidden_size", lambda c: c["llm"].pop("hidden_size")),
                       ("tiles_as_text", lambda c: c["top"].update(max_tiles="many"))):
        folder = root / name
        for part in ("", "llm", "vision_tower", "mm_projector"):  # config files only: nothing here loads weights
            (folder / part).mkdir(parents=True, exist_ok=True)
        configs = {"top": json.loads((tiny / "config.json").read_text())}
        configs.update({part: json.loads((tiny / part / "config.json").read_text()) for part in ("llm", "vision_tower", "mm_projector")})
        edit(configs)
        for part, config in configs.items():
            (folder / ("" if part == "top" else part) / "config.json").write_text(json.dumps(config))
    for part in ("", "llm", "vision_tower", "mm_projector"):  # a complete set of config files, no tokenizer
        (root / "no_tokenizer" / part).mkdir(parents=True, exist_ok=True)
        (root / "no_tokenizer" / part / "config.json").write_bytes((tiny / part / "config.json").read_bytes())
    (root / "empty.json").write_text("[]")
    (root / "table.csv").write_text("question,answer\nWhat?,yes\n")
    (root / "broken.json").write_text('[{"id": "0", "image": "a.png"')
    chat = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a scan"}]
    (root / "missing_media.json").write_text(json.dumps([{"id": "r0", "image": "nope.png", "conversations": chat}]))
    (root / "no_answer.json").write_text(json.dumps([{"id": "r0", "conversations": chat[:1]}]))
    Image.fromarray(np.zeros((1000, 1400, 3), np.uint8)).save(root / "wide.png")
    (root / "wide.json").write_text(json.dumps([{"id": str(i), "image": "wide.png", "conversations": chat} for i in range(4)]))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NVILA_FT_CACHE", str(root / "cache"))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.delenv("WORLD_SIZE", raising=False)
        env.delenv("HYDRA_FULL_ERROR", raising=False)
        yield root


# (case id, command line with {files} for the fixture folder, what the one error line must say)
PLAN_CASES = [
    # plan.*
    ("gpu-memory-units", ["plan.gpu_memory=24GB"], "plan.gpu_memory = '24GB': expected a number"),
    ("gpu-memory-zero", ["plan.gpu_memory=0"], "plan.gpu_memory = 0: GiB of one GPU, above 0"),
    ("gpu-memory-negative", ["plan.gpu_memory=-5"], "plan.gpu_memory = -5: GiB of one GPU, above 0"),
    ("gpu-memory-bytes", ["plan.gpu_memory=1e9"], "plan.gpu_memory = 1e+09: GiB of one GPU, above 0 and at most 1024"),
    ("world-size-zero", ["plan.world_size=0"], "plan.world_size = 0: must be >= 1"),
    ("samples-zero", ["plan.samples=0"], "plan.samples = 0: must be >= 1, or null for every record"),
    # the model and its checkpoint
    ("unknown-model", ["model=nvila_99b"], "Could not find 'model/nvila_99b'; Available options in 'model': local,"),
    ("local-without-path", ["model=local"], "set model.path (a checkpoint directory) or model.preset"),
    ("path-missing", ["model=local", "model.path=/nonexistent/ckpt"], "/nonexistent/ckpt: no such checkpoint directory"),
    ("no-config-json", ["model=local", "model.path={files}/no_config"], "{files}/no_config: not an NVILA checkpoint (no config.json"),
    ("broken-config-json", ["model=local", "model.path={files}/broken_config"], "{files}/broken_config/config.json: invalid JSON"),
    ("config-json-a-list", ["model=local", "model.path={files}/list_config"], "{files}/list_config/config.json: expected a JSON object"),
    ("no-component-configs", ["model=local", "model.path={files}/top_only"], "{files}/top_only: missing llm/config.json"),
    ("config-missing-field", ["model=local", "model.path={files}/no_hidden_size"], "{files}/no_hidden_size/llm/config.json: missing `hidden_size`"),
    ("config-field-wrong-kind", ["model=local", "model.path={files}/tiles_as_text"],
     "{files}/tiles_as_text: a config.json field has a value of the wrong kind (invalid literal for int() with base 10: 'many')"),
    ("no-tokenizer", ["model=local", "model.path={files}/no_tokenizer"],
     "{files}/no_tokenizer/llm: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, tokenizer.model)"),
    # the data
    ("data-file-missing", ["task=vqa", "task.train.path={files}/none.json"], "{files}/none.json: cannot read"),
    ("data-file-empty", ["task=vqa", "task.train.path={files}/empty.json"], "plan: no training record to measure in {files}/empty.json"),
    ("data-not-llava-json", ["task=vqa", "task.train.path={files}/table.csv"],
     "plan: no training record to measure in {files}/table.csv (task.train.path): 2 malformed, first: {files}/table.csv[0]: structure: line 1: not valid JSON"),
    ("data-file-broken", ["task=vqa", "task.train.path={files}/broken.json"], "{files}/broken.json: not valid JSON (Expecting ',' delimiter at line 1, column 30)"),
    ("data-media-missing", ["task=vqa", "task.train.path={files}/missing_media.json"],
     "(first: {files}/missing_media.json[0] (id r0), message 0: nope.png: not found"),
    ("data-no-answer", ["task=vqa", "task.train.path={files}/no_answer.json"], "{files}/no_answer.json[0] (id r0): the conversation has no assistant answer"),
    ("max-tokens-zero", ["data.max_tokens=0"], "data.max_tokens = 0: must be >= 1"),
    ("packing-row-too-short", ["data.packing=true", "data.max_tokens=10"], "plan: 14 of the 14 records measured are longer than data.max_tokens = 10 (the longest: 66 positions); raise data.max_tokens to at least 66"),
    # the run's shape
    ("micro-batch-zero", ["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size = 0: must be >= 1"),
    ("accumulation-zero", ["trainer.gradient_accumulation_steps=0"], "trainer.gradient_accumulation_steps = 0: must be >= 1"),
    ("deepspeed-unknown", ["deepspeed=zero9"], "Could not find 'deepspeed/zero9'; Available options in 'deepspeed': none, zero2,"),
    ("zero-stage-5", ["deepspeed.stage=5"], "deepspeed.stage = 5; use 0 (off), 1, 2 or 3"),
    ("offload-params-zero2", ["deepspeed=zero2", "deepspeed.offload_params=true"], "deepspeed.offload_params needs stage 3 (ZeRO-3); use deepspeed=zero3_offload"),
    ("offload-8bit-adam", ["deepspeed=zero2_offload", "trainer.optim=adamw_8bit"], "trainer.optim = adamw_8bit: ZeRO-Offload steps DeepSpeed's CPU Adam"),
    # scale-then-compress knobs
    ("max-tiles-zero", ["model.max_tiles=0"], "model.max_tiles = 0: a whole number >= 1"),
    ("max-tiles-fraction", ["model.max_tiles=1.5"], "model.max_tiles = 1.5: expected an integer or null"),
    ("max-tiles-below-s2", ["model=nvila_8b", "model.max_tiles=4"], "model.max_tiles = 4: Dynamic-S2 at scales [448, 896, 1344] needs at least 9 tiles"),
    ("max-tiles-beyond-context", ["model=nvila_8b", "model.max_tiles=33"],
     "model.max_tiles = 33: an image of that many tiles takes 8,448 positions (256 a tile), more than the LLM's context (8,192, llm/config.json `model_max_length`); at most 32"),
    ("max-tiles-huge", ["model=nvila_lite_tiny", "model.max_tiles=100000"], "model.max_tiles = 100000: an image of that many tiles takes 400,000"),
    ("min-above-max", ["model=nvila_lite_2b", "model.min_tiles=8", "model.max_tiles=4"], "model.min_tiles = 8 is above model.max_tiles = 4"),
    ("min-above-checkpoint-max", ["model=nvila_lite_2b", "model.min_tiles=20"], "model.min_tiles = 20 is above the checkpoint's max_tiles (12)"),
    ("min-tiles-on-s2", ["model=nvila_8b", "model.min_tiles=4"], "model.min_tiles: Dynamic-S2 does not use it (an image takes at least the largest scale's grid, 9 tiles"),
    ("min-tiles-zero", ["model=nvila_lite_2b", "model.min_tiles=0"], "model.min_tiles = 0: a whole number >= 1"),
    ("frames-zero", ["model.num_video_frames=0"], "model.num_video_frames = 0: a whole number >= 1"),
    ("frames-beyond-context", ["model=nvila_lite_2b", "model.num_video_frames=64"],
     "model.num_video_frames = 64: a video of that many frames takes 7,744 positions (121 a frame), more than the LLM's context (4,096"),
    ("frames-huge-pooled", ["model=nvila_video_tiny", "model.num_video_frames=100000"], "takes 50,000 positions after temporal pooling"),
    ("frames-not-pooled", ["model=nvila_video_tiny", "model.num_video_frames=6"], "needs the frame count (6) divisible by 8"),
    ("s2-descending", ["model=nvila_8b", "model.s2_scales=[896,448,1344]"], "model.s2_scales = [896, 448, 1344]: scales must increase"),
    ("s2-not-multiples", ["model=nvila_8b", "model.s2_scales=[448,900,1344]"],
     "model.s2_scales = [448, 900, 1344]: each scale must be a multiple of the smallest, which must be the vision tower's tile size (448)"),
    ("s2-off-the-tile", ["model=nvila_8b", "model.s2_scales=[384,768,1152]"], "model.s2_scales = [384, 768, 1152]: each scale must be a multiple"),
    ("s2-wrong-count", ["model=nvila_8b", "model.s2_scales=[448,896]"], "model.s2_scales = [448, 896]: the projector takes 3 scales"),
    ("s2-text", ["model.s2_scales=[a,b,c]"], "model.s2_scales = ['a', 'b', 'c']: expected a list"),
    ("s2-without-s2", ["model=nvila_lite_2b", "model.s2_scales=[448,896,1344]"], "model.s2_scales: this checkpoint has no Dynamic-S2"),
    ("pool-zero", ["model=nvila_video_tiny", "model.video_pool_sizes=[[0,1,1]]"], "model.video_pool_sizes = [[0, 1, 1]]: a list of [t, h, w] of whole numbers >= 1"),
    ("pool-not-dividing", ["model=nvila_video_tiny", "model.video_pool_sizes=[[3,1,1]]"], "temporal pooling 3x1x1 needs the frame count (16) divisible by 3"),
    ("pool-text", ["model=nvila_video_tiny", "model.video_pool_sizes=abc"], "model.video_pool_sizes = 'abc': expected a list"),
    ("pool-without-tsp", ["model.video_pool_sizes=[[4,1,1]]"], "model.video_pool_sizes: this checkpoint's video encoder does not pool in time"),
    # precision, optimizer, checkpointing, loss
    ("fp8-unknown-recipe", ["precision=fp8", "precision.fp8=blockwise"], "precision.fp8 = 'blockwise'; use tensorwise, rowwise or null"),
    ("fp8-on-fp16", ["precision=bf16", "precision.weights=float16", "precision.fp8=tensorwise"], "precision.fp8 scales from bfloat16 or float32 tensors, not float16"),
    ("fp8-qlora", ["precision=fp8", "adapters=ln_vit_qlora_llm"], "adapters.llm.method = qlora stores them quantized; use adapters.llm.method=lora"),
    ("optim-unknown", ["trainer.optim=adam9"], "trainer.optim = 'adam9'; use one of adamw_torch, adamw_torch_fused, adamw_bnb_8bit"),
    ("checkpointing-unknown", ["trainer.gradient_checkpointing=[vit]"], "trainer.gradient_checkpointing: 'vit' is not a component; use true, false or a list of vision_tower, llm"),
    ("checkpointing-text", ["trainer.gradient_checkpointing=maybe"], "trainer.gradient_checkpointing = 'maybe': expected true or false or a list"),
    ("selective-loss-text", ["trainer.selective_loss=maybe"], "trainer.selective_loss = 'maybe': expected true or false"),
]


def _one_error_line(code: int, err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, (code, err[-3000:])
    assert lines[0].startswith(f"nvila-ft {command}: error: "), lines[0]
    return lines[0]


def _args(args: list[str], files: Path) -> list[str]:
    args = [a.replace("{files}", str(files)) for a in args]
    return args if any(a.startswith("task=") for a in args) else [*args, *TINY_DATA]


@pytest.mark.parametrize("args, says", [pytest.param(a, s, id=i) for i, a, s in PLAN_CASES])
def test_plan_refuses_with_one_line(files, args, says):
    code, out, err = _run(["plan", *_args(args, files)])
    assert says.replace("{files}", str(files)) in _one_error_line(code, err, "plan")
    assert out == ""  # no half plan on stdout


FINETUNE_CASES = [  # the knobs and settings finetune shares with plan are refused by finetune too, before any weight
    ("min-above-max", ["model=nvila_lite_tiny", "model.min_tiles=8", "model.max_tiles=4"], "model.min_tiles = 8 is above model.max_tiles = 4"),
    ("s2-not-multiples", ["model.s2_scales=[32,48,96]"], "model.s2_scales = [32, 48, 96]: each scale must be a multiple of the smallest"),
    ("pool-zero", ["model=nvila_video_tiny", "model.video_pool_sizes=[[0,1,1]]"], "model.video_pool_sizes = [[0, 1, 1]]: a list of [t, h, w]"),
    ("frames-not-pooled", ["model=nvila_video_tiny", "model.num_video_frames=6"], "needs the frame count (6) divisible by 8"),
    ("max-tiles-text", ["model.max_tiles=abc"], "model.max_tiles = 'abc': expected an integer or null"),
    ("released-model-without-path", ["model=nvila_8b"], "model.path is required: set it on the command line (model.path=...)"),
    ("config-missing-field", ["model=local", "model.path={files}/no_hidden_size"], "{files}/no_hidden_size/llm/config.json: missing `hidden_size`"),
    ("fp8-unknown-recipe", ["precision=fp8", "precision.fp8=rowwize"], "precision.fp8 = 'rowwize'; use tensorwise, rowwise or null"),
    ("optim-unknown", ["trainer.optim=adamw_4bit"], "trainer.optim = 'adamw_4bit'; use one of"),
    ("checkpointing-unknown", ["trainer.gradient_checkpointing=[projector]"], "'projector' is not a component"),
    ("deepspeed-unknown", ["deepspeed=zero4"], "Could not find 'deepspeed/zero4'"),
    ("data-file-empty", ["task=vqa", "task.train.path={files}/empty.json"], "no usable training record: the training data has no records"),
]


@pytest.mark.parametrize("args, says", [pytest.param(a, s, id=i) for i, a, s in FINETUNE_CASES])
def test_finetune_refuses_the_same_mistakes_before_loading(files, tmp_path, args, says):
    code, _, err = _run(["finetune", f"hydra.run.dir={tmp_path / 'run'}", *_args(args, files)])
    assert says.replace("{files}", str(files)) in _one_error_line(code, err, "finetune")
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    if not any(a.startswith("task=") for a in args):  # a data check reads the run's base; every other check comes first
        assert not (tmp_path / "run" / "base").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs fp8 on its GPU (or refuses an old one)")
def test_fp8_without_a_gpu_is_refused_unless_the_cpu_numerics_are_asked_for(files, tmp_path):
    code, _, err = _run(["finetune", "precision=fp8", f"hydra.run.dir={tmp_path / 'run'}", *TINY_DATA])
    line = _one_error_line(code, err, "finetune")
    assert "no CUDA GPU is visible: use precision=bf16 on this machine, or precision.fp8_on_cpu=true" in line
    assert not (tmp_path / "run" / "base").exists()
    code, out, err = _run(["plan", "precision=fp8", "--json", *TINY_DATA])  # plan plans the GPU run from here
    assert code == 0 and json.loads(out)["plans"]["max"]["fits"], err[-2000:]


def test_good_inputs_still_plan(files):
    code, out, err = _run(["plan", "model=nvila_8b", "--json", "plan.gpu_memory=80", "trainer.optim=adamw_8bit", *TINY_DATA])
    assert code in (0, 3), err[-2000:]  # 3: does not fit (a verdict, not an error)
    plan = json.loads(out)
    assert plan["gpu_bytes"] == 80 * 2**30
    assert all(plan["plans"][q]["total_bytes"] > 0 for q in ("p95", "max"))
    assert plan["plans"]["max"]["total_bytes"] >= plan["plans"]["p95"]["total_bytes"]

    def longest(*knobs: str) -> tuple[int, int]:
        code, out, err = _run(["plan", "model=nvila_lite_2b", "task=vqa", f"task.train.path={files / 'wide.json'}",
                               "task.val_fraction=0", "--json", *knobs])
        assert code in (0, 3), err[-2000:]
        sample = json.loads(out)["sequence"]["max"]
        return sample["tiles"], sample["positions"]

    # a 1400x1000 image: a 4x3 grid + thumbnail at max_tiles=12, a 3x2 grid + thumbnail at 6
    (tiles_12, positions_12), (tiles_6, positions_6) = longest("model.max_tiles=12"), longest("model.max_tiles=6")
    assert (tiles_12, tiles_6) == (13, 7) and positions_6 < positions_12


def test_accepted_knobs_reach_the_exported_config(tmp_path):
    """A run's base carries its knobs (ModelSource.checkpoint); the merged export writes the model's config, so the
    served model sees them too."""
    from nvila_ft.adapters import AdapterPolicy
    from nvila_ft.adapters.merge import export_merged
    from nvila_ft.recipes.loading import load_model
    from nvila_ft.model.source import ModelSource
    from nvila_ft.training.config import Precision

    knobs = {"num_video_frames": 16, "video_pool_sizes": [[4, 1, 1]]}  # the preset's: 16 frames, [[8, 1, 1]]
    source = ModelSource(preset="nvila-video-tiny", pretrained=True, **knobs)
    source.check()
    loaded = load_model(source, tmp_path / "run", Precision(), policy=AdapterPolicy(llm={"method": "lora"}))
    probe = loaded.processor.collate([loaded.processor.process(
        [{"role": "user", "content": "Describe the weather."}, {"role": "assistant", "content": "Sunny."}])])
    report = export_merged(loaded.model, tmp_path / "export", probe)
    exported = json.loads((Path(report.path) / "config.json").read_text())
    assert exported["num_video_frames"] == 16
    encoder = exported["video_encoder"]
    assert (json.loads(encoder) if isinstance(encoder, str) else encoder)["pool_sizes"] == [[4, 1, 1]]


def test_a_new_run_sent_into_an_existing_one_is_refused_before_hydra_rewrites_it(files, tmp_path):
    """`hydra.run.dir=<a run>` with other settings used to be refused only after Hydra had rewritten the run's
    .hydra/config.yaml, so its export and evaluation read settings it was never trained with."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "base").mkdir()
    recorded = "model:\n  s2_scales: [32, 64, 128]\n"
    (run / ".hydra" / "config.yaml").write_text(recorded)
    code, _, err = _run(["finetune", f"hydra.run.dir={run}", "model.s2_scales=[32,64,96]", *TINY_DATA])
    assert f"{run} already holds a run (its .hydra/ and base/): continue it with run={run}" in _one_error_line(code, err, "finetune")
    assert (run / ".hydra" / "config.yaml").read_text() == recorded
    attempt = tmp_path / "attempt"  # a run that stopped before building its base is simply run again
    (attempt / ".hydra").mkdir(parents=True)
    (attempt / ".hydra" / "config.yaml").write_text(recorded)
    code, _, err = _run(["finetune", f"hydra.run.dir={attempt}", "trainer.optim=adam9", *TINY_DATA])
    assert "trainer.optim = 'adam9'" in _one_error_line(code, err, "finetune")


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "two"), ("RANK", "-1")])
def test_a_launcher_variable_that_is_not_a_number_is_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    code, _, err = _run(["plan"])
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"nvila-ft: error: the environment variable {name}={value!r} is not a whole number "
                                        ">= 0 (launchers set it; unset it to run one process)"]
