"""Report-generation scores: tokens, the rule-based finding labeler, NLG metrics and clinical efficacy."""

from __future__ import annotations

import pytest

from raymed.tasks.report.metrics import (
    FINDINGS,
    clinical_efficacy,
    label_report,
    nlg_metrics,
    report_scores,
    tokens,
)

NLG_KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
CE_KEYS = {"ce_precision", "ce_recall", "ce_f1"}

REPORTS = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Right lower lobe consolidation. Small right pleural effusion. No pneumothorax.",
    "Mild cardiomegaly with pulmonary vascular congestion and bilateral interstitial edema.",
    "Calcified granuloma in the left upper lobe. No acute cardiopulmonary abnormality.",
]


def positives(text: str) -> set[str]:
    return {name for name, value in label_report(text).items() if value}


def test_tokens_lower_case_words_without_the_deidentification_mask():
    assert tokens("There are no XXXX of a Pleural-Effusion, 2 views.") == [
        "there", "are", "no", "of", "a", "pleural", "effusion", "2", "views",
    ]
    assert tokens("") == []


def test_findings_are_fixed_and_end_with_no_finding():
    assert FINDINGS[-1] == "no_finding"
    assert len(set(FINDINGS)) == len(FINDINGS) == 13
    assert set(label_report("anything")) == set(FINDINGS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No focal consolidation.", {"no_finding"}),
        ("No focal consolidation, pleural effusion or pneumothorax.", {"no_finding"}),
        ("There is no pneumothorax but a small left pleural effusion.", {"effusion"}),
        ("Right lower lobe consolidation. No effusion.", {"consolidation"}),
        ("Negative for PTX. Small pleural fluid.", {"effusion"}),
        ("Pneumothorax has resolved.", {"no_finding"}),
        ("Interval resolution of the left effusion.", {"no_finding"}),
        ("Opacity may represent pneumonia.", {"opacity", "pneumonia"}),
        ("Possible early pneumonia, cannot exclude infiltrate.", {"opacity", "pneumonia"}),
        ("Heart size is normal. Lungs are clear.", {"no_finding"}),
        ("Normal heart size. The heart is normal in size. The heart is not enlarged.", {"no_finding"}),
        ("Mild cardiomegaly.", {"cardiomegaly"}),
        ("The heart is enlarged.", {"cardiomegaly"}),
        ("Without evidence of airspace disease.", {"no_finding"}),
        ("Pleural effusion is not seen. Pneumothorax is absent.", {"no_finding"}),
        ("No change in the left basilar opacities.", {"opacity"}),
        ("Lungs are hyperinflated. Old healed rib fractures.", {"emphysema", "fracture"}),
        ("Calcified granulomas. 1 cm nodule in the right apex.", {"granuloma", "nodule_mass"}),
    ],
)
def test_label_report_handles_negation_synonyms_and_uncertainty(text, expected):
    assert positives(text) == expected


def test_a_negated_mention_elsewhere_does_not_hide_a_positive_one():
    # "any non-negated mention" wins: the first sentence negates, the second asserts
    assert positives("No atelectasis on the right. Left basilar atelectasis.") == {"atelectasis"}


def test_real_multi_sentence_report():
    text = (
        "Bilateral patchy pulmonary opacities noted. Interval improvement in left base consolidative opacity. "
        "Pulmonary vascular congestion again noted. Stable enlarged cardiomediastinal silhouette. "
        "No evidence of pneumothorax. No large pleural effusions."
    )
    assert positives(text) == {"opacity", "consolidation", "edema", "cardiomegaly"}


def test_nlg_metrics_identical_reports_score_one_and_different_ones_lower():
    same = nlg_metrics(REPORTS, REPORTS)
    assert set(same) == NLG_KEYS
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert same[key] == pytest.approx(1.0, abs=1e-6)
    assert same["cider"] > 0
    unrelated = ["Dog cat bird fish walks home today."] * len(REPORTS)
    different = nlg_metrics(unrelated, REPORTS)
    assert all(different[key] < same[key] for key in NLG_KEYS)


def test_nlg_metrics_empty_prediction_does_not_crash_and_scores_near_zero(capsys):
    scores = nlg_metrics([""] * 3, REPORTS[:3])
    assert set(scores) == NLG_KEYS
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in scores.values())
    # an empty (or mask-only) prediction among good ones is fine too
    mixed = nlg_metrics(["XXXX", REPORTS[1], REPORTS[2]], REPORTS[:3])
    assert 0 < mixed["bleu1"] < 1
    assert capsys.readouterr().out == ""  # pycocoevalcap's prints are silenced


def test_empty_lists_give_empty_dicts_and_mismatched_lengths_fail():
    assert nlg_metrics([], []) == {}
    assert clinical_efficacy([], []) == {}
    assert report_scores([], []) == {}
    with pytest.raises(ValueError):
        nlg_metrics(["a"], [])
    with pytest.raises(ValueError):
        clinical_efficacy(["a"], ["a", "b"])


def test_clinical_efficacy_micro_averages_over_findings():
    predictions = [
        "Right lower lobe consolidation. Small pleural effusion.",  # consolidation, effusion
        "Mild cardiomegaly.",  # cardiomegaly
        "No acute cardiopulmonary abnormality.",  # nothing
    ]
    references = [
        "Right lower lobe consolidation. No effusion.",  # consolidation
        "Mild cardiomegaly. Small left pneumothorax.",  # cardiomegaly, pneumothorax
        "Left basilar atelectasis.",  # atelectasis
    ]
    # tp = consolidation + cardiomegaly = 2; fp = effusion = 1; fn = pneumothorax + atelectasis = 2
    precision, recall = 2 / 3, 2 / 4
    scores = clinical_efficacy(predictions, references)
    assert set(scores) == CE_KEYS
    assert scores["ce_precision"] == pytest.approx(precision)
    assert scores["ce_recall"] == pytest.approx(recall)
    assert scores["ce_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_clinical_efficacy_with_no_positives_is_zero_not_nan():
    normal = ["Heart size is normal. Lungs are clear."] * 2
    assert clinical_efficacy(normal, normal) == {"ce_precision": 0.0, "ce_recall": 0.0, "ce_f1": 0.0}


def test_report_scores_merges_both():
    scores = report_scores(REPORTS, REPORTS)
    assert set(scores) == NLG_KEYS | CE_KEYS
    assert scores["ce_f1"] == pytest.approx(1.0)
