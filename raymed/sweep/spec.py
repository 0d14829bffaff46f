"""Sweep YAML → validated :class:`SweepConfig`, and its search space as Ray Tune domains.

A sweep file::

    name: fedprox-mu-lr
    experiment: ../raymed/configs/default.yaml   # a path (relative to this file) or an inline mapping
    overrides: {rounds: 10, strategy: {name: fedprox}}   # applied on top of the experiment
    search_space:                                # dotted experiment keys -> one Tune domain each
      strategy.mu: {loguniform: [0.001, 1.0]}
      clients.lr: {grid: [0.01, 0.05, 0.1]}
    metric: val/personal/client_mean/acc         # a validation metric: trials are compared on validation only
    mode: max
    num_samples: 2                               # samples of the random/Optuna domains (x every grid point)
    scheduler: {name: asha, grace_period: 2}     # fifo | asha | pbt
    search: {name: random}                       # random | optuna
    storage_path: tune_results

Every search-space key is checked against the experiment schema before any trial starts (its
bounds, or each of its choices, are validated as the experiment's value), so a typo or an
out-of-range value is one line, not a failed sweep.

``raymed tune SWEEP --set KEY=VALUE`` overrides the sweep file as ``raymed run`` does a config, except
under ``search_space``, whose keys are whole dotted experiment keys:
``--set "search_space.strategy.mu={grid: [0.01, 0.1]}"`` adds (or replaces) the ``strategy.mu``
dimension, and ``--set search_space.clients.lr=`` (no value) removes ``clients.lr``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from ray import tune

from raymed.config import ExperimentConfig, Section, apply_overrides, default_config_path, format_error, load_yaml, set_key
from raymed.errors import ConfigError
from raymed.files import atomic_write
from raymed.experiment import validate_config
from raymed.results.metrics import is_validation, val_twin

# search_space entry name -> (Tune domain constructor, how its arguments are given)
DOMAINS: dict[str, Any] = {
    "grid": tune.grid_search,  # a list of values, each run (x num_samples)
    "choice": tune.choice,  # a list of values, one drawn per sample
    "uniform": tune.uniform,  # [low, high]
    "loguniform": tune.loguniform,  # [low, high]
    "quniform": tune.quniform,  # [low, high, q]
    "qloguniform": tune.qloguniform,  # [low, high, q]
    "randint": tune.randint,  # [low, high) integers
    "lograndint": tune.lograndint,  # [low, high) integers
    "qrandint": tune.qrandint,  # [low, high, q]
}
LIST_DOMAINS = ("grid", "choice")
# Experiment keys holding paths: made absolute before trials start (a trial runs in its own folder).
PATH_KEYS = ("data.root", "data.cache_dir", "output_dir")


class SchedulerConfig(Section):
    name: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = Field(1, ge=1)  # asha: rounds a trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha: 1/reduction_factor of the trials go on at each rung
    perturbation_interval: int = Field(2, ge=1)  # pbt: rounds between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt: bottom fraction copies the top fraction


class SearchConfig(Section):
    name: Literal["random", "optuna"] = "random"  # random: Tune's grid/random variant generator
    seed: int | None = None  # the sampler's seed (default: the experiment's seed)


class SweepConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str | dict[str, Any] | None = None  # None: the embedded default experiment
    overrides: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, dict[str, list[Any]]]
    # What trials are compared on (ASHA, PBT, the best trial): a validation metric, never the test
    # split; the best trial's test metrics at its best validation round are reported beside it.
    metric: str = "val/personal/client_mean/acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    storage_path: str = "tune_results"
    # How a trial is compared with the others: by its best validation round (best) or its last (last).
    select: Literal["best", "last"] = "best"
    checkpoint_every: int = Field(0, ge=0)  # rounds between trial checkpoints (0: only the last; pbt: every report)

    @field_validator("search_space")
    @classmethod
    def _domains(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("needs at least one key to search over")
        for key, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in DOMAINS:
                raise ValueError(f"{key} must be one of {{{', '.join(DOMAINS)}: [...]}}, got {spec!r}")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ValueError(f"{key}: {kind} takes a non-empty list, got {args!r}")
        return space

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not is_validation(metric):
            raise ValueError(f"{metric} is a test-split metric; a sweep selects on validation only: use {val_twin(metric)}")
        return metric

    @model_validator(mode="after")
    def _compatible(self) -> SweepConfig:
        grids = [k for k, spec in self.search_space.items() if "grid" in spec]
        if self.search.name == "optuna" and grids:
            raise ValueError(f"search optuna cannot take grid entries ({', '.join(grids)}); use choice instead")
        if self.scheduler.name == "pbt":
            if self.search.name != "random":
                raise ValueError("scheduler pbt mutates hyperparameters itself; use search random with it")
            if len(grids) == len(self.search_space):
                raise ValueError("scheduler pbt needs at least one non-grid search_space entry to mutate")
        return self

    def domains(self) -> dict[str, Any]:
        """The Tune ``param_space``: one domain per dotted experiment key."""
        out = {}
        for key, spec in self.search_space.items():
            kind, args = next(iter(spec.items()))
            out[key] = DOMAINS[kind](args) if kind in LIST_DOMAINS else DOMAINS[kind](*args)
        return out


def probe_values(kind: str, args: list[Any]) -> list[Any]:
    """Values that stand for a domain when checking it against the experiment schema."""
    if kind in LIST_DOMAINS:
        return list(args)
    low, high = args[0], args[1]
    if kind.endswith("randint"):
        high = high - 1  # exclusive upper bound
    return [low, high]


def _absolute_paths(raw: dict[str, Any], base: Path) -> None:
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.get(part) or {}
        value = node.get(leaf) if isinstance(node, dict) else None
        if value:
            path = Path(os.path.expanduser(str(value)))
            set_key(raw, key, str(path if path.is_absolute() else (base / path).resolve()))
    if raw.get("data", {}).get("cache_dir") is None:
        # Trials write their run folders in their own working folders; their shards are shared here.
        set_key(raw, "data.cache_dir", str((base / raw.get("output_dir", "results") / ".shards").resolve()))
    if raw.get("data", {}).get("root") is None and os.environ.get("RAYMED_DATA_DIR"):
        # Trials may run on other nodes: name the data folder in the config rather than in the environment.
        set_key(raw, "data.root", str(Path(os.environ["RAYMED_DATA_DIR"]).expanduser().resolve()))


SEARCH_SPACE = "search_space."


def apply_sweep_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set`` on a sweep file: dotted keys as for an experiment, but a key under ``search_space``
    stays one dotted experiment key (a dimension); an empty value removes that dimension."""
    dimensions = [o for o in overrides if o.lstrip().startswith(SEARCH_SPACE)]
    out = apply_overrides(raw, [o for o in overrides if o not in dimensions])
    if dimensions and not isinstance(out.setdefault("search_space", {}), dict):
        raise ConfigError("--set search_space.KEY: the sweep's search_space is not a mapping of dotted keys to domains")
    for item in dimensions:
        key, _, text = item.partition("=")
        dimension = key.strip()[len(SEARCH_SPACE):]
        if not dimension:
            raise ConfigError(f"--set {item!r}: name the experiment key, e.g. search_space.clients.lr={{grid: [0.01, 0.1]}}")
        value = apply_overrides({}, [f"value={text}"])["value"]  # parsed as YAML, as every --set value
        if value is None:
            out["search_space"].pop(dimension, None)
        else:
            out["search_space"][dimension] = value
    return out


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, dict[str, Any]]:
    """Read and check a sweep; returns it and the experiment's raw mapping every trial starts from."""
    path = Path(path)
    raw = apply_sweep_overrides(load_yaml(path), overrides or [])
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_error(err, SweepConfig)}") from None

    if isinstance(sweep.experiment, dict):
        experiment = copy.deepcopy(sweep.experiment)
    else:
        source = default_config_path() if sweep.experiment is None else (path.parent / sweep.experiment)
        experiment = load_yaml(source)
    experiment = _deep_merge(experiment, sweep.overrides)
    experiment.setdefault("name", sweep.name)
    _absolute_paths(experiment, Path.cwd())
    try:
        validate_config(experiment)
    except ConfigError as exc:
        raise ConfigError(f"{path}: experiment: {exc}") from None
    for key, spec in sweep.search_space.items():
        kind, args = next(iter(spec.items()))
        for value in probe_values(kind, args):
            probe = copy.deepcopy(experiment)
            set_key(probe, key, value, what="search_space key")
            try:
                validate_config(probe)
            except ConfigError as exc:
                raise ConfigError(f"{path}: search_space.{key} = {value!r}: {exc}") from None
    if sweep.checkpoint_every == 0 and sweep.scheduler.name == "pbt":
        sweep.checkpoint_every = 1  # PBT copies the state of good trials into bad ones at each report
    return sweep, experiment


