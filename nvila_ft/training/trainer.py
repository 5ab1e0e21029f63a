"""transformers.Trainer wired to NVILA: per-component optimizer groups, adapter-only checkpoints, safe resume.

A checkpoint directory (`checkpoint-<step>/`) holds the adapter artifacts under `adapters/` plus the
Trainer's optimizer, scheduler, RNG and state files, and a `COMPLETE` marker written last: a checkpoint
without it (a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from nvila_ft.adapters.artifacts import restore_adapter_weights, save_adapters
from nvila_ft.adapters.optim import parameter_groups
from nvila_ft.adapters.policy import AdapterPolicy
from nvila_ft.data.packing import LengthGroupedSampler, PackedBatchSampler, PackingError
from nvila_ft.data.records import Record
from nvila_ft.model.tokenizer import IGNORE_INDEX
from nvila_ft.training.config import ConfigError, DataOptions
from nvila_ft.training.deepspeed import gathered_parameters, master_trainable_state, set_master_weight
from nvila_ft.training.evaluation import record_losses, token_mean_loss
from nvila_ft.training.offload import offloaded_activations

log = logging.getLogger("nvila_ft")

COMPLETE_MARKER = "COMPLETE"
ADAPTERS_DIR = "adapters"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished `checkpoint-<step>` folders, oldest first."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in folders if (p / COMPLETE_MARKER).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    removed = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        if folder.is_dir() and not (folder / COMPLETE_MARKER).is_file():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


class NVILATrainer(Trainer):
    """Trainer whose optimizer follows the adapter policy and whose checkpoints are adapter artifacts."""

    def __init__(
        self, *args: Any, policy: AdapterPolicy, train_sampler: Any = None, offload_activations: bool = False,
        eval_collator: Any = None, **kwargs: Any,
    ) -> None:
        """policy: the adapter policy the model went through (its optimizer groups, its adapter checkpoints).
        train_sampler: a `PackedBatchSampler` (one packed row per micro-batch) or a per-sample sampler such as
        `LengthGroupedSampler`; None is the Trainer's shuffled order. offload_activations: training forwards keep
        what they save for backward in CPU memory (`offloaded_activations`). eval_collator: padded batches, one
        record a row; given, eval_loss is the validation set's token-weighted loss, each record counted once whatever
        the batching and the number of processes (`prediction_step`); None: the Trainer's own evaluation (DPO's)."""
        if eval_collator is not None:
            kwargs.setdefault("compute_metrics", token_mean_loss)
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.positions_seen = 0
        self.train_sampler = train_sampler
        self.offload_activations = offload_activations
        self.eval_collator = eval_collator

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.train_sampler is not None and not isinstance(self.train_sampler, PackedBatchSampler):
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> Any:
        if not isinstance(self.train_sampler, PackedBatchSampler):
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.train_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)  # each process takes its share of the packs

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """Batches of `eval_collator`, padded even when training packs: each record's loss must come back in batch
        order, since accelerate drops the records it repeats to fill every process's last batch by position (a
        packed batch reorders its records)."""
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        from torch.utils.data import DataLoader

        loader = DataLoader(
            eval_dataset if eval_dataset is not None else self.eval_dataset,
            batch_size=self.args.eval_batch_size,
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.policy, self.args.learning_rate, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("lr", "weight_decay")}
            if self._offloads_optimizer():
                # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised Adam, same groups
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer_cls = DeepSpeedCPUAdam
                optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k in ("betas", "eps")}
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def _offloads_optimizer(self) -> bool:
        config = getattr(self.args, "hf_deepspeed_config", None)
        zero = config.config.get("zero_optimization", {}) if config is not None else {}
        return bool(zero.get("offload_optimizer"))

    # ------------------------------------------------------------------ learning rates
    def _get_learning_rate(self) -> float:
        """The scheduled base learning rate (the LLM's unless it has its own), not the first group's (the vision
        tower's, often 10x smaller): every group follows the same schedule, so one group's ratio gives it. Each
        component's rate at the same moment is kept for `log`."""
        self._component_rates = {}
        for group in self.optimizer.param_groups:
            component = str(group.get("name", "")).split("/")[0]
            if component:
                self._component_rates.setdefault(component, float(group["lr"]))
        for group in self.optimizer.param_groups:
            if group.get("initial_lr"):
                return self.args.learning_rate * float(group["lr"]) / float(group["initial_lr"])
        return super()._get_learning_rate()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds each component's learning rate (`learning_rate/<component>`) beside the base one."""
        if "learning_rate" in logs:
            for component, rate in getattr(self, "_component_rates", {}).items():
                logs.setdefault(f"learning_rate/{component}", rate)
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None):
        positions = inputs.pop("num_positions", None)
        if positions is not None and model.training:
            self.positions_seen += int(positions)
        offload = self.offload_activations and model.training and torch.is_grad_enabled()
        with offloaded_activations(pin_memory=torch.cuda.is_available()) if offload else contextlib.nullcontext():
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None):
        """With `eval_collator`: (None, each record's summed token loss [B], its supervised token count [B]). The
        Trainer gathers both with `gather_for_metrics`, which drops the repeated records per record, and
        `token_mean_loss` makes eval_loss of them. The Trainer's own step takes each batch's mean loss, in which the
        records repeated to fill the last batches count again."""
        inputs.pop("num_positions", None)
        if self.eval_collator is None:
            return super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
        supervised = targets != IGNORE_INDEX
        with torch.no_grad(), self.compute_loss_context_manager():
            # logits of the supervised positions only, [N, V] (one lm_head call on every process, as ZeRO-3 needs)
            logits = model(**inputs, logits_to_keep=supervised, use_cache=False).logits
            counts = supervised.sum(dim=1)
            config = self.model.config
            losses = record_losses(logits, targets[supervised], counts.tolist(), config.time_token_ids, config.soft_ce_std)
        return None, losses, counts

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under DeepSpeed the adapters are saved from its float32 master copies (`master_trainable_state`), not
        from the parameters (16-bit under bf16, shards under ZeRO-3), nor from a gathered 16-bit copy of the whole
        model: trainable tensors are float32 as in one process."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, state_dict=master_trainable_state(self.model, keep=self.args.should_save))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:  # the Trainer calls this on every process; one writes
            return
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        trained = state_dict if self.is_deepspeed_enabled else None  # DeepSpeed's float32 masters (`save_model`)
        save_adapters(self.model, self.policy, output_dir / ADAPTERS_DIR, overwrite=True, state_dict=trained)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process has written its part (DeepSpeed shards)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (folder / COMPLETE_MARKER).write_text(f"step {self.state.global_step}\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        restore_adapter_weights(model or self.model, self.policy, Path(resume_from_checkpoint) / ADAPTERS_DIR)

    def _load_best_model(self) -> None:
        """The best checkpoint's adapters into the model and, under DeepSpeed, into its float32 master copies (what
        `final/` is saved from): the parameters take the saved float32 values first, then their own dtype."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with gathered_parameters(self.model, modifier_rank=0):
            own = [p.data for p in trainable]
            for p in trainable:
                p.data = p.data.float()  # no copy when already float32
            restore_adapter_weights(self.model, self.policy, Path(self.state.best_model_checkpoint) / ADAPTERS_DIR)
            for p, data in zip(trainable, own):
                if self.is_deepspeed_enabled:
                    set_master_weight(p, p.data)
                data.copy_(p.data)  # back into DeepSpeed's own buffers (ZeRO-2's flat groups, ZeRO-3's gathered tensor)
                p.data = data


class ProgressWithThroughput(ProgressCallback):
    """The standard progress bar (steps, ETA) with loss, learning rate and LLM positions per second."""

    def __init__(self, trainer_ref: list[NVILATrainer]) -> None:
        super().__init__()
        self._trainer_ref = trainer_ref
        self._start = None
        self._start_positions = 0

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._start, self._start_positions = time.perf_counter(), self._trainer_ref[0].positions_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            elapsed = max(time.perf_counter() - (self._start or time.perf_counter()), 1e-9)
            rate = (self._trainer_ref[0].positions_seen - self._start_positions) / elapsed
            postfix = {"tok/s": f"{rate:,.0f}"}
            if "loss" in logs:
                postfix["loss"] = f"{logs['loss']:.4f}"
            if "learning_rate" in logs:
                postfix["lr"] = f"{logs['learning_rate']:.2e}"
            if "eval_loss" in logs:
                postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
            self.training_bar.set_postfix(postfix, refresh=False)
            logs["tokens_per_second"] = round(rate, 1)


class NaNGuard(TrainerCallback):
    """Stop with a clear error when the training loss stops being a number."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} at step {state.global_step}; lower trainer.learning_rate or use precision=fp32/bf16"
            )


