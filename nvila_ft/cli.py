"""`nvila-ft <command> [hydra overrides]`: the only module (with nvila_ft.commands) that knows about Hydra."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import shutil
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

from nvila_ft.errors import UserError

COMMANDS = {
    "finetune": ("nvila_ft.commands.finetune", "finetune", "fine-tune a model on a task with an adapter policy"),
    "evaluate": ("nvila_ft.commands.evaluate", "evaluate", "generation metrics of a run or a checkpoint on a task"),
    "predict": ("nvila_ft.commands.predict", "predict", "answer a prompt or a file of prompts"),
    "export": ("nvila_ft.commands.export", "export", "write a run's merged model (official layout) or its adapters"),
    "validate-data": ("nvila_ft.commands.validate_data", "validate_data", "check a task's data without a GPU"),
    "plan": ("nvila_ft.commands.plan", "plan", "GPU memory of a finetune run, before anything loads (--json)"),
    "dpo": ("nvila_ft.commands.dpo", "dpo", "preference-tune (DPO, IPO, ... with TRL) on chosen/rejected replies"),
    "prune": ("nvila_ft.commands.prune", "prune", "DeltaLoss pruning of a task's training data, in its own layout"),
}
USAGE = """usage: nvila-ft <command> [key=value ...] [-m] [--cfg job] [--help]

commands:
{commands}

Configuration is Hydra's: groups model, task, adapters, trainer, precision, deepspeed, logger
(e.g. `nvila-ft finetune task=vqa task.train.path=data.json adapters=ln_vit_qlora_llm model=nvila_lite_2b
model.path=/ckpt/NVILA-Lite-2B precision=bf16`); `-m` sweeps comma-separated values; `--cfg job` prints
the composed config; `nvila-ft <command> --help` lists every option.
"""


# Import-time warnings about optional CUDA kernels (torchao, bitsandbytes) that say nothing about the run.
NOISY_LOGGERS = ("torchao", "bitsandbytes", "bitsandbytes.cextension", "torch.utils._pytree")


def _distributed_launch_problem(command: str, overrides: list[str]) -> str | None:
    """What stops a multi-process launch (torchrun, deepspeed, srun) of this command, or None."""
    if command != "finetune":
        return f"{command} runs in one process; launch it without torchrun / deepspeed"
    if "-m" in overrides or "--multirun" in overrides:
        return "a sweep (-m) runs its jobs one after another; launch each job with torchrun instead"
    if not any(o.startswith(("hydra.run.dir=", "run=")) for o in overrides):
        return ("every process of a multi-process run needs the same run directory: add hydra.run.dir=<dir> "
                "(or run=<dir> to continue a run)")
    return None


def _existing_run_problem(command: str, overrides: list[str]) -> str | None:
    """A new training run sent (hydra.run.dir=) into a folder that already holds one: Hydra would rewrite that run's
    recorded configuration (.hydra/) before any check could refuse the new settings, so it is refused first. Only in
    one process: the ranks of a launch see the folder their process 0 is writing."""
    if command not in ("finetune", "dpo") or any(o.startswith("run=") for o in overrides):
        return None
    folder = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    if folder is None or not (Path(folder) / ".hydra" / "config.yaml").is_file() or not (Path(folder) / "base").exists():
        return None
    return (f"{folder} already holds a run (its .hydra/ and base/): continue it with run={folder} (trainer.resume=true "
            "resumes its training), or choose a new hydra.run.dir")


def _per_rank_overrides(rank: int) -> list[str]:
    """Process 0 writes the run's shared files; every other process keeps its own log and a quiet console."""
    if rank == 0:
        return []
    return [
        "hydra.output_subdir=null",
        f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/cli-rank{rank}.log",
        "++hydra.job_logging.handlers.console.level=WARNING",
    ]


def _quiet_library_notices() -> None:
    """Notices of libraries that say nothing about the run: transformers prints one about W&B at import when
    WANDB_MODE=offline is set (W&B in use or not), peft asks transformers a deprecated question."""
    import contextlib
    import io
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    with contextlib.redirect_stdout(io.StringIO()):
        import transformers.integrations.integration_utils  # noqa: F401


def _not_accelerator_detection(record: logging.LogRecord) -> bool:
    """DeepSpeed announces its accelerator auto-detection whenever accelerate imports it, used or not."""
    return record.filename != "real_accelerator.py"


