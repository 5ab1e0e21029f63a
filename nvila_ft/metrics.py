"""Scores for generated answers: each metric maps (predictions, references) to named floats.

Every metric takes two equally long, non-empty lists of strings (one reference per prediction) and returns
a dict; metrics that also take `question_types` / `choices` (the medical VQA ones at the end, which score
closed, open and multiple-choice questions apart) get them from `compute_metrics`. Scores lie in [0, 1],
except BLEU, which keeps sacrebleu's 0-100 scale so that numbers can be compared with published sacrebleu
results. Metrics are registered by name in `METRICS`; task configs name
them and `compute_metrics` combines several.

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


def _check_inputs(predictions: Sequence[str], references: Sequence[str]) -> None:
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
    _check_inputs(predictions, references)
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
    _check_inputs(predictions, references)
    hits = sum(closed_answer_correct(p, r) for p, r in zip(predictions, references))
    return {"accuracy": hits / len(predictions)}


def _token_f1(prediction: str, reference: str, words: Callable[[str], list[str]] = answer_words) -> float:
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
    _check_inputs(predictions, references)
    return {"token_f1": sum(_token_f1(p, r) for p, r in zip(predictions, references)) / len(predictions)}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU from sacrebleu (13a tokenizer, 4-grams, exp smoothing), on sacrebleu's 0-100 scale.

    Text is scored as written (sacrebleu does its own tokenisation and is case-sensitive). A corpus with no
    4-gram at all scores 0 even when every answer is right, so use BLEU for captions, not short answers.
    """
    _check_inputs(predictions, references)
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-L F-measure (longest common subsequence of words, Porter-stemmed), averaged over examples."""
    _check_inputs(predictions, references)
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
) -> dict[str, float]:
    """Run the named metrics from `METRICS` and merge their results, plus "count" (the number of examples).

    `question_types` and `choices` (one per example, e.g. each record's answer type and multiple-choice
    options) go to the metrics that take them (the medical VQA metrics); the others ignore them.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    _check_inputs(predictions, references)
    context = {"question_types": question_types, "choices": choices}
    for key, values in context.items():
        if values is not None and len(values) != len(predictions):
            raise ValueError(f"got {len(values)} {key} for {len(predictions)} predictions; they must pair up")
    results: dict[str, float] = {}
    for name in names:
        metric = METRICS[name]
        accepted = inspect.signature(metric).parameters
        results.update(metric(predictions, references, **{k: v for k, v in context.items() if k in accepted}))
    results["count"] = float(len(predictions))
    return results


def format_scores(scores: dict[str, float]) -> str:
    """"accuracy 0.9360, exact_match 0.9360, count 450" (counts as integers)."""
    return ", ".join(f"{k} {v:.0f}" if k == "count" else f"{k} {v:.4f}" for k, v in scores.items())


# ----------------------------------------------------------------------------------------------- medical VQA
# Medical VQA papers (LLaVA-Med, Med-Flamingo, PMC-VQA) report closed questions by accuracy, open ones by the
# recall of the reference's words in the answer, and multiple choice by accuracy, each over its own questions.
# Against LLaVA-Med's scorer (microsoft/LLaVA-Med llava/eval/run_eval.py, eval_metrics/glossary.py):
# - open recall: the same normalisation of what matters for short answers (lower case, articles dropped, "-" and
#   "/" split words: "x-ray" = "x ray", number words zero..ten read as digits: "two" = "2", `medical_words`).
#   One deliberate difference: a word repeated in the prediction is counted at most as often as the reference
#   has it (LLaVA-Med counts the prediction's repeats, so "lung lung" recalls 2/3 of "left lung"; here 1/2).
# - closed accuracy: LLaVA-Med tests substrings: a prediction containing 'yes' or 'no' scores 1 when it contains
#   the reference and is left out of the count when it does not; any other prediction scores 0. So "nodule"
#   answers "no", "no, yes" answers both, wrong yes/no answers vanish from the denominator and a right "left"
#   scores 0. nvila-ft deliberately judges the prediction's first word (`medical_closed_correct`) and counts
#   every closed question once.
# Each example's answer type comes from `question_types` (the records' meta "question_type": VQA-RAD and
# SLAKE's answer_type); an unknown or missing type is inferred from the reference: a yes/no answer is
# "closed" (a one-word answer of YES_WORDS / NO_WORDS, so also "absent"), a single option letter "choice", anything
# else "open". (MedicalVQA's pathvqa layout sets PathVQA's own, stricter rule: exactly yes or no.)

