"""Where a federation's actors go: how many client workers fit on which node (memory, CPUs,
GPUs), and the placement-group bundles of a Tune trial (its driver, the server or its DeepSpeed
ranks, one per client worker)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymed.config import ExperimentConfig
from raymed.errors import ResourceError
from raymed.methods import has_server_model

WORKER_MEMORY_BYTES = 0.6 * 2**30  # measured: a Ray actor that imports torch holds about 0.55 GB RSS
TRIAL_DRIVER_CPUS = 0.25  # a Tune trial's own process only waits on its server actor
logger = logging.getLogger("raymed")


@dataclass(frozen=True)
class NodeShare:
    """One node's part of a worker plan: what is free there for client workers, and how many go there."""

    node_id: str
    address: str
    cpus: float  # free for client workers (after the server, where it runs here)
    gpus: float
    memory: float  # bytes; 0 when Ray does not say
    capacity: int  # client workers that fit here by CPUs and GPUs
    memory_capacity: int  # ... and by memory (about 0.6 GB each)
    workers: int = 0  # client workers planned here


@dataclass(frozen=True)
class WorkerPlan:
    """Where the client workers go: a count per node (workers are pinned, softly, to their node)."""

    nodes: tuple[NodeShare, ...]

    @property
    def num_workers(self) -> int:
        return sum(n.workers for n in self.nodes)

    def node_of_worker(self) -> list[str]:
        """Node id of each worker slot, in slot order (node by node)."""
        return [n.node_id for n in self.nodes for _ in range(n.workers)]

    def rows(self) -> list[dict[str, object]]:
        """The plan as a table (printed at start, saved in meta.json)."""
        return [
            {"node": n.node_id[:8], "address": n.address, "free CPUs": n.cpus, "free GPUs": n.gpus,
             "memory GB": round(n.memory / 1e9, 1), "fit": min(n.capacity, n.memory_capacity), "workers": n.workers}
            for n in self.nodes
        ]


