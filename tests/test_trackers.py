"""Experiment trackers (logging.to): a plain run's per-round metrics, config and summary files reach
MLflow and TensorBoard through their own writers; a missing package is one line naming the extra."""

from __future__ import annotations

import importlib.util
import struct

import pandas as pd
import pytest

from raymed.config import load_yaml
from raymed.engine.federation import run_experiment
from raymed.errors import ConfigError
from tests.conftest import small_config


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under ``folder`` (tensorboardX's own protobufs)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_a_plain_run_logs_every_round_its_config_and_summary_to_mlflow_and_tensorboard(data_dir, tmp_path, ray_session):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run_dir = run_experiment(small_config(data_dir, tmp_path, "rounds=3", "logging=[mlflow, tensorboard]"))
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    meta = load_yaml(run_dir / "meta.json")

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raymed")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == meta["trackers"]["mlflow"]["run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    history = client.get_metric_history(run.info.run_id, "val/global/mean/acc")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(rounds["val/global/mean/acc"].tolist())
    assert run.data.params["clients.lr"] == "0.05" and run.data.params["data.datasets"] == "['pneumoniamnist', 'breastmnist']"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "summary.md", "rounds.parquet"} <= artifacts

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["val/global/mean/acc"]] == [1, 2, 3]
    assert [v for _, v in scalars["val/global/mean/acc"]] == pytest.approx(rounds["val/global/mean/acc"].tolist(), rel=1e-6)


def test_logging_takes_a_list_or_a_section_and_refuses_unknown_trackers(data_dir, tmp_path):
    assert small_config(data_dir, tmp_path, "logging=tensorboard").logging.to == ["tensorboard"]
    cfg = small_config(data_dir, tmp_path, "logging={to: [tensorboard, tensorboard], experiment: study}")
    assert cfg.logging.to == ["tensorboard"] and cfg.logging.experiment == "study"
    with pytest.raises(ConfigError, match="logging.to"):
        small_config(data_dir, tmp_path, "logging=[neptune]")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_refused_before_the_run_in_one_line_naming_the_extra(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"logging.to lists wandb, but wandb is not installed: pip install 'raymed\[wandb\]'"):
        small_config(data_dir, tmp_path, "logging=[wandb]")


def test_a_resumed_run_continues_its_own_mlflow_run(data_dir, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from raymed.results.store import RunWriter

    cfg = small_config(data_dir, tmp_path, "logging=[mlflow]")
    writer = RunWriter(cfg, {})
    writer.log_round({"metrics": {"round": 1, "val/global/mean/acc": 0.5, "global/mean/auc": float("nan"), "comm/bytes_up": 10, "comm/bytes_down": 10}})
    writer.finish("interrupted")
    again = RunWriter.reopen(cfg, writer.dir, {})
    again.log_round({"metrics": {"round": 2, "val/global/mean/acc": 0.6, "comm/bytes_up": 10, "comm/bytes_down": 10}})
    again.finish("completed")

    client = MlflowClient(tracking_uri=f"sqlite:///{writer.dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raymed").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/global/mean/acc")] == [(1, 0.5), (2, 0.6)]
    assert client.get_metric_history(run.info.run_id, "global/mean/auc") == []  # NaN: a gap, not a point
