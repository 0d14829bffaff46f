"""Super-resolution, VQA-RAD and prognosis tasks: inputs, targets, losses, metrics, the loader, and runs through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raymed.experiment import load_config
from raymed.data import vqa_rad
from raymed.data.shards import ShardSet, materialise
from raymed.data.tasks import TaskSpec, degrade, image_quality
from raymed.engine import run_experiment
from raymed.errors import ConfigError, DataError
from raymed.results import read_run
from raymed.results.report import final_metrics
from tests.conftest import SHARED, small_config

VQA_DIR = SHARED.parent / "vqa_rad"
needs_vqa = pytest.mark.skipif(not (VQA_DIR / "data_RAD" / "trainset.json").is_file(), reason="VQA-RAD not in ../shared/data")
CPU = torch.device("cpu")


def test_superresolution_batches_degrade_the_input_and_target_the_original(data_dir):
    task = TaskSpec.from_medmnist("breastmnist").super_resolution(2)
    with np.load(data_dir / "breastmnist.npz") as npz:
        images = npz["test_images"][:32, None]
    x, y = task.inputs(images, np.zeros((32, 1)), in_channels=3, device=CPU)
    assert x.shape == (32, 3, 28, 28) and y.shape == (32, 1, 28, 28)
    np.testing.assert_allclose(y.numpy(), task.targets(images, None), atol=1e-6)
    bicubic = image_quality(x[:, :1].numpy(), y.numpy())
    x4 = degrade(y, 4)
    assert image_quality(x4.numpy(), y.numpy())["psnr"] < bicubic["psnr"] < 100  # ×4 loses more than ×2
    assert image_quality(y.numpy(), y.numpy()) == {"psnr": 100.0, "ssim": 1.0}
    assert task.loss(x[:, :1], y) > 0 and task.primary_metric == "psnr"


def test_superresolution_config_refuses_vqa_and_3d():
    with pytest.raises(ConfigError, match="superresolution"):
        load_config(None, ["data.task=superresolution", "data.datasets=[vqarad_head]"])
    with pytest.raises(ConfigError, match="2D"):
        load_config(None, ["data.task=superresolution", "data.datasets=[adrenalmnist3d]"])
    with pytest.raises(ConfigError, match="2D"):
        load_config(None, ["strategy.name=omnifm", "data.datasets=[adrenalmnist3d]"])


@needs_vqa
def test_vqa_rad_loader_reads_the_release():
    folder = vqa_rad.find_root(str(VQA_DIR))
    vocab = vqa_rad.vocabulary(folder)
    train = {f: vqa_rad.load_split(folder, f, "train", 28) for f in vqa_rad.ORGANS}
    test = {f: vqa_rad.load_split(folder, f, "test", 28) for f in vqa_rad.ORGANS}
    assert sum(len(y) for _, y in train.values()) == 3064 and sum(len(y) for _, y in test.values()) == 451
    for images, labels in train.values():
        assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and labels.shape[1] == 2 + vqa_rad.QUESTION_LEN
        assert labels[:, 0].min() >= 0 and set(np.unique(labels[:, 1])) == {0, 1}  # every training answer is in the vocabulary
    unseen = np.concatenate([y[:, 0] for _, y in test.values()]) >= len(vocab.answers)
    assert 0 < unseen.mean() < 0.2  # a few test answers never occur in training: always wrong, their text kept
    assert all(vocab.all_answers[i] for i in np.concatenate([y[:, 0] for _, y in test.values()]))
    assert vocab.answers[:2] == ("no", "yes") and vocab.encode("Is there a fracture?")[:4] != [1, 1, 1, 1]


def test_vqa_rad_missing_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYMED_VQA_RAD_DIR", raising=False)
    monkeypatch.delenv("RAYMED_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="VQA-RAD not found") as err:
        vqa_rad.find_root(str(tmp_path))
    assert "\n" not in str(err.value)


def test_vqa_metrics_split_closed_and_open():
    task = TaskSpec("vqarad_head", "vqa", num_classes=3, channels=1, spatial_dims=2, question_vocab=10, question_len=4)
    scores = np.eye(3)[[0, 1, 2, 0]]
    labels = np.array([[0, 1], [1, 1], [1, 0], [-1, 0]])  # right, right, wrong, unseen answer
    assert task.metrics(scores, labels) == {"acc": 0.5, "acc_closed": 1.0, "acc_open": 0.0}


def _run(cfg):
    run = read_run(run_experiment(cfg))
    return run, final_metrics(run)


def test_superresolution_federation_improves_on_bicubic(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "data.task=superresolution", "clients.fraction=1.0", "rounds=3", "clients.lr=0.05", "clients.local_epochs=2")
    run, final = _run(cfg)
    shards = ShardSet(materialise(cfg))
    for flag, task in shards.tasks.items():
        assert task.kind == "superres" and task.scale == 2
        test = shards.test(flag)
        hr = torch.as_tensor(test.images.astype(np.float32) / 127.5 - 1)
        bicubic = image_quality(degrade(hr, 2).numpy(), hr.numpy())["psnr"]
        assert final[f"global/{flag}/psnr"] > bicubic, flag  # learnt residual beats plain bicubic
        assert 0 < final[f"global/{flag}/ssim"] <= 1
    assert math.isfinite(final["personal/client_mean/psnr"]) and "global/mean/psnr" in final


@needs_vqa
def test_vqa_validation_is_carved_out_by_image(tmp_path):
    """VQA-RAD ships no validation split: a seeded share of its training questions, whole images at a
    time, so no validation question shares an image with a question any client trains on; and the
    clients are dealt whole images, so no client's held-out question shares one with a trained one."""
    cfg = load_config(
        None,
        [
            "data.datasets=[vqarad_head,vqarad_chest]",
            f"data.vqa_root={VQA_DIR}",
            "data.val_fraction=0.2",
            "clients.num=3",
            f"output_dir={tmp_path / 'results'}",
            f"data.cache_dir={tmp_path / 'shards'}",
        ],
    )
    shards = ShardSet(materialise(cfg))
    as_bytes = lambda a: {r.tobytes() for r in np.asarray(a).reshape(len(a), -1)}  # noqa: E731
    for flag in ("vqarad_head", "vqarad_chest"):
        assert "carved" in shards.meta["datasets"][flag]["val_source"]
        val = shards.val(flag)
        client_rows = [shards.client(c) for c in range(3)]
        trained = set().union(*(as_bytes(c.train[flag].images) for c in client_rows if flag in c.train))
        held = set().union(*(as_bytes(c.holdout[flag].images) for c in client_rows if flag in c.holdout))
        assert len(val) > 0 and trained
        assert not as_bytes(val.images) & (trained | held), flag  # no image on both sides
        assert held and not held & trained, flag  # no held-out question asks about an image any client trains on
        owners = [as_bytes(c.train[flag].images) | as_bytes(c.holdout[flag].images) | as_bytes(c.val[flag].images) for c in client_rows if flag in c.train]
        assert sum(len(o) for o in owners) == len(set().union(*owners)), flag  # each image at one client only
        # The carve-out is questions, not rows lost: every training question is in val or with a client.
        total = sum(len(c.train[flag]) + len(c.val[flag]) + len(c.holdout[flag]) for c in client_rows if flag in c.train)
        assert total + len(val) == len(vqa_rad.load_split(vqa_rad.find_root(str(VQA_DIR)), flag, "train", 28)[0])


