"""LoRKD: per-sample low-rank experts (grouped convolution, gradient separation, fusion), the KL
transfer from a teacher, what a client sends, and runs through the engine with pretrained and
run-folder teachers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError
from raymed.methods import build_method
from raymed.methods.lorkd import LoRKDModel, distillation_loss, is_expert
from raymed.models import build_backbone, build_model
from raymed.models.experts import LowRankExperts, add_experts, set_route
from tests.conftest import prepared_method, small_config

TASKS = {f: TaskSpec.from_medmnist(f) for f in ("pneumoniamnist", "breastmnist", "retinamnist")}


def _experts(base: nn.Module, names=("a", "b", "c")) -> LowRankExperts:
    torch.manual_seed(0)
    layer = LowRankExperts(base, list(names), rank=2, alpha=4.0)
    for b in layer.lora_B.values():
        nn.init.normal_(b)  # B starts at zero; make every expert a real change
    return layer


@pytest.mark.parametrize(
    "base, shape",
    [(nn.Conv2d(3, 8, 3, padding=1), (6, 3, 9, 9)), (nn.Conv3d(2, 4, 3, stride=2, padding=1), (6, 2, 6, 6, 6)), (nn.Linear(5, 4), (6, 7, 5))],
)
def test_grouped_experts_equal_a_per_sample_loop(base, shape):
    layer = _experts(base)
    x = torch.randn(*shape)
    route = torch.tensor([2, 0, 0, 2, 1, 2])
    layer.route = route
    grouped = layer(x)
    grouped.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    loop = []
    for i in range(len(x)):
        layer.route = route[i : i + 1]
        w = layer.base.weight + layer.delta(layer.names[int(route[i])])  # sample i alone, its own weight
        loop.append(F.linear(x[i : i + 1], w, layer.base.bias) if isinstance(base, nn.Linear) else layer.base._conv_forward(x[i : i + 1], w, layer.base.bias))
    looped = torch.cat(loop)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    looped.square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-4)  # sums in another order: float rounding


def test_each_sample_reaches_only_its_tasks_expert_and_absent_experts_get_no_gradient():
    layer = _experts(nn.Conv2d(3, 4, 3, padding=1), names=("a", "b", "c", "d"))
    x = torch.randn(4, 3, 8, 8)
    layer.route = torch.tensor([0, 2, 2, 0])  # experts b and d are absent
    out = layer(x)
    out[1].sum().backward()  # sample 1 only: task c
    assert layer.lora_A["c"].grad.abs().sum() > 0 and layer.lora_B["c"].grad.abs().sum() > 0
    assert layer.lora_A["a"].grad.abs().sum() == 0  # present in the batch, but not sample 1's expert
    assert layer.lora_A["b"].grad is None and layer.lora_B["d"].grad is None  # absent: never computed


def _student(seed: int = 0) -> LoRKDModel:
    teacher = build_model("cnn", TASKS, seed=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone, channels = build_backbone("cnn", TASKS)
        model = LoRKDModel(backbone, TASKS, channels, rank=4, alpha=8.0, teacher=teacher)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            nn.init.normal_(p, std=0.05)
    return model.eval()


def test_fused_network_gives_the_unfused_logits():
    model = _student()
    x = torch.rand(5, 3, 28, 28) * 2 - 1
    for flag in TASKS:
        fused = model.fused(flag)
        assert not any(isinstance(m, LowRankExperts) for m in fused.modules())
        assert sum(p.numel() for p in fused.backbone.parameters()) == sum(p.numel() for p in build_backbone("cnn", TASKS)[0].parameters())
        torch.testing.assert_close(fused(x, flag), model(x, flag), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.predict(x, flag), model(x, flag), rtol=1e-5, atol=1e-5)
    # a mixed batch through the grouped path gives each sample its own task's features
    route = torch.tensor([0, 1, 2, 1, 0])
    mixed = model.features(x, route)
    for i, flag in enumerate(TASKS):
        rows = route == i
        torch.testing.assert_close(mixed[rows], model.fused(flag).features(x[rows]), rtol=1e-5, atol=1e-5)


def test_kl_transfer_is_the_tempered_kl_and_vanishes_only_at_the_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    T = 3.0
    manual = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(distillation_loss(TASKS["breastmnist"], s, t, T), manual)
    # grades as classes (the default ordinal loss) distil like any softmax task
    s5, t5 = torch.randn(8, 5), torch.randn(8, 5)
    softmax5 = (F.softmax(t5 / T, 1) * (F.log_softmax(t5 / T, 1) - F.log_softmax(s5 / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(distillation_loss(TASKS["retinamnist"], s5, t5, T), softmax5)
    # one logit per grade threshold distils as a Bernoulli KL per threshold
    cumulative = dataclasses.replace(TASKS["retinamnist"], ordinal_loss="cumulative")
    p, q = torch.sigmoid(t / T), torch.sigmoid(s / T)
    bernoulli = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(1).mean() * T * T
    torch.testing.assert_close(distillation_loss(cumulative, s, t, T), bernoulli)
    assert distillation_loss(TASKS["breastmnist"], t, t, T).abs() < 1e-6
    assert distillation_loss(cumulative, t, t, T).abs() < 1e-6
    assert distillation_loss(TASKS["retinamnist"], t5, t5, T).abs() < 1e-6


@pytest.fixture
def lorkd_setup(data_dir, tmp_path):
    def make(*overrides: str):
        cfg = small_config(
            data_dir, tmp_path, "data.max_train_per_dataset=120", "data.max_test_per_dataset=40", "clients.num=4",
            "strategy={name: lorkd, rank: 4, teacher_epochs: 1}", *overrides,
        )
        cfg, method, model, state, _, context = prepared_method(cfg)
        return cfg, method, model, state, context

    return make


def test_client_sends_w0_its_own_expert_and_head_and_never_the_teacher(lorkd_setup):
    cfg, method, model, state, context = lorkd_setup()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    ctx = context(0)
    (own,) = ctx.shard.datasets
    update = method.client_update(ctx, state.weights)
    sent = set(update.delta)
    assert not any(k.startswith("teacher.") for k in sent) and not any(k.startswith("teacher.") for k in state.weights)
    assert {k.rsplit(".", 1)[1] for k in sent if is_expert(k)} == {own}  # its task's expert, no other
    assert {k.split(".")[1] for k in sent if k.startswith("heads.")} == {own}
    assert "backbone.body.0.base.weight" in sent and np.abs(update.delta["backbone.body.0.base.weight"]).sum() > 0  # W0 trains
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())


def test_kl_term_changes_the_update(lorkd_setup):
    """The released script multiplies its KL by 0; here λ > 0 must change what the client learns."""
    cfg, method, model, state, context = lorkd_setup()
    with_kl = method.client_update(context(0), state.weights).delta
    off = build_method("lorkd", {**cfg.strategy.params, "lam": 0.0})
    without = off.client_update(context(0), state.weights).delta
    assert max(np.abs(with_kl[k] - without[k]).max() for k in with_kl) > 1e-4


def test_private_experts_stay_on_the_client(lorkd_setup):
    cfg, method, model, state, context = lorkd_setup("strategy={name: lorkd, rank: 4, teacher_epochs: 1, expert_sharing: client}")
    assert not any(is_expert(k) for k in state.weights) and method.eval_weights(state) is None
    update = method.client_update(context(1), state.weights)
    assert not any(is_expert(k) for k in update.delta)
    assert update.state and all(is_expert(k) for k in update.state)


def test_bad_teachers_are_one_line(lorkd_setup, tmp_path):
    with pytest.raises(ConfigError, match="holds no model.safetensors"):
        lorkd_setup(f"strategy={{name: lorkd, teacher: {tmp_path}}}")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a model file")
    with pytest.raises(ConfigError, match="is not a raymed model file"):
        lorkd_setup(f"strategy={{name: lorkd, teacher: {corrupt}}}")


@pytest.mark.slow
def test_lorkd_runs_through_the_engine_with_a_fedavg_run_as_teacher(ray_session, data_dir, tmp_path):
    import pandas as pd
    import yaml

    from raymed.engine.federation import run_experiment
    from raymed.models.pretrained import load_model

    common = ["data.max_train_per_dataset=120", "data.max_test_per_dataset=40", "clients.num=4", "rounds=1"]
    teacher_run = run_experiment(small_config(data_dir, tmp_path, *common, "model.name=cnn_large"))
    assert set(load_model(teacher_run, "test").heads) == {"pneumoniamnist", "breastmnist"}  # every run leaves its model
    run = run_experiment(small_config(data_dir, tmp_path, *common, f"strategy={{name: lorkd, rank: 4, teacher: {teacher_run}}}"))
    metrics = pd.read_parquet(run / "rounds.parquet").iloc[-1]
    assert np.isfinite(metrics["global/pneumoniamnist/acc"]) and np.isfinite(metrics["personal/client_mean/acc"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["strategy"]["teacher"] == str((teacher_run / "model.safetensors").resolve())
    with pytest.raises(ConfigError, match="strategy lorkd"):  # a LoRKD student is no plain network to distil from
        load_model(run, "strategy.teacher")


def test_add_experts_wraps_every_dense_layer_of_a_resnet():
    backbone, _ = build_backbone("resnet18", TASKS)
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in backbone.modules())
    wrapped = add_experts(backbone, ["a", "b"], rank=2, alpha=4.0)
    assert len(wrapped) == convs
    set_route(backbone, torch.tensor([0, 1]))
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 512)
