
import hashlib

import medmnist
import numpy as np
import pytest
import torch

from raymed.data.medmnist_files import load_split, locate, verify, write_synthetic
from raymed.data.shards import ShardSet, materialise
from raymed.data.tasks import TaskSpec
from raymed.errors import DataError
from tests.conftest import small_config


def test_locate_checks_md5_and_search_order(data_dir, tmp_path, monkeypatch):
    f = locate("breastmnist", root=str(data_dir))
    assert f.path == data_dir / "breastmnist.npz"
    monkeypatch.setenv("RAYMED_DATA_DIR", str(data_dir))
    assert locate("breastmnist", root=str(tmp_path)).path == f.path  # falls through to RAYMED_DATA_DIR
    if not f.synthetic:
        assert f.md5 == medmnist.INFO["breastmnist"]["MD5"]


def test_missing_file_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYMED_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(DataError) as info:
        locate("dermamnist", root=str(tmp_path / "root"))
    msg = str(info.value)
    assert "dermamnist.npz not found" in msg and str(tmp_path / "root") in msg and str(tmp_path / "env") in msg
    assert "zenodo" in msg and "RAYMED_DATA_DIR" in msg


def test_corrupt_file_is_refused(data_dir, tmp_path):
    bad = tmp_path / "breastmnist.npz"
    bad.write_bytes((data_dir / "breastmnist.npz").read_bytes()[:5000])
    with pytest.raises(DataError, match="breastmnist.npz is corrupt"):
        verify(bad, "breastmnist")


def test_synthetic_file_matches_medmnist_format(tmp_path):
    path = write_synthetic("retinamnist", tmp_path, scale=0.05)
    f = verify(path, "retinamnist")
    assert f.synthetic
    ds = medmnist.RetinaMNIST(split="train", root=str(tmp_path), download=False)  # the real loader reads it
    assert ds.imgs.dtype == np.uint8 and ds.imgs.shape[1:] == (28, 28, 3) and ds.labels.shape[1] == 1
    images, labels = load_split(f, "test")
    assert labels.max() < 5 and images.shape[0] == labels.shape[0]
    write_synthetic("chestmnist", tmp_path, scale=0.001)
    _, multilabel = load_split(verify(tmp_path / "chestmnist.npz", "chestmnist"), "val")
    assert multilabel.shape[1] == 14
    write_synthetic("adrenalmnist3d", tmp_path, scale=0.02)
    volumes, _ = load_split(verify(tmp_path / "adrenalmnist3d.npz", "adrenalmnist3d"), "train")
    assert volumes.shape[1:] == (28, 28, 28)


def test_shards_hold_exactly_the_partitioned_rows(data_dir, tmp_path):
    cfg = small_config(
        data_dir, tmp_path, "clients.num=5", "data.partition=dirichlet", "data.alpha=1.0",
        "data.max_train_per_dataset=null", "data.datasets=[breastmnist,retinamnist]",
    )
    folder = materialise(cfg)
    assert materialise(cfg) == folder  # built once, then reused
    shards = ShardSet(folder)
    seen = {flag: [] for flag in cfg.data.datasets}
    as_bytes = lambda a: sorted(r.tobytes() for r in a.reshape(len(a), -1))  # noqa: E731
    for cid in range(5):
        client = shards.client(cid)
        for flag in client.datasets:
            train, val, hold = client.train[flag], client.val[flag], client.holdout[flag]
            assert len(train) >= 1 and len(val) >= 1 and len(hold) >= 1
            assert train.images.shape[1] == {"breastmnist": 1, "retinamnist": 3}[flag]  # channel-first
            assert not set(as_bytes(train.images)) & set(as_bytes(val.images))  # a client validates on rows it never trains on
            assert not set(as_bytes(train.images)) & set(as_bytes(hold.images))
            seen[flag].append(np.concatenate([train.images, val.images, hold.images]).reshape(len(train) + len(val) + len(hold), -1))
    for flag in cfg.data.datasets:
        rows = np.concatenate(seen[flag])
        source, _ = load_split(locate(flag, root=str(data_dir)), "train")
        source = np.moveaxis(source, -1, 1) if source.ndim == 4 else source[:, None]
        assert as_bytes(rows) == as_bytes(source)  # every training row exactly once, none invented
        assert shards.test(flag).images.shape[0] == 120
        # The global validation split is the source's own val split: no training or test row in it.
        val_rows, _ = load_split(locate(flag, root=str(data_dir)), "val")
        val_rows = np.moveaxis(val_rows, -1, 1) if val_rows.ndim == 4 else val_rows[:, None]
        assert set(as_bytes(shards.val(flag).images)) <= set(as_bytes(val_rows)) and len(shards.val(flag)) == min(120, len(val_rows))
        test_source, _ = load_split(locate(flag, root=str(data_dir)), "test")
        test_source = np.moveaxis(test_source, -1, 1) if test_source.ndim == 4 else test_source[:, None]
        validation = set(as_bytes(shards.val(flag).images))
        assert not validation & set(as_bytes(source)) and not validation & set(as_bytes(test_source))


