"""FedMRG and report generation: factorised aggregation, private specialised adapters, the
MedMNIST-Reports and R2Gen data, the server's DeepSpeed ZeRO ranks, and a run end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raymed.tasks.report import text as reports
from raymed.tasks.report.metrics import label_report
from raymed.data.shards import ShardSet, materialise
from raymed.engine.worker import float_state
from raymed.errors import DataError
from raymed.methods import ClientContext, build_method, client_context
from raymed.methods.base import ClientUpdate, ServerState
from raymed.methods.fedmrg import FedMRG, FedMRGParams, factorise, lora_pairs

from tests.conftest import SHARED, small_config
from tests.test_cli import raymed

IU = SHARED.parent / "iu_xray"
needs_iu = pytest.mark.skipif(not (IU / "indiana_reports.csv").is_file(), reason="IU X-Ray report text not in ../shared/data/iu_xray")

TINY_DECODER = ["model.decoder.width=32", "model.decoder.heads=2", "model.decoder.layers=1", "model.decoder.prefix_tokens=4", "model.decoder.lora_rank=4"]


def report_config(data_dir: Path, tmp_path: Path, *overrides: str):
    return small_config(
        data_dir, tmp_path,
        "data.task=report", "data.datasets=[pneumoniamnist]", f"data.report_root={IU}", "data.partition=iid",
        "clients.num=4", "data.max_train_per_dataset=160", "data.max_test_per_dataset=24", "data.report_len=32",
        "clients.optimizer=adamw", "clients.lr=0.002", "strategy={name: fedmrg, comm_rank: 2}", *TINY_DECODER, *overrides,
    )


def _context(cfg, shards: ShardSet, model, client: int, initial) -> ClientContext:
    return client_context(cfg, client, 1, model, shards, torch.device("cpu"), initial)


# ---------------------------------------------------------------------------------------------------
# Low-rank factorised aggregation (no data)


def _lora_state(rng, out_dim: int, in_dim: int, rank: int) -> dict[str, np.ndarray]:
    return {
        "layer.lora_A.generic.weight": rng.normal(size=(rank, in_dim)).astype(np.float32),
        "layer.lora_B.generic.weight": rng.normal(size=(out_dim, rank)).astype(np.float32),
        "conv.weight": rng.normal(size=(6, 3, 3, 3)).astype(np.float32),
    }


def test_refactorised_aggregate_equals_the_exact_weighted_sum_at_full_rank():
    rng = np.random.default_rng(0)
    out_dim, in_dim = 7, 5
    method = FedMRG(FedMRGParams(comm_rank=in_dim))  # full rank: the factors carry each update exactly
    payload = _lora_state(rng, out_dim, in_dim, rank=in_dim)  # LoRA rank = min(out, in): re-factorising loses nothing
    state = ServerState(weights=payload)
    clients = [_lora_state(rng, out_dim, in_dim, rank=in_dim) for _ in range(3)]
    sizes = [10.0, 30.0, 60.0]
    accumulator = method.new_accumulator()
    for trained, n in zip(clients, sizes):
        delta = method._factorised_delta(trained, payload)
        assert not {"layer.lora_A.generic.weight", "layer.lora_B.generic.weight"} & set(delta)  # products, not factors
        accumulator.add(ClientUpdate(delta=delta, weight=n))
    new = method.aggregate(state, accumulator).weights

    b, a = "layer.lora_B.generic.weight", "layer.lora_A.generic.weight"
    exact = sum(n * (c[b].astype(np.float64) @ c[a]) for c, n in zip(clients, sizes)) / sum(sizes)
    np.testing.assert_allclose(new[b] @ new[a], exact, rtol=1e-4, atol=1e-4)
    exact_conv = sum(n * c["conv.weight"] for c, n in zip(clients, sizes)) / sum(sizes)
    np.testing.assert_allclose(new["conv.weight"], exact_conv, rtol=1e-4, atol=1e-4)
    # Averaging the factors separately (FedAvg of LoRA) is not the average of the products.
    mean_b = sum(n * c[b] for c, n in zip(clients, sizes)) / sum(sizes)
    mean_a = sum(n * c[a] for c, n in zip(clients, sizes)) / sum(sizes)
    assert np.abs(mean_b @ mean_a - exact).max() > 0.1


def test_factorised_update_is_the_best_low_rank_approximation():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(40, 30))
    u, v = factorise(matrix, 4)
    assert u.shape == (40, 4) and v.shape == (30, 4)
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert np.linalg.norm(matrix - u @ v.T) == pytest.approx(np.sqrt((singular[4:] ** 2).sum()), rel=1e-4)  # Eckart-Young
    assert u.nbytes + v.nbytes < matrix.astype(np.float32).nbytes / 4
    assert lora_pairs(["x.lora_A.generic.weight", "x.lora_B.generic.weight", "x.lora_A.specialised.weight"]) == {
        "x.lora_BA.generic.weight": ("x.lora_B.generic.weight", "x.lora_A.generic.weight")
    }


# ---------------------------------------------------------------------------------------------------
# Data


@needs_iu
def test_medmnist_reports_pair_text_by_diagnosis_with_a_style_per_client(data_dir, tmp_path):
    cfg = report_config(data_dir, tmp_path)
    shards = ShardSet(materialise(cfg))
    task = shards.tasks["pneumoniamnist"]
    assert task.kind == "report" and task.class_names == ("normal", "pneumonia")
    findings = {0: [], 1: []}
    for client in range(4):
        split = shards.client(client).train["pneumoniamnist"]
        texts = task.decode(np.array(split.labels[:, 2:]))
        assert set(np.array(split.labels[:, 1])) == {client % 4}  # one reporting style per client
        for text, diagnosis in zip(texts, split.labels[:, 0]):
            labels = label_report(text)
            findings[int(diagnosis)].append(not labels["no_finding"])
        if client == 1:  # style 1 says PTX and pleural fluid
            assert not any("pneumothorax" in t or "pleural effusion" in t for t in texts)
    # Reports are cut at data.report_len tokens, so a few positives lose their finding.
    assert np.mean(findings[1]) > 0.7 and np.mean(findings[0]) < 0.2, (np.mean(findings[1]), np.mean(findings[0]))
    # Report pools are disjoint between clients (and from the test pool).
    folder = reports.find_root(str(IU), "indiana_reports.csv")
    diagnosis = np.array([0, 1] * 50)
    texts, styles = reports.medmnist_reports(diagnosis, np.repeat([0, 1], 50), 2, 1, folder, seed=0)
    assert set(texts[:50]).isdisjoint(texts[50:]) and set(styles) == {0}
    test_texts, _ = reports.medmnist_reports(diagnosis, np.full(100, -1), 2, 1, folder, seed=0, draw=1)
    assert set(test_texts).isdisjoint(texts)


@pytest.mark.skipif(not (IU / "annotation_r2gen.json").is_file(), reason="annotation_r2gen.json not in ../shared/data/iu_xray")
def test_r2gen_loader_reads_the_real_annotation_with_stand_in_images(tmp_path):
    annotation = IU / "annotation_r2gen.json"
    from PIL import Image

    folder = tmp_path / "iu_r2gen"
    (folder / "images").mkdir(parents=True)
    shutil.copy(annotation, folder / "annotation.json")
    splits = reports.r2gen_annotation(folder)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (2069, 296, 590)  # test: the "    " key
    rng = np.random.default_rng(0)
    for entries in splits.values():
        for entry in entries:  # stand-in images (the real ones are not here): the first view of each study
            path = folder / "images" / entry["image_path"][0]
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
    images, diagnosis, texts = reports.load_r2gen(folder, "test", 28)
    assert images.shape == (590, 28, 28) and diagnosis.shape == (590, 1)
    assert texts[0] == reports.clean(splits["test"][0]["report"]) and "xxxx" not in " ".join(texts).lower()
    assert 0 < diagnosis.mean() < 1  # the labeler finds both normal and abnormal studies

    from raymed.config import apply_overrides
    from raymed.experiment import validate_config

    cfg = validate_config(apply_overrides({}, [
        "data.task=report", "data.datasets=[r2gen]", f"data.report_root={folder}", "data.partition=iid", "clients.num=3",
        f"output_dir={tmp_path / 'out'}", "data.report_len=48",
    ]))
    shards = ShardSet(materialise(cfg))
    task = shards.tasks["r2gen"]
    assert len(shards.test("r2gen")) == 590 and sum(sum(sizes) for sizes in shards.client_sizes().values()) == 2069
    assert len(shards.val("r2gen")) == 296  # R2Gen's own validation studies
    decoded = task.decode(np.array(shards.test("r2gen").labels[:1, 2:]))[0]
    assert decoded.split()[:5] == reports.clean(splits["test"][0]["report"]).lower().replace(".", " .").replace(",", " ,").split()[:5]

    (folder / "images" / splits["train"][3]["image_path"][0]).write_bytes(b"not a png")
    reports.r2gen_annotation.cache_clear()
    with pytest.raises(DataError, match="could not be read as an image"):
        reports.load_r2gen(folder, "train", 28)


# ---------------------------------------------------------------------------------------------------
# The client half


@needs_iu
def test_specialised_adapter_never_leaves_the_client(data_dir, tmp_path):
    cfg = report_config(data_dir, tmp_path)
    shards = ShardSet(materialise(cfg))
    method = build_method("fedmrg", cfg.strategy.params)
    model = method.build_model(cfg.model, shards.tasks, cfg.seed)
    initial = float_state(model)
    specialised = {k for k in initial if ".specialised." in k}
    assert specialised and not specialised & set(method.init_state(initial).weights)
    payload = method.broadcast(method.init_state(initial))
    update = method.client_update(_context(cfg, shards, model, 0, initial), payload)

    sent = set(update.delta) | set(update.uploads)
    assert not any("specialised" in k for k in sent)
    assert set(update.state) == specialised
    assert any(not np.array_equal(update.state[k], initial[k]) for k in specialised)  # it was trained
    assert set(update.uploads) == {"proto_sum", "proto_count"} and update.uploads["proto_count"].sum() == shards.client(0).num_train
    assert update.problem(payload) is None

    fedavg = build_method("fedavg", {})
    lora = fedavg.build_model(cfg.model, shards.tasks, cfg.seed)
    baseline = fedavg.client_update(_context(cfg, shards, lora, 0, float_state(lora)), float_state(lora))
    assert update.nbytes < 0.38 * baseline.nbytes  # at least 62% less than FedAvg of the LoRA model
    assert not any(k in baseline.delta for k in lora.frozen_keys)  # the frozen decoder is never sent
    full = fedavg.build_model(cfg.model.model_copy(update={"decoder": cfg.model.decoder.model_copy(update={"lora_rank": 0})}), shards.tasks, cfg.seed)
    sent = float_state(full)
    assert "decoder.lm_head.weight" not in sent and "decoder.transformer.wte.weight" in sent  # a tied weight goes once
    assert sum(v.size for v in sent.values()) == sum(p.numel() for p in full.parameters())


@needs_iu
def test_workers_map_the_frozen_decoder_from_the_object_store(ray_session, data_dir, tmp_path):
    """One copy per node: a worker's frozen decoder weights are views of the object store's arrays."""
    from raymed.engine.worker import frozen_state
    from raymed.engine.worker import share_frozen

    cfg = report_config(data_dir, tmp_path)
    shards = ShardSet(materialise(cfg))
    method = build_method("fedmrg", cfg.strategy.params)
    frozen = ray_session.get(ray_session.put(frozen_state(method.build_model(cfg.model, shards.tasks, cfg.seed))))
    model = method.build_model(cfg.model, shards.tasks, cfg.seed + 1)  # other weights, to see them replaced
    share_frozen(model, frozen)
    params = dict(model.named_parameters())
    assert frozen and all(not a.flags.writeable for a in frozen.values())  # Ray's shared memory, read-only
    for key, array in frozen.items():
        assert params[key].data_ptr() == array.ctypes.data  # no private copy
    assert model.decoder.get_output_embeddings().weight.data_ptr() == model.decoder.get_input_embeddings().weight.data_ptr()  # still tied


# ---------------------------------------------------------------------------------------------------
# The server's DeepSpeed ranks


@needs_iu
@pytest.mark.parametrize("stage, ranks, offload", [(3, 2, "none"), (1, 1, "cpu")])
def test_server_decoder_is_a_deepspeed_engine(ray_session, data_dir, tmp_path, stage, ranks, offload):
    from raymed.engine.server_model import ServerModelGroup

    cfg = report_config(data_dir, tmp_path, f"server.zero_stage={stage}", f"server.ranks={ranks}", f"server.offload={offload}")
    shard_dir = materialise(cfg)
    shards = ShardSet(shard_dir)
    method = build_method("fedmrg", cfg.strategy.params)
    reference = method.build_model(cfg.model, shards.tasks, cfg.seed)
    with torch.no_grad():  # weights unlike the seeded ones, so that loading them is visible
        for name, param in reference.named_parameters():
            if name not in reference.frozen_keys:
                param.add_(0.05 * torch.randn_like(param))
    weights = float_state(reference)

    group = ServerModelGroup(cfg, str(shard_dir), f"ds-test-{stage}")
    try:
        for info in group.info:
            assert info["engine"] == "DeepSpeedEngine" and info["zero_stage"] == stage and info["world_size"] == ranks
            if stage == 3:  # parameters are partitioned: each rank holds about 1/ranks of them
                assert info["params_local"] <= info["params_total"] / ranks * 1.05
            else:
                assert info["params_local"] == info["params_total"]
        assert group.info[0]["optimizer"].startswith("DeepSpeedZeroOptimizer") or stage == 0

        group.load(weights)
        back = group.read(sorted(weights))
        for key in weights:
            np.testing.assert_allclose(back[key], weights[key], atol=1e-6)

        task = shards.tasks["pneumoniamnist"]
        test = shards.test("pneumoniamnist")
        generated = {(f, s): ids for _, f, s, ids in group.generate({("test", "pneumoniamnist"): len(test)}, batch_size=8)}
        ids = np.concatenate([generated[k] for k in sorted(generated)])
        reference.eval()
        x, _ = task.inputs(np.array(test.images), np.array(test.labels), reference.in_channels, torch.device("cpu"))
        expected = task.scores(reference.predict(x))
        assert ids.shape == expected.shape == (len(test), task.report_len - 1)
        assert (ids == expected).mean() > 0.95  # the engine's model is the global model

        split = shards.client(0).train["pneumoniamnist"]
        batch = (np.array(split.images[:8]), np.array(split.labels[:8]))
        before = group.read(["visual.weight"])["visual.weight"]
        losses = group.train_step("pneumoniamnist", [batch] * ranks)
        assert all(np.isfinite(losses))
        assert not np.allclose(group.read(["visual.weight"])["visual.weight"], before)  # a real optimizer step
    finally:
        group.close()


# ---------------------------------------------------------------------------------------------------
# End to end


@needs_iu
@pytest.mark.slow
def test_fedmrg_run_writes_reports_beside_references(data_dir, tmp_path):
    out = tmp_path / "results"
    proc = raymed(
        "run", "fedmrg", "--quiet",
        "--set", "rounds=2", "--set", "eval.every=2", "--set", f"output_dir={out}", "--set", f"data.root={data_dir}",
        "--set", f"data.report_root={IU}", "--set", "clients.num=4", "--set", "data.max_train_per_dataset=160",
        "--set", "data.max_test_per_dataset=24", "--set", "data.report_len=32", "--set", "ray.num_cpus=2",
        "--set", "ray.dashboard=false", "--set", "eval.report_samples=5", "--set", "model.decoder.pretrain_epochs=1",
        *[a for o in TINY_DECODER for a in ("--set", o)],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
    samples = [json.loads(line) for line in (run / "reports" / "round-0002.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(s["reference"] and "generated" in s and s["diagnosis"] in ("normal", "pneumonia") for s in samples)
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())  # the pretrained decoder it started from
    assert Path(saved["model"]["decoder"]["checkpoint"], "config.json").is_file()
    assert saved["data"]["report_tokenizer"] == saved["model"]["decoder"]["checkpoint"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["decoder"][0]["engine"] == "DeepSpeedEngine" and meta["decoder"][0]["zero_stage"] == 2
    import pandas as pd

    rounds = pd.read_parquet(run / "rounds.parquet")
    for key in ("global/pneumoniamnist/bleu4", "global/pneumoniamnist/rouge_l", "global/pneumoniamnist/cider", "global/pneumoniamnist/ce_f1", "personal/pneumoniamnist/bleu4"):
        assert np.isfinite(rounds[key].iloc[-1]), key
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
