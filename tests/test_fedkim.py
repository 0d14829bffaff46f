"""FedKIM: the M3OE gate and experts, the server's own split and held-out data, injection of the
federation's encoders into the central model (real DeepSpeed ranks), the frozen language model, and
a run through the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raymed.experiment import load_config
from raymed.methods.fedkim.instructions import CATALOGUE, NEW_SENTENCES, answer_metrics, tasks_of
from raymed.data.shards import ShardSet, materialise
from raymed.errors import ConfigError
from raymed.methods import build_method, client_context
from raymed.methods.base import ServerState
from raymed.methods.fedkim.model import M3OEGate, MoELoRA
from tests.conftest import _real_dir, small_config

needs_3d = pytest.mark.skipif(
    _real_dir() is None or not (_real_dir() / "adrenalmnist3d.npz").is_file(), reason="the real MedMNIST files (with adrenalmnist3d) are not here"
)

TINY_LM = [
    "model.decoder.width=32", "model.decoder.heads=2", "model.decoder.layers=1", "model.decoder.prefix_tokens=4",
    "model.decoder.lora_rank=4", "model.decoder.pretrain_epochs=0",
]


@pytest.fixture
def kim_config(data_dir, tmp_path):
    """A 2D + 3D federation (chest X-ray and adrenal CT volumes) with a server split."""

    def make(*overrides: str):
        return small_config(
            data_dir, tmp_path,
            "data.datasets=[pneumoniamnist,adrenalmnist3d]", "data.server_fraction=0.2", "clients.num=4", "clients.fraction=1.0",
            "data.max_train_per_dataset=120", "data.max_test_per_dataset=32", "rounds=1", "server.lr=0.01",
            "strategy={name: fedkim, experts: 3, server_epochs: 0}", *TINY_LM, *overrides,
        )

    return make


# ---------------------------------------------------------------------------------------------------
# M3OE (no data)


@pytest.mark.parametrize("top_k", [None, 2])
def test_gate_weights_sum_to_one(top_k):
    torch.manual_seed(0)
    gate = M3OEGate(width=16, experts=4, top_k=top_k)
    modality, task = torch.randn(5, 3, 16), torch.randn(5, 6, 16)
    task_mask = torch.ones(5, 6, dtype=torch.bool)
    task_mask[:, 4:] = False  # padding in the task description
    g = gate(modality, torch.ones(5, 3, dtype=torch.bool), task, task_mask)
    assert g.shape == (5, 4) and (g >= 0).all()
    torch.testing.assert_close(g.sum(1), torch.ones(5))
    assert ((g > 0).sum(1) == (top_k or 4)).all()  # top-k: exactly k experts weighted
    # padding is ignored: changing padded task positions does not change the gate
    task2 = task.clone()
    task2[:, 4:] = torch.randn(5, 2, 16)
    torch.testing.assert_close(gate(modality, torch.ones(5, 3, dtype=torch.bool), task2, task_mask), g)


def test_moe_lora_is_the_gated_sum_of_scaled_experts():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = MoELoRA(base, experts=3, rank=2, alpha=4.0)
    x = torch.randn(2, 7, 6)
    layer.gate = torch.softmax(torch.randn(2, 3), 1)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: a new layer changes nothing
    layer.lora_B.data.normal_()
    expected = base(x) + sum(
        layer.gate[:, e, None, None] * (4.0 / 2) * (x @ layer.lora_A[e].T @ layer.lora_B[e].T) for e in range(3)
    )
    torch.testing.assert_close(layer(x), expected)


def test_answer_metrics():
    scores = answer_metrics(["yes", "no", "yes", "left lung"], ["yes", "no", "no", "the left lung"], np.array([1, 1, 1, 0], bool))
    assert scores["acc"] == pytest.approx(0.5) and scores["acc_closed"] == pytest.approx(2 / 3) and scores["acc_open"] == 0.0
    assert 0 < scores["rouge1"] < 1 and 0 < scores["bleu1"] <= 1 and -1 <= scores["mcc"] <= 1
    perfect = answer_metrics(["yes", "no"], ["yes", "no"], np.array([1, 1], bool))
    assert perfect["acc"] == perfect["f1"] == perfect["mcc"] == 1.0


# ---------------------------------------------------------------------------------------------------
# Data and config


@needs_3d
def test_server_split_and_held_out_data(kim_config):
    cfg = kim_config("data.held_out=[breastmnist]")
    shards = ShardSet(materialise(cfg))
    for flag in ("pneumoniamnist", "adrenalmnist3d"):
        server, info = shards.server(flag), shards.meta["datasets"][flag]
        assert info["num_server"] == len(server) == pytest.approx(0.2 * 120, abs=2)
        client_rows = np.concatenate([np.array(s.images) for c in range(4) for s in shards.client(c).train.values() if s.images.shape[1:] == server.images.shape[1:]])
        held = np.concatenate([np.array(s.images) for c in range(4) for s in shards.client(c).holdout.values() if s.images.shape[1:] == server.images.shape[1:]])
        seen = {row.tobytes() for row in np.concatenate([client_rows, held])}
        assert not any(np.array(img).tobytes() in seen for img in server.images)  # no client holds a server image
    assert list(shards.held_out_tasks) == ["breastmnist"] and "breastmnist" not in shards.tasks
    assert len(shards.test("breastmnist")) == 32 and all("breastmnist" not in shards.client(c).train for c in range(4))
    names = [t.name for t in tasks_of(shards)]
    assert names == ["pneumonia", "adrenal", "lung_infection", "breast"]
    assert [t.held_out for t in tasks_of(shards)] == [False, False, True, True]


def test_fedkim_config_refusals(data_dir, tmp_path):
    base = ["strategy.name=fedkim", "data.datasets=[pneumoniamnist]"]
    with pytest.raises(ConfigError, match="data.server_fraction > 0"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="no question for chestmnist"):
        load_config(None, [*base, "data.server_fraction=0.1", "data.held_out=[chestmnist]"])
    with pytest.raises(ConfigError, match="top_k=5 exceeds experts=4"):
        load_config(None, [*base, "data.server_fraction=0.1", "strategy.top_k=5"])
    cfg = load_config("fedkim")  # the embedded experiment mixes 2D and 3D datasets: allowed here
    assert cfg.data.mixes_dimensions and cfg.strategy.name == "fedkim"


# ---------------------------------------------------------------------------------------------------
# The central model on DeepSpeed ranks


@needs_3d
def test_task_sentence_alone_changes_the_gate(kim_config):
    cfg = kim_config()
    shard_dir = materialise(cfg)
    method = build_method("fedkim", cfg.strategy.params)
    cfg = method.prepare(cfg, str(shard_dir))
    model = method.build_server_model(cfg, ShardSet(shard_dir))
    names = [t.name for t in model.tasks]
    trained, new = names.index("pneumonia"), names.index("lung_infection")
    assert CATALOGUE["pneumoniamnist"].modality == NEW_SENTENCES["pneumoniamnist"].modality  # same modality sentence
    with torch.no_grad():
        gates = model.gate_weights()
        same_task = model.gate_weights(model.modality_ids[new : new + 1], model.task_ids[trained : trained + 1])
    torch.testing.assert_close(gates.sum(1), torch.ones(len(names)))
    assert not torch.allclose(gates[trained], gates[new], atol=1e-6)  # only the task sentence differs
    torch.testing.assert_close(same_task[0], gates[trained])  # and with it, the gate is the trained task's


@needs_3d
def test_injection_loads_the_fedavg_of_client_encoders_and_the_lm_stays_frozen(ray_session, kim_config):
    from raymed.engine.server_model import ServerModelGroup

    cfg = kim_config()
    shard_dir = materialise(cfg)
    shards = ShardSet(shard_dir)
    method = build_method("fedkim", cfg.strategy.params)
    cfg = method.prepare(cfg, str(shard_dir))
    local = method.build_model(cfg.model, shards.tasks, cfg.seed)
    initial = {k: v.numpy().copy() for k, v in local.state_dict().items()}
    state = method.init_state(initial)

    # Round 1 on the clients, in this process: each trains from the broadcast weights.
    trained, sizes, accumulator = [], [], method.new_accumulator()
    for client in range(cfg.clients.num):
        ctx = client_context(cfg, client, 1, local, shards, torch.device("cpu"), initial)
        update = method.client_update(ctx, state.weights)
        accumulator.add(update)
        trained.append(ctx.read(ctx.trained_keys))
        sizes.append(ctx.num_train)
    state = method.aggregate(state, accumulator)
    encoders = sorted(k for k in state.weights if k.startswith("encoders."))
    assert {k.split(".")[1] for k in encoders} == {"image", "volume"}

    group = ServerModelGroup(cfg, str(shard_dir), "fedkim-test")
    try:
        state = method.server_update(state, group, 1)  # server_epochs=0: injection only
        central = group.read(encoders)
        for key in encoders:  # the FedAvg of the clients that train this encoder, by their sizes
            holders = [(w[key], n) for w, n in zip(trained, sizes) if key in w]
            expected = sum(n * w for w, n in holders) / sum(n for _, n in holders)
            np.testing.assert_allclose(central[key], expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(state.weights[key], central[key])  # what the next clients get

        fresh = method.build_server_model(cfg, shards)  # the language model straight from its checkpoint
        lm = {k: p.detach().numpy() for k, p in fresh.named_parameters() if k in fresh.frozen_keys}
        assert len(lm) > 5 and all(k.startswith("lm.") for k in lm)
        expert_keys = [k for k, _ in fresh.named_parameters() if "lora_" in k or k.startswith("gate.")]
        before = group.read(expert_keys)

        method.params.server_epochs = 2  # now train the central model on the server's split
        state = method.server_update(ServerState(state.weights, 1), group, 2)
        after_lm = group.read(sorted(lm))
        for key, value in lm.items():
            np.testing.assert_array_equal(after_lm[key], value)  # the language model is bit-identical
        after = group.read(expert_keys)
        assert any(not np.array_equal(before[k], after[k]) for k in expert_keys if "lora_B" in k)  # experts trained
        assert any(not np.array_equal(before[k], after[k]) for k in expert_keys if k.startswith("gate."))  # and the gate
        moved = group.read(encoders)
        assert any(not np.array_equal(moved[k], central[k]) for k in encoders)  # central training moves the encoders
        for key in encoders:
            np.testing.assert_array_equal(state.weights[key], moved[key])
    finally:
        group.close()


@needs_3d
@pytest.mark.slow
def test_fedkim_runs_through_the_engine(kim_config, tmp_path):
    from raymed.engine.federation import run_experiment

    cfg = kim_config("strategy={name: fedkim, experts: 2, top_k: 1, server_epochs: 1}", "clients.fraction=0.5")
    import pandas as pd
    import yaml

    run_dir = run_experiment(cfg)
    metrics = pd.read_parquet(run_dir / "rounds.parquet").iloc[-1].to_dict()
    assert any(k.startswith("central/pneumonia/") for k in metrics), sorted(metrics)
    for key in ("central/pneumonia/acc", "central/pneumonia/mcc", "central/adrenal/f1", "central/lung_infection/acc", "central/trained/acc", "central/held_out/acc"):
        assert np.isfinite(metrics[key]), key
    assert np.isfinite(metrics["global/mean/acc"])  # the clients' averaged local models, on the test splits
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert Path(saved["model"]["decoder"]["checkpoint"]).is_dir()  # the resolved config names the central LM


@needs_3d
def test_central_model_on_two_zero3_ranks_trains_and_answers_every_test_row(ray_session, kim_config):
    from raymed.engine.server_model import ServerModelGroup

    cfg = kim_config("server.ranks=2", "server.zero_stage=3")
    shard_dir = materialise(cfg)
    shards = ShardSet(shard_dir)
    method = build_method("fedkim", cfg.strategy.params)
    cfg = method.prepare(cfg, str(shard_dir))
    group = ServerModelGroup(cfg, str(shard_dir), "fedkim-zero3")
    try:
        assert all(i["zero_stage"] == 3 and i["world_size"] == 2 and i["params_local"] < i["params_total"] for i in group.info)
        assert np.isfinite(group.fit(1, 1))  # both ranks step together over their halves of the server split
        answers = group.answer("test")
        for task in tasks_of(shards):
            parts = [a for a in answers if a.task == task.name]
            rows = sorted(r for a in parts for r in range(a.first_row, a.first_row + len(a.reference)))
            assert rows == list(range(len(shards.test(task.dataset)))), task.name  # every row once, none twice
            assert all(len(a.predicted) == len(a.reference) for a in parts)
    finally:
        group.close()