def test_task_metrics_against_hand_computation():
    binary = TaskSpec("pneumoniamnist", "binary", 2, 1, 2)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([[0], [1], [1], [1]])
    m = binary.metrics(scores, labels)
    assert m["acc"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(1.0)  # every positive scores above the negative
    assert m["f1"] == pytest.approx((2 / 3 + 0.8) / 2)

    ordinal = TaskSpec("retinamnist", "ordinal", 5, 3, 2, ordinal_loss="cumulative")
    logits = torch.tensor([[5.0, 5.0, -5.0, -5.0], [-5.0, -5.0, -5.0, -5.0], [5.0, 5.0, 5.0, 5.0]])
    probs = ordinal.scores(logits)
    assert np.allclose(probs.sum(1), 1.0)
    assert list(ordinal.predict(probs)) == [2, 0, 4]
    m = ordinal.metrics(probs, np.array([[2], [1], [4]]))
    assert m["acc"] == pytest.approx(2 / 3) and m["mae"] == pytest.approx(1 / 3)
    loss_good = ordinal.loss(logits, torch.tensor([[2], [0], [4]]))
    loss_bad = ordinal.loss(logits, torch.tensor([[4], [4], [0]]))
    assert loss_good < loss_bad

    multilabel = TaskSpec("chestmnist", "multilabel", 3, 1, 2)
    m = multilabel.metrics(np.array([[0.9, 0.1, 0.6], [0.2, 0.7, 0.4]]), np.array([[1, 0, 0], [0, 1, 1]]))
    assert m["acc"] == pytest.approx(4 / 6)
    single_class = binary.metrics(np.array([[0.3, 0.7], [0.4, 0.6]]), np.array([[1], [1]]))
    assert np.isnan(single_class["auc"])  # undefined, not invented


def test_an_unofficial_medmnist_layout_file_is_refused_or_used_as_data_verify_says(data_dir, tmp_path, ray_session):
    """A subset of the release (a hospital's own export, a re-split) is not the official file: refused
    under data.verify=official with a line naming the setting, used under warn/off, and its true md5
    and unofficial flag recorded in meta.json."""
    import json

    from raymed.engine import run_experiment
    from raymed.errors import find_user_error

    if locate("breastmnist", root=str(data_dir)).synthetic:
        pytest.skip("needs the real BreastMNIST release (a synthetic stand-in is never the official file)")
    own = tmp_path / "own"
    own.mkdir()
    with np.load(data_dir / "breastmnist.npz") as npz:
        subset = {k: v[: 120 if k.startswith("train") else 40] if k.endswith(("_images", "_labels")) else v for k, v in npz.items()}
    np.savez_compressed(own / "breastmnist.npz", **subset)
    with pytest.raises(DataError, match="data.verify=warn"):
        verify(own / "breastmnist.npz", "breastmnist")
    if (data_dir / "breastmnist.npz").exists() and not locate("breastmnist", root=str(data_dir)).synthetic:
        assert verify(data_dir / "breastmnist.npz", "breastmnist", mode="warn").official  # the release stays official
    unofficial = verify(own / "breastmnist.npz", "breastmnist", mode="off")
    assert not unofficial.official and not unofficial.synthetic

    cfg = small_config(own, tmp_path, "data.datasets=[breastmnist]", "data.verify=warn", "rounds=1", "clients.num=3", "eval.personalised=false")
    run_dir = run_experiment(cfg)
    meta = json.loads((run_dir / "meta.json").read_text())
    record = meta["data_files"]["breastmnist"]
    assert record["official"] is False and record["md5"] == unofficial.md5 != medmnist.INFO["breastmnist"]["MD5"]
    assert meta["splits"]["breastmnist"]["num_test"] == 40
    with pytest.raises(Exception) as info:
        run_experiment(small_config(own, tmp_path / "strict", "data.datasets=[breastmnist]", "rounds=1", "clients.num=3"))
    assert "data.verify=warn" in str(find_user_error(info.value) or info.value)


def _own_npz(path, data_dir, classes: int = 9, **change):
    """A 9-class RGB file in MedMNIST's layout that no release has: RetinaMNIST's images, new labels."""
    with np.load(data_dir / "retinamnist.npz") as npz:
        # exactly 90 / 45 / 45 rows (repeated where a synthetic stand-in has fewer)
        arrays = {k: v[np.arange(90 if k.startswith("train") else 45) % len(v)] for k, v in npz.items() if k.endswith(("_images", "_labels"))}
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"] = (np.arange(len(arrays[f"{split}_images"])) % classes).reshape(-1, 1)
    arrays.update(change)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_own_npz_under_a_name_of_ones_choosing_runs_and_is_recorded(data_dir, tmp_path, ray_session):
    import json

    from raymed.data.own_files import read_npz
    from raymed.engine import run_experiment

    path = _own_npz(tmp_path / "our_pathology.npz", data_dir)
    cfg = small_config(data_dir, tmp_path, "data.files={hospital_path: " + str(path) + "}", "data.datasets=[hospital_path, breastmnist]",
                       "data.verify=warn", "rounds=1", "clients.num=4", "eval.personalised=false")
    shards = ShardSet(materialise(cfg))
    task = shards.tasks["hospital_path"]
    assert (task.kind, task.num_classes, task.channels, task.image_size) == ("multiclass", 9, 3, 28)
    run_dir = run_experiment(cfg)
    meta = json.loads((run_dir / "meta.json").read_text())
    record = meta["data_files"]["hospital_path"]
    assert record["md5"] == hashlib.md5(path.read_bytes()).hexdigest() and record["official"] is False
    assert meta["splits"]["hospital_path"]["class_counts"]["test"] == [5] * 9
    assert meta["data_files"]["breastmnist"]["official"] or meta["synthetic"]

    bad = {
        "no key val_labels": dict(val_labels=None),
        "class labels must be integers": dict(train_labels=np.full((90, 1), 1.5)),
        "holds -1": dict(test_labels=-np.ones((45, 1), np.int64)),
        "store images as uint8": dict(train_images=np.zeros((90, 28, 28, 3), np.float32)),
        "differ in size": dict(val_images=np.zeros((45, 32, 32, 3), np.uint8)),
        "test_images is empty": dict(test_images=np.zeros((0, 28, 28, 3), np.uint8), test_labels=np.zeros((0, 1), np.int64)),
    }
    for needle, change in bad.items():
        broken = _own_npz(tmp_path / f"bad-{len(needle)}.npz", data_dir, **change)
        with pytest.raises(DataError, match=needle) as info:
            read_npz(broken)
        assert str(broken) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        materialise(small_config(data_dir, tmp_path / "absent", "data.files={mine: /nowhere/mine.npz}", "data.datasets=[mine]"))


def _images_on_disk(root, data_dir, sites: bool):
    """RetinaMNIST images as png files: a CSV of (path, label[, site]) and the same as class sub-folders."""
    from PIL import Image

    with np.load(data_dir / "retinamnist.npz") as npz:
        images, labels = npz["train_images"][:60], npz["train_labels"][:60, 0] % 2
    rows = ["path,label" + (",site" if sites else "")]
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "folders" / ["benign", "malignant"][label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
        rows.append(f"folders/{['benign', 'malignant'][label]}/{i}.png,{['benign', 'malignant'][label]}" + (f",hospital_{i % 3}" if sites else ""))
    (root / "table.csv").write_text("\n".join(rows) + "\n")
    return root / "table.csv", root / "folders"


def test_an_image_folder_and_a_csv_with_sites_run_a_federation(data_dir, tmp_path, ray_session):
    from raymed.engine import run_experiment
    from raymed.results import read_run

    table, folders = _images_on_disk(tmp_path / "own", data_dir, sites=True)
    base = ["rounds=2", "clients.fraction=1.0", "eval.personalised=true", "data.datasets=[ours]", "data.size=28", "data.max_train_per_dataset=null"]
    cfg = small_config(data_dir, tmp_path / "csv", f"data.files={{ours: {table}}}", "data.partition=by_site", "clients.num=3", *base)
    shards = ShardSet(materialise(cfg))
    assert shards.num_clients == 3 and shards.tasks["ours"].num_classes == 2 and shards.tasks["ours"].channels == 3
    site_rows = [sum(shards.client_sizes()[c]) for c in range(3)]
    assert all(n > 0 for n in site_rows) and sum(site_rows) == shards.meta["datasets"]["ours"]["num_train"]
    assert read_run(run_experiment(cfg))["summary"]["status"] == "completed"
    with pytest.raises(DataError, match="holds 3 sites"):
        materialise(small_config(data_dir, tmp_path / "csv4", f"data.files={{ours: {table}}}", "data.partition=by_site", "clients.num=4", *base))

    cfg = small_config(data_dir, tmp_path / "dir", f"data.files={{ours: {folders}}}", "data.partition=iid", "clients.num=2", *base)
    assert read_run(run_experiment(cfg))["summary"]["status"] == "completed"
    with pytest.raises(DataError, match="needs a site for every row"):
        materialise(small_config(data_dir, tmp_path / "dir2", f"data.files={{ours: {folders}}}", "data.partition=by_site", "clients.num=2", *base))
    (tmp_path / "own" / "bad.csv").write_text("path,label\nfolders/nowhere.png,1\n")
    with pytest.raises(DataError, match="does not exist"):
        materialise(small_config(data_dir, tmp_path / "bad", f"data.files={{ours: {tmp_path / 'own' / 'bad.csv'}}}", "clients.num=2", *base))


def test_synthetic_clients_give_each_client_its_own_rows_and_say_synthetic(data_dir, tmp_path, ray_session):
    import json

    from raymed.engine import run_experiment

    cfg = small_config(data_dir, tmp_path, "data.datasets=[synthetic_clients]", "data.synthetic_clients=200", "data.synthetic_rows=4",
                       "data.partition=by_site", "data.max_train_per_dataset=null", "clients.num=200", "clients.fraction=0.05",
                       "rounds=1", "eval.personal_clients=50")
    shards = ShardSet(materialise(cfg))
    assert shards.num_clients == 200 and all(sum(s) == 4 for s in shards.client_sizes().values())
    meta = json.loads((run_experiment(cfg) / "meta.json").read_text())
    assert meta["synthetic"] is True and meta["data_files"]["synthetic_clients"]["synthetic"] is True
    with pytest.raises(DataError, match="holds 200 sites"):
        materialise(small_config(data_dir, tmp_path / "x", "data.datasets=[synthetic_clients]", "data.synthetic_clients=200",
                                 "data.partition=by_site", "data.max_train_per_dataset=null", "clients.num=20"))
