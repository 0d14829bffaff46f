"""benchmarks/peers.py compares systems on one exported workload: check that the export is raymed's
partition and schedule, and that the bare loop (the limit) does the same work as a raymed FedAvg round."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raymed.data.shards import ShardSet, materialise
from raymed.engine import run_experiment
from raymed.engine.server import sample_clients
from raymed.data.tasks import to_model_input

from tests.conftest import small_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS / "peers")]
import peers  # noqa: E402  (benchmarks/peers.py)
import run_bare  # noqa: E402  (benchmarks/peers/run_bare.py)
import workload  # noqa: E402  (benchmarks/peers/workload.py)


def test_bare_loop_does_the_work_of_a_raymed_fedavg_round(data_dir, tmp_path, ray_session):
    # One batch per client (batch 512 > rows): the batch order cannot differ, so the models must agree.
    cfg = small_config(
        data_dir, tmp_path,
        "data.datasets=[pneumoniamnist]", "data.partition=dirichlet", "data.alpha=0.5",
        "clients.num=8", "clients.fraction=0.5", "clients.batch_size=512", "rounds=1", "data.augment=false",
        "eval.personalised=false", "strategy.weighting=examples",  # n_k-weighted, as the bare loop (and Flower, pfl) weigh
    )  # fmt: skip
    peers.export_workload(cfg, tmp_path / "workload")
    wl = workload.load(tmp_path / "workload", threads=1)

    shards = ShardSet(materialise(cfg))
    for client in range(cfg.clients.num):
        x, y = wl.client_data(client)
        split = shards.client(client).train["pneumoniamnist"]
        assert torch.equal(x, to_model_input(np.array(split.images), 1, torch.device("cpu"))) and torch.equal(y, torch.as_tensor(np.array(split.labels)))
    assert wl.schedule == [sample_clients(cfg.seed, 1, 8, 0.5)]

    weights, seconds = run_bare.fedavg(wl)
    model = wl.new_model()
    model.load_state_dict(weights)
    bare = wl.evaluate(model)
    assert len(seconds) == 1 and seconds[0] > 0

    run_dir = run_experiment(cfg)
    final = pq.read_table(run_dir / "rounds.parquet").to_pandas().iloc[-1]
    assert abs(final["global/pneumoniamnist/auc"] - 0.5) > 0.05  # scores that depend on the weights
    for metric in ("acc", "auc"):
        assert bare[metric] == pytest.approx(final[f"global/pneumoniamnist/{metric}"], abs=1e-4)
