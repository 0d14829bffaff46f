"""Per-node reduction: the server receives one partial aggregate per node, not one per worker.

Every node that runs two or more client workers gets a :class:`NodeReducer`, an actor without
resources of its own placed on that node. For each round the server hands it the references of its
node's training calls; it folds each worker's partial into one as soon as that worker and the ones
before it have answered — a fixed order, so the sum never depends on who finished first — while the
slower workers still train. Partials move through the node's own object store, so the bytes that
reach the server's node grow with the number of nodes, not of workers, and the server merges one
partial per node.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from raymed.config import validate_config
from raymed.methods import build_method


class NodeReducer:
    def __init__(self, cfg: dict[str, Any]):
        config = validate_config(cfg)
        self.method = build_method(config.strategy.name, config.strategy.params)

    def reduce(self, calls: list[tuple[int, Any]], timeout_s: float | None) -> dict[str, Any]:
        """Merge the results of ``calls`` — [(worker slot, its train call's reference)], in that
        order. A worker that died, or did not answer within ``timeout_s``, is listed under ``lost``
        with the reason (the server replaces it and records its clients as failed)."""
        merged = self.method.new_accumulator()
        records: list[dict[str, Any]] = []
        peaks: list[float] = []
        lost: list[tuple[int, str]] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for worker, ref in calls:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done, _ = ray.wait([ref], timeout=left)
            if not done:
                lost.append((worker, f"worker {worker} did not answer within engine.worker_timeout_s={timeout_s:g} s"))
                continue
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # killed, out of memory, or its node is gone
                lost.append((worker, f"worker {worker} died ({type(exc).__name__})"))
                continue
            merged.merge(result["accumulator"])
            records += result["records"]
            peaks.append(result["peak_rss_mb"])
        return {"accumulator": merged, "records": records, "peak_rss_mb": max(peaks, default=float("nan")), "lost": lost}

    def pid(self) -> int:
        import os

        return os.getpid()
