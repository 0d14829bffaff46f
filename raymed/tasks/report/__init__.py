"""Report generation (``data.task: report``): the task FedMRG studies and FedAvg-LoRA runs as well.

- :mod:`~raymed.tasks.report.text`: the report text (MedMNIST-Reports, the R2Gen format and its data
  source) and the tokenizer;
- :mod:`~raymed.tasks.report.shards`: how the text reaches the shards (each row's token ids);
- :mod:`~raymed.tasks.report.model`: the generator (image encoder, visual prefix, causal decoder), its
  pretraining on report text no client holds;
- :mod:`~raymed.tasks.report.metrics`: BLEU, ROUGE-L, CIDEr and clinical efficacy.

The engine, the shard writer and the methods reach it only through :class:`ReportTask`'s hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raymed.data.tasks import register_generated
from raymed.errors import ConfigError
from raymed.tasks.base import RunTask, register_task
from raymed.tasks.report import text
from raymed.tasks.report.metrics import report_scores
from raymed.tasks.report.model import build_report_model, pretrained_decoder
from raymed.tasks.report.shards import attach_reports

if TYPE_CHECKING:
    from torch import nn

    from raymed.config import DataConfig, ExperimentConfig, ModelConfig
    from raymed.data.shards import Rows
    from raymed.data.source import DatasetFile
    from raymed.data.tasks import TaskSpec

DATASETS = text.REPORT_DATASETS


class ReportText:
    """Generated reports read back with the run's tokenizer and scored by BLEU, ROUGE-L, CIDEr and
    clinical efficacy (:class:`~raymed.data.tasks.GeneratedText` for the ``report`` kind)."""

    def pad_id(self, task: TaskSpec) -> int:
        return text.load_tokenizer(task.tokenizer).pad_token_id

    def decode(self, task: TaskSpec, ids: np.ndarray) -> list[str]:
        return text.decode(text.load_tokenizer(task.tokenizer), ids)

    def scores(self, generated: list[str], references: list[str]) -> dict[str, float]:
        return report_scores(generated, references)


register_generated("report", ReportText())


@register_task
class ReportTask(RunTask):
    """Report generation: the server's DeepSpeed ranks hold the master generator and write the global
    model's reports; the clients train it (LoRA adapters, FedMRG's modules) on their own reports."""

    name = "report"
    kinds = ("report",)
    server_model = True

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.engine.vectorise:
            raise ConfigError("engine.vectorise: report generation trains a transformer decoder, which is not vectorised; set engine.vectorise=false")

    def prepare(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return pretrained_decoder(cfg)  # a decoder pretrained on report text (built once, cached)

    def locate(self, d: DataConfig) -> None:
        if "pneumoniamnist" in d.datasets:
            text.find_root(d.report_root, "indiana_reports.csv")  # MedMNIST-Reports' text must be there too

    def shard_identity(self, d: DataConfig) -> Any:
        if "pneumoniamnist" in d.datasets:
            return (d.report_len, d.report_styles, d.report_tokenizer, text.corpus_fingerprint(d.report_root))
        return (d.report_len, d.report_tokenizer)

    def attach(
        self, cfg: ExperimentConfig, files: list[DatasetFile], tasks: dict[str, TaskSpec], train: Rows, val: Rows, test: Rows,
        clients: list[dict[str, np.ndarray]], tmp: Path, out: Path,
    ) -> None:
        attach_reports(cfg, files, tasks, train, val, test, clients, tmp, out)

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> nn.Module:
        return build_report_model(cfg, tasks, seed)
