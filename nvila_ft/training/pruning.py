"""DeltaLoss data pruning (NVILA, arXiv 2412.04468, Sec. 2.2 "Dataset pruning"): score each training record by how
much more likely a stronger model finds its answer than a weaker one, and keep the best-scored share of each source.

The paper's score of a sample x with answer tokens x_1..x_K, under a large model and a small one, is

    DeltaLoss(x) = 1/K * sum_i log( p_large(x_i) / p_small(x_i) )

and it keeps the top-K samples of each sub-dataset D_k of the SFT mixture (half of them in its study). Its reading:
both models right, or both wrong, gives a score near 0 (too easy / too hard); the small model right and the large one
wrong gives a negative score (a distracting sample); the large right and the small wrong, a positive one (what the
stronger model learnt and the weaker has not). (Written from the paper; its text was not at hand offline, so the
notation may differ from it, the quantity does not.)

Here p(x_i) is the probability a model gives the i-th supervised token of the record (the processor's labels:
assistant replies and their closing token; -100 elsewhere), conditioned on everything before it, image included:
    loss_m   = -1/K * sum_i log p_m(x_i)        (the per-token loss of model m, m in {strong, weak})
    delta    = loss_weak - loss_strong = 1/K * sum_i (log p_strong(x_i) - log p_weak(x_i))   (the DeltaLoss)
With models of different tokenizers K differs per model and each loss is the model's own mean.

Selection (`PruneRule.select`), per record, in this order:
    unusable  a model could not process it (media missing, too long, ...): dropped;
    trivial   loss_strong < trivial_loss and loss_weak < trivial_loss (both already right): dropped;
    harmful   delta < -harmful_margin (the stronger model markedly worse than the weaker): dropped;
    then, per source, the remaining records by delta, highest first, up to the source's budget
    round(keep_fraction * records of the source) (half up, at least 1): kept ("top_delta"), the rest dropped
    ("below_cut"). Trivial and harmful records never fill the budget, so a source keeps fewer when too few remain.
    Ties keep the earlier record.
A record's source (`by`), the paper's sub-dataset D_k: "auto" (default) "file_type_answer" where a file's question
type has a small closed answer set (at most CLOSED_ANSWERS distinct answers, each given by CLOSED_SHARE records on
average), else "file_and_type"; "file_and_type" its data file (the origin without
"[index]": each file of a mixture is its own sub-dataset) and, when the record has one, its question type (a
`question_type` field or column) within that file; "file" the file alone; "question_type" the question type across
files (records without one: their file); "file_type_answer" file, question type and reference answer: for tasks
with a small closed answer set (yes/no, left/right), where a weak model's answer prior shifts the delta of every
record of one answer alike, and per-source selection would keep mostly one answer (each stratum keeps at least one
record, so free-text answers are hardly pruned); "none" the whole set at once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from nvila_ft.data.processor import SampleError
from nvila_ft.data.records import Record
from nvila_ft.model.tokenizer import IGNORE_INDEX
from nvila_ft.training.config import ConfigError

SOURCE_KEYS = ("auto", "file_and_type", "file", "question_type", "file_type_answer", "none")
CLOSED_ANSWERS = 20  # "auto": a stratum with at most this many distinct answers ...
CLOSED_SHARE = 5     # ... and at least this many records per distinct answer is a closed answer set


@dataclass(frozen=True)
class TokenLoss:
    """A record's supervised tokens under one model: how many, and the mean negative log-likelihood (nats)."""

    tokens: int
    loss: float


@torch.no_grad()
def answer_losses(
    model: Any, processor: Any, records: list[Record], batch_size: int = 8, progress: bool = False
) -> list[TokenLoss | str]:
    """Per record, the mean negative log-likelihood of its supervised tokens (the processor's labels), from the
    model's logits in batches; a record the processor cannot turn into a sample gets the error's message instead."""
    from tqdm import tqdm

    results: list[TokenLoss | str] = [""] * len(records)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(records), batch_size), desc="scoring", disable=not progress or None, leave=False):
            chunk = []  # samples are made batch by batch: the media of one batch in memory at a time
            for index in range(start, min(start + batch_size, len(records))):
                record = records[index]
                try:
                    chunk.append((index, processor.process(record.messages, sample_id=record.name, media_root=record.media_root)))
                except SampleError as err:
                    results[index] = str(err)
            if not chunk:
                continue
            batch = processor.collate([sample for _, sample in chunk], padding_side="right")
            labels = batch.pop("labels")
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(**batch, use_cache=False).logits
            for row, (index, _) in enumerate(chunk):
                loss = _token_loss(logits[row], labels[row].to(logits.device))
                results[index] = loss if loss.tokens else "no supervised answer token left (answer empty or cut off)"
    finally:
        model.train(was_training)
    return results


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> TokenLoss:
    """Position t predicts token t+1: the log-softmax rows of the supervised targets only (not the vocabulary at
    every position), in float32."""
    targets = labels[1:]
    supervised = targets != IGNORE_INDEX
    rows = logits[:-1][supervised].float().log_softmax(-1)
    picked = rows.gather(1, targets[supervised].unsqueeze(1)).squeeze(1)
    count = int(supervised.sum())
    return TokenLoss(count, float(-picked.mean()) if count else math.nan)