class ConsoleFormatter(logging.Formatter):
    """Messages as plain lines on the console; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class LogFileOnly(logging.Filter):
    """Keeps what the media libraries log off the console: a file they cannot read is reported once, as its
    record's one line in the data report; their own messages and tracebacks go to the run's log file only."""

    LIBRARIES = ("pydicom", "nibabel", "PIL", "libav")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] not in self.LIBRARIES


def config_dir() -> Path:
    return Path(str(files("nvila_ft.hydra_conf")))


# Groups nvila-ft registers itself: (package of the option files, their suffix, group, whether each option sits on
# the defaults of the dataclass its `_target_` builds). tasks/ and adapters/ are folders named apart from their
# groups; the model options are `.yml` because Hydra reads `conf/` itself, and would take `conf/model/*.yaml` as
# they are (without ModelSource's defaults) in place of the registered ones.
CONFIG_GROUPS = (
    ("nvila_ft.hydra_conf.tasks", ".yaml", "task", False),
    ("nvila_ft.hydra_conf.adapters", ".yaml", "adapters", True),
    ("nvila_ft.hydra_conf.model", ".yml", "model", True),
)


def register_config_groups() -> None:
    """The options of `CONFIG_GROUPS`, in Hydra's config store."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for package, suffix, group, with_defaults in CONFIG_GROUPS:
        for file in sorted(files(package).iterdir(), key=lambda f: f.name):
            if file.name.endswith(suffix):
                node = OmegaConf.create(file.read_text())
                node = with_target_defaults(node) if with_defaults else node
                store.store(group=group, name=file.name[: -len(suffix)], node=node)


@functools.cache
def target_defaults(target: str) -> dict[str, Any]:
    """The defaults of the dataclass `target` names, computed once for all the options of its group: a policy's
    also list every method's options (`AdapterPolicy.defaults`), other targets' are their fields."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    built = get_object(target)
    return built.defaults() if hasattr(built, "defaults") else OmegaConf.to_container(OmegaConf.structured(built))


def with_target_defaults(node: Any) -> Any:
    """`node` over every field of the dataclass its `_target_` builds, at its default: the file names only what
    differs, `model.max_tiles=4` or `adapters.llm.target_modules=[...]` needs no `+` and shows in `--cfg job`, and a
    misspelt key is still Hydra's "not in struct" error. A value the file leaves required (`???`) stays required.
    A node without a dataclass target (`adapters=none`) is returned as it is."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    target = node.get("_target_") if len(node) else None
    if target is None or not dataclasses.is_dataclass(get_object(target)):
        return node
    merged = OmegaConf.merge({"_target_": target, **target_defaults(target)}, node)
    for key in node:
        if OmegaConf.is_missing(node, key):
            merged[key] = "???"  # a merge keeps the default under a missing value
    return merged


def _is_user_error(error: BaseException) -> bool:
    """Errors that are the user's to fix: nvila-ft's (`UserError`), Hydra's composition errors, OmegaConf's. Hydra's
    InstantiationException wraps what a constructor raised: `commands.common.build` has turned every user error
    among those into a ConfigError already, so what is left wrapped is a bug."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if any(isinstance(e, UserError) for e in (error, error.__cause__)):
        return True
    return isinstance(error, (HydraException, OmegaConfBaseException)) and not isinstance(error, InstantiationException)


def one_line(error: BaseException) -> str:
    """An error (and the OmegaConf error under a Hydra one) as one line, without OmegaConf's key/type trailer."""
    texts: list[str] = []
    for e in (error, error.__cause__):
        if e is None:
            continue
        text, previous = "", ""
        for raw in str(e).splitlines():
            line = raw.strip()
            if line.startswith("Config search path"):
                break
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=")):
                continue
            if text:  # Hydra lists options one per tab-indented line
                text += ", " if raw.startswith("\t") and previous.startswith("\t") else " " if text.endswith((":", ".")) else "; "
            text, previous = text + line, raw
        if text and not any(text in t for t in texts):
            texts.append(text)
    return "; ".join(texts)


