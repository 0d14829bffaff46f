"""Differential privacy (strategy dpfedavg): client-level DP-FedAvg's clipping, noise and accounting,
local DP-SGD through Opacus, and one short federation on Ray."""

from __future__ import annotations

import copy
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from opacus.accountants import RDPAccountant

from raymed.engine import run_experiment
from raymed.errors import ConfigError
from raymed.methods import ClientUpdate, ServerState, build_method
from raymed.methods.dpfedavg import ClippedSum, client_level_epsilon, clip_update, update_norm
from tests.conftest import prepared_method, small_config

RESOLVED = {"seed": 7, "clients_per_round": 20, "num_clients": 100}


def _method(**params):
    return build_method("dpfedavg", {**RESOLVED, **params})


def test_clipping_bounds_the_update_norm_exactly():
    rng = np.random.default_rng(0)
    big = {"a": rng.normal(size=(300, 40)).astype(np.float32), "b": rng.normal(size=17).astype(np.float32)}
    clipped, norm = clip_update(big, 0.7)
    assert norm == pytest.approx(math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in big.values())))
    assert update_norm(clipped) <= 0.7 * (1 + 1e-6)
    assert update_norm(clipped) == pytest.approx(0.7, rel=1e-6)
    np.testing.assert_allclose(clipped["a"] * norm / 0.7, big["a"], rtol=1e-5)  # same direction, only shorter
    small = {k: v * (0.5 / norm) for k, v in big.items()}
    same, _ = clip_update(small, 0.7)
    assert all(np.array_equal(same[k], small[k]) for k in small)  # under C: untouched

    # The server's sum re-clips: an update changed after the client clipped it still counts at most C.
    acc = ClippedSum(0.7)
    acc.add(ClientUpdate(delta={k: 10 * v for k, v in clipped.items()}, weight=1.0))
    assert update_norm({k: v for k, v in acc.sums.items()}) <= 0.7 * (1 + 1e-6)


def test_client_updates_are_clipped(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "strategy.name=dpfedavg", "strategy.clip=0.01")
    cfg, method, model, state, shards, context = prepared_method(cfg)
    update = method.client_update(context(0), method.broadcast(state))
    assert update.metrics["update_norm"] > 0.01 and update.metrics["clipped"] == 1.0
    assert update_norm(update.delta) <= 0.01 * (1 + 1e-6)
    assert update.weight == 1.0  # uniform weights, never n_k


def test_server_noise_has_std_zC_and_is_seeded_by_seed_and_round():
    method = _method(clip=0.5, noise_multiplier=1.3, server_lr=2.0)
    weights = {"w": np.zeros((400, 500), np.float32), "v": np.zeros(1000, np.float32)}
    k = RESOLVED["clients_per_round"]

    def noise_of(round_: int, seed: int = 7) -> np.ndarray:
        m = method if seed == 7 else _method(clip=0.5, noise_multiplier=1.3, server_lr=2.0, seed=seed)
        new = m.aggregate(ServerState(weights=weights, round=round_ - 1), m.new_accumulator())
        return np.concatenate([new.weights[key].ravel() for key in sorted(new.weights)]).astype(np.float64) * k / 2.0

    noise = noise_of(5)
    # 201,000 draws: the sample std's standard error is 0.16 %, so 2 % is > 10 standard errors.
    assert noise.std() == pytest.approx(1.3 * 0.5, rel=0.02)
    assert abs(noise.mean()) < 0.01
    assert np.array_equal(noise, noise_of(5))  # same (seed, round): the same noise, as after a resume
    assert not np.allclose(noise, noise_of(6))
    assert not np.allclose(noise, noise_of(5, seed=8))
    # Noise lands on every key, also on keys no client sent this round.
    assert all(np.abs(v).max() > 0 for v in method.aggregate(ServerState(weights=weights), method.new_accumulator()).weights.values())


