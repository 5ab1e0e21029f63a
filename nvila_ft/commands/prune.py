"""`nvila-ft prune`: DeltaLoss pruning of a task's training data (NVILA; nvila_ft.training.pruning) with two models,
written in the input's own layout (nvila_ft.data.subset), plus a report in the run directory.

    nvila-ft prune task=vqa task.train.path=data.json prune.strong=outputs/<run> prune.weak=base prune.keep_fraction=0.5

strong / weak: `base` (this command's `model` option: a preset, or model.path=<checkpoint>), a checkpoint directory
(config.json), or a run directory of `nvila-ft finetune` (its base + its trained adapters, as `evaluate run=<dir>`
loads it). Every record of the task's training source is scored (records a task holds out with val_fraction
included: give a validation file, task.validation=<path>, to keep one held-out set across runs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nvila_ft.atomic import atomic_write_bytes, atomic_write_json
from nvila_ft.commands.common import build, log
from nvila_ft.data.subset import WrittenSubset, check_subset_source, write_subset
from nvila_ft.model.source import ModelSource
from nvila_ft.recipes.loading import load_model
from nvila_ft.recipes.runs import seed_everything, trained_adapters
from nvila_ft.training.config import ConfigError
from nvila_ft.training.cpu_threads import set_cpu_threads
from nvila_ft.training.evaluation import write_jsonl
from nvila_ft.training.pruning import PruneRule, RecordScore, answer_losses, scores_for

PRUNED_DIR = "pruned"


@dataclass
class PruneOptions:
    """The `prune:` section. strong / weak: the two models (see the module docstring); keep_fraction, trivial_loss,
    harmful_margin, by: the selection rule (nvila_ft.training.pruning.PruneRule); batch_size: records scored per
    forward; output: folder of the pruned data (default <run_dir>/pruned); examples: records shown per decision in
    the report."""

    strong: str | None = None
    weak: str | None = None
    keep_fraction: float = 0.5
    trivial_loss: float = 0.05
    harmful_margin: float = 0.2
    by: str = "auto"
    batch_size: int = 8
    output: str | None = None
    examples: int = 3

    def __post_init__(self) -> None:
        for name in ("strong", "weak"):
            value = getattr(self, name)
            if value is None or not str(value).strip():
                raise ConfigError(f"prune.{name} is not set: give `base` (the model option), a checkpoint directory or "
                                  f"a run directory of nvila-ft finetune, e.g. prune.{name}={'outputs/<run>' if name == 'strong' else 'base'}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"prune.batch_size = {self.batch_size!r}: must be an integer >= 1")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            raise ConfigError(f"prune.examples = {self.examples!r}: must be an integer >= 0")
        self.rule  # noqa: B018 - checks the rule's settings now

    @property
    def rule(self) -> PruneRule:
        return PruneRule(self.keep_fraction, self.trivial_loss, self.harmful_margin, self.by)


@dataclass
class ModelChoice:
    """Where one of the two models comes from: a base checkpoint (and its build folder) plus adapters or none."""

    name: str
    source: ModelSource
    build_dir: Path
    adapters: Path | None

    def describe(self) -> str:
        base = self.source.path or f"preset {self.source.preset}"
        return f"{base}" + (f" + adapters {self.adapters}" if self.adapters else "")


def choose_model(name: str, spec: str, cfg: DictConfig, out_dir: Path) -> ModelChoice:
    """`base`, a checkpoint directory or a run directory (ConfigError naming prune.<name> otherwise)."""
    if spec == "base":
        source = build(cfg, "model")
        source.check()
        return ModelChoice(name, source, out_dir, None)
    path = Path(spec).expanduser().absolute()
    if (path / ".hydra" / "config.yaml").is_file():
        saved = OmegaConf.load(path / ".hydra" / "config.yaml")
        source = build(saved, "model")
        try:
            adapters = trained_adapters(path)
        except ConfigError as err:
            raise ConfigError(f"prune.{name}: {err}") from None
        return ModelChoice(name, source, path, adapters)
    if (path / "config.json").is_file():
        return ModelChoice(name, ModelSource(path=str(path)), out_dir, None)
    what = "does not exist" if not path.exists() else "is neither a run directory (.hydra/config.yaml) nor a checkpoint (config.json)"
    raise ConfigError(f"prune.{name} = {spec}: {what}; give `base`, a checkpoint directory or a run directory")


def prune(cfg: DictConfig) -> None:
    out_dir = Path(cfg.run_dir).absolute()
    options, precision, task, data_options = build(cfg, "prune"), build(cfg, "precision"), build(cfg, "task"), build(cfg, "data")
    if options is None:
        raise ConfigError("the prune: section is missing from the configuration")
    precision.check(training=False)
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)
    rule = options.rule
    check_subset_source(task.train)  # before the two models score everything
    choices = [choose_model(name, getattr(options, name), cfg, out_dir) for name in ("strong", "weak")]

    records = [task.format(r) for r in task.train.records()]
    malformed = list(getattr(task.train, "errors", []))
    if not records:
        raise ConfigError(f"task {task.name}: no training record to prune" + (f" ({len(malformed)} malformed)" if malformed else ""))
    if task.validation is None and task.val_fraction > 0:
        log.warning("task %s holds out val_fraction=%s of the training data; the pruned file is all of it pruned, so a "
                    "run on it holds out other records: give task.validation=<file> for one held-out set", task.name, task.val_fraction)

    losses = {}
    for choice in choices:
        log.info("scoring %d records with the %s model: %s", len(records), choice.name, choice.describe())
        loaded = load_model(choice.source, choice.build_dir, precision, adapters=choice.adapters,
                            processor_options=data_options.processor_options())
        losses[choice.name] = answer_losses(loaded.model, loaded.processor, records, options.batch_size, progress=True)
        del loaded
    scores = rule.select(scores_for(records, losses["strong"], losses["weak"], rule.by))

    output = Path(options.output).expanduser().absolute() if options.output else out_dir / PRUNED_DIR
    written = write_subset(task.train, [s.origin for s in scores if s.kept], output)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "scores.jsonl", [s.row() for s in scores])
    plot_scores(scores, rule, out_dir / "scores.png")
    summary = report(scores, rule, choices, written, malformed, records, options.examples)
    atomic_write_json(out_dir / "prune_report.json", summary)
    atomic_write_bytes(out_dir / "prune_report.md", markdown(summary).encode())
    kept = sum(s.kept for s in scores)
    log.info("kept %d of %d records (%s); pruned data: %s", kept, len(scores),
             ", ".join(f"{k} {v}" for k, v in summary["by_reason"].items()), output)
    for item in written:
        log.info("  %s -> %s (%d records; media_root %s)", item.source, item.path, item.records, item.media_root)
    log.info("report: %s", out_dir / "prune_report.md")


def report(scores: list[RecordScore], rule: PruneRule, choices: list[ModelChoice], written: list[WrittenSubset],
           malformed: list[Any], records: list[Any], examples: int) -> dict[str, Any]:
    by_source: dict[str, Counter] = {}
    for s in scores:
        by_source.setdefault(s.source, Counter())["kept" if s.kept else "dropped"] += 1
        by_source[s.source][s.reason] += 1
    questions = {r.origin: (r.question, r.answer) for r in records}
    shown: dict[str, list[dict[str, Any]]] = {}
    for s in scores:
        if len(shown.setdefault(s.reason, [])) < examples:
            question, answer = questions[s.origin]
            shown[s.reason].append(s.row() | {"question": question, "answer": answer})
    return {
        "rule": {"keep_fraction": rule.keep_fraction, "trivial_loss": rule.trivial_loss,
                 "harmful_margin": rule.harmful_margin, "by": rule.by},
        "models": {c.name: c.describe() for c in choices},
        "records": len(scores), "kept": sum(s.kept for s in scores),
        "by_reason": dict(Counter(s.reason for s in scores).most_common()),
        "by_source": {k: dict(v) for k, v in by_source.items()},
        "malformed": [{"origin": b.origin, "reason": b.reason} for b in malformed],
        "written": [{"source": w.source, "path": str(w.path), "records": w.records, "media_root": w.media_root,
                     "layout": w.layout} for w in written],
        "examples": shown,
    }


def markdown(summary: dict[str, Any]) -> str:
    rule = summary["rule"]
    lines = [
        "# DeltaLoss pruning report", "",
        f"strong: {summary['models']['strong']}  ", f"weak: {summary['models']['weak']}  ",
        f"rule: keep_fraction {rule['keep_fraction']} per {rule['by']}, trivial when both losses < {rule['trivial_loss']}, "
        f"harmful when delta < -{rule['harmful_margin']}  ",
        f"kept {summary['kept']} of {summary['records']} records; score: delta = loss_weak - loss_strong "
        "(mean over answer tokens of log p_strong - log p_weak); histogram: scores.png", "",
        "| reason | records |", "|---|---|", *[f"| {k} | {v} |" for k, v in summary["by_reason"].items()], "",
        "| source | kept | dropped | by reason |", "|---|---|---|---|",
        *[f"| {k} | {v.get('kept', 0)} | {v.get('dropped', 0)} | "
          + ", ".join(f"{r} {n}" for r, n in v.items() if r not in ("kept", "dropped")) + " |"
          for k, v in summary["by_source"].items()],
        "", "## Written", "",
        *[f"- {w['path']} ({w['layout']}, {w['records']} records) from {w['source']}; media_root {w['media_root']}"
          for w in summary["written"]],
    ]
    if summary["malformed"]:
        lines += ["", f"## Malformed records ({len(summary['malformed'])}, not written)", "",
                  *[f"- {b['origin']}: {b['reason']}" for b in summary["malformed"][:20]]]
    lines += ["", "## Examples", ""]
    for reason, rows in summary["examples"].items():
        lines += [f"### {reason}", ""]
        for row in rows:
            delta = "n/a" if row["delta"] is None else f"{row['delta']:+.3f}"
            losses = "" if row["delta"] is None else f" (strong {row['strong_loss']:.3f}, weak {row['weak_loss']:.3f})"
            lines.append(f"- {row['origin']}: delta {delta}{losses}: {row['question']!r} -> {row['answer']!r}"
                         + (f"; {row['problem']}" if row.get("problem") else ""))
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_scores(scores: list[RecordScore], rule: PruneRule, path: Path) -> Path | None:
    """Histogram of delta, stacked by decision, with the harmful margin marked (PNG, written atomically)."""
    deltas = [s for s in scores if s.delta is not None]
    if not deltas:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"kept": [s.delta for s in deltas if s.kept]}
    for reason in ("below_cut", "trivial", "harmful"):
        groups[f"dropped: {reason}"] = [s.delta for s in deltas if s.reason == reason]
    groups = {k: v for k, v in groups.items() if v}
    colors = {"kept": "tab:green", "dropped: below_cut": "tab:gray", "dropped: trivial": "tab:blue", "dropped: harmful": "tab:red"}
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    axis.hist(list(groups.values()), bins=40, stacked=True, label=list(groups), color=[colors[k] for k in groups])
    axis.axvline(-rule.harmful_margin, color="tab:red", linestyle="--", linewidth=1, label=f"-harmful_margin ({-rule.harmful_margin:g})")
    axis.set_xlabel("delta = loss_weak - loss_strong (nats per answer token)")
    axis.set_ylabel("records")
    axis.set_title(f"DeltaLoss: kept {sum(s.kept for s in scores)} of {len(scores)}")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path

