"""The checkpoint's tokenizer plus NVILA's runtime tokens.

NVILA adds three tokens at load time, in this order, after the on-disk vocabulary: `<vila/sentinel>`
(used to find assistant replies when masking labels), `<image>` and `<vila/video>`. Their ids are
>= the LLM's `vocab_size`; they never reach the embedding table (see `NVILAForConditionalGeneration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

SENTINEL_TOKEN = "<vila/sentinel>"
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}
IGNORE_INDEX = -100

# A conversation long enough to show every token that follows an assistant reply (official stop-token rule).
_DUMMY_CONVERSATION = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}] * 10


@dataclass(frozen=True)
class TokenIds:
    """Ids the model and processor need, computed from the tokenizer at runtime."""

    image: int
    video: int
    sentinel: int
    pad: int
    eos: int
    stop: tuple[int, ...]

    @property
    def media(self) -> dict[int, str]:
        return {self.image: "image", self.video: "video"}


def chat_template_by_name(name: str) -> str:
    """Chat templates a config may name in `chat_template` (the official loader reads them from its package)."""
    from nvila_ft.model.tiny_tokenizer import QWEN2_CHAT_TEMPLATE

    templates = {"qwen2": QWEN2_CHAT_TEMPLATE}
    if name not in templates:
        raise ValueError(f"config.json: `chat_template` = {name!r} is not a known template ({', '.join(templates)})")
    return templates[name]


def load_tokenizer(llm_dir: str | Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer from `llm/`, right-padded, with NVILA's runtime tokens added."""
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), padding_side="right", local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template_by_name(chat_template)
    if not tokenizer.chat_template:
        raise ValueError(f"{llm_dir}: the tokenizer has no chat template and config.json names none")
    add_runtime_tokens(tokenizer)
    return tokenizer


def add_runtime_tokens(tokenizer: PreTrainedTokenizerBase) -> TokenIds:
    """Add sentinel, image and video tokens (idempotent) and return the ids NVILA uses."""
    for token in (SENTINEL_TOKEN, *MEDIA_TOKENS.values()):
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([token], special_tokens=True)
    return token_ids(tokenizer)


def token_ids(tokenizer: PreTrainedTokenizerBase) -> TokenIds:
    ids = tokenizer.convert_tokens_to_ids
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenIds(
        image=ids(MEDIA_TOKENS["image"]),
        video=ids(MEDIA_TOKENS["video"]),
        sentinel=ids(SENTINEL_TOKEN),
        pad=pad,
        eos=tokenizer.eos_token_id,
        stop=tuple(stop_token_ids(tokenizer)),
    )


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain tokenisation, as the official code does (Qwen2 adds no BOS/EOS)."""
    return list(tokenizer(text).input_ids)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos plus every token the chat template puts right after an assistant reply."""
    sentinel = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    template = [{**m, "content": SENTINEL_TOKEN} if m["role"] == "assistant" else m for m in _DUMMY_CONVERSATION]
    ids = encode(tokenizer, render(tokenizer, template))
    stops = {tokenizer.eos_token_id}
    stops.update(ids[k + 1] for k in range(len(ids) - 1) if ids[k] == sentinel)
    return sorted(stops)


def supervised_labels(tokenizer: PreTrainedTokenizerBase, messages: list[dict], input_ids: list[int]) -> list[int]:
    """Labels for a rendered conversation: assistant replies and the token closing each reply are supervised.

    The official rule: render the same conversation with every reply replaced by the sentinel, drop each
    sentinel and the token after it, then walk `input_ids` greedily; tokens that do not match the template
    are the replies. If the template is not consumed, retry also dropping the token before each sentinel;
    if that fails too, nothing is supervised.
    """
    template_messages = [{**m, "content": SENTINEL_TOKEN} if m["role"] == "assistant" else m for m in messages]
    template = encode(tokenizer, render(tokenizer, template_messages))
    sentinel = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    for drop_previous in (False, True):
        keep = [True] * len(template)
        for k in range(len(template) - 1):
            if template[k] == sentinel:
                keep[k] = keep[k + 1] = False
                if drop_previous and k > 0:
                    keep[k - 1] = False
        kept = [t for t, flag in zip(template, keep) if flag]
        labels, p = [], 0
        for token in input_ids:
            if p < len(kept) and token == kept[p]:
                p += 1
                labels.append(IGNORE_INDEX)
            else:
                labels.append(token)
        if p == len(kept):
            return labels
    return [IGNORE_INDEX] * len(input_ids)
