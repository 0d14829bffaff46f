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
from typing import Any

import numpy as np
import ray
import torch

from raymed.config import validate_config
from raymed.data.shards import ShardSet, Split
from raymed.engine.telemetry import Telemetry
from raymed.errors import ClientFailure, RaymedError, ResourceError
from raymed.methods import ClientContext, Weights, build_method
from raymed.methods.base import load_weights, nbytes

logger = logging.getLogger("raymed.worker")

# Progress gauge period: Ray exports metrics every few seconds, and setting a gauge inside a Ray
# worker costs about a millisecond, as much as training a small client (measured: 50 three-row
# clients 0.28 s in a plain process, 0.36-0.41 s in a Ray actor setting it per client).
_PROGRESS_EVERY_S = 0.5


def float_state(model: torch.nn.Module) -> Weights:
    """The model's floating-point state (parameters and running statistics) as numpy arrays, without
    what it never sends (``model.unsent_keys``: frozen weights, which never change, and the second
    name of a tied weight)."""
    unsent = getattr(model, "unsent_keys", ())
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point() and k not in unsent}


def frozen_state(model: torch.nn.Module) -> Weights:
    """The model's frozen weights (a report decoder under LoRA), to share through the object store."""
    frozen = getattr(model, "frozen_keys", ())
    return {k: v.detach().cpu().numpy() for k, v in model.named_parameters() if k in frozen}  # tied weights once


