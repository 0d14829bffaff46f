"""Server optimisers (FedAvgM; FedAdam, FedYogi, FedAdagrad): each server step against a hand
computation on a two-client toy, over two rounds so that the state carried between rounds counts."""

from __future__ import annotations

import numpy as np
import pytest

from raymed.engine.checkpoint import load_tree, save_tree
from raymed.methods import METHODS, ClientUpdate, ServerState, build_method


def two_clients(round_: int) -> list[ClientUpdate]:
    """Two clients, weights 1 and 3 (uniform weighting ignores them; here ``examples``), both send
    ``p``; only the first sends ``head`` (the other holds no such dataset)."""
    a = np.array([0.2, -0.4, 0.0], np.float32) * round_
    b = np.array([-0.1, 0.1, 0.3], np.float32)
    return [
        ClientUpdate(delta={"p": a, "head": np.array([1.0], np.float32)}, weight=1.0),
        ClientUpdate(delta={"p": b}, weight=3.0),
    ]


def server_rounds(name: str, params: dict, rounds: int = 2) -> list[ServerState]:
    method = build_method(name, {"weighting": "examples", **params})
    state = method.init_state({"p": np.array([1.0, 2.0, 3.0], np.float32), "head": np.array([0.5], np.float32),
                               "counter": np.array(4, np.int64)})
    states = []
    for r in range(1, rounds + 1):
        acc = method.new_accumulator()
        for update in two_clients(r):
            acc.add(update)
        state = method.aggregate(state, acc)
        states.append(state)
    return states


def mean_update(round_: int) -> dict[str, np.ndarray]:
    a, b = two_clients(round_)
    return {"p": (1.0 * a.delta["p"] + 3.0 * b.delta["p"]) / 4.0, "head": np.array([1.0], np.float32)}


