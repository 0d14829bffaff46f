"""The server actor: owns the global state, runs rounds over the client worker pool, evaluates.

One round::

    sample ⌈fraction·N⌉ clients (seeded by (seed, round))
    ray.put(method.broadcast(state))            one object per state, shared by every worker, by the
                                                round's evaluations and by the next round's training
    workers train their share of the clients   one call per worker, one partial aggregate back
    state ← method.aggregate(state, merged)
    evaluate (every eval.every rounds and after the last): the global model on each dataset's
    test split, and every client's personalised model on its own held-out rows

Clients' persistent state (FedPer heads, ...) lives in a separate state-store actor that the workers
read and write directly: the server only passes its handle on and never receives a client's state.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable
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
from raymed.engine.runtime import Placement
from raymed.engine.telemetry import Telemetry
from raymed.engine.worker import ClientWorker, EvalChunk, answers, client_record, float_state, frozen_state
from raymed.results.metrics import EVAL_SPLITS, metric_prefix
from raymed.errors import ClientFailure, RaymedError, ResourceError
from raymed.methods import ServerState, WeightedMean, build_method, has_server_model

logger = logging.getLogger("raymed")


def sample_clients(seed: int, round_: int, num_clients: int, fraction: float, online: list[int] | None = None) -> list[int]:
    """The clients of a round: a seeded draw of round(fraction·N) clients without replacement,
    sorted, from the ``online`` ones (default: all N); fewer when fewer are online."""
    pool = np.arange(num_clients) if online is None else np.asarray(online, dtype=int)
    k = min(clients_per_round(num_clients, fraction), len(pool))
    rng = np.random.default_rng([seed, round_, 0x5A3])
    return sorted(int(c) for c in rng.choice(pool, size=k, replace=False)) if k else []


def assign(clients: list[int], cost: dict[int, int], num_workers: int) -> list[list[int]]:
    """Spread clients over workers by longest-processing-time first (deterministic)."""
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    load = [0] * num_workers
    for client in sorted(clients, key=lambda c: (-cost[c], c)):
        w = min(range(num_workers), key=lambda i: (load[i], i))
        groups[w].append(client)
        load[w] += max(cost[client], 1)
    return groups


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
            from raymed.engine.server_model import ServerModelGroup

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
        self._spawn = (cfg, shard_dir, run_name, placement)
        self.worker_nodes = worker_nodes  # the node each worker slot is planned on (runtime.plan_nodes), or None
        self.replaced = [0] * num_workers  # how many times each pool slot's worker was replaced
        self.workers = [self._start_worker(i) for i in range(num_workers)]
        self._ready = [w.info.remote() for w in self.workers]  # a worker is live once this answers
        self.node_of: dict[int, str] = {}  # worker slot -> the node it runs on, once it answered
        self._worker_info: list[dict[str, Any]] | None = None  # filled by describe(), which waits for them
        self.samples: list[dict[str, Any]] = []  # generated outputs beside their references (tasks that generate text)
        self.selected: ServerState | None = None  # the state of the round selected on validation

    def _start_worker(self, i: int) -> Any:
        cfg, shard_dir, run_name, placement = self._spawn
        c = self.cfg.clients
        suffix = f".{self.replaced[i]}" if self.replaced[i] else ""
        return (
            ray.remote(ClientWorker)
            .options(
                name=f"{run_name}.client-pool-{i}{suffix}",
                num_cpus=c.num_cpus,
                num_gpus=c.num_gpus,
                **self._where(i, placement),
            )
            .remote(cfg, shard_dir, i, self.store, run_name, self.frozen_ref)
        )

    def _where(self, i: int, placement: Placement | None) -> dict[str, Any]:
        """Worker slot ``i``'s scheduling: its bundle in a placement group (a Tune trial), else its
        planned node (soft: a replacement for a worker of a lost node goes wherever it fits)."""
        if placement:
            return {"scheduling_strategy": placement.strategy(placement.worker_bundles[i])}
        if self.worker_nodes and i < len(self.worker_nodes):
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(self.worker_nodes[i], soft=True)}
        return {}

    def _replace_worker(self, i: int, why: str) -> None:
        """A worker died or hung: kill what is left of it and start a new one in its slot. The new
        one joins once it answers (on a lost node it may wait for resources: the others go on)."""
        logger.warning("%s; replacing it", why)
        ray.kill(self.workers[i], no_restart=True)
        self.replaced[i] += 1
        self.workers[i] = self._start_worker(i)
        self._ready[i] = self.workers[i].info.remote()

    def live_workers(self) -> list[int]:
        """Indices of the workers that answer; waits (engine.start_timeout_s) when none does yet."""
        done, _ = ray.wait(self._ready, num_returns=len(self._ready), timeout=0)
        if not done:
            done, _ = ray.wait(self._ready, num_returns=1, timeout=self.cfg.engine.start_timeout_s)
        live = []
        for i, ref in enumerate(self._ready):
            if ref in done:
                try:
                    self.node_of[i] = ray.get(ref)["node_id"]
                    live.append(i)
                except ray.exceptions.RayError:  # died while starting: try a fresh one
                    self._replace_worker(i, f"worker {i} failed to start")
        if not live:
            raise ResourceError(
                f"no client worker is alive or could be placed within engine.start_timeout_s={self.cfg.engine.start_timeout_s:g} s; "
                f"see `ray status` for lost nodes and held resources"
            )
        return live

    def _wait_for_workers(self) -> list[dict[str, Any]]:
        """Ray's resources are logical: a worker that cannot be placed waits forever, so bound the wait."""
        refs = self._ready
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
        """Where the workers run, once they all do (raises ResourceError if they cannot be placed, and
        the method's refusal of the model, if any)."""
        if self.refusal is not None:
            raise self.refusal
        if self._worker_info is None:
            self._worker_info = self._wait_for_workers()
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
                metrics.update(self.evaluate_global())
            if self.server_model is not None:
                metrics.update(self.method.evaluate_server_model(self.server_model))
            if self.cfg.eval.personalised:
                personal_metrics, evaluation = self.evaluate_personalised(r)
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
        live = self.live_workers()
        measured = [m for m in ray.get([self.workers[i].gpu_memory.remote() for i in live]) if m is not None]
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
            live = self.live_workers()
            if engine.mode == "dedicated" and attempt == 0 and all(c in live for c in todo):
                groups = {c: [c] for c in todo}
            else:
                parts = assign(todo, {c: self.sizes[c][0] for c in todo}, len(live))
                groups = {w: g for w, g in zip(live, parts) if g}
            failed = []
            for result in self._dispatch(r, payload_ref, groups, attempt):
                merged.merge(result["accumulator"])
                partials += result["accumulator"].count > 0
                records += result["records"]
                peaks.append(result["peak_rss_mb"])
                failed += [x["client_id"] for x in result["records"] if x["failed"] is not None]
            retry = engine.on_client_failure == "retry" and attempt < engine.client_retries
            todo, attempt = (sorted(failed), attempt + 1) if retry else ([], attempt)
        return merged, records, peaks, partials

    def _dispatch(self, r: int, payload_ref: Any, groups: dict[int, list[int]], attempt: int):
        """One training call per worker, reduced per node: the node's first worker, once its own
        clients are trained, folds in the partials of the node's other workers (through the node's
        object store, in worker order, each as soon as it is there), so one partial per node reaches
        the server, which merges them in node order (the sums never depend on who finished first).
        A worker that dies or exceeds engine.worker_timeout_s is replaced, and its clients come back
        as failed records (or stop the run under policy stop)."""
        timeout = self.cfg.engine.worker_timeout_s
        by_node: dict[str, list[int]] = {}
        for w in groups:
            by_node.setdefault(self.node_of.get(w, f"worker-{w}"), []).append(w)
        trees = []  # (the reducing worker, its call, [(other worker, its call)])
        for workers in by_node.values():
            first, rest = workers[0], workers[1:]
            others = [(w, self.workers[w].train.remote(r, payload_ref, groups[w], attempt)) for w in rest]
            trees.append((first, self.workers[first].train.remote(r, payload_ref, groups[first], attempt, others, timeout), others))
        # The reducing worker keeps the deadline for the others itself: give it a little longer to say which were late.
        deadline = None if timeout is None else time.monotonic() + timeout + max(1.0, 0.1 * timeout)
        for first, ref, others in trees:
            for _, result, why in answers([(first, ref)], deadline, timeout):
                if why is None:
                    yield from (self._lost(w, groups[w], r, attempt, lost) for w, lost in result.pop("lost"))
                    yield result
                    continue
                # The reducing worker is gone: take its node's other partials directly.
                yield self._lost(first, groups[first], r, attempt, why)
                for w, other, lost in answers(others, deadline, timeout):
                    yield other if lost is None else self._lost(w, groups[w], r, attempt, lost)

    def _lost(self, w: int, clients: list[int], r: int, attempt: int, why: str) -> dict[str, Any]:
        if self.cfg.engine.on_client_failure == "stop":
            raise ClientFailure(f"round {r}: {why} while training clients {clients}; set engine.on_client_failure=retry or drop to go on without them")
        self._replace_worker(w, why)
        records = []
        for c in clients:
            record = client_record(r, c, self.shards.client(c), w, attempt, c in self.faults.byzantine)
            record["failed"] = why
            records.append(record)
        return {"accumulator": self.method.new_accumulator(), "records": records, "peak_rss_mb": float("nan")}

    # ---- evaluation

    def evaluate_global(self) -> dict[str, float]:
        """The global model on each dataset's validation split (``val/global/<flag>/...``) and test
        split (``global/<flag>/...``), with the mean over datasets of the primary metric."""
        weights = self.method.eval_weights(self.state)
        if weights is None:
            return {}
        sizes = {(split, flag): len(self.shards.evaluation_split(flag, split)) for split in EVAL_SPLITS for flag in self.shards.tasks}
        sizes = {key: n for key, n in sizes.items() if n}
        if self.generated:  # the DeepSpeed ranks hold the server model and generate
            self.server_model.load(weights)
            parts = self.server_model.generate(sizes, self.cfg.eval.batch_size)
        else:
            chunks: list[list[EvalChunk]] = [[] for _ in self.live_workers()]
            for (split, flag), n in sizes.items():
                step = math.ceil(n / len(chunks))
                for i, start in enumerate(range(0, n, step)):
                    chunks[i % len(chunks)].append((split, flag, start, min(start + step, n)))
            # The broadcast object serves when it is these weights (FedAvg and most methods); else they go in once.
            ref = self.broadcast_ref() if self.method.broadcast(self.state) is weights else ray.put(weights)
            parts = sum(self._on_workers(lambda w, c, attempt: w.evaluate_global.remote(ref, c), chunks, "evaluating the global model"), [])
        parts.sort(key=lambda p: p[:3])  # (split, dataset, first row): chunks back in split order
        out: dict[str, float] = {}
        for split in EVAL_SPLITS:
            prefix = metric_prefix(split, "global")
            for flag, task in self.shards.tasks.items():
                if (split, flag) not in sizes:
                    continue
                scores = np.concatenate([s for sp, f, _, s in parts if (sp, f) == (split, flag)])
                rows = self.shards.evaluation_split(flag, split)
                targets = task.targets(rows.images, rows.labels)
                for name, value in task.metrics(scores, targets).items():
                    out[f"{prefix}/{flag}/{name}"] = value
                if split == "test":
                    self.samples += task.samples(scores, targets, self.state.round, self.cfg.eval.report_samples)
            for name in self._primary_metrics():
                values = [out[f"{prefix}/{f}/{name}"] for f in self.shards.tasks if f"{prefix}/{f}/{name}" in out]
                if values:
                    out[f"{prefix}/mean/{name}"] = float(np.mean(values))
        return out

    def _on_workers(self, call: Callable[[Any, list, int], Any], work: list[list], what: str) -> list[Any]:
        """``call(worker, items, attempt)`` for each non-empty list of ``work``, spread over the live workers;
        the answers in ``work``'s order. A worker that dies meanwhile (killed, out of memory) is
        replaced and its items go again to a live worker, as a training client's are, up to
        ``engine.client_retries`` times (``on_client_failure: retry``); otherwise the run stops, saying why."""
        engine = self.cfg.engine
        answers: dict[int, Any] = {}
        pending = [(i, items) for i, items in enumerate(work) if items]
        for attempt in itertools.count():
            live = self.live_workers()
            calls = [(i, items, live[k % len(live)]) for k, (i, items) in enumerate(pending)]
            calls = [(i, items, w, call(self.workers[w], items, attempt)) for i, items, w in calls]
            failed = []
            for i, items, w, ref in calls:
                try:
                    answers[i] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    why = f"worker {w} died while {what} ({type(exc).__name__})"
                    if engine.on_client_failure != "retry" or attempt >= engine.client_retries:
                        raise ClientFailure(
                            f"round {self.state.round}: {why}; set engine.on_client_failure=retry (and engine.client_retries) to evaluate on a "
                            f"replacement worker, or `raymed run --resume RUN_DIR` to continue from the last checkpoint"
                        ) from None
                    if w not in {x for _, _, x in failed}:  # one replacement per dead worker
                        self._replace_worker(w, why)
                    failed.append((i, items, w))
            pending = [(i, items) for i, items, _ in failed]
            if not pending:
                break
        return [answers[i] for i in sorted(answers)]

    def _primary_metrics(self) -> list[str]:
        """The metric runs are summarised by (acc, psnr) when every dataset's task has the same one."""
        names = {t.primary_metric for t in self.shards.tasks.values()}
        return sorted(names) if len(names) == 1 else []

    def evaluate_personalised(self, r: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Every client's personalised model on its own validation rows (``val/personal/...``) and
        held-out rows (``personal/...``): pooled per dataset, and the mean over clients."""
        clients = sorted(self.sizes)
        limit = self.cfg.eval.personal_clients
        if limit is not None and len(clients) > limit:  # a seeded sample, the same clients every round
            clients = sorted(np.random.default_rng([self.cfg.seed, 0xE7A1]).choice(clients, limit, replace=False).tolist())
        groups = assign(clients, {c: self.sizes[c][1] + self.sizes[c][2] for c in clients}, len(self.live_workers()))
        ref = self.broadcast_ref()
        parts = sum(self._on_workers(lambda w, g, attempt: w.evaluate_personalised.remote(ref, g, r, attempt), groups, "evaluating personalised models"), [])
        unseen = [part["client_id"] for part in parts if part.get("unseen")]
        parts = [part for part in parts if not part.get("unseen")]
        rows, pooled = [], {}
        for part in parts:
            task = self.shards.tasks[part["dataset"]]
            rows.append(
                {"round": r, "client_id": part["client_id"], "dataset": part["dataset"], "split": part["split"], "num_rows": len(part["labels"]),
                 **task.metrics(part["scores"], part["labels"])}
            )
            pooled.setdefault((part["split"], part["dataset"]), []).append(part)
        out: dict[str, float] = {}
        if len(clients) < len(self.sizes):
            out["eval/personal_clients_sampled"] = float(len(clients))
        if self.method.personal_state:  # clients left out: never sampled, their model would be the seeded init
            out["eval/unseen_clients"] = float(len(unseen))
        for (split, flag), items in sorted(pooled.items()):
            scores = np.concatenate([p["scores"] for p in items])
            labels = np.concatenate([p["labels"] for p in items])
            for name, value in self.shards.tasks[flag].metrics(scores, labels).items():
                out[f"{metric_prefix(split, 'personal')}/{flag}/{name}"] = value
        for split in EVAL_SPLITS:
            by_client: dict[int, list[dict]] = {}
            for row in rows:
                if row["split"] == split:
                    by_client.setdefault(row["client_id"], []).append(row)
            for name in self._primary_metrics():
                per_client = [np.average([x[name] for x in v], weights=[x["num_rows"] for x in v]) for v in by_client.values()]
                if per_client:
                    out[f"{metric_prefix(split, 'personal')}/client_mean/{name}"] = float(np.mean(per_client))
        return out, rows

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
