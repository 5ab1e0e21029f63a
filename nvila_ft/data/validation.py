"""Check a dataset before training: every record through the processor, every problem named at once.

`validate_records` runs each record exactly as training will (media loaded and decoded, chat rendered,
labels built, length after media expansion checked against `model_max_length`, nothing truncated), so a
run does not stop at step 3000 on a missing file. Problems are sorted into kinds, counted in `summary()`
and listed one per line with the record's origin ("train.json[12]") in `lines()`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nvila_ft.data.records import Record

KINDS = (
    "structure",  # the file or record is malformed (a missing field, a wrong type, not a conversation)
    "missing_media",  # a media path that does not exist
    "corrupt_media",  # media that exist but do not decode
    "unsupported_media",  # intact media not usable as given (a decoder package missing, a 4-D volume, image_frame=refuse)
    "video_frames",  # a video whose frame count the temporal pooling cannot divide (see num_video_frames)
    "unsafe_path",  # a media path that leaves the media root (absolute, `..`, a symlink out)
    "no_answer",  # nothing for the model to learn: no assistant turn, an empty answer
    "too_long",  # longer than model_max_length after media expansion
    "media_tag_mismatch",  # a LLaVA record whose <image>/<video> tags disagree with its media fields
    "other",
)

# How the processor's and the media loader's messages say what went wrong (nvila_ft/data/media.py and
# processor.py). Checked in this order against every message of the exception chain; tested in
# tests/test_validation.py so that a changed message shows up there.
_MESSAGE_KINDS = (
    ("unsafe_path", re.compile(r"escapes the media root")),
    ("missing_media", re.compile(r": not found\b")),
    ("too_long", re.compile(r"positions after media expansion, model_max_length is")),
    ("no_answer", re.compile(r"no assistant answer|no token is supervised|no answer token is left")),
    ("corrupt_media", re.compile(
        r"cannot decode image|decompression bomb|zero size|cannot open as a video|no decodable video"
        r"|frame directory is empty|no frames|frames decoded"
    )),
)


@dataclass
class BadRecord:
    """A record that cannot be trained on: where it is, why, and which kind of problem it is (see KINDS)."""

    origin: str
    reason: str
    kind: str

    def line(self) -> str:
        return f"{self.origin}: {self.kind}: {self.reason}"


@dataclass
class ValidationReport:
    total: int
    bad: list[BadRecord]
    good: list[Record]
    lengths: list[int]  # LLM positions of each good record after media expansion (text only if media unchecked)
    model_max_length: int | None = None
    media_checked: bool = True
    notes: Counter = field(default_factory=Counter)  # media conversions worth knowing ("... rescaled to 8 bits ...")

    @property
    def ok(self) -> bool:
        return not self.bad

    def counts(self) -> dict[str, int]:
        """Bad records per kind, in KINDS order, kinds with none left out."""
        counts = Counter(b.kind for b in self.bad)
        order = list(KINDS) + sorted(set(counts) - set(KINDS))
        return {kind: counts[kind] for kind in order if counts[kind]}

    def summary(self) -> str:
        text = f"{self.total} records: {self.total - len(self.bad)} ok, {len(self.bad)} bad"
        if self.bad:
            text += " (" + ", ".join(f"{n} {kind}" for kind, n in self.counts().items()) + ")"
        if self.lengths:
            text += f"; longest {max(self.lengths)} positions"
            if not self.media_checked:
                text += " without media"
            if self.model_max_length is not None:
                text += f" (model_max_length {self.model_max_length})"
        if not self.media_checked:
            text += "; media not checked"
        for note, count in sorted(self.notes.items()):
            text += f"; {count} x {note}"
        return text

    def why_empty(self, what: str) -> str:
        """Why no record is usable, in one line, e.g. "all 50 validation records are bad (50 missing_media);
        first: val.json[0]: missing_media: img/1.png: not found (looked for ... under the media root ...)"."""
        if not self.total:
            return f"the {what} data has no records"
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts().items())
        return f"all {self.total} {what} records are bad ({kinds}); first: {self.bad[0].line()}"

    def lines(self) -> list[str]:
        return [b.line() for b in self.bad]