def cluster_nodes() -> list[dict[str, object]]:
    """The alive nodes of the Ray cluster this process is connected to, with their total resources."""
    return [
        {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress", ""), "resources": dict(n.get("Resources", {}))}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def wanted_workers(cfg: ExperimentConfig) -> int:
    """The client workers a run can use: one per client (``engine.mode=dedicated``), ``engine.num_workers``,
    or (auto) a round's clients; :func:`plan_nodes` then caps auto by what fits."""
    if cfg.engine.mode == "dedicated":
        return cfg.clients.num
    return cfg.clients.per_round if cfg.engine.num_workers == "auto" else int(cfg.engine.num_workers)


def plan_nodes(cfg: ExperimentConfig, nodes: list[dict[str, object]], server_node: str | None = None) -> WorkerPlan:
    """Place the client workers on the nodes where they fit, as Flower sizes its pool per node.

    Each node's free CPUs, GPUs and memory (after the server on ``server_node``, the driver's node)
    bound how many workers it holds; the workers a run can use (a round's clients, or
    ``engine.num_workers``, or one per client when ``engine.mode=dedicated``) are dealt round-robin
    over the nodes with room, the server's node first. Ray's resources are logical, so an actor asking
    for more than any node has would wait forever: such a layout is refused here, with the numbers.
    """
    c, s = cfg.clients, cfg.server
    ordered = sorted(nodes, key=lambda n: (n["node_id"] != server_node, str(n["node_id"])))
    server_left = {"CPU": s.num_cpus, "GPU": s.num_gpus}
    shares = []
    for n in ordered:
        res = dict(n["resources"])
        cpus, gpus, memory = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)), float(res.get("memory", 0.0))
        if server_left["CPU"] <= cpus and server_left["GPU"] <= gpus and (server_left["CPU"] or server_left["GPU"]):
            cpus, gpus = cpus - server_left["CPU"], gpus - server_left["GPU"]
            server_left = {"CPU": 0.0, "GPU": 0.0}
        fit = math.floor(cpus / c.num_cpus + 1e-9)
        if c.num_gpus > 0:
            fit = min(fit, math.floor(gpus / c.num_gpus + 1e-9))
        memory_fit = int(memory // WORKER_MEMORY_BYTES) if memory else fit
        shares.append(NodeShare(str(n["node_id"]), str(n.get("address", "")), cpus, gpus, memory, max(fit, 0), max(memory_fit, 0)))
    free_cpus, free_gpus = sum(n.cpus for n in shares), sum(n.gpus for n in shares)
    fit = sum(n.capacity for n in shares)
    if c.num_gpus > 0 and fit < 1 and free_gpus < c.num_gpus:
        raise ResourceError(
            f"clients.num_gpus={c.num_gpus} but the cluster has {free_gpus:g} GPU(s) free after the server; "
            f"set clients.num_gpus=0 to train on CPU"
        )
    if fit < 1:
        per_node = ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in shares)
        raise ResourceError(
            f"one client worker needs clients.num_cpus={c.num_cpus:g} CPUs" + (f" and clients.num_gpus={c.num_gpus:g} GPUs" if c.num_gpus else "")
            + f" but the cluster has {free_cpus:g} free after the server (server.num_cpus={s.num_cpus:g}) and no node has room "
            f"for one (free per node: {per_node}); lower clients.num_cpus"
        )
    usable = sum(min(n.capacity, n.memory_capacity) for n in shares)
    want = wanted_workers(cfg)
    if cfg.engine.mode == "dedicated":
        if want > min(fit, usable):
            raise ResourceError(
                f"engine.mode=dedicated needs one actor per client ({want}), but only {min(fit, usable)} fit "
                f"(CPU/GPU per client: clients.num_cpus={c.num_cpus:g}, clients.num_gpus={c.num_gpus:g}; about "
                f"0.6 GB memory each); use engine.mode=pool"
            )
        limit = [min(n.capacity, n.memory_capacity) for n in shares]
    elif cfg.engine.num_workers != "auto":
        if want > fit:
            raise ResourceError(
                f"engine.num_workers={want} workers need {want * c.num_cpus:g} CPUs"
                + (f" and {want * c.num_gpus:g} GPUs" if c.num_gpus else "")
                + f" but only {fit} fit (per node: " + ", ".join(f"{n.address or n.node_id[:8]} {n.capacity}" for n in shares)
                + "); lower engine.num_workers or use 'auto'"
            )
        limit = [n.capacity for n in shares]
    else:
        want = max(1, min(usable, want))
        limit = [max(min(n.capacity, n.memory_capacity), 0) for n in shares]
        if not any(limit):  # memory says none fits anywhere, CPUs say one does: start one where the CPUs are
            limit = [min(n.capacity, 1) for n in shares]
    counts = [0] * len(shares)
    placed = 0
    while placed < want:
        progressed = False
        for k in range(len(shares)):
            if placed < want and counts[k] < limit[k]:
                counts[k] += 1
                placed += 1
                progressed = True
        if not progressed:
            break
    return WorkerPlan(tuple(replace(n, workers=k) for n, k in zip(shares, counts)))


