"""Client worker: a long-lived Ray actor that trains many virtual clients in place.

It builds the model, the method and the memory-mapped shard reader once, then for each round trains
the clients it is given one after another, folds their updates into one partial aggregate, and sends
back that partial, the per-client records and the clients' new persistent state. This is the pfl
pattern (workers reused across clients, one reduce per worker per round) rather than Flower's
(a fresh client object per client per round).
"""

from __future__ import annotations

import logging
import os
import resource
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from raymed.experiment import validate_config
from raymed.data.shards import ClientShard, ShardSet, Split
from raymed.engine.client_state import ClientStates
from raymed.engine.devices import assigned_device, assigned_gpu_ids, gpu_peak_bytes
from raymed.engine.faults import FaultPlan
from raymed.engine.runtime import configure_torch
from raymed.engine.telemetry import Telemetry
from raymed.errors import ClientFailure, RaymedError, ResourceError
from raymed.methods import ClientContext, ClientUpdate, Weights, build_method
from raymed.methods.base import client_context, load_weights, nbytes

logger = logging.getLogger("raymed.worker")

# Progress gauge period: Ray exports metrics every few seconds, and setting a gauge inside a Ray
# worker costs about a millisecond, as much as training a small client (measured: 50 three-row
# clients 0.28 s in a plain process, 0.36-0.41 s in a Ray actor setting it per client).
_PROGRESS_EVERY_S = 0.5
EvalChunk = tuple[str, str, int, int]  # (split: val | test, dataset, first row, end row)


def float_state(model: torch.nn.Module) -> Weights:
    """The model's floating-point state (parameters and running statistics) as numpy arrays, without
    what it never sends (``model.unsent_keys``: frozen weights, which never change, and the second
    name of a tied weight)."""
    unsent = getattr(model, "unsent_keys", ())
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point() and k not in unsent}


def frozen_state(model: torch.nn.Module) -> Weights:
    """The model's frozen weights (``model.frozen_keys``: a decoder under LoRA), to share through the object store."""
    frozen = getattr(model, "frozen_keys", ())
    return {k: v.detach().cpu().numpy() for k, v in model.named_parameters() if k in frozen}  # tied weights once


