"""NVILA: SigLIP tiles -> (Dynamic-S2 merge) -> STC projector -> media features scattered into Qwen2's input.

Batch inputs, as `NVILAProcessor` produces them:
  input_ids [B, L]            the LLM sequence: text ids, and for each media item its run of placeholder ids
                              (`<image>` / `<vila/video>`, one per feature token) with its boundary text as ids
  attention_mask [B, L]       1 for real tokens (left or right padding); None with `position_ids` for packed rows
  labels [B, L]               optional; -100 where not supervised (every media run)
  position_ids [B, L]         optional; restarting at 0 for each sample of a packed row
  pixel_values [n, 3, S, S]   every image tile of the batch, items in reading order
  image_grids [items, 2]      (rows, cols) of a Dynamic-S2 item's last-scale grid; (0, 0) for a single tile
  video_pixel_values [f, 3, S, S], video_frame_counts [videos]
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from nvila_ft.model.checkpoint import (
    load_llm,
    load_projector,
    load_vision_tower,
    read_config,
    read_extra_files,
    resolve_checkpoint,
    save_checkpoint,
)
from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.losses import selective_cross_entropy, soft_cross_entropy
from nvila_ft.model.media_features import encode_media
from nvila_ft.model.projector import MultimodalProjector
from nvila_ft.model.tokenizer import load_tokenizer, token_ids
from nvila_ft.model.vision_tower import VisionTower


class NVILAForConditionalGeneration(nn.Module):
    """The complete NVILA model on stock transformers modules: `vision_tower`, `mm_projector`, `llm`."""

    supports_gradient_checkpointing = True
    # forward() takes `num_items_in_batch` and normalises the loss by it (Trainer passes it when this is True)
    accepts_loss_kwargs = True
    # training forwards with labels compute the loss from the supervised positions only and return no logits
    # (`nvila_ft.model.losses.selective_cross_entropy`); finetune sets it from `trainer.selective_loss`
    selective_loss = False

    def __init__(
        self,
        config: NVILAConfig,
        llm: nn.Module,
        vision_tower: nn.Module,
        mm_projector: MultimodalProjector,
        tokenizer: Any,
        extra_files: dict[str, bytes] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.vision_tower = VisionTower(vision_tower, config.vision_layers_used)
        self.mm_projector = mm_projector
        self.tokenizer = tokenizer
        self.token_ids = token_ids(tokenizer)
        self.extra_files = dict(extra_files or {})

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        attn_implementation: str = "sdpa",
        device: str | torch.device | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        vision_kwargs: dict[str, Any] | None = None,
    ) -> "NVILAForConditionalGeneration":
        """Load an official-layout checkpoint (strict). dtype defaults to the checkpoint's `model_dtype`.

        `llm_kwargs` / `vision_kwargs` go to the LLM's / SigLIP's `from_pretrained` (e.g. `quantization_config`
        and `device_map` for a quantized base); quantized components are placed by their device_map.
        """
        root = resolve_checkpoint(path)
        config = read_config(root)
        dtype = _as_dtype(dtype or torch_dtype) or config.model_dtype
        llm = load_llm(root, dtype, attn_implementation, **(llm_kwargs or {}))
        vision = load_vision_tower(root, dtype, attn_implementation, **(vision_kwargs or {}))
        projector = load_projector(root, config, dtype)
        tokenizer = load_tokenizer(root / "llm", config.chat_template)
        model = cls(config, llm, vision, projector, tokenizer, read_extra_files(root))
        model.name_or_path = str(root)
        if device is not None:
            model.mm_projector.to(device)
            for module, kwargs in ((model.llm, llm_kwargs), (model.vision_tower, vision_kwargs)):
                if not (kwargs or {}).get("device_map"):
                    module.to(device)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the official layout (see `nvila_ft.model.checkpoint.save_checkpoint`)."""
        return save_checkpoint(self, path, dtype=dtype, overwrite=overwrite)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Where the model computes (the projector's device: the input embedding table may be kept in host memory)."""
        return next(self.mm_projector.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------ gradient checkpointing
    def _checkpointable(self, components: Sequence[str]) -> list[nn.Module]:
        modules = {"vision_tower": self.vision_tower.model, "llm": self.llm}
        unknown = [c for c in components if c not in modules]
        if unknown:
            raise ValueError(f"cannot checkpoint {unknown}; the checkpointed components are {', '.join(modules)}")
        return [modules[c] for c in components]

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        components: Sequence[str] = ("vision_tower", "llm"),
        **options: Any,
    ) -> None:
        """Checkpoint every layer of the given components (SigLIP's and/or Qwen2's). Non-reentrant by default, so
        frozen inputs still pass gradients. `options` (transformers' `every_n_layers`, `offload`) go to each
        component where its transformers version takes them."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        options = {k: v for k, v in options.items() if v is not None}
        for module in self._checkpointable(components):
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.18
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if kwargs["use_reentrant"]:
                # reentrant checkpoints pass no gradient unless their inputs require it (frozen embeddings + LoRA)
                module.enable_input_require_grads()
        if "llm" in components and hasattr(self.llm, "config"):
            self.llm.config.use_cache = False

    def activation_checkpointing_disable(self) -> None:
        for module in self._checkpointable(("vision_tower", "llm")):
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()
            else:
                module.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    def checkpointed_components(self) -> tuple[str, ...]:
        """The components whose layers are checkpointed now, in the order ("vision_tower", "llm")."""
        modules = zip(("vision_tower", "llm"), self._checkpointable(("vision_tower", "llm")))
        return tuple(name for name, module in modules if any(getattr(m, "gradient_checkpointing", False) for m in module.modules()))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.checkpointed_components())

    # ------------------------------------------------------------------ media
    def media_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
        like: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(image features [image tokens, D], video features [video tokens, D], zero term of a dummy tile), in the
        device and dtype of `like` (the token embeddings; default: the model's); see `encode_media`."""
        # under ZeRO-3 reading a parameter's attributes can gather it, so the processes must read the same ones:
        # the device and dtype come from a tensor every process has
        device, dtype = (like.device, like.dtype) if like is not None else (self.device, self.dtype)
        return encode_media(self.config, self.vision_tower, self.mm_projector, pixel_values, image_grids,
                            video_pixel_values, video_frame_counts, device, dtype)

    def get_image_features(self, pixel_values: torch.Tensor, image_grids: torch.Tensor | None = None) -> torch.Tensor:
        """[image tokens, D]: the features that fill the batch's image placeholders, in order."""
        if image_grids is None:
            image_grids = torch.zeros(pixel_values.shape[0], 2, dtype=torch.long)
        return self.media_features(pixel_values, image_grids)[0]

    def get_video_features(self, video_pixel_values: torch.Tensor, video_frame_counts: torch.Tensor) -> torch.Tensor:
        """[video tokens, D]: the features that fill the batch's video placeholders, in order."""
        return self.media_features(video_pixel_values=video_pixel_values, video_frame_counts=video_frame_counts)[1]

    # ------------------------------------------------------------------ embedding
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, L, D] with every media placeholder replaced by its feature (one masked_scatter per
        kind); the number of features must equal the number of placeholders."""
        vocab = self.config.vocab_size
        # runtime token ids (>= vocab) never reach the embedding table; their rows are replaced below anyway
        safe_ids = torch.where((input_ids >= vocab) | (input_ids < 0), self.token_ids.pad % vocab, input_ids)
        embeds = self.get_input_embeddings()(safe_ids)
        images, videos, dummy = self.media_features(pixel_values, image_grids, video_pixel_values, video_frame_counts, like=embeds)
        if dummy is not None:
            embeds = embeds + dummy
        for kind, placeholder, features in (("image", self.token_ids.image, images), ("video", self.token_ids.video, videos)):
            mask = input_ids == placeholder
            expected = int(mask.sum())
            given = 0 if features is None else features.shape[0]
            if expected != given:
                raise ValueError(
                    f"the batch has {expected} {kind} placeholder positions but its {kind}s give {given} feature tokens; "
                    f"input_ids and the {kind} inputs do not belong together (make both with NVILAProcessor)"
                )
            if expected:
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits over the checkpoint's vocabulary; `loss` when labels are given (mean over supervised tokens, or
        their sum over `num_items_in_batch`). With `selective_loss` a training forward with labels returns the loss
        only (no logits), computed from the supervised positions.

        Packed rows come with `position_ids` (restarting at 0 for each sample) and no `attention_mask`: attention
        then stays within each sample. Otherwise positions follow the attention mask (left or right padding).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grids, video_pixel_values, video_frame_counts)
        packed = attention_mask is None and position_ids is not None
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if packed:
            use_cache = False  # transformers finds packed samples from position_ids only without a cache
        soft_tokens = self.config.time_token_ids if (self.training and labels is not None) else []
        if self.selective_loss and self.training and labels is not None and past_key_values is None:
            return self._selective_forward(inputs_embeds, attention_mask, position_ids, labels, soft_tokens, num_items_in_batch, **kwargs)
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        output = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache if use_cache is not None else not self.training,
            labels=None if soft_tokens else labels,
            **loss_kwargs,
            **kwargs,
        )
        if soft_tokens:
            output.loss = soft_cross_entropy(output.logits, labels, soft_tokens, self.config.soft_ce_std, num_items_in_batch)
        return output

    def decode(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, **kwargs: Any
    ) -> Any:
        """Qwen2's decoder (final norm included, no lm_head) over the spliced embeddings, LoRA layers active;
        positions follow the attention mask when not given."""
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs)

    def _selective_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor,
        soft_tokens: list[int],
        num_items_in_batch: torch.Tensor | int | None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The training loss without full-vocabulary logits: Qwen2's decoder (final norm included), then only the
        supervised positions through lm_head, in chunks. `logits` is None."""
        decoded = self.decode(inputs_embeds, attention_mask, position_ids, **kwargs)
        llm = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        loss = selective_cross_entropy(
            decoded.last_hidden_state, labels, llm.get_output_embeddings(), soft_tokens, self.config.soft_ce_std, num_items_in_batch
        )
        return CausalLMOutputWithPast(loss=loss, hidden_states=decoded.hidden_states, attentions=decoded.attentions)

    def default_generation_config(self) -> GenerationConfig:
        """Greedy decoding up to 512 new tokens, stopping at NVILA's stop tokens (as the official default:
        the LLM's own generation_config.json, which may ask for sampling, is not applied)."""
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=512,
            eos_token_id=list(self.token_ids.stop),
            pad_token_id=self.token_ids.pad,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Only the new token ids ([B, new]), not the prompt; greedy unless `do_sample=True`. Right-padded prompts
        are moved to the left first (generation continues from the last column)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # padding first, tokens in their order
        input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        embeds = self.embed(input_ids, pixel_values, image_grids, video_pixel_values, video_frame_counts)
        kwargs.pop("labels", None)
        config = copy.deepcopy(generation_config or self.default_generation_config())
        model_kwargs = config.update(**kwargs)  # generation options go into the config, the rest to the LLM
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask.long(), generation_config=config, **model_kwargs)


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype
