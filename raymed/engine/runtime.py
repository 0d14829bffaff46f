"""Ray start-up with safe defaults, and the plan of how many client workers fit.

Security: Ray's dashboard and jobs API run code for whoever reaches them. A local Ray started here
has token authentication on (``RAY_AUTH_MODE=token``, set in ``raymed/__init__.py`` before Ray is
imported; Ray writes the token to
``~/.ray/auth_token``, and ``ray get-auth-token`` prints it) and binds the dashboard to 127.0.0.1.
Only ``ray.dashboard_host`` in the config widens that, and only when a user sets it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymed.config import ExperimentConfig, RayConfig
from raymed.errors import ResourceError

WORKER_MEMORY_BYTES = 0.6 * 2**30  # measured: a Ray actor that imports torch holds about 0.55 GB RSS
TRIAL_DRIVER_CPUS = 0.25  # a Tune trial's own process only waits on its server actor


def init_ray(cfg: RayConfig) -> str | None:
    """Start or join Ray once per process; returns the dashboard URL when there is one."""
    if ray.is_initialized():
        return None
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if cfg.address:
            context = ray.init(address=cfg.address, **quiet)
        else:
            import torch

            context = ray.init(
                address="local",  # a new Ray of our own, even when another one runs on this machine
                num_cpus=cfg.num_cpus or os.cpu_count() or 1,
                num_gpus=cfg.num_gpus if cfg.num_gpus is not None else torch.cuda.device_count(),
                include_dashboard=cfg.dashboard,
                dashboard_host=cfg.dashboard_host,
                dashboard_port=cfg.dashboard_port,
                **quiet,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {cfg.address}" if cfg.address else "a local Ray"
        raise ResourceError(
            f"could not start or reach {where}: {exc}; check ray.address, and that RAY_AUTH_TOKEN (or "
            f"~/.ray/auth_token) holds the cluster's token"
        ) from None
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
        "cuda": torch.cuda.is_available(),
    }


def plan_workers(cfg: ExperimentConfig, resources: dict[str, float]) -> int:
    """Number of client worker actors: what fits in the cluster, and no more than a round can use.

    Ray's resources are logical, so an actor asking for more than exists would wait forever: refuse
    such a layout here, with the numbers, instead of hanging.
    """
    c, s = cfg.clients, cfg.server
    free_cpus = resources.get("CPU", 0.0) - s.num_cpus
    free_gpus = resources.get("GPU", 0.0) - s.num_gpus
    fit = math.floor(free_cpus / c.num_cpus + 1e-9)
    if c.num_gpus > 0:
        if free_gpus < c.num_gpus:
            raise ResourceError(
                f"clients.num_gpus={c.num_gpus} but the cluster has {free_gpus:g} GPU(s) free after the server; "
                f"set clients.num_gpus=0 to train on CPU"
            )
        fit = min(fit, math.floor(free_gpus / c.num_gpus + 1e-9))
    if fit < 1:
        raise ResourceError(
            f"one client worker needs clients.num_cpus={c.num_cpus:g} CPUs but the cluster has {free_cpus:g} free "
            f"after the server (server.num_cpus={s.num_cpus:g}); lower clients.num_cpus"
        )
    memory = resources.get("memory")
    memory_fit = max(1, int(memory // WORKER_MEMORY_BYTES)) if memory else fit

    if cfg.engine.mode == "dedicated":
        need = c.num
        if need > fit or need > memory_fit:
            raise ResourceError(
                f"engine.mode=dedicated needs one actor per client ({need}), but only {min(fit, memory_fit)} fit "
                f"(CPU/GPU per client: clients.num_cpus={c.num_cpus:g}, clients.num_gpus={c.num_gpus:g}; about "
                f"0.6 GB memory each); use engine.mode=pool"
            )
        return need
    if cfg.engine.num_workers != "auto":
        want = int(cfg.engine.num_workers)
        if want > fit:
            raise ResourceError(
                f"engine.num_workers={want} workers need {want * c.num_cpus:g} CPUs"
                + (f" and {want * c.num_gpus:g} GPUs" if c.num_gpus else "")
                + f" but only {fit} fit; lower engine.num_workers or use 'auto'"
            )
        return want
    return max(1, min(fit, memory_fit, cfg.clients.per_round))


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
    """What the server side asks for: its actor, or with a server model (report generation, FedKIM)
    one bundle per DeepSpeed rank (the server's CPUs and GPUs split evenly); none when it asks for none."""
    from raymed.methods import has_server_model

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
    server_bundles: tuple[int, ...]  # the server actor's, or the decoder ranks' (report generation); () = none
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
