"""OmniFM: the spectral token, the knowledge base, retrieval, and what a client lets out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray
import torch

from raymed.data.shards import ShardSet, materialise
from raymed.engine import ServerActor
from raymed.engine.worker import float_state
from raymed.methods import ClientContext, build_method, client_context
from raymed.methods.omnifm import CENTROIDS_PREFIX, HITS_KEY, SpectralKnowledgeBase, SpectralToken, retrieve
from raymed.models import build_model
from tests.conftest import small_config


def _real_images(data_dir, n: int = 16) -> torch.Tensor:
    with np.load(data_dir / "pneumoniamnist.npz") as npz:
        images = npz["test_images"][:n]
    return torch.as_tensor(images[:, None]).float() / 127.5 - 1


@pytest.mark.parametrize("rho", [0.3, 0.5, 1.0])
def test_spectral_token_is_unit_norm_and_invariant_to_circular_shifts(data_dir, rho):
    torch.manual_seed(0)
    token = SpectralToken(image_size=28, rho=rho, dim=32).eval()
    images = torch.cat([_real_images(data_dir), torch.rand(8, 1, 28, 28) * 2 - 1])
    with torch.no_grad():
        s = token(images)
        for dy, dx in [(3, 0), (0, 11), (-5, 7), (14, 14)]:
            shifted = token(torch.roll(images, shifts=(dy, dx), dims=(2, 3)))
            torch.testing.assert_close(shifted, s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.norm(dim=1), torch.ones(len(s)))
    other = token(torch.flip(images, dims=(2,))[:, :, :, :].transpose(2, 3) * 0.3)
    assert not torch.allclose(other, s, atol=1e-3)  # invariant to shifts, not blind to content


def test_low_pass_keeps_only_the_disk_of_radius_rho():
    narrow, wide = SpectralToken(28, 0.25, 8), SpectralToken(28, 1.0, 8)
    assert narrow.disk.shape[0] < wide.disk.shape[0]
    size = narrow.disk.shape[0]
    centre = size // 2
    assert narrow.disk[centre, centre] == 1 and narrow.disk[0, 0] == 0  # the corners lie outside the circle
    assert "disk" not in narrow.state_dict()  # fixed: never aggregated or sent


def test_top_k_retrieval_equals_brute_force():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(9, 16)).astype(np.float32)
    got = retrieve(torch.as_tensor(queries), torch.as_tensor(bank), k=5).numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries) @ unit(bank).T
    for row, query_sims in zip(got, sims):
        brute = np.argsort(-query_sims)[:5]
        assert list(row) == list(brute)
    assert retrieve(torch.as_tensor(queries), torch.as_tensor(bank[:3]), k=5).shape == (9, 3)  # k > |B|: all of B


def test_knowledge_base_never_exceeds_capacity_and_stays_modality_balanced():
    rng = np.random.default_rng(1)
    kb = SpectralKnowledgeBase(capacity=30, dim=8)
    modalities = ["chest", "breast", "retina"]
    for round_ in range(1, 25):
        counts = {"chest": 12, "breast": 2 + round_ % 3, "retina": 5}  # one modality floods the uploads
        vectors = rng.normal(size=(sum(counts.values()), 8))
        tags = [m for m in modalities for _ in range(counts[m])]
        if len(kb):
            kb.record_hits(rng.poisson(2.0, size=len(kb)).astype(float))
        kb.insert(vectors, tags, round_)
        assert len(kb) <= 30
        np.testing.assert_allclose(np.linalg.norm(kb.vectors, axis=1), 1, rtol=1e-5)
        if round_ >= 5:  # every modality has offered at least M/3 entries by now
            assert max(kb.counts().values()) - min(kb.counts().values()) <= 1, kb.counts()


def test_knowledge_base_prunes_the_least_retrieved_entry_of_the_crowded_modality():
    kb = SpectralKnowledgeBase(capacity=4, dim=2, hit_decay=0.5)
    kb.insert(np.eye(2)[[0, 1, 0, 1]] + 0.01, ["a", "a", "b", "b"], 1)
    kb.record_hits(np.array([5.0, 1.0, 3.0, 3.0]))
    kb.insert(np.array([[1.0, 1.0]]), ["a"], 2)  # joins at a's mean (3); a now has 3 entries > b's 2
    assert len(kb) == 4 and kb.counts() == {"a": 2, "b": 2}
    assert sorted(kb.hits[[i for i, m in enumerate(kb.modality) if m == "a"]]) == [3.0, 5.0]  # a's least retrieved (1) went
    kb.record_hits(np.zeros(4))
    np.testing.assert_allclose(sorted(kb.hits), [1.5, 1.5, 1.5, 2.5])  # retrievals decay by hit_decay each round


def _omnifm_client(data_dir, tmp_path, *overrides):
    cfg = small_config(data_dir, tmp_path, "strategy.name=omnifm", "strategy.bank_size=16", "strategy.top_k=5", *overrides)
    shards = ShardSet(materialise(cfg))
    method = build_method("omnifm", cfg.strategy.params)
    model = method.build_model(cfg.model, shards.tasks, cfg.seed)
    initial = float_state(model)
    state = method.init_state(initial)

    def context(cid: int, round_: int) -> ClientContext:
        return client_context(cfg, cid, round_, model, shards, torch.device("cpu"), initial)

    return cfg, shards, method, state, context


def test_client_keeps_c_and_heads_and_uploads_no_image_sized_tensor(data_dir, tmp_path):
    cfg, shards, method, state, context = _omnifm_client(data_dir, tmp_path)
    shape = next(iter(shards.tasks.values())).image_size ** 2
    for round_ in (1, 2):  # round 1: empty knowledge base; round 2: retrieval from the snapshot
        accumulator = method.new_accumulator()
        for cid in (0, 1):
            update = method.client_update(context(cid, round_), method.broadcast(state))
            sent = {**update.delta, **update.uploads}
            assert not any(k.startswith(("psp.cls", "heads.")) for k in sent), "private parts left the client"
            assert "psp.cls" in update.state and any(k.startswith("heads.") for k in update.state)
            for key, value in update.uploads.items():  # summaries only: token_dim-wide centroids and counts
                assert value.ndim <= 2 and value.size < shape and (value.ndim == 1 or value.shape[1] == cfg.strategy.params["token_dim"]), key
            assert set(update.uploads) == {HITS_KEY, *(CENTROIDS_PREFIX + d for d in context(cid, round_).shard.datasets)}
            assert update.problem(method.broadcast(state)) is None
            accumulator.add(update)
        seen = sum(context(c, round_).num_train for c in (0, 1)) * cfg.clients.local_epochs
        assert accumulator.hits.sum() == (0 if round_ == 1 else 5 * seen)  # k retrievals per training image
        state = method.aggregate(state, accumulator)
        state.round = round_
        kb = state.extra["gskr"]
        assert 0 < len(kb) <= 16 and set(kb.modality) <= set(shards.tasks)
    assert "psp.cls" not in state.weights and not any(k.startswith("heads.") for k in state.weights)


def test_spalign_changes_the_spectral_update(data_dir, tmp_path):
    """The task loss moves the spectral encoder on its own (λ = 0); SPAlign (λ > 0) changes where it goes."""
    moved = {}
    for lam in (0.0, 1.0):
        cfg, shards, method, state, context = _omnifm_client(data_dir, tmp_path / str(lam), f"strategy.lam={lam}")
        kb = state.extra["gskr"]
        kb.insert(np.random.default_rng(0).normal(size=(8, cfg.strategy.params["token_dim"])), ["pneumoniamnist"] * 8, 0)
        update = method.client_update(context(0, 1), method.broadcast(state))
        moved[lam] = {k: v for k, v in update.delta.items() if k.startswith("spectral.")}
    assert all(np.abs(v).max() > 0 for v in moved[0.0].values())
    assert any(not np.allclose(moved[0.0][k], moved[1.0][k]) for k in moved[0.0])


@pytest.mark.parametrize("bank", [False, True])
def test_the_task_loss_reaches_every_spectral_and_backbone_parameter(data_dir, tmp_path, bank):
    """With λ = 0 (no SPAlign), with and without a knowledge base to retrieve from: a gradient of the
    task loss alone reaches every parameter of the spectral tokenizer and of the backbone."""
    cfg, shards, method, state, context = _omnifm_client(data_dir, tmp_path, "strategy.lam=0")
    if bank:
        state.extra["gskr"].insert(np.random.default_rng(0).normal(size=(8, cfg.strategy.params["token_dim"])), ["pneumoniamnist"] * 8, 0)
    ctx = context(0, 1)
    method.load_personalised(ctx, method.broadcast(state))
    model = ctx.model
    model.train()
    flag, (x, y) = next(iter(ctx.tensors("train").items()))
    enc = model.encode(x[:16])
    assert (enc.prototypes is not None) == bank
    ctx.tasks[flag].loss(model.head(flag)(enc.features, x[:16]), y[:16]).backward()
    for name, param in model.named_parameters():
        if name.startswith(("spectral.", "backbone.")):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_omnifm_holds_the_same_backbone_as_fedavg(data_dir, tmp_path):
    cfg, shards, method, state, context = _omnifm_client(data_dir, tmp_path)
    omni = method.build_model(cfg.model, shards.tasks, cfg.seed)
    plain = build_model(cfg.model.name, shards.tasks, cfg.seed)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith("backbone.")}  # noqa: E731
    assert shapes(omni) == shapes(plain) and shapes(plain)


def test_omnifm_rounds_on_ray_keep_c_on_the_clients(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "strategy.name=omnifm", "rounds=2")
    server = ray.remote(ServerActor).remote(cfg.to_dict(), str(materialise(cfg)), 2, "omni", None)
    first = ray.get(server.run_round.remote())
    second = ray.get(server.run_round.remote())
    state = ray.get(server.get_state.remote())
    stored = ray.get(ray.get(server.client_state_store.remote()).snapshot.remote())
    ray.kill(server)
    assert "psp.cls" not in state.weights and stored and all("psp.cls" in s for s in stored.values())
    assert len(state.extra["gskr"]) > 0 and state.extra["gskr"].hits.sum() > 0  # round 2 retrieved from round 1's bank
    metrics = second["metrics"]
    assert "global/mean/acc" not in metrics  # no global model: c and the heads are private
    assert 0 <= metrics["personal/client_mean/acc"] <= 1 and math.isfinite(first["metrics"]["train/loss"])