def test_fedavgm_accumulates_a_server_velocity():
    beta, eta = 0.9, 0.5
    s1, s2 = server_rounds("fedavgm", {"server_momentum": beta, "server_lr": eta})
    u1 = mean_update(1)["p"]
    u2 = beta * u1 + mean_update(2)["p"]
    np.testing.assert_allclose(s1.weights["p"], np.array([1.0, 2.0, 3.0]) + eta * u1, rtol=1e-6)
    np.testing.assert_allclose(s2.weights["p"], s1.weights["p"] + eta * u2, rtol=1e-6)
    np.testing.assert_allclose(s2.extra["velocity"]["p"], u2, rtol=1e-5, atol=1e-7)
    # momentum 0 and η = 1 is FedAvg
    plain = server_rounds("fedavgm", {"server_momentum": 0.0, "server_lr": 1.0})[1]
    fedavg = server_rounds("fedavg", {})[1]
    np.testing.assert_allclose(plain.weights["p"], fedavg.weights["p"], rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_steps_follow_the_paper(name):
    b1, b2, eta, tau = 0.9, 0.99, 0.1, 1e-3
    states = server_rounds(name, {"beta1": b1, "beta2": b2, "server_lr": eta, "tau": tau})
    w = {"p": np.array([1.0, 2.0, 3.0]), "head": np.array([0.5])}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.full_like(x, tau**2) for k, x in w.items()}
    for r, state in enumerate(states, start=1):
        for key, delta in mean_update(r).items():
            delta = delta.astype(np.float64)
            m[key] = b1 * m[key] + (1 - b1) * delta
            if name == "fedadagrad":
                v[key] = v[key] + delta**2
            elif name == "fedyogi":
                v[key] = v[key] - (1 - b2) * delta**2 * np.sign(v[key] - delta**2)
            else:
                v[key] = b2 * v[key] + (1 - b2) * delta**2
            w[key] = w[key] + eta * m[key] / (np.sqrt(v[key]) + tau)
            np.testing.assert_allclose(state.weights[key], w[key], rtol=1e-5)
            np.testing.assert_allclose(state.extra["v"][key], v[key], rtol=1e-5)
        assert state.weights["counter"] == 4  # an integer entry no client sent is untouched
    # the three rules differ on the same updates
    finals = {n: server_rounds(n, {})[1].weights["p"] for n in ("fedadam", "fedyogi", "fedadagrad")}
    assert not np.allclose(finals["fedadam"], finals["fedadagrad"]) and not np.allclose(finals["fedadam"], finals["fedyogi"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimiser_state_survives_a_checkpoint(name, tmp_path):
    """The moments are plain arrays in ServerState.extra: the checkpoint file restores them
    exactly, and a step from the restored state equals one from the original."""
    state = server_rounds(name, {})[0]
    restored = load_tree(save_tree(tmp_path / "state.safetensors", state))
    method = build_method(name, {"weighting": "examples"})
    acc_a, acc_b = method.new_accumulator(), method.new_accumulator()
    for update in two_clients(2):
        acc_a.add(update)
        acc_b.add(update)
    a, b = method.aggregate(state, acc_a), method.aggregate(restored, acc_b)
    for key in a.weights:
        assert np.array_equal(a.weights[key], b.weights[key])


def test_the_strategies_are_registered_and_a_typo_suggests_them():
    from raymed.errors import ConfigError
    from raymed.experiment import load_config

    assert {"fedavgm", "fedadam", "fedyogi", "fedadagrad"} <= set(METHODS)
    with pytest.raises(ConfigError, match="did you mean fedadam"):
        load_config(None, ["strategy.name=fedadamm"])
    assert load_config(None, ["strategy.name=fedyogi", "strategy.tau=0.01"]).strategy.params["tau"] == 0.01


def test_a_resumed_fedadam_run_ends_exactly_where_an_uninterrupted_one_does(data_dir, tmp_path, ray_session):
    """Real Ray actors: the server's moments go into the checkpoint and come back on resume."""
    from tests.conftest import small_config

    stopped_after_two_rounds_and_resumed(small_config(data_dir, tmp_path, "strategy.name=fedadam", "rounds=3", "strategy.server_lr=0.02"))


def stopped_after_two_rounds_and_resumed(cfg):
    """Run ``cfg`` (3 rounds) whole, then again stopped after round 2 and resumed; the two must
    give the same rounds (wall-clock columns aside). Returns the resumed run's folder."""
    import pandas as pd
    import pyarrow.parquet as pq

    from raymed.engine import Federation, run_experiment
    from raymed.engine.federation import resume_experiment

    whole = run_experiment(cfg)
    federation = Federation(cfg)
    with pytest.raises(KeyboardInterrupt), federation:
        federation.start()
        federation.step()
        federation.step()
        raise KeyboardInterrupt
    stopped = federation.run_dir
    resume_experiment(stopped)
    resumed, uninterrupted = (pq.read_table(d / "rounds.parquet").to_pandas() for d in (stopped, whole))
    timing = [c for c in resumed.columns if c.startswith(("time/", "memory/"))]  # wall clock, not results
    assert len(resumed) == 3 and (resumed["comm/bytes_down"] > 0).all()
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), uninterrupted.drop(columns=timing), check_exact=True)
    return stopped


def test_fedbn_keeps_every_normalisation_layer_and_its_statistics_on_the_client(data_dir, tmp_path):
    import torch

    from raymed.errors import ConfigError
    from tests.conftest import prepared_method, small_config

    cfg = small_config(data_dir, tmp_path, "strategy.name=fedbn", "model.name=cnn_bn", "data.max_train_per_dataset=60")
    _, method, model, state, _, context = prepared_method(cfg)
    norm = {k for k in model.state_dict() if ".norm1." in k}
    assert method.local_keys == norm and {k.rsplit(".", 1)[1] for k in norm} >= {"weight", "bias", "running_mean", "running_var"}
    assert not norm & set(state.weights) and any(k.startswith("heads.") for k in state.weights)  # heads are shared, unlike FedPer

    update = method.client_update(context(0), method.broadcast(state))
    assert set(update.delta) and not norm & set(update.delta)  # nothing of a norm layer goes up
    assert set(update.state) == norm & set(context(0).trained_keys)  # all of it stays, statistics included
    assert not np.array_equal(update.state["backbone.body.block1.norm1.running_mean"], np.zeros_like(update.state["backbone.body.block1.norm1.running_mean"]))

    # the next round starts from the client's own statistics, not the server's (it has none)
    ctx = context(0)
    ctx.state = update.state
    method.load_personalised(ctx, method.broadcast(state))
    loaded = ctx.model.state_dict()["backbone.body.block1.norm1.running_mean"]
    assert torch.equal(loaded, torch.as_tensor(update.state["backbone.body.block1.norm1.running_mean"]))

    # a model without normalisation layers is refused in one line
    plain = small_config(data_dir, tmp_path, "strategy.name=fedbn", "model.name=cnn")
    _, m, model, *_ = prepared_method(plain)
    with pytest.raises(ConfigError, match="no normalisation layers"):
        m.check_model(plain, model)


