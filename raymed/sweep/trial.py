"""The Tune trainable: one trial runs one whole federation inside the trial's placement group.

Tune reserves the bundles of :func:`~raymed.engine.placement.federation_bundles` for the trial
(``tune.with_resources`` with a ``PlacementGroupFactory`` built from the trial's own config, so a
search over ``clients.num_cpus`` or ``engine.num_workers`` reserves what each trial needs); the
server, the client-state actor and every client worker are pinned to those bundles, so trials pack
onto the cluster and a trial never waits on resources another trial holds.

The trial reports after every evaluation round (``eval.every``) with ``round`` as the time axis
for ASHA and PBT (which compare trials on the sweep's validation metric), and attaches a checkpoint
of the whole federation when due (PBT: every report). ``eval.early_stop_patience`` ends a trial
whose validation metric stopped improving.
A trial started from a checkpoint (PBT exploit, or a restored sweep) continues from its round.
"""

from __future__ import annotations

import tempfile
from typing import Any

import ray
from ray import tune

from raymed.config import ExperimentConfig
from raymed.engine.federation import Federation
from raymed.engine.placement import Placement, federation_bundles, trial_workers
from raymed.errors import ConfigError
from raymed.sweep.spec import trial_config


def trial_resources(experiment: dict[str, Any]):
    """``tune.with_resources`` callback: the placement group of the trial's federation."""

    def resources(params: dict[str, Any]) -> tune.PlacementGroupFactory:
        cfg = trial_config(experiment, params)
        return tune.PlacementGroupFactory(federation_bundles(cfg, trial_workers(cfg)))

    return resources


def run_trial(params: dict[str, Any], experiment: dict[str, Any], metric: str, checkpoint_every: int) -> None:
    """Tune function trainable (the sweep passes ``experiment`` etc. through ``tune.with_parameters``)."""
    context = tune.get_context()
    cfg: ExperimentConfig = trial_config(experiment, params)
    # Each trial writes its raymed run folder into its working directory, which Tune syncs to storage.
    cfg = cfg.model_copy(update={"name": context.get_trial_name(), "output_dir": "raymed"})
    with Federation(cfg, Placement.of_current_trial(cfg)) as federation:
        info = federation.start()
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                federation.restore(folder)
        while federation.round < cfg.rounds and not federation.stopped_early:
            metrics = federation.step()
            r = federation.round
            if "time/eval_s" not in metrics:
                continue  # not an evaluation round: nothing for the scheduler to compare
            if metric not in metrics:
                shown = ", ".join(k for k in metrics if k.startswith(("global/", "personal/")))
                raise ConfigError(f"metric {metric!r} is not reported by this federation; it reports: {shown}")
            report = {
                **{k: float(v) for k, v in metrics.items()},
                "round": r,
                "stopped_early": float(federation.stopped_early),  # raymed's own early stopping (eval.early_stop_patience), not the scheduler's
                "run_dir": str(federation.run_dir),
                "placement_group": ray.get_runtime_context().get_placement_group_id(),
                "worker_placement_groups": ",".join(sorted({str(w["placement_group"]) for w in info["workers"]})),
            }
            # Tune copies the working directory (with the run folder) to storage on report: let the run
            # folder's own checkpoint, written in the background, land first, so no file changes mid-copy.
            federation.wait_for_checkpoint()
            if r == cfg.rounds or federation.stopped_early or (checkpoint_every and r % checkpoint_every == 0):
                with tempfile.TemporaryDirectory() as folder:
                    federation.checkpoint(folder)
                    tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
            else:
                tune.report(report)