def share_frozen(model: nn.Module, frozen: dict[str, np.ndarray]) -> None:
    """Point the model's frozen weights at ``frozen`` (arrays from Ray's object store, shared by every
    process of a node) instead of a private copy; they are read, never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: torch warns that it cannot protect them
        for key, param in model.named_parameters():  # tied weights (GPT-2's lm_head) are one parameter
            if key in frozen:
                param.data = torch.from_numpy(frozen[key])


class ClientWorker:
    def __init__(self, cfg: dict[str, Any], shard_dir: str, index: int, state_store: Any, run_name: str = "run", frozen: Weights | None = None):
        self.cfg = validate_config(cfg)
        self.index = index
        self.telemetry = Telemetry(run_name)
        self.states = ClientStates(state_store)  # clients' persistent state, never seen by the server
        configure_torch(self.cfg, self.cfg.clients.num_cpus)
        self.device = assigned_device()  # Ray's assignment, never "whatever CUDA shows"
        self.shards = ShardSet(shard_dir)
        self.tasks = self.shards.tasks
        self.method = build_method(self.cfg.strategy.name, self.cfg.strategy.params)
        model = self.method.build_model(self.cfg.model, self.tasks, self.cfg.seed)
        if frozen:  # the frozen weights: one copy per node in the object store, not one per worker
            share_frozen(model, frozen)
        self.model = model.to(self.device)
        self.initial_weights = float_state(self.model)
        self.faults = FaultPlan(self.cfg)

    def info(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        group = context.get_placement_group_id()
        return {"index": self.index, "node_id": context.get_node_id(), "placement_group": group, "device": str(self.device), "gpu_ids": assigned_gpu_ids(), "pid": os.getpid()}

    def _context(self, client_id: int, round_: int, state) -> ClientContext:
        """Client ``client_id`` in round ``round_`` (−1: evaluation, no training)."""
        return client_context(
            self.cfg, client_id, round_, self.model, self.shards, self.device, self.initial_weights, state, self.faults.label_transform(client_id)
        )

    def train(
        self, round_: int, payload: Weights, client_ids: list[int], attempt: int = 0, others: list[tuple[int, Any]] = (), timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Train ``client_ids`` from ``payload``; return one partial aggregate and per-client records.

        A client whose training raises is recorded as failed and the others go on (unless
        ``engine.on_client_failure`` is stop); a late client (``engine.client_deadline_s``) is dropped
        or down-weighted; an update that is not finite or has the wrong shape is never aggregated.
        ``others``: [(worker slot, the reference of its train call)] of the other workers on this
        node, whose partials this worker folds into its own afterwards (per-node reduction; those
        that die or miss ``timeout_s`` come back under ``lost`` with the reason).
        """
        started = time.monotonic()
        accumulator = self.method.new_accumulator()
        records, states = [], {}
        down = nbytes(payload)
        engine = self.cfg.engine
        self.telemetry.set("raymed_round_clients_finished", 0, worker=str(self.index))
        last_progress = time.monotonic()
        for ctx, update, took, failure in self._local_training(round_, payload, client_ids, attempt):
            client_id = ctx.client_id
            record = client_record(round_, client_id, ctx.shard, self.index, attempt, client_id in self.faults.byzantine)
            records.append(record)
            if failure is not None:
                record["failed"] = failure
                continue
            update = replace(update, delta=self.faults.poison(update.delta, client_id, round_))
            took += self.faults.delay_s(client_id, round_)
            record.update(
                train_loss=update.metrics.get("train_loss", float("nan")),
                bytes_down=down,
                bytes_up=update.nbytes,
                time_s=took,
                **{k: float(v) for k, v in update.metrics.items() if k != "train_loss"},
            )
            problem = update.problem(payload)
            deadline = engine.client_deadline_s
            if deadline is not None and took > deadline:
                record["late"] = True
                if problem is None and engine.late_updates == "drop":
                    problem = f"late: {took:.2f} s > engine.client_deadline_s={deadline:g}"
                else:  # down-weighted by how far past the deadline it came
                    update = replace(update, weight=update.weight * deadline / took)
            if problem is not None:
                record["rejected"] = problem
                logger.warning("round %d: update of client %d not aggregated: %s", round_, client_id, problem)
            else:
                accumulator.add(update)
                if update.state is not None:
                    states[client_id] = update.state
            if time.monotonic() - last_progress > _PROGRESS_EVERY_S:
                self.telemetry.set("raymed_round_clients_finished", len(records), worker=str(self.index))
                last_progress = time.monotonic()
        self.telemetry.set("raymed_round_clients_finished", len(records), worker=str(self.index))
        if states:
            self.states.put_many(states)  # stored before the round ends
        result = {"accumulator": accumulator, "records": records, "peak_rss_mb": _peak_rss_mb(), "lost": []}
        return fold_in(result, others, None if timeout_s is None else started + timeout_s, timeout_s)

    def _local_training(self, round_: int, payload: Weights, client_ids: list[int], attempt: int):
        """Yield (context, update, seconds, failure) per client: one at a time, or all together when
        vectorised; ``failure`` is why the client's training raised (its update is then None)."""
        saved = self.states.get_many(client_ids)
        if self.cfg.engine.vectorise:
            start = time.perf_counter()
            ctxs = [self._context(c, round_, state) for c, state in zip(client_ids, saved)]
            updates, failure = self._guard(lambda: self._train_many(ctxs, payload, attempt), client_ids, round_)
            took = (time.perf_counter() - start) / max(len(ctxs), 1)
            yield from ((ctx, update, took, failure) for ctx, update in zip(ctxs, updates or [None] * len(ctxs)))
            return
        for client_id, state in zip(client_ids, saved):
            start = time.perf_counter()
            ctx = self._context(client_id, round_, state)
            update, failure = self._guard(lambda: self._train_one(ctx, payload, attempt), [client_id], round_)
            yield ctx, update, time.perf_counter() - start, failure

    def _train_one(self, ctx: ClientContext, payload: Weights, attempt: int) -> ClientUpdate:
        self.faults.maybe_crash(ctx.client_id, ctx.round, attempt)
        seed_torch(client_seed(self.cfg.seed, ctx.round, ctx.client_id), self.device)  # dropout etc.: same wherever it runs
        return self.method.client_update(ctx, payload)

    def _train_many(self, ctxs: list[ClientContext], payload: Weights, attempt: int) -> list[ClientUpdate]:
        for ctx in ctxs:
            self.faults.maybe_crash(ctx.client_id, ctx.round, attempt)
        if ctxs:
            seed_torch(client_seed(self.cfg.seed, ctxs[0].round, ctxs[0].client_id), self.device)
        return self.method.client_updates(ctxs, payload)

    def _guard(self, train, client_ids: list[int], round_: int):
        """Run local training: (result, None), or (None, why) when it raised. Under
        ``engine.on_client_failure=stop`` a crash stops the run instead, as one line naming the
        client(s), round and worker."""
        try:
            return train(), None
        except RaymedError:
            raise
        except Exception as exc:
            who = f"client {client_ids[0]}" if len(client_ids) == 1 else f"one of clients {client_ids}"
            why = f"{type(exc).__name__}: {exc}"
            if self.cfg.engine.on_client_failure == "stop":
                raise ClientFailure(
                    f"{who} failed in round {round_} on worker {self.index}: {why}; set engine.on_client_failure=retry or drop to go on without it"
                ) from exc
            logger.warning("round %d: %s failed on worker %d: %s", round_, who, self.index, why)
            return None, why

    def gpu_memory(self) -> dict[str, Any] | None:
        """This worker's GPU, its measured peak (CUDA context and allocator cache included) and its
        size, for the server's fit check of co-located workers; None on the CPU."""
        if self.device.type != "cuda":
            return None
        return {
            "index": self.index,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": assigned_gpu_ids(),
            "peak_bytes": gpu_peak_bytes(self.device),
            "total_bytes": int(torch.cuda.get_device_properties(self.device).total_memory),
        }

    # ---- evaluation

    @torch.no_grad()
    def _scores(self, flag: str, split: Split) -> np.ndarray:
        """The model's outputs (class probabilities, or images) on a split, in batches."""
        self.model.eval()
        task, step = self.tasks[flag], self.cfg.eval.batch_size
        out = []
        for i in range(0, len(split), step):
            x, _ = task.inputs(np.array(split.images[i : i + step]), np.array(split.labels[i : i + step]), self.model.in_channels, self.device)
            out.append(task.scores(self.model.predict(x, flag)))
        return np.concatenate(out)

    def evaluate_personalised(self, payload: Weights, client_ids: list[int], round_: int = 0, attempt: int = 0) -> list[dict[str, Any]]:
        """Each client's personalised model on its own validation rows (``split`` val) and held-out
        rows (``split`` test): scores and labels per dataset; a client whose personalised model would
        be the seeded initial one (never sampled yet, under a method with personal state) is only named."""
        results = []
        personal = self.method.personal_state
        # Without personal state every client's personalised model is the global one: fetch no state
        # and load the model once, not once per client.
        states = self.states.get_many(client_ids) if personal else [None] * len(client_ids)
        loaded = False
        for client_id, state in zip(client_ids, states):
            self.faults.maybe_crash_evaluating(client_id, round_, attempt)
            if state is None and personal:
                results.append({"client_id": client_id, "unseen": True})
                continue
            ctx = self._context(client_id, -1, state)
            if personal or not loaded:
                self.method.load_personalised(ctx, payload)
                loaded = True
            for split_name, splits in (("val", ctx.shard.val), ("test", ctx.shard.holdout)):
                for flag, split in splits.items():
                    if len(split):
                        targets = self.tasks[flag].targets(np.array(split.images), np.array(split.labels))
                        results.append({"client_id": client_id, "dataset": flag, "split": split_name, "scores": self._scores(flag, split), "labels": targets})
        return results

    def evaluate_global(self, weights: Weights, chunks: list[EvalChunk]) -> list[tuple[str, str, int, np.ndarray]]:
        """The global model on row ranges of the validation and test splits: [(split, dataset, start row, scores)]."""
        load_weights(self.model, self.initial_weights)  # anything the method leaves out is the seeded init
        load_weights(self.model, weights)
        return [(split, flag, start, self._scores(flag, self.shards.evaluation_split(flag, split)[start:stop])) for split, flag, start, stop in chunks]


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """The torch seed of one client's local training in one round."""
    return int(np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0])


