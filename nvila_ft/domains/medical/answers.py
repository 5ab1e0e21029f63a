"""Medical VQA answers: answer types (closed, open, multiple choice) and how each kind of answer is judged.

Medical VQA papers (LLaVA-Med, Med-Flamingo, PMC-VQA) report closed questions by accuracy, open ones by the
recall of the reference's words in the answer, and multiple choice by accuracy, each over its own questions.
Against LLaVA-Med's scorer (microsoft/LLaVA-Med llava/eval/run_eval.py, eval_metrics/glossary.py):
- open recall: the same normalisation of what matters for short answers (lower case, articles dropped, "-" and
  "/" split words: "x-ray" = "x ray", number words zero..ten read as digits: "two" = "2", `medical_words`).
  One deliberate difference: a word repeated in the prediction is counted at most as often as the reference
  has it (LLaVA-Med counts the prediction's repeats, so "lung lung" recalls 2/3 of "left lung"; here 1/2).
- closed accuracy: LLaVA-Med tests substrings: a prediction containing 'yes' or 'no' scores 1 when it contains
  the reference and is left out of the count when it does not; any other prediction scores 0. So "nodule"
  answers "no", "no, yes" answers both, wrong yes/no answers vanish from the denominator and a right "left"
  scores 0. nvila-ft deliberately judges the prediction's first word (`medical_closed_correct`) and counts
  every closed question once.
Each example's answer type comes from `question_types` (the records' meta "question_type": VQA-RAD and
SLAKE's answer_type); an unknown or missing type is inferred from the reference: a yes/no answer is
"closed" (a one-word answer of YES_WORDS / NO_WORDS, so also "absent"), a single option letter "choice", anything
else "open". (MedicalVQA's pathvqa layout sets PathVQA's own, stricter rule: exactly yes or no.)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from nvila_ft.metrics import answer_words, closed_answer_correct, normalize_answer

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


def reference_yes_no(reference: str) -> str | None:
    """The polarity of a reference that is exactly one yes/no word ("Yes", "absent."), else None."""
    words = answer_words(reference, drop_articles=False)
    return yes_no(reference) if len(words) == 1 and words[0] not in _NEGATIONS else None


def answer_type(question_type: str | None, reference: str) -> str:
    """"closed", "open" or "choice": the named type (case-insensitive, with aliases such as "yes/no"),
    else inferred from the reference (yes/no -> closed, a single letter -> choice, else open)."""
    named = _ANSWER_TYPE_ALIASES.get(str(question_type).strip().lower()) if question_type is not None else None
    if named is not None:
        return named
    if reference_yes_no(reference) is not None:
        return "closed"
    letter = normalize_answer(reference, drop_articles=False)
    return "choice" if len(letter) == 1 and "a" <= letter <= "z" else "open"


def medical_closed_correct(prediction: str, reference: str) -> bool:
    """A closed medical answer: a yes/no reference is matched by the prediction's first word's polarity
    (`yes_no`: "Positive." answers "yes", "Not present" answers "no"); any other reference ("left", "CT")
    by `closed_answer_correct`."""
    polarity = reference_yes_no(reference)
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
