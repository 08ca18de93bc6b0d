"""Answer scorers for the open-ended VQA benchmarks (VQAv2, VizWiz, TextVQA, GQA) and POPE.

Conventions (each one follows a named reference implementation):

* **VQA accuracy** (VQAv2, VizWiz, TextVQA): the answer normalization of the official VQA API's
  ``vqaEval.py`` (GT-Vision-Lang-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``; the same tables ship in
  EvalAI's VQA challenge evaluation and in LLaVA's ``m4c_evaluator.py``): newlines/tabs to spaces, strip, punctuation
  rules, lower case, number words to digits, articles removed, contractions restored. The score of one prediction
  against n human answers is the average over the n leave-one-out subsets of ``min(#matches among the other n-1 / 3,
  1)`` (n = 10 in the benchmarks).
* **GQA**: exact match after LLaVA's ``scripts/convert_gqa_for_eval.py`` normalization of the prediction
  (``rstrip('.').lower()``), with the gold answer lower-cased and stripped too.
* **POPE**: LLaVA's ``llava/eval/eval_pope.py`` answer parser (see :func:`parse_pope_answer`), "yes" is the positive
  class.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "gqa_normalize",
    "gqa_accuracy",
    "parse_pope_answer",
    "pope_metrics",
]

# ---------------------------------------------------------------------------------------------------------------------
# Normalization tables, verbatim from the VQA API's vqaEval.py (VQAEval.__init__). Quirks are kept on purpose because
# published numbers were computed with them: "none" maps to "0", "somebody'd" maps to "somebodyd", and the period
# regex's "(?!<=\d)" is a (buggy) negative *lookahead* for the text "<=digit", so in effect every "." that is not
# followed by a digit is removed ("dog." -> "dog", "2.5" stays, "3." -> "3").
# ---------------------------------------------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCTUATION = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip


def _process_punctuation(text: str) -> str:
    # vqaEval.processPunctuation: the "is this punctuation mark detached?" test looks at the *input* text, and a
    # digit,digit anywhere makes every mark vanish (so "10,000" -> "10000", never "10 000").
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # vqaEval passes re.UNICODE as the positional `count` argument of sub(), so at most 32 periods are removed; kept
    # identical (as a keyword: positional count is deprecated since Python 3.13).
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalization (vqaEval.py), applied to predictions and human answers alike.

    Example:
        >>> [normalize_vqa_answer(a) for a in ["Two", "a dog.", "yes,", "dont", "10,000", "$5", "2.5"]]
        ['2', 'dog', 'yes', "don't", '10000', '$5', '2.5']
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an answer string, got {type(text).__name__}: {text!r}")
    return _normalize_cached(text)


@functools.lru_cache(maxsize=1 << 16)
def _normalize_cached(text: str) -> str:
    # Human answers repeat a lot across a benchmark ("yes", "2", ...): caching makes scoring VQAv2 a few seconds.
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers of one question (VQAv2, VizWiz, TextVQA).

    Both sides go through :func:`normalize_vqa_answer`; the score is the mean over the leave-one-out subsets of
    ``min(#answers in the subset equal to the prediction / 3, 1)``. With 10 answers: 0 matches → 0, 1 → 0.3,
    2 → 0.6, 3 → 0.9, ≥ 4 → 1.0.

    One documented difference from vqaEval.py: the official script skips normalization for a question whose 10 answers
    are all identical (it then compares lower-cased strings only). VQAv2's stored answers are already normalized, so
    this matters only for raw answer lists; here normalization is always applied, as in LLaVA's TextVQA evaluator.

    Example:
        >>> vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7)
        0.9
    """
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"expected a non-empty list of human answers (10 in VQAv2/VizWiz/TextVQA), got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    # Matches with each human answer; the leave-one-out subset without answer i has total - match[i] matches.
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    total = sum(matches)
    n = len(answers)
    if n == 1:
        # No leave-one-out subset exists; fall back to exact match rather than dividing by zero.
        return float(matches[0])
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / n


def gqa_normalize(text: str) -> str:
    """LLaVA's GQA prediction normalization (scripts/convert_gqa_for_eval.py): ``text.rstrip('.').lower()``; we also
    strip surrounding whitespace, which the official GQA answers never carry.

    Example:
        >>> gqa_normalize(" Yes. ")
        'yes'
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an answer string, got {type(text).__name__}: {text!r}")
    return text.strip().rstrip(".").lower()


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA exact match (1.0 or 0.0) after :func:`gqa_normalize` on both sides.

    Example:
        >>> gqa_accuracy("Left.", "left"), gqa_accuracy("the left", "left")
        (1.0, 0.0)
    """
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


def parse_pope_answer(text: str) -> str:
    """POPE answer parser of LLaVA's ``llava/eval/eval_pope.py``, reproduced exactly.

    Keep the text before the first ".", delete commas, split on single spaces; the answer is "no" if one of the words
    is exactly ``No``, ``no`` or ``not`` (case-sensitive, so "NO" and "Not" parse as "yes"), otherwise "yes" — an
    empty or unrelated answer counts as "yes".

    Example:
        >>> [parse_pope_answer(t) for t in ["Yes", "No, there is not.", "There is no dog.", "Nope", "No."]]
        ['yes', 'no', 'no', 'yes', 'no']
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a free-text answer, got {type(text).__name__}: {text!r}")
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_label(label) -> bool:
    if isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower() == "yes"
    raise ValueError(f"POPE labels must be 'yes'/'no' strings or bools, got {label!r}")


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(predictions: Iterable[str | bool], labels: Iterable[str | bool]) -> dict:
    """POPE scores with "yes" as the positive class: accuracy, precision, recall, f1, yes_ratio (plus the counts).

    ``predictions`` are free-text model answers parsed by :func:`parse_pope_answer` (bools are taken as already
    parsed); ``labels`` are "yes"/"no" (any case) or bools. Zero-division convention (as scikit-learn's
    ``zero_division=0``): precision is 0 when nothing is predicted "yes", recall is 0 when no label is "yes", and F1 is
    0 when precision + recall is 0. LLaVA's script would raise ZeroDivisionError in those cases.

    Example:
        >>> m = pope_metrics(["Yes", "yes", "No", "no", "Yes."], ["yes", "no", "no", "yes", "yes"])
        >>> m["accuracy"], m["precision"], round(m["recall"], 4), m["yes_ratio"]
        (0.6, 0.6666666666666666, 0.6667, 0.6)
    """
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels; expected one per label")
    if not predictions:
        raise ValueError("pope_metrics needs at least one prediction")
    pred_yes = [p if isinstance(p, bool) else parse_pope_answer(p) == "yes" for p in predictions]
    gold_yes = [_pope_label(label) for label in labels]
    tp = sum(p and g for p, g in zip(pred_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(pred_yes, gold_yes))
    tn = sum(not p and not g for p, g in zip(pred_yes, gold_yes))
    fn = sum(not p and g for p, g in zip(pred_yes, gold_yes))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = len(pred_yes)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred_yes) / n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def mean(values: Iterable[float]) -> float:
    """Mean that refuses an empty list instead of returning NaN silently."""
    values = list(values)
    if not values:
        raise ValueError("cannot average an empty list of scores")
    result = math.fsum(values) / len(values)
    return result
