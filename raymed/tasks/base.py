"""A run task's hooks (:class:`RunTask`) and the two that need none of their own:
``classification`` (each dataset's own task) and ``superresolution``. The registry that lists
every run task is :mod:`raymed.tasks.registry`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from raymed.config import DataConfig, ExperimentConfig, ModelConfig
    from raymed.data.shards import Rows
    from raymed.data.source import DatasetFile
    from raymed.data.tasks import TaskSpec


class RunTask:
    """``data.task``'s hooks; each does nothing by default (a run of the datasets' own tasks)."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ()  # the dataset-task kinds (TaskSpec.kind) it gives datasets
    # Whether the run keeps a model beside the server, in DeepSpeed ranks, that generates the global
    # model's evaluation outputs (the server's resources go to those ranks).
    server_model: ClassVar[bool] = False

    def check(self, cfg: ExperimentConfig) -> None:
        """Refuse (ConfigError, one line) a config this task cannot run; called on validation."""

    def prepare(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """Build what the run needs before its data and Ray (built once, cached); the resolved config."""
        return cfg

    def locate(self, d: DataConfig) -> None:
        """Check the files the task needs beyond the datasets' own (a one-line DataError when missing)."""

    def shard_identity(self, d: DataConfig) -> Any:
        """What of the config, beyond the datasets, determines the shards' content (JSON-able)."""
        return None

    def dataset_task(self, task: TaskSpec, d: DataConfig) -> TaskSpec:
        """The task this run sets on a dataset whose own task is ``task``."""
        return task

    def attach(
        self, cfg: ExperimentConfig, files: list[DatasetFile], tasks: dict[str, TaskSpec], train: Rows, val: Rows, test: Rows,
        clients: list[dict[str, np.ndarray]], tmp: Path, out: Path,
    ) -> None:
        """Rewrite rows and tasks in place once the clients are dealt, before the shards are written
        (report generation: each row's report tokens); ``tmp`` becomes ``out``."""

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> nn.Module | None:
        """The model for datasets of this task's :attr:`kinds` (None: the model registry's ``model.name``)."""
        return None


RUN_TASKS: dict[str, RunTask] = {}


def register_task(cls: type[RunTask]) -> type[RunTask]:
    RUN_TASKS[cls.name] = cls()
    return cls


@register_task
class Classification(RunTask):
    """Each dataset's own task: classification (binary, multi-class, multi-label, ordinal), VQA."""

    name = "classification"


@register_task
class SuperResolution(RunTask):
    """×``data.sr_scale`` super-resolution of each dataset's images (VQA-RAD's stay question answering)."""

    name = "superresolution"
    kinds = ("superres",)

    def dataset_task(self, task: TaskSpec, d: DataConfig) -> TaskSpec:
        return task.super_resolution(d.sr_scale) if task.kind != "vqa" else task
