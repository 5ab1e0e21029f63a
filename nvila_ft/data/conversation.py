"""Conversations as chat messages, and conversion from the LLaVA/NVILA JSON layout.

The processor takes the usual chat-message form:
    [{"role": "user", "content": [{"type": "image", "image": <PIL | path>}, {"type": "text", "text": "..."}]},
     {"role": "assistant", "content": "..."}]
`content` may be a plain string. Media parts may carry the source under "image"/"video", "path" or "url"
(local paths only). Videos may be a file, a folder of frames or a list of frames.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from nvila_ft.errors import UserError
from nvila_ft.model.tokenizer import MEDIA_TOKENS

logger = logging.getLogger(__name__)

ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
# Media tags that may appear inside text; the media themselves come from the record's media fields.
TEXT_MEDIA_TAGS = re.compile(r"<image>|<video>|<vila/video>")
LLAVA_MEDIA_TAGS = ("<image>", "<video>")


class ConversationError(UserError, ValueError):
    """A conversation that cannot be used; the message names the offending message and field."""


@dataclass
class Part:
    kind: str  # "text" | "image" | "video"
    value: Any


@dataclass
class Turn:
    role: str
    parts: list[Part]


def _media_source(item: dict[str, Any], kind: str, where: str) -> Any:
    for key in (kind, "path", "url", "frames"):
        if item.get(key) is not None:
            value = item[key]
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                raise ConversationError(f"{where}: remote media ({value}) is not fetched; download it and give a local path")
            return value
    raise ConversationError(f"{where}: a {kind!r} part needs the media under '{kind}' (or 'path')")


def normalize_messages(messages: Any) -> list[Turn]:
    """Check a conversation and turn it into roles + typed parts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("a conversation must be a non-empty list of messages")
    turns = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ConversationError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role", message.get("from"))
        if role not in ROLE_ALIASES:
            raise ConversationError(f"{where}: unknown role {role!r} (use user, assistant or system)")
        content = message.get("content", message.get("value"))
        if content is None:
            raise ConversationError(f"{where}: has no 'content'")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for k, item in enumerate(content):
            part_where = f"{where}, content[{k}]"
            if isinstance(item, str):
                item = {"type": "text", "text": item}
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise ConversationError(f"{part_where}: a text part needs a string under 'text'")
                # media tags in a question stand for media given as parts; in an answer they are text
                parts.append(Part("text", text if ROLE_ALIASES[role] == "assistant" else _strip_media_tags(text, part_where)))
            elif kind in ("image", "video"):
                parts.append(Part(kind, _media_source(item, kind, part_where)))
            else:
                raise ConversationError(f"{part_where}: unknown part type {kind!r} (use text, image or video)")
        turns.append(Turn(ROLE_ALIASES[role], parts))
    if ROLE_ALIASES[messages[0].get("role", messages[0].get("from"))] == "assistant":
        raise ConversationError("message 0: a conversation cannot start with an assistant message")
    return turns


def _strip_media_tags(text: str, where: str) -> str:
    tags = {t for t in MEDIA_TOKENS.values() if t in text}  # as the official code: <image>, <vila/video>
    if not tags:
        return text
    logger.warning("%s: media tag(s) %s in text removed; media are given as separate parts", where, sorted(tags))
    for tag in tags:
        text = text.replace(tag, "")
    return text.strip()


def llava_to_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, Any]]:
    """A LLaVA/NVILA JSON record -> chat messages, placing media as the official datasets do.

    Fields: `image` (path or list), `images`, `video`, `conversations` ([{"from": "human"|"gpt", "value": ...}]).
    `<image>`/`<video>` tags are removed from the questions (an answer keeps them: there they are text) and
    every medium is put at the start of the first human message, images before videos, with no separator.
    """
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError(f"{where}: 'conversations' must be a non-empty list")
    media: list[dict[str, Any]] = []
    for key, kind in (("image", "image"), ("images", "image"), ("video", "video"), ("videos", "video")):
        value = record.get(key)
        if value is None:
            continue
        for source in value if isinstance(value, list) else [value]:
            media.append({"type": kind, kind: source})
    messages, placed = [], False
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{where}: conversations[{index}] needs 'from' and 'value'")
        role = ROLE_ALIASES.get(turn["from"])
        if role is None:
            raise ConversationError(f"{where}: conversations[{index}].from = {turn['from']!r} (use human, gpt or system)")
        if not isinstance(turn["value"], str):
            raise ConversationError(f"{where}: conversations[{index}].value must be a string")
        # tags in a question stand for the record's media; in an answer they are text to learn
        text = turn["value"].strip() if role == "assistant" else remove_llava_media_tags(turn["value"])
        content: list[dict[str, Any]] = []
        if role == "user" and not placed:
            content, placed = list(media), True
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    if media and not placed:
        raise ConversationError(f"{where}: has media but no human turn to attach them to")
    return messages


def remove_llava_media_tags(text: str) -> str:
    """Drop `<image>`/`<video>` tags with an adjacent newline, as the official LLaVA dataset does."""
    for tag in LLAVA_MEDIA_TAGS:
        text = text.replace(tag + "\n", "").replace("\n" + tag, "").replace(tag, "")
    return text.strip()


def count_media_tags(record: dict[str, Any]) -> dict[str, int]:
    """How many `<image>` / `<video>` tags the questions of a LLaVA record contain (an answer's are text)."""
    counts = {"image": 0, "video": 0}
    for turn in record.get("conversations") or []:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str) and ROLE_ALIASES.get(turn.get("from")) != "assistant":
            counts["image"] += value.count("<image>")
            counts["video"] += value.count("<video>") + value.count("<vila/video>")
    return counts
