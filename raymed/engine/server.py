"""The server actor: owns the global state, runs rounds over the client worker pool, evaluates.

One round::

    sample ⌈fraction·N⌉ clients (seeded by (seed, round))
    ray.put(method.broadcast(state))            one object per round, shared by every worker
    workers train their share of the clients   one call per worker, one partial aggregate back
    state ← method.aggregate(state, merged)
    evaluate (every eval.every rounds and after the last): the global model on each dataset's
    test split, and every client's personalised model on its own held-out rows

Clients' persistent state (FedPer heads, ...) lives in a separate state-store actor that the workers
read and write directly: the server only passes its handle on and never receives a client's state.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import ray

from raymed.config import validate_config
from raymed.data.shards import ShardSet
from raymed.engine.client_state import ClientStateStore
from raymed.engine.runtime import Placement
from raymed.engine.telemetry import Telemetry
from raymed.engine.worker import ClientWorker, float_state, frozen_state
from raymed.errors import ClientFailure, ResourceError
from raymed.methods import ServerState, WeightedMean, build_method, has_server_model


def sample_clients(seed: int, round_: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of a round: a seeded draw without replacement, sorted."""
    k = max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def assign(clients: list[int], cost: dict[int, int], num_workers: int) -> list[list[int]]:
    """Spread clients over workers by longest-processing-time first (deterministic)."""
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    load = [0] * num_workers
    for client in sorted(clients, key=lambda c: (-cost[c], c)):
        w = min(range(num_workers), key=lambda i: (load[i], i))
        groups[w].append(client)
        load[w] += max(cost[client], 1)
    return groups