@needs_vqa
def test_vqa_federation_runs_per_organ(tmp_path, ray_session):
    cfg = load_config(
        None,
        [
            "data.datasets=[vqarad_head,vqarad_chest,vqarad_abd]",
            f"data.vqa_root={VQA_DIR}",
            "clients.num=3",
            "clients.fraction=1.0",
            "rounds=2",
            "strategy.name=omnifm",
            f"output_dir={tmp_path / 'results'}",
            f"data.cache_dir={tmp_path / 'shards'}",
            "ray.dashboard=false",
        ],
    )
    run, final = _run(cfg)
    for flag in vqa_rad.ORGANS:
        assert 0 <= final[f"personal/{flag}/acc"] <= 1 and f"personal/{flag}/acc_closed" in final
    assert final["personal/client_mean/acc"] > 0.15  # uniform guessing over 476 answers: 0.002
    assert Path(run["dir"], "config.yaml").is_file()


# ---------------------------------------------------------------------------------------------------
# Prognosis: an ordinal grade read as a discrete time to event


def test_prognosis_loss_is_the_logistic_hazard_nll_and_probabilities_sum_to_one():
    task = TaskSpec.from_medmnist("retinamnist").prognosis()
    assert task.num_outputs == 4 and task.graded
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    grades = torch.tensor([0, 1, 3, 4, 2])
    h = torch.sigmoid(logits)
    manual = []
    for row, y in zip(h, grades.tolist()):
        ll = sum(torch.log(1 - row[k]) for k in range(y)) + (torch.log(row[y]) if y < 4 else 0.0)
        manual.append(-ll)
    torch.testing.assert_close(task.loss(logits, grades[:, None]), torch.stack(manual).mean())
    probs = task.scores(logits)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[:, 0], h[:, 0].numpy(), rtol=1e-6)  # P(Y=0) = h_0


def test_prognosis_c_index_orders_risk_by_grade():
    task = TaskSpec.from_medmnist("retinamnist").prognosis()
    grades = np.array([0, 1, 2, 3, 4])
    onehot = np.eye(5)
    assert task.metrics(onehot, grades[:, None])["c_index"] == 1.0  # expected grade == grade: every pair in order
    assert task.metrics(onehot[::-1], grades[:, None])["c_index"] == 0.0
    assert math.isnan(task.metrics(onehot[:1].repeat(3, 0), np.zeros((3, 1), int))["c_index"])  # no comparable pair


