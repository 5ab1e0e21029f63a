"""`nvila-ft <command> [hydra overrides]`: the only module (with nvila_ft.commands) that knows about Hydra."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from importlib.resources import files
from pathlib import Path

COMMANDS = {
    "finetune": ("nvila_ft.commands.finetune", "finetune", "fine-tune a model on a task with an adapter policy"),
    "evaluate": ("nvila_ft.commands.evaluate", "evaluate", "generation metrics of a run or a checkpoint on a task"),
    "predict": ("nvila_ft.commands.predict", "predict", "answer a prompt or a file of prompts"),
    "export": ("nvila_ft.commands.export", "export", "write a run's merged model (official layout) or its adapters"),
    "validate-data": ("nvila_ft.commands.validate_data", "validate_data", "check a task's data without a GPU"),
}
USAGE = """usage: nvila-ft <command> [key=value ...] [-m] [--cfg job] [--help]

commands:
{commands}

Configuration is Hydra's: groups model, task, adapters, trainer, precision, deepspeed, logger
(e.g. `nvila-ft finetune task=vqa task.train.path=data.json adapters=ln_vit_qlora_llm model=nvila_lite_2b
model.path=/ckpt/NVILA-Lite-2B precision=bf16`); `-m` sweeps comma-separated values; `--cfg job` prints
the composed config; `nvila-ft <command> --help` lists every option.
"""
# Typed errors of nvila-ft that are the user's to fix: shown as one clear line, without a traceback.
USER_ERRORS = (
    "nvila_ft.training.config.ConfigError",
    "nvila_ft.adapters.policy.PolicyError",
    "nvila_ft.model.config.CheckpointError",
    "nvila_ft.data.processor.SampleError",
    "nvila_ft.data.sources.DataError",
    "nvila_ft.adapters.merge.ExportError",
)


# Import-time warnings about optional CUDA kernels (torchao, bitsandbytes) that say nothing about the run.
NOISY_LOGGERS = ("torchao", "bitsandbytes", "bitsandbytes.cextension", "torch.utils._pytree")


def config_dir() -> Path:
    return Path(str(files("nvila_ft.hydra_conf")))


def register_config_groups() -> None:
    """tasks/ and adapters/ become the Hydra groups `task` and `adapters` (their folder names differ)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from nvila_ft.adapters.policy import AdapterPolicy

    # every policy field is present (with its default), so `adapters.llm.target_modules=[...]` needs no `+`
    # and a misspelt key is still Hydra's "not in struct" error
    policy_defaults = OmegaConf.to_container(OmegaConf.structured(AdapterPolicy))
    store = ConfigStore.instance()
    for package, group in (("nvila_ft.hydra_conf.tasks", "task"), ("nvila_ft.hydra_conf.adapters", "adapters")):
        for file in sorted(files(package).iterdir(), key=lambda f: f.name):
            if file.name.endswith(".yaml"):
                node = OmegaConf.create(file.read_text())
                if group == "adapters" and len(node):
                    node = OmegaConf.merge({"_target_": node.get("_target_"), **policy_defaults}, node)
                store.store(group=group, name=file.name[: -len(".yaml")], node=node)


def _is_user_error(error: BaseException) -> bool:
    names = {f"{type(e).__module__}.{type(e).__qualname__}" for e in (error, error.__cause__) if e is not None}
    return bool(names & set(USER_ERRORS)) or isinstance(error, FileExistsError)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        listing = "\n".join(f"  {name:<14} {doc}" for name, (_, _, doc) in COMMANDS.items())
        print(USAGE.format(commands=listing))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"nvila-ft: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar per component
    import hydra

    register_config_groups()
    module_name, function_name, _ = COMMANDS[command]
    results = []

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def app(cfg):
        function = getattr(importlib.import_module(module_name), function_name)
        try:
            results.append(function(cfg))
            return results[-1]  # the objective a sweeper (e.g. Optuna) optimises
        except Exception as error:  # noqa: BLE001 - typed user errors are reported without a traceback
            if _is_user_error(error) and not os.environ.get("NVILA_FT_DEBUG"):
                logging.getLogger("nvila_ft").debug("error", exc_info=True)
                print(f"nvila-ft {command}: error: {error}", file=sys.stderr)
                sys.exit(1)
            raise

    sys.argv = [f"nvila-ft-{command}", *rest]
    app()
    if command == "validate-data" and any(results):
        sys.exit(1)  # bad records were found


if __name__ == "__main__":
    main()