class ClientWorker:
    def __init__(self, cfg: dict[str, Any], shard_dir: str, index: int, state_store: Any, run_name: str = "run", frozen: Weights | None = None):
        self.cfg = validate_config(cfg)
        self.index = index
        self.telemetry = Telemetry(run_name)
        self.state_store = state_store  # actor handle: clients' persistent state, never seen by the server
        torch.set_num_threads(max(1, int(self.cfg.clients.num_cpus)))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shards = ShardSet(shard_dir)
        self.tasks = self.shards.tasks
        self.method = build_method(self.cfg.strategy.name, self.cfg.strategy.params)
        model = self.method.build_model(self.cfg.model, self.tasks, self.cfg.seed)
        if frozen:  # the frozen decoder weights: one copy per node in the object store, not one per worker
            from raymed.models.report import share_frozen

            share_frozen(model, frozen)
        self.model = model.to(self.device)
        self.initial_weights = float_state(self.model)
        self.checked_fit = False

    def info(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        group = context.get_placement_group_id()
        return {"index": self.index, "node_id": context.get_node_id(), "placement_group": group, "device": str(self.device), "pid": os.getpid()}

    def _context(self, client_id: int, round_: int, state) -> ClientContext:
        return ClientContext(
            client_id=client_id,
            round=round_,
            seed=self.cfg.seed,
            model=self.model,
            shard=self.shards.client(client_id),
            tasks=self.tasks,
            train=self.cfg.clients,
            device=self.device,
            initial_weights=self.initial_weights,
            state=state,
        )

    def train(self, round_: int, payload: Weights, client_ids: list[int]) -> dict[str, Any]:
        """Train ``client_ids`` from ``payload``; return one partial aggregate and per-client records."""
        accumulator = self.method.new_accumulator()
        records, states = [], {}
        down = nbytes(payload)
        self.telemetry.set("raymed_round_clients_finished", 0, worker=str(self.index))
        reported = time.monotonic()
        for ctx, update, took in self._local_training(round_, payload, client_ids):
            client_id = ctx.client_id
            problem = update.problem(payload)
            if problem is not None:
                logger.warning("round %d: update of client %d rejected, not aggregated: %s", round_, client_id, problem)
            else:
                accumulator.add(update)
                if update.state is not None:
                    states[client_id] = update.state
            records.append(
                {
                    "round": round_,
                    "client_id": client_id,
                    "datasets": ",".join(ctx.shard.datasets),
                    "worker": self.index,
                    "num_train": ctx.num_train,
                    "train_loss": update.metrics.get("train_loss", float("nan")),
                    "bytes_down": down,
                    "bytes_up": update.nbytes,
                    "time_s": took,
                    "rejected": problem,
                }
            )
            if time.monotonic() - reported > _PROGRESS_EVERY_S:
                self.telemetry.set("raymed_round_clients_finished", len(records), worker=str(self.index))
                reported = time.monotonic()
        self.telemetry.set("raymed_round_clients_finished", len(records), worker=str(self.index))
        if states:
            ray.get(self.state_store.put_many.remote(states))  # stored before the round ends
        if not self.checked_fit:
            self._check_gpu_fit()
        return {"accumulator": accumulator, "records": records, "peak_rss_mb": _peak_rss_mb()}

    def _local_training(self, round_: int, payload: Weights, client_ids: list[int]):
        """Yield (context, update, seconds) per client: one at a time, or all together when vectorised."""
        saved = ray.get(self.state_store.get_many.remote(client_ids))
        if self.cfg.engine.vectorise:
            start = time.perf_counter()
            ctxs = [self._context(c, round_, state) for c, state in zip(client_ids, saved)]
            updates = self._guard(lambda: self.method.client_updates(ctxs, payload), client_ids, round_)
            took = (time.perf_counter() - start) / max(len(ctxs), 1)
            yield from ((ctx, update, took) for ctx, update in zip(ctxs, updates))
            return
        for client_id, state in zip(client_ids, saved):
            start = time.perf_counter()
            ctx = self._context(client_id, round_, state)
            update = self._guard(lambda: self.method.client_update(ctx, payload), [client_id], round_)
            yield ctx, update, time.perf_counter() - start

    def _guard(self, train, client_ids: list[int], round_: int):
        """Run local training; a client's crash becomes one line naming the client(s), round and worker."""
        try:
            return train()
        except RaymedError:
            raise
        except Exception as exc:
            who = f"client {client_ids[0]}" if len(client_ids) == 1 else f"one of clients {client_ids}"
            raise ClientFailure(f"{who} failed in round {round_} on worker {self.index}: {type(exc).__name__}: {exc}") from exc

    def _check_gpu_fit(self) -> None:
        """Ray's GPU fractions are logical: refuse a layout whose clients cannot fit on one GPU together."""
        self.checked_fit = True
        if self.device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        sharing = max(1, int(1 / self.cfg.clients.num_gpus + 1e-9))
        if peak * sharing > 0.95 * total:
            raise ResourceError(
                f"a client worker peaks at {peak / 2**30:.2f} GiB of GPU memory and clients.num_gpus="
                f"{self.cfg.clients.num_gpus:g} puts {sharing} on a {total / 2**30:.1f} GiB GPU; raise clients.num_gpus "
                f"to at least {peak / (0.95 * total):.2f} or lower clients.batch_size"
            )

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

    def evaluate_personalised(self, payload: Weights, client_ids: list[int]) -> list[dict[str, Any]]:
        """Each client's personalised model on its own held-out rows: scores and labels per dataset."""
        results = []
        for client_id, state in zip(client_ids, ray.get(self.state_store.get_many.remote(client_ids))):
            ctx = self._context(client_id, -1, state)
            self.method.load_personalised(ctx, payload)
            for flag, split in ctx.shard.holdout.items():
                if len(split):
                    targets = self.tasks[flag].targets(np.array(split.images), np.array(split.labels))
                    results.append({"client_id": client_id, "dataset": flag, "scores": self._scores(flag, split), "labels": targets})
        return results

    def evaluate_global(self, weights: Weights, chunks: list[tuple[str, int, int]]) -> list[tuple[str, int, np.ndarray]]:
        """The global model on row ranges of the test splits: [(dataset, start row, scores)]."""
        load_weights(self.model, self.initial_weights)  # anything the method leaves out is the seeded init
        load_weights(self.model, weights)
        return [(flag, start, self._scores(flag, self.shards.test(flag)[start:stop])) for flag, start, stop in chunks]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
