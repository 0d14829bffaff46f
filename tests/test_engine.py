"""The engine on real Ray actors and real (or synthetic, when absent) MedMNIST shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch

from raymed.data.shards import ShardSet, materialise
from raymed.engine import ServerActor, plan_workers, run_experiment, sample_clients
from raymed.engine.client_state import ClientStateStore
from raymed.engine.worker import ClientWorker, float_state
from raymed.errors import ClientFailure, ResourceError, find_user_error
from raymed.methods import build_method, client_context
from raymed.models import build_model
from tests.conftest import small_config


def _server(cfg, shard_dir, workers=2, name="t"):
    return ray.remote(ServerActor).remote(cfg.to_dict(), str(shard_dir), workers, name, None)


@pytest.mark.parametrize("weighting, head", [("examples", "per_dataset"), ("uniform", "per_dataset"), ("examples", "shared")])
def test_fedavg_round_equals_hand_computed_weighted_average(data_dir, tmp_path, ray_session, weighting, head):
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedavg", f"strategy.weighting={weighting}", f"model.head={head}",
                       "data.partition=quantity", "eval.personalised=false")
    shard_dir = materialise(cfg)
    server = _server(cfg, shard_dir, name="avg")
    initial = ray.get(server.get_state.remote()).weights
    ray.get(server.run_round.remote())
    after = ray.get(server.get_state.remote()).weights
    ray.kill(server)

    # By hand: train every sampled client from the same start, then Σ a_k w_k / Σ a_k per parameter
    # over the clients that hold it (a dataset's head is averaged over that dataset's clients), with
    # a_k = n_k (weighting: examples) or 1 (uniform). A shared head is one head every client trains,
    # averaged over all of them.
    torch.set_num_threads(1)
    shards = ShardSet(shard_dir)
    model = build_model(cfg.model.name, shards.tasks, cfg.seed)
    method = build_method("fedavg", cfg.strategy.params)
    sums, totals, sizes = {}, {}, set()
    for cid in sample_clients(cfg.seed, 1, cfg.clients.num, cfg.clients.fraction):
        ctx = client_context(cfg, cid, 1, model, shards, torch.device("cpu"), float_state(model))
        update = method.client_update(ctx, initial)
        a_k = ctx.num_train if weighting == "examples" else 1
        sizes.add(ctx.num_train)
        for key, delta in update.delta.items():
            local = initial[key] + delta
            sums[key] = sums.get(key, 0) + a_k * local.astype(np.float64)
            totals[key] = totals.get(key, 0) + a_k
    assert len(sizes) > 1  # clients of unequal sizes, so the two weightings differ
    heads = {k.split(".")[1] for k in after if k.startswith("heads.")}
    assert heads == ({"shared"} if head == "shared" else set(shards.tasks))
    if head == "shared":  # one head over 2 + 2 classes (PneumoniaMNIST, BreastMNIST)
        assert after["heads.shared.weight"].shape[0] == sum(t.num_classes for t in shards.tasks.values()) == 4
    assert set(sums) == set(after)
    for key in after:
        np.testing.assert_allclose(after[key], sums[key] / totals[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert any(not np.allclose(after[k], initial[k]) for k in after)  # the round did move the model


def test_fedper_head_never_reaches_the_server(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedper")
    shard_dir = materialise(cfg)
    server = _server(cfg, shard_dir, name="per")
    state = ray.get(server.get_state.remote())
    assert state.weights and not any(k.startswith("heads.") for k in state.weights)
    for _ in range(2):
        result = ray.get(server.run_round.remote())
        for record in result["clients"]:  # per-client records hold numbers, never weights
            assert not any(isinstance(v, np.ndarray) for v in record.values())
    assert not any(k.startswith("heads.") for k in ray.get(server.get_state.remote()).weights)
    assert "global/pneumoniamnist/acc" not in result["metrics"]  # no global head to test
    assert "personal/pneumoniamnist/acc" in result["metrics"]
    # A client never sampled has only the seeded initial head: left out of the personalised metrics, counted.
    seen = {c for r in (1, 2) for c in sample_clients(cfg.seed, r, cfg.clients.num, cfg.clients.fraction)}
    assert len(seen) < cfg.clients.num and result["metrics"]["eval/unseen_clients"] == cfg.clients.num - len(seen)
    ray.kill(server)

    # What a worker hands back to the server for a round: no head anywhere in it.
    store = ray.remote(ClientStateStore).remote(None)
    worker = ray.remote(ClientWorker).remote(cfg.to_dict(), str(shard_dir), 0, store)
    payload = {k: v for k, v in state.weights.items()}
    sent = ray.get(worker.train.remote(1, payload, [0, 1, 2]))
    assert sent["accumulator"].count == 3
    assert sent["accumulator"].sums and not any(k.startswith("heads.") for k in sent["accumulator"].sums)
    kept = ray.get(store.get_many.remote([0, 1, 2]))  # the heads stayed with the clients
    assert all(s and all(k.startswith("heads.") for k in s) for s in kept)
    again = ray.get(worker.train.remote(2, payload, [0]))
    assert again["accumulator"].count == 1
    newer = ray.get(store.get_many.remote([0]))[0]
    assert any(not np.array_equal(newer[k], kept[0][k]) for k in newer)  # client 0 kept training its head
    ray.kill(worker)
    ray.kill(store)


def _comparable(run_dir) -> pd.DataFrame:
    df = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    return df[[c for c in df.columns if not c.startswith(("time/", "memory/"))]]


def test_same_seed_same_clients_and_metrics(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedprox", "strategy.mu=0.1")
    first, second = run_experiment(cfg), run_experiment(cfg)
    pd.testing.assert_frame_equal(_comparable(first), _comparable(second), rtol=1e-6)
    clients = lambda d: pq.read_table(d / "clients").to_pandas().sort_values(["round", "client_id"])  # noqa: E731
    assert clients(first)["client_id"].tolist() == clients(second)["client_id"].tolist()

    other = run_experiment(small_config(data_dir, tmp_path, "strategy.name=fedprox", "strategy.mu=0.1", "seed=4"))
    assert clients(other)["client_id"].tolist() != clients(first)["client_id"].tolist()
    assert sample_clients(3, 1, 100, 0.1) == sample_clients(3, 1, 100, 0.1) != sample_clients(3, 2, 100, 0.1)


def test_dedicated_and_vectorised_give_the_pool_result(data_dir, tmp_path, ray_session):
    base = ("clients.num=3", "clients.fraction=1.0", "clients.num_cpus=0.5", "rounds=1")
    pool = run_experiment(small_config(data_dir, tmp_path, *base))
    dedicated = run_experiment(small_config(data_dir, tmp_path, *base, "engine.mode=dedicated"))
    pd.testing.assert_frame_equal(_comparable(pool), _comparable(dedicated), rtol=1e-4)
    placed = pq.read_table(dedicated / "clients").to_pandas()
    assert sorted(zip(placed["client_id"], placed["worker"])) == [(0, 0), (1, 1), (2, 2)]  # one actor per client
    vectorised = run_experiment(small_config(data_dir, tmp_path, *base, "engine.vectorise=true"))
    pd.testing.assert_frame_equal(_comparable(pool), _comparable(vectorised), rtol=1e-3)  # vmap'd clients, same run


def test_local_steps_run_the_same_in_the_pool_and_vectorised(data_dir, tmp_path, ray_session):
    base = ("clients.num=3", "clients.fraction=1.0", "clients.num_cpus=0.5", "rounds=1", "clients.local_steps=3")
    pool = run_experiment(small_config(data_dir, tmp_path, *base))
    vectorised = run_experiment(small_config(data_dir, tmp_path, *base, "engine.vectorise=true"))
    pd.testing.assert_frame_equal(_comparable(pool), _comparable(vectorised), rtol=1e-3)
    epochs = run_experiment(small_config(data_dir, tmp_path, *base[:-1]))
    assert not _comparable(pool).equals(_comparable(epochs))  # 3 steps is not one pass here


def test_non_finite_updates_are_never_aggregated(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "clients.lr=1e30", "rounds=1")
    with pytest.raises(Exception) as info:
        run_experiment(cfg)
    failure = info.value.cause if hasattr(info.value, "cause") else info.value
    assert isinstance(failure, ClientFailure) and "every client update was rejected" in str(failure)
    assert "non-finite" in str(failure)
    summary = next((tmp_path / "results").glob("*/summary.json")).read_text()
    assert "failed" in summary  # the run folder says why it stopped


def test_layouts_that_cannot_fit_are_refused(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "clients.num_cpus=4")
    with pytest.raises(ResourceError, match="needs clients.num_cpus=4 CPUs but the cluster has 2"):
        plan_workers(cfg, {"CPU": 2.0, "memory": 8e9})
    with pytest.raises(ResourceError, match="needs clients.num_cpus=4 CPUs"):
        run_experiment(cfg)  # the session's Ray has 2 CPUs
    assert not (tmp_path / "results").exists()  # refused before the run got a folder
    cfg = small_config(data_dir, tmp_path, "clients.num_gpus=0.25")
    with pytest.raises(ResourceError, match="clients.num_gpus=0.25 but the cluster has 0 GPU"):
        plan_workers(cfg, {"CPU": 2.0})
    cfg = small_config(data_dir, tmp_path, "engine.mode=dedicated")
    with pytest.raises(ResourceError, match="one actor per client \\(6\\)"):
        plan_workers(cfg, {"CPU": 2.0, "memory": 8e9})
    assert plan_workers(small_config(data_dir, tmp_path, "clients.num_gpus=0.25"), {"CPU": 16.0, "GPU": 1.0}) == 3
    assert plan_workers(small_config(data_dir, tmp_path), {"CPU": 2.0, "memory": 8e9}) == 2


def test_workers_that_cannot_be_placed_stop_the_run_with_the_reason(data_dir, tmp_path, ray_session):
    """Another job holds every CPU: the run says so after engine.start_timeout_s instead of hanging."""

    @ray.remote(num_cpus=2)
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    try:
        with pytest.raises(Exception) as raised:  # raised in the server actor, so it arrives wrapped by Ray
            run_experiment(small_config(data_dir, tmp_path, "engine.num_workers=2", "engine.start_timeout_s=5"))
        reason = find_user_error(raised.value)
        assert isinstance(reason, ResourceError) and "2 of 2 client workers" in str(reason)
        assert "were not placed within 5 s" in str(reason)
    finally:
        ray.kill(hog)
    summary = next((tmp_path / "results").glob("*/summary.json")).read_text()
    assert "not placed" in summary  # the run folder says why it stopped


def test_personalised_evaluation_samples_the_same_seeded_clients_every_round(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedavg", "eval.personal_clients=4", "rounds=2")
    run_dir = run_experiment(cfg)
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    assert (rounds["eval/personal_clients_sampled"] == 4).all()
    evaluation = pq.read_table(run_dir / "evaluation").to_pandas()
    by_round = evaluation.groupby("round")["client_id"].apply(lambda c: sorted(set(c)))
    assert len(by_round) == 2 and by_round.iloc[0] == by_round.iloc[1] and len(by_round.iloc[0]) == 4
    expected = sorted(np.random.default_rng([cfg.seed, 0xE7A1]).choice(range(cfg.clients.num), 4, replace=False).tolist())
    assert by_round.iloc[0] == expected
