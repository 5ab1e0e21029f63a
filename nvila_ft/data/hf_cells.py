"""Cells and messages of Hugging Face rows -> the media and chat messages of a record."""

from __future__ import annotations

from typing import Any

from PIL import Image

from nvila_ft.data.kit import RecordProblem, describe_value
from nvila_ft.data.media import EncodedImage


def image_cell(value: Any, column: str) -> list[Any]:
    """An image cell -> list of sources the processor takes (PIL image, bytes or path)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, Image.Image) or (isinstance(item, str) and item):
            out.append(item)
        elif isinstance(item, (bytes, bytearray)):
            out.append(EncodedImage(item, f"column {column!r}"))
        elif isinstance(item, dict) and item.get("bytes") is not None:
            out.append(EncodedImage(item["bytes"], f"column {column!r}"))
        elif isinstance(item, dict) and item.get("path"):
            out.append(item["path"])
        elif item is None or item == "":
            continue
        else:
            raise RecordProblem(
                f"column {column!r}: expected images, paths or {{'bytes', 'path'}} dicts, got {describe_value(item)}"
            )
    return out


def video_cell(value: Any, column: str) -> list[Any]:
    """A video cell -> list of videos (each a path, or a list of frames)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and value.get("path"):
        return [value["path"]]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Image.Image) for v in value):
            return [list(value)]
        if all(isinstance(v, str) for v in value):
            return [v for v in value if v]
    raise RecordProblem(
        f"column {column!r}: expected a video path, a list of paths or a list of frames, got {describe_value(value)}"
    )


def is_placeholder(part: dict[str, Any]) -> bool:
    return all(part.get(key) is None for key in ("image", "path", "url"))


def clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """Copy a message, dropping the None fields Arrow adds when it unifies struct types across rows."""
    content = message.get("content")
    if isinstance(content, list):
        content = [
            {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part for part in content
        ]
    return {**{k: v for k, v in message.items() if v is not None}, "content": content}


def prepend_media(
    messages: list[dict[str, Any]], images: list[Any], videos: list[Any], column: str
) -> list[dict[str, Any]]:
    """Put media before the text of the first user message (images, then videos)."""
    media = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    for k, message in enumerate(messages):
        if message.get("role") in ("user", "human"):
            content = message.get("content")
            content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            return messages[:k] + [{**message, "content": media + content}] + messages[k + 1:]
    raise RecordProblem(f"column {column!r}: has media but no user message to attach them to")


