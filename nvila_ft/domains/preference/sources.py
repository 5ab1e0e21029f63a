"""Preference data: a prompt with media, a chosen reply and a rejected one (for `nvila-ft dpo`).

A file is a JSON list (`.json`) or JSON Lines (`.jsonl`) of records in either layout:

    LLaVA style   {"id": "p-1", "image": "img/1.png",            # or "images", "video", "videos", as in LLaVA JSON
                   "conversations": [{"from": "human", "value": "<image>\\nIs there a lesion?"}],
                   "chosen": "yes", "rejected": "no"}
    prompt style  {"id": "p-1", "image": "img/1.png", "prompt": "<image>\\nIs there a lesion?",
                   "chosen": "yes", "rejected": "no"}

`conversations` may hold earlier turns (human, gpt, ...) but must end with a human turn: the two replies answer
it. In the prompt style `prompt` is a string (one human turn) or chat messages ({"role", "content"} with string
content), and `chosen` / `rejected` may also be one assistant message ([{"role": "assistant", "content": ...}]).
Media paths are relative to `media_root` (default: the file's folder) and never leave it.

Each record becomes a `Record` whose conversation ends with the chosen reply (so evaluation, export probes and
`validate-data` treat it as the reference answer) and whose `meta["rejected"]` holds the rejected one. A record
without a prompt or a reply, with an empty reply, or whose replies are the same, is reported with its file, index
and field (`on_error="raise"` stops at the first; `collect` keeps the others and lists it in `errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvila_ft.data.kit import RecordProblem, describe_value, json_file_records, resolve_media_root
from nvila_ft.data.llava import LlavaJson, llava_record
from nvila_ft.data.records import Record

REJECTED = "rejected"  # the Record.meta key of the rejected reply


class PreferenceJson(LlavaJson):
    """Preference records from a JSON / JSON Lines file (layouts in the module docstring); settings as LlavaJson's."""

    def records(self) -> list[Record]:
        self.errors = []
        root = resolve_media_root(self.media_root, Path(self.path).parent)
        return json_file_records(self, Path(self.path), self.path, lambda entry, origin, _: preference_record(entry, origin, root))


def preference_record(entry: Any, origin: str, media_root: str) -> Record:
    """One preference entry (either layout) -> a Record ending with the chosen reply, the rejected one in meta."""
    if not isinstance(entry, dict):
        raise RecordProblem(f"expected a dict (a preference record), got {type(entry).__name__}")
    chosen, rejected = _reply(entry, "chosen"), _reply(entry, "rejected")
    if chosen == rejected:
        raise RecordProblem(f"field 'rejected': the same reply as 'chosen' ({chosen[:60]!r}); nothing to prefer")
    conversations = _prompt_turns(entry)
    llava = {k: v for k, v in entry.items() if k not in ("prompt", "chosen", "rejected")}
    llava["conversations"] = conversations + [{"from": "gpt", "value": chosen}]
    record = llava_record(llava, origin, media_root)
    record.meta[REJECTED] = rejected
    return record


def rejected_messages(record: Record) -> list[dict[str, Any]]:
    """The record's conversation with the rejected reply in place of the chosen one."""
    return record.prompt() + [{"role": "assistant", "content": [{"type": "text", "text": record.meta[REJECTED]}]}]


def _reply(entry: dict[str, Any], field: str) -> str:
    if field not in entry:
        raise RecordProblem(f"field {field!r}: missing (a preference record needs 'chosen' and 'rejected')", kind="no_answer")
    value = entry[field]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise RecordProblem(f"field {field!r}: expected a string (the reply), got {describe_value(value)}")
    if not value.strip():
        raise RecordProblem(f"field {field!r}: empty reply", kind="no_answer")
    return value.strip()


def _prompt_turns(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The LLaVA turns the replies answer: `conversations`, or `prompt` (a string or chat messages)."""
    if "conversations" in entry and "prompt" in entry:
        raise RecordProblem("fields 'conversations' and 'prompt': give one of them, not both")
    if "conversations" in entry:
        turns = entry["conversations"]
        field = "conversations"
    elif "prompt" in entry:
        turns = _prompt_as_turns(entry["prompt"])
        field = "prompt"
    else:
        raise RecordProblem("field 'conversations' (or 'prompt'): missing; the record has no question")
    if not isinstance(turns, list) or not turns:
        raise RecordProblem(f"field {field!r}: expected a non-empty list of turns, got {describe_value(turns)}")
    last = turns[-1]
    if not isinstance(last, dict) or last.get("from") not in ("human", "user"):
        raise RecordProblem(f"field {field!r}: must end with a human turn (the replies go in 'chosen' and 'rejected')")
    return turns


def _prompt_as_turns(prompt: Any) -> Any:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordProblem("field 'prompt': empty")
        return [{"from": "human", "value": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        turns = []
        for index, message in enumerate(prompt):
            if not isinstance(message.get("content"), str):
                raise RecordProblem(f"field 'prompt[{index}].content': expected a string")
            turns.append({"from": message["role"], "value": message["content"]})
        return turns
    return prompt  # reported by the caller as not a list of turns
