"""The client worker pool: start, place, replace and wait for the workers; one call per worker with
per-node reduction; work spread over whichever workers are alive.

A worker is a :class:`~raymed.engine.worker.ClientWorker` actor in a numbered slot. A slot whose
worker dies or hangs gets a new one (``<run>.client-pool-<slot>.<n>``), which joins once it answers;
the server never waits on a worker it has given up on.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymed.config import ExperimentConfig
from raymed.engine.placement import Placement
from raymed.engine.worker import ClientWorker, answers
from raymed.errors import ClientFailure, ResourceError

logger = logging.getLogger("raymed")


def assign(clients: list[int], cost: dict[int, int], num_workers: int) -> list[list[int]]:
    """Spread clients over workers by longest-processing-time first (deterministic)."""
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    load = [0] * num_workers
    for client in sorted(clients, key=lambda c: (-cost[c], c)):
        w = min(range(num_workers), key=lambda i: (load[i], i))
        groups[w].append(client)
        load[w] += max(cost[client], 1)
    return groups


class WorkerPool:
    """``num_workers`` client workers, each started with ``(cfg, shard_dir, slot, store, run_name, frozen)``."""

    def __init__(
        self, cfg: ExperimentConfig, spawn: tuple[dict[str, Any], str, str, Placement | None], store: Any, frozen_ref: Any,
        num_workers: int, worker_nodes: list[str] | None,
    ):
        self.cfg = cfg
        self._spawn, self._store, self._frozen_ref = spawn, store, frozen_ref
        self.worker_nodes = worker_nodes  # the node each slot is planned on (placement.plan_nodes), or None
        self.replaced = [0] * num_workers  # how many times each slot's worker was replaced
        self.workers = [self._start(i) for i in range(num_workers)]
        self._ready = [w.info.remote() for w in self.workers]  # a worker is live once this answers
        self.node_of: dict[int, str] = {}  # slot -> the node it runs on, once it answered

    def _start(self, i: int) -> Any:
        cfg, shard_dir, run_name, placement = self._spawn
        c = self.cfg.clients
        suffix = f".{self.replaced[i]}" if self.replaced[i] else ""
        return (
            ray.remote(ClientWorker)
            .options(name=f"{run_name}.client-pool-{i}{suffix}", num_cpus=c.num_cpus, num_gpus=c.num_gpus, **self._where(i, placement))
            .remote(cfg, shard_dir, i, self._store, run_name, self._frozen_ref)
        )

    def _where(self, i: int, placement: Placement | None) -> dict[str, Any]:
        """Slot ``i``'s scheduling: its bundle in a placement group (a Tune trial), else its planned
        node (soft: a replacement for a worker of a lost node goes wherever it fits)."""
        if placement:
            return {"scheduling_strategy": placement.strategy(placement.worker_bundles[i])}
        if self.worker_nodes and i < len(self.worker_nodes):
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(self.worker_nodes[i], soft=True)}
        return {}

    def replace(self, i: int, why: str) -> None:
        """A worker died or hung: kill what is left of it and start a new one in its slot. The new
        one joins once it answers (on a lost node it may wait for resources: the others go on)."""
        logger.warning("%s; replacing it", why)
        ray.kill(self.workers[i], no_restart=True)
        self.replaced[i] += 1
        self.workers[i] = self._start(i)
        self._ready[i] = self.workers[i].info.remote()

    def live(self) -> list[int]:
        """Slots whose workers answer; waits (engine.start_timeout_s) when none does yet."""
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
                    self.replace(i, f"worker {i} failed to start")
        if not live:
            raise ResourceError(
                f"no client worker is alive or could be placed within engine.start_timeout_s={self.cfg.engine.start_timeout_s:g} s; "
                f"see `ray status` for lost nodes and held resources"
            )
        return live

    def wait_all(self) -> list[dict[str, Any]]:
        """Every worker's info. Ray's resources are logical: a worker that cannot be placed waits forever, so the wait is bounded."""
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

    def train(self, r: int, payload_ref: Any, groups: dict[int, list[int]], attempt: int, lost: Callable[[int, str], dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """One training call per worker, reduced per node: the node's first worker, once its own
        clients are trained, folds in the partials of the node's other workers (through the node's
        object store, in worker order, each as soon as it is there), so one partial per node reaches
        the server, which merges them in node order (the sums never depend on who finished first).
        A worker that dies or exceeds engine.worker_timeout_s yields ``lost(slot, why)`` instead."""
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
                    yield from (lost(w, gone) for w, gone in result.pop("lost"))
                    yield result
                    continue
                # The reducing worker is gone: take its node's other partials directly.
                yield lost(first, why)
                for w, other, gone in answers(others, deadline, timeout):
                    yield other if gone is None else lost(w, gone)

    def map(self, call: Callable[[Any, list, int], Any], work: list[list], what: str, round_: int) -> list[Any]:
        """``call(worker, items, attempt)`` for each non-empty list of ``work``, spread over the live workers;
        the answers in ``work``'s order. A worker that dies meanwhile (killed, out of memory) is
        replaced and its items go again to a live worker, as a training client's are, up to
        ``engine.client_retries`` times (``on_client_failure: retry``); otherwise the run stops, saying why."""
        engine = self.cfg.engine
        done: dict[int, Any] = {}
        pending = [(i, items) for i, items in enumerate(work) if items]
        for attempt in itertools.count():
            live = self.live()
            calls = [(i, items, live[k % len(live)]) for k, (i, items) in enumerate(pending)]
            calls = [(i, items, w, call(self.workers[w], items, attempt)) for i, items, w in calls]
            failed = []
            for i, items, w, ref in calls:
                try:
                    done[i] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    why = f"worker {w} died while {what} ({type(exc).__name__})"
                    if engine.on_client_failure != "retry" or attempt >= engine.client_retries:
                        raise ClientFailure(
                            f"round {round_}: {why}; set engine.on_client_failure=retry (and engine.client_retries) to evaluate on a "
                            f"replacement worker, or `raymed run --resume RUN_DIR` to continue from the last checkpoint"
                        ) from None
                    if w not in {x for _, _, x in failed}:  # one replacement per dead worker
                        self.replace(w, why)
                    failed.append((i, items, w))
            pending = [(i, items) for i, items, _ in failed]
            if not pending:
                break
        return [done[i] for i in sorted(done)]
