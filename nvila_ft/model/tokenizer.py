"""The checkpoint's tokenizer plus NVILA's runtime tokens.

NVILA adds three tokens at load time, in this order, after the on-disk vocabulary: `<vila/sentinel>`
(used to find assistant replies when masking labels), `<image>` and `<vila/video>`. Their ids are
>= the LLM's `vocab_size`; they never reach the embedding table (see `NVILAForConditionalGeneration`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nvila_ft.model.config import CheckpointError

SENTINEL_TOKEN = "<vila/sentinel>"
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}
RUNTIME_TOKENS = (SENTINEL_TOKEN, *MEDIA_TOKENS.values())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")  # one of them: a tokenizer to load
IGNORE_INDEX = -100
# A runtime token's string written in a message's text ("<image>" in an answer about HTML) is text, not a
# placeholder: `escape_runtime_tokens` marks it with private-use characters and `encode` turns it into the ids
# of its characters. The markers split the text exactly where the added token would have split it.
_LITERAL_MARKERS = {token: f"\ue000{index}\ue001" for index, token in enumerate(RUNTIME_TOKENS)}
_MARKER_PATTERN = re.compile("(\ue000\\d\ue001)")

# Renders like VILA's qwen2.jinja after its whitespace stripping; written on one line so that rendering adds no
# stray whitespace. The default system prompt has no trailing period, unlike Qwen2's stock template. The
# `is defined` test is ours: transformers 5 drops None-valued keys before rendering, so a message whose content
# was None arrives without `content`, and must be skipped as VILA skips it.
QWEN2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages if message['content'] is defined and message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

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
    templates = {"qwen2": QWEN2_CHAT_TEMPLATE}
    if name not in templates:
        raise CheckpointError(f"config.json: `chat_template` = {name!r} is not a known template ({', '.join(templates)})")
    return templates[name]


def load_tokenizer(llm_dir: str | Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer from `llm/`, right-padded, with NVILA's runtime tokens added."""
    if not any((Path(llm_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{llm_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); an NVILA checkpoint keeps "
                              "its tokenizer in llm/")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), padding_side="right", local_files_only=True)
    except (OSError, ValueError) as err:  # no tokenizer files, or unreadable ones
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{llm_dir}: no tokenizer could be loaded ({first}); an NVILA checkpoint keeps its tokenizer "
                              "files in llm/") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template_by_name(chat_template)
    if not tokenizer.chat_template:
        raise CheckpointError(f"{llm_dir}: the tokenizer has no chat template and config.json names none")
    add_runtime_tokens(tokenizer)
    return tokenizer


def add_runtime_tokens(tokenizer: PreTrainedTokenizerBase) -> TokenIds:
    """Add sentinel, image and video tokens (idempotent) and return the ids NVILA uses."""
    for token in RUNTIME_TOKENS:
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


def escape_runtime_tokens(text: str) -> str:
    """Mark runtime-token strings written in text so that `encode` keeps them as text."""
    for token, marker in _LITERAL_MARKERS.items():
        text = text.replace(token, marker)
    return text


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain tokenisation, as the official code does (Qwen2 adds no BOS/EOS); escaped runtime-token strings
    (see `escape_runtime_tokens`) become the ids of their characters."""
    if "\ue000" not in text:
        return list(tokenizer(text, verbose=False).input_ids)  # length is checked after media expansion, not here
    literal = {marker: token for token, marker in _LITERAL_MARKERS.items()}
    ids: list[int] = []
    for piece in _MARKER_PATTERN.split(text):
        if piece in literal:
            ids += tokenizer(literal[piece], split_special_tokens=True, verbose=False).input_ids
        elif piece:
            ids += tokenizer(piece, verbose=False).input_ids
    return ids


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos plus every token the chat template puts right after an assistant reply."""
    sentinel = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    ids = _sentinel_template(tokenizer, _DUMMY_CONVERSATION)
    stops = {tokenizer.eos_token_id}
    stops.update(ids[k + 1] for k in range(len(ids) - 1) if ids[k] == sentinel)
    return sorted(stops)


def _sentinel_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The conversation tokenised with every assistant reply replaced by the sentinel token."""
    template = [{**m, "content": SENTINEL_TOKEN} if m["role"] == "assistant" else m for m in messages]
    return encode(tokenizer, render(tokenizer, template))


def supervised_labels(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], input_ids: list[int], official_matching: bool = False
) -> list[int]:
    """Labels for a rendered conversation: every assistant reply and the token closing it are supervised.

    The template (replies replaced by the sentinel) splits into fixed segments around each reply; the reply is
    what lies between one segment and the next in `input_ids` (the token that closes the reply, `<|im_end|>`,
    is dropped from the template, so it falls inside the reply span).

    official_matching=True reproduces the official greedy matcher token for token. It walks `input_ids` and
    skips every token equal to the next template token, so a standalone "\n" token inside a multi-line reply
    is left unsupervised and the "\n" after that reply's `<|im_end|>` is supervised instead; the default
    supervises exactly the replies and their closing tokens.
    """
    template = _sentinel_template(tokenizer, messages)
    sentinel = tokenizer.convert_tokens_to_ids(SENTINEL_TOKEN)
    if official_matching:
        return _official_greedy_labels(template, sentinel, input_ids)
    segments, current, k = [], [], 0
    while k < len(template):
        if template[k] == sentinel:
            segments.append(current)
            current, k = [], k + 2  # the sentinel and the closing token it stands before
        else:
            current.append(template[k])
            k += 1
    segments.append(current)
    labels, position = [IGNORE_INDEX] * len(input_ids), 0
    for index, segment in enumerate(segments):
        if input_ids[position : position + len(segment)] != segment:
            return _official_greedy_labels(template, sentinel, input_ids)  # unusual template: fall back
        position += len(segment)
        if index == len(segments) - 1:
            break
        following = segments[index + 1]
        end = _find(input_ids, following, position, last=index + 1 == len(segments) - 1)
        if end is None:
            return _official_greedy_labels(template, sentinel, input_ids)
        labels[position:end] = input_ids[position:end]
        position = end
    return labels if position == len(input_ids) else _official_greedy_labels(template, sentinel, input_ids)


def _find(tokens: list[int], segment: list[int], start: int, last: bool) -> int | None:
    """Start of `segment` in tokens[start:]; the last segment must end the sequence."""
    if last:
        begin = len(tokens) - len(segment)
        return begin if begin >= start and tokens[begin:] == segment else None
    for begin in range(start, len(tokens) - len(segment) + 1):
        if tokens[begin : begin + len(segment)] == segment:
            return begin
    return None


def _official_greedy_labels(template: list[int], sentinel: int, input_ids: list[int]) -> list[int]:
    """The official `preprocess_conversation` matcher (with its retry dropping the token before each sentinel)."""
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
