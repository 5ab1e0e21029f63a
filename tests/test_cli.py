"""`nvila-ft` commands end to end on the tiny presets (a few steps each), as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.tolerances import worst

SMALL_RUN = [
    "task.train.num_records=48",
    "trainer.max_steps=4",
    "trainer.per_device_train_batch_size=4",
    "trainer.eval_steps=2",
    "trainer.save_steps=2",
    "trainer.logging_steps=1",
    "eval.max_records=6",
]


@dataclass
class CliResult:
    """What a `nvila-ft` call left: its exit status and what it wrote on stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(
    args: list[str], cwd: Path, cache: Path, check: bool = True, extra_env: dict | None = None, subprocess_: bool = False,
) -> CliResult:
    """`nvila-ft <args>` run from `cwd`, with built-in data under `cache`: in this process (what a test needs of a
    command: its exit status, console and files, without a Python start and imports of its own each time), or as a
    subprocess with `subprocess_=True` (what needs a process of its own: an import-time check, a killed process).
    A DeepSpeed run always gets its own process: DeepSpeed keeps process-wide state that outlives a run (its process
    groups, transformers' ZeRO-3 flag, `torch.nn.functional.linear` patched while ZeRO-3 builds a model)."""
    env = {"NVILA_FT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           **(extra_env or {})}
    if subprocess_ or any(arg.startswith("deepspeed=") and arg != "deepspeed=none" for arg in args):
        done = subprocess.run([sys.executable, "-m", "nvila_ft.cli", *args], cwd=cwd, env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=900)
        result = CliResult(done.returncode, done.stdout, done.stderr)
    else:
        result = _in_process(args, cwd, env)
    if check and result.returncode != 0:
        raise AssertionError(f"nvila-ft {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _forget_accelerate_state() -> None:
    """accelerate's cached process state ends with the command, as it would with its process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _in_process(args: list[str], cwd: Path, env: dict[str, str]) -> CliResult:
    """`nvila_ft.cli.main(args)` with the process state a command may change put back afterwards: environment,
    working directory, argv, torch's thread count, Hydra's and accelerate's global state, and the logging set-up. Hydra's
    `dictConfig` closes every handler logging knows of, pytest's own among them: those are hidden from it for the
    call and restored after, and the handlers the command made are closed."""
    import contextlib
    import io
    import logging
    import traceback

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from nvila_ft import cli

    saved_env, saved_cwd, saved_argv, saved_threads = dict(os.environ), os.getcwd(), list(sys.argv), torch.get_num_threads()
    root = logging.getLogger()
    saved_handlers, saved_level, saved_known = list(root.handlers), root.level, list(logging._handlerList)
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    os.environ.update(env)
    os.chdir(cwd)
    logging._handlerList[:] = []
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli.main(list(args))
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what a subprocess would print before exiting with 1
                traceback.print_exc()
                status = 1
    finally:
        GlobalHydra.instance().clear()
        _forget_accelerate_state()
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:], root.level = saved_handlers, saved_level
        logging._handlerList[:] = saved_known
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
    return CliResult(status, stdout.getvalue(), stderr.getvalue())


def last_checkpoint(run: Path) -> Path:
    """A run's newest checkpoint folder, by step number: checkpoint-10 comes after checkpoint-9."""
    return max(run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    """One small fine-tuning run shared by the evaluate / predict / export tests."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    # with scale knobs set: the export must carry them (the tiny 8B layout tiles at scales 32/64/96: 9 tiles at least)
    result = run_cli(["finetune", f"hydra.run.dir={run}", "adapters=lora_vit_lora_llm", "model.max_tiles=9",
                      "model.num_video_frames=4", *SMALL_RUN], root, cache)
    return run, result


def test_finetune_writes_a_complete_run(finished_run):
    run, result = finished_run
    assert "vision_tower  lora" in result.stdout and "mm_projector  full" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["policy"] == "lora_vit_lora_llm"
    assert set(metrics["metrics"]) == {"before_training", "after_training"}
    assert set(metrics["metrics"]["after_training"]) == {"accuracy", "exact_match", "count"}
    assert metrics["trainable_parameters"]["mm_projector"] == 29568
    assert (run / "final" / "adapter_policy.json").is_file()
    assert (run / "final" / "llm" / "adapter_model.safetensors").is_file()
    assert (run / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "predictions_after_training.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"origin", "question", "reference", "prediction"} <= set(rows[0])
    checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
    assert checkpoints and all((run / c / "COMPLETE").is_file() for c in checkpoints)
    assert "train: " in (run / "data_report.txt").read_text()
    assert (run / ".hydra" / "overrides.yaml").is_file()


def test_evaluate_predict_export_a_run(finished_run, cache, tmp_path):
    run, _ = finished_run
    evaluated = run_cli(["evaluate", f"run={run}", f"hydra.run.dir={tmp_path / 'eval'}", "eval.max_records=4"], tmp_path, cache)
    assert "accuracy" in evaluated.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["records"] == 4

    image = next((cache / "builtin").rglob("*.png"))
    predicted = run_cli(
        ["predict", f"run={run}", f"hydra.run.dir={tmp_path / 'pred'}", "predict.prompt=What color is the shape?",
         f"predict.image={image}", "predict.max_new_tokens=4"],
        tmp_path, cache,
    )
    answers = [line for line in predicted.stdout.splitlines() if line.startswith("prompt: ")]
    assert len(answers) == 1
    assert json.loads((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()[0])["source"] == "prompt"

    merged = tmp_path / "merged"
    exported = run_cli(["export", f"run={run}", f"export.output={merged}", f"hydra.run.dir={tmp_path / 'ex'}"], tmp_path, cache)
    assert "probe check" in exported.stdout
    assert {p.name for p in merged.iterdir()} == {"config.json", "llm", "vision_tower", "mm_projector"}
    exported_config = json.loads((merged / "config.json").read_text())
    assert (exported_config["max_tiles"], exported_config["num_video_frames"]) == (9, 4)  # what it was trained with
    again = run_cli(["export", f"run={run}", f"export.output={merged}", f"hydra.run.dir={tmp_path / 'ex2'}"], tmp_path, cache, check=False)
    assert again.returncode == 1 and "export.overwrite=true" in again.stderr

    # the merged export answers like the run it came from
    from_export = run_cli(
        ["predict", f"model.path={merged}", "adapters=none", f"hydra.run.dir={tmp_path / 'pred2'}",
         "predict.prompt=What color is the shape?", f"predict.image={image}", "predict.max_new_tokens=4"],
        tmp_path, cache,
    )
    assert [line for line in from_export.stdout.splitlines() if line.startswith("prompt: ")] == answers

    adapters_only = tmp_path / "adapters_only"
    run_cli(["export", f"run={run}", "export.merge=false", f"export.output={adapters_only}", f"hydra.run.dir={tmp_path / 'ex3'}"], tmp_path, cache)
    assert (adapters_only / "adapter_policy.json").is_file() and (adapters_only / "vision_tower" / "adapter_config.json").is_file()


def test_validate_data_reports_every_bad_record(tmp_path, cache):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.png").write_bytes((tmp_path / "img" / "ok.png").read_bytes()[:40])
    records = [
        {"id": "good", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "missing", "image": "img/nope.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "corrupt", "image": "img/broken.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "no-answer", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "escape", "image": "../secret.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "two-tags", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image><image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "long", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\n" + "word " * 5000}, {"from": "gpt", "value": "A"}]},
    ]
    # "long": the pre-tokenizer splits off every " word", so it is at least 5000 tokens whatever the merges, past
    # the tiny presets' model_max_length of 4096.
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    (tmp_path / "secret.png").write_bytes((tmp_path / "img" / "ok.png").read_bytes())
    result = run_cli(
        ["validate-data", "task=vqa", f"task.train.path={data}", "task.val_fraction=0", f"hydra.run.dir={tmp_path / 'v'}"],
        tmp_path, cache, check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    out = result.stdout
    for index, kind in ((1, "missing_media"), (2, "corrupt_media"), (3, "no_answer"), (4, "unsafe_path"), (5, "media_tag_mismatch"), (6, "too_long")):
        assert f"{data}[{index}]: {kind}" in out, (kind, out)
    assert f"{data}[0]" not in out
    assert "7 records: 1 ok, 6 bad" in out
    assert (tmp_path / "v" / "data_report.txt").read_text().count(str(data)) == 6


def test_finetune_stops_on_bad_records_when_asked(tmp_path, cache):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": "missing.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}] * 3))
    result = run_cli(["finetune", "task=vqa", f"task.train.path={data}", "data.on_bad_record=stop", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, cache, check=False)
    assert result.returncode == 1
    assert "3 bad records (data.on_bad_record=stop)" in result.stderr and "Traceback" not in result.stderr


def test_config_errors_fail_before_anything_loads(tmp_path, cache):
    typo = run_cli(["finetune", "trainer.learnin_rate=1e-3"], tmp_path, cache, check=False)
    assert typo.returncode == 1 and "learnin_rate" in typo.stderr
    policy = run_cli(["finetune", "adapters.mm_projector.method=qlora", f"hydra.run.dir={tmp_path / 'p'}"], tmp_path, cache, check=False)
    assert policy.returncode == 1 and "adapters.mm_projector.method = qlora" in policy.stderr
    assert not (tmp_path / "p" / "base").exists()  # nothing was built or loaded
    unknown = run_cli(["finetune", "adapters.llm.rnak=8"], tmp_path, cache, check=False)
    assert unknown.returncode == 1 and "rnak" in unknown.stderr
    missing = run_cli(["finetune", "model=nvila_8b", f"hydra.run.dir={tmp_path / 'm'}"], tmp_path, cache, check=False)
    assert missing.returncode == 1 and "model.path" in missing.stderr


def test_memory_levers_from_the_command_line(tmp_path, cache):
    levers = ["trainer.selective_loss=false", "trainer.gradient_checkpointing=[llm]", "trainer.offload_activations=true",
              "trainer.optim=paged_adamw_8bit"]
    small = ["task.train.num_records=8", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
             "trainer.eval_steps=null", "eval.before_training=false", "eval.max_records=2"]
    run = tmp_path / "levers"
    run_cli(["finetune", *levers, *small, f"hydra.run.dir={run}"], tmp_path, cache)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    wrong = run_cli(["finetune", "trainer.gradient_checkpointing=[llm,projector]", f"hydra.run.dir={tmp_path / 'w'}"], tmp_path, cache, check=False)
    assert wrong.returncode == 1 and one_line_error(wrong).endswith(
        "trainer.gradient_checkpointing: 'projector' is not a component; use true, false or a list of vision_tower, llm")
    optim = run_cli(["finetune", "trainer.optim=adam9", f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, cache, check=False)
    assert optim.returncode == 1 and "trainer.optim = 'adam9'; use one of adamw_torch, " in one_line_error(optim)


def test_help_and_composed_config(tmp_path, cache):
    assert "validate-data" in run_cli(["--help"], tmp_path, cache).stdout
    shown = run_cli(["finetune", "--cfg", "job", "adapters=ln_vit_qlora_llm", "adapters.llm.r=8"], tmp_path, cache).stdout
    assert "method: qlora" in shown and "r: 8" in shown and "target_modules: null" in shown
    groups = run_cli(["finetune", "--help"], tmp_path, cache).stdout
    for group in ("task: ", "adapters: ", "model: ", "trainer: ", "precision: ", "deepspeed: ", "logger: "):
        assert group in groups
    assert "ln_vit_qlora_llm" in groups and "medical_vqa" in groups


def test_user_config_directory_on_the_search_path(tmp_path, cache):
    tasks = tmp_path / "mine" / "task"
    tasks.mkdir(parents=True)
    (tasks / "tiny_shapes.yaml").write_text(
        "_target_: nvila_ft.domains.task.Task\nname: my_shapes\ntrain:\n  _target_: nvila_ft.domains.builtin.BuiltinData\n"
        "  dataset: shapes\n  num_records: 20\nval_fraction: 0.2\nmetrics: [accuracy]\n"
    )
    shown = run_cli(["finetune", "--cfg", "job", f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "task=tiny_shapes"], tmp_path, cache)
    assert "name: my_shapes" in shown.stdout


def test_predict_a_file_of_prompts(finished_run, cache, tmp_path):
    run, _ = finished_run
    image = next((cache / "builtin").rglob("*.png"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Where is the shape?", "image": str(image)}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hi."}]}) + "\n"
    )
    result = run_cli(["predict", f"run={run}", f"predict.prompts={prompts}", f"hydra.run.dir={tmp_path / 'p'}",
                      "predict.max_new_tokens=3"], tmp_path, cache)
    assert [line.split(":")[1] for line in result.stdout.splitlines() if line.startswith(str(prompts))] == ["1", "3"]
    assert len((tmp_path / "p" / "predictions.jsonl").read_text().splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    failed = run_cli(["predict", f"run={run}", f"predict.prompts={bad}"], tmp_path, cache, check=False)
    assert failed.returncode == 1 and f"{bad}:1: needs a 'prompt' string" in failed.stderr


def test_finetune_from_a_csv_table_and_an_hf_dataset(tmp_path, cache):
    import datasets
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 60, 220)}
    rows = []
    (tmp_path / "media").mkdir()
    for i in range(16):
        name = list(colours)[i % 2]
        Image.new("RGB", (40, 40), colours[name]).save(tmp_path / "media" / f"{i}.png")
        rows.append(f"{i},{i}.png,What colour is it?,{name}")
    table = tmp_path / "data.csv"
    table.write_text("id,image,question,answer\n" + "\n".join(rows) + "\n")
    run = tmp_path / "csv-run"
    run_cli(["finetune", "task=csv_vqa", f"task.train.path={table}", f"task.train.media_root={tmp_path / 'media'}",
             "task.val_fraction=0.25", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4", "trainer.eval_steps=1",
             "trainer.save_steps=1", "eval.max_records=2", f"hydra.run.dir={run}"], tmp_path, cache)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["train_records"], metrics["validation_records"]) == (12, 4)

    images = [Image.new("RGB", (40, 40), colours[list(colours)[i % 2]]) for i in range(8)]
    saved = tmp_path / "hf"
    datasets.Dataset.from_dict(
        {"image": images, "question": ["Colour?"] * 8, "answer": [list(colours)[i % 2] for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}),
    ).save_to_disk(str(saved))
    checked = run_cli(["validate-data", "task=hf_vqa", f"task.train.path={saved}", "task.val_fraction=0.25",
                       f"hydra.run.dir={tmp_path / 'hf-check'}"], tmp_path, cache)
    assert "train: 6 records: 6 ok, 0 bad" in checked.stdout and "validation: 2 records: 2 ok, 0 bad" in checked.stdout


def one_line_error(result) -> str:
    """The single stderr line of a failed command (no traceback, no second line)."""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # progress bars
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """8 training and 4 validation records (LLaVA JSON); the validation file sits in another folder than its media."""
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    (root / "img").mkdir()
    (root / "val").mkdir()
    records = []
    for i in range(12):
        colour = ("red", "blue")[i % 2]
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{i}.png")
        records.append({"id": str(i), "image": f"img/{i}.png", "question_type": "colour",
                        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": colour}]})
    (root / "train.json").write_text(json.dumps(records[:8]))
    (root / "val" / "val.json").write_text(json.dumps(records[8:]))  # its media are under root, not root/val
    return root


def test_validation_that_is_all_bad_stops_or_trains_as_asked(tmp_path, cache, colour_data):
    common = ["task=vqa", f"task.train.path={colour_data / 'train.json'}", "trainer.max_steps=2",
              "trainer.per_device_train_batch_size=4", "trainer.save_steps=1", "trainer.eval_steps=1"]
    val = colour_data / "val" / "val.json"
    stopped = run_cli(["finetune", *common, f"task.validation={val}", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, cache, check=False)
    line = one_line_error(stopped)
    assert "no usable validation record: all 4 validation records are bad (4 missing_media)" in line
    assert f"under the media root {val.parent}" in line and "eval.on_empty=train" in line
    assert not list((tmp_path / "a").glob("checkpoint-*"))  # stopped before training
    assert "4 bad records" in (tmp_path / "a" / "cli.log").read_text()

    trained = run_cli(["finetune", *common, f"task.validation={val}", "eval.on_empty=train", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, cache)
    assert "training without evaluation (eval.on_empty=train)" in trained.stdout
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (metrics["steps"], metrics["validation_records"], metrics["metrics"]) == (2, 0, {})

    fixed = run_cli(["finetune", *common, f"task.validation.path={val}", f"task.validation.media_root={colour_data}",
                     f"hydra.run.dir={tmp_path / 'c'}"], tmp_path, cache)
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert (metrics["train_records"], metrics["validation_records"]) == (8, 4)
    assert metrics["metrics_by_question_type"]["after_training"]["colour"]["count"] == 4
    # the image-blind baselines: training answers are 4 red, 4 blue; validation 2 red, 2 blue -> 0.5 each
    assert {name: s["exact_match"] for name, s in metrics["image_blind_baselines"].items()} == {
        "majority_answer": 0.5, "question_prior": 0.5}
    assert "image-blind baselines: majority answer 0.500, question prior 0.500" in fixed.stdout

    # evaluate skips and reports bad validation records as finetune does, instead of stopping at the first
    records = json.loads(val.read_text())
    records[1]["image"] = "img/missing.png"
    one_bad = tmp_path / "one_bad.json"
    one_bad.write_text(json.dumps(records))
    evaluated = run_cli(["evaluate", f"run={tmp_path / 'c'}", f"task.validation.path={one_bad}", f"hydra.run.dir={tmp_path / 'e'}"],
                        tmp_path, cache)
    assert f"{one_bad}[1]: missing_media" in evaluated.stdout
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["records"] == 3
    assert f"{one_bad}[1]: missing_media" in (tmp_path / "e" / "data_report.txt").read_text()


def test_user_errors_are_one_line(tmp_path, cache, colour_data):
    jsonl = tmp_path / "train.json"
    jsonl.write_text("\n".join(json.dumps(r) for r in json.loads((colour_data / "train.json").read_text())) + "\n")
    data = f"task.train.path={colour_data / 'train.json'}"
    cases = [
        (["finetune", "task=vqa"], "task.train.path is required: set it on the command line (task.train.path=...)"),
        (["finetune", "trainer.max_steps=abc"], "trainer.max_steps = 'abc': expected an integer"),
        (["finetune", "trainer.learnin_rate=1"], "Could not override 'trainer.learnin_rate'"),
        (["evaluate", "task=vqa", data, "task.val_fraction=0"], "task vqa has no validation records"),
        (["finetune", "task=vqa", f"task.train.path={jsonl}"], "holds one JSON record per line (JSON Lines) but is named .json"),
        (["finetune", "task=vqa", data, "adapters=ln_vit_lora_llm", "adapters.llm.target_modules=[qproj]"],
         "adapters.llm.target_modules: 'qproj' matches no layer of the llm; valid names: down_proj, embed_tokens"),
        (["predict", "predict.prompt=Colour?", "predict.image=img/none.png"], "img/none.png: not found (looked for "),
    ]
    for index, (args, expected) in enumerate(cases):
        result = run_cli([*args, f"hydra.run.dir={tmp_path / str(index)}"], tmp_path, cache, check=False)
        assert expected in one_line_error(result), (args, result.stderr[-2000:])
    shown = run_cli(["finetune", "trainer.max_steps=abc"], tmp_path, cache, check=False, extra_env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in shown.stderr  # the full story is one setting away


def test_a_run_made_with_user_folders_needs_only_its_directory(tmp_path, cache):
    mine = tmp_path / "mine"
    (mine / "task").mkdir(parents=True)
    (mine / "adapters").mkdir()
    (mine / "task" / "my_shapes.yaml").write_text(
        "_target_: nvila_ft.domains.task.Task\nname: my_shapes\ntrain:\n  _target_: nvila_ft.domains.builtin.BuiltinData\n"
        "  dataset: shapes\n  num_records: 24\nval_fraction: 0.25\nmetrics: [accuracy]\n"
    )
    (mine / "adapters" / "my_policy.yaml").write_text(
        "_target_: nvila_ft.adapters.AdapterPolicy\nname: my_policy\nvision_tower: {method: frozen}\n"
        "mm_projector: {method: full}\nllm: {method: lora, r: 4, alpha: 8}\n"
    )
    run = tmp_path / "run"
    run_cli(["finetune", f"hydra.searchpath=[file://{mine}]", "task=my_shapes", "adapters=my_policy", "trainer.max_steps=2",
             "trainer.save_steps=1", "trainer.eval_steps=1", "eval.before_training=false", f"hydra.run.dir={run}"], tmp_path, cache)
    shutil.rmtree(mine)  # the folders that composed the run are gone: export, evaluate and resume still work
    run_cli(["export", f"run={run}", f"export.output={tmp_path / 'merged'}", f"hydra.run.dir={tmp_path / 'x'}"], tmp_path, cache)
    assert (tmp_path / "merged" / "llm" / "model.safetensors").is_file()
    evaluated = run_cli(["evaluate", f"run={run}", f"hydra.run.dir={tmp_path / 'e'}", "eval.max_records=2"], tmp_path, cache)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["task"] == "my_shapes", evaluated.stdout
    saved = (run / ".hydra" / "config.yaml").read_bytes()
    run_cli(["finetune", f"run={run}", "trainer.resume=true", "trainer.max_steps=3", f"hydra.run.dir={run}"], tmp_path, cache)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3
    assert (run / ".hydra" / "config.yaml").read_bytes() == saved  # a command on a run never rewrites its config


def test_console_summary_is_in_cli_log_without_banners(finished_run):
    run, result = finished_run
    log = (run / "cli.log").read_text()
    for line in ("after_training: accuracy", "image-blind baselines", "train: 41 records", "adapter policy lora_vit_lora_llm",
                 "planned GPU memory: "):
        assert line in result.stdout and line in log, line
    for banner in ("accelerator", "wandb", "DeepSpeed", "[INFO]", "[WARNING]"):
        assert banner not in result.stdout, banner


def test_progress_and_plot_show_the_base_learning_rate(finished_run):
    run, _ = finished_run
    state = json.loads((last_checkpoint(run) / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "learning_rate" in entry]
    assert logged
    for entry in logged:  # lora_vit_lora_llm: the vision tower at 0.1x the base rate, the LLM at the base rate
        same = worst(3, torch.float64)  # a rate, its ratio and a product, in float64
        assert entry["learning_rate"] == pytest.approx(entry["learning_rate/llm"], rel=same)
        assert entry["learning_rate/vision_tower"] == pytest.approx(0.1 * entry["learning_rate"], rel=same)
        assert entry["learning_rate/mm_projector"] == pytest.approx(entry["learning_rate"], rel=same)


def as_written_before_the_redesign(run: Path, old: Path) -> None:
    """A copy of `run` as nvila-ft wrote it before its classes moved (issue 16): the old `_target_` paths in
    .hydra/config.yaml and, in every adapter_policy.json and the adapters node, each component with the `rslora`
    and `dora` fields it always held and without the options methods declare now."""
    from omegaconf import OmegaConf

    from nvila_ft.legacy_targets import MOVED_TARGETS

    shutil.copytree(run, old)
    earlier = {new: previous for previous, new in MOVED_TARGETS.items()}
    newer_options = ("loraplus_lr_ratio", "pissa_niter")

    def old_component(component: dict) -> dict:
        kept = {k: v for k, v in component.items() if k not in newer_options and k != "options"}
        return {"rslora": False, "dora": False, **kept}

    config_file = old / ".hydra" / "config.yaml"
    config = OmegaConf.to_container(OmegaConf.load(config_file))

    def rewrite(node):
        if isinstance(node, dict):
            return {k: earlier.get(v, v) if k == "_target_" else rewrite(v) for k, v in node.items()}
        return [rewrite(v) for v in node] if isinstance(node, list) else node

    config = rewrite(config)
    for name in ("vision_tower", "mm_projector", "llm"):
        config["adapters"][name] = old_component(config["adapters"][name])
    assert "nvila_ft.data.task.Task" in str(config) and "nvila_ft.commands.plan.PlanOptions" in str(config)
    config_file.write_text(OmegaConf.to_yaml(config))
    for policy_file in old.rglob("adapter_policy.json"):
        meta = json.loads(policy_file.read_text())
        meta["policy"] = {k: old_component(v) if isinstance(v, dict) else v for k, v in meta["policy"].items()}
        policy_file.write_text(json.dumps(meta))


def test_a_run_written_before_the_redesign_evaluates_exports_and_resumes(finished_run, cache, tmp_path):
    from safetensors.torch import load_file

    run, _ = finished_run
    old = tmp_path / "old_run"
    as_written_before_the_redesign(run, old)
    scores = {}
    for name, directory in (("now", run), ("old", old)):
        run_cli(["evaluate", f"run={directory}", f"hydra.run.dir={tmp_path / ('eval_' + name)}", "eval.max_records=4"], tmp_path, cache)
        scores[name] = json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())["metrics"]
        run_cli(["export", f"run={directory}", f"export.output={tmp_path / ('merged_' + name)}",
                 f"hydra.run.dir={tmp_path / ('ex_' + name)}"], tmp_path, cache)
    assert scores["old"] == scores["now"]
    for file in sorted((tmp_path / "merged_now").rglob("*.safetensors")):
        now, before = load_file(str(file)), load_file(str(tmp_path / "merged_old" / file.relative_to(tmp_path / "merged_now")))
        assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)

    run_cli(["finetune", f"run={old}", "trainer.resume=true", "trainer.max_steps=5", f"hydra.run.dir={old}"], tmp_path, cache)
    assert json.loads((old / "metrics.json").read_text())["steps"] == 5