def answers(calls: list[tuple[int, Any]], deadline: float | None, timeout_s: float | None) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Wait for ``calls`` [(worker slot, reference of its train call)] in that order, each as soon
    as it is there: (worker, its result, None), or (worker, None, why) for a worker that died or
    missed ``deadline`` (monotonic; ``timeout_s`` is the engine.worker_timeout_s it came from)."""
    for worker, ref in calls:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not ray.wait([ref], timeout=left)[0]:
            yield worker, None, f"worker {worker} did not answer within engine.worker_timeout_s={timeout_s:g} s"
            continue
        try:
            yield worker, ray.get(ref), None
        except ray.exceptions.RayActorError as exc:  # killed, out of memory, or its node is gone
            yield worker, None, f"worker {worker} died ({type(exc).__name__})"


def fold_in(result: dict[str, Any], others: list[tuple[int, Any]], deadline: float | None, timeout_s: float | None) -> dict[str, Any]:
    """Merge the partials of ``others`` into ``result``, in order, each as soon as it is there; a
    worker that died or missed ``deadline`` goes under ``result["lost"]`` with the reason."""
    for worker, other, why in answers(others, deadline, timeout_s):
        if why is not None:
            result["lost"].append((worker, why))
            continue
        result["accumulator"].merge(other["accumulator"])
        result["records"] += other["records"]
        result["peak_rss_mb"] = max(result["peak_rss_mb"], other["peak_rss_mb"])
    return result


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed the generators a client's training draws from: the CPU's and, on a GPU, its own device's.
    (``torch.manual_seed`` would also queue a lazy seed for every accelerator type that is not
    initialised, each recording a Python stack: 0.6 ms per client, as long as training a small one.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def client_record(round_: int, client_id: int, shard: ClientShard, worker: int, attempt: int, byzantine: bool) -> dict[str, Any]:
    """One client's row of a round's client table, before (or without) its training."""
    return {
        "round": round_,
        "client_id": client_id,
        "datasets": ",".join(shard.datasets),
        "worker": worker,
        "attempt": attempt,
        "num_train": shard.num_train,
        "train_loss": float("nan"),
        "bytes_down": 0,
        "bytes_up": 0,
        "time_s": float("nan"),
        "byzantine": byzantine,
        "failed": None,  # why its training raised or its worker was lost
        "rejected": None,  # why its update was not aggregated (not finite, wrong shape, late)
        "late": False,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
