"""An experiment as the registries resolve it: the schema (:mod:`raymed.config`) validated against
the methods, models and data sources that exist.

``raymed.config`` is the schema alone (pydantic models, YAML loading, ``--set`` overrides) and imports
no method, model or data module; this module sits one level above them and checks a config against
their registries: the dataset names the sources know, the model and strategy names, the method's own
parameters and its ``configure``/``check_config``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from medmnist import INFO
from pydantic import ValidationError

from raymed.config import (
    ExperimentConfig,
    StrategyConfig,
    non_finite_values,
    apply_overrides,
    default_config_path,
    format_error,
    load_yaml,
)
from raymed.data.vqa_rad import ORGANS
from raymed.errors import ConfigError
from raymed.methods import METHODS
from raymed.models import MODELS
from raymed.results.trackers import check_trackers
from raymed.tasks.registry import run_task
from raymed.tasks.report import DATASETS as REPORT_DATASETS


def validation_context() -> dict[str, Any]:
    """What the schema's validators check names against: every dataset a source knows by name (own
    files are added from ``data.files``), the question-answering ones, the report ones."""
    return {
        "datasets": [*INFO, *ORGANS, "r2gen", "synthetic_clients"],
        "question_answering": list(ORGANS),
        "report": list(REPORT_DATASETS),
    }


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping into an :class:`ExperimentConfig`, resolving method parameters."""
    try:
        cfg = ExperimentConfig.model_validate(raw, context=validation_context())
    except ValidationError as err:
        raise ConfigError(format_error(err, ExperimentConfig)) from None

    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name: got {cfg.model.name!r}; allowed: {', '.join(sorted(MODELS))}")
    method = METHODS.get(cfg.strategy.name)
    if method is None:
        close = difflib.get_close_matches(cfg.strategy.name, METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"strategy.name: got {cfg.strategy.name!r}{hint}; allowed: {', '.join(sorted(METHODS))}")
    try:
        params = method.Params.model_validate(cfg.strategy.params)
    except ValidationError as err:
        raise ConfigError(format_error(err, method.Params, prefix=("strategy",))) from None
    for key, value in non_finite_values({**cfg.model_dump(exclude={"strategy"}), "strategy": params.model_dump()}):
        raise ConfigError(f"{key}: got {value}; every number in a config must be finite (no inf or nan)")
    if cfg.engine.vectorise and cfg.clients.optimizer != "sgd":
        raise ConfigError(f"engine.vectorise: the vectorised local update is SGD; set clients.optimizer=sgd (got {cfg.clients.optimizer})")
    run_task(cfg.data.task).check(cfg)
    check_trackers(cfg)
    if cfg.data.mixes_dimensions and not method.mixes_dimensions:
        raise ConfigError(
            f"data.datasets mixes 2D and 3D datasets, which one backbone cannot take under strategy {cfg.strategy.name}; "
            f"run them separately, or use a strategy with an encoder per input kind (fedkim)"
        )
    cfg = method(params).configure(cfg)
    method(params).check_config(cfg)
    # Store the resolved parameters (defaults filled in) so the saved config is complete.
    cfg.strategy = StrategyConfig(name=cfg.strategy.name, **params.model_dump(mode="json"))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment: the embedded default when ``path`` is None, then ``--set`` overrides."""
    raw = load_yaml(path if path is not None else default_config_path())
    return validate_config(apply_overrides(raw, overrides or []))
