"""Robust aggregation rules (median, trimmed mean, Krum) against numpy by hand, their config checks,
the engine's Byzantine attacks, and one short federation on Ray under attack."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from raymed.experiment import validate_config
from raymed.data.tasks import TaskSpec
from raymed.engine.faults import FaultPlan, flip_labels
from raymed.errors import ConfigError, RaymedError
from raymed.methods import ClientUpdate, ServerState, build_method
from raymed.methods.robust import UpdateList, coordinate_median, krum, krum_scores, krum_select, trimmed_mean
from tests.conftest import small_config

BACKBONE, HEAD_A, HEAD_B = "backbone.w", "heads.a.w", "heads.b.w"


def synthetic_updates(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """7 clients: all send the backbone, clients 0-3 head a, clients 3-6 head b (client 3 holds both
    datasets); client 0 is an outlier (×1000 and shifted) in everything it sends."""
    rng = np.random.default_rng(seed)
    updates = []
    for k in range(7):
        u = {BACKBONE: (0.1 + 0.01 * rng.normal(size=(4, 3))).astype(np.float32)}
        if k <= 3:
            u[HEAD_A] = (-0.2 + 0.01 * rng.normal(size=5)).astype(np.float32)
        if k >= 3:
            u[HEAD_B] = (0.3 + 0.01 * rng.normal(size=5)).astype(np.float32)
        updates.append(u)
    updates[0] = {k: (1000 * v + 50).astype(np.float32) for k, v in updates[0].items()}
    return updates


def senders(updates, key) -> np.ndarray:
    return np.stack([u[key] for u in updates if key in u]).astype(np.float64)


def honest_range(updates, key) -> tuple[np.ndarray, np.ndarray]:
    values = senders(updates[1:], key)
    return values.min(axis=0), values.max(axis=0)


# ---------------------------------------------------------------------------------------------------
# The rules against numpy


def test_median_and_trimmed_mean_of_a_tiny_example():
    one = [{"x": np.array([v], dtype=np.float32)} for v in (1.0, 2.0, 3.0, 100.0, -50.0)]
    assert coordinate_median(one)["x"][0] == 2.0
    assert trimmed_mean(one, 0.2)["x"][0] == pytest.approx(2.0)  # ⌈0.2·5⌉ = 1 cut at each end: mean(1, 2, 3)
    assert trimmed_mean(one, 0.0)["x"][0] == pytest.approx(56 / 5)  # β = 0: the plain mean
    assert trimmed_mean(one, 0.1)["x"][0] == pytest.approx(2.0)  # ⌈0.5⌉ = 1: a fraction of an attacker is still cut


def test_median_and_trimmed_mean_per_key_reject_the_outlier_that_drags_the_mean():
    updates = synthetic_updates()
    med, trim = coordinate_median(updates), trimmed_mean(updates, 0.2)
    assert set(med) == set(trim) == {BACKBONE, HEAD_A, HEAD_B}
    for key in med:
        values = senders(updates, key)  # only the clients that sent the key
        n = len(values)
        b = min(math.ceil(0.2 * n), (n - 1) // 2)  # 7 senders: 2 cut each end; 4 senders: 1
        np.testing.assert_allclose(med[key], np.median(values, axis=0), rtol=1e-6, err_msg=key)
        by_hand = np.array([sorted(column)[b : n - b] for column in values.reshape(n, -1).T]).mean(axis=1).reshape(values.shape[1:])
        np.testing.assert_allclose(trim[key], by_hand, rtol=1e-6, err_msg=key)
        assert med[key].dtype == trim[key].dtype == np.float32
        low, high = honest_range(updates, key)
        assert np.all((low <= med[key]) & (med[key] <= high)) and np.all((low <= trim[key]) & (trim[key] <= high)), key
    dragged = UpdateList()
    for u in updates:
        dragged.add(ClientUpdate(delta=u, weight=1.0))
    assert np.abs(dragged.mean()[BACKBONE] - 0.1).min() > 10  # the plain mean follows the outlier (≈ 150/7)
    assert np.abs(dragged.mean()[HEAD_B] - 0.3).max() < 0.05  # a head the outlier did not send is untouched


def test_krum_scores_picks_and_fallback_match_a_hand_computation():
    updates = synthetic_updates()
    n, f = len(updates), 2
    flat = [u[BACKBONE].astype(np.float64).ravel() for u in updates]  # the only key every update sent
    by_hand = []
    for i in range(n):
        dists = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        by_hand.append(sum(dists[: n - f - 2]))
    np.testing.assert_allclose(krum_scores(updates, f), by_hand, rtol=1e-9)

    best = int(np.argmin(by_hand))
    assert best != 0 and krum_select(updates, f, 1) == [best]
    one = krum(updates, f, select=1)
    np.testing.assert_array_equal(one[BACKBONE], updates[best][BACKBONE])
    picked_head = HEAD_A if HEAD_A in updates[best] else HEAD_B
    np.testing.assert_array_equal(one[picked_head], updates[best][picked_head])
    if best != 3:  # the head the picked client does not hold: the median of the clients that sent it
        other = HEAD_B if picked_head == HEAD_A else HEAD_A
        np.testing.assert_allclose(one[other], np.median(senders(updates, other), axis=0), rtol=1e-6)

    m = 4
    chosen = sorted(np.argsort(by_hand, kind="stable")[:m].tolist())
    assert 0 not in chosen and krum_select(updates, f, m) == chosen
    multi = krum(updates, f, select=m)
    for key in (BACKBONE, HEAD_A, HEAD_B):  # mean over the picked clients that sent the key
        mine = [updates[i][key] for i in chosen if key in updates[i]]
        expected = np.mean(mine, axis=0) if mine else np.median(senders(updates, key), axis=0)
        np.testing.assert_allclose(multi[key], expected, rtol=1e-6, err_msg=key)


def layouts(updates):
    """The same updates folded as workers would: different orders and splits, merged at the server."""
    n = len(updates)
    for order in (list(range(n)), list(reversed(range(n))), [3, 0, 5, 1, 6, 2, 4][:n] if n == 7 else list(range(n))[::2] + list(range(n))[1::2]):
        for cut in (1, n // 2, n - 1):
            parts = [UpdateList(), UpdateList()]
            for pos, i in enumerate(order):
                parts[pos >= cut].add(ClientUpdate(delta=updates[i], weight=float(i + 1)))
            merged = UpdateList()
            for part in parts[::-1] if cut % 2 else parts:
                merged.merge(part)
            yield merged


@pytest.mark.parametrize("name, params", [("median", {}), ("trimmed_mean", {"trim": 0.2}), ("krum", {"byzantine": 1, "select": 1}), ("krum", {"byzantine": 1, "select": 3})])
def test_aggregation_does_not_depend_on_order_or_worker_layout(name, params):
    method = build_method(name, params)
    state = ServerState(weights={BACKBONE: np.zeros((4, 3), np.float32), HEAD_A: np.zeros(5, np.float32), HEAD_B: np.zeros(5, np.float32)})
    results = [method.aggregate(state, merged).weights for merged in layouts(synthetic_updates(1))]
    assert all(r.keys() == results[0].keys() and all(np.array_equal(r[k], results[0][k]) for k in r) for r in results)

    # Krum's tie: -1 and +1 score the same (5); the pick is the same whatever the layout.
    tie = [{"x": np.array([v], np.float32)} for v in (-2.0, -1.0, 1.0, 2.0, 10.0)]
    np.testing.assert_allclose(krum_scores(tie, 1), [10, 5, 5, 10, 145])
    picks = {float(build_method("krum", {"byzantine": 1}).aggregate(ServerState(weights={"x": np.zeros(1, np.float32)}), m).weights["x"][0]) for m in layouts(tie)}
    assert len(picks) == 1 and picks <= {-1.0, 1.0}


def test_the_server_step_ignores_aggregation_weights_and_uses_the_server_lr():
    updates = synthetic_updates()
    method = build_method("median", {"server_lr": 0.5})
    weights = {BACKBONE: np.ones((4, 3), np.float32), HEAD_A: np.ones(5, np.float32), HEAD_B: np.ones(5, np.float32), "unsent": np.full(2, 7, np.float32)}
    acc = method.new_accumulator()
    for k, u in enumerate(updates):
        acc.add(ClientUpdate(delta=u, weight=1e6 if k == 0 else 1.0))  # the outlier claims a million examples
    assert acc.count == 7
    after = method.aggregate(ServerState(weights=weights, round=3), acc)
    med = coordinate_median(updates)
    for key in med:
        np.testing.assert_allclose(after.weights[key], weights[key] + 0.5 * med[key], rtol=1e-6)
        assert after.weights[key].dtype == np.float32
    assert np.array_equal(after.weights["unsent"], weights["unsent"]) and after.round == 3


# ---------------------------------------------------------------------------------------------------
# Config checks


def refused(data_dir, tmp_path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        small_config(data_dir, tmp_path, *overrides)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_impossible_settings_are_refused_in_one_line(data_dir, tmp_path):
    # small_config samples max(1, round(0.5·6)) = 3 clients per round
    assert "2f+2=4" in refused(data_dir, tmp_path, "strategy.name=krum") and "got 3" in refused(data_dir, tmp_path, "strategy.name=krum")
    ten = ("clients.num=10", "clients.fraction=1.0")
    assert "n−f=7" in refused(data_dir, tmp_path, *ten, "strategy.name=krum", "strategy.byzantine=3", "strategy.select=8")
    assert small_config(data_dir, tmp_path, *ten, "strategy.name=krum", "strategy.byzantine=3", "strategy.select=7").strategy.params["select"] == 7
    assert "leaving none" in refused(data_dir, tmp_path, *ten, "strategy.name=trimmed_mean", "strategy.trim=0.45")
    assert small_config(data_dir, tmp_path, *ten, "strategy.name=trimmed_mean", "strategy.trim=0.4").strategy.params == {"server_lr": 1.0, "weighting": "uniform", "max_updates_gb": 16.0, "trim": 0.4}
    assert "strategy.trim" in refused(data_dir, tmp_path, "strategy.name=trimmed_mean", "strategy.trim=0.5")
    assert "leaving none" in refused(data_dir, tmp_path, "strategy.name=trimmed_mean", "strategy.trim=0.34")  # ⌈1.02⌉ = 2 of 3
    assert small_config(data_dir, tmp_path, "strategy.name=trimmed_mean").strategy.params["trim"] == 0.1  # ⌈0.3⌉ = 1 of 3: one left
    assert "unknown key strategy.f" in refused(data_dir, tmp_path, "strategy.name=krum", "strategy.f=1")


# ---------------------------------------------------------------------------------------------------
# The engine's attacks (raymed/engine/faults.py)


def plan(seed: int = 0, num: int = 20, **byzantine) -> FaultPlan:
    return FaultPlan(validate_config({"seed": seed, "clients": {"num": num}, "faults": {"byzantine": byzantine}}))


def test_the_byzantine_clients_are_a_seeded_fraction():
    attackers = plan(seed=5, fraction=0.3).byzantine
    assert len(attackers) == 6 and attackers <= set(range(20))
    assert plan(seed=5, fraction=0.3).byzantine == attackers  # same seed, same attackers
    assert plan(seed=6, fraction=0.3).byzantine != attackers
    assert plan(seed=5, fraction=0.0).byzantine == frozenset() and len(plan(num=6, fraction=0.34).byzantine) == 2


def test_poison_sign_flip_scale_and_noise():
    delta = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32)}
    p = plan(seed=1, fraction=0.5, attack="sign_flip")
    bad, good = min(p.byzantine), min(set(range(20)) - p.byzantine)
    assert p.poison(delta, good, 1) is delta  # an honest client's update is untouched
    np.testing.assert_array_equal(p.poison(delta, bad, 1)["a"], -delta["a"])  # default scale 1
    flipped = plan(seed=1, fraction=0.5, attack="sign_flip", scale=10).poison(delta, bad, 1)
    np.testing.assert_allclose(flipped["a"], -10 * delta["a"])
    np.testing.assert_allclose(flipped["b"], -10 * delta["b"])
    np.testing.assert_allclose(plan(seed=1, fraction=0.5, attack="scale").poison(delta, bad, 1)["a"], 10 * delta["a"])  # default 10
    np.testing.assert_allclose(plan(seed=1, fraction=0.5, attack="scale", scale=-20).poison(delta, bad, 1)["a"], -20 * delta["a"])

    noisy = plan(seed=1, fraction=0.5, attack="noise", scale=2.0)
    big = {"w": np.zeros((100, 100), np.float32)}
    first = noisy.poison(big, bad, 1)["w"]
    assert first.dtype == np.float32 and first.shape == (100, 100)
    assert abs(first.std() - 2.0) < 0.05 and abs(first.mean()) < 0.05  # N(0, scale²), whatever the honest update
    np.testing.assert_array_equal(noisy.poison({"w": np.ones((100, 100), np.float32)}, bad, 1)["w"], first)  # seeded by (seed, round, client)
    assert not np.array_equal(noisy.poison(big, bad, 2)["w"], first)  # a new draw every round

    labels = plan(seed=1, fraction=0.5, attack="label_flip")
    assert labels.poison(delta, bad, 1) is delta  # poisons the data, not the update
    assert labels.label_transform(bad) is flip_labels and labels.label_transform(good) is None
    assert p.label_transform(bad) is None


def test_flip_labels_by_task_kind():
    def task(kind, classes):
        return TaskSpec(dataset="x", kind=kind, num_classes=classes, channels=1, spatial_dims=2)

    np.testing.assert_array_equal(flip_labels(task("binary", 2), np.array([[0], [1], [1]])), [[1], [0], [0]])
    np.testing.assert_array_equal(flip_labels(task("ordinal", 5), np.array([[0], [2], [4], [1]])), [[4], [2], [0], [3]])
    np.testing.assert_array_equal(flip_labels(task("multiclass", 9), np.array([[8], [3]])), [[0], [5]])
    np.testing.assert_array_equal(flip_labels(task("multilabel", 3), np.array([[1, 0, 1]])), [[0, 1, 0]])
    assert flip_labels(task("binary", 2), np.array([[1]], dtype=np.uint8)).dtype == np.uint8
    with pytest.raises(RaymedError, match="label_flip needs class labels"):
        flip_labels(task("report", 0), np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------------
# A federation under attack, on Ray


def test_median_withstands_a_scaling_attack_that_wrecks_fedavg(data_dir, tmp_path, ray_session):
    """6 clients, each holding both datasets (IID), all sampled; 2 of them (round(0.34·6)) send
    −20·Δ. FedAvg's mean update then points backwards, 6× too long; the median stays in the honest range."""
    from safetensors.numpy import load_file

    from raymed.engine import run_experiment
    from raymed.results import read_run

    # One worker: a process fewer to start per run (the rules do not depend on the layout; see above).
    base = ("data.partition=iid", "clients.fraction=1.0", "eval.personalised=false", "eval.every=2", "engine.checkpoint_every=0", "engine.num_workers=1")
    attack = ("faults.byzantine.fraction=0.34", "faults.byzantine.attack=scale", "faults.byzantine.scale=-20")
    runs = {}
    for name, extra in (("median_clean", ("strategy.name=median",)), ("median_attacked", ("strategy.name=median", *attack)),
                        ("fedavg_attacked", ("strategy.name=fedavg", *attack))):
        cfg = small_config(data_dir, tmp_path, *base, *extra, f"name={name}")
        folder = run_experiment(cfg)
        runs[name] = (read_run(folder), load_file(str(folder / "model.safetensors")), folder, cfg)

    # The clients table marks exactly the seeded attackers, in every round.
    _, _, folder, cfg = runs["fedavg_attacked"]
    clients = pq.read_table(folder / "clients").to_pandas()
    attackers = FaultPlan(cfg).byzantine
    assert len(attackers) == 2 and set(clients.loc[clients["byzantine"], "client_id"]) == attackers
    assert clients.groupby("round")["byzantine"].sum().tolist() == [2, 2]
    assert not pq.read_table(runs["median_clean"][2] / "clients").to_pandas()["byzantine"].any()

    from raymed.data.shards import ShardSet, materialise
    from raymed.engine.worker import float_state
    from raymed.models import build_model

    initial = float_state(build_model(cfg.model.name, ShardSet(materialise(cfg)).tasks, cfg.seed))

    def distance(a, b) -> float:
        return float(np.sqrt(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in a)))

    clean = runs["median_clean"][1]
    moved = distance(clean, initial)  # how far two clean rounds take the model
    assert moved > 0
    assert distance(runs["median_attacked"][1], clean) < 0.7 * moved  # the median stays near the clean run
    assert distance(runs["fedavg_attacked"][1], initial) > 5 * moved  # FedAvg is thrown far away

    acc = {name: run["rounds"]["global/mean/acc"].dropna().iloc[-1] for name, (run, _, _, _) in runs.items()}
    # In accuracy: FedAvg falls well below the attacked median, which stays nearer the clean run (the
    # median of 6 with 2 attackers on one side is a lower honest value: shifted, never dragged out).
    assert acc["fedavg_attacked"] < acc["median_attacked"] - 0.1, acc
    assert abs(acc["median_attacked"] - acc["median_clean"]) < abs(acc["fedavg_attacked"] - acc["median_clean"]), acc
    assert np.isfinite(runs["median_attacked"][0]["rounds"]["train/loss"]).all()



