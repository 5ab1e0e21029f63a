"""Preference tuning of NVILA with TRL's `DPOTrainer`: TRL computes the loss (DPO, IPO, hinge, ...), the reward
metrics and runs the loop; nvila-ft supplies what TRL cannot build for a custom multimodal model.

- `PreferenceCollator`: each pair through `NVILAProcessor` (media tiled, placeholders expanded) as two samples,
  batched `[chosen..., rejected...]` with `completion_mask` on the final reply's tokens: TRL's batch layout.
- `PreferenceModel`: NVILA as the causal LM TRL drives. TRL's fused LM head calls `base_model(**inputs)` for
  the last hidden states (media spliced into Qwen2's input, decoder run) and projects the reply positions
  through `get_output_embeddings()`; every other attribute is the NVILA model's, so nvila-ft's trainer finds its
  components as in finetune, and transformers' Trainer its quantization and placement.
- `ReferenceModel`: the reference policy without a second copy of the weights: the same model with every PEFT
  adapter disabled and the few other trained tensors (LayerNorms, a fully trained projector) replaced by copies
  of their values before training. Fully trained vision towers or LLMs would need a copy of that component;
  `check_reference_policy` refuses them.
- `NVILADPOTrainer`: nvila-ft's trainer (per-component optimizer groups, adapter checkpoints with a COMPLETE
  marker, resume) on top of `trl.DPOTrainer`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import torch
from torch import nn
from trl import DPOTrainer

from nvila_ft.adapters.apply import base_module, get_component
from nvila_ft.adapters.methods import method_of
from nvila_ft.adapters.policy import AdapterPolicy
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.records import Record
from nvila_ft.data.validation import BadRecord, TaskDataCheck, classify, failure_reason
from nvila_ft.domains.preference.sources import REJECTED, rejected_messages
from nvila_ft.model.tokenizer import IGNORE_INDEX
from nvila_ft.training.config import ConfigError, DataOptions, Precision
from nvila_ft.training.trainer import NaNGuard, NVILATrainer, ProgressWithThroughput

# the reward metrics TRL logs, reported at the start and the end of training
REWARD_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


# ------------------------------------------------------------------ data
def preference_dataset(records: list[Record]) -> Any:
    """A `datasets.Dataset` of the pairs in TRL's preference columns (`prompt` as JSON chat messages, `chosen`,
    `rejected`) plus where each came from and where its media live; media are loaded by the collator."""
    from datasets import Dataset

    rows = {"prompt": [], "chosen": [], "rejected": [], "media_root": [], "name": []}
    for record in records:
        rows["prompt"].append(json.dumps(record.prompt()))
        rows["chosen"].append(record.answer)
        rows["rejected"].append(record.meta[REJECTED])
        rows["media_root"].append(record.media_root)
        rows["name"].append(record.name)
    return Dataset.from_dict(rows)


def reply_mask(labels: torch.Tensor) -> torch.Tensor:
    """1 on the last run of supervised positions of each row (the final reply and its closing token), else 0:
    earlier assistant turns of a multi-turn prompt are context, not the compared reply."""
    supervised = labels != IGNORE_INDEX
    mask = torch.zeros_like(labels)
    for row, flags in enumerate(supervised.tolist()):
        end = max((i for i, f in enumerate(flags) if f), default=-1)
        start = end
        while start > 0 and flags[start - 1]:
            start -= 1
        if end >= 0:
            mask[row, start : end + 1] = 1
    return mask


class PreferenceCollator:
    """Rows of `preference_dataset` -> TRL's preference batch: the chosen conversations, then the rejected ones,
    right-padded, with their media in reading order and `completion_mask` marking each final reply."""

    def __init__(self, processor: NVILAProcessor) -> None:
        self.processor = processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        samples = []
        for side in ("chosen", "rejected"):
            for row in rows:
                messages = json.loads(row["prompt"]) + [{"role": "assistant", "content": [{"type": "text", "text": row[side]}]}]
                samples.append(self.processor.process(
                    messages, with_labels=True, sample_id=f"{row['name']} ({side})", media_root=row["media_root"]))
        batch = dict(self.processor.collate(samples, padding_side="right"))
        batch["completion_mask"] = reply_mask(batch.pop("labels"))
        batch["num_positions"] = torch.tensor(sum(s.length for s in samples))
        return batch


def check_rejected(records: list[Record], processor: NVILAProcessor) -> tuple[list[Record], list[Any]]:
    """Records whose rejected conversation also goes through the processor (the chosen one is checked with the
    task's data); the others as BadRecords naming the field."""
    good, bad = [], []
    for record in records:
        try:
            processor.process(rejected_messages(record), with_labels=True, truncate=False,
                              sample_id=record.name, media_root=record.media_root)
        except Exception as err:  # noqa: BLE001 - reported against the record, as data validation does
            bad.append(BadRecord(record.origin, f"field 'rejected': {failure_reason(err, record)}", classify(err)))
            continue
        good.append(record)
    return good, bad


def require_pairs(records: list[Record]) -> None:
    """Every record is a preference pair (it has a rejected reply)."""
    not_pairs = [r.origin for r in records if REJECTED not in r.meta]
    if not_pairs:
        raise ConfigError(f"dpo needs preference records (chosen and rejected replies); {not_pairs[0]} has no rejected "
                          "reply. Use a preference task: task=preference task.train.path=<file>, or task=demo_preference")


def check_rejected_replies(check: TaskDataCheck, processor: NVILAProcessor) -> tuple[list[Record], list[Record]]:
    """The training and validation records that passed `check` (their chosen conversation) whose rejected
    conversation also goes through the processor; the others are added to `check` as bad records."""
    train, bad_train = check_rejected(check.train.good, processor)
    validation, bad_validation = check_rejected(check.validation.good, processor)
    check.bad += bad_train + bad_validation
    check.train.bad += bad_train
    check.validation.bad += bad_validation
    return train, validation


# ------------------------------------------------------------------ the models TRL sees
class NVILABackbone(nn.Module):
    """NVILA up to the LLM's last hidden states: media features spliced into the token embeddings, then Qwen2's
    decoder (LoRA layers active unless disabled), no LM head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        **kwargs: Any,
    ) -> Any:
        embeds = self.model.embed(input_ids, pixel_values, image_grids, video_pixel_values, video_frame_counts)
        return self.model.decode(embeds, attention_mask, position_ids, **kwargs)


class PreferenceModel(nn.Module):
    """The policy as TRL's DPOTrainer sees it (see the module docstring). `config` is a copy of the LLM's config
    (TRL reads the text model's settings and writes the pad token into it); the NVILA model keeps its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = NVILABackbone(model)
        self.config = copy.deepcopy(base_module(model.llm).config)
        self.generation_config = model.default_generation_config()
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # as transformers' Trainer would align them
            value = getattr(model.tokenizer, name, None)
            setattr(self.config, name, value)
            setattr(self.generation_config, name, value)
        self.model_tags: list[str] = []
        self._checkpointed: tuple[str, ...] = ()

    @property
    def nvila(self) -> nn.Module:
        return self.backbone.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("backbone", "_modules", "_parameters", "_buffers"):
                raise
            # llm, vision_tower, mm_projector, name_or_path (optimizer groups, adapter checkpoints); hf_quantizer,
            # is_quantized, hf_device_map, main_input_name, accepts_loss_kwargs, ... (transformers' Trainer)
            return getattr(self.backbone.model, name)

    def forward(self, **inputs: Any) -> Any:
        return self.nvila(**inputs)

    def base_model(self, **inputs: Any) -> Any:
        """The last hidden states TRL's fused LM head projects (TRL calls `model.base_model(**inputs)`)."""
        return self.backbone(**inputs)

    def get_output_embeddings(self) -> nn.Module:
        return self.nvila.get_output_embeddings()

    def add_model_tags(self, tags: list[str]) -> None:
        self.model_tags = sorted(set(self.model_tags) | set(tags))

    # TRL switches checkpointing off around the reference pass: back on for the same components afterwards
    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.nvila.is_gradient_checkpointing

    def gradient_checkpointing_disable(self) -> None:
        self._checkpointed = self.nvila.checkpointed_components()
        self.nvila.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.nvila.activation_checkpointing_enable(gradient_checkpointing_kwargs, components=self._checkpointed or ("vision_tower", "llm"))


def check_reference_policy(policy: AdapterPolicy) -> None:
    """The reference is the policy's own weights with adapters off and a copy of the small trained tensors; a
    method for which that is not the reference says why (a fully trained vision tower or LLM would need a second
    copy of that component)."""
    for name, component in policy.items():
        problem = method_of(component).reference_problem(name)
        if problem is not None:
            raise ConfigError(problem)


def check_preference_run(policy: AdapterPolicy, precision: Precision, deepspeed: Any, data: DataOptions) -> None:
    """What preference tuning accepts beyond every run's checks: a reference without a second copy of a component
    (`check_reference_policy`), one process without DeepSpeed, no FP8 compute, each pair's two replies batched
    together."""
    check_reference_policy(policy)
    if deepspeed.enabled:
        raise ConfigError("dpo runs in one process without DeepSpeed; use deepspeed=none (and a quantized base, "
                          "adapters=ln_vit_qlora_llm, for less memory)")
    if precision.fp8:
        raise ConfigError("dpo: precision.fp8 is for finetune; use precision=bf16")
    if data.packing or data.group_by_length:
        raise ConfigError("dpo batches each pair's two replies together; set data.packing=false and data.group_by_length=false")


def initial_tensors(model: nn.Module, adapters: AdapterPolicy) -> dict[str, torch.Tensor]:
    """Copies of an NVILA model's trainable tensors outside PEFT adapters (LayerNorm weights, a fully trained
    projector), by parameter name: the reference's values of what training changes outside the adapters."""
    check_reference_policy(adapters)
    ids = {
        id(p)
        for name, component in adapters.items() if component.trains and not method_of(component).trains_lora
        for p in get_component(model, name).parameters() if p.requires_grad
    }
    return {name: p.detach().clone() for name, p in model.named_parameters() if id(p) in ids}


class ReferenceModel(nn.Module):
    """The reference policy: `policy` with the PEFT adapters of its adapter policy (`adapters`) disabled and
    `initial` values (by the NVILA model's parameter names) in place of its other trained tensors; no second copy
    of any weight. It holds no parameter of its own and the policy is not a submodule, so neither the optimizer nor
    accelerate sees a weight twice."""

    def __init__(self, policy: PreferenceModel, initial: dict[str, torch.Tensor], adapters: AdapterPolicy) -> None:
        super().__init__()
        object.__setattr__(self, "_policy", policy)
        self.config = policy.config
        self.initial = initial
        self.adapters = adapters

    def forward(self, **inputs: Any) -> Any:
        with self.adapters_disabled():
            return torch.func.functional_call(self._policy.nvila, self.initial, kwargs=inputs)

    def base_model(self, **inputs: Any) -> Any:
        """The reference's last hidden states (TRL's fused LM head calls `ref_model.base_model(**inputs)`). The
        initial tensors stand in as other tensor objects, so no autocast cache of the trained values is reused."""
        initial = {f"model.{name}": value for name, value in self.initial.items()}
        with self.adapters_disabled():
            return torch.func.functional_call(self._policy.backbone, initial, kwargs=inputs)

    def get_output_embeddings(self) -> nn.Module:
        return self._policy.get_output_embeddings()  # never trained: no adapter on lm_head, no full LLM

    @contextlib.contextmanager
    def adapters_disabled(self):
        policy = self._policy
        with contextlib.ExitStack() as stack:
            for name, component in self.adapters.items():
                if method_of(component).trains_lora:
                    stack.enter_context(get_component(policy.nvila, name).disable_adapter())
            yield


# ------------------------------------------------------------------ trainer
class NVILADPOTrainer(NVILATrainer, DPOTrainer):
    """nvila-ft's trainer on TRL's DPOTrainer: TRL's loss, metrics and loop; nvila-ft's optimizer groups and
    adapter checkpoints. The data are prepared on the fly by `PreferenceCollator`, as TRL does for vision data."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset  # the collator processes each pair (media, chat template, labels) when it is batched

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        pass  # a run directory describes itself (.hydra/, adapter_policy.json, metrics.json)


def build_dpo_trainer(
    model: nn.Module, adapters: AdapterPolicy, args: Any, train_records: list[Record], eval_records: list[Record],
    processor: NVILAProcessor, offload_activations: bool = False,
) -> NVILADPOTrainer:
    """The DPO trainer of an NVILA model that went through `apply_policy` with `adapters` (reference: those
    adapters disabled)."""
    from transformers.trainer_callback import ProgressCallback

    policy_model = PreferenceModel(model)
    head = policy_model.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()) or hasattr(head, "base_layer"):
        raise ConfigError("dpo: lm_head is trained by the policy; TRL's log-probabilities use its base weight, leave it out of adapters.llm.target_modules")
    reference = ReferenceModel(policy_model, initial_tensors(model, adapters), adapters)
    reference_list: list[NVILADPOTrainer] = []
    trainer = NVILADPOTrainer(
        model=policy_model,
        policy=adapters,
        ref_model=reference,
        args=args,
        data_collator=PreferenceCollator(processor),
        train_dataset=preference_dataset(train_records),
        eval_dataset=preference_dataset(eval_records) if eval_records else None,
        processing_class=processor.tokenizer,
        callbacks=[NaNGuard()],
        offload_activations=offload_activations,
    )
    reference_list.append(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressWithThroughput(reference_list))
    return trainer


def reward_trend(history: list[dict]) -> dict[str, dict[str, float]]:
    """The TRL reward metrics of the first and the last training log ({"first": {...}, "last": {...}, "steps"})."""
    logs = [entry for entry in history if "rewards/margins" in entry]
    if not logs:
        return {}
    pick = lambda entry: {k: float(entry[k]) for k in REWARD_METRICS if k in entry}  # noqa: E731
    return {"first": pick(logs[0]), "last": pick(logs[-1]),
            "steps": {"first": int(logs[0].get("step", 0) or 0), "last": int(logs[-1].get("step", 0) or 0)}}