# Words that answer a yes/no question, judged by the answer's first word. "present"/"absent" and
# "positive"/"negative" are how radiology and pathology reports say yes and no ("Is there a mass?" "Present.").
# "normal"/"abnormal" are not synonyms: whether "normal" means yes depends on the question.
YES_WORDS = frozenset({"yes", "y", "true", "correct", "present", "positive"})
NO_WORDS = frozenset({"no", "n", "false", "incorrect", "absent", "negative"})
_NEGATIONS = frozenset({"not"})  # "not seen", "not present": a no when it starts a prediction

ANSWER_TYPES = ("closed", "open", "choice")
_ANSWER_TYPE_ALIASES = {
    "closed": "closed", "close": "closed", "yes/no": "closed", "yes_no": "closed", "yesno": "closed",
    "binary": "closed", "open": "open", "other": "open", "choice": "choice", "multiple_choice": "choice",
    "multiple-choice": "choice", "mc": "choice",
}


def yes_no(text: str) -> str | None:
    """"yes" or "no" when the answer's first word is one of `YES_WORDS` / `NO_WORDS` (or "not"), else None:
    "Yes, there is." -> "yes", "Absent" -> "no", "not seen" -> "no", "left lung" -> None."""
    words = answer_words(text, drop_articles=False)
    if not words:
        return None
    if words[0] in YES_WORDS:
        return "yes"
    if words[0] in NO_WORDS or words[0] in _NEGATIONS:
        return "no"
    return None


def _reference_yes_no(reference: str) -> str | None:
    """The polarity of a reference that is exactly one yes/no word ("Yes", "absent."), else None."""
    words = answer_words(reference, drop_articles=False)
    return yes_no(reference) if len(words) == 1 and words[0] not in _NEGATIONS else None


def answer_type(question_type: str | None, reference: str) -> str:
    """"closed", "open" or "choice": the named type (case-insensitive, with aliases such as "yes/no"),
    else inferred from the reference (yes/no -> closed, a single letter -> choice, else open)."""
    named = _ANSWER_TYPE_ALIASES.get(str(question_type).strip().lower()) if question_type is not None else None
    if named is not None:
        return named
    if _reference_yes_no(reference) is not None:
        return "closed"
    letter = normalize_answer(reference, drop_articles=False)
    return "choice" if len(letter) == 1 and "a" <= letter <= "z" else "open"


def medical_closed_correct(prediction: str, reference: str) -> bool:
    """A closed medical answer: a yes/no reference is matched by the prediction's first word's polarity
    (`yes_no`: "Positive." answers "yes", "Not present" answers "no"); any other reference ("left", "CT")
    by `closed_answer_correct`."""
    polarity = _reference_yes_no(reference)
    if polarity is not None:
        return yes_no(prediction) == polarity
    return closed_answer_correct(prediction, reference)


def choice_correct(prediction: str, reference: str, options: Mapping[str, str] | None = None) -> bool:
    """A multiple-choice answer, given as the option's letter or its text.

    `reference` is the right letter; `options` maps letters to option texts ({"A": "CT", ...}). A prediction
    whose words equal an option's text picks that option (so "A mass" is the option "a mass", not the letter
    A); otherwise a first word that is a single letter picks that letter ("B", "(B) MRI"); otherwise the
    longest option text the prediction begins with picks that option. Without options this is
    `closed_answer_correct`. Deliberately more lenient than VILA's PMC-VQA scorer (llava/eval/pmcvqa.py), which
    counts only an output that is exactly the letter: a model that answers "B." or with the option's text
    still chose B.
    """
    letter = normalize_answer(reference, drop_articles=False)
    letters = {normalize_answer(k, drop_articles=False): answer_words(v) for k, v in (options or {}).items()}
    predicted = answer_words(prediction)
    for key, words in letters.items():
        if words and predicted == words:
            return key == letter
    first = answer_words(prediction, drop_articles=False)[:1]
    if first and len(first[0]) == 1 and "a" <= first[0] <= "z":
        return first == [letter]
    starts = [(len(words), key) for key, words in letters.items() if words and predicted[: len(words)] == words]
    if starts:
        return max(starts)[1] == letter
    return closed_answer_correct(prediction, reference)


