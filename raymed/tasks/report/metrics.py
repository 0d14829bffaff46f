"""Scores for generated radiology reports: language overlap (NLG) and clinical efficacy (CE).

- :func:`nlg_metrics`: BLEU-1..4, ROUGE-L and CIDEr, computed by pycocoevalcap's scorers
  (``Bleu(4)``, ``Rouge()``, ``Cider()``; the ones R2Gen and most report-generation papers use).
  BLEU is corpus-level (``Bleu.compute_score``'s first value); ROUGE-L is the mean per report;
  CIDEr is pycocoevalcap's ``Cider`` (the CIDEr-D style scorer, with idf taken from the
  references being scored, so it needs several distinct reports to mean anything). Text is
  tokenised by :func:`tokens` instead of PTBTokenizer, which needs Java.
- :func:`clinical_efficacy`: micro-averaged precision / recall / F1 of findings extracted from the
  prediction against those of the reference, over :data:`FINDINGS` except ``no_finding``.
  Findings come from :func:`label_report`, a small rule-based labeler with NegEx-style negation
  (CheXpert-style, simplified). It is *not* CheXpert or CheXbert (those need Java / a model), so
  absolute CE numbers are not comparable with papers that report CheXbert-based scores.
- :func:`report_scores`: both dicts merged.

Labeler rules (all case-insensitive): a report is split into sentences on ``.``, ``;``, ``?``,
``!`` and newlines. A mention is negated when, in the same sentence, a negation cue ("no", "not",
"without", "negative for", "free of", "clear of", "absence of", "resolved", "resolution of", ...)
precedes it with no scope terminator ("but", "however", "although", "which", "except", ...) in
between, or when it is followed by "is not seen/identified/present", "is absent", "has resolved",
and the like. Uncertain mentions ("possible", "may represent", "cannot exclude", "rule out") count
as present. A finding is 1 when any mention in the report is not negated; ``no_finding`` is 1 when
no other finding is.
"""

from __future__ import annotations

import contextlib
import io
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_WORD = re.compile(r"[a-z0-9]+")
_PLACEHOLDER = "xxxx"  # IU X-Ray's de-identification mask; it carries no content
# Stand-ins for reports with no tokens (pycocoevalcap asserts on empty strings). They cannot come
# out of tokens(), and the two differ so that an empty prediction never earns credit.
_EMPTY_PREDICTION = "<empty-prediction>"
_EMPTY_REFERENCE = "<empty-reference>"

# Observation name -> mention pattern. Synonyms include the "reporting style" rewrites the data uses
# (PTX, pleural fluid, opacification, airspace disease, heart and mediastinum).
_FINDING_PATTERNS: dict[str, str] = {
    "cardiomegaly": (
        r"cardiomegaly"
        r"|enlarged\s+(?:heart|cardiac\s+silhouette|cardiomediastinal\s+silhouette|cardiac\s+size)"
        r"|cardiac\s+enlargement"
        # "heart (size) is (mildly) enlarged"; the optional adverb must not swallow "not"
        r"|(?:heart|heart\s+size|cardiac\s+silhouette|cardiac\s+size|cardiomediastinal\s+silhouette)"
        r"\s+(?:is|are|appears|remains|is\s+again)\s+(?:(?!not\b)[a-z]+\s+)?enlarged"
    ),
    "pneumonia": r"pneumonias?",
    "consolidation": r"consolidations?|consolidative|air\s*space\s+diseases?",
    "opacity": r"opacity|opacities|opacifications?|infiltrates?",
    "effusion": r"effusions?|pleural\s+fluid",
    "pneumothorax": r"pneumothora(?:x|xes|ces)|ptx",
    "atelectasis": r"atelectasis|atelectases|atelectatic",
    "edema": r"edema|oedema|vascular\s+congestion",
    "nodule_mass": r"nodules?|mass|masses",
    "fracture": r"fractures?|fractured",
    "emphysema": r"emphysema\w*|hyperinflat\w*|hyperexpan\w*|copd",
    "granuloma": r"granulomas?|granulomata|granulomatous",
}

FINDINGS: tuple[str, ...] = (*_FINDING_PATTERNS, "no_finding")

_MENTIONS = {name: re.compile(rf"\b(?:{pattern})\b") for name, pattern in _FINDING_PATTERNS.items()}

