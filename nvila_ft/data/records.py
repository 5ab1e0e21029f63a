"""One training/evaluation example, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """A conversation in chat-message form plus where it came from.

    `messages` follow the processor's format (`role` + `content` parts; media parts carry a path relative to
    `media_root`, a PIL image, raw bytes or a list of frames). `origin` names the file and the 0-based index
    of the record in it ("data/train.json[12]"), so that every error can point at it.
    """

    messages: list[dict[str, Any]]
    origin: str
    id: str | None = None
    media_root: str | None = None  # relative media paths resolve under it and may not leave it
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        """Text of the last assistant message (the reference for evaluation)."""
        for message in reversed(self.messages):
            if message.get("role") == "assistant":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return None

    @property
    def question(self) -> str:
        """Text of the message the answer replies to (the last one before the last assistant message)."""
        prompt = self.prompt()
        content = prompt[-1].get("content") if prompt else ""
        if isinstance(content, str):
            return content
        return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")

    @property
    def modality(self) -> str:
        """"video" when the record has a video, else "image" when it has an image, else "text"."""
        kinds = {
            part.get("type")
            for message in self.messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part, dict)
        }
        return "video" if "video" in kinds else "image" if "image" in kinds else "text"

    @property
    def question_type(self) -> str | None:
        """The record's question type when its data gives one (a `question_type` field or column)."""
        value = self.meta.get("question_type")
        return None if value is None else str(value)

    def prompt(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the last assistant message: what the model must answer."""
        last = max((i for i, m in enumerate(self.messages) if m.get("role") == "assistant"), default=len(self.messages))
        return self.messages[:last]

    @property
    def name(self) -> str:
        return f"{self.origin}" + (f" (id {self.id})" if self.id is not None else "")
