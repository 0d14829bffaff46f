"""MAFM3: a frozen foundation grows (task, modality) modules: the foundation stays bit-identical, a new
RGB modality gets its own patch embedding, clients send only their modules, and the prognosis task
(survival loss, C-index) runs through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from raymed.errors import ConfigError
from raymed.methods.mafm3 import module_of
from raymed.methods.base import WeightedMean
from tests.conftest import prepared_method, small_config

THREE = ["data.datasets=[pneumoniamnist,breastmnist,retinamnist]", "data.prognosis=[retinamnist]", "clients.num=6", "clients.fraction=1.0"]


@pytest.fixture
def mafm3_setup(data_dir, tmp_path):
    def make(*overrides: str):
        cfg = small_config(
            data_dir, tmp_path, "data.max_train_per_dataset=120", "data.max_test_per_dataset=40", *THREE,
            "strategy={name: mafm3, rank: 4, foundation_epochs: 1}", *overrides,
        )
        cfg, method, model, state, shards, context = prepared_method(cfg)
        return cfg, method, model, state, context, shards

    return make


def test_foundation_weights_stay_bit_identical_while_modules_train(mafm3_setup):
    cfg, method, model, state, context, shards = mafm3_setup()
    saved = {k.removeprefix("backbone."): v for k, v in load_file(cfg.strategy.params["foundation"]).items() if k.startswith("backbone.")}
    accumulator = WeightedMean()
    for client in range(shards.num_clients):
        update = method.client_update(context(client), state.weights)
        assert np.abs(np.concatenate([d.ravel() for d in update.delta.values()])).sum() > 0  # the modules did train
        accumulator.add(update)
    state = method.aggregate(state, accumulator)
    foundation = {k.removeprefix("backbone."): v for k, v in model.foundation_state().items()}
    assert foundation.keys() == saved.keys()
    for key, value in foundation.items():
        assert np.array_equal(value.numpy(), saved[key]), key  # bit for bit
    assert not any(k in model.unsent_keys for k in state.weights)  # never sent, never held by the server


def test_clients_send_only_their_own_modules(mafm3_setup):
    cfg, method, model, state, context, shards = mafm3_setup()
    full = sum(p.numel() for p in model.foundation_state().values()) * 4
    for client in range(shards.num_clients):
        ctx = context(client)
        (own,) = ctx.shard.datasets
        update = method.client_update(ctx, state.weights)
        modules = {k.rsplit(".", 1)[1] for k in update.delta if ".lora_" in k}
        assert modules == {module_of(own)}
        assert {k.split(".")[1] for k in update.delta if k.startswith("heads.")} == {own}
        new_embedding = [k for k in update.delta if ".new." in k]
        assert bool(new_embedding) == (own == "retinamnist")  # only the new modality has its own patch embedding
        assert update.nbytes < 0.15 * full


def test_new_modality_gets_an_inflated_patch_embedding(mafm3_setup):
    cfg, method, model, state, context, shards = mafm3_setup()
    assert set(model.patch.new) == {"fundus"} and model.patch.new["fundus"].weight.shape[1] == 3
    assert model.patch.foundation.weight.shape[1] == 1  # the foundation saw gray images only
    gray = torch.rand(4, 1, 28, 28) * 2 - 1
    model.patch.modality = "fundus"
    inflated = model.patch(gray.expand(-1, 3, -1, -1))
    model.patch.modality = "xray"
    torch.testing.assert_close(inflated, model.patch(gray.expand(-1, 3, -1, -1)))  # same response to a gray image at the start


def test_foundation_must_have_been_trained_on_data_the_run_has(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="foundation_datasets lists retinamnist"):
        small_config(data_dir, tmp_path, "strategy={name: mafm3, foundation_datasets: [retinamnist]}")


@pytest.mark.slow
def test_mafm3_prognosis_runs_through_the_engine(ray_session, data_dir, tmp_path):
    import pandas as pd

    from raymed.engine.federation import run_experiment

    cfg = small_config(
        data_dir, tmp_path, "data.max_train_per_dataset=120", "data.max_test_per_dataset=60", *THREE, "clients.fraction=0.5",
        "rounds=2", "strategy={name: mafm3, rank: 4, foundation_epochs: 1}",
    )
    run = run_experiment(cfg)
    metrics = pd.read_parquet(run / "rounds.parquet").iloc[-1]
    assert 0 <= metrics["global/retinamnist/c_index"] <= 1 and np.isfinite(metrics["global/retinamnist/mae"])
    assert np.isfinite(metrics["global/pneumoniamnist/acc"])
    clients = pd.concat(pd.read_parquet(p) for p in (run / "clients").glob("*.parquet"))
    from raymed.data.tasks import TaskSpec
    from raymed.models import build_model

    full = build_model("cnn", {f: TaskSpec.from_medmnist(f) for f in cfg.data.datasets}, 0)
    assert clients["bytes_up"].max() < 0.15 * 4 * sum(p.numel() for p in full.parameters())  # modules only, never the foundation
