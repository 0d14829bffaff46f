"""Custom Ray metrics, read back from Ray's Prometheus export endpoint after a real run."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

from raymed.engine import run_experiment
from raymed.engine.telemetry import METRICS
from tests.conftest import METRICS_PORT, small_config

GRAFANA = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "raymed.json"


def _scrape() -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()


def _series(text: str, name: str, experiment: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels.get("experiment") == experiment:
                out.append((labels, float(match.group(2))))
    return out


def test_custom_metrics_are_exported_per_experiment(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "rounds=2", "strategy.name=fedavg")
    run = run_experiment(cfg)
    experiment = run.name
    rounds = __import__("pandas").read_parquet(run / "rounds.parquet")

    expected_finished = rounds["clients/sampled"].iloc[-1]

    def exported(text: str) -> bool:  # every process's last values have reached the agent (under load, any may lag)
        finished = _series(text, "ray_raymed_round_clients_finished", experiment)
        rounds_seen = [v for _, v in _series(text, "ray_raymed_round", experiment)]
        return bool(_series(text, "ray_raymed_eval", experiment) and _series(text, "ray_raymed_bytes_up_total", experiment)) and (
            sum(v for _, v in finished) == expected_finished
        ) and bool(rounds_seen) and max(rounds_seen) == 2

    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # Ray's metrics agent exports every second here (conftest); workers may lag
        text = _scrape()
        if exported(text):
            break
        time.sleep(1)
    value = lambda name: max(v for _, v in _series(text, name, experiment))  # noqa: E731
    assert value("ray_raymed_round") == 2
    assert value("ray_raymed_bytes_up_total") == rounds["comm/bytes_up"].sum()
    assert value("ray_raymed_bytes_down_total") == rounds["comm/bytes_down"].sum()
    assert value("ray_raymed_train_loss") == rounds["train/loss"].iloc[-1]
    assert value("ray_raymed_examples_per_second") > 0 and value("ray_raymed_round_seconds") > 0
    evals = {labels["metric"]: v for labels, v in _series(text, "ray_raymed_eval", experiment)}
    assert evals["global/mean/acc"] == rounds["global/mean/acc"].iloc[-1]
    assert evals["personal/client_mean/acc"] == rounds["personal/client_mean/acc"].iloc[-1]
    finished = _series(text, "ray_raymed_round_clients_finished", experiment)
    assert sum(v for _, v in finished) == expected_finished  # summed over the workers


def test_grafana_dashboard_plots_every_metric():
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m.removeprefix("ray_").removesuffix("_total") for e in exprs for m in re.findall(r"ray_raymed_\w+", e)}
    assert used == set(METRICS)
    for name, (kind, _, _) in METRICS.items():  # counters are plotted as rates
        if kind == "counter":
            assert any(f"rate(ray_{name}_total" in e for e in exprs), name
