"""Task types of MedMNIST and, for each, its loss, its scores and its metrics.

``medmnist.INFO[flag]["task"]`` is one of binary-class, multi-class, multi-label/binary-class or
ordinal-regression. Losses:

- binary / multi-class: softmax cross-entropy over C classes (MedMNIST's own convention).
- multi-label (ChestMNIST): a sigmoid per label, binary cross-entropy.
- ordinal (RetinaMNIST): cumulative ("extended binary") logits, one per threshold k < C-1, trained
  with BCE on [y > k]; the prediction counts the thresholds passed, so grade errors are ordered.

Metrics come from scikit-learn: accuracy, AUC (macro one-vs-rest where there are several classes),
macro-F1, and mean absolute grade error for ordinal tasks. An undefined AUC (a split with one class)
is NaN, never a made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import f1_score, roc_auc_score

TaskKind = Literal["binary", "multiclass", "multilabel", "ordinal"]

_KINDS: dict[str, TaskKind] = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}


@dataclass(frozen=True)
class TaskSpec:
    dataset: str
    kind: TaskKind
    num_classes: int  # classes, or labels for multi-label tasks
    channels: int
    spatial_dims: int  # 2 or 3
    synthetic: bool = False

    @classmethod
    def from_medmnist(cls, flag: str, synthetic: bool = False) -> TaskSpec:
        from medmnist import INFO

        info = INFO[flag]
        return cls(
            dataset=flag,
            kind=_KINDS[info["task"]],
            num_classes=len(info["label"]),
            channels=info["n_channels"],
            spatial_dims=3 if flag.endswith("3d") else 2,
            synthetic=synthetic,
        )

    @property
    def num_outputs(self) -> int:
        return self.num_classes - 1 if self.kind == "ordinal" else self.num_classes

    # ---- training

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` is N×L integer (L=1 except for multi-label tasks)."""
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        target = labels[:, 0].long()
        if self.kind == "ordinal":
            thresholds = torch.arange(self.num_outputs, device=logits.device)
            return F.binary_cross_entropy_with_logits(logits, (target[:, None] > thresholds).float())
        return F.cross_entropy(logits, target)

    # ---- evaluation

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Per-class probabilities (N×C) from logits, for every task kind."""
        if self.kind == "multilabel":
            return torch.sigmoid(logits).cpu().numpy()
        if self.kind == "ordinal":
            exceed = torch.cummin(torch.sigmoid(logits), dim=1).values  # P(y > k), monotone in k
            ones = torch.ones_like(exceed[:, :1])
            upper = torch.cat([ones, exceed], dim=1)
            lower = torch.cat([exceed, torch.zeros_like(ones)], dim=1)
            return (upper - lower).clamp_min(0).cpu().numpy()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def predict(self, scores: np.ndarray) -> np.ndarray:
        if self.kind == "multilabel":
            return (scores > 0.5).astype(np.int64)
        if self.kind == "ordinal":  # count of thresholds passed == index where cumulative mass crosses 1/2
            return (1.0 - np.cumsum(scores, axis=1)[:, :-1] > 0.5).sum(axis=1)
        return scores.argmax(axis=1)

    def metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        labels = labels.reshape(len(labels), -1).astype(np.int64)
        if len(labels) == 0:
            return {}
        pred = self.predict(scores)
        if self.kind == "multilabel":
            out = {
                "acc": float((pred == labels).mean()),
                "f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
                "auc": _safe_auc(lambda: roc_auc_score(labels, scores, average="macro")),
            }
            return out
        y = labels[:, 0]
        classes = np.arange(self.num_classes)
        out = {
            "acc": float((pred == y).mean()),
            "f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        }
        if self.num_classes == 2:
            out["auc"] = _safe_auc(lambda: roc_auc_score(y, scores[:, 1]))
        else:
            out["auc"] = _safe_auc(
                lambda: roc_auc_score(y, scores, multi_class="ovr", average="macro", labels=classes)
            )
        if self.kind == "ordinal":
            out["mae"] = float(np.abs(pred - y).mean())
        return out


def _safe_auc(compute) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            value = float(compute())
        except ValueError:  # only one class present, or a class never seen: AUC is undefined
            return float("nan")
    return value