@dataclass
class RecordScore:
    """One record's scores and the decision taken on it (`reason`: top_delta, below_cut, trivial, harmful, unusable)."""

    origin: str
    id: str | None
    source: str
    strong: TokenLoss | None
    weak: TokenLoss | None
    problem: str | None = None
    kept: bool = False
    reason: str = ""

    @property
    def delta(self) -> float | None:
        """loss_weak - loss_strong: the mean over answer tokens of log p_strong - log p_weak."""
        if self.strong is None or self.weak is None:
            return None
        return self.weak.loss - self.strong.loss

    def row(self) -> dict[str, Any]:
        return {
            "origin": self.origin, "id": self.id, "source": self.source,
            "strong_loss": None if self.strong is None else self.strong.loss,
            "weak_loss": None if self.weak is None else self.weak.loss,
            "tokens": None if self.strong is None else self.strong.tokens,
            "delta": self.delta, "decision": "kept" if self.kept else "dropped", "reason": self.reason,
            **({"problem": self.problem} if self.problem else {}),
        }


def record_source(record: Record, by: str) -> str:
    """The sub-dataset a record is pruned within (see the module docstring)."""
    file = record.origin.rpartition("[")[0] or record.origin
    if by == "file":
        return file
    if by in ("file_and_type", "file_type_answer"):
        source = f"{file} / {record.question_type}" if record.question_type else file
        return source if by == "file_and_type" else f"{source} / answer {record.answer!r}"
    if by == "question_type":
        return record.question_type or file
    return "all"


def record_sources(records: list[Record], by: str) -> list[str]:
    """Each record's source; "auto" decides per file and question type whether its answers are a closed set."""
    if by != "auto":
        return [record_source(r, by) for r in records]
    strata = [record_source(r, "file_and_type") for r in records]
    answers: dict[str, set[str]] = {}
    for stratum, record in zip(strata, records):
        answers.setdefault(stratum, set()).add(record.answer or "")
    sizes = Counter(strata)
    closed = {s for s, a in answers.items() if len(a) <= CLOSED_ANSWERS and len(a) * CLOSED_SHARE <= sizes[s]}
    return [record_source(r, "file_type_answer") if s in closed else s for s, r in zip(strata, records)]


def scores_for(records: list[Record], strong: list[TokenLoss | str], weak: list[TokenLoss | str], by: str) -> list[RecordScore]:
    """RecordScores from the two models' answer_losses (same records, same order)."""
    out = []
    sources = record_sources(records, by)
    for record, s, w, source in zip(records, strong, weak, sources, strict=True):
        problems = [f"{name} model: {r}" for name, r in (("strong", s), ("weak", w)) if isinstance(r, str)]
        out.append(RecordScore(
            record.origin, record.id, source,
            s if isinstance(s, TokenLoss) else None, w if isinstance(w, TokenLoss) else None,
            "; ".join(problems) or None,
        ))
    return out


@dataclass
class PruneRule:
    """keep_fraction: share of each source's records kept, in (0, 1]; trivial_loss: per-token loss (nats) under which
    a record is trivial when both models are under it; harmful_margin: how far (nats per token) the strong model's
    loss may exceed the weak one's before the record is dropped as harmful; by: what a source is
    (auto, file_and_type, file, question_type, file_type_answer, none)."""

    keep_fraction: float = 0.5
    trivial_loss: float = 0.05
    harmful_margin: float = 0.2
    by: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.keep_fraction, bool) or not isinstance(self.keep_fraction, (int, float)) \
                or not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"prune.keep_fraction = {self.keep_fraction!r}: the share of each source kept, in (0, 1]")
        if not isinstance(self.trivial_loss, (int, float)) or self.trivial_loss < 0:
            raise ConfigError(f"prune.trivial_loss = {self.trivial_loss!r}: a per-token loss in nats, >= 0 (0: none is trivial)")
        if not isinstance(self.harmful_margin, (int, float)) or self.harmful_margin < 0:
            raise ConfigError(f"prune.harmful_margin = {self.harmful_margin!r}: nats per token, >= 0")
        if self.by not in SOURCE_KEYS:
            raise ConfigError(f"prune.by = {self.by!r}: one of {', '.join(SOURCE_KEYS)}")

    def budget(self, records: int) -> int:
        """Records kept of a source of `records`: keep_fraction of them, rounded half up, at least 1."""
        return max(1, math.floor(self.keep_fraction * records + 0.5)) if records else 0

    def select(self, scores: list[RecordScore]) -> list[RecordScore]:
        """Set `kept` and `reason` on every score (in place) and return them."""
        by_source: dict[str, list[RecordScore]] = {}
        for score in scores:
            by_source.setdefault(score.source, []).append(score)
            score.kept, score.reason = False, ""
            if score.delta is None:
                score.reason = "unusable"
            elif score.strong.loss < self.trivial_loss and score.weak.loss < self.trivial_loss:
                score.reason = "trivial"
            elif score.delta < -self.harmful_margin:
                score.reason = "harmful"
        for members in by_source.values():
            candidates = [s for s in members if not s.reason]
            ranked = sorted(range(len(candidates)), key=lambda i: (-candidates[i].delta, i))  # stable: earlier first
            keep = set(ranked[: self.budget(len(members))])
            for i, score in enumerate(candidates):
                score.kept, score.reason = (True, "top_delta") if i in keep else (False, "below_cut")
        return scores
