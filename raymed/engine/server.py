"""The server actor: owns the global state and runs the round loop; the client workers are its
:class:`~raymed.engine.pool.WorkerPool`, evaluation is :mod:`raymed.engine.evaluation`.

One round::

    sample ⌈fraction·N⌉ clients (seeded by (seed, round))
    ray.put(method.broadcast(state))            one object per state, shared by every worker, by the
                                                round's evaluations and by the next round's training
    workers train their share of the clients   one call per worker, one partial aggregate per node back
    state ← method.aggregate(state, merged)
    evaluate (every eval.every rounds and after the last): the global model on each dataset's
    validation and test split, and every client's personalised model on its own rows

Clients' persistent state (FedPer heads, ...) lives in a separate state-store actor that the workers
read and write directly: the server only passes its handle on and never receives a client's state.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymed.config import clients_per_round
from raymed.experiment import validate_config
from raymed.data.shards import ShardSet
from raymed.engine.client_state import ClientStateStore
from raymed.engine.devices import check_gpu_fit
from raymed.engine.faults import FaultPlan
from raymed.engine.placement import Placement
from raymed.engine.telemetry import Telemetry
from raymed.engine.evaluation import evaluate_global, evaluate_personalised
from raymed.engine.pool import WorkerPool, assign
from raymed.engine.worker import client_record, float_state, frozen_state
from raymed.errors import ClientFailure, RaymedError
from raymed.methods import ServerState, WeightedMean, build_method, has_server_model

logger = logging.getLogger("raymed")


def sample_clients(seed: int, round_: int, num_clients: int, fraction: float, online: list[int] | None = None) -> list[int]:
    """The clients of a round: a seeded draw of round(fraction·N) clients without replacement,
    sorted, from the ``online`` ones (default: all N); fewer when fewer are online."""
    pool = np.arange(num_clients) if online is None else np.asarray(online, dtype=int)
    k = min(clients_per_round(num_clients, fraction), len(pool))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return sorted(int(c) for c in rng.choice(pool, size=k, replace=False)) if k else []


class ServerActor:
    def __init__(
        self,
        cfg: dict[str, Any],
        shard_dir: str,
        num_workers: int,
        run_name: str,
        state_dir: str | None,
        placement: Placement | None = None,
        worker_nodes: list[str] | None = None,
    ):
        self.cfg = validate_config(cfg)
        self.telemetry = Telemetry(run_name)
        self.method = build_method(self.cfg.strategy.name, self.cfg.strategy.params)
        self.shards = ShardSet(shard_dir)
        model = self.method.build_model(self.cfg.model, self.shards.tasks, self.cfg.seed)
        # A refusal raised here would reach the driver as a bare ActorDiedError (Ray keeps only the
        # text of a constructor's error): it is kept and raised by the first call, whole.
        self.refusal: RaymedError | None = None
        try:
            self.method.check_model(self.cfg, model)
        except RaymedError as err:
            self.refusal = err
        self._broadcast: tuple[tuple[int, int], Any] | None = None  # ((state's id, round), object ref): see broadcast_ref
        self.state = self.method.init_state(float_state(model))
        frozen = frozen_state(model)
        # One copy in the object store, mapped by every worker of a node; held here for the run's life.
        self.frozen_ref = ray.put(frozen) if frozen else None
        del model
        # A server model in DeepSpeed ranks: a run task's generator (the ranks generate the global
        # model's outputs), or a method's own (FedKIM's central model).
        self.server_model = None
        # Generated outputs come from the server model's ranks, not from the client pool.
        self.generated = any(t.generated for t in self.shards.tasks.values())
        if has_server_model(self.cfg):
            from raymed.engine.server_model import ServerModelGroup  # DeepSpeed: imported by runs that use it only

            self.server_model = ServerModelGroup(self.cfg, shard_dir, run_name, placement)
        self.sizes = self.shards.client_sizes()
        folder = state_dir if self.cfg.engine.client_state == "disk" else None
        # Inside a placement group (a Tune trial) every actor is pinned to its bundle; otherwise Ray places them.
        # Elsewhere the clients' state lives on the server's own node: losing another node loses no state.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        helper = {"scheduling_strategy": placement.helper_strategy if placement else here}
        self.store = (
            # threaded: it writes a checkpoint segment while the next round's workers read and store states
            ray.remote(ClientStateStore).options(name=f"{run_name}.client-state", num_cpus=0, max_concurrency=4, **helper).remote(folder)
        )
        self.faults = FaultPlan(self.cfg)
        self.pool = WorkerPool(self.cfg, (cfg, shard_dir, run_name, placement), self.store, self.frozen_ref, num_workers, worker_nodes)
        self._worker_info: list[dict[str, Any]] | None = None  # filled by describe(), which waits for them
        self.samples: list[dict[str, Any]] = []  # generated outputs beside their references (tasks that generate text)
        self.selected: ServerState | None = None  # the state of the round selected on validation

    def describe(self) -> dict[str, Any]:
        """Where the workers run, once they all do (raises ResourceError if they cannot be placed, and
        the method's refusal of the model, if any)."""
        if self.refusal is not None:
            raise self.refusal
        if self._worker_info is None:
            self._worker_info = self.pool.wait_all()
        return {
            "workers": self._worker_info,
            "num_clients": self.shards.num_clients,
            "synthetic": self.shards.synthetic,
            "pids": {"server": os.getpid(), "client_state": ray.get(self.store.pid.remote())},
            "server_node": ray.get_runtime_context().get_node_id(),
            **({"decoder": self.server_model.info} if self.server_model else {}),
        }

    # ---- one round

    def broadcast_ref(self) -> Any:
        """The current state's broadcast in the object store, put once: the round's evaluations and
        the next round's training read the same object (a model's weights are not copied three
        times a round). A new state (aggregation, a server update, a resume) or round puts it anew."""
        key = (id(self.state), self.state.round)
        if self._broadcast is None or self._broadcast[0] != key:
            self._broadcast = None  # the previous object can go before the next is put
            self._broadcast = (key, ray.put(self.method.broadcast(self.state)))
        return self._broadcast[1]

    def run_round(self) -> dict[str, Any]:
        r = self.state.round + 1
        start = time.perf_counter()
        online = self.faults.online(r)
        sampled = sample_clients(self.cfg.seed, r, self.cfg.clients.num, self.cfg.clients.fraction, online)
        merged, records, peaks, partials = self._train_clients(r, self.broadcast_ref(), sampled)

        accepted = [x for x in records if x["failed"] is None and x["rejected"] is None]
        final = {x["client_id"]: x for x in records}  # each client's last try
        if sampled and merged.count == 0:
            reasons = "; ".join(f"client {x['client_id']}: {x['failed'] or x['rejected']}" for x in list(final.values())[:3])
            raise ClientFailure(f"round {r}: every client update was rejected or lost ({reasons}); lower clients.lr or check the data and the faults settings")
        if not sampled:
            logger.warning("round %d: no client is online (clients.availability); the model stays as it was", r)
        else:
            self.state = self.method.aggregate(self.state, merged)
        self.state.round = r
        if self.server_model is not None:
            self.state = self.method.server_update(self.state, self.server_model, r)
        train_s = time.perf_counter() - start  # sampling -> aggregated model, evaluation excluded

        metrics: dict[str, float] = {
            "round": r,
            "clients/online": len(online),
            "clients/sampled": len(sampled),
            "clients/aggregated": merged.count,
            "clients/rejected": sum(1 for x in final.values() if x["failed"] is None and x["rejected"] is not None),
            "clients/failed": sum(1 for x in final.values() if x["failed"] is not None),
            "clients/retried": sum(1 for x in final.values() if x["attempt"] > 0),
            "clients/late": sum(1 for x in final.values() if x["late"]),
            "comm/partials_to_server": float(partials),  # one per node: its first worker reduces the others (_dispatch)
            "train/loss": float(np.average([x["train_loss"] for x in accepted], weights=[x["num_train"] for x in accepted])) if accepted else float("nan"),
            "train/lr": self.cfg.clients.lr_at(r, self.cfg.rounds),
            "comm/bytes_down": float(sum(x["bytes_down"] for x in records)),
            "comm/bytes_up": float(sum(x["bytes_up"] for x in records)),
            "memory/worker_peak_rss_mb": max(peaks, default=float("nan")),
            "time/train_s": train_s,
            **self.method.round_metrics(self.state, records),
        }
        evaluation: list[dict[str, Any]] = []
        self.samples = []
        if r % self.cfg.eval.every == 0 or r == self.cfg.rounds:
            eval_start = time.perf_counter()
            if self.cfg.eval.global_model:
                global_metrics, self.samples = evaluate_global(self)
                metrics.update(global_metrics)
            if self.server_model is not None:
                metrics.update(self.method.evaluate_server_model(self.server_model))
            if self.cfg.eval.personalised:
                personal_metrics, evaluation = evaluate_personalised(self, r)
                metrics.update(personal_metrics)
            metrics["time/eval_s"] = time.perf_counter() - eval_start
        if self.cfg.clients.num_gpus > 0:  # after training and evaluation, both of which peak
            metrics["memory/worker_gpu_peak_mb"] = self._check_gpu_memory() / 2**20
        metrics["time/round_s"] = time.perf_counter() - start
        self.telemetry.round_finished(metrics, examples=sum(self.cfg.clients.examples_per_round(x["num_train"]) for x in accepted))
        return {"metrics": metrics, "clients": records, "evaluation": evaluation, "samples": self.samples}

    def _check_gpu_memory(self) -> float:
        """Refuse (one line) workers that share a GPU and together peak past it: Ray's GPU fractions
        are logical and cap nothing. Returns the largest worker's peak, in bytes."""
        live = self.pool.live()
        measured = [m for m in ray.get([self.pool.workers[i].gpu_memory.remote() for i in live]) if m is not None]
        check_gpu_fit(measured)
        return float(max((m["peak_bytes"] for m in measured), default=float("nan")))

    def _train_clients(self, r: int, payload_ref: Any, sampled: list[int]) -> tuple[WeightedMean, list[dict[str, Any]], list[float], int]:
        """Train the round's clients over the live workers; failed ones are retried or dropped as
        ``engine.on_client_failure`` says. Returns the merged aggregate, every try's record, the
        workers' peak memory, and how many partial aggregates the server merged."""
        engine = self.cfg.engine
        merged: WeightedMean = self.method.new_accumulator()
        records: list[dict[str, Any]] = []
        peaks: list[float] = []
        todo, attempt, partials = list(sampled), 0, 0
        while todo:
            live = self.pool.live()
            if engine.mode == "dedicated" and attempt == 0 and all(c in live for c in todo):
                groups = {c: [c] for c in todo}
            else:
                parts = assign(todo, {c: self.sizes[c][0] for c in todo}, len(live))
                groups = {w: g for w, g in zip(live, parts) if g}
            failed = []
            for result in self.pool.train(r, payload_ref, groups, attempt, lambda w, why: self._lost(w, groups[w], r, attempt, why)):
                merged.merge(result["accumulator"])
                partials += result["accumulator"].count > 0
                records += result["records"]
                peaks.append(result["peak_rss_mb"])
                failed += [x["client_id"] for x in result["records"] if x["failed"] is not None]
            retry = engine.on_client_failure == "retry" and attempt < engine.client_retries
            todo, attempt = (sorted(failed), attempt + 1) if retry else ([], attempt)
        return merged, records, peaks, partials

    def _lost(self, w: int, clients: list[int], r: int, attempt: int, why: str) -> dict[str, Any]:
        if self.cfg.engine.on_client_failure == "stop":
            raise ClientFailure(f"round {r}: {why} while training clients {clients}; set engine.on_client_failure=retry or drop to go on without them")
        self.pool.replace(w, why)
        records = []
        for c in clients:
            record = client_record(r, c, self.shards.client(c), w, attempt, c in self.faults.byzantine)
            record["failed"] = why
            records.append(record)
        return {"accumulator": self.method.new_accumulator(), "records": records, "peak_rss_mb": float("nan")}

    # ---- state access (checkpoints, tests)

    def get_state(self) -> ServerState:
        return self.state

    def keep_selected(self) -> None:
        """Keep a copy of the current state: its round was just selected on validation."""
        self.selected = ServerState({k: np.array(v, copy=True) for k, v in self.state.weights.items()}, self.state.round, dict(self.state.extra))

    def get_selected(self) -> ServerState | None:
        return self.selected

    def set_selected(self, state: ServerState | None) -> None:
        self.selected = state

    def final_model(self) -> tuple[ServerState, dict]:
        """The state and the tasks, for the run's model file."""
        return self.state, self.shards.tasks

    def set_state(self, state: ServerState) -> int:
        self.state, self._broadcast = state, None
        return state.round

    def client_state_store(self) -> Any:
        """The handle of the clients' state actor (checkpoints read it directly, not through here)."""
        return self.store