def report_samples(task, generated: np.ndarray, targets: np.ndarray, round_: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` test reports, generated beside their references (written with the results)."""
    n = min(count, len(targets))
    return [
        {"round": round_, "dataset": task.dataset, "row": i, "diagnosis": task.class_names[int(targets[i, 0])], "reference": ref, "generated": gen}
        for i, (gen, ref) in enumerate(zip(task.decode(generated[:n]), task.decode(targets[:n, 2:])))
    ]


class ServerActor:
    def __init__(
        self,
        cfg: dict[str, Any],
        shard_dir: str,
        num_workers: int,
        run_name: str,
        state_dir: str | None,
        placement: Placement | None = None,
    ):
        self.cfg = validate_config(cfg)
        self.telemetry = Telemetry(run_name)
        self.method = build_method(self.cfg.strategy.name, self.cfg.strategy.params)
        self.shards = ShardSet(shard_dir)
        model = self.method.build_model(self.cfg.model, self.shards.tasks, self.cfg.seed)
        self.state = self.method.init_state(float_state(model))
        frozen = frozen_state(model)
        # One copy in the object store, mapped by every worker of a node; held here for the run's life.
        self.frozen_ref = ray.put(frozen) if frozen else None
        del model
        # A server model in DeepSpeed ranks: the report decoder (the ranks generate the global
        # reports), or a method's own (FedKIM's central model).
        self.decoder = None
        self.reports = any(t.kind == "report" for t in self.shards.tasks.values())
        if has_server_model(self.cfg):
            from raymed.engine.decoder import DecoderGroup

            self.decoder = DecoderGroup(self.cfg, shard_dir, run_name, placement)
        self.sizes = self.shards.client_sizes()
        folder = state_dir if self.cfg.engine.client_state == "disk" else None
        # Inside a placement group (a Tune trial) every actor is pinned to its bundle; otherwise Ray places them.
        helper = {"scheduling_strategy": placement.helper_strategy} if placement else {}
        self.store = (
            ray.remote(ClientStateStore).options(name=f"{run_name}.client-state", num_cpus=0, **helper).remote(folder)
        )
        c = self.cfg.clients
        worker_cls = ray.remote(ClientWorker)
        self.workers = [
            worker_cls.options(
                name=f"{run_name}.client-pool-{i}",
                num_cpus=c.num_cpus,
                num_gpus=c.num_gpus,
                **({"scheduling_strategy": placement.strategy(placement.worker_bundles[i])} if placement else {}),
            ).remote(cfg, shard_dir, i, self.store, run_name, self.frozen_ref)
            for i in range(num_workers)
        ]
        self._worker_info: list[dict[str, Any]] | None = None  # filled by describe(), which waits for them
        self.samples: list[dict[str, Any]] = []  # report generation: this round's sample reports

    def _wait_for_workers(self) -> list[dict[str, Any]]:
        """Ray's resources are logical: a worker that cannot be placed waits forever, so bound the wait."""
        refs = [w.info.remote() for w in self.workers]
        timeout = self.cfg.engine.start_timeout_s
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            c = self.cfg.clients
            raise ResourceError(
                f"{len(pending)} of {len(refs)} client workers (clients.num_cpus={c.num_cpus:g}, clients.num_gpus={c.num_gpus:g} "
                f"each) were not placed within {timeout:g} s: other work holds the cluster's resources (see `ray status`); "
                f"let it finish, lower engine.num_workers, or raise engine.start_timeout_s"
            )
        return ray.get(refs)

    def describe(self) -> dict[str, Any]:
        """Where the workers run, once they all do (raises ResourceError if they cannot be placed)."""
        if self._worker_info is None:
            self._worker_info = self._wait_for_workers()
        return {
            "workers": self._worker_info,
            "num_clients": self.shards.num_clients,
            "synthetic": self.shards.synthetic,
            "pids": {"server": os.getpid(), "client_state": ray.get(self.store.pid.remote())},
            **({"decoder": self.decoder.info} if self.decoder else {}),
        }

    # ---- one round

    def run_round(self) -> dict[str, Any]:
        r = self.state.round + 1
        start = time.perf_counter()
        sampled = sample_clients(self.cfg.seed, r, self.cfg.clients.num, self.cfg.clients.fraction)
        payload_ref = ray.put(self.method.broadcast(self.state))
        if self.cfg.engine.mode == "dedicated":
            chosen = set(sampled)
            groups = [[c] if c in chosen else [] for c in range(len(self.workers))]
        else:
            groups = assign(sampled, {c: self.sizes[c][0] for c in sampled}, len(self.workers))
        futures = [
            self.workers[w].train.remote(r, payload_ref, group)
            for w, group in enumerate(groups)
            if group
        ]
        results = ray.get(futures)

        merged: WeightedMean = self.method.new_accumulator()
        records: list[dict[str, Any]] = []
        for result in results:
            merged.merge(result["accumulator"])
            records += result["records"]
        if merged.count == 0:
            reasons = "; ".join(f"client {x['client_id']}: {x['rejected']}" for x in records[:3])
            raise ClientFailure(f"round {r}: every client update was rejected ({reasons}); lower clients.lr or check the data")
        self.state = self.method.aggregate(self.state, merged)
        self.state.round = r
        if self.decoder is not None:
            self.state = self.method.server_update(self.state, self.decoder, r)
        train_s = time.perf_counter() - start  # sampling -> aggregated model, evaluation excluded

        accepted = [x for x in records if x["rejected"] is None]
        metrics: dict[str, float] = {
            "round": r,
            "clients/sampled": len(sampled),
            "clients/aggregated": merged.count,
            "clients/rejected": len(records) - merged.count,
            "train/loss": float(np.average([x["train_loss"] for x in accepted], weights=[x["num_train"] for x in accepted])),
            "comm/bytes_down": float(sum(x["bytes_down"] for x in records)),
            "comm/bytes_up": float(sum(x["bytes_up"] for x in records)),
            "memory/worker_peak_rss_mb": max(x["peak_rss_mb"] for x in results),
            "time/train_s": train_s,
        }
        evaluation: list[dict[str, Any]] = []
        self.samples = []
        if r % self.cfg.eval.every == 0 or r == self.cfg.rounds:
            eval_start = time.perf_counter()
            metrics.update(self.evaluate_global())
            if self.decoder is not None:
                metrics.update(self.method.evaluate_server_model(self.decoder))
            if self.cfg.eval.personalised:
                personal_metrics, evaluation = self.evaluate_personalised(r)
                metrics.update(personal_metrics)
            metrics["time/eval_s"] = time.perf_counter() - eval_start
        metrics["time/round_s"] = time.perf_counter() - start
        self.telemetry.round_finished(metrics, examples=sum(x["num_train"] * self.cfg.clients.local_epochs for x in records))
        return {"metrics": metrics, "clients": records, "evaluation": evaluation, "reports": self.samples}

    # ---- evaluation

    def evaluate_global(self) -> dict[str, float]:
        weights = self.method.eval_weights(self.state)
        if weights is None:
            return {}
        if self.reports:  # the DeepSpeed ranks hold the master report model and generate
            self.decoder.load(weights)
            sizes = {flag: len(self.shards.test(flag)) for flag in self.shards.tasks}
            parts = self.decoder.generate(sizes, self.cfg.eval.batch_size)
        else:
            chunks: list[list[tuple[str, int, int]]] = [[] for _ in self.workers]
            for flag in self.shards.tasks:
                n = len(self.shards.test(flag))
                step = math.ceil(n / len(self.workers))
                for i, start in enumerate(range(0, n, step)):
                    chunks[i % len(self.workers)].append((flag, start, min(start + step, n)))
            ref = ray.put(weights)
            parts = sum(ray.get([w.evaluate_global.remote(ref, c) for w, c in zip(self.workers, chunks) if c]), [])
        parts.sort(key=lambda p: (p[0], p[1]))  # (dataset, first row): chunks back in test-split order
        out: dict[str, float] = {}
        for flag, task in self.shards.tasks.items():
            scores = np.concatenate([s for f, _, s in parts if f == flag])
            test = self.shards.test(flag)
            targets = task.targets(test.images, test.labels)
            for name, value in task.metrics(scores, targets).items():
                out[f"global/{flag}/{name}"] = value
            if task.kind == "report":
                self.samples += report_samples(task, scores, targets, self.state.round, self.cfg.eval.report_samples)
        for name in self._primary_metrics():
            out[f"global/mean/{name}"] = float(np.mean([out[f"global/{f}/{name}"] for f in self.shards.tasks]))
        return out

    def _primary_metrics(self) -> list[str]:
        """The metric runs are summarised by (acc, psnr) when every dataset's task has the same one."""
        names = {t.primary_metric for t in self.shards.tasks.values()}
        return sorted(names) if len(names) == 1 else []

    def evaluate_personalised(self, r: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        clients = sorted(self.sizes)
        groups = assign(clients, {c: self.sizes[c][1] for c in clients}, len(self.workers))
        ref = ray.put(self.method.broadcast(self.state))
        futures = [w.evaluate_personalised.remote(ref, g) for w, g in zip(self.workers, groups) if g]
        parts = sum(ray.get(futures), [])
        rows, pooled = [], {}
        for part in parts:
            task = self.shards.tasks[part["dataset"]]
            rows.append({"round": r, "client_id": part["client_id"], "dataset": part["dataset"], "num_holdout": len(part["labels"]), **task.metrics(part["scores"], part["labels"])})
            pooled.setdefault(part["dataset"], []).append(part)
        out: dict[str, float] = {}
        for flag, items in pooled.items():
            scores = np.concatenate([p["scores"] for p in items])
            labels = np.concatenate([p["labels"] for p in items])
            for name, value in self.shards.tasks[flag].metrics(scores, labels).items():
                out[f"personal/{flag}/{name}"] = value
        by_client: dict[int, list[dict]] = {}
        for row in rows:
            by_client.setdefault(row["client_id"], []).append(row)
        for name in self._primary_metrics():
            per_client = [np.average([x[name] for x in v], weights=[x["num_holdout"] for x in v]) for v in by_client.values()]
            out[f"personal/client_mean/{name}"] = float(np.mean(per_client))
        return out, rows

    # ---- state access (checkpoints, tests)

    def get_state(self) -> ServerState:
        return self.state

    def final_model(self) -> tuple[ServerState, dict]:
        """The state and the tasks, for the run's model file."""
        return self.state, self.shards.tasks

    def set_state(self, state: ServerState) -> int:
        self.state = state
        return state.round

    def client_state_store(self) -> Any:
        """The handle of the clients' state actor (checkpoints read it directly, not through here)."""
        return self.store
