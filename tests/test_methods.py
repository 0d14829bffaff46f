"""The client side of the method interface, in-process (no Ray)."""

import numpy as np
import torch

from raymed.data.shards import ShardSet, materialise
from raymed.engine.worker import float_state
from raymed.methods import ClientContext
from raymed.models import build_model
from tests.conftest import small_config


def test_epochs_draw_new_batch_orders_and_reruns_repeat_them(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "clients.local_epochs=2")
    shards = ShardSet(materialise(cfg))
    model = build_model(cfg.model.name, shards.tasks, cfg.seed)

    def epoch_orders() -> list[np.ndarray]:
        ctx = ClientContext(0, 1, cfg.seed, model, shards.client(0), shards.tasks, cfg.clients, torch.device("cpu"), float_state(model))
        return [torch.cat([y[:, 0] for _, _, y in ctx.batches()]).numpy() for _ in range(cfg.clients.local_epochs)]

    first, rerun = epoch_orders(), epoch_orders()
    assert len(first[0]) == shards.client(0).num_train  # every local row once per epoch
    assert not np.array_equal(first[0], first[1]) or len(set(first[0].tolist())) == 1  # epoch 2 reshuffles
    assert all(np.array_equal(a, b) for a, b in zip(first, rerun))  # same seed, same orders