def _without_launcher_arguments(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes `--local_rank=<n>` first (torchrun sets LOCAL_RANK instead); the process
    reads it from the environment either way."""
    out, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
            skip = "=" not in arg
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
    return out


def _launcher_number(name: str, default: int) -> int:
    """RANK / WORLD_SIZE as a launcher (torchrun, deepspeed) sets them; anything else ends the run in one line."""
    value = os.environ.get(name, str(default))
    if not value.strip().isdigit():
        print(f"nvila-ft: error: the environment variable {name}={value!r} is not a whole number >= 0 (launchers "
              f"set it; unset it to run one process)", file=sys.stderr)
        sys.exit(2)
    return int(value)


def main(argv: list[str] | None = None) -> None:
    command, rest = _command_and_overrides(list(sys.argv[1:] if argv is None else argv))
    _quiet_libraries()
    register_config_groups()
    results, failures = [], []
    app = _hydra_app(command, results, failures)
    rank, world = _launcher_number("RANK", 0), _launcher_number("WORLD_SIZE", 1)
    where = f"nvila-ft {command}" + (f" (rank {rank})" if world > 1 else "")
    rest, scratch = _run_overrides(command, rest, where, rank, world)
    try:
        _run(app, command, rest, where, failures)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if command == "validate-data" and any(results):
        sys.exit(1)  # bad records were found
    if command == "plan" and any(results):
        sys.exit(results[-1])  # the run does not fit (commands.plan.DOES_NOT_FIT)


def _command_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
    """The command and its overrides; the usage (`--help`) or an unknown command ends here."""
    argv = _without_launcher_arguments(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        listing = "\n".join(f"  {name:<14} {doc}" for name, (_, _, doc) in COMMANDS.items())
        print(USAGE.format(commands=listing))
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"nvila-ft: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    return argv[0], argv[1:]


def _quiet_libraries() -> None:
    """No library noise on the console: tokenizer fork warnings, CUDA-kernel notices, progress bars."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_not_accelerator_detection)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar per component
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # nor datasets' "Generating train split"
    _quiet_library_notices()


def _hydra_app(command: str, results: list, failures: list) -> Any:
    """The command as a Hydra app: its return values go to `results`; in one job (not a sweep) its exception goes
    to `failures`, to be reported without Hydra's "Error executing job" line."""
    import hydra

    module_name, function_name, _ = COMMANDS[command]

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def app(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        function = getattr(importlib.import_module(module_name), function_name)
        try:
            results.append(function(cfg))
        except Exception as error:  # noqa: BLE001 - reported by _run, in one line when it is the user's to fix
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise  # Hydra names the failed job of a sweep
            failures.append(error)
            return None
        return results[-1]  # the objective a sweeper (e.g. Optuna) optimises

    return app


def _run_overrides(command: str, rest: list[str], where: str, rank: int, world: int) -> tuple[list[str], str | None]:
    """The overrides Hydra gets (the user's, plus those of a launched rank, a plan or a command on a run) and the
    scratch folder of a plan (removed afterwards), or None. A launch or run folder that cannot work ends here."""
    if world > 1:
        problem = _distributed_launch_problem(command, rest)
        if problem:
            print(f"{where}: error: {problem}", file=sys.stderr)
            sys.exit(2)
        rest = rest + _per_rank_overrides(rank)
    elif problem := _existing_run_problem(command, rest):
        print(f"{where}: error: {problem}", file=sys.stderr)
        sys.exit(1)
    scratch = None
    if command == "plan":  # writes nothing: no run directory, `--json` for scripts
        rest = ["plan.json=true" if arg == "--json" else arg for arg in rest]
        if not any(arg.startswith("hydra.run.dir=") for arg in rest):
            scratch = tempfile.mkdtemp(prefix="nvila-ft-plan-")
            rest = rest + [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]
        # the plan (table or JSON) is the only thing on stdout; notices and warnings go to stderr
        rest = rest + ["hydra.job_logging.handlers.console.stream=ext://sys.stderr"]
    if any(arg.startswith("run=") for arg in rest) and not any(arg.startswith("hydra.output_subdir") for arg in rest):
        rest = rest + ["hydra.output_subdir=null"]  # a command on an existing run never rewrites its .hydra/
    return rest, scratch


def _run(app: Any, command: str, rest: list[str], where: str, failures: list) -> None:
    """Runs the app on `rest`; an error that is the user's to fix ends the process with one line (all of it, with
    its traceback, when the user set HYDRA_FULL_ERROR=1)."""
    # Hydra prints its own errors over several lines (with a partial traceback for ours); it hands them to us
    # instead when HYDRA_FULL_ERROR is set.
    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [f"nvila-ft-{command}", *rest]
    try:
        app()
        if failures:
            raise failures[0]
    except Exception as error:  # noqa: BLE001 - user errors are one line; anything else keeps its traceback
        if user_setting == "1" or not _is_user_error(error):
            raise
        print(f"{where}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting


if __name__ == "__main__":
    main()
