"""Generic scores for generated answers: each metric maps (predictions, references) to named floats.

Every metric takes two equally long, non-empty lists of strings (one reference per prediction) and returns
a dict; a metric that also takes `question_types` / `choices` (a domain's, such as the medical VQA ones, which
score closed, open and multiple-choice questions apart) gets them from `compute_metrics`. Scores lie in [0, 1],
except BLEU, which keeps sacrebleu's 0-100 scale so that numbers can be compared with published sacrebleu
results. The generic metrics are registered by name in `METRICS`; each domain pack adds its own
(`nvila_ft.domains.registry.METRICS` is the full table), task configs name them and `compute_metrics` combines
several.

Text normalisation (`normalize_answer`) follows SQuAD's evaluation script, with two deliberate differences:
punctuation is stripped from the ends of each word rather than removed everywhere, so "3.5" and "don't"
keep their meaning; and an answer made only of articles keeps them, so a multiple-choice answer "A" does
not normalise to the empty string (SQuAD would score "" and "A" as equal).
"""

from __future__ import annotations

import collections
import inspect
import unicodedata
from collections.abc import Callable, Mapping, Sequence

_ARTICLES = frozenset({"a", "an", "the"})

Metric = Callable[..., dict[str, float]]  # (predictions, references[, question_types=..., choices=...])


def _is_punctuation(char: str) -> bool:
    # Unicode P* categories cover ASCII .,;:!?'"()[]{}- as well as “”‘’«»…; symbols like $ % + are kept.
    return unicodedata.category(char).startswith("P")


def _strip_punctuation(word: str) -> str:
    start, end = 0, len(word)
    while start < end and _is_punctuation(word[start]):
        start += 1
    while end > start and _is_punctuation(word[end - 1]):
        end -= 1
    return word[start:end]


def answer_words(text: str, drop_articles: bool = True) -> list[str]:
    """Lower-cased words of `text` with surrounding punctuation stripped and (optionally) articles dropped.

    Words that are only punctuation vanish. Articles are dropped only when another word remains.
    """
    words = [w for w in (_strip_punctuation(w) for w in text.lower().split()) if w]
    if drop_articles:
        kept = [w for w in words if w not in _ARTICLES]
        if kept:
            words = kept
    return words


def normalize_answer(text: str, drop_articles: bool = True) -> str:
    """`answer_words` joined by single spaces: "  The Red  cat. " -> "red cat", "(B)" -> "b", "A" -> "a"."""
    return " ".join(answer_words(text, drop_articles))


def check_inputs(predictions: Sequence[str], references: Sequence[str]) -> None:
    """TypeError / ValueError unless predictions and references are equally long, non-empty lists of strings."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("cannot score an empty set of predictions (no examples were evaluated)")
    for name, texts in (("predictions", predictions), ("references", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{index}] is {type(text).__name__}, expected str")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fraction of predictions equal to their reference after `normalize_answer`."""
    check_inputs(predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return {"exact_match": hits / len(predictions)}


def closed_answer_correct(prediction: str, reference: str) -> bool:
    """Whether a free-form `prediction` picks `reference` out of a closed answer set.

    - Option letters: if the reference is a single letter once normalised ("A", "(A)", "a." -> "a"), the
      prediction is correct iff its first word, normalised with articles kept, is that letter: "B", "B.",
      "(B)", "(B) cat" all answer "B". (So "A cat" also answers "A"; free text is not expected here.)
    - Otherwise both are normalised (`normalize_answer`) and the prediction is correct iff its words equal
      the reference's words or begin with them: "Yes, it is." answers "yes", "red." answers "red",
      "top left corner" answers "top left", but "top" does not answer "top left". For a one-word
      reference this is "the prediction's first word equals the reference".
    """
    letter = normalize_answer(reference, drop_articles=False)
    if len(letter) == 1 and "a" <= letter <= "z":
        first = answer_words(prediction, drop_articles=False)[:1]
        return first == [letter]
    reference_words = answer_words(reference)
    return answer_words(prediction)[: len(reference_words)] == reference_words


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fraction of predictions that `closed_answer_correct` accepts: for yes/no, colour, side, option-letter
    and other closed questions, where a model may wrap the answer in a few extra words."""
    check_inputs(predictions, references)
    hits = sum(closed_answer_correct(p, r) for p, r in zip(predictions, references))
    return {"accuracy": hits / len(predictions)}


def pair_token_f1(prediction: str, reference: str, words: Callable[[str], list[str]] = answer_words) -> float:
    """SQuAD token F1 of one prediction against its reference, over the words `words` reads from each."""
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        # SQuAD's rule: two empty answers agree, one empty answer scores nothing.
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """SQuAD token F1 (bag of normalised words, counted with multiplicity), averaged over examples."""
    check_inputs(predictions, references)
    return {"token_f1": sum(pair_token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU from sacrebleu (13a tokenizer, 4-grams, exp smoothing), on sacrebleu's 0-100 scale.

    Text is scored as written (sacrebleu does its own tokenisation and is case-sensitive). A corpus with no
    4-gram at all scores 0 even when every answer is right, so use BLEU for captions, not short answers.
    """
    check_inputs(predictions, references)
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-L F-measure (longest common subsequence of words, Porter-stemmed), averaged over examples."""
    check_inputs(predictions, references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    return {"rouge_l": total / len(predictions)}


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "token_f1": token_f1,
    "bleu": bleu,
    "rouge_l": rouge_l,
}


def compute_metrics(
    names: Sequence[str] | str,
    predictions: Sequence[str],
    references: Sequence[str],
    question_types: Sequence[str | None] | None = None,
    choices: Sequence[Mapping[str, str] | None] | None = None,
    table: Mapping[str, Metric] = METRICS,
) -> dict[str, float]:
    """Run the named metrics of `table` (default: the generic ones) and merge their results, plus "count" (the
    number of examples).

    `question_types` and `choices` (one per example, e.g. each record's answer type and multiple-choice
    options) go to the metrics that take them (the medical VQA metrics); the others ignore them.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(table)}")
    check_inputs(predictions, references)
    context = {"question_types": question_types, "choices": choices}
    for key, values in context.items():
        if values is not None and len(values) != len(predictions):
            raise ValueError(f"got {len(values)} {key} for {len(predictions)} predictions; they must pair up")
    results: dict[str, float] = {}
    for name in names:
        metric = table[name]
        accepted = inspect.signature(metric).parameters
        results.update(metric(predictions, references, **{k: v for k, v in context.items() if k in accepted}))
    results["count"] = float(len(predictions))
    return results


def format_scores(scores: dict[str, float]) -> str:
    """"accuracy 0.9360, exact_match 0.9360, count 450" (counts as integers)."""
    return ", ".join(f"{k} {v:.0f}" if k == "count" else f"{k} {v:.4f}" for k, v in scores.items())