def build_trainer(
    model: Any, policy: AdapterPolicy, args: Any, train_dataset: Any, eval_dataset: Any, collator: Any,
    callbacks: list | None = None, train_sampler: Any = None, offload_activations: bool = False, eval_collator: Any = None,
) -> NVILATrainer:
    """The trainer of `model`, which went through `apply_policy` with `policy`. eval_collator: padded batches for
    eval_loss (see `NVILATrainer`); None: `collator`, which must then pad."""
    reference: list[NVILATrainer] = []
    trainer = NVILATrainer(
        model=model,
        policy=policy,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[NaNGuard(), *(callbacks or [])],
        train_sampler=train_sampler,
        offload_activations=offload_activations,
        eval_collator=eval_collator or collator,
    )
    reference.append(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressWithThroughput(reference))
    return trainer


def train_sampler(options: DataOptions, records: list[Record], lengths: list[int], batch_size: int, seed: int) -> Any:
    """Micro-batches of `batch_size` packed rows of up to `data.max_tokens` positions (data.packing), batches of one
    modality and similar length (data.group_by_length), or None (the Trainer's shuffled order)."""
    if options.packing:
        try:
            sampler = PackedBatchSampler(lengths, options.max_tokens, batch_size, seed, [r.name for r in records])
        except PackingError as err:
            raise ConfigError(str(err)) from err
        log.info("packing: %d samples into %d rows of up to %d positions (%.0f%% left empty), %d rows per micro-batch",
                 len(records), len(sampler.packs), options.max_tokens, 100 * sampler.empty_share, batch_size)
        return sampler
    if options.group_by_length:
        return LengthGroupedSampler(lengths, [r.modality for r in records], batch_size, seed)
    return None
