"""Driver side of a run: data checked and sharded, Ray started, server actor launched, rounds logged.

:class:`Federation` is one federation, stepped round by round: ``raymed run`` drives it to the end
(:func:`run_experiment`), a Ray Tune trial drives it inside the trial's placement group and reports
after each evaluation. Data problems are found before Ray starts (fail fast, one line). Results are
written after every round, so a failure or an interrupt keeps all finished rounds and says why in
``summary.json``. A checkpoint holds the server state, every client's persistent state and the
rounds so far, so a restored federation continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from raymed.config import ExperimentConfig
from raymed.data.shards import locate_sources, materialise
from raymed.engine.runtime import Placement, init_ray, plan_workers
from raymed.engine.server import ServerActor
from raymed.errors import DataError, find_user_error
from raymed.methods import build_method, has_server_model
from raymed.results.store import RunWriter

logger = logging.getLogger("raymed")
RoundCallback = Callable[[int, dict[str, Any]], None]
CHECKPOINT_FILE = "federation.pkl"


class Federation:
    """One federation on Ray: its server actor (which owns the client pool) and its run folder."""

    def __init__(self, cfg: ExperimentConfig, placement: Placement | None = None):
        from raymed.models.report import pretrained_decoder

        cfg = pretrained_decoder(cfg)  # report runs may start from a pretrained decoder (built once, cached)
        self.cfg = cfg
        d = cfg.data
        files = locate_sources(d)
        shard_dir = materialise(cfg, files)
        cfg = self.cfg = build_method(cfg.strategy.name, cfg.strategy.params).prepare(cfg, str(shard_dir))
        self.dashboard = init_ray(cfg.ray)
        self.num_workers = len(placement.worker_bundles) if placement else plan_workers(cfg, ray.cluster_resources())
        # Only now, with data and resources known to be there, does the run get a folder.
        self.writer = RunWriter(
            cfg,
            {
                "synthetic": any(f.synthetic for f in files),
                "data_files": {f.flag: {"path": str(f.path), "md5": f.md5, "synthetic": f.synthetic} for f in files},
                "shards": str(shard_dir),
            },
        )
        # A server model (report decoder, FedKIM's central model): the server's resources go to its
        # DeepSpeed ranks, which it starts.
        own = not has_server_model(cfg)
        options: dict[str, Any] = {
            "name": f"{self.name}.server",
            "num_cpus": cfg.server.num_cpus if own else 0,
            "num_gpus": cfg.server.num_gpus if own else 0,
        }
        if placement:
            bundle = placement.server_bundles[0] if own and placement.server_bundles else 0
            options["scheduling_strategy"] = placement.strategy(bundle)
        self.server = ray.remote(ServerActor).options(**options).remote(
            cfg.to_dict(), str(shard_dir), self.num_workers, self.name, str(self.writer.dir / "client_state"), placement
        )
        self.round = 0
        self.info: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.writer.name

    @property
    def run_dir(self) -> Path:
        return self.writer.dir

    def start(self) -> dict[str, Any]:
        """Wait for the server and its workers; returns where they run."""
        described = ray.get(self.server.describe.remote())
        self.writer.add_meta(workers=described["workers"], dashboard=self.dashboard, **{k: described[k] for k in ("decoder",) if k in described})
        self.info = {"run_dir": self.run_dir, "num_workers": self.num_workers, "dashboard": self.dashboard, **described}
        return self.info

    def step(self) -> dict[str, Any]:
        """Run and log one round; returns its metrics."""
        result = ray.get(self.server.run_round.remote())
        self.writer.log_round(result)
        self.round = int(result["metrics"]["round"])
        return result["metrics"]

    def checkpoint(self, folder: str | Path) -> Path:
        """Write the whole federation's state to ``folder``; returns the file."""
        store = ray.get(self.server.client_state_store.remote())
        state, clients = ray.get([self.server.get_state.remote(), store.snapshot.remote()])
        path = Path(folder) / CHECKPOINT_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(pickle.dumps({"server": state, "clients": clients, "rounds": self.writer.rounds}, protocol=5))
        tmp.replace(path)
        return path

    def restore(self, folder: str | Path) -> int:
        """Continue from a checkpoint written by :meth:`checkpoint`; returns its round."""
        path = Path(folder) / CHECKPOINT_FILE
        try:
            saved = pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise DataError(f"cannot read the federation checkpoint {path}: {exc}; give a folder written by a raymed checkpoint") from None
        store = ray.get(self.server.client_state_store.remote())
        ray.get([self.server.set_state.remote(saved["server"]), store.put_many.remote(saved["clients"])])
        self.writer.restore_rounds(saved["rounds"])
        self.round = saved["server"].round
        return self.round

    def close(self, status: str) -> None:
        self.save_model()
        self.writer.finish(status)
        ray.kill(self.server)  # its client workers and state actor are owned by it and go with it

    def save_model(self) -> None:
        """The server's weights as ``model.safetensors`` in the run folder (a later run's teacher or
        foundation model); after a failure, those of the last finished round, when the server still answers."""
        from raymed.models.pretrained import MODEL_FILE, save_model

        try:
            state, tasks = ray.get(self.server.final_model.remote(), timeout=60)
        except Exception as exc:  # the server died with the failure being reported: the metrics are kept
            logger.warning("no %s written for %s: the server did not answer (%s)", MODEL_FILE, self.name, type(exc).__name__)
            return
        if state.round >= 1:
            save_model(self.run_dir / MODEL_FILE, state.weights, self.cfg.model.name, tasks, self.cfg.strategy.name, state.round)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            status = failure_status(exc)
        elif self.round >= self.cfg.rounds:
            status = "completed"
        else:
            status = f"stopped after round {self.round}"
        self.close(status)
        return False


def failure_status(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"failed: {find_user_error(exc) or type(exc).__name__ + ': ' + str(exc).splitlines()[0]}"


def run_experiment(
    cfg: ExperimentConfig,
    on_round: RoundCallback | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run one federation to the end; returns its result folder."""
    with Federation(cfg) as federation:
        info = federation.start()
        if on_start:
            on_start(info)
        while federation.round < cfg.rounds:
            metrics = federation.step()
            if on_round:
                on_round(federation.round, metrics)
    return federation.run_dir
