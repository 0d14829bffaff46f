"""Every run task by ``data.task`` name: the built-in ones (:mod:`raymed.tasks.base`) and report
generation (:mod:`raymed.tasks.report`); the engine, the shard writer and the methods ask here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raymed.models import build_model
from raymed.tasks import report  # noqa: F401  (registers its task and its R2Gen source)
from raymed.tasks.base import RUN_TASKS, RunTask

if TYPE_CHECKING:
    from torch import nn

    from raymed.config import ModelConfig
    from raymed.data.tasks import TaskSpec


def registered() -> dict[str, RunTask]:
    """Every run task by name."""
    return RUN_TASKS


def run_task(name: str) -> RunTask:
    return RUN_TASKS[name]


def build_task_model(cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> nn.Module:
    """The model for ``tasks``: the one of the run task that gives their kind, else ``model.name``'s."""
    kinds = {t.kind for t in tasks.values()}
    for task in RUN_TASKS.values():
        if kinds & set(task.kinds):
            model = task.build_model(cfg, tasks, seed)
            if model is not None:
                return model
    return build_model(cfg.name, tasks, seed)