def test_prognosis_needs_a_graded_dataset(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="prognosis lists breastmnist, which is not a graded"):
        small_config(data_dir, tmp_path, "data.prognosis=[breastmnist]")
    with pytest.raises(ValueError, match="not ordinal"):
        TaskSpec.from_medmnist("breastmnist").prognosis()


def test_auc_and_macro_f1_equal_scikit_learn_on_model_outputs():
    """AUC (one-vs-rest macro for multi-class, as MedMNIST reports it) and macro-F1 from logits through
    the task's own scores, against scikit-learn on the same probabilities and arg-max predictions."""
    from sklearn.metrics import f1_score, roc_auc_score

    rng = torch.Generator().manual_seed(0)
    for task in (TaskSpec("bloodmnist", "multiclass", 8, 3, 2), TaskSpec("breastmnist", "binary", 2, 1, 2), TaskSpec("retinamnist", "ordinal", 5, 3, 2)):
        labels = np.arange(60)[:, None] % task.num_classes
        logits = torch.randn(60, task.num_outputs, generator=rng) + 2.0 * torch.nn.functional.one_hot(torch.as_tensor(labels[:, 0]), task.num_outputs)
        scores = task.scores(logits)
        probs = torch.softmax(logits, 1).numpy()
        m = task.metrics(scores, labels)
        y, pred = labels[:, 0], probs.argmax(1)
        assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro")), task.kind
        expected = roc_auc_score(y, probs[:, 1]) if task.num_classes == 2 else roc_auc_score(y, probs, multi_class="ovr", average="macro")
        assert m["auc"] == pytest.approx(expected, rel=1e-6), task.kind
        assert m["acc"] == pytest.approx(np.mean(pred == y)) and 0.3 < m["acc"] < 1.0  # a fixture that is neither trivial nor hopeless


def test_shared_head_trains_the_union_softmax_and_an_other_datasets_class_is_wrong():
    from raymed.data.tasks import shared_label_space

    tasks = shared_label_space({
        "pneumoniamnist": TaskSpec.from_medmnist("pneumoniamnist"),  # classes 0-1 of the union
        "retinamnist": TaskSpec.from_medmnist("retinamnist"),  # classes 2-6
    })
    retina = tasks["retinamnist"]
    assert (retina.label_offset, retina.union_classes, retina.num_outputs) == (2, 7, 7)
    torch.manual_seed(0)
    logits, y = torch.randn(6, 7), torch.tensor([[0], [4], [1], [2], [3], [0]])
    torch.testing.assert_close(retina.loss(logits, y), torch.nn.functional.cross_entropy(logits, y[:, 0] + 2))
    weighted = retina.balanced(y.numpy())  # class weights apply to the dataset's own columns of the union
    full = torch.ones(7)
    full[2:] = torch.tensor(weighted.class_weights)
    torch.testing.assert_close(weighted.loss(logits, y), torch.nn.functional.cross_entropy(logits, y[:, 0] + 2, weight=full))

    scores = retina.scores(logits)
    assert scores.shape == (6, 6)  # its 5 grades, then the likeliest other dataset's class
    union_pred = logits.argmax(dim=1).numpy()
    pred = retina.predict(scores)
    for u, p in zip(union_pred, pred):
        assert p == (u - 2 if 2 <= u < 7 else 5)  # argmax over the union; outside its own classes = column 5
    right = (union_pred - 2 == y[:, 0].numpy()).mean()
    assert retina.metrics(scores, y.numpy())["acc"] == pytest.approx(right)
    with pytest.raises(ConfigError, match="model.head=shared needs single-label"):
        shared_label_space({"chestmnist": TaskSpec.from_medmnist("chestmnist")})


@pytest.mark.parametrize("model_name, strategy", [("cnn", "fedavg"), ("resnet18", "fedavg"), ("cnn", "omnifm")])
def test_superresolution_decoder_reads_the_feature_map_and_returns_the_target_shape(data_dir, tmp_path, model_name, strategy):
    from raymed.methods import build_method
    from raymed.models import SuperResolutionHead

    cfg = small_config(data_dir, tmp_path, "data.task=superresolution", f"model.name={model_name}", f"strategy.name={strategy}")
    shards = ShardSet(materialise(cfg))
    model = build_method(strategy, cfg.strategy.params).build_model(cfg.model, shards.tasks, cfg.seed)
    flag, task = next(iter(shards.tasks.items()))
    split = shards.test(flag)
    x, target = task.inputs(np.array(split.images[:4]), np.array(split.labels[:4]), model.in_channels, torch.device("cpu"))
    head = model.head(flag)
    assert isinstance(head, SuperResolutionHead) and any(isinstance(m, torch.nn.PixelShuffle) for m in head.decode)
    assert model.feature_map(x).dim() == 4  # it decodes a spatial map, not one vector per image
    out = model(x, flag)
    assert out.shape == target.shape
    torch.testing.assert_close(out, x[:, : task.channels])  # the last convolution starts at zero: the bicubic estimate