SWEEP_FILE = "sweep.yaml"


def save_sweep(folder: Path, sweep: SweepConfig, experiment: dict[str, Any]) -> None:
    """``<folder>/sweep.yaml``: the sweep and the experiment its trials start from, as resolved
    (paths absolute), so that ``raymed tune --resume <folder>`` needs nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / SWEEP_FILE, yaml.safe_dump({"sweep": sweep.model_dump(mode="json"), "experiment": experiment}, sort_keys=False))


def load_saved_sweep(folder: str | Path) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep saved in ``folder`` by :func:`save_sweep`, with its folder as its storage (the
    folder may have moved since)."""
    folder = Path(folder).expanduser().resolve()
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {folder}: not a sweep folder (no {SWEEP_FILE}); give the folder raymed tune wrote, <storage_path>/<name>")
    saved = load_yaml(path)
    if not isinstance(saved, dict) or "sweep" not in saved or "experiment" not in saved:
        raise ConfigError(f"--resume {folder}: {path} is a sweep file, not the state raymed tune saved; give the sweep's folder, <storage_path>/<name>")
    try:
        sweep = SweepConfig.model_validate({**saved["sweep"], "storage_path": str(folder.parent), "name": folder.name})
    except (ValidationError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a sweep file raymed wrote ({type(err).__name__}); start the sweep again") from None
    return sweep, saved["experiment"]


def trial_config(experiment: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """The experiment of one trial: the sweep's experiment with the trial's sampled keys set."""
    raw = copy.deepcopy(experiment)
    for key, value in params.items():
        set_key(raw, key, value.item() if hasattr(value, "item") else value)  # numpy scalars from samplers
    return validate_config(raw)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
