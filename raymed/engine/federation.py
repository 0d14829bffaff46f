"""Driver side of a run: data checked and sharded, Ray started, server actor launched, rounds logged.

Data problems are found before Ray starts (fail fast, one line). Results are written after every
round, so a failure or an interrupt keeps all finished rounds and says why in ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from raymed.config import ExperimentConfig
from raymed.data.medmnist_files import locate_all
from raymed.data.shards import materialise
from raymed.engine.runtime import init_ray, plan_workers
from raymed.engine.server import ServerActor
from raymed.errors import find_user_error
from raymed.results.store import RunWriter

RoundCallback = Callable[[int, dict[str, Any]], None]


def run_experiment(
    cfg: ExperimentConfig,
    on_round: RoundCallback | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run one federation to the end; returns its result folder."""
    d = cfg.data
    files = locate_all(d.datasets, d.size, d.root, d.download)
    shard_dir = materialise(cfg, files)
    writer = RunWriter(
        cfg,
        {
            "synthetic": any(f.synthetic for f in files),
            "data_files": {f.flag: {"path": str(f.path), "md5": f.md5, "synthetic": f.synthetic} for f in files},
            "shards": str(shard_dir),
        },
    )
    dashboard = init_ray(cfg.ray)
    num_workers = plan_workers(cfg, ray.cluster_resources())
    server_cls = ray.remote(ServerActor)
    server = server_cls.options(
        name=f"{writer.name}.server", num_cpus=cfg.server.num_cpus, num_gpus=cfg.server.num_gpus
    ).remote(cfg.to_dict(), str(shard_dir), num_workers, writer.name, str(writer.dir / "client_state"))
    status = "interrupted"
    try:
        described = ray.get(server.describe.remote())
        writer.add_meta(workers=described["workers"], dashboard=dashboard)
        if on_start:
            on_start({"run_dir": writer.dir, "num_workers": num_workers, "dashboard": dashboard, **described})
        for r in range(1, cfg.rounds + 1):
            result = ray.get(server.run_round.remote())
            writer.log_round(result)
            if on_round:
                on_round(r, result["metrics"])
        status = "completed"
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            status = f"failed: {find_user_error(exc) or type(exc).__name__ + ': ' + str(exc).splitlines()[0]}"
        raise
    finally:
        writer.finish(status)
        ray.kill(server)  # its client workers are owned by it and go with it
    return writer.dir
