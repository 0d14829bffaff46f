"""The evaluation protocol: validation splits, selection on validation, baselines, the training
recipe's parts (ordinal loss, class weights, augmentation, schedule), centralised training, and
bit-identical deterministic runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from raymed.experiment import load_config
from raymed.data.augment import POLICIES, Policy, augment, policy_for
from raymed.data.shards import ShardSet, materialise
from raymed.data.tasks import TaskSpec
from raymed.engine import run_experiment
from raymed.errors import ConfigError
from raymed.methods.base import local_optimizer, local_sgd, trained_parameters
from raymed.methods.central import load_optimizer_state, optimizer_state
from raymed.results import read_run
from raymed.results.baselines import at_or_below, baseline_metrics, compute_baselines
from raymed.results.selection import Selection
from tests.conftest import prepared_method, small_config

# ---------------------------------------------------------------------------------------------------
# Loss and recipe


def test_ordinal_switch_changes_the_loss_and_ce_is_torch_cross_entropy():
    logits5 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    grades = torch.tensor([[0], [1], [2], [3], [4], [2]])
    ce = TaskSpec("retinamnist", "ordinal", 5, 3, 2, ordinal_loss="ce")
    assert ce.num_outputs == 5
    assert torch.equal(ce.loss(logits5, grades), F.cross_entropy(logits5, grades[:, 0]))
    assert list(ce.predict(ce.scores(logits5))) == list(logits5.argmax(1).numpy())

    cumulative = TaskSpec("retinamnist", "ordinal", 5, 3, 2, ordinal_loss="cumulative")
    assert cumulative.num_outputs == 4
    logits4 = logits5[:, :4]
    thresholds = (grades > torch.arange(4)).float()
    assert torch.allclose(cumulative.loss(logits4, grades), F.binary_cross_entropy_with_logits(logits4, thresholds))
    assert not torch.allclose(cumulative.loss(logits4, grades), ce.loss(logits5, grades))
    assert load_config(None).task.ordinal_loss == "ce"  # the literature's loss by default


def test_balanced_class_weights_are_n_over_c_times_class_count():
    task = TaskSpec("breastmnist", "binary", 2, 1, 2).balanced(np.array([[0]] * 6 + [[1]] * 2))
    assert task.class_weights == pytest.approx((8 / (2 * 6), 8 / (2 * 2)))
    logits, y = torch.randn(8, 2), torch.tensor([[0]] * 6 + [[1]] * 2)
    assert torch.allclose(task.loss(logits, y), F.cross_entropy(logits, y[:, 0], weight=torch.tensor([8 / 12, 8 / 4])))
    multilabel = TaskSpec("chestmnist", "multilabel", 3, 1, 2)
    assert multilabel.balanced(np.ones((4, 3))) == multilabel  # no class weights where they do not apply


def test_lr_schedule_across_rounds():
    cosine = load_config(None, ["clients.lr_schedule=cosine", "clients.lr=0.1"]).clients
    assert cosine.lr_at(1, 10) == pytest.approx(0.1)
    assert cosine.lr_at(6, 10) == pytest.approx(0.05)
    assert all(cosine.lr_at(r, 10) > cosine.lr_at(r + 1, 10) > 0 for r in range(1, 10))
    step = load_config(None, ["clients.lr_schedule=step", "clients.lr=0.1"]).clients
    assert [round(step.lr_at(r, 8), 6) for r in range(1, 9)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    constant = load_config(None, ["clients.lr_schedule=constant"]).clients
    assert constant.lr_at(7, 10) == constant.lr


def test_augmentation_keeps_anatomy_sides_and_is_seeded():
    assert not any((policy_for(f).hflip or policy_for(f).vflip) for f in ("pneumoniamnist", "chestmnist", "organamnist"))
    assert policy_for("pathmnist").rot90 and policy_for("breastmnist").hflip and not policy_for("breastmnist").vflip
    assert policy_for("vqarad_head") is None and policy_for("adrenalmnist3d") is None
    x = torch.randn(16, 1, 28, 28)
    a = augment(x, POLICIES["pneumoniamnist"], np.random.default_rng(1))
    b = augment(x, POLICIES["pneumoniamnist"], np.random.default_rng(1))
    assert torch.equal(a, b) and not torch.equal(a, x)  # same stream, same batch; and it changes the images
    # A flip-only policy flips some images exactly and leaves the others untouched.
    flipped = augment(x, Policy(hflip=True), np.random.default_rng(0))
    same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    mirrored = [torch.equal(f, o.flip(2)) for f, o in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_generic_augmentation_keeps_shapes_and_labels_in_2d_and_3d_and_follows_the_switch(data_dir, tmp_path):
    from raymed.experiment import load_config
    from raymed.data.augment import GENERIC

    rng = np.random.default_rng(0)
    for shape in ((6, 1, 28, 28), (6, 3, 28, 28), (4, 1, 16, 28, 28)):
        x = torch.rand(*shape) * 2 - 1
        y = augment(x, GENERIC, np.random.default_rng(3))
        assert y.shape == x.shape and y.dtype == x.dtype and not y.equal(x) and y.abs().max() <= 1 + 1e-6
        assert y.equal(augment(x, GENERIC, np.random.default_rng(3)))  # seeded
    mirrored = augment(torch.arange(8.0).view(1, 1, 1, 2, 4), Policy(hflip=True), rng)
    assert mirrored.flatten().tolist() in ([0, 1, 2, 3, 4, 5, 6, 7], [3, 2, 1, 0, 7, 6, 5, 4])  # within each slice
    assert policy_for("pneumoniamnist") == POLICIES["pneumoniamnist"] and policy_for("my_scans") == GENERIC
    assert policy_for("adrenalmnist3d") is None and policy_for("adrenalmnist3d", "generic") == GENERIC
    assert policy_for("pneumoniamnist", "generic") == GENERIC and policy_for("my_scans", "none") is None
    assert [load_config(None, [f"data.augment={v}"]).data.augment for v in ("true", "false", "generic")] == ["medmnist", "none", "generic"]
    # labels ride along untouched: the batch's rows are the same rows, augmented or not
    cfg = small_config(data_dir, tmp_path, "data.max_train_per_dataset=60", "data.augment=generic")
    _, _, _, _, _, context = prepared_method(cfg)
    ctx = context(0)
    with_aug = [(flag, y) for flag, _, y in ctx.batches()]
    ctx.augment, ctx._rng = "none", None
    assert [(flag, y.tolist()) for flag, _, y in ctx.batches()] == [(flag, y.tolist()) for flag, y in with_aug]


def test_training_batches_are_augmented_and_evaluation_rows_are_not(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "data.max_train_per_dataset=60")
    _, _, _, _, shards, context = prepared_method(cfg)
    plain = [x for _, x, _ in context(0).batches(shuffle=False)]
    ctx = context(0)
    ctx.augment = "medmnist"
    assert [x for _, x, _ in ctx.batches(shuffle=False)][0].equal(plain[0])  # only shuffled training batches
    ctx.augment, ctx._rng = "medmnist", None
    augmented = [x for _, x, _ in ctx.batches()]
    ctx.augment, ctx._rng = "none", None
    raw = [x for _, x, _ in ctx.batches()]
    assert len(augmented) == len(raw) and not all(a.equal(r) for a, r in zip(augmented, raw))


def test_local_steps_take_exactly_k_batches_over_successive_passes(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "data.max_train_per_dataset=60", "data.datasets=[breastmnist]", "clients.num=2", "clients.batch_size=4")
    _, _, _, _, shards, context = prepared_method(cfg)
    per_pass = len(list(context(0).batches()))
    assert per_pass >= 2
    ctx = context(0)
    ctx.train = ctx.train.model_copy(update={"local_epochs": 3})
    assert len(list(ctx.local_batches())) == 3 * per_pass  # epochs: whole passes
    for k in (1, per_pass + 1, 3 * per_pass + 2):
        ctx = context(0)
        ctx.train = ctx.train.model_copy(update={"local_steps": k, "local_epochs": 1})
        steps = list(ctx.local_batches())
        assert len(steps) == k
        rows = [len(y) for _, _, y in steps[:per_pass]]
        ctx._rng = None
        fresh = [len(y) for _, _, y in ctx.batches()]
        assert rows == fresh[: len(rows)]  # the same seeded stream as epochs: a pass, then another
    clients = load_config(None, ["clients.local_steps=10", "clients.batch_size=32"]).clients
    assert clients.examples_per_round(64) == 320 and clients.examples_per_round(40) == 200
    # max_local_epochs caps the steps at that many passes over the client's own rows
    for epochs, expected in ((1, min(per_pass, 50)), (2.5, min(math.ceil(2.5 * per_pass), 50)), (1000, 50)):
        ctx = context(0)
        ctx.train = ctx.train.model_copy(update={"local_steps": 50, "max_local_epochs": epochs})
        assert len(list(ctx.local_batches())) == expected, epochs
    capped = load_config(None, ["clients.local_steps=20", "clients.max_local_epochs=2", "clients.batch_size=32"]).clients
    assert capped.steps_per_round(1) == 2 and capped.steps_per_round(4) == 8 and capped.steps_per_round(40) == 20
    assert capped.examples_per_round(20) == 40 and capped.examples_per_round(3200) == 640
    with pytest.raises(ConfigError, match="local_steps"):
        load_config(None, ["strategy.name=dpfedavg", "clients.local_steps=5"])


# ---------------------------------------------------------------------------------------------------
# Baselines and selection


def test_baselines_equal_a_hand_computation(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "clients.num=4", "data.partition=dirichlet", "data.alpha=0.5", "data.datasets=[breastmnist]")
    shards = ShardSet(materialise(cfg))
    baselines = compute_baselines(shards)
    clients = [shards.client(c) for c in range(4)]
    train = np.concatenate([np.asarray(c.train["breastmnist"].labels)[:, 0] for c in clients])
    majority = int(np.bincount(train).argmax())
    test, val = np.asarray(shards.test("breastmnist").labels)[:, 0], np.asarray(shards.val("breastmnist").labels)[:, 0]
    b = baselines["breastmnist"]
    assert b["majority_class"] == majority
    assert b["majority_acc"] == pytest.approx(np.mean(test == majority))
    assert b["val_majority_acc"] == pytest.approx(np.mean(val == majority))
    assert b["chance_acc"] == pytest.approx(0.5) and b["test"]["auc"] == pytest.approx(0.5)
    # Local majority: each client's own most common training class, on its own held-out rows.
    hits = total = 0
    per_client = []
    for c in clients:
        own = int(np.bincount(np.asarray(c.train["breastmnist"].labels)[:, 0], minlength=2).argmax())
        held = np.asarray(c.holdout["breastmnist"].labels)[:, 0]
        hits, total = hits + int((held == own).sum()), total + len(held)
        per_client.append(np.mean(held == own))
    assert b["local_majority_acc"] == pytest.approx(hits / total)
    flat = baseline_metrics(baselines)
    assert flat["global/breastmnist/acc"] == pytest.approx(b["majority_acc"])
    assert flat["personal/client_mean/acc"] == pytest.approx(np.mean(per_client))
    assert flat["val/global/mean/acc"] == pytest.approx(b["val_majority_acc"])
    assert at_or_below("global/breastmnist/acc", b["majority_acc"], flat) and not at_or_below("global/breastmnist/acc", 0.99, flat)
    assert at_or_below("global/retinamnist/mae", 2.0, {"global/retinamnist/mae": 1.0})  # lower is better


def test_selection_picks_the_best_validation_round_and_stops_early():
    rounds = [
        {"round": 1, "val/global/mean/acc": 0.60, "global/mean/acc": 0.90},
        {"round": 2, "train/loss": 1.0},  # not evaluated
        {"round": 3, "val/global/mean/acc": 0.70, "global/mean/acc": 0.50},
        {"round": 4, "val/global/mean/acc": 0.65, "global/mean/acc": 0.95},
        {"round": 5, "val/global/mean/acc": float("nan"), "global/mean/acc": 0.99},
    ]
    selection = Selection.replay(rounds, patience=2)
    assert selection.metric == "val/global/mean/acc"  # the default: the global model's validation accuracy
    assert selection.round == 3 and selection.summary()["test_value"] == 0.50  # never the best test round
    assert selection.should_stop  # rounds 4 and 5 did not improve on round 3
    assert Selection.replay(rounds[:4], patience=2).should_stop is False
    assert Selection.replay([{"round": 1, "val/personal/client_mean/acc": 0.5}]).metric == "val/personal/client_mean/acc"
    with pytest.raises(ConfigError, match="validation metrics only"):
        load_config(None, ["eval.select=global/mean/acc"])


# ---------------------------------------------------------------------------------------------------
# Centralised training


def test_central_is_one_client_with_every_row_and_keeps_its_optimiser(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "strategy.name=central", "clients.momentum=0.9", "data.max_train_per_dataset=80")
    assert (cfg.clients.num, cfg.clients.fraction, cfg.data.partition) == (1, 1.0, "iid")
    cfg, method, model, state, shards, context = prepared_method(cfg)
    assert shards.num_clients == 1 and sum(shards.client_sizes()[0]) == sum(shards.meta["datasets"][f]["num_train"] for f in cfg.data.datasets)
    first = method.client_update(context(0), state.weights)
    state = method.aggregate(state, _accumulate(method, first))
    assert any(k.endswith("::momentum_buffer") for k in first.state)
    ctx2 = context(0)
    ctx2.round, ctx2.state = 2, first.state
    second = method.client_update(ctx2, state.weights)

    # The same two epochs with one optimiser kept in a plain loop.
    ref = context(0)
    ref.load({**ref.initial_weights})
    optimizer = local_optimizer(trained_parameters(ref).values(), ref.train, ref.lr)
    local_sgd(ref, optimizer=optimizer)
    ref2 = context(0)
    ref2.round = 2
    saved = optimizer_state(optimizer, trained_parameters(ref))
    optimizer2 = local_optimizer(trained_parameters(ref2).values(), ref2.train, ref2.lr)
    load_optimizer_state(optimizer2, trained_parameters(ref2), saved)
    local_sgd(ref2, optimizer=optimizer2)
    for key, delta in second.delta.items():
        np.testing.assert_allclose(state.weights[key] + delta, ref2.read([key])[key], atol=1e-5, err_msg=key)


def _accumulate(method, update):
    acc = method.new_accumulator()
    acc.add(update)
    return acc


# ---------------------------------------------------------------------------------------------------
# Whole runs


def test_deterministic_runs_are_bit_identical_and_report_validation_and_baselines(data_dir, tmp_path, ray_session):
    """Two deterministic FedPer runs of one config (2 workers, 3 rounds): identical rounds.parquet (but
    for timings), identical model files and client states."""
    overrides = ["strategy.name=fedper", "deterministic=true", "rounds=3", "engine.num_workers=2", "clients.momentum=0.9",
                 "data.partition=modality", "data.alpha=0.5"]
    runs = [read_run(run_experiment(small_config(data_dir, tmp_path / str(i), *overrides))) for i in range(2)]
    a, b = (r["rounds"] for r in runs)
    assert list(a["round"]) == [1, 2, 3]
    measured = [c for c in a.columns if c.startswith(("time/", "memory/"))]
    pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured), check_exact=True)
    for name in ("model.safetensors", "model-selected.safetensors"):  # the same tensors, bit for bit, and metadata
        files = [safe_open(str(r["dir"] / name), "np") for r in runs]
        assert files[0].metadata() == files[1].metadata() and sorted(files[0].keys()) == sorted(files[1].keys()), name
        for key in files[0].keys():
            assert files[0].get_tensor(key).tobytes() == files[1].get_tensor(key).tobytes(), (name, key)
    for run in runs:
        assert run["meta"]["reproducibility"]["deterministic"] is True
        assert len(run["meta"]["workers"]) == 2
    rounds = a
    assert {"val/personal/client_mean/acc", "personal/client_mean/acc", "val/personal/breastmnist/acc"} <= set(rounds.columns)
    assert not any(c.startswith(("global/", "val/global/")) for c in rounds.columns)  # FedPer has no global model
    summary = runs[0]["summary"]
    assert summary["selected"]["metric"] == "val/personal/client_mean/acc" and summary["selected"]["round"] in (1, 2)
    assert summary["baselines"]["breastmnist"]["local_majority_acc"] > 0
    assert "personal/client_mean/acc" in summary["baseline_metrics"]
    evaluation = pd.read_parquet(runs[0]["dir"] / "evaluation")
    assert set(evaluation["split"]) == {"val", "test"}


def test_early_stopping_ends_a_run_whose_validation_stopped_improving(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "rounds=6", "clients.lr=1e-9", "eval.early_stop_patience=1", "engine.checkpoint_every=0")
    run = read_run(run_experiment(cfg))
    # With a learning rate of 1e-9 the validation metric never improves on round 1: stop after round 2.
    assert list(run["rounds"]["round"]) == [1, 2]
    summary = run["summary"]
    assert summary["status"] == "completed" and summary["selected"]["early_stopped"] and summary["selected"]["round"] == 1
    assert (run["dir"] / "model-selected.safetensors").is_file()
    assert math.isclose(summary["selected"]["test_value"], run["rounds"]["global/mean/acc"].iloc[0])
    assert json.loads((run["dir"] / "meta.json").read_text())["baselines"]["pneumoniamnist"]["majority_acc"] > 0.5


def test_without_the_global_evaluation_a_run_selects_on_its_personalised_metrics(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "rounds=2", "eval.global_model=false", "engine.checkpoint_every=0")
    run = read_run(run_experiment(cfg))
    columns = set(run["rounds"].columns)
    assert not [c for c in columns if c.startswith(("global/", "val/global/"))]
    assert {"personal/client_mean/acc", "val/personal/client_mean/acc"} <= columns
    assert run["summary"]["selected"]["metric"] == "val/personal/client_mean/acc"


def test_macro_f1_equals_scikit_learns():
    from sklearn.metrics import f1_score

    from raymed.data.tasks import macro_f1

    rng = np.random.default_rng(0)
    for n, classes, predicted in [(1, 2, 2), (3, 2, 2), (50, 5, 5), (7, 5, 9), (200, 9, 9), (4, 3, 3)]:  # 9 > 5: a shared head's other columns
        for _ in range(20):
            y, pred = rng.integers(0, classes, n), rng.integers(0, predicted, n)
            expected = f1_score(y, pred, labels=np.arange(classes), average="macro", zero_division=0)
            assert math.isclose(macro_f1(y, pred, classes), expected, abs_tol=1e-12)


def test_float32_pairwise_partials_stay_within_the_bound_of_float64():
    """1,000 client updates summed in float32 (PairwiseSum), as one worker's partial and as eight
    partials sent over the wire (pickled) and merged: within (BLOCK + log2(n / BLOCK) + 2) · ε₃₂ ·
    Σ|n_k Δ_k| / Σ n_k of the float64 weighted mean, element by element."""
    import pickle

    from raymed.methods.base import ClientUpdate, PairwiseSum, WeightedMean

    rng = np.random.default_rng(0)
    n, size = 1000, 4096
    deltas = [(rng.standard_normal(size) * rng.lognormal(0, 2)).astype(np.float32) + np.float32(1e-3) for _ in range(n)]
    weights = rng.integers(1, 500, n).astype(float)
    exact = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas)) / weights.sum()
    magnitude = sum(w * np.abs(d.astype(np.float64)) for w, d in zip(weights, deltas)) / weights.sum()
    bound = (PairwiseSum.BLOCK + np.log2(n / PairwiseSum.BLOCK) + 2) * np.finfo(np.float32).eps * magnitude

    one = WeightedMean()
    for w, d in zip(weights, deltas):
        one.add(ClientUpdate(delta={"p": d}, weight=w))
    partials = [WeightedMean() for _ in range(8)]
    for i, (w, d) in enumerate(zip(weights, deltas)):
        partials[i % 8].add(ClientUpdate(delta={"p": d}, weight=w))
    merged = WeightedMean()
    for partial in partials:
        wire = pickle.loads(pickle.dumps(partial))
        assert wire.partial["p"].total().dtype == torch.float32
        merged.merge(wire)
    assert merged.count == one.count == n
    for acc in (one, merged):
        mean = acc.mean()["p"]
        assert mean.dtype == np.float32
        assert np.all(np.abs(mean - exact) <= bound), float(np.max(np.abs(mean - exact) / bound))
    # The partial on the wire is one float32 array per parameter, half of what float64 sums cost.
    assert len(pickle.dumps(partials[0])) < 1.2 * size * 4
