"""NVILAProcessor: chat messages with images/videos -> the model's batch tensors.

Per sample: media are loaded and tiled by the checkpoint's `image_aspect_ratio`, the conversation is
rendered with the checkpoint tokenizer's chat template (one `<image>` / `<vila/video>` token per media
item), tokenised and labelled (assistant replies and their closing token supervised); then each media token
is expanded into the item's run of positions from `nvila_ft.model.media_layout` (its boundary text as ids and
one placeholder per feature token, all unsupervised), so `len(input_ids)` is the LLM sequence. Batches are
padded on the requested side; the media of the batch are concatenated in reading order.

Which images are tiled (Dynamic-S2 / NVILA-Lite) follows the official code unless told otherwise:
training samples tile every image; a generation prompt tiles its image only when it holds exactly one
image (`generate_content`), otherwise each image is one resized tile.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from nvila_ft.data.batching import packed_batch, padded_batch
from nvila_ft.data.conversation import Part, Turn, normalize_messages
from nvila_ft.data.media import MediaError, VideoClip, image_size, load_image, load_video, volume_frames
from nvila_ft.data.media_base import MediaOptions
from nvila_ft.data.pixels import PixelNormalizer
from nvila_ft.data.tiling import dynamic_s2_tiles, dynamic_tiles, pad_to_square
from nvila_ft.errors import UserError
from nvila_ft.model.checkpoint import read_config, resolve_checkpoint
from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.media_layout import MediaLayout
from nvila_ft.model.tokenizer import (
    IGNORE_INDEX,
    MEDIA_TOKENS,
    add_runtime_tokens,
    encode,
    escape_runtime_tokens,
    load_tokenizer,
    render,
    supervised_labels,
)


logger = logging.getLogger(__name__)


class SampleError(UserError, ValueError):
    """A sample that cannot be turned into model inputs; the message names the sample and the reason.

    kind: what data validation reports ("no_answer", "too_long", "structure", or the media error's kind).
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ImageItem:
    """One `<image>` token's worth of pixels: tiles [n, 3, S, S] and the Dynamic-S2 grid (rows, cols) or None."""

    tiles: torch.Tensor
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class SampleSize:
    """What one training sample asks of the model (`NVILAProcessor.measure`)."""

    positions: int  # LLM positions after media expansion
    tiles: int  # vision-tower tiles and video frames
    supervised: int  # supervised positions (the loss)


@dataclass
class ProcessedSample:
    input_ids: list[int]  # the LLM sequence: text ids and each media item's run of placeholders
    labels: list[int] | None
    images: list[ImageItem] = field(default_factory=list)
    videos: list[torch.Tensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how media were converted (e.g. 16-bit rescaled), for reports

    @property
    def length(self) -> int:
        """LLM positions."""
        return len(self.input_ids)


class NVILAProcessor:
    """Turns conversations into `NVILAForConditionalGeneration` inputs for one checkpoint."""

    def __init__(
        self,
        tokenizer: Any,
        config: NVILAConfig,
        model_max_length: int | None = None,
        num_video_frames: int | None = None,
        media_root: str | os.PathLike | None = None,
        multi_image_tiling: bool | None = None,
        official_label_matching: bool = False,
        intensity_window: list[float] | None = None,
        dicom_window: str | list[float] | None = None,
        image_frame: str | int = "middle",
        volume_axis: str = "axial",
        volume_slices: list[int] | None = None,
    ) -> None:
        """The media settings (intensity_window ... volume_slices) are `MediaOptions`' (nvila_ft.data.media_base)."""
        self.tokenizer = tokenizer
        self.media_options = MediaOptions(intensity_window, dicom_window, image_frame, volume_axis, volume_slices)
        self.official_label_matching = official_label_matching
        self.config = config
        self.token_ids = add_runtime_tokens(tokenizer)
        self.model_max_length = model_max_length or _default_max_length(tokenizer, config)
        self.num_video_frames = num_video_frames or config.num_video_frames
        self.media_root = Path(media_root) if media_root is not None else None
        self.multi_image_tiling = multi_image_tiling
        self.normalize = PixelNormalizer.from_preprocessor_config(config.preprocessor, config.tile_size)
        if config.fps > 0 or int(config.raw.get("video_max_tiles") or 1) > 1:
            # as the released NVILA code: frames are sampled uniformly and each is one resized tile
            logger.warning("config.json asks for fps sampling or tiled video frames (VILA after the NVILA release); "
                           "using the release behaviour: %d uniform frames, one tile each", self.num_video_frames)
        self.layout = MediaLayout.from_tokenizer(config, tokenizer)

    def with_config(self, config: NVILAConfig) -> "NVILAProcessor":
        """The same processor for a changed configuration (e.g. fewer tiles), sharing the tokenizer."""
        clone = copy.copy(self)
        clone.config = config
        clone.layout = MediaLayout.from_tokenizer(config, self.tokenizer)
        if self.num_video_frames == self.config.num_video_frames:  # not set apart from the config
            clone.num_video_frames = config.num_video_frames
        return clone

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "NVILAProcessor":
        root = resolve_checkpoint(path)
        config = read_config(root)
        return cls(load_tokenizer(root / "llm", config.chat_template), config, **kwargs)

    # ------------------------------------------------------------------ media
    def _single_tile(self, image: Image.Image) -> torch.Tensor:
        mode, size = self.config.image_aspect_ratio, self.config.tile_size
        if mode == "resize":
            image = image.resize((size, size))
        elif mode == "pad":
            image = pad_to_square(image, self.normalize.pad_fill)
        return self.normalize(image).unsqueeze(0)

    def image_items(self, image: Image.Image, tile: bool) -> list[ImageItem]:
        """The media items one image becomes (several for NVILA-Lite tiles, one otherwise)."""
        config = self.config
        mode = config.image_aspect_ratio
        if tile and mode == "dynamic_s2":
            tiled = dynamic_s2_tiles(image, config.s2_scales, config.max_tiles)
            return [ImageItem(torch.stack([self.normalize(t) for t in tiled.tiles]), tiled.grid)]
        if tile and mode == "dynamic":
            tiled = dynamic_tiles(image, config.tile_size, config.min_tiles, config.max_tiles)
            return [ImageItem(self.normalize(t).unsqueeze(0)) for t in tiled.tiles]
        return [ImageItem(self._single_tile(image))]

    def video_frames(self, source: Any, media_root: Path | None = None) -> torch.Tensor:
        """[T, 3, S, S] for a video file, a folder of frames, a list of frames or a `VideoClip` (chosen frames)."""
        frames = load_video(source, self.num_video_frames, media_root or self.media_root, self.media_options)
        return torch.cat([self._single_tile(frame) for frame in frames])

    # ------------------------------------------------------------------ one sample
    def process(
        self,
        messages: Any,
        add_generation_prompt: bool = False,
        with_labels: bool | None = None,
        truncate: bool = True,
        sample_id: str = "sample",
        media_root: str | os.PathLike | None = None,
    ) -> ProcessedSample:
        """Load media, render, tokenise and label one conversation.

        with_labels defaults to `not add_generation_prompt`. A training sample longer than `model_max_length`
        is cut at the end unless the cut would go through a media item (then SampleError); a prompt never is.
        media_root overrides the processor's for this sample (relative paths resolve under it, none may leave it).
        """
        with_labels = (not add_generation_prompt) if with_labels is None else with_labels
        turns = self._turns(messages, sample_id)
        tile = self.multi_image_tiling
        if tile is None:
            tile = (not add_generation_prompt) or sum(p.kind == "image" for t in turns for p in t.parts) == 1
        sample = ProcessedSample(input_ids=[], labels=None)
        root = Path(media_root) if media_root is not None else self.media_root
        chat = self._chat(turns, lambda part, where: self._part_text(part, sample, tile, where, root), sample_id)
        text_ids, labels = self._tokens(chat, add_generation_prompt, with_labels, sample_id)
        media_end = self._expand(sample, text_ids, labels)
        self._fit(sample, media_end, truncate and with_labels, sample_id)
        return sample

    def measure(self, messages: Any, sample_id: str = "sample", media_root: str | os.PathLike | None = None) -> SampleSize:
        """The size of a training sample from its media's sizes alone (image headers, the configured frame count):
        what `process` would produce, without decoding a pixel. For planning."""
        turns = self._turns(messages, sample_id)
        root = Path(media_root) if media_root is not None else self.media_root
        runs: list[int] = []
        tiles = 0

        def media_text(part: Part, where: str) -> str:
            nonlocal tiles
            if part.kind == "text":
                return escape_runtime_tokens(part.value)
            try:
                if part.kind == "video":
                    volume_frames(part.value, root, self.media_options)  # a DICOM/NIfTI video's headers must read
                    runs.append(self.layout.video_positions(self.num_video_frames))
                    tiles += self.num_video_frames
                    return MEDIA_TOKENS["video"]
                plan = self.layout.image(*image_size(part.value, root, self.media_options), tiled=True)
            except MediaError as err:
                raise SampleError(f"{where}: {err}", kind=err.kind) from err
            tiles += plan.tiles
            if self.config.image_aspect_ratio == "dynamic":
                runs.extend([len(self.layout.image_run(None))] * plan.items)
                return (MEDIA_TOKENS["image"] + "\n") * plan.items
            runs.append(len(self.layout.image_run(plan.grid)))
            return MEDIA_TOKENS["image"]

        chat = self._chat(turns, media_text, sample_id)
        text_ids, labels = self._tokens(chat, False, True, sample_id)
        supervised = sum(label != IGNORE_INDEX for label in labels or [])
        return SampleSize(len(text_ids) - len(runs) + sum(runs), tiles, supervised)

    def _turns(self, messages: Any, sample_id: str) -> list[Turn]:
        try:
            return normalize_messages(messages)
        except ValueError as err:
            raise SampleError(f"{sample_id}: {err}", kind="structure") from err

    def _chat(self, turns: list[Turn], part_text: Any, sample_id: str) -> list[dict[str, str]]:
        """Messages with each part rendered as text (media as their token) by `part_text(part, where)`."""
        chat = []
        for index, turn in enumerate(turns):
            where = f"{sample_id}, message {index}"
            chat.append({"role": turn.role, "content": "".join(part_text(part, where) for part in turn.parts).strip()})
        return chat

    def _tokens(
        self, chat: list[dict[str, str]], add_generation_prompt: bool, with_labels: bool, sample_id: str
    ) -> tuple[list[int], list[int] | None]:
        """The chat template's ids (one token per media item) and, for training, their labels."""
        if with_labels and not any(m["role"] == "assistant" for m in chat):
            raise SampleError(f"{sample_id}: the conversation has no assistant answer to learn from", kind="no_answer")
        if add_generation_prompt and chat[-1]["role"] == "assistant":
            raise SampleError(f"{sample_id}: a generation prompt must end with a user message", kind="structure")
        text_ids = encode(self.tokenizer, render(self.tokenizer, chat, add_generation_prompt))
        labels = (
            supervised_labels(self.tokenizer, chat, text_ids, self.official_label_matching) if with_labels else None
        )
        if labels is not None and all(label == IGNORE_INDEX for label in labels):
            raise SampleError(f"{sample_id}: no token is supervised (the chat template did not match the answers)", kind="no_answer")
        return text_ids, labels

    def _expand(self, sample: ProcessedSample, text_ids: list[int], labels: list[int] | None) -> int:
        """Replace each media token by its item's run (unsupervised); returns where the last run ends."""
        runs = {
            self.token_ids.image: iter([self.layout.image_run(item.grid) for item in sample.images]),
            self.token_ids.video: iter([self.layout.video_run(video.shape[0]) for video in sample.videos]),
        }
        ids, expanded_labels, media_end = [], [] if labels is not None else None, 0
        for position, token in enumerate(text_ids):
            run = next(runs[token]) if token in runs else [token]
            ids += run
            if expanded_labels is not None:
                expanded_labels += [IGNORE_INDEX] * len(run) if token in runs else [labels[position]]
            if token in runs:
                media_end = len(ids)
        sample.input_ids, sample.labels = ids, expanded_labels
        return media_end

    def _part_text(self, part: Part, sample: ProcessedSample, tile: bool, where: str, root: Path | None) -> str:
        """A part as chat text; media are loaded into `sample` and stand as their token."""
        if part.kind == "text":
            return escape_runtime_tokens(part.value)
        try:
            if part.kind == "image":
                image = load_image(part.value, root, self.media_options)
                if "note" in image.info:
                    sample.notes.append(image.info["note"])
                items = self.image_items(image, tile)
                sample.images += items
                if self.config.image_aspect_ratio == "dynamic" and tile:
                    return (MEDIA_TOKENS["image"] + "\n") * len(items)
                return MEDIA_TOKENS["image"]
            frames = self.video_frames(part.value, root)
            self._check_video(frames.shape[0], part.value)
            sample.videos.append(frames)
            return MEDIA_TOKENS["video"]
        except MediaError as err:
            raise SampleError(f"{where}: {err}", kind=err.kind) from err

    def _check_video(self, frames: int, source: Any) -> None:
        try:
            self.layout.video_pools(frames)
        except ValueError as err:
            name = source if isinstance(source, (str, os.PathLike, VideoClip)) else "<frames list>"
            raise MediaError(f"{name}: {frames} frames decoded; {err}", kind="video_frames") from err

    def _fit(self, sample: ProcessedSample, media_end: int, truncate: bool, sample_id: str) -> None:
        """Check (and for training samples, cut) the length against `model_max_length`; a cut may not go through
        a media item's run (`media_end`: where the last one ends)."""
        if sample.length <= self.model_max_length:
            return
        need = f"{sample_id}: needs {sample.length} positions after media expansion, model_max_length is {self.model_max_length}"
        if not truncate:
            raise SampleError(need, kind="too_long")
        if media_end > self.model_max_length:
            raise SampleError(f"{need}; cutting it would go through a media item", kind="too_long")
        sample.input_ids = sample.input_ids[: self.model_max_length]
        sample.labels = sample.labels[: self.model_max_length] if sample.labels is not None else None
        if sample.labels is not None and all(label == IGNORE_INDEX for label in sample.labels):
            raise SampleError(f"{need}; after cutting, no answer token is left", kind="too_long")

    # ------------------------------------------------------------------ batches
    def collate(self, samples: list[ProcessedSample], padding_side: str = "right") -> BatchFeature:
        """Pad token ids (and labels) and concatenate the batch's media in reading order."""
        return padded_batch(samples, self.token_ids.pad, padding_side)

    def pack(self, rows: list[list[ProcessedSample]]) -> BatchFeature:
        """Training samples packed into rows (`nvila_ft.data.batching.packed_batch`)."""
        return packed_batch(rows, self.token_ids.pad)

    def __call__(
        self,
        conversations: Any,
        add_generation_prompt: bool = False,
        padding_side: str | None = None,
        return_labels: bool | None = None,
        truncate: bool = True,
    ) -> BatchFeature:
        """One conversation (a list of messages) or a batch of them -> model inputs.

        Prompts for generation (`add_generation_prompt=True`) are left-padded by default, training batches
        right-padded.
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        samples = [
            self.process(c, add_generation_prompt, return_labels, truncate, sample_id=f"sample {i}")
            for i, c in enumerate(conversations)
        ]
        return self.collate(samples, padding_side or ("left" if add_generation_prompt else "right"))

    def batch_decode(self, token_ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=skip_special_tokens)]

    def decode(self, token_ids: Any, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens).strip()


def _default_max_length(tokenizer: Any, config: NVILAConfig) -> int:
    """The tokenizer's `model_max_length` when it is a real limit, else the LLM config's."""
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**8:
        return value
    context = config.llm_context
    return context[1] if context else 4096
