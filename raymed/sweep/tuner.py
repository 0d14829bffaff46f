"""Run a sweep with ``ray.tune.Tuner``; then the table of trials and the best config as an experiment YAML.

Outputs, under ``<storage_path>/<name>/``: Tune's own files (one folder per trial with
``result.json``, ``progress.csv``, TensorBoard event files, checkpoints and the trial's raymed run
folder under ``raymed/``), plus ``sweep.yaml`` (the sweep and its experiment as resolved: what
``raymed tune --resume`` reads), ``trials.csv`` (one row per trial) and ``best.yaml`` (the best
trial's resolved experiment, runnable with ``raymed run best.yaml``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from rich.console import Console
from rich.table import Table

from raymed.config import ExperimentConfig, save_config, set_key
from raymed.engine.runtime import init_ray
from raymed.engine.placement import federation_bundles, trial_workers
from raymed.errors import ClientFailure, ResourceError
from raymed.results.metrics import test_twin
from raymed.results.selection import Selection
from raymed.sweep.spec import SweepConfig, probe_values, save_sweep, trial_config
from raymed.sweep.trial import run_trial, trial_resources


def check_trials_fit(sweep: SweepConfig, experiment: dict[str, Any], cluster: dict[str, float]) -> None:
    """Refuse a sweep whose trial could never be placed: Tune would wait for it forever."""
    probes = [{}] + [{key: v} for key, spec in sweep.search_space.items() for v in probe_values(*next(iter(spec.items())))]
    for params in probes:
        cfg = trial_config(experiment, params)
        bundles = federation_bundles(cfg, trial_workers(cfg))
        for resource in ("CPU", "GPU"):
            need = sum(b.get(resource, 0.0) for b in bundles)
            if need > cluster.get(resource, 0.0) + 1e-9:
                where = f" with {', '.join(f'{k}={v}' for k, v in params.items())}" if params else ""
                raise ResourceError(
                    f"a trial{where} needs {need:g} {resource}s ({len(bundles)} bundles: {bundles}) but the cluster has "
                    f"{cluster.get(resource, 0.0):g}; lower engine.num_workers, clients.num_cpus or clients.num_gpus"
                )


def _scheduler(sweep: SweepConfig, max_rounds: int):
    s = sweep.scheduler
    if s.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="round", max_t=max_rounds, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        mutations = {k: v for k, v in sweep.domains().items() if "grid" not in sweep.search_space[k]}
        return PopulationBasedTraining(
            time_attr="round",
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=s.quantile_fraction,
        )
    return None  # FIFO


def _searcher(sweep: SweepConfig, seed: int):
    """Seeded, so the same sweep file samples the same trials."""
    seed = sweep.search.seed if sweep.search.seed is not None else seed
    if sweep.search.name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)  # every grid point x num_samples random draws


def run_sweep(
    sweep: SweepConfig, experiment: dict[str, Any], console: Console | None = None, verbose: int = 1, resume: bool = False
) -> dict[str, Any]:
    """Run every trial (``resume``: continue the sweep in its folder with ``Tuner.restore``: finished
    trials stay as they are, unfinished ones go on from their last checkpoint); returns the sweep
    folder, the trials table, the best trial and its config path (``interrupted`` when it was stopped)."""
    console = console or Console()
    base: ExperimentConfig = trial_config(experiment, {})
    init_ray(base.ray)
    check_trials_fit(sweep, experiment, ray.cluster_resources())
    storage = Path(sweep.storage_path).expanduser().resolve()
    folder = storage / sweep.name
    callbacks, per_trial = _tracker_callbacks(sweep, base, folder)
    trial_experiment = copy.deepcopy(experiment)
    set_key(trial_experiment, "logging.to", per_trial)  # what the callbacks log, the trials do not log again
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, experiment=trial_experiment, metric=sweep.metric, checkpoint_every=sweep.checkpoint_every),
        trial_resources(trial_experiment),
    )
    if resume:
        # Errored trials are resumed too (a killed node is an error to Tune): from their last checkpoint.
        tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True, param_space=sweep.domains())
    else:
        save_sweep(folder, sweep, experiment)
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.domains(),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                scheduler=_scheduler(sweep, base.rounds),
                search_alg=_searcher(sweep, base.seed),
                max_concurrent_trials=sweep.max_concurrent_trials,
                trial_name_creator=_trial_name,  # the progress rows, and the trial's raymed run folder
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(storage),
                verbose=verbose,
                # PBT restores a trial from another trial's older checkpoint: keep them all (they are small).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sweep.scheduler.name == "pbt" else 2),
                sync_config=tune.SyncConfig(sync_artifacts=True),  # the trials' raymed run folders
                callbacks=callbacks,
            ),
        )
    results = tuner.fit()
    return _summarise(sweep, experiment, results, folder, console)


def _summarise(sweep: SweepConfig, experiment: dict[str, Any], results, folder: Path, console: Console) -> dict[str, Any]:
    """trials.csv, best.yaml and the printed table; an interrupted sweep gets the table of what
    finished and the line that continues it."""
    test_metric = test_twin(sweep.metric)
    # Each trial's status as the sweep's saved state has it (what --resume would continue): after
    # Ctrl-C, Tune's trials in memory read TERMINATED while the saved ones are PENDING or RUNNING.
    saved = {t.trial_id: t.status for t in tune.ExperimentAnalysis(str(folder)).trials}
    rows = []
    for trial in results._experiment_analysis.trials:  # a Result has no status, and no config before it reports
        result = results._trial_to_result(trial)
        m = result.metrics or {}
        params = {k: trial.config.get(k) for k in sweep.search_space}
        selected = _selected(sweep, _reports(result))
        rounds, planned = int(m.get("round", 0)), trial_config(experiment, params).rounds
        status = saved.get(trial.trial_id, trial.status)
        rows.append(
            {
                "trial": str(m.get("trial_id") or Path(result.path).name).rsplit("_", 1)[-1],
                **params,
                "status": "error" if result.error else "ok" if status == "TERMINATED" else "unfinished",
                "rounds": rounds,
                "stopped": _stopped(sweep, result, rounds, planned) if status == "TERMINATED" else "",
                "selected_round": selected.round,
                sweep.metric: selected.value if selected.value is not None else float("nan"),
                test_metric: selected.metrics.get(test_metric, float("nan")),
                "wall_s": round(float(m.get("time_total_s", float("nan"))), 1),
                "path": result.path,
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(folder / "trials.csv", index=False)
    unfinished = int((table["status"] == "unfinished").sum()) if len(table) else 0
    if unfinished:
        _print_table(console, sweep, table)
        console.print(f"interrupted: {unfinished} of {len(table)} trials unfinished; continue with: raymed tune --resume {folder}", soft_wrap=True)
        return {"folder": folder, "trials": table, "interrupted": True}

    ok = [r for r in results if not r.error and r.metrics and sweep.metric in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error).strip().splitlines()[-1] for r in results if r.error)[:500]
        raise ClientFailure(f"no trial of sweep {sweep.name} reported {sweep.metric}: {errors}; see {folder}")
    # The best trial is the one whose selected validation round is best (select: best: its best round;
    # last: its last round): selection never reads a test metric.
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="all" if sweep.select == "best" else "last", filter_nan_and_inf=True)
    best_params = {k: best.config[k] for k in sweep.search_space}
    best_row = table.loc[table["path"] == best.path].iloc[0]
    best_cfg = trial_config(experiment, best_params)
    best_cfg = best_cfg.model_copy(update={"name": f"{sweep.name}-best"})
    best_path = folder / "best.yaml"
    save_config(best_cfg, best_path)
    _print(console, sweep, table, best_params, best_row, folder, best_path)
    return {"folder": folder, "trials": table, "best_params": best_params, "best_config": best_path, "best": best, "interrupted": False}


def _selected(sweep: SweepConfig, reports: list[dict[str, Any]]) -> Selection:
    """The trial's round the sweep compares it by: its best validation round, or its last one."""
    reports = [r for r in reports if "round" in r]  # a trial that never reported has none
    if sweep.select == "last":
        reports = reports[-1:]
    return Selection.replay(reports, sweep.metric, sweep.mode)


