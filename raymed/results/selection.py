"""Model selection on validation: the round a run is judged by, and early stopping.

The selected round is the evaluated round whose validation metric (``eval.select``, a ``val/`` key)
is best; the run's result is that round's test metrics (the same names without ``val/``). With
``eval.early_stop_patience: p`` the run stops once p evaluations in a row have not improved on it.
"""

from __future__ import annotations

import math
from typing import Any

from raymed.results.metrics import VAL, test_twin

# Preferred selection metrics, in order, when eval.select is not given: the global model when there
# is one, else the clients' personalised models; each with the run's primary metric.
_PREFERENCE = ("val/global/mean/", "val/personal/client_mean/")
_PRIMARY = ("acc", "psnr", "bleu4")


def default_metric(metrics: dict[str, Any]) -> str | None:
    """The selection metric of a run that names none, from the keys of an evaluated round."""
    for prefix in _PREFERENCE:
        for name in _PRIMARY:
            if prefix + name in metrics:
                return prefix + name
    found = sorted(k for k in metrics if k.startswith(VAL + "global/") or k.startswith(VAL + "personal/"))
    return found[0] if found else None


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class Selection:
    """Tracks the best evaluated round by a validation metric, as rounds arrive."""

    def __init__(self, metric: str | None = None, mode: str = "max", patience: int | None = None):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.round: int | None = None
        self.value: float | None = None
        self.metrics: dict[str, Any] = {}
        self.evaluations = 0
        self.since_best = 0

    def update(self, round_: int, metrics: dict[str, Any]) -> bool:
        """Take one round's metrics; returns whether it is the new selected round. Rounds without
        an evaluation are ignored; a non-finite value never wins."""
        if self.metric is None:
            self.metric = default_metric(metrics)
        if self.metric is None or self.metric not in metrics:
            return False
        self.evaluations += 1
        value = float(metrics[self.metric]) if _finite(metrics[self.metric]) else None
        better = value is not None and (self.value is None or (value > self.value if self.mode == "max" else value < self.value))
        if better:
            self.round, self.value, self.metrics, self.since_best = round_, value, dict(metrics), 0
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.round is not None and self.since_best >= self.patience

    def summary(self) -> dict[str, Any]:
        """For summary.json: what was selected on, when, and every metric of that round (its test
        metrics are the run's result)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "round": self.round,
            "value": self.value,
            "test_metric": test_twin(self.metric) if self.metric else None,
            "test_value": self.metrics.get(test_twin(self.metric)) if self.metric else None,
            "evaluations": self.evaluations,
            "early_stopped": self.should_stop,
            "metrics": self.metrics,
        }

    @classmethod
    def replay(cls, rounds: list[dict[str, Any]], metric: str | None = None, mode: str = "max", patience: int | None = None) -> Selection:
        """The selection over rounds already logged (a resumed run, a finished run's table)."""
        selection = cls(metric, mode, patience)
        for row in rounds:
            selection.update(int(row["round"]), row)
        return selection