def test_a_fedbn_federation_runs_on_ray_and_a_plain_cnn_is_refused_before_training(data_dir, tmp_path, ray_session):
    import pyarrow.parquet as pq

    from raymed.engine import run_experiment
    from raymed.errors import ConfigError
    from tests.conftest import small_config

    run_dir = run_experiment(small_config(data_dir, tmp_path, "strategy.name=fedbn", "model.name=cnn_bn", "rounds=2"))
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    assert rounds["personal/client_mean/acc"].notna().all() and (rounds["comm/bytes_up"] > 0).all()
    with pytest.raises(ConfigError, match="fedbn: model cnn has no normalisation layers"):
        run_experiment(small_config(data_dir, tmp_path, "strategy.name=fedbn", "model.name=cnn", "rounds=1"))


def test_strategies_side_by_side_see_the_same_federation(data_dir, tmp_path):
    """``raymed run CONFIG --strategies a,b,c``: one run per strategy on the same partition, schedule
    and seed, one comparison table and plot; a typo anywhere is refused before anything runs."""
    import pyarrow.parquet as pq
    import yaml

    from tests.conftest import small_config
    from tests.test_cli import _assert_one_line_error, _write_config, raymed

    path = _write_config(tmp_path, small_config(data_dir, tmp_path, "rounds=2").to_dict())
    _assert_one_line_error(raymed("run", path, "--strategies", "fedavg,fedadamm"), "did you mean fedadam")
    assert not (tmp_path / "results").exists()
    proc = raymed("run", path, "--strategies", "fedavg,fedadam,ditto", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {yaml.safe_load((d / "config.yaml").read_text())["strategy"]["name"]: d for d in (tmp_path / "results").iterdir() if (d / "rounds.parquet").is_file()}
    assert set(runs) == {"fedavg", "fedadam", "ditto"}
    # the same clients, with the same rows, in the same rounds: sampling and partition do not depend on the strategy
    clients = {name: pq.read_table(d / "clients").to_pandas().sort_values(["round", "client_id"])[["round", "client_id", "num_train"]].reset_index(drop=True)
               for name, d in runs.items()}
    assert all(c.equals(clients["fedavg"]) for c in clients.values())
    from safetensors.numpy import load_file

    models = {name: load_file(str(d / "model.safetensors")) for name, d in runs.items()}
    assert not all(np.array_equal(models["fedavg"][k], models["fedadam"][k]) for k in models["fedavg"])  # the server step differs, so the models do
    assert (tmp_path / "results" / "comparison.png").is_file() and all(name in proc.stdout for name in runs)
    ditto = pq.read_table(runs["ditto"] / "rounds.parquet").to_pandas()
    assert ditto["personal/client_mean/acc"].notna().all() and ditto["global/mean/acc"].notna().all()  # v_k and w both evaluated


def test_scaffold_control_variates_follow_option_two_and_move_only_for_sampled_clients(data_dir, tmp_path):
    import torch

    from tests.conftest import prepared_method, small_config

    cfg = small_config(data_dir, tmp_path, "strategy.name=scaffold", "data.max_train_per_dataset=60", "clients.local_steps=3",
                       "clients.momentum=0.0", "clients.weight_decay=0.0")
    _, method, model, state, shards, context = prepared_method(cfg)
    method = build_method("scaffold", {**cfg.strategy.params, "num_clients": shards.num_clients})
    state = method.init_state(state.weights)
    # a nonzero server control variate, so the correction has something to do
    rng = np.random.default_rng(0)
    state.extra["control"] = {k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in state.weights.items()}
    payload = method.broadcast(state)
    ctx = context(0)
    update = method.client_update(ctx, payload)
    params = [k for k, _ in ctx.model.named_parameters() if k in ctx.trained_keys]
    lr, steps = ctx.lr, 3
    for k in params:  # c_k⁺ = c_k − c + (x − y)/(Kη) with c_k = 0, and Δc_k = c_k⁺ − c_k
        expected = -payload["scaffold.c." + k] - update.delta[k] / (steps * lr)
        np.testing.assert_allclose(update.state[k], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(update.delta["scaffold.c." + k], expected, rtol=1e-4, atol=1e-6)

    # under momentum β the step per unit gradient is η/(1 − β): option II divides by it
    heavy = small_config(data_dir, tmp_path, "strategy.name=scaffold", "data.max_train_per_dataset=60", "clients.local_steps=3",
                         "clients.momentum=0.9", "clients.weight_decay=0.0")
    *_, heavy_context = prepared_method(heavy)
    moved = method.client_update(heavy_context(0), payload)
    k = params[0]
    np.testing.assert_allclose(moved.state[k], -payload["scaffold.c." + k] - (1 - 0.9) * moved.delta[k] / (steps * lr), rtol=1e-4, atol=1e-6)

    # the correction changes the local steps: with c = c_k the update is plain SGD's
    plain = build_method("fedavg", {"weighting": "uniform"}).client_update(context(0), state.weights)
    ctx_same = context(0)
    ctx_same.state = {k: payload["scaffold.c." + k] for k in params}
    same = method.client_update(ctx_same, payload)
    assert all(np.allclose(same.delta[k], plain.delta[k], atol=1e-6) for k in params)
    assert not all(np.allclose(update.delta[k], plain.delta[k], atol=1e-6) for k in params)

    # server: x += mean Δy; c += (|S|/N) mean Δc, over two sampled clients of N
    acc = method.new_accumulator()
    second = method.client_update(context(1), payload)
    acc.add(update)
    acc.add(second)
    new = method.aggregate(state, acc)
    k = params[0]
    both = [u for u in (update, second) if k in u.delta]
    np.testing.assert_allclose(new.weights[k], state.weights[k] + np.mean([u.delta[k] for u in both], axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.extra["control"][k], state.extra["control"][k] + len(both) / shards.num_clients * np.mean(
        [u.delta["scaffold.c." + k] for u in both], axis=0), rtol=1e-5, atol=1e-7)
    assert torch.is_tensor(torch.as_tensor(new.weights[k]))


def test_a_resumed_scaffold_run_on_the_disk_client_state_backend_equals_an_uninterrupted_one(data_dir, tmp_path, ray_session):
    from tests.conftest import small_config

    cfg = small_config(data_dir, tmp_path, "strategy.name=scaffold", "rounds=3", "clients.local_steps=4", "engine.client_state=disk")
    stopped = stopped_after_two_rounds_and_resumed(cfg)
    assert list((stopped / "client_state").glob("*.safetensors"))  # the clients' c_k, on disk


def test_ditto_trains_the_global_model_as_fedavg_and_a_personal_one_pulled_towards_it(data_dir, tmp_path):
    from tests.conftest import prepared_method, small_config

    cfg = small_config(data_dir, tmp_path, "strategy.name=ditto", "data.max_train_per_dataset=60", "clients.local_steps=4")
    _, method, model, state, _, context = prepared_method(cfg)
    fedavg = build_method("fedavg", {"weighting": cfg.strategy.params["weighting"]})
    update = method.client_update(context(0), state.weights)
    reference = fedavg.client_update(context(0), state.weights)
    assert update.delta.keys() == reference.delta.keys()
    assert all(np.array_equal(update.delta[k], reference.delta[k]) for k in update.delta)  # the global half is FedAvg's, bit for bit
    assert set(update.state) == set(context(0).trained_keys) and "personal_loss" in update.metrics  # v_k stays on the client

    def distance(lam: float) -> float:
        m = build_method("ditto", {**cfg.strategy.params, "lam": lam})
        v = m.client_update(context(0), state.weights).state
        return float(sum(np.sum((v[k] - state.weights[k]) ** 2) for k in v if k in state.weights and v[k].dtype.kind == "f"))

    far, near, nearer = distance(0.0), distance(1.0), distance(10.0)
    assert far > near > nearer  # λ's pull reaches the personal model's gradient

    # evaluation reads v_k; the next round starts the personal model from it
    ctx = context(0)
    ctx.state = update.state
    method.load_personalised(ctx, state.weights)
    key = next(k for k in update.state if k.startswith("backbone.") and update.state[k].dtype.kind == "f")
    assert np.array_equal(ctx.model.state_dict()[key].numpy(), update.state[key])

    from raymed.errors import ConfigError

    with pytest.raises(ConfigError, match="lr × lam"):  # the pull is an explicit step: lr·λ ≥ 2 diverges
        small_config(data_dir, tmp_path, "strategy.name=ditto", "strategy.lam=100")
