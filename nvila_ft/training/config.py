"""Training settings as plain dataclasses (Hydra builds them from `conf/trainer/` and `conf/precision/`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvila_ft.data.media_base import MediaOptions
from nvila_ft.errors import UserError

FP8_RECIPES = ("tensorwise", "rowwise")  # torchao Float8LinearRecipeName values nvila-ft offers


class ConfigError(UserError, ValueError):
    """A run configuration that cannot work; raised before anything heavy is loaded."""


@dataclass
class Precision:
    """weights: dtype the base model is loaded in; autocast: "bf16" | "fp16" | None (mixed precision).

    trainable_float32 keeps trainable tensors (LoRA, norms, fully trained weights) in float32 when the weights
    are 16-bit, so the optimizer updates full-precision values.
    lm_head_bits / vision_tower_bits: 16, or 8 to store a frozen lm_head / a frozen or LayerNorm-tuned vision
    tower's linears as int8 rows with one scale per row (`nvila_ft.adapters.frozen_storage`); exports keep the
    checkpoint's own 16-bit weights.
    fp8: "tensorwise" | "rowwise" | None: the LLM's linear layers multiply in float8 (torchao `Float8Linear`, one
    scale per tensor or per row; see `nvila_ft.training.fp8`); weights stay in `weights`. Needs an sm_89+ GPU;
    on a machine without CUDA, finetune refuses it unless fp8_on_cpu: then the same numerics run on the CPU (for
    tests, slower than bf16).
    """

    weights: str = "float32"
    autocast: str | None = None
    trainable_float32: bool = True
    lm_head_bits: int = 16
    vision_tower_bits: int = 16
    fp8: str | None = None
    fp8_on_cpu: bool = False

    @property
    def dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.weights, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"precision.weights = {self.weights!r} is not a torch dtype")
        return dtype

    def check(self, training: bool = True) -> None:
        """training=False: a command that only runs a trained model (evaluate, predict), which multiplies in
        `weights`, never in fp8. What an adapter policy cannot do with these settings its methods check
        (`AdapterPolicy.check(precision=...)`)."""
        self.dtype  # noqa: B018 - validates the name
        if self.autocast not in (None, "bf16", "fp16"):
            raise ConfigError(f"precision.autocast = {self.autocast!r}; use bf16, fp16 or null")
        if torch.cuda.is_available():
            if (self.autocast == "bf16" or self.weights == "bfloat16") and not torch.cuda.is_bf16_supported():
                raise ConfigError("this GPU has no bfloat16 support; use precision=fp16 or precision=fp32")
        elif self.autocast == "fp16":
            raise ConfigError("fp16 mixed precision needs a CUDA GPU; on CPU use precision=bf16 or precision=fp32")
        if self.fp8 is not None and training:
            self.check_fp8()

    def check_device(self) -> None:
        """What only the machine that trains can say (finetune; `plan` plans for a GPU from any machine)."""
        if self.fp8 is not None and not torch.cuda.is_available() and not self.fp8_on_cpu:
            raise ConfigError(
                "precision.fp8 multiplies in float8 on an FP8 GPU (compute capability 8.9+) and no CUDA GPU is visible: "
                "use precision=bf16 on this machine, or precision.fp8_on_cpu=true to run the float8 numerics on the CPU "
                "(for tests; slower than bf16)"
            )

    def check_fp8(self) -> None:
        """FP8 compute: a known recipe, 16-bit-or-wider weights, an sm_89+ GPU (or none: CPU)."""
        import importlib.util

        if self.fp8 not in FP8_RECIPES:
            raise ConfigError(f"precision.fp8 = {self.fp8!r}; use {', '.join(FP8_RECIPES)} or null")
        if self.weights == "float16" or self.autocast == "fp16":
            raise ConfigError("precision.fp8 scales from bfloat16 or float32 tensors, not float16; use precision=fp8 (bf16 weights and autocast)")
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("precision.fp8 runs torchao's float8 training: pip install torchao")
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                raise ConfigError(
                    f"precision.fp8 needs FP8 tensor cores (compute capability 8.9+: L4, L40, H100, H200); "
                    f"{torch.cuda.get_device_name()} is sm_{major}{minor}: use precision=bf16, or an sm_89+ GPU"
                )


@dataclass
class DataOptions:
    """How a run treats its data (the `data:` section).

    on_bad_record: "skip" (drop, list in data_report.txt) or "stop" (refuse to train); validate: check every
    record before training. How media are read (`nvila_ft.data.media_base.MediaOptions`): intensity_window:
    [low, high] stored values of >8-bit grey images mapped to 0..255 (None: each image's own range); dicom_window:
    how DICOM and NIfTI grey values are displayed: a preset (lung, bone, brain, mediastinum, soft_tissue, abdomen,
    liver), [centre, width], "full" (the shown frames' range) or None (the file's own window, else its full range);
    image_frame: the frame a multi-frame DICOM, a DICOM series or a NIfTI volume gives where an image is expected
    ("middle", a frame number, or "refuse"); volume_axis: the NIfTI slices shown (axial, coronal, sagittal);
    volume_slices: [first, last] NIfTI slices frames are taken from (None: all). packing: train on rows of several
    samples up to `max_tokens` positions (`trainer.per_device_train_batch_size` rows per micro-batch; attention
    stays within each sample); group_by_length: without packing, batches of one modality and similar length.
    """

    on_bad_record: str = "skip"
    validate: bool = True
    intensity_window: list[float] | None = None
    dicom_window: Any = None  # str | [centre, width] | None
    image_frame: Any = "middle"  # "middle" | "refuse" | int
    volume_axis: str = "axial"
    volume_slices: list[int] | None = None
    packing: bool = False
    max_tokens: int = 4096
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.on_bad_record not in ("skip", "stop"):
            raise ConfigError(f"data.on_bad_record = {self.on_bad_record!r}; use skip or stop")
        if self.max_tokens < 1:
            raise ConfigError(f"data.max_tokens = {self.max_tokens}: must be >= 1")
        if (self.packing or self.group_by_length) and not self.validate:
            raise ConfigError("data.packing and data.group_by_length use the lengths the data check measures; keep data.validate=true")
        try:
            MediaOptions(**self.processor_options())
        except ValueError as err:  # the message starts with the setting's name
            raise ConfigError(f"data.{err}") from None

    def processor_options(self) -> dict[str, Any]:
        """The NVILAProcessor arguments these options set (the media settings)."""
        def listed(value: Any) -> Any:  # OmegaConf's ListConfig as a plain list
            return value if value is None or isinstance(value, (str, int)) else list(value)

        return {"intensity_window": listed(self.intensity_window), "dicom_window": listed(self.dicom_window),
                "image_frame": self.image_frame, "volume_axis": self.volume_axis,
                "volume_slices": listed(self.volume_slices)}


@dataclass
class EvalOptions:
    """Generation metrics of a run (the `eval:` section).

    before_training: also evaluate before training; max_records: cap on validation records evaluated; on_empty:
    when no validation record is usable, "stop" before training or "train" without evaluation.
    """

    before_training: bool = True
    batch_size: int = 16
    max_records: int | None = None
    on_empty: str = "stop"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size = {self.batch_size}: must be >= 1")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"eval.max_records = {self.max_records}: must be >= 1, or null for every record")
        if self.on_empty not in ("stop", "train"):
            raise ConfigError(f"eval.on_empty = {self.on_empty!r}; use stop or train")

    def limit(self, records: list) -> list:
        return records[: self.max_records] if self.max_records else records


# `trainer.optim` values: optimizers that take nvila-ft's per-component parameter groups (transformers builds
# them by name; the 8-bit and paged ones are bitsandbytes').
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "adafactor", "sgd",
)
# components whose layers `trainer.gradient_checkpointing` can checkpoint, in the order data flows
CHECKPOINTABLE = ("vision_tower", "llm")


@dataclass
class TrainerConfig:
    """The knobs of a fine-tuning run; `extra` passes any other `transformers.TrainingArguments` field.

    Memory levers: selective_loss projects only the supervised positions through lm_head, in chunks (no logits of
    every position); gradient_checkpointing is true (every component of CHECKPOINTABLE), false, or a list of them;
    offload_activations keeps the tensors saved for backward in CPU memory (pinned on CUDA), parameters excepted;
    offload_embeddings keeps the frozen input embedding table in CPU memory and sends only a batch's rows;
    optim is one of OPTIMIZERS (8-bit and paged AdamW from bitsandbytes keep the per-component groups).
    distributed_timeout_s: how long a process waits in a collective for the others before the job fails (a
    crashed process under torchrun ends the job at once; this bounds the other launchers).
    """

    learning_rate: float = 1e-3
    max_steps: int = 300
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool | list[str] = False
    selective_loss: bool = True
    offload_activations: bool = False
    offload_embeddings: bool = False
    eval_steps: int | None = 100
    save_steps: int = 100
    save_total_limit: int | None = 2
    logging_steps: int = 10
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool = False
    dataloader_num_workers: int = 0
    distributed_timeout_s: int = 600
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"trainer.learning_rate = {self.learning_rate}: must be > 0")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set trainer.max_steps > 0 or trainer.num_train_epochs > 0")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} = {getattr(self, key)}: must be >= 1")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ConfigError(f"trainer.eval_steps = {self.eval_steps}: must be >= 1 or null")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"trainer.optim = {self.optim!r}; use one of {', '.join(OPTIMIZERS)}")
        self.checkpointed_components()

    def checkpointed_components(self) -> tuple[str, ...]:
        """The components `gradient_checkpointing` names, in the order of CHECKPOINTABLE."""
        chosen = self.gradient_checkpointing
        if isinstance(chosen, bool):
            return CHECKPOINTABLE if chosen else ()
        unknown = [c for c in chosen if c not in CHECKPOINTABLE]
        if unknown:
            raise ConfigError(
                f"trainer.gradient_checkpointing: {', '.join(map(repr, unknown))} is not a component; use true, false "
                f"or a list of {', '.join(CHECKPOINTABLE)}"
            )
        return tuple(c for c in CHECKPOINTABLE if c in chosen)

    def training_arguments(
        self,
        output_dir: str | Path,
        precision: Precision,
        seed: int,
        has_eval: bool,
        report_to: list[str] | None = None,
        deepspeed: dict | None = None,
        arguments_class: type | None = None,
        **more: Any,
    ) -> Any:
        """The `transformers.TrainingArguments` of this run. Gradient checkpointing is not among them: the Trainer
        would checkpoint every component; finetune enables it per component on the model. `arguments_class`: a
        subclass to build instead (e.g. `trl.DPOConfig`), with its own fields in `more`."""
        from transformers import TrainingArguments

        evaluate = has_eval and self.eval_steps is not None
        steps = dict(save_steps=self.save_steps, eval_steps=self.eval_steps if evaluate else None)
        if evaluate and self.load_best_model_at_end and self.save_steps % self.eval_steps:
            # the best checkpoint can only be tracked when every save coincides with an evaluation
            steps["save_steps"] = self.eval_steps
        arguments = dict(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
            num_train_epochs=self.num_train_epochs,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_eval_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_ratio,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            optim=self.optim,
            eval_strategy="steps" if evaluate else "no",
            save_strategy="steps",
            save_total_limit=self.save_total_limit,
            logging_steps=self.logging_steps,
            load_best_model_at_end=evaluate and self.load_best_model_at_end,
            metric_for_best_model=self.metric_for_best_model if evaluate else None,
            greater_is_better=self.greater_is_better,
            dataloader_num_workers=self.dataloader_num_workers,
            ddp_timeout=self.distributed_timeout_s,
            bf16=precision.autocast == "bf16",
            fp16=precision.autocast == "fp16",
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
            data_seed=seed,
            report_to=report_to or "none",
            remove_unused_columns=False,
            deepspeed=deepspeed,
            disable_tqdm=False,
            **steps,
        )
        arguments.update(more)
        arguments.update(self.extra)  # any other TrainingArguments field, or one of the above on purpose
        try:
            return (arguments_class or TrainingArguments)(**arguments)
        except (ValueError, TypeError) as err:  # transformers' own checks of these settings
            raise ConfigError(f"trainer: {err}") from err
