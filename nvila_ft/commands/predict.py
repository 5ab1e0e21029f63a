"""`nvila-ft predict`: answer one prompt (predict.prompt + predict.image/video) or a JSONL file of prompts, with a
fine-tuned run (run=<dir>) or any checkpoint (model.path=<dir>, e.g. an exported merged model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from nvila_ft.commands.common import build, log, run_config
from nvila_ft.recipes.loading import load_model
from nvila_ft.recipes.runs import seed_everything, trained_adapters
from nvila_ft.training.config import ConfigError
from nvila_ft.training.cpu_threads import set_cpu_threads
from nvila_ft.training.evaluation import write_jsonl


def prompt_messages(item: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A prompt line -> chat messages: {"messages": [...]} as is, or {"prompt", "image"?, "video"?}."""
    if "messages" in item:
        return item["messages"]
    if not isinstance(item.get("prompt"), str):
        raise ConfigError(f"{where}: needs a 'prompt' string or 'messages'")
    content: list[dict[str, Any]] = []
    for kind in ("image", "video"):
        values = item.get(kind)
        for value in values if isinstance(values, list) else ([values] if values else []):
            content.append({"type": kind, kind: value})
    return [{"role": "user", "content": content + [{"type": "text", "text": item["prompt"]}]}]


def read_prompts(cfg: DictConfig) -> list[tuple[str, list[dict[str, Any]]]]:
    options = cfg.predict
    if options.prompts:
        path = Path(options.prompts)
        if not path.is_file():
            raise ConfigError(f"predict.prompts = {path}: no such file")
        items = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                where = f"{path}:{number}"
                try:
                    items.append((where, prompt_messages(json.loads(line), where)))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where}: not JSON ({err})") from err
        return items
    if options.prompt:
        item = {"prompt": options.prompt, "image": options.image, "video": options.video}
        return [("prompt", prompt_messages(item, "predict.prompt"))]
    raise ConfigError("give predict.prompt=... (with predict.image / predict.video) or predict.prompts=<file.jsonl>")


def predict(cfg: DictConfig) -> None:
    out_dir = Path(cfg.run_dir).absolute()
    adapters, base_dir = None, out_dir
    prompts = read_prompts(cfg)
    options = cfg.predict
    if cfg.run:
        run = Path(cfg.run).absolute()
        cfg = run_config(run, cfg)
        adapters, base_dir = trained_adapters(run), run
    precision, source = build(cfg, "precision"), build(cfg, "model")
    precision.check(training=False)  # fp8 compute is for training; runs are evaluated in precision.weights
    source.check()
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)
    loaded = load_model(source, base_dir, precision, adapters=adapters, processor_options=build(cfg, "data").processor_options())
    model, processor = loaded.model, loaded.processor
    rows = []
    for where, messages in prompts:
        batch = processor(messages, add_generation_prompt=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=options.max_new_tokens,
                do_sample=options.do_sample,
                temperature=options.temperature if options.do_sample else None,
            )
        answer = processor.batch_decode(output)[0]
        log.info("%s: %s", where, answer)
        rows.append({"source": where, "answer": answer})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", rows)
