import numpy as np
import pytest

from raymed.data.partition import label_classes, local_split, partition
from raymed.errors import DataError


def _labels(n=2000, classes=4, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=(n, 1))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "client_dirichlet", "quantity", "modality"])
def test_disjoint_and_covering(scheme):
    labels = {"pneumoniamnist": _labels(1500, 2), "breastmnist": _labels(500, 2, seed=1)}
    clients = partition(labels, scheme, num_clients=10, seed=7, alpha=0.5 if scheme != "iid" else None)
    for flag, lab in labels.items():
        rows = np.concatenate([c[flag] for c in clients if flag in c])
        assert len(rows) == len(lab) and len(np.unique(rows)) == len(lab)  # disjoint, covers everything
    assert all(sum(len(r) for r in c.values()) >= 2 for c in clients)
    if scheme == "modality":
        assert all(len(c) == 1 for c in clients)  # one modality per client
        assert [next(iter(c)) for c in clients[:4]] == ["pneumoniamnist", "breastmnist"] * 2


def test_same_seed_same_partition_other_seed_other():
    labels = {"a": _labels()}
    one = partition(labels, "dirichlet", 8, seed=1, alpha=0.3)
    two = partition(labels, "dirichlet", 8, seed=1, alpha=0.3)
    other = partition(labels, "dirichlet", 8, seed=2, alpha=0.3)
    assert all(np.array_equal(x["a"], y["a"]) for x, y in zip(one, two))
    assert not all(np.array_equal(x["a"], y["a"]) for x, y in zip(one, other))


def _label_skew(clients, labels, classes):
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(labels, minlength=classes) / len(labels)
    dists = []
    for c in clients:
        local = np.bincount(labels[c["a"]], minlength=classes) / len(c["a"])
        dists.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(dists))


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = _labels(5000, 5)
    skew = [
        _label_skew(partition({"a": labels}, "dirichlet", 20, seed=0, alpha=a), label_classes(labels), 5)
        for a in (100.0, 1.0, 0.1)
    ]
    assert skew[0] < skew[1] < skew[2], skew
    assert skew[0] < 0.1 and skew[2] > 0.5


def test_client_dirichlet_scales_to_many_clients_with_equal_shares():
    labels = _labels(4708, 2, seed=3)  # PneumoniaMNIST-sized
    with pytest.raises(DataError, match="left a client with 0 examples"):
        partition({"a": labels}, "dirichlet", 1000, seed=0, alpha=0.5)  # the per-class split cannot
    clients = partition({"a": labels}, "client_dirichlet", 1000, seed=0, alpha=0.5)
    sizes = [len(c["a"]) for c in clients]
    assert min(sizes) == 4 and max(sizes) == 5  # 4708 rows / 1000 clients
    rows = np.concatenate([c["a"] for c in clients])
    assert len(np.unique(rows)) == len(labels) == len(rows)
    skew = [
        _label_skew(partition({"a": labels}, "client_dirichlet", 50, seed=0, alpha=a), label_classes(labels), 2)
        for a in (100.0, 0.1)
    ]
    assert skew[0] < 0.1 < 0.3 < skew[1], skew


def test_quantity_skew_varies_sizes_not_labels():
    labels = _labels(5000, 3)
    clients = partition({"a": labels}, "quantity", 10, seed=0, alpha=0.5)
    sizes = [len(c["a"]) for c in clients]
    assert max(sizes) > 3 * min(sizes)


def test_impossible_splits_are_refused():
    with pytest.raises(DataError, match="lower clients.num"):
        partition({"a": _labels(10)}, "iid", 8, seed=0)
    with pytest.raises(DataError, match="clients.num=2 must be >= the 3 datasets"):
        partition({"a": _labels(), "b": _labels(), "c": _labels()}, "modality", 2, seed=0)
    with pytest.raises(DataError, match="data.alpha"):
        partition({"a": _labels(60, 2)}, "dirichlet", 25, seed=0, alpha=0.01)


def test_local_split_keeps_every_side_disjoint():
    train, val, hold = local_split(10, 0.1, 0.2, np.random.default_rng(0))
    assert (len(train), len(val), len(hold)) == (7, 1, 2)
    assert not set(train) & set(hold) and not set(train) & set(val) and not set(val) & set(hold)
    assert sorted([*train, *val, *hold]) == list(range(10))
    train, val, hold = local_split(2, 0.01, 0.01, np.random.default_rng(0))
    assert (len(train), len(val), len(hold)) == (1, 0, 1)  # one row is always left to train on
    train, val, hold = local_split(10, 0.0, 0.0, np.random.default_rng(0))
    assert len(train) == 10 and len(val) == len(hold) == 0