def test_no_noise_and_huge_clip_is_fedavgs_unweighted_mean(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "strategy.name=dpfedavg", "strategy.noise_multiplier=0", "strategy.clip=1e9")
    cfg, method, model, state, shards, context = prepared_method(cfg)
    payload = method.broadcast(state)
    k = cfg.strategy.params["clients_per_round"]
    clients = list(range(k))
    updates = [method.client_update(context(c), payload) for c in clients]

    fedavg = build_method("fedavg", {})
    fed_model = copy.deepcopy(model)
    for c, update in zip(clients, updates):  # the client half is FedAvg's local training
        ctx = context(c)
        ctx.model = fed_model
        plain = fedavg.client_update(ctx, payload)
        assert set(plain.delta) == set(update.delta)
        for key in plain.delta:
            np.testing.assert_allclose(update.delta[key], plain.delta[key], rtol=1e-5, atol=1e-7, err_msg=key)
    vectorised = method.client_updates([context(c) for c in clients], payload)  # vmap'd: the same updates
    for seq, vec in zip(updates, vectorised):
        for key in seq.delta:
            np.testing.assert_allclose(vec.delta[key], seq.delta[key], rtol=1e-3, atol=1e-5, err_msg=key)

    acc = method.new_accumulator()
    for update in updates:
        acc.add(update)
    new = method.aggregate(state, acc)
    for key, w in state.weights.items():
        # Σ_k Δ_k / k, a client that does not hold a head counting as zero in its sum.
        expected = w.astype(np.float64) + sum(u.delta[key].astype(np.float64) for u in updates if key in u.delta) / k
        np.testing.assert_allclose(new.weights[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)
    backbone = [key for key in state.weights if key.startswith("backbone.")]
    assert backbone and all(all(key in u.delta for u in updates) for key in backbone)
    for key in backbone:  # where every client sends the key: FedAvg's mean with uniform weights
        np.testing.assert_allclose(new.weights[key] - state.weights[key], np.mean([u.delta[key] for u in updates], axis=0), rtol=1e-5, atol=1e-7)


def test_epsilon_is_opacus_rdp_and_grows_with_rounds_and_falls_with_noise():
    q, delta = RESOLVED["clients_per_round"] / RESOLVED["num_clients"], 1e-5
    method = _method(noise_multiplier=1.0, delta=delta)
    eps = [method.round_metrics(ServerState(weights={}, round=r), [])["privacy/epsilon"] for r in (1, 2, 10, 50)]
    for r, value in zip((1, 2, 10, 50), eps):
        accountant = RDPAccountant()
        for _ in range(r):
            accountant.step(noise_multiplier=1.0, sample_rate=q)
        assert value == pytest.approx(accountant.get_epsilon(delta=delta), rel=1e-9)
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    by_z = [client_level_epsilon(z, q, 10, delta) for z in (0.5, 1.0, 2.0)]
    assert by_z[0] > by_z[1] > by_z[2] > 0
    assert client_level_epsilon(0.0, q, 10, delta) == math.inf  # clipping only: no guarantee
    assert client_level_epsilon(1.0, q, 10, 1e-3) < client_level_epsilon(1.0, q, 10, 1e-5)


def test_bad_parameters_are_refused_in_one_line(data_dir, tmp_path):
    for bad in ("strategy.delta=1.5", "strategy.clip=0", "strategy.noise_multiplier=-1", "strategy.local_clip=0", "strategy.clients_per_round=2"):
        with pytest.raises(ConfigError) as info:
            small_config(data_dir, tmp_path, "strategy.name=dpfedavg", bad)
        assert "\n" not in str(info.value) and bad.split("=")[0] in str(info.value)
    with pytest.raises(ConfigError, match="resnet18 adds residuals in place"):  # Opacus's hooks forbid it
        small_config(data_dir, tmp_path, "strategy.name=dpfedavg", "model.name=resnet18", "strategy.local_noise_multiplier=1")
    small_config(data_dir, tmp_path, "strategy.name=dpfedavg", "model.name=resnet18")  # client-level DP alone: fine


def test_local_dp_sgd_clips_per_example_gradients_through_opacus(data_dir, tmp_path):
    # One local step on all of a small client's rows (batch_size >= its rows: Poisson rate 1), σ = 0:
    # the step must be the mean of per-example gradients each clipped to local_clip.
    clip, lr = 0.05, 0.1
    cfg = small_config(
        data_dir, tmp_path, "strategy.name=dpfedavg", "strategy.local_noise_multiplier=1e-12", f"strategy.local_clip={clip}",
        "strategy.clip=1e9", "data.max_train_per_dataset=90", "clients.batch_size=64", f"clients.lr={lr}",
    )
    cfg, method, model, state, shards, context = prepared_method(cfg)
    payload = method.broadcast(state)
    reference = copy.deepcopy(model)
    ctx = context(0)
    flag = shards.client(0).datasets[0]
    x, y = ctx.tensors()[flag]
    assert len(y) <= 64 and len(shards.client(0).datasets) == 1
    update = method.client_update(ctx, payload)

    # By hand: one backward pass per example on a model without any hook.
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in payload.items()}, strict=False)
    params = {n: p for n, p in reference.named_parameters() if n in update.delta}
    clipped, raw = {n: torch.zeros_like(p) for n, p in params.items()}, {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(y)):
        reference.zero_grad()
        ctx.tasks[flag].loss(reference(x[i : i + 1], flag), y[i : i + 1]).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params.values()))
        norms.append(float(norm))
        for n, p in params.items():
            clipped[n] += p.grad * min(1.0, clip / (float(norm) + 1e-6))
            raw[n] += p.grad
    assert min(norms) > clip  # the bound binds on every example
    for n in params:
        np.testing.assert_allclose(update.delta[n], (-lr * clipped[n] / len(y)).numpy(), rtol=1e-3, atol=1e-7, err_msg=n)
    assert not np.allclose(update.delta["heads." + flag + ".bias"], (-lr * raw["heads." + flag + ".bias"] / len(y)).numpy(), rtol=1e-2)

    # Accounting, and nothing of Opacus left on the worker's shared model.
    assert 0 < update.metrics["local_epsilon"] < math.inf
    assert update.state is not None and update.state[f"dpsgd/{flag}"].tolist() == [[1e-12, 1.0, 1.0]]
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad and not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") for p in model.parameters())