def classify(error: BaseException) -> str:
    """The KINDS entry for an exception raised while processing a record.

    Looks through the `__cause__`/`__context__` chain: a `kind` attribute on any exception wins (so that
    structured kinds on SampleError/MediaError can replace message matching), then a ConversationError
    means a malformed conversation, then the messages are matched against what media.py/processor.py say;
    anything else (including a bug) is "other".
    """
    from nvila_ft.data.conversation import ConversationError  # deferred: it imports the tokenizer (transformers)

    chain = _chain(error)
    for err in chain:
        kind = getattr(err, "kind", None)
        if isinstance(kind, str) and kind in KINDS:
            return kind
    if any(isinstance(err, ConversationError) for err in chain):
        return "structure"
    for err in chain:
        message = str(err)
        for kind, pattern in _MESSAGE_KINDS:
            if pattern.search(message):
                return kind
    return "other"


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and not any(current is s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def media_tag_mismatch(record: Record) -> str | None:
    """Why a LLaVA record's tags disagree with its media, or None.

    Sources that read LLaVA records put {"image": n, "video": m} tag and media counts in `record.meta`
    ("media_tags", "media_counts"). Text with no tags at all is fine: the media go at the start, as in the
    official loader. Once the text has tags, each kind must have as many tags as media.
    """
    tags, media = record.meta.get("media_tags"), record.meta.get("media_counts")
    if not tags or not media or not sum(tags.values()):
        return None
    wrong = [
        f"{tags.get(kind, 0)} <{kind}> tag(s) for {media.get(kind, 0)} {kind}(s)"
        for kind in ("image", "video")
        if tags.get(kind, 0) != media.get(kind, 0)
    ]
    return "text has " + " and ".join(wrong) if wrong else None


def validate_records(
    records: list[Record],
    processor: Any,
    check_media: bool = True,
    progress: bool = False,
    description: str = "checking records",
) -> ValidationReport:
    """Run every record through `processor.process` as training would (no truncation) and report.

    check_media=False skips loading media (fast, e.g. for a first look at a large set): media parts are
    dropped, so the conversation, template, labels and tags are still checked, and lengths count text only.
    """
    from tqdm.auto import tqdm

    bad: list[BadRecord] = []
    good: list[Record] = []
    lengths: list[int] = []
    notes: Counter = Counter()
    # a progress bar on an interactive terminal only (None: tqdm's own check)
    for record in tqdm(records, desc=description, unit="record", disable=None if progress and records else True, leave=False):
        mismatch = media_tag_mismatch(record)
        if mismatch:
            bad.append(BadRecord(record.origin, mismatch, "media_tag_mismatch"))
            continue
        messages = record.messages if check_media else _without_media(record.messages)
        try:
            sample = processor.process(
                messages, with_labels=True, truncate=False, sample_id=record.name, media_root=record.media_root
            )
        except Exception as err:  # noqa: BLE001 - every failure is reported against its record, none stops the run
            bad.append(BadRecord(record.origin, failure_reason(err, record), classify(err)))
            continue
        good.append(record)
        lengths.append(sample.length)
        notes.update(sample.notes)
    return ValidationReport(
        total=len(records),
        bad=bad,
        good=good,
        lengths=lengths,
        model_max_length=getattr(processor, "model_max_length", None),
        media_checked=check_media,
        notes=notes,
    )


def validate_source(source: Any, processor: Any, check_media: bool = True, progress: bool = False) -> ValidationReport:
    """Read a source collecting malformed records instead of stopping, then validate what it read.

    The source's own structural errors (`source.errors`) are merged into the report, in file order.
    """
    on_error = getattr(source, "on_error", None)
    if on_error is not None:
        source.on_error = "collect"  # validation wants every problem, not the first
    try:
        records = source.records()
    finally:
        if on_error is not None:
            source.on_error = on_error
    report = validate_records(records, processor, check_media=check_media, progress=progress)
    structural = list(getattr(source, "errors", []))
    report.total += len(structural)
    report.bad = sorted(structural + report.bad, key=lambda b: _origin_key(b.origin))
    return report


def _origin_key(origin: str) -> tuple[str, int, str]:
    """Sort "file[12]" after "file[2]"."""
    match = re.fullmatch(r"(.*)\[(\d+)\]", origin)
    return (match.group(1), int(match.group(2)), "") if match else (origin, -1, origin)


def failure_reason(err: BaseException, record: Record) -> str:
    """The exception's message without the record name the processor prefixes (the origin says it)."""
    message = str(err)
    for prefix in (f"{record.name}: ", f"{record.name}, "):
        if message.startswith(prefix):
            return message[len(prefix):]
    if isinstance(err, ValueError):
        return message
    return f"{type(err).__name__}: {message}"


def _without_media(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = [p for p in content if not (isinstance(p, dict) and p.get("type") in ("image", "video"))]
            message = {**message, "content": content}
        out.append(message)
    return out


@dataclass
class TaskDataCheck:
    """The checked splits of a task ({"train": report, "validation": report}); `bad` lists the sources' structural
    problems, then each split's bad records."""

    reports: dict[str, ValidationReport]
    bad: list[BadRecord]

    @property
    def train(self) -> ValidationReport:
        return self.reports["train"]

    @property
    def validation(self) -> ValidationReport:
        return self.reports["validation"]

    def summaries(self) -> list[str]:
        return [f"{split}: {report.summary()}" for split, report in self.reports.items()]

    def text(self) -> str:
        """The data report: one line per bad record, then the summaries."""
        return "\n".join([b.line() for b in self.bad] + self.summaries()) + "\n"


def check_task_data(
    data: Any, processor: Any, progress: bool = False, splits: tuple[str, ...] = ("train", "validation")
) -> TaskDataCheck:
    """Validate the records of a task's splits (a `TaskData`), keeping the sources' own errors; every bad record of
    a file is listed in its order in the file, the sources' findings among the processor's."""
    reports = {
        split: validate_records(getattr(data, split), processor, progress=progress, description=f"checking {split}")
        for split in splits
    }
    bad = list(data.errors) + [b for r in reports.values() for b in r.bad]
    return TaskDataCheck(reports, sorted(bad, key=lambda b: _origin_key(b.origin)))