def plan_cluster(cfg: ExperimentConfig, poll_s: float = 5.0) -> WorkerPlan:
    """The worker plan on the cluster this process joined (:func:`plan_nodes`). On a cluster that
    lacks the resources (an autoscaling cluster whose GPU nodes are not up yet), ask the autoscaler
    for the workers' and server's bundles (``ray.autoscaler.sdk.request_resources``) and re-plan as
    nodes join, for up to ``engine.start_timeout_s``; then refuse with the last reason. A local Ray
    never grows, so it is refused at once."""
    server_node = ray.get_runtime_context().get_node_id()
    try:
        return plan_nodes(cfg, cluster_nodes(), server_node)
    except ResourceError:
        if not cfg.ray.address:
            raise
    from ray.autoscaler.sdk import request_resources

    c = cfg.clients
    bundles = [_bundle(c.num_cpus, c.num_gpus)] * wanted_workers(cfg) + server_bundles(cfg)
    request_resources(bundles=[b for b in bundles if b])
    logger.warning("the cluster lacks the planned resources; asked the autoscaler for %d bundles, waiting up to %g s", len(bundles), cfg.engine.start_timeout_s)
    deadline = time.monotonic() + cfg.engine.start_timeout_s
    try:
        while True:
            try:
                return plan_nodes(cfg, cluster_nodes(), server_node)
            except ResourceError:
                if time.monotonic() + poll_s > deadline:
                    raise
            time.sleep(poll_s)
    finally:  # the nodes are up (the actors start now and hold them) or will not come: withdraw the request
        request_resources(bundles=[])


def plan_workers(cfg: ExperimentConfig, resources: dict[str, float]) -> int:
    """Number of client workers on a cluster pooled as one node of ``resources`` (see :func:`plan_nodes`)."""
    return plan_nodes(cfg, [{"node_id": "cluster", "address": "", "resources": resources}], "cluster").num_workers


# ---------------------------------------------------------------------------------------------------
# A federation inside a placement group (one Ray Tune trial)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def trial_workers(cfg: ExperimentConfig) -> int:
    """Client workers of a federation that runs in its own placement group (a Tune trial).

    There the cluster is shared with other trials, so ``engine.num_workers: auto`` means one worker
    and trials pack side by side; set ``engine.num_workers`` for wider trials.
    """
    if cfg.engine.mode == "dedicated":
        return cfg.clients.num
    return 1 if cfg.engine.num_workers == "auto" else int(cfg.engine.num_workers)


def server_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """What the server side asks for: its actor, or with a server model (a run task's generator, FedKIM's central model)
    one bundle per DeepSpeed rank (the server's CPUs and GPUs split evenly); none when it asks for none."""
    s = cfg.server
    ranks = s.ranks if has_server_model(cfg) else 1
    bundle = _bundle(s.num_cpus / ranks, s.num_gpus / ranks)
    return [dict(bundle) for _ in range(ranks)] if bundle else []


def federation_bundles(cfg: ExperimentConfig, num_workers: int) -> list[dict[str, float]]:
    """Placement-group bundles of one federation: the trial's driver (which also hosts the zero-CPU
    server and client-state actors), the server's bundles, one per client worker."""
    worker = _bundle(cfg.clients.num_cpus, cfg.clients.num_gpus)
    return [{"CPU": TRIAL_DRIVER_CPUS}, *server_bundles(cfg), *[dict(worker) for _ in range(num_workers)]]


@dataclass(frozen=True)
class Placement:
    """Which bundle of a placement group each actor of a federation takes (see federation_bundles)."""

    group: PlacementGroup
    server_bundles: tuple[int, ...]  # the server actor's, or the server model's ranks'; () = none
    worker_bundles: tuple[int, ...]

    @classmethod
    def of_current_trial(cls, cfg: ExperimentConfig) -> Placement | None:
        """The layout inside the placement group this process runs in, or None outside one."""
        group = get_current_placement_group()
        if group is None:
            return None
        server = tuple(range(1, 1 + len(server_bundles(cfg))))
        first = 1 + len(server)
        workers = tuple(range(first, first + trial_workers(cfg)))
        if len(group.bundle_specs) != first + len(workers):
            raise ResourceError(
                f"the placement group has {len(group.bundle_specs)} bundles but this federation needs "
                f"{first + len(workers)} (see raymed.engine.placement.federation_bundles); launch it with those bundles"
            )
        return cls(group, server, workers)

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    @property
    def helper_strategy(self) -> PlacementGroupSchedulingStrategy:
        """For zero-resource helpers (the client-state actor): the driver's bundle."""
        return self.strategy(0)
