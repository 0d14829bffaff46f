"""Ray start-up with safe defaults, and the plan of how many client workers fit.

Security: Ray's dashboard and jobs API run code for whoever reaches them. A local Ray started here
has token authentication on (``RAY_AUTH_MODE=token``, set in ``raymed/__init__.py`` before Ray is
imported; Ray writes the token to
``~/.ray/auth_token``, and ``ray get-auth-token`` prints it) and binds the dashboard to 127.0.0.1.
Only ``ray.dashboard_host`` in the config widens that, and only when a user sets it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymed.config import ExperimentConfig, RayConfig
from raymed.errors import ResourceError

WORKER_MEMORY_BYTES = 0.6 * 2**30  # measured: a Ray actor that imports torch holds about 0.55 GB RSS
logger = logging.getLogger("raymed")
TRIAL_DRIVER_CPUS = 0.25  # a Tune trial's own process only waits on its server actor


def free_port(host: str = "127.0.0.1", start: int | None = None, tries: int = 100) -> int:
    """A port free on ``host`` now: ``start`` or the next free one after it, else any the OS gives."""
    import socket

    for port in ([*range(start, min(start + tries, 65536))] if start else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ResourceError(f"no free port on {host}")


JOINED: dict[str, str] = {}  # the cluster a run with ray.address joined: its address and session (printed at start)
# Called after this process starts or joins Ray (the CLI puts its SIGTERM handler back over Ray's).
AFTER_RAY_START: list = []
PORTS: dict[str, int | None] = {}  # the ports this process's local Ray took (init_ray): printed at start, saved in meta.json


@contextlib.contextmanager
def _machine_lock(name: str):
    """An exclusive lock shared by every raymed process of this machine (a file in the temp folder)."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / f"raymed-{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_or_join(cfg: RayConfig, attempt: int, quiet: dict[str, Any]) -> Any:
    if cfg.address:
        return ray.init(address=cfg.address, **quiet)
    import torch

    host = cfg.dashboard_host
    first = cfg.dashboard_port + attempt * random.randint(1, 50)  # a retry after a clash looks further on
    PORTS.update(dashboard=free_port(host if host != "0.0.0.0" else "", first) if cfg.dashboard else None,
                 metrics_export=cfg.metrics_export_port or free_port())
    return ray.init(
        address="local",  # a new Ray of our own, even when another one runs on this machine
        num_cpus=cfg.num_cpus or os.cpu_count() or 1,
        num_gpus=cfg.num_gpus if cfg.num_gpus is not None else torch.cuda.device_count(),
        include_dashboard=cfg.dashboard,
        dashboard_host=host,
        **({"dashboard_port": PORTS["dashboard"]} if cfg.dashboard else {}),
        _metrics_export_port=PORTS["metrics_export"],
        **quiet,
    )


def token_file() -> Path:
    """Where Ray keeps the auth token of the clusters this user starts (``RAY_AUTH_TOKEN_PATH`` wins)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _guard_token(existed: bool) -> None:
    """The token is a password to every local Ray of this user: one Ray wrote is made 0600; one that
    was there before and that others can read is named in a warning (it is the user's file)."""
    path = token_file()
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if not existed:
        path.chmod(0o600)
    elif mode & 0o077:
        logger.warning("%s is readable by other users (mode %o): anyone who reads it can run code on your Ray; `chmod 600 %s`", path, mode, path)


_OPEN_PROBE = (
    "import sys\n"
    "from ray._raylet import GcsClient\n"
    "GcsClient(address=sys.argv[1]).internal_kv_keys(b'', namespace=None, timeout=10)\n"
    "print('OPEN')\n"
)


def cluster_is_open(gcs_address: str) -> bool:
    """Whether the Ray cluster at ``gcs_address`` answers a request that carries no token, i.e. its
    token authentication is off (asked from a separate process with no token at all)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN",)}
    env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=os.devnull + ".absent")
    try:
        proc = subprocess.run([sys.executable, "-c", _OPEN_PROBE, gcs_address], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return False
    return "OPEN" in proc.stdout


def init_ray(cfg: RayConfig) -> str | None:
    """Start or join Ray once per process; returns the dashboard URL when there is one.

    A local Ray takes free ports: the dashboard ``ray.dashboard_port`` or the next free one (a second
    run on the same machine gets its own), the metrics export port ``ray.metrics_export_port`` or any
    free one. Local Rays of one machine start one at a time (a file lock), so two runs started at the
    same moment never pick the same ports; a port taken by something else meanwhile: try again."""
    if ray.is_initialized():
        return None
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    attempts = 1 if cfg.address else 3
    for attempt in range(attempts):
        try:
            # Local Rays of this machine start one at a time: the next picks its ports once the
            # previous holds its own (Ray's dashboard, started at the same moment as another, can hang).
            lock = contextlib.nullcontext() if cfg.address else _machine_lock("ray-start")
            existed = token_file().exists()
            with lock:
                context = _start_or_join(cfg, attempt, quiet)
            _guard_token(existed)
            break
        except Exception as exc:  # Ray raises a bare Exception when its dashboard cannot bind
            if ray.is_initialized():
                ray.shutdown()
            if attempt + 1 < attempts and ("port" in str(exc).lower() or "dashboard" in str(exc).lower()):
                time.sleep(random.uniform(0.5, 2.0))  # the other run that took the port is starting too
                continue
            where = f"the Ray cluster at {cfg.address}" if cfg.address else "a local Ray"
            hint = (
                "check ray.address, and that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds the cluster's token"
                if cfg.address
                else "another Ray may hold its ports (`ray status`); set ray.dashboard_port / ray.metrics_export_port, or ray.dashboard=false"
            )
            raise ResourceError(f"could not start or reach {where}: {exc}; {hint}") from None
    for hook in list(AFTER_RAY_START):
        hook()
    if cfg.address:  # say which cluster this run joined: `auto` takes whatever Ray runs on this machine
        info = getattr(context, "address_info", {}) or {}
        JOINED.update(address=info.get("gcs_address") or info.get("address") or cfg.address, session=Path(info.get("session_dir") or "?").name)
        if info.get("gcs_address") and not cfg.allow_unauthenticated and cluster_is_open(info["gcs_address"]):
            ray.shutdown()
            raise ResourceError(
                f"the Ray cluster at {JOINED['address']} (session {JOINED['session']}, joined by ray.address={cfg.address}) has token "
                f"authentication off: anyone who reaches it can run code on it; start it with RAY_AUTH_MODE=token (README, Security), "
                f"or join it anyway with --set ray.allow_unauthenticated=true"
            )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url else None


def configure_torch(cfg: ExperimentConfig, num_cpus: float) -> None:
    """Threads and determinism of an actor that runs torch (a client worker, a decoder rank): its
    thread count is its CPU share, fixed; ``deterministic`` also asks torch for deterministic
    algorithms (an error, not a silent difference, where an op has none) and one inter-op thread."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or inter-op work already ran in this process
            pass


def determinism(cfg: ExperimentConfig) -> dict[str, object]:
    """What meta.json records of how reproducible the run is."""
    import torch

    return {
        "deterministic": cfg.deterministic,
        "torch_threads_per_worker": max(1, int(cfg.clients.num_cpus)),
        "deterministic_algorithms": cfg.deterministic,
        "cuda_devices_on_driver_host": torch.cuda.device_count(),  # where each actor computes: meta.json's workers
    }


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
    from raymed.methods import has_server_model  # torch and every method: not for the light users of this module (ports, threads)

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
                f"{first + len(workers)} (see raymed.engine.runtime.federation_bundles); launch it with those bundles"
            )
        return cls(group, server, workers)

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    @property
    def helper_strategy(self) -> PlacementGroupSchedulingStrategy:
        """For zero-resource helpers (the client-state actor): the driver's bundle."""
        return self.strategy(0)