def _tracker_callbacks(sweep: SweepConfig, base: ExperimentConfig, folder: Path) -> tuple[list[Any], list[str]]:
    """The experiment's ``logging.to`` for a sweep: MLflow and W&B through Ray's own Tune callbacks,
    from the driver, one tracker run per trial in one store (MLflow: ``<sweep>/mlflow.db`` unless
    ``logging.mlflow_uri``; experiment / W&B group: the sweep's name); TensorBoard stays with each
    trial (Tune writes its event files too). Returns the callbacks and what the trials still log."""
    callbacks: list[Any] = []
    if "mlflow" in base.logging.to:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = base.logging.mlflow_uri or f"sqlite:///{folder / 'mlflow.db'}"
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=sweep.name, tags={"raymed.sweep": str(folder)}))
    if "wandb" in base.logging.to:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=base.logging.experiment, group=sweep.name, mode=base.logging.wandb_mode))
    return callbacks, [name for name in base.logging.to if name == "tensorboard"]


def _trial_name(trial) -> str:
    """``<trial id>_<key>=<value>,...`` over the trial's searched hyperparameters (the last part of
    each dotted key), safe as a folder name: a trial is found by what it tried, not by its id."""
    params = ",".join(f"{key.rsplit('.', 1)[-1]}={_fmt(value)}" for key, value in sorted(trial.config.items()))
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "-", params).replace("..", "-")
    return f"{trial.trial_id}_{safe}"[:120]