# Cues that negate a mention after them in the same sentence.
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative\s+for|free\s+of|clear\s+of|absence\s+of|no\s+evidence\s+of"
    r"|no\s+signs?\s+of|neither|nor|no\s+longer)\b"
)
# Cues that negate a mention on either side of them ("resolved pneumonia", "pneumothorax has resolved").
_BOTH_NEGATION = re.compile(r"\b(?:resolved|resolution\s+of|resolving)\b")
# Cues that negate a mention before them ("effusion is not seen", "pneumothorax is absent").
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were)\s+)?(?:not|no\s+longer)\s+"
    r"(?:seen|identified|present|visualized|visualised|appreciated|demonstrated|evident|noted|detected)\b"
    r"|\b(?:is|are)\s+absent\b|\b(?:has|have)\s+cleared\b"
)
# Phrases that contain a cue word but do not negate the finding (NegEx "pseudo-negations"):
# "no change in the opacity" still reports the opacity; "cannot be excluded" is uncertain = present.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|not)\s+(?:(?:significant|significantly|appreciable|definite|substantial)\s+)?"
    r"(?:(?:interval\s+)?change[sd]?|increased?|worsen(?:ed|ing)?|(?:be\s+)?excluded|(?:be\s+)?ruled\s+out)\b"
    r"|\bnot\s+only\b"
)
# Words that end a negation's scope: "no pneumothorax but a small effusion".
_TERMINATOR = re.compile(
    r"\b(?:but|however|although|though|which|except|aside\s+from|apart\s+from|there\s+(?:is|are))\b"
)
_SENTENCE = re.compile(r"[.;?!\n]+")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens of ``text``, without IU X-Ray's "xxxx" de-identification mask."""
    return [t for t in _WORD.findall(text.lower()) if t != _PLACEHOLDER]


def _check_pair(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")


def nlg_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4, mean ROUGE-L and CIDEr of paired reports (pycocoevalcap); ``{}`` for no reports."""
    _check_pair(predictions, references)
    if not predictions:
        return {}
    res = {i: [" ".join(tokens(text)) or _EMPTY_PREDICTION] for i, text in enumerate(predictions)}
    gts = {i: [" ".join(tokens(text)) or _EMPTY_REFERENCE] for i, text in enumerate(references)}
    # Bleu prints its n-gram counts; keep the caller's stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["rouge_l"] = float(rouge)
    scores["cider"] = float(cider)
    return scores


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in others)


def _open_between(start: int, end: int, terminators: list[tuple[int, int]]) -> bool:
    """True when no scope terminator lies within ``[start, end)``."""
    return not any(start <= t_start and t_end <= end for t_start, t_end in terminators)


def _sentence_findings(sentence: str) -> set[str]:
    """Findings mentioned and not negated in one lower-cased sentence."""
    pseudo = _spans(_PSEUDO_NEGATION, sentence)
    pre = [s for s in _spans(_PRE_NEGATION, sentence) if not _overlaps(s, pseudo)]
    both = _spans(_BOTH_NEGATION, sentence)
    post = _spans(_POST_NEGATION, sentence)
    terminators = _spans(_TERMINATOR, sentence)
    before_cues = pre + both  # negate what follows them
    after_cues = post + both  # negate what precedes them
    present = set()
    for name, pattern in _MENTIONS.items():
        for start, end in _spans(pattern, sentence):
            negated = any(c_end <= start and _open_between(c_end, start, terminators) for _, c_end in before_cues)
            negated = negated or any(
                c_start >= end and _open_between(end, c_start, terminators) for c_start, _ in after_cues
            )
            if not negated:
                present.add(name)
                break
    return present


def label_report(text: str) -> dict[str, int]:
    """1/0 per :data:`FINDINGS` name: 1 = mentioned and not negated (uncertain counts as present)."""
    present: set[str] = set()
    for sentence in _SENTENCE.split(text.lower()):
        present |= _sentence_findings(sentence)
    labels = {name: int(name in present) for name in _FINDING_PATTERNS}
    labels["no_finding"] = int(not present)
    return labels


def clinical_efficacy(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Micro precision / recall / F1 of predicted findings against reference findings (``no_finding`` left out).

    A ratio whose denominator is zero (e.g. no positive finding on either side) is 0.0, not NaN.
    ``{}`` for no reports.
    """
    _check_pair(predictions, references)
    if not predictions:
        return {}
    names = FINDINGS[:-1]  # "no_finding" is left out, as usual for report-generation CE
    tp = fp = fn = 0
    for prediction, reference in zip(predictions, references):
        pred, ref = label_report(prediction), label_report(reference)
        for name in names:
            tp += int(pred[name] == 1 and ref[name] == 1)
            fp += int(pred[name] == 1 and ref[name] == 0)
            fn += int(pred[name] == 0 and ref[name] == 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"ce_precision": precision, "ce_recall": recall, "ce_f1": f1}


def report_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """:func:`nlg_metrics` and :func:`clinical_efficacy` in one dict."""
    return nlg_metrics(predictions, references) | clinical_efficacy(predictions, references)