def test_chunked_rules_equal_numpy_on_the_whole_stack(monkeypatch):
    """Median, trimmed mean and Krum's distances computed chunk by chunk (a few coordinates at a time)
    equal numpy on the whole n × P float64 stack."""
    from raymed.methods import robust

    rng = np.random.default_rng(7)
    updates = [{"w": rng.normal(size=(13, 7)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)} for _ in range(9)]
    stack = {k: np.stack([u[k] for u in updates]).astype(np.float64) for k in ("w", "b")}
    whole = {"median": coordinate_median(updates), "trimmed": trimmed_mean(updates, 0.2), "krum": krum_scores(updates, 2)}
    monkeypatch.setattr(robust, "CHUNK_BYTES", 8 * 9 * 3)  # three coordinates per chunk
    assert len(list(robust.chunks([u["w"] for u in updates]))) == math.ceil(13 * 7 / 3)
    for key in ("w", "b"):
        np.testing.assert_array_equal(coordinate_median(updates)[key], np.median(stack[key], axis=0).astype(np.float32))
        np.testing.assert_array_equal(coordinate_median(updates)[key], whole["median"][key])
        np.testing.assert_allclose(trimmed_mean(updates, 0.2)[key], whole["trimmed"][key], rtol=1e-6)
    np.testing.assert_allclose(krum_scores(updates, 2), whole["krum"], rtol=1e-12)


def test_a_round_whose_updates_cannot_fit_is_refused_before_training(data_dir, tmp_path):
    import torch

    cfg = small_config(data_dir, tmp_path, "strategy.name=median", "strategy.max_updates_gb=0.0001")
    method = build_method("median", cfg.strategy.params)
    model = torch.nn.Linear(1000, 100)  # 0.1 M parameters × 3 clients × 4 bytes = 1.2 MB
    with pytest.raises(ConfigError, match="3 clients × 0.1 M parameters .* > strategy.max_updates_gb=0.0001"):
        method.check_model(cfg, model)
    build_method("median", {**cfg.strategy.params, "max_updates_gb": 1.0}).check_model(cfg, model)