def test_local_dp_sgd_reports_a_finite_growing_epsilon(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "strategy.name=dpfedavg", "strategy.local_noise_multiplier=1.0", "strategy.local_clip=1.0")
    cfg, method, model, state, shards, context = prepared_method(cfg)
    payload = method.broadcast(state)
    first = method.client_update(context(1), payload)
    again = context(1)
    again.state = first.state  # the client's kept history, as the engine hands it back
    second = method.client_update(again, payload)
    assert 0 < first.metrics["local_epsilon"] < second.metrics["local_epsilon"] < math.inf
    records = [{"failed": None, "rejected": None, **u.metrics} for u in (first, second)]
    metrics = method.round_metrics(ServerState(weights={}, round=1), records)
    assert metrics["privacy/local_epsilon_max"] == second.metrics["local_epsilon"]


def test_federation_on_ray_reports_growing_epsilon(data_dir, tmp_path, ray_session):
    cfg = small_config(
        data_dir, tmp_path, "strategy.name=dpfedavg", "strategy.noise_multiplier=1.0", "strategy.clip=0.5",
        "strategy.local_noise_multiplier=1.0", "eval.personalised=false",
    )
    run_dir = run_experiment(cfg)
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    eps = rounds["privacy/epsilon"].tolist()
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < math.inf
    assert eps[1] == pytest.approx(client_level_epsilon(1.0, 3 / 6, 2, 1e-5))
    assert all(0 < v < math.inf for v in rounds["privacy/local_epsilon_max"])
    assert all(np.isfinite(rounds["global/mean/acc"]))
    clients = pq.read_table(run_dir / "clients").to_pandas()
    assert (clients["local_epsilon"] > 0).all() and (clients["update_norm"] > 0).all()
