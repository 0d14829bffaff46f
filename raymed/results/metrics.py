"""Names of a run's evaluation metrics, and which split each comes from.

Every evaluated round logs each metric twice, once per split::

    global/<dataset>/<m>              the global model on the dataset's test split
    val/global/<dataset>/<m>          ... on its validation split
    personal/<dataset>/<m>            every client's personalised model on its own held-out rows (pooled)
    val/personal/<dataset>/<m>        ... on its own validation rows
    .../mean/<m>, .../client_mean/<m> the mean over datasets, over clients

Selection (best round, early stopping, Tune) reads ``val/...`` keys only; results are the test
twins (the same name without ``val/``) at the selected round.
"""

from __future__ import annotations

EVAL_SPLITS = ("val", "test")
VAL = "val/"


def metric_prefix(split: str, model: str) -> str:
    """``global``/``personal`` for the test split, ``val/global``/``val/personal`` for validation."""
    return f"{VAL}{model}" if split == "val" else model


def is_validation(metric: str) -> bool:
    return metric.startswith(VAL)


def test_twin(metric: str) -> str:
    """The test-split metric of a validation metric (``val/global/mean/acc`` → ``global/mean/acc``)."""
    return metric[len(VAL) :] if is_validation(metric) else metric


def val_twin(metric: str) -> str:
    """The validation metric of a test-split metric (``global/mean/acc`` → ``val/global/mean/acc``)."""
    return metric if is_validation(metric) else VAL + metric
