"""NVILA: SigLIP tiles -> (Dynamic-S2 merge) -> STC projector -> media embeddings spliced into Qwen2's input.

Batch inputs, as `NVILAProcessor` produces them:
  input_ids [B, L]            text ids with one `<image>` / `<vila/video>` token per media item
  attention_mask [B, L]       1 for real tokens (left or right padding)
  labels [B, L]               optional; -100 where not supervised
  pixel_values [n, 3, S, S]   every image tile of the batch, items in reading order
  image_grids [items, 2]      (rows, cols) of a Dynamic-S2 item's last-scale grid; (0, 0) for a single tile
  video_pixel_values [f, 3, S, S], video_frame_counts [videos]
"""

from __future__ import annotations

import copy
import os
from collections import deque
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
from nvila_ft.model.losses import soft_cross_entropy
from nvila_ft.model.media_encoders import encode_video, with_boundaries
from nvila_ft.model.multiscale import merge_scales, merge_tiles, output_grid, split_tiles, tokens_to_map
from nvila_ft.model.projector import MultimodalProjector
from nvila_ft.model.tokenizer import IGNORE_INDEX, encode, load_tokenizer, token_ids
from nvila_ft.model.vision_tower import VisionTower
from nvila_ft.data.tiling import s2_tile_count


class NVILAForConditionalGeneration(nn.Module):
    """The complete NVILA model on stock transformers modules: `vision_tower`, `mm_projector`, `llm`."""

    supports_gradient_checkpointing = True
    # forward() takes `num_items_in_batch` and normalises the loss by it (Trainer passes it when this is True)
    accepts_loss_kwargs = True

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
        self.vision_tower = VisionTower(vision_tower, config.select_layer)
        self.mm_projector = mm_projector
        self.tokenizer = tokenizer
        self.token_ids = token_ids(tokenizer)
        self.extra_files = dict(extra_files or {})
        # token ids of the text framing each media item ("\n" after every image / frame by default)
        self.boundary_ids = {
            kind: {
                part: encode(tokenizer, text) if text else None
                for part, text in (("start", spec.start_tokens), ("end", spec.end_tokens), ("sep", spec.sep_tokens))
            }
            for kind, spec in (("image", config.image_encoder), ("video", config.video_encoder))
        }

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
        return self.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------ gradient checkpointing
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """Checkpoint every SigLIP and Qwen2 layer. Non-reentrant by default, so frozen inputs still pass gradients."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        for module in (self.llm, self.vision_tower.model):
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.18
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if kwargs["use_reentrant"]:
                # reentrant checkpoints pass no gradient unless their inputs require it (frozen embeddings + LoRA)
                module.enable_input_require_grads()
        if hasattr(self.llm, "config"):
            self.llm.config.use_cache = False

    def activation_checkpointing_disable(self) -> None:
        for module in (self.llm, self.vision_tower.model):
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()
            else:
                module.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.llm.modules())

    # ------------------------------------------------------------------ media
    def _embed_ids(self, ids: list[int] | None) -> torch.Tensor | None:
        if not ids:
            return None
        return self.get_input_embeddings()(torch.tensor(ids, device=self.device))

    def _vision_dtype(self) -> torch.dtype:
        return self.vision_tower.transformer.embeddings.patch_embedding.weight.dtype

    def encode_media(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Embedding runs for every image item and every video, plus a zero term when a dummy tile was used.

        All tiles and frames go through the tower and the projector in one call each, so every process of a
        distributed run makes the same calls (a text-only batch runs one dummy tile in distributed training).
        """
        config = self.config
        image_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        grids = [] if image_grids is None else [tuple(int(v) for v in g) for g in image_grids.tolist()]
        frame_counts = [] if video_frame_counts is None else [int(c) for c in video_frame_counts.tolist()]
        chunks = [t for t in (pixel_values, video_pixel_values) if t is not None and t.shape[0] > 0]
        dummy = not chunks
        if dummy:
            if not (self.training and _distributed_world_size() > 1):
                return [], [], None
            chunks = [torch.zeros(1, 3, config.tile_size, config.tile_size, device=self.device)]
        features = self.vision_tower(torch.cat(chunks).to(self._vision_dtype()))

        scales = config.s2_scales
        projector_inputs, item_grids, start = [], [], 0
        for grid in grids:
            tiled = grid != (0, 0)
            count = s2_tile_count(scales, grid) if (tiled and config.dynamic_s2) else 1
            if tiled and not config.dynamic_s2:
                raise ValueError(f"image grid {grid} given, but this model ({config.family}) takes single tiles")
            item = features[start : start + count]
            start += count
            if config.dynamic_s2:
                if tiled:
                    merged = merge_scales(item, scales, grid, config.s2_resize_output_to_scale_idx)
                    grid = output_grid(scales, grid, config.s2_resize_output_to_scale_idx)
                else:
                    merged, grid = tokens_to_map(item).repeat(1, len(scales), 1, 1), (1, 1)
                item = split_tiles(merged, *grid).flatten(2).transpose(1, 2)
            else:
                grid = (1, 1)
            projector_inputs.append(item)
            item_grids.append(grid)
        if start != image_tiles:
            raise ValueError(f"image_grids describe {start} tiles but pixel_values has {image_tiles}")
        frames = features[image_tiles:]
        if sum(frame_counts) != (0 if dummy else frames.shape[0]):
            raise ValueError(f"video_frame_counts sum to {sum(frame_counts)} but video_pixel_values has {frames.shape[0]}")
        if config.dynamic_s2:
            frames = frames.repeat(1, 1, len(scales))  # single-tile path: the one scale stands in for all
        projector_inputs.append(frames)

        projector_dtype = next(self.mm_projector.parameters(), features).dtype
        projected = self.mm_projector(torch.cat(projector_inputs).to(projector_dtype)).to(self.dtype)
        if dummy:
            return [], [], projected.sum() * 0.0

        image_boundaries = {k: self._embed_ids(v) for k, v in self.boundary_ids["image"].items()}
        images, start = [], 0
        for rows, cols in item_grids:
            tiles = projected[start : start + rows * cols]
            start += rows * cols
            raster = merge_tiles(tokens_to_map(tiles), rows, cols).flatten(2)[0].transpose(0, 1)
            images.append(with_boundaries(raster, image_boundaries["start"], image_boundaries["end"]))
        video_boundaries = {k: self._embed_ids(v) for k, v in self.boundary_ids["video"].items()}
        videos = [
            encode_video(clip, config.video_encoder, video_boundaries["start"], video_boundaries["end"], video_boundaries["sep"])
            for clip in projected[start:].split(frame_counts)
        ]
        return images, videos, None

    # ------------------------------------------------------------------ splicing
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        video_pixel_values: torch.Tensor | None = None,
        video_frame_counts: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each media token by its embedding run.

        Returns (inputs_embeds, attention_mask, labels, position_ids), re-padded on `padding_side` (default:
        the side the input was padded on). Media positions get label -100.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.bool()
        if padding_side is None:
            padding_side = _padding_side(attention_mask)
        images, videos, dummy = self.encode_media(pixel_values, image_grids, video_pixel_values, video_frame_counts)
        queues = {"image": deque(images), "video": deque(videos)}

        media = self.token_ids.media
        vocab = self.config.vocab_size
        # runtime token ids (>= vocab) never reach the embedding table; their rows would be discarded anyway
        safe_ids = torch.where((input_ids >= vocab) | (input_ids < 0), self.token_ids.pad % vocab, input_ids)
        text = self.get_input_embeddings()(safe_ids)
        if dummy is not None:
            text = text + dummy
        media_ids = torch.tensor(list(media), device=input_ids.device)

        sequences, sequence_labels = [], []
        for b in range(input_ids.shape[0]):
            valid = attention_mask[b]
            ids, embeds = input_ids[b][valid], text[b][valid]
            sample_labels = labels[b][valid] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            pieces, label_pieces, previous = [], [], 0
            for position in torch.isin(ids, media_ids).nonzero().flatten().tolist():
                kind = media[int(ids[position])]
                if not queues[kind]:
                    raise ValueError(f"sample {b} has more {kind} tokens than {kind} inputs in the batch")
                run = queues[kind].popleft()
                pieces += [embeds[previous:position], run]
                label_pieces += [sample_labels[previous:position], sample_labels.new_full((run.shape[0],), IGNORE_INDEX)]
                previous = position + 1
            pieces.append(embeds[previous:])
            label_pieces.append(sample_labels[previous:])
            sequences.append(torch.cat(pieces))
            sequence_labels.append(torch.cat(label_pieces))
        for kind, queue in queues.items():
            if queue:
                raise ValueError(f"{len(queue)} {kind} input(s) left over: the batch has fewer {kind} tokens than {kind}s")
        return _pad_sequences(sequences, sequence_labels, padding_side)

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
        """Logits over the checkpoint's vocabulary; `loss` when labels are given (mean over supervised tokens)."""
        if inputs_embeds is None:
            inputs_embeds, attention_mask, labels, position_ids = self.embed(
                input_ids, attention_mask, labels, pixel_values, image_grids, video_pixel_values, video_frame_counts
            )
        soft_tokens = self.config.time_token_ids if (self.training and labels is not None) else []
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
            output.loss = soft_cross_entropy(output.logits, labels, soft_tokens, self.config.soft_ce_std)
        return output

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
        """New token ids only ([B, new]); greedy unless `do_sample=True`. Prompts are left-padded internally."""
        embeds, mask, _, _ = self.embed(
            input_ids, attention_mask, None, pixel_values, image_grids, video_pixel_values, video_frame_counts, "left"
        )
        kwargs.pop("labels", None)
        config = copy.deepcopy(generation_config or self.default_generation_config())
        model_kwargs = config.update(**kwargs)  # generation options go into the config, the rest to the LLM
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask.long(), generation_config=config, **model_kwargs)


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _padding_side(mask: torch.Tensor) -> str:
    """'left' when every row ends with a real token and some row starts with padding."""
    if mask[:, -1].all() and not mask[:, 0].all():
        return "left"
    return "right"


def _pad_sequences(
    sequences: list[torch.Tensor], labels: list[torch.Tensor], padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = [s.shape[0] for s in sequences]
    longest = max(lengths)
    batch, hidden = len(sequences), sequences[0].shape[1]
    first = sequences[0]
    embeds = first.new_zeros(batch, longest, hidden)
    out_labels = labels[0].new_full((batch, longest), IGNORE_INDEX)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=first.device)
    positions = torch.zeros(batch, longest, dtype=torch.long, device=first.device)
    for b, (sequence, label, length) in enumerate(zip(sequences, labels, lengths)):
        span = slice(longest - length, longest) if padding_side == "left" else slice(0, length)
        embeds[b, span] = sequence
        out_labels[b, span] = label
        mask[b, span] = 1
        positions[b, span] = torch.arange(length, device=first.device)
    return embeds, mask, out_labels, positions
