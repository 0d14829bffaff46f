"""Ray Tune sweeps: a real ASHA sweep of real small federations, the sweep file's checks, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raymed.cli import main
from raymed.experiment import load_config
from raymed.engine import Federation, run_experiment
from raymed.engine.placement import federation_bundles
from raymed.errors import ConfigError
from raymed.results.report import _run_labels, run_folders
from raymed.results.runs import read_run
from raymed.sweep import load_sweep
from tests.conftest import small_config


def _sweep_file(tmp_path: Path, data_dir: Path, **changes) -> Path:
    experiment = small_config(data_dir, tmp_path, "clients.num_cpus=0.5").to_dict()
    sweep = {
        "name": "lr-asha",
        "experiment": experiment,
        "search_space": {"clients.lr": {"grid": [0.005, 0.05, 0.2, 1.0]}},
        "metric": "val/global/mean/acc",
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "storage_path": str(tmp_path / "tune"),
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_asha_sweep_of_real_federations_writes_a_runnable_best_config(data_dir, tmp_path, ray_session, capsys):
    tracked = small_config(data_dir, tmp_path, "clients.num_cpus=0.5", "logging=[mlflow]").to_dict()
    path = _sweep_file(tmp_path, data_dir, experiment=tracked)
    assert main(["tune", str(path), "--quiet"]) == 0
    folder = tmp_path / "tune" / "lr-asha"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) == {"ok"}
    assert sorted(trials["clients.lr"]) == [0.005, 0.05, 0.2, 1.0]
    rounds = load_sweep(path)[1]["rounds"]
    for _, trial in trials.iterrows():  # a trial ASHA cut short says so, with its round; the others say nothing
        stopped = trial["stopped"] if isinstance(trial["stopped"], str) else ""  # CSV: an empty cell reads as NaN
        assert Path(trial["path"]).name.endswith(f"_lr={trial['clients.lr']:.4g}")  # a trial's folder names what it tried
        assert stopped == (f"asha at round {trial['rounds']}" if trial["rounds"] < rounds else ""), trial.to_dict()

    groups = set()
    for trial_dir in trials["path"]:
        results = [json.loads(line) for line in (Path(trial_dir) / "result.json").read_text().splitlines()]
        assert [r["round"] for r in results] == list(range(1, len(results) + 1))  # one report per evaluated round
        last = results[-1]
        # Every client worker of the trial sits in the trial's own placement group.
        assert last["placement_group"] and last["worker_placement_groups"] == last["placement_group"]
        groups.add(last["placement_group"])
        assert list(Path(trial_dir).glob("events.out.tfevents.*"))  # TensorBoard logs, through Tune
        run = read_run(next((Path(trial_dir) / "raymed").iterdir()))  # the trial's raymed run folder, synced
        assert run["rounds"]["round"].max() == last["round"]
    assert len(groups) == 4  # one placement group per trial

    # logging: [mlflow] in a sweep: one MLflow run per trial, from Ray's MLflowLoggerCallback, in one
    # store in the sweep's folder; the trials' own run folders hold no second copy
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lr-asha").experiment_id])
    assert sorted(float(r.data.params["clients.lr"]) for r in runs) == [0.005, 0.05, 0.2, 1.0]
    for run in runs:
        trial = trials.loc[trials["clients.lr"] == float(run.data.params["clients.lr"])].iloc[0]
        history = client.get_metric_history(run.info.run_id, "val/global/mean/acc")
        assert len(history) == trial["rounds"], run.data.params
    assert not list(folder.glob("*/raymed/*/mlflow.db"))

    # The best trial is the one with the best validation metric (at its best validation round); its
    # test metric at that round is reported beside it, never used to choose.
    best = load_config(folder / "best.yaml")
    best_row = trials.loc[trials["val/global/mean/acc"].idxmax()]
    assert best.clients.lr == pytest.approx(best_row["clients.lr"])
    for _, row in trials.iterrows():
        results = pd.read_json(Path(row["path"]) / "result.json", lines=True)
        at = results.loc[results["val/global/mean/acc"].idxmax()]
        assert row["selected_round"] == at["round"] and row["global/mean/acc"] == pytest.approx(at["global/mean/acc"])
    assert "best config" in capsys.readouterr().out
    # raymed report on the sweep's folder names each trial by what it tried
    runs = [read_run(p) for p in run_folders([folder])]
    assert sorted(_run_labels(runs)) == ["fedavg lr=0.005", "fedavg lr=0.05", "fedavg lr=0.2", "fedavg lr=1"]
    # ... and it runs as an experiment of its own.
    rerun = read_run(run_experiment(best.model_copy(update={"rounds": 1, "output_dir": str(tmp_path / "rerun")})))
    assert rerun["summary"]["status"] == "completed"


def test_bad_sweeps_are_one_line(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"search_space.clients.lrr = 0.1: unknown key clients.lrr \(did you mean clients.lr\?\)"):
        load_sweep(_sweep_file(tmp_path, data_dir, search_space={"clients.lrr": {"choice": [0.1]}}))
    with pytest.raises(ConfigError, match=r"search_space.clients.fraction = 2: clients.fraction: got 2"):
        load_sweep(_sweep_file(tmp_path, data_dir, search_space={"clients.fraction": {"uniform": [0.1, 2]}}))
    with pytest.raises(ConfigError, match="must be one of"):
        load_sweep(_sweep_file(tmp_path, data_dir, search_space={"clients.lr": {"between": [0.1, 1]}}))
    with pytest.raises(ConfigError, match="optuna cannot take grid"):
        load_sweep(_sweep_file(tmp_path, data_dir, search={"name": "optuna"}))
    with pytest.raises(ConfigError, match="pbt needs at least one non-grid"):
        load_sweep(_sweep_file(tmp_path, data_dir, scheduler={"name": "pbt"}))
    with pytest.raises(ConfigError, match="unknown key sheduler"):
        load_sweep(_sweep_file(tmp_path, data_dir, sheduler={"name": "asha"}))
    with pytest.raises(ConfigError, match="global/mean/acc is a test-split metric; a sweep selects on validation only: use val/global/mean/acc"):
        load_sweep(_sweep_file(tmp_path, data_dir, metric="global/mean/acc"))


def test_shipped_sweeps_load(monkeypatch, data_dir):
    monkeypatch.setenv("RAYMED_DATA_DIR", str(data_dir))
    folder = Path(__file__).resolve().parents[1] / "tune_configs"
    files = sorted(folder.glob("*.yaml"))
    assert {"fedprox_mu_lr.yaml", "participation_epochs.yaml", "scale.yaml"} <= {p.name for p in files}
    for path in files:
        assert path.read_text().startswith("#"), f"{path.name} is documented at the top"
        sweep, _ = load_sweep(path)  # every search value checked against the experiment schema
        assert sweep.domains()
    scale, _ = load_sweep(folder / "scale.yaml")
    assert scale.search_space["clients.num"] == {"grid": [100, 300, 1000]}
    fedprox, experiment = load_sweep(folder / "fedprox_mu_lr.yaml")
    assert experiment["strategy"]["name"] == "fedprox" and experiment["data"]["partition"] == "modality"
    assert set(fedprox.search_space) == {"strategy.mu", "clients.lr"}


def test_trial_bundles_hold_the_server_and_every_worker(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "clients.num_cpus=0.5", "clients.num_gpus=0.25")
    assert federation_bundles(cfg, 3) == [{"CPU": 0.25}] + [{"CPU": 0.5, "GPU": 0.25}] * 3
    with_server = small_config(data_dir, tmp_path, "server.num_cpus=1", "server.num_gpus=1")
    assert federation_bundles(with_server, 1) == [{"CPU": 0.25}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}]


def test_checkpoint_restore_continues_exactly(data_dir, tmp_path, ray_session):
    """Two rounds straight == one round, checkpoint, a fresh federation restored, one more round."""
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedper", "rounds=2")
    straight = read_run(run_experiment(cfg))["rounds"]

    first = Federation(cfg)
    first.start()
    first.step()
    first.checkpoint(tmp_path)
    first.close("checkpointed")
    second = Federation(cfg)
    second.start()
    assert second.restore(tmp_path) == 1
    second.step()
    second.close("completed")
    resumed = read_run(second.run_dir)["rounds"]
    assert list(resumed["round"]) == [1, 2]
    for key in ("train/loss", "personal/client_mean/acc", "personal/pneumoniamnist/auc"):
        np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, metric", [("{name: lorkd, rank: 4, teacher_epochs: 1}", "val/global/mean/acc"), ("{name: mafm3, rank: 4, foundation_epochs: 1}", "val/global/retinamnist/c_index")])
def test_lorkd_and_mafm3_sweep_like_every_strategy(data_dir, tmp_path, ray_session, strategy, metric):
    """Each trial prepares its teacher or foundation inside its own placement group and reports."""
    experiment = small_config(
        data_dir, tmp_path, "clients.num_cpus=0.5", "rounds=1", "clients.num=3", "data.max_train_per_dataset=90", "data.max_test_per_dataset=40",
        "data.datasets=[pneumoniamnist,breastmnist,retinamnist]", "data.prognosis=[retinamnist]", f"strategy={strategy}",
    ).to_dict()
    path = _sweep_file(tmp_path, data_dir, name="paper-sweep", experiment=experiment, metric=metric, scheduler={"name": "fifo"},
                       search_space={"strategy.rank": {"grid": [2, 4]}})
    assert main(["tune", str(path), "--quiet"]) == 0
    trials = pd.read_csv(tmp_path / "tune" / "paper-sweep" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"ok"} and trials[metric].notna().all()


@pytest.mark.slow
def test_central_reference_sweeps_like_every_strategy(data_dir, tmp_path, ray_session):
    """The centralised reference in a sweep: each trial is one client holding every row, judged on validation."""
    experiment = small_config(data_dir, tmp_path, "rounds=1", "strategy.name=central", "data.max_train_per_dataset=90", "data.max_test_per_dataset=40").to_dict()
    path = _sweep_file(tmp_path, data_dir, name="central-sweep", experiment=experiment, scheduler={"name": "fifo"},
                       search_space={"clients.lr": {"grid": [0.01, 0.05]}})
    assert main(["tune", str(path), "--quiet"]) == 0
    folder = tmp_path / "tune" / "central-sweep"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"ok"} and trials["val/global/mean/acc"].notna().all()
    best = load_config(folder / "best.yaml")
    assert (best.strategy.name, best.clients.num, best.clients.fraction, best.data.partition) == ("central", 1, 1.0, "iid")


def test_a_search_dimension_is_added_replaced_and_removed_from_the_command_line(tmp_path):
    """``--set search_space.strategy.mu=...`` names one dotted experiment key: it must not be split
    into nested mappings (``search_space: {strategy: {mu: ...}}``), which no Tune domain reads."""
    folder = Path(__file__).resolve().parents[1] / "tune_configs"
    sweep, _ = load_sweep(folder / "fedprox_mu_lr.yaml", ["search_space.strategy.mu={grid: [0.01, 0.1]}", "search_space.clients.lr=", "num_samples=1"])
    assert sweep.search_space == {"strategy.mu": {"grid": [0.01, 0.1]}}
    assert sweep.domains() == {"strategy.mu": {"grid_search": [0.01, 0.1]}}
    added, _ = load_sweep(folder / "fedprox_mu_lr.yaml", ["search_space.clients.fraction={choice: [0.5, 1.0]}"])
    assert set(added.search_space) == {"strategy.mu", "clients.lr", "clients.fraction"}
    with pytest.raises(ConfigError, match=r"search_space.clients.lrr = 0.1: unknown key clients.lrr"):
        load_sweep(folder / "fedprox_mu_lr.yaml", ["search_space.clients.lrr={choice: [0.1]}"])


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_and_runs_only_the_unfinished_trials(data_dir, tmp_path, ray_session, capsys, monkeypatch):
    """Ctrl-C on ``raymed tune`` (a real process, its own Ray) after the first trial finished, then
    ``raymed tune --resume DIR``: the finished trial is not run again, the others finish."""
    experiment = small_config(data_dir, tmp_path, "clients.num_cpus=0.5", "rounds=3", "data.max_train_per_dataset=90",
                              "data.max_test_per_dataset=40", "ray.num_cpus=2").to_dict()
    path = _sweep_file(tmp_path, data_dir, name="resumable", experiment=experiment, scheduler={"name": "fifo"}, max_concurrent_trials=1,
                       checkpoint_every=1, search_space={"clients.lr": {"grid": [0.01, 0.05, 0.2]}})
    folder = tmp_path / "tune" / "resumable"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from raymed.cli import main; sys.exit(main(sys.argv[1:]))", "tune", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finished_trials() -> list[Path]:
        done = []
        for result in folder.glob("*/result.json"):
            lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            if lines and lines[-1].get("round") == 3:
                done.append(result.parent)
        return done

    deadline = time.time() + 600
    while not finished_trials() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.communicate()[0][-2000:]}"
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert f"raymed tune --resume {folder}" in out.replace("\n", "")
    finished = {trial: (trial / "result.json").read_text() for trial in finished_trials()}
    interrupted = pd.read_csv(folder / "trials.csv")
    assert 1 <= len(finished) < 3 and (interrupted["status"] == "unfinished").sum() == 3 - len(finished)

    monkeypatch.delenv("RAYMED_DEBUG", raising=False)  # the one-line errors, as a user sees them
    assert main(["tune", "--resume", str(tmp_path / "tune")]) == 2
    assert "--resume" in (err := capsys.readouterr().err) and "not a sweep folder (no sweep.yaml)" in err
    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert "is a sweep file, not the state raymed tune saved" in capsys.readouterr().err
    assert main(["tune", "--resume", str(folder), "--quiet"]) == 0
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 3 and set(trials["status"]) == {"ok"} and (trials["rounds"] == 3).all()
    assert sorted(trials["clients.lr"]) == [0.01, 0.05, 0.2]
    for trial, before in finished.items():  # a finished trial was not run again
        assert (trial / "result.json").read_text() == before
        assert len(list((trial / "raymed").iterdir())) == 1
    assert (folder / "best.yaml").is_file()


def test_select_compares_trials_at_their_best_or_their_last_validation_round(data_dir, tmp_path):
    from raymed.sweep.tuner import _selected

    reports = [{"round": 1, "val/global/mean/acc": 0.8, "global/mean/acc": 0.75}, {"round": 2, "val/global/mean/acc": 0.7, "global/mean/acc": 0.72}]
    best, _ = load_sweep(_sweep_file(tmp_path, data_dir))
    last, _ = load_sweep(_sweep_file(tmp_path, data_dir, select="last"))
    assert (_selected(best, reports).round, _selected(best, reports).value) == (1, 0.8)
    assert (_selected(last, reports).round, _selected(last, reports).value) == (2, 0.7)
    with pytest.raises(ConfigError, match="select"):
        load_sweep(_sweep_file(tmp_path, data_dir, select="first"))


def test_runs_are_labelled_by_the_hyperparameters_that_differ():
    def run(**config):
        base = {"name": "x", "output_dir": "somewhere", "seed": 0, "strategy": {"name": "fedprox", "mu": 0.1}, "clients": {"lr": 0.05}, "server": {"lr": 1.0}}
        for key, value in config.items():
            node = base
            *parents, leaf = key.split("__")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return {"config": base, "meta": {}}

    assert _run_labels([run(), run(strategy__name="fedavg")]) == ["fedprox", "fedavg"]
    assert _run_labels([run(strategy__mu=0.01, output_dir="a"), run(strategy__mu=1.0, output_dir="b")]) == ["fedprox mu=0.01", "fedprox mu=1"]
    assert _run_labels([run(seed=0), run(seed=1)]) == ["fedprox seed=0", "fedprox seed=1"]
    # two keys with one last part: the whole dotted keys
    assert _run_labels([run(), run(clients__lr=0.1, server__lr=0.5)]) == ["fedprox clients.lr=0.05,server.lr=1", "fedprox clients.lr=0.1,server.lr=0.5"]
    assert _run_labels([run(), run()]) == ["fedprox #1", "fedprox #2"]
