"""Evaluation, the server's half: which rows go to which worker (or to the server model's ranks), and
how their outputs become metrics. The workers' half (scoring a model on rows) is
:meth:`~raymed.engine.worker.ClientWorker.evaluate_global` and ``evaluate_personalised``.

- **Global**: the global model on each dataset's validation split (``val/global/<flag>/...``, for
  selection) and test split (``global/<flag>/...``), plus the mean over datasets of the primary metric.
- **Personalised**: every client's own model on its validation rows (``val/personal/...``) and
  held-out rows (``personal/...``): pooled per dataset, and the mean over clients.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from raymed.data.tasks import TaskSpec
from raymed.engine.pool import assign
from raymed.engine.worker import EvalChunk
from raymed.results.metrics import EVAL_SPLITS, metric_prefix

if TYPE_CHECKING:
    from raymed.engine.server import ServerActor


def primary_metrics(tasks: dict[str, TaskSpec]) -> list[str]:
    """The metric runs are summarised by (acc, psnr) when every dataset's task has the same one."""
    names = {t.primary_metric for t in tasks.values()}
    return sorted(names) if len(names) == 1 else []


def evaluate_global(server: ServerActor) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The global model's metrics on every dataset's validation and test split, and its first
    generated test outputs beside their references (tasks whose outputs are text)."""
    weights = server.method.eval_weights(server.state)
    if weights is None:
        return {}, []
    shards, cfg = server.shards, server.cfg
    sizes = {(split, flag): len(shards.evaluation_split(flag, split)) for split in EVAL_SPLITS for flag in shards.tasks}
    sizes = {key: n for key, n in sizes.items() if n}
    if server.generated:  # the DeepSpeed ranks hold the server model and generate
        server.server_model.load(weights)
        parts = server.server_model.generate(sizes, cfg.eval.batch_size)
    else:
        chunks: list[list[EvalChunk]] = [[] for _ in server.pool.live()]
        for (split, flag), n in sizes.items():
            step = math.ceil(n / len(chunks))
            for i, start in enumerate(range(0, n, step)):
                chunks[i % len(chunks)].append((split, flag, start, min(start + step, n)))
        # The broadcast object serves when it is these weights (FedAvg and most methods); else they go in once.
        ref = server.broadcast_ref() if server.method.broadcast(server.state) is weights else ray.put(weights)
        parts = sum(server.pool.map(lambda w, c, attempt: w.evaluate_global.remote(ref, c), chunks, "evaluating the global model", server.state.round), [])
    parts.sort(key=lambda p: p[:3])  # (split, dataset, first row): chunks back in split order
    out: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    for split in EVAL_SPLITS:
        prefix = metric_prefix(split, "global")
        for flag, task in shards.tasks.items():
            if (split, flag) not in sizes:
                continue
            scores = np.concatenate([s for sp, f, _, s in parts if (sp, f) == (split, flag)])
            rows = shards.evaluation_split(flag, split)
            targets = task.targets(rows.images, rows.labels)
            for name, value in task.metrics(scores, targets).items():
                out[f"{prefix}/{flag}/{name}"] = value
            if split == "test":
                samples += task.samples(scores, targets, server.state.round, cfg.eval.report_samples)
        for name in primary_metrics(shards.tasks):
            values = [out[f"{prefix}/{f}/{name}"] for f in shards.tasks if f"{prefix}/{f}/{name}" in out]
            if values:
                out[f"{prefix}/mean/{name}"] = float(np.mean(values))
    return out, samples


def evaluate_personalised(server: ServerActor, r: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Every client's personalised model on its own validation and held-out rows: the metrics, and
    one row per (client, dataset, split) for ``evaluation.parquet``."""
    cfg, sizes, tasks = server.cfg, server.sizes, server.shards.tasks
    clients = sorted(sizes)
    limit = cfg.eval.personal_clients
    if limit is not None and len(clients) > limit:  # a seeded sample, the same clients every round
        clients = sorted(np.random.default_rng([cfg.seed, 0xE7A1]).choice(clients, limit, replace=False).tolist())
    groups = assign(clients, {c: sizes[c][1] + sizes[c][2] for c in clients}, len(server.pool.live()))
    ref = server.broadcast_ref()
    parts = sum(
        server.pool.map(lambda w, g, attempt: w.evaluate_personalised.remote(ref, g, r, attempt), groups, "evaluating personalised models", server.state.round),
        [],
    )
    unseen = [part["client_id"] for part in parts if part.get("unseen")]
    parts = [part for part in parts if not part.get("unseen")]
    rows, pooled = [], {}
    for part in parts:
        task = tasks[part["dataset"]]
        rows.append(
            {"round": r, "client_id": part["client_id"], "dataset": part["dataset"], "split": part["split"], "num_rows": len(part["labels"]),
             **task.metrics(part["scores"], part["labels"])}
        )
        pooled.setdefault((part["split"], part["dataset"]), []).append(part)
    out: dict[str, float] = {}
    if len(clients) < len(sizes):
        out["eval/personal_clients_sampled"] = float(len(clients))
    if server.method.personal_state:  # clients left out: never sampled, their model would be the seeded init
        out["eval/unseen_clients"] = float(len(unseen))
    for (split, flag), items in sorted(pooled.items()):
        scores = np.concatenate([p["scores"] for p in items])
        labels = np.concatenate([p["labels"] for p in items])
        for name, value in tasks[flag].metrics(scores, labels).items():
            out[f"{metric_prefix(split, 'personal')}/{flag}/{name}"] = value
    for split in EVAL_SPLITS:
        by_client: dict[int, list[dict]] = {}
        for row in rows:
            if row["split"] == split:
                by_client.setdefault(row["client_id"], []).append(row)
        for name in primary_metrics(tasks):
            per_client = [np.average([x[name] for x in v], weights=[x["num_rows"] for x in v]) for v in by_client.values()]
            if per_client:
                out[f"{metric_prefix(split, 'personal')}/client_mean/{name}"] = float(np.mean(per_client))
    return out, rows
