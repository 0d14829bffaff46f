"""Driver side of a run: data checked and sharded, Ray started, server actor launched, rounds logged.

:class:`Federation` is one federation, stepped round by round: ``raymed run`` drives it to the end
(:func:`run_experiment`), a Ray Tune trial drives it inside the trial's placement group and hands Tune
its metrics after each evaluation. Data problems are found before Ray starts (fail fast, one line). Results are
written after every round, so a failure or an interrupt keeps all finished rounds and says why in
``summary.json``. A checkpoint holds the server state, every client's persistent state and the
rounds so far, so a restored federation continues exactly where it stopped. It is written while the
next round trains (what it holds is taken between the rounds), in increments: the client states that
changed since the previous checkpoint (:mod:`raymed.engine.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymed.config import ExperimentConfig, apply_overrides, load_yaml
from raymed.data.shards import ShardSet, locate_sources, materialise
from raymed.engine.checkpoint import CHECKPOINT_FILE, RESUMABLE_KEYS, check_resume, read_checkpoint, save_checkpoint, segment_path
from raymed.engine.faults import check_faults
from raymed.engine.placement import Placement, plan_cluster
from raymed.engine.runtime import JOINED, PORTS, determinism, init_ray
from raymed.engine.server import ServerActor
from raymed.errors import ConfigError, DataError, RunFailed, Terminated, find_user_error, os_error
from raymed.experiment import validate_config
from raymed.methods import METHODS, build_method, has_server_model
from raymed.models.pretrained import MODEL_FILE, SELECTED_MODEL_FILE, save_model
from raymed.results.baselines import baseline_metrics, compute_baselines, jsonable
from raymed.results.selection import Selection
from raymed.results.store import RunLock, RunWriter, check_writable, run_id_of
from raymed.tasks.registry import run_task

logger = logging.getLogger("raymed")
RoundCallback = Callable[[int, dict[str, Any]], None]


class Federation:
    """One federation on Ray: its server actor (which owns the client pool) and its run folder."""

    def __init__(self, cfg: ExperimentConfig, placement: Placement | None = None, resume: str | Path | None = None):
        if resume is not None and METHODS[cfg.strategy.name].uses_server_model:
            raise ConfigError(
                f"strategy {cfg.strategy.name} keeps a central model in DeepSpeed ranks, which checkpoints do not hold; "
                f"it cannot be resumed exactly: rerun it from the start"
            )
        cfg = run_task(cfg.data.task).prepare(cfg)  # what data.task builds once (a pretrained decoder), cached
        self.cfg = cfg
        d = cfg.data
        files = locate_sources(d)
        check_writable(resume if resume is not None else cfg.output_dir, "run folder" if resume is not None else "output_dir")
        if cfg.data.cache_dir:
            check_writable(cfg.data.cache_dir, "data.cache_dir")
        shard_dir = materialise(cfg, files)
        cfg = self.cfg = build_method(cfg.strategy.name, cfg.strategy.params).prepare(cfg, str(shard_dir))
        shards = ShardSet(shard_dir)
        check_faults(cfg, shards.tasks)
        baselines = compute_baselines(shards)
        self.baselines, self.baseline_metrics = jsonable(baselines), baseline_metrics(baselines)
        self.selection = Selection(cfg.eval.select, cfg.eval.select_mode, cfg.eval.early_stop_patience)
        self.dashboard = init_ray(cfg.ray)
        self.plan = None if placement else plan_cluster(cfg)
        self.num_workers = len(placement.worker_bundles) if placement else self.plan.num_workers
        # Only now, with data and resources known to be there, does the run get a folder.
        meta = {
            "synthetic": any(f.synthetic for f in files),
            "data_files": {f.flag: {"path": str(f.path), "md5": f.md5, "synthetic": f.synthetic, "official": f.official} for f in files},
            "shards": str(shard_dir),
            "splits": {flag: {k: info.get(k) for k in ("num_train", "num_val", "val_source", "num_test", "class_counts")} for flag, info in shards.meta["datasets"].items()},
            "reproducibility": determinism(cfg),
            "baselines": self.baselines,
            "baseline_metrics": self.baseline_metrics,
            "worker_plan": self.plan.rows() if self.plan else None,
            "ray_ports": dict(PORTS),
            **({"ray_cluster": dict(JOINED)} if cfg.ray.address else {}),
        }
        self.writer = RunWriter.reopen(cfg, resume, meta) if resume is not None else RunWriter(cfg, meta)
        try:
            self.server = self._start_server(cfg, shard_dir, placement)
        except BaseException:
            self.writer.lock.release()  # the run never started: its folder is free again
            raise
        self.round = 0
        self.info: dict[str, Any] = {}
        self.checkpoints: list[dict[str, Any]] = []  # one row per checkpoint written: round, clients, bytes, seconds
        self._writing: PendingCheckpoint | None = None  # the checkpoint being written while a round trains
        self._store: Any = None

    def _start_server(self, cfg: ExperimentConfig, shard_dir: Path, placement: Placement | None) -> Any:
        """The server actor (which owns the client pool): beside this driver, or in its bundle."""
        # A server model (a run task's generator, a method's central model): the server's resources go to its
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
        else:  # beside this driver: the run then hangs on one node only, and losing another loses no state
            needs = options["num_cpus"] or options["num_gpus"]  # a server with no resources always fits there
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=bool(needs))
        return ray.remote(ServerActor).options(**options).remote(
            cfg.to_dict(), str(shard_dir), self.num_workers, self.name, str((self.writer.dir / "client_state").resolve()), placement,
            self.plan.node_of_worker() if self.plan else None,
        )

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
        meta = self.writer.meta
        data = {flag: {**file, **meta["splits"].get(flag, {})} for flag, file in meta["data_files"].items()}
        self.info = {"run_dir": self.run_dir, "num_workers": self.num_workers, "dashboard": self.dashboard,
                     "worker_plan": self.plan.rows() if self.plan else None, "ports": dict(PORTS), "data": data,
                     "cluster": dict(JOINED) if self.cfg.ray.address else None, **described}
        return self.info

    def step(self) -> dict[str, Any]:
        """Run and log one round; returns its metrics."""
        if self._writing is not None and not self._writing.thread.is_alive():
            self.wait_for_checkpoint()  # the last checkpoint failed (a full disk): stop now, not rounds later
        result = ray.get(self.server.run_round.remote())
        self.writer.log_round(result)
        self.round = int(result["metrics"]["round"])
        if self.selection.update(self.round, result["metrics"]):
            ray.get(self.server.keep_selected.remote())  # the model of the round selected on validation
        every = self.cfg.engine.checkpoint_every
        if every and (self.round % every == 0 or self.round == self.cfg.rounds) and not METHODS[self.cfg.strategy.name].uses_server_model:
            self._begin_checkpoint(self.run_dir)  # after the round's files: the checkpoint never runs ahead of them
        return result["metrics"]

    def checkpoint(self, folder: str | Path) -> Path:
        """Write the whole federation's state to ``folder``, self-contained, and wait for it (a Tune
        trial's checkpoint); returns the head file. The run folder's own checkpoints are incremental
        and written while the next round trains (:meth:`step`). It holds the server state (weights,
        the method's state, the round), every client's persistent state and the metrics so far. Random
        draws need no saved state: each is seeded by (seed, round, client) (sampling, availability,
        faults, batches, torch's seed per client)."""
        same = Path(folder).resolve() == self.run_dir.resolve()
        self._begin_checkpoint(folder, everything=not same)
        self.wait_for_checkpoint()
        return Path(folder) / CHECKPOINT_FILE

    def _begin_checkpoint(self, folder: str | Path, everything: bool = False) -> None:
        """Take what the checkpoint of this round holds (now, between rounds) and write it in the
        background: the client states by their store, the head by a thread of this driver."""
        self.wait_for_checkpoint()  # one at a time, in order
        started = time.perf_counter()
        folder = Path(folder).resolve()  # the store writes the segment: its working directory is not this one
        if self._store is None:
            self._store = ray.get(self.server.client_state_store.remote())
        segment = f"r{self.round:06d}"
        captured = ray.get(self._store.capture.remote(segment, everything))
        # The server runs its calls in order: these return this round's state, whatever comes next.
        server = [self.server.get_state.remote(), self.server.get_selected.remote()]
        written = self._store.write.remote(segment, str(segment_path(folder, segment)))
        head = {"rounds": list(self.writer.rounds), "config": self.cfg.to_dict(), "client_segments": captured["segments"]}
        row = {"round": self.round, "clients_written": captured["clients"], "segments": len(captured["segments"])}
        self._writing = PendingCheckpoint(Path(folder), self.writer.run_id, server, written, head, row, started, self.checkpoints)
        self._writing.thread.start()

    def wait_for_checkpoint(self) -> None:
        """Until the checkpoint being written is on disk (raises what its writing raised)."""
        pending, self._writing = self._writing, None
        if pending is not None:
            pending.join()

    def restore(self, folder: str | Path | dict[str, Any]) -> int:
        """Continue from a checkpoint written by :meth:`checkpoint` (its folder, or the checkpoint as
        :func:`read_checkpoint` returns it); returns its round."""
        saved = folder if isinstance(folder, dict) else read_checkpoint(folder)[1]
        store = ray.get(self.server.client_state_store.remote())
        # Resumed in its own folder, the next checkpoint adds to these segments; elsewhere it starts whole.
        own = Path(saved["folder"]).resolve() == self.run_dir.resolve()
        ray.get([self.server.set_state.remote(saved["server"]), store.restored.remote(saved["clients"], saved["segment_of"] if own else {})])
        self.writer.restore_rounds(saved["rounds"])
        self.round = saved["server"].round
        e = self.cfg.eval
        self.selection = Selection.replay(saved["rounds"], e.select, e.select_mode, e.early_stop_patience)
        if saved.get("selected") is not None:
            ray.get(self.server.set_selected.remote(saved["selected"]))
        return self.round

    @property
    def stopped_early(self) -> bool:
        """Whether validation has not improved for eval.early_stop_patience evaluations."""
        return self.selection.should_stop

    def close(self, status: str) -> None:
        lost = None
        try:
            self.wait_for_checkpoint()  # a finished round's checkpoint: kept even when the run failed later
        except Exception as exc:
            logger.warning("the checkpoint of %s after round %s was not written: %s", self.name, self.round, exc)
            if status == "completed":  # the run's own last checkpoint: say so, close, then raise it
                status, lost = f"failed: the checkpoint after round {self.round} was not written ({type(exc).__name__}: {exc})", exc
        try:
            if self.checkpoints:
                self.writer.add_meta(checkpoints=checkpoint_summary(self.checkpoints))
            self.save_model()
        except Exception as exc:  # a full disk: the summary below is still written (it is small), then this is raised
            logger.warning("the model files of %s were not written: %s", self.name, exc)
            if status == "completed":  # only a run that was otherwise fine raises this: the first error wins
                status, lost = f"failed: the model files after round {self.round} were not written ({os_error(exc) or type(exc).__name__})", exc
        try:
            self.writer.finish(status, selected=self.selection.summary(), baselines=self.baselines, baseline_metrics=self.baseline_metrics)
        finally:
            ray.kill(self.server)  # its client workers and state actor are owned by it and go with it
        if lost is not None:
            raise lost

    def save_model(self) -> None:
        """The server's weights as ``model.safetensors`` in the run folder (a later run's teacher or
        foundation model), and those of the round selected on validation as ``model-selected.safetensors``;
        after a failure, those of the last finished round, when the server still answers."""
        try:
            (state, tasks), selected = ray.get([self.server.final_model.remote(), self.server.get_selected.remote()], timeout=60)
        except Exception as exc:  # the server died while the failure was raised: the metrics are kept
            logger.warning("no %s written for %s: the server did not answer (%s)", MODEL_FILE, self.name, type(exc).__name__)
            return
        for name, chosen in ((MODEL_FILE, state), (SELECTED_MODEL_FILE, selected)):
            if chosen is not None and chosen.round >= 1:
                save_model(self.run_dir / name, chosen.weights, self.cfg.model.name, tasks, self.cfg.strategy.name, chosen.round)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            status = failure_status(exc)
        elif self.round >= self.cfg.rounds or self.stopped_early:
            status = "completed"
        else:
            status = f"stopped after round {self.round}"
        self.close(status)
        if isinstance(exc, ray.exceptions.RayActorError) and find_user_error(exc) is None:
            saved = (self.run_dir / CHECKPOINT_FILE).is_file()
            again = f"`raymed run --resume {self.run_dir}` continues from its last checkpoint" if saved else "no checkpoint was written yet: rerun it"
            raise RunFailed(
                f"an actor of the run died ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}) after round "
                f"{self.round}; its finished rounds are in {self.run_dir}: {again}"
            ) from exc
        return False


class PendingCheckpoint:
    """A checkpoint whose content was taken between two rounds, written by a thread of the driver
    while the next round trains: it waits for the server's state and the client-state segment,
    then writes the head (atomically, after the segment) and records the row."""

    def __init__(self, folder: Path, run_id: str, server: list, written: Any, head: dict, row: dict, started: float, log: list):
        self.error: BaseException | None = None

        def write() -> None:
            try:
                state, selected = ray.get(server)
                row["segment_bytes"] = ray.get(written)
                path = save_checkpoint(folder, run_id, {"server": state, "selected": selected, **head})
                row["head_bytes"] = os.path.getsize(path)
                row["seconds"] = time.perf_counter() - started
                log.append(row)
            except BaseException as exc:  # re-raised in the driver by join()
                self.error = exc

        self.thread = threading.Thread(target=write, name=f"checkpoint-r{row['round']}", daemon=True)

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def checkpoint_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What meta.json records of a run's checkpoints."""
    return {
        "written": len(rows),
        "last_round": rows[-1]["round"],
        "segment_bytes_total": sum(r["segment_bytes"] for r in rows),
        "head_bytes_last": rows[-1]["head_bytes"],
        "clients_written_total": sum(r["clients_written"] for r in rows),
        "seconds_max": max(r["seconds"] for r in rows),
    }


def failure_status(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "interrupted (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"failed: {find_user_error(exc) or os_error(exc) or type(exc).__name__ + ': ' + (str(exc).splitlines() or [''])[0]}"


def run_experiment(
    cfg: ExperimentConfig,
    on_round: RoundCallback | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run one federation to the end; returns its result folder."""
    return _drive(Federation(cfg), on_round, on_start)



def resume_experiment(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    on_round: RoundCallback | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Continue the run in ``run_dir`` from its checkpoint, in the same folder, to its last round
    (``--set rounds=N`` extends it); returns the folder."""
    return ResumePoint.load(run_dir, overrides).run(on_round, on_start)


@dataclass
class ResumePoint:
    """A stopped run to continue: its folder, the config it continues with, its checkpoint."""

    run_dir: Path
    cfg: ExperimentConfig
    saved: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | Path, overrides: list[str] | None = None) -> ResumePoint:
        """The folder's own config, with only rounds and ray.* changed, and its checkpoint (read once)."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise DataError(f"{run_dir} holds no config.yaml; give the folder of a raymed run to resume")
        for item in overrides or []:
            if not item.partition("=")[0].strip().startswith(RESUMABLE_KEYS):
                raise ConfigError(f"--set {item}: a resumed run keeps its config; only rounds and ray.* may change (rerun from the start to change the rest)")
        RunLock.ensure_free(run_dir)  # two resumes of one folder: the second stops here
        header, saved = read_checkpoint(run_dir)
        config = load_yaml(run_dir / "config.yaml")
        if not config:
            raise DataError(f"{run_dir / 'config.yaml'} is empty; the checkpoint holds this run's config: restore config.yaml from a copy, or rerun from the start")
        check_resume(run_dir, header, saved, config, run_id_of(run_dir))
        cfg = validate_config(apply_overrides(config, list(overrides or [])))
        if saved["server"].round >= cfg.rounds and _completed(run_dir):
            raise ConfigError(f"{run_dir} already finished round {saved['server'].round} of rounds={cfg.rounds}; --set rounds=N with a larger N to go on")
        return cls(run_dir, cfg, saved)

    def run(self, on_round: RoundCallback | None = None, on_start: Callable[[dict[str, Any]], None] | None = None) -> Path:
        return _drive(Federation(self.cfg, resume=self.run_dir), on_round, on_start, restore=self.saved)


def _completed(run_dir: Path) -> bool:
    """Whether the run's summary.json says it completed. A driver stopped after the last checkpoint
    but before the summary leaves a run whose resume only finishes it (models, summary)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _drive(
    federation: Federation,
    on_round: RoundCallback | None,
    on_start: Callable[[dict[str, Any]], None] | None,
    restore: dict[str, Any] | None = None,
) -> Path:
    cfg = federation.cfg
    with federation:
        info = federation.start()
        if restore is not None:
            info["resumed_from_round"] = federation.restore(restore)
        if on_start:
            on_start(info)
        while federation.round < cfg.rounds and not federation.stopped_early:
            metrics = federation.step()
            if on_round:
                on_round(federation.round, metrics)
    return federation.run_dir