# LLaVA-Med's number words (glossary.py manual_map), read as digits on both sides of an open answer.
NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}


def medical_words(text: str) -> list[str]:
    """`answer_words` as medical VQA scorers compare open answers: words joined by "-" or "/" split apart and
    number words zero..ten written as digits ("Two X-ray/CT views" -> ["2", "x", "ray", "ct", "views"])."""
    words = answer_words(text.replace("-", " ").replace("/", " "))
    return [NUMBER_WORDS.get(word, word) for word in words]


def word_recall(prediction: str, reference: str) -> float:
    """The share of the reference's words (`medical_words`, counted with multiplicity) found in the prediction:
    LLaVA-Med's open-question recall (see the note above on repeats). Two empty answers agree; one empty answer
    scores 0."""
    predicted, expected = medical_words(prediction), medical_words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    return common / len(expected)


def _typed(
    predictions: Sequence[str], references: Sequence[str], question_types: Sequence[str | None] | None
) -> list[tuple[str, str, str, int]]:
    """(answer type, prediction, reference, index) of each example."""
    _check_inputs(predictions, references)
    types = question_types if question_types is not None else [None] * len(predictions)
    if len(types) != len(predictions):
        raise ValueError(f"got {len(types)} question_types for {len(predictions)} predictions; they must pair up")
    return [(answer_type(t, r), p, r, i) for i, (t, p, r) in enumerate(zip(types, predictions, references))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _medical_score(kind: str, prediction: str, reference: str, options: Mapping[str, str] | None) -> float:
    """One example's score by its answer type: accuracy (closed, choice) or word recall (open)."""
    if kind == "closed":
        return float(medical_closed_correct(prediction, reference))
    if kind == "choice":
        return float(choice_correct(prediction, reference, options))
    return word_recall(prediction, reference)


def closed_accuracy(predictions, references, question_types=None) -> dict[str, float]:
    """Accuracy (`medical_closed_correct`) over the closed questions; {} when there are none."""
    scores = [float(medical_closed_correct(p, r)) for k, p, r, _ in _typed(predictions, references, question_types) if k == "closed"]
    return {"closed_accuracy": _mean(scores)} if scores else {}


def open_recall(predictions, references, question_types=None) -> dict[str, float]:
    """Mean `word_recall` over the open questions; {} when there are none."""
    scores = [word_recall(p, r) for k, p, r, _ in _typed(predictions, references, question_types) if k == "open"]
    return {"open_recall": _mean(scores)} if scores else {}


def open_token_f1(predictions, references, question_types=None) -> dict[str, float]:
    """SQuAD token F1 of `medical_words` over the open questions; {} when there are none."""
    scores = [_token_f1(p, r, medical_words) for k, p, r, _ in _typed(predictions, references, question_types) if k == "open"]
    return {"open_token_f1": _mean(scores)} if scores else {}


def choice_accuracy(predictions, references, question_types=None, choices=None) -> dict[str, float]:
    """Accuracy (`choice_correct`, letter or option text) over the multiple-choice questions; {} when none."""
    options = choices if choices is not None else [None] * len(predictions)
    scores = [
        float(choice_correct(p, r, options[i]))
        for k, p, r, i in _typed(predictions, references, question_types) if k == "choice"
    ]
    return {"choice_accuracy": _mean(scores)} if scores else {}


def overall(predictions, references, question_types=None, choices=None) -> dict[str, float]:
    """Mean over all questions of each one's own score: accuracy for closed and choice questions, word
    recall for open ones (so it always exists, and a sweep can optimise it whatever the mix of types)."""
    options = choices if choices is not None else [None] * len(predictions)
    typed = _typed(predictions, references, question_types)
    return {"overall": _mean([_medical_score(k, p, r, options[i]) for k, p, r, i in typed])}


METRICS.update({
    "closed_accuracy": closed_accuracy,
    "open_recall": open_recall,
    "open_token_f1": open_token_f1,
    "choice_accuracy": choice_accuracy,
    "overall": overall,
})


# ----------------------------------------------------------------------------------------------- robot actions
def _parsed_actions(predictions: Sequence[str], references: Sequence[str]) -> list[tuple[dict[str, str] | None, dict[str, str] | None]]:
    """(prediction's fields or None when malformed, reference's fields or None) per example, in the action text
    format of `nvila_ft.data.actions` ("x=+1 y=0 grip=open"). A prediction is malformed when it does not parse or
    its fields are not exactly the reference's."""
    from nvila_ft.data.actions import parse_action_text

    _check_inputs(predictions, references)
    pairs = []
    for prediction, reference in zip(predictions, references):
        expected = parse_action_text(reference)
        got = parse_action_text(prediction)
        reference_fields = expected.values if expected.ok else None
        well_formed = got.ok and reference_fields is not None and set(got.values) == set(reference_fields)
        pairs.append((got.values if well_formed else None, reference_fields))
    return pairs


def action_exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fraction of predicted actions with every field right (malformed predictions count as wrong; a reference
    that is not in the action format is compared as normalised text)."""
    hits = 0
    for (got, expected), prediction, reference in zip(_parsed_actions(predictions, references), predictions, references):
        hits += got == expected if expected is not None else normalize_answer(prediction) == normalize_answer(reference)
    return {"action_exact_match": hits / len(predictions)}


def action_field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Per action field, the fraction of examples (whose reference has the field) predicting it right, as
    "action_field_accuracy/<field>", and their mean as "action_field_accuracy". A malformed prediction is wrong on
    every field."""
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    for got, expected in _parsed_actions(predictions, references):
        for name, value in (expected or {}).items():
            totals[name] = totals.get(name, 0) + 1
            hits[name] = hits.get(name, 0) + (got is not None and got[name] == value)
    per_field = {f"action_field_accuracy/{name}": hits[name] / totals[name] for name in totals}
    mean = sum(per_field.values()) / len(per_field) if per_field else 0.0
    return {"action_field_accuracy": mean, **per_field}


def action_malformed_rate(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fraction of predictions that are not a well-formed action with exactly the reference's fields."""
    pairs = _parsed_actions(predictions, references)
    return {"action_malformed_rate": sum(got is None for got, _ in pairs) / len(pairs)}


METRICS.update({
    "action_exact_match": action_exact_match,
    "action_field_accuracy": action_field_accuracy,
    "action_malformed_rate": action_malformed_rate,
})


# ----------------------------------------------------------------------------------------------- grounding
def iou_accuracy(predictions: Sequence[str], references: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """Boxes written as `nvila_ft.data.boxes` says ("[x1, y1, x2, y2]", fractions of the image):

    - iou_accuracy: share of predictions whose IoU with the reference box is >= `threshold` (RefCOCO's
      Acc@0.5 by default; the key is "iou_accuracy_<100 x threshold>" for another threshold);
    - mean_iou: the IoU averaged over all examples;
    - malformed_box_rate: share of predictions from which no box could be read (`parse_box`).
    A malformed prediction, or a reference that is not a box, counts as IoU 0: a miss, never an error.
    """
    from nvila_ft.data.boxes import iou, parse_box

    _check_inputs(predictions, references)
    ious, malformed = [], 0
    for prediction, reference in zip(predictions, references):
        predicted, expected = parse_box(prediction).box, parse_box(reference).box
        malformed += predicted is None
        ious.append(iou(predicted, expected) if predicted is not None and expected is not None else 0.0)
    key = "iou_accuracy" if threshold == 0.5 else f"iou_accuracy_{round(threshold * 100)}"
    return {
        # 1e-9: an IoU of exactly the threshold is a hit although 2-decimal arithmetic lands a hair below it
        key: sum(value >= threshold - 1e-9 for value in ious) / len(ious),
        "mean_iou": sum(ious) / len(ious),
        "malformed_box_rate": malformed / len(ious),
    }


def iou_accuracy_75(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`iou_accuracy` at the stricter IoU >= 0.75 (key "iou_accuracy_75"; mean_iou and the malformed rate too)."""
    return iou_accuracy(predictions, references, threshold=0.75)


METRICS["iou_accuracy"] = iou_accuracy
METRICS["iou_accuracy_75"] = iou_accuracy_75
