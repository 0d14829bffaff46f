"""The client side of the method interface, in-process (no Ray)."""

import numpy as np
import pytest
import torch

from raymed.data.shards import ShardSet, materialise
from raymed.engine.worker import float_state
from raymed.methods import build_method, client_context
from raymed.models import build_model
from tests.conftest import small_config


def test_epochs_draw_new_batch_orders_and_reruns_repeat_them(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "clients.local_epochs=2")
    shards = ShardSet(materialise(cfg))
    model = build_model(cfg.model.name, shards.tasks, cfg.seed)

    def epoch_orders() -> list[np.ndarray]:
        ctx = client_context(cfg, 0, 1, model, shards, torch.device("cpu"), float_state(model))
        return [torch.cat([y[:, 0] for _, _, y in ctx.batches()]).numpy() for _ in range(cfg.clients.local_epochs)]

    first, rerun = epoch_orders(), epoch_orders()
    assert len(first[0]) == shards.client(0).num_train  # every local row once per epoch
    assert not np.array_equal(first[0], first[1]) or len(set(first[0].tolist())) == 1  # epoch 2 reshuffles
    assert all(np.array_equal(a, b) for a, b in zip(first, rerun))  # same seed, same orders


@pytest.mark.parametrize(
    "method, extra",
    [
        ("fedavg", ["clients.momentum=0.9", "clients.weight_decay=0.001"]),
        ("fedprox", ["strategy.mu=0.5"]),
        ("fedper", []),
    ],
)
def test_vectorised_updates_equal_sequential_ones(data_dir, tmp_path, method, extra):
    """vmap over stacked clients == one client at a time: same deltas, weights, losses, kept state."""
    cfg = small_config(
        data_dir, tmp_path, f"strategy.name={method}", "clients.local_epochs=2", "clients.batch_size=8", "data.max_train_per_dataset=310", *extra
    )
    shards = ShardSet(materialise(cfg))
    model = build_model(cfg.model.name, shards.tasks, cfg.seed)
    initial = float_state(model)
    strategy = build_method(cfg.strategy.name, cfg.strategy.params)
    payload = strategy.broadcast(strategy.init_state(initial))
    clients = list(range(cfg.clients.num))  # both datasets (two vmap groups), clients of unequal sizes

    def contexts():
        return [client_context(cfg, c, 1, model, shards, torch.device("cpu"), initial) for c in clients]

    torch.set_num_threads(1)
    sequential = [strategy.client_update(ctx, payload) for ctx in contexts()]
    vectorised = strategy.client_updates(contexts(), payload)
    assert len({shards.client(c).num_train for c in clients}) > 1
    for seq, vec in zip(sequential, vectorised):
        assert vec.weight == seq.weight and set(vec.delta) == set(seq.delta)
        assert vec.metrics["train_loss"] == pytest.approx(seq.metrics["train_loss"], rel=1e-4)
        for key in seq.delta:
            np.testing.assert_allclose(vec.delta[key], seq.delta[key], rtol=1e-3, atol=1e-5, err_msg=key)
        assert any(np.abs(v).max() > 1e-4 for v in seq.delta.values())  # training moved the weights
        if seq.state is not None:  # FedPer's heads, kept on the client
            assert set(vec.state) == set(seq.state)
            for key in seq.state:
                np.testing.assert_allclose(vec.state[key], seq.state[key], rtol=1e-3, atol=1e-5, err_msg=key)
