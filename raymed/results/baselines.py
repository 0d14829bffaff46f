"""Baselines beside every number: what a model that learned nothing scores on the same rows.

For each dataset, from its shards:

- ``majority``: the most common class of all clients' training rows, predicted for every row, scored
  on the validation and test splits with the same metric code as the models (accuracy, macro-F1,
  AUC = 0.5, grade MAE, ...). Multi-label: each label's majority value. VQA: the most common answer.
- ``chance_acc``: 1/C (multi-label: 0.5).
- ``local_majority``: each client predicts its own most common training class, scored on its own
  validation and held-out rows, pooled per dataset and averaged over clients as the personalised
  metrics are (the baseline of ``personal/...``).
- super-resolution: ``bicubic``, the enlarged low-resolution input itself (what the head starts at).
- report generation: none (no constant report is a meaningful floor here).

:func:`baseline_metrics` maps each logged metric name (``global/breastmnist/acc``,
``val/personal/client_mean/acc``, ...) to its baseline value: reports, plots and benchmark tables
look values up there and flag those at or below it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raymed.data.shards import ShardSet, Split
from raymed.data.tasks import TaskSpec, majority_class
from raymed.results.metrics import EVAL_SPLITS, metric_prefix

LOWER_IS_BETTER = {"mae", "loss"}


def _outputs(task: TaskSpec, train_labels: np.ndarray, split: Split) -> np.ndarray | None:
    if task.kind == "superres":  # bicubic: the degraded input itself
        x, _ = task.inputs(np.asarray(split.images), np.asarray(split.labels), task.channels, torch.device("cpu"))
        return x.clamp(-1, 1).numpy()
    return task.constant_scores(train_labels, len(split))


def _score(task: TaskSpec, train_labels: np.ndarray, split: Split) -> dict[str, float]:
    if not len(split):
        return {}
    outputs = _outputs(task, train_labels, split)
    if outputs is None:
        return {}
    return task.metrics(outputs, task.targets(np.asarray(split.images), np.asarray(split.labels)))


def compute_baselines(shards: ShardSet) -> dict[str, dict[str, Any]]:
    """Per dataset: the majority (or bicubic) predictor on validation and test, chance, and the
    clients' local majority on their own validation and held-out rows."""
    clients = {int(cid): shards.client(int(cid)) for cid in shards.client_ids()}
    out: dict[str, dict[str, Any]] = {}
    for flag, task in shards.tasks.items():
        if task.kind == "report":
            continue
        own = [c for c in clients.values() if flag in c.train and len(c.train[flag])]
        train_labels = np.concatenate([np.asarray(c.train[flag].labels) for c in own]) if own else np.zeros((0, 1), np.int32)
        entry: dict[str, Any] = {"kind": "bicubic" if task.kind == "superres" else "majority class"}
        if task.kind != "superres":
            entry["chance_acc"] = 0.5 if task.kind == "multilabel" else 1.0 / max(task.num_classes, 1)
            if task.kind != "multilabel" and len(train_labels):
                entry["majority_class"] = majority_class(train_labels[:, 0], task.num_classes)
        entry["test"] = _score(task, train_labels, shards.test(flag))
        entry["val"] = _score(task, train_labels, shards.val(flag))
        if task.kind != "superres":
            entry["local_majority"] = {split: _local(task, flag, own, split) for split in EVAL_SPLITS}
        out[flag] = entry
        for name, value in {
            "majority_acc": entry["test"].get("acc"),
            "val_majority_acc": entry["val"].get("acc"),
            "local_majority_acc": entry.get("local_majority", {}).get("test", {}).get("pooled", {}).get("acc"),
            "val_local_majority_acc": entry.get("local_majority", {}).get("val", {}).get("pooled", {}).get("acc"),
        }.items():
            if value is not None:
                entry[name] = value
    return out


def _local(task: TaskSpec, flag: str, clients: list, split: str) -> dict[str, Any]:
    """Each client's own majority class on its own rows of ``split`` (val: validation rows, test:
    held-out rows): metrics pooled over clients, and per client (for the client mean)."""
    outputs, targets, per_client = [], [], {}
    for c in clients:
        rows = (c.val if split == "val" else c.holdout).get(flag)
        if rows is None or not len(rows):
            continue
        scores = task.constant_scores(np.asarray(c.train[flag].labels), len(rows))
        if scores is None:
            continue
        target = task.targets(np.asarray(rows.images), np.asarray(rows.labels))
        outputs.append(scores)
        targets.append(target)
        per_client[c.client_id] = (len(rows), task.metrics(scores, target))
    pooled = task.metrics(np.concatenate(outputs), np.concatenate(targets)) if outputs else {}
    return {"pooled": pooled, "clients": per_client}


def baseline_metrics(baselines: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each metric name a run logs → its baseline value (only where one exists)."""
    out: dict[str, float] = {}
    personal_by_client: dict[str, dict[int, list[tuple[int, dict]]]] = {split: {} for split in EVAL_SPLITS}
    for flag, entry in baselines.items():
        for split in EVAL_SPLITS:
            for name, value in entry.get(split, {}).items():
                out[f"{metric_prefix(split, 'global')}/{flag}/{name}"] = value
            local = entry.get("local_majority", {}).get(split, {})
            for name, value in local.get("pooled", {}).items():
                out[f"{metric_prefix(split, 'personal')}/{flag}/{name}"] = value
            for cid, rows_metrics in local.get("clients", {}).items():
                personal_by_client[split].setdefault(int(cid), []).append(rows_metrics)
    for split in EVAL_SPLITS:
        prefix = metric_prefix(split, "global")
        names = {key.rsplit("/", 1)[1] for key in out if key.startswith(prefix + "/")}
        for name in names:  # the mean over datasets, where every dataset has the metric
            values = [baselines[f].get(split, {}).get(name) for f in baselines]
            if values and all(v is not None for v in values):
                out[f"{prefix}/mean/{name}"] = float(np.mean(values))
        clients = personal_by_client[split]
        for name in ("acc",):
            per_client = [
                np.average([m[name] for _, m in items], weights=[n for n, _ in items])
                for items in clients.values()
                if all(name in m for _, m in items)
            ]
            if per_client:
                out[f"{metric_prefix(split, 'personal')}/client_mean/{name}"] = float(np.mean(per_client))
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def at_or_below(metric: str, value: float | None, baselines: dict[str, float], tolerance: float = 1e-9) -> bool:
    """Whether ``value`` of ``metric`` is no better than its baseline (False where there is none)."""
    base = baselines.get(metric)
    if base is None or value is None or not np.isfinite(value):
        return False
    if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
        return value >= base - tolerance
    return value <= base + tolerance


def jsonable(baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The baselines without their per-client detail (for meta.json and summary.json)."""
    out = {}
    for flag, entry in baselines.items():
        entry = dict(entry)
        if "local_majority" in entry:
            entry["local_majority"] = {split: local["pooled"] for split, local in entry["local_majority"].items()}
        out[flag] = entry
    return out
