"""Experiment trackers: a run's per-round metrics, resolved config and summary files, sent as they
happen to TensorBoard, MLflow or Weights & Biases (``logging.to``).

Each tracker uses its library's own writer — tensorboardX's ``SummaryWriter`` (installed with
``ray[tune]``), ``mlflow.MlflowClient``, ``wandb.init`` — and sees the run through three calls from
:class:`raymed.results.store.RunWriter`: ``start`` (the resolved config as parameters), ``log`` (one
evaluated or trained round) and ``finish`` (the run folder's summary files as artifacts, the status).

- **tensorboard**: event files in ``<run>/tensorboard/`` (``tensorboard --logdir results``).
- **mlflow**: one MLflow run per raymed run, in the experiment ``logging.experiment`` (default
  ``raymed``) of ``logging.mlflow_uri``. Default: a store in the run folder, ``<run>/mlflow.db``
  (SQLite: MLflow 3 keeps its ``./mlruns`` file store in maintenance mode and refuses it unless
  told) with artifacts in ``<run>/mlartifacts``; ``mlflow ui --backend-store-uri
  sqlite:///<run>/mlflow.db`` shows it. Give a shared ``sqlite:///`` file or a tracking server to
  see many runs side by side.
- **wandb**: one W&B run in project ``logging.experiment``, ``logging.wandb_mode`` offline unless set
  to online (``wandb sync <run>/wandb/offline-run-*`` uploads it later).

A sweep's trials log MLflow and W&B through Ray's Tune callbacks instead, into one store
(:func:`raymed.sweep.tuner._tracker_callbacks`). MLflow and W&B are optional extras (``pip install raymed[mlflow]``, ``raymed[wandb]``); a run that
asks for one that is missing is refused before it starts, in one line. A tracker that fails during a
run (a tracking server that went away) is logged once and dropped: the run and its folder go on.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from raymed.config import ExperimentConfig, flatten
from raymed.errors import ConfigError

logger = logging.getLogger("raymed")

# The run folder's files a tracker keeps as artifacts when the run ends.
SUMMARY_FILES = ("config.yaml", "meta.json", "summary.json", "summary.md", "rounds.parquet")
# Package each tracker imports, and the extra that installs it.
PACKAGES = {"tensorboard": ("tensorboardX", "ray[tune]"), "mlflow": ("mlflow", "raymed[mlflow]"), "wandb": ("wandb", "raymed[wandb]")}


def check_trackers(cfg: ExperimentConfig) -> None:
    """Refuse, in one line, a config naming a tracker whose package is not installed."""
    for name in cfg.logging.to:
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"logging.to lists {name}, but {module} is not installed: pip install '{extra}' (or drop {name} from logging.to)") from None


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite metrics (an undefined AUC is NaN: a gap in the chart, not a point)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker(Protocol):
    """One tracker of one run. ``start`` returns its state (JSON), kept in meta.json, so that a
    resumed run continues the tracker's own run instead of opening a second one."""

    name: str

    def start(self, cfg: ExperimentConfig, folder: Path, state: dict[str, Any] | None) -> dict[str, Any]: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, status: str, folder: Path) -> None: ...


class TensorBoard:
    name = "tensorboard"

    def start(self, cfg, folder, state):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder / "tensorboard"))
        text = "\n".join(f"    {k}: {v}" for k, v in flatten(cfg.to_dict()).items())  # indented: Markdown code
        self.writer.add_text("config", text, 0)
        return {"logdir": str(folder / "tensorboard")}

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, status, folder):
        self.writer.add_text("status", status, 0)
        self.writer.close()


class MLflow:
    name = "mlflow"

    def start(self, cfg, folder, state):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        own = cfg.logging.mlflow_uri is None  # the run folder's own store, with its artifacts beside it
        uri = f"sqlite:///{(folder / 'mlflow.db').resolve()}" if own else cfg.logging.mlflow_uri
        self.client = MlflowClient(tracking_uri=uri)
        if state and state.get("run_id") and state.get("uri") == uri:  # a resumed run: the same MLflow run
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return state
        experiment = self.client.get_experiment_by_name(cfg.logging.experiment)
        if experiment is None:
            artifacts = (folder / "mlartifacts").resolve().as_uri() if own else None  # else the store's own default
            experiment_id = self.client.create_experiment(cfg.logging.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=folder.name, tags={"raymed.run_dir": str(folder.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        return {"uri": uri, "run_id": self.run_id, "experiment": cfg.logging.experiment}

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def finish(self, status, folder):
        for name in SUMMARY_FILES:
            if (folder / name).is_file():
                self.client.log_artifact(self.run_id, str(folder / name))
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED" if status.startswith("failed") else "KILLED")


class WandB:
    name = "wandb"

    def start(self, cfg, folder, state):
        import wandb

        resume = state.get("id") if state else None
        self.run = wandb.init(
            project=cfg.logging.experiment, name=folder.name, dir=str(folder), mode=cfg.logging.wandb_mode,
            config=flatten(cfg.to_dict()), id=resume, resume="allow" if resume else None, reinit="create_new",
        )
        return {"id": self.run.id, "mode": cfg.logging.wandb_mode}

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def finish(self, status, folder):
        for name in SUMMARY_FILES:
            if (folder / name).is_file():
                self.run.save(str(folder / name), base_path=str(folder), policy="now")
        self.run.finish(exit_code=0 if status == "completed" else 1)


TRACKERS: dict[str, type] = {t.name: t for t in (TensorBoard, MLflow, WandB)}


class Trackers:
    """The run's trackers, each guarded: one that fails is warned about once and dropped."""

    def __init__(self, cfg: ExperimentConfig, folder: Path, saved: dict[str, Any] | None = None):
        self.folder = folder
        self.active: list[Tracker] = []
        self.state: dict[str, Any] = {}
        for name in cfg.logging.to:
            tracker = TRACKERS[name]()
            try:
                self.state[name] = tracker.start(cfg, folder, (saved or {}).get(name))
            except ImportError:  # check_trackers ran at validation; a config built around it lands here
                raise ConfigError(f"logging.to lists {name}, but its package is not installed: pip install '{PACKAGES[name][1]}'") from None
            except Exception as exc:  # a tracker must never cost the run
                logger.warning("logging.to: %s could not start (%s: %s); the run goes on without it", name, type(exc).__name__, exc)
                continue
            self.active.append(tracker)

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, call)(*args)
            except Exception as exc:
                logger.warning("logging.to: %s failed (%s: %s); the run goes on without it", tracker.name, type(exc).__name__, exc)
                self.active.remove(tracker)

    def log(self, metrics: dict[str, Any]) -> None:
        """One round's metrics (``round`` is the step)."""
        if self.active:
            self._each("log", int(metrics["round"]), _finite({k: v for k, v in metrics.items() if k != "round"}))

    def finish(self, status: str) -> None:
        self._each("finish", status, self.folder)
        self.active = []