def _stopped(sweep: SweepConfig, result, rounds: int, planned: int) -> str:
    """Why a trial ended before its last round: the scheduler (ASHA, PBT) or raymed's early
    stopping, with the round; empty when it ran every round or failed (``status`` says so)."""
    if result.error or rounds >= planned:
        return ""
    if (result.metrics or {}).get("stopped_early"):
        return f"early stopping at round {rounds}"
    return f"{sweep.scheduler.name} at round {rounds}"


def _reports(result) -> list[dict[str, Any]]:
    """A trial's reports, in order (one per evaluated round)."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return [result.metrics] if result.metrics else []
    return frame.to_dict("records")


def _print_table(console: Console, sweep: SweepConfig, table: pd.DataFrame) -> None:
    test_metric = test_twin(sweep.metric)
    at = "best validation round" if sweep.select == "best" else "last round"
    view = Table(title=f"sweep {sweep.name}: {len(table)} trials, ranked by {sweep.metric} ({sweep.mode}) at each trial's {at}")
    shown = ["trial", *sweep.search_space, "status", "rounds", "stopped", "selected_round", sweep.metric, test_metric, "wall_s"]
    for col in shown:
        view.add_column(col, overflow="fold")
    order = table.sort_values(sweep.metric, ascending=sweep.mode == "min", na_position="last")
    for _, r in order.iterrows():
        view.add_row(*[_fmt(r[c]) for c in shown])
    console.print(view)


def _print(console: Console, sweep: SweepConfig, table: pd.DataFrame, best: dict, row: pd.Series, folder: Path, best_path: Path) -> None:
    test_metric = test_twin(sweep.metric)
    _print_table(console, sweep, table)
    console.print(
        f"best: {', '.join(f'{k}={_fmt(v)}' for k, v in best.items())} → {sweep.metric} {row[sweep.metric]:.4f} at round "
        f"{_fmt(row['selected_round'])}; test there: {test_metric} {_fmt(row[test_metric])}"
    )
    console.print(f"best config: {best_path} (run it: raymed run {best_path})", soft_wrap=True)
    console.print(f"trials: {folder / 'trials.csv'}; TensorBoard: tensorboard --logdir {folder}", soft_wrap=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
