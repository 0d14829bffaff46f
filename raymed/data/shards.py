"""Client shards, materialised once as Arrow IPC files and read by the client workers.

Layout of a shard set (a folder named by a hash of everything that determines its content)::

    meta.json                 datasets, tasks, image shapes, source files and md5s, synthetic flags
    index.parquet             client_id, dataset, offset, num_train, num_val, num_holdout
    {flag}.train.arrow        training rows of {flag}, reordered so that each client's rows are one
                              contiguous block: [its local-train rows | its validation rows | its held-out rows]
    {flag}.val.arrow          the validation split, for selection (best round, early stopping, Tune)
    {flag}.test.arrow         the official test split, for global evaluation
    {flag}.server.arrow       the server's own rows (``data.server_fraction`` > 0), which no client holds

The validation split is the source's own (MedMNIST's ``val``); a source without one gets a seeded
``data.val_fraction`` of its training rows, whole images at a time, so where several rows ask about
one image (question answering) no validation row shares an image with a training row. No client
trains on validation rows.

Held-out datasets (``data.held_out``) have a test split only: no client or server trains on them.

Images are stored channel-first (C×H×W or C×D×H×W) as fixed-size lists of uint8, one chunk per file, so
a worker reads a client's block straight from the file (``pread`` of its bytes: the resident set does
not grow with the file) without re-sending data through the driver; evaluation splits are memory-mapped.
The folder is written under a temporary name and renamed into place, so a half-written shard set is
never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymed.config import DataConfig, ExperimentConfig
from raymed.data.partition import local_split, partition, partition_by_site
from raymed.data.sources import DatasetFile, source_of, source_of_file
from raymed.data.tasks import TaskSpec, shared_label_space
from raymed.errors import DataError
from raymed.tasks.registry import run_task

FORMAT_VERSION = 6  # 6: questions about one image partitioned and split together; 5: validation splits (global and per client), normalisation statistics, the ordinal loss


# ---------------------------------------------------------------------------------------------------
# Sources (raymed.data.sources: the registry of MedMNIST files, question-answering sets, the user's own files, ...)


def locate_sources(d: DataConfig) -> list[DatasetFile]:
    """Find (and check) every dataset of ``data.datasets``; a one-line DataError when one is missing."""
    files = [source_of(flag, d).locate(flag, d) for flag in d.datasets + d.held_out]
    run_task(d.task).locate(d)  # what data.task needs beyond the datasets
    return files


def has_val_split(file: DatasetFile) -> bool:
    """Whether the source ships a validation split of its own."""
    return source_of_file(file).has_val_split(file)


def load_source(file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split (a run task may rewrite them before they are written: :meth:`RunTask.attach`)."""
    return source_of_file(file).load(file, split)


def source_task(file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
    """The task a run sets on a dataset: its own (classification, question answering), its grade read as a prognosis,
    or what ``data.task`` makes of it (:meth:`RunTask.dataset_task`; a task that needs the dealt rows
    makes it in :meth:`RunTask.attach`)."""
    d = cfg.data
    task = source_of_file(file).task(file, cfg)
    if file.flag in d.prognosis:
        return task.prognosis()
    return run_task(d.task).dataset_task(task, d)


def channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of N×C×spatial uint8 images, on intensities in [0, 1]."""
    channels = images.reshape(len(images), images.shape[1], -1).transpose(1, 0, 2).reshape(images.shape[1], -1)
    mean = channels.mean(axis=1, dtype=np.float64) / 255.0
    std = channels.std(axis=1, dtype=np.float64) / 255.0
    return tuple(float(m) for m in mean), tuple(float(max(v, 1e-3)) for v in std)


def _channel_first(images: np.ndarray, spatial_dims: int) -> np.ndarray:
    """MedMNIST stores N×H×W (gray), N×H×W×3 (RGB) or N×D×H×W (3D); return N×C×spatial."""
    if images.ndim == spatial_dims + 1:
        return images[:, None]
    return np.ascontiguousarray(np.moveaxis(images, -1, 1))


def _table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    flat_images = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), int(np.prod(images.shape[1:])))
    flat_labels = pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1).astype(np.int32)), labels.shape[1])
    return pa.table({"image": flat_images, "label": flat_labels})


def _write_arrow(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    table = _table(images, labels)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, len(images)))  # one batch: zero-copy slicing


def shard_key(cfg: ExperimentConfig, files: list[DatasetFile]) -> str:
    d = cfg.data
    identity = {
        "v": FORMAT_VERSION,
        "files": [(f.flag, f.size, f.md5) for f in files],
        "partition": d.partition,
        "task": d.task,
        "sr_scale": d.sr_scale,
        "run_task": run_task(d.task).shard_identity(d),
        "alpha": d.alpha,
        "holdout": d.holdout_fraction,
        "val": d.val_fraction,
        "normalise": d.normalise,
        "ordinal_loss": cfg.task.ordinal_loss,
        "head": cfg.model.head,
        "min": d.min_examples,
        "max_train": d.max_train_per_dataset,
        "max_test": d.max_test_per_dataset,
        "server_fraction": d.server_fraction,
        "held_out": d.held_out,
        "prognosis": d.prognosis,
        "clients": cfg.clients.num,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def class_counts(task: TaskSpec, labels: np.ndarray) -> list[int]:
    """Rows per class (multi-label: rows with each label), for the provenance in meta.json."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    if task.kind == "multilabel":
        return [int(v) for v in labels.sum(axis=0)]
    return [int(v) for v in np.bincount(labels[:, 0].astype(np.int64), minlength=task.num_classes)]


def image_groups(images: np.ndarray) -> np.ndarray:
    """One id per row, shared by the rows of identical images."""
    _, group = np.unique(images.reshape(len(images), -1), axis=0, return_inverse=True)
    return group.reshape(-1)


def image_group_rows(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A seeded ``fraction`` of the rows, whole images at a time (where several questions ask about
    one image, rows carved out this way never share an image with the rows left)."""
    group = image_groups(images)
    groups = rng.permutation(group.max() + 1)[: int(round(fraction * (group.max() + 1)))]
    return np.flatnonzero(np.isin(group, groups))


def partition_by_image(labels: dict[str, np.ndarray], groups: dict[str, np.ndarray], split) -> list[dict[str, np.ndarray]]:
    """``split(labels)`` (a partitioner) applied to whole images for the datasets in ``groups``: each
    image's first row stands for it, and a client gets every row of the images it is dealt."""
    first = {flag: np.unique(g, return_index=True)[1] for flag, g in groups.items()}
    clients = split({flag: y[first[flag]] if flag in groups else y for flag, y in labels.items()})
    for rows_by_flag in clients:
        for flag, dealt in rows_by_flag.items():
            if flag in groups:
                rows_by_flag[flag] = np.flatnonzero(np.isin(groups[flag], dealt))
    return clients


Rows = dict[str, tuple[np.ndarray, np.ndarray]]  # dataset -> (images N×C×spatial, labels) of one split


def materialise(cfg: ExperimentConfig, files: list[DatasetFile] | None = None) -> Path:
    """Build (or reuse) the shard set for ``cfg``; return its folder."""
    files = files if files is not None else locate_sources(cfg.data)
    out = (cfg.shards_dir / shard_key(cfg, files)).resolve()  # actors may run in other folders
    if (out / "meta.json").is_file():
        return out
    rng = np.random.default_rng([cfg.seed, 0x5A4D])  # caps, then each client's local split: one stream, in this order
    train, val, test, server = _load_splits(cfg, files, rng)
    tasks = _dataset_tasks(cfg, files, train)
    # Several rows about one image (question answering): an image's rows stay together, at one client
    # and on one side of its local split, so no held-out question shares an image with a trained one.
    groups = {flag: image_groups(x) for flag, (x, _) in train.items() if tasks[flag].rows_share_images}
    clients = _deal(cfg, files, tasks, train, groups)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:  # a failure part-way (a full disk) leaves no half-written temporary folder behind
        run_task(cfg.data.task).attach(cfg, files, tasks, train, val, test, clients, tmp, out)
        _write_clients(cfg, train, clients, groups, rng, tmp)
        for name, splits in (("val", val), ("server", server), ("test", test)):
            for flag, split in splits.items():
                _write_arrow(tmp / f"{flag}.{name}.arrow", *split)
        meta = {
            "format": FORMAT_VERSION,
            "num_clients": cfg.clients.num,
            "datasets": {f.flag: _describe(cfg, f, tasks, train, val, test, server) for f in files if f.flag in train},
            "held_out": {f.flag: _describe(cfg, f, tasks, train, val, test, server) for f in files if f.flag not in train},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(out)
    except OSError:  # another process built the same shard set first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_splits(cfg: ExperimentConfig, files: list[DatasetFile], rng: np.random.Generator) -> tuple[Rows, Rows, Rows, Rows]:
    """Every dataset's training, validation, test and server rows, channel-first, capped as configured."""
    d = cfg.data
    server_rng = np.random.default_rng([cfg.seed, 0x5E7])
    val_rng = np.random.default_rng([cfg.seed, 0x7A1])
    train: Rows = {}
    val: Rows = {}
    test: Rows = {}
    server: Rows = {}

    def capped(x: np.ndarray, y: np.ndarray, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
        if cap and len(x) > cap:
            keep = np.sort(rng.choice(len(x), cap, replace=False))
            return x[keep], y[keep]
        return x, y

    for f in files:
        spatial = 3 if f.flag.endswith("3d") else 2
        if f.flag in d.datasets:
            x, y = capped(*load_source(f, "train"), d.max_train_per_dataset)
            if has_val_split(f):
                xv, yv = load_source(f, "val")
            else:  # a seeded carve-out of the training rows, whole images at a time
                rows = image_group_rows(x, d.val_fraction, val_rng)
                xv, yv = x[rows], y[rows]
                rest = np.setdiff1d(np.arange(len(x)), rows)
                x, y = x[rest], y[rest]
            xv, yv = capped(xv, yv, d.max_test_per_dataset)
            val[f.flag] = (_channel_first(xv, spatial), yv)
            if d.server_fraction > 0:
                rows = image_group_rows(x, d.server_fraction, server_rng)
                server[f.flag] = (_channel_first(x[rows], spatial), y[rows])
                rest = np.setdiff1d(np.arange(len(x)), rows)
                x, y = x[rest], y[rest]
            train[f.flag] = (_channel_first(x, spatial), y)
        xt, yt = capped(*load_source(f, "test"), d.max_test_per_dataset)
        test[f.flag] = (_channel_first(xt, spatial), yt)
    return train, val, test, server


def _dataset_tasks(cfg: ExperimentConfig, files: list[DatasetFile], train: Rows) -> dict[str, TaskSpec]:
    """Each dataset's task as this run sets it: a shared label space, the training rows' own input statistics."""
    tasks = {f.flag: source_task(f, cfg) for f in files}
    if cfg.model.head == "shared":
        tasks = shared_label_space(tasks)
    if cfg.data.normalise == "dataset":
        for flag, (x, _) in train.items():
            if tasks[flag].normalisable:
                mean, std = channel_statistics(x)
                tasks[flag] = replace(tasks[flag], mean=mean, std=std)
    return tasks


def _deal(cfg: ExperimentConfig, files: list[DatasetFile], tasks: dict[str, TaskSpec], train: Rows, groups: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each client's training rows per dataset: by the data's own sites, or by the configured partitioner."""
    d = cfg.data
    if d.partition == "by_site":
        return partition_by_site({f.flag: source_of_file(f).sites(f, "train") for f in files if f.flag in train}, cfg.clients.num)
    return partition_by_image(
        {flag: tasks[flag].partition_labels(y) for flag, (_, y) in train.items()}, groups,
        lambda labels: partition(labels, d.partition, cfg.clients.num, cfg.seed, d.alpha, d.min_examples),
    )


def _write_clients(
    cfg: ExperimentConfig, train: Rows, clients: list[dict[str, np.ndarray]], groups: dict[str, np.ndarray], rng: np.random.Generator, tmp: Path
) -> None:
    """The training files, each client's rows one contiguous block [local train | validation | held
    out], and the index of those blocks."""
    d = cfg.data
    index_rows = []
    for flag, (x, y) in train.items():
        order, offset = [], 0
        for cid, rows_by_flag in enumerate(clients):
            rows = rows_by_flag.get(flag)
            if rows is None:
                continue
            local, local_val, held = local_split(len(rows), d.val_fraction, d.holdout_fraction, rng, groups[flag][rows] if flag in groups else None)
            order += [rows[local], rows[local_val], rows[held]]
            index_rows.append((cid, flag, offset, len(local), len(local_val), len(held)))
            offset += len(rows)
        order_arr = np.concatenate(order) if order else np.empty(0, np.int64)
        _write_arrow(tmp / f"{flag}.train.arrow", x[order_arr], y[order_arr])
    cids, flags, offsets, n_train, n_val, n_hold = zip(*sorted(index_rows))
    pq.write_table(
        pa.table({"client_id": cids, "dataset": flags, "offset": offsets, "num_train": n_train, "num_val": n_val, "num_holdout": n_hold}),
        tmp / "index.parquet",
    )


def _describe(cfg: ExperimentConfig, f: DatasetFile, tasks: dict[str, TaskSpec], train: Rows, val: Rows, test: Rows, server: Rows) -> dict:
    """A dataset's entry in meta.json: shapes, row counts, source file and md5, task, class counts."""
    task = tasks[f.flag]
    return {
        "shape": list(test[f.flag][0].shape[1:]),
        "num_train": int(len(train[f.flag][0])) if f.flag in train else 0,
        "num_val": int(len(val[f.flag][0])) if f.flag in val else 0,
        "val_source": ("own" if has_val_split(f) else f"carved from train ({cfg.data.val_fraction:g}, by image)") if f.flag in val else None,
        "num_server": int(len(server[f.flag][0])) if f.flag in server else 0,
        "num_test": int(len(test[f.flag][0])),
        "file": str(f.path),
        "md5": f.md5,
        "synthetic": f.synthetic,
        "task": asdict(task),
        "class_counts": {name: class_counts(task, split[f.flag][1]) for name, split in (("train", train), ("val", val), ("test", test))
                         if f.flag in split and task.kind in ("binary", "multiclass", "multilabel", "ordinal", "prognosis")},
    }


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N×C×spatial, read-only (a view into the memory map, or a client's rows as read)
    labels: np.ndarray  # int32, N×L

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> Split:
        return Split(self.images[rows], self.labels[rows])


@dataclass(frozen=True)
class ClientShard:
    client_id: int
    train: dict[str, Split]
    holdout: dict[str, Split]  # the client's own test rows (personalised metrics)
    val: dict[str, Split] = field(default_factory=dict)  # the client's own validation rows (selection)

    @property
    def num_train(self) -> int:
        return sum(len(s) for s in self.train.values())

    @property
    def datasets(self) -> list[str]:
        return list(self.train)


def _one_chunk(table: pa.Table, name: str) -> pa.Array:
    """A column as one array, straight from the memory map when it is one chunk (as written):
    ``combine_chunks`` copies even a single chunk, which put every worker's copy of the whole
    training split on its heap (313 MB each at 100,000 clients of 4 rows)."""
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


class ClientRows:
    """A training file's rows read a client at a time with ``pread``, not memory-mapped: a mapped
    file counts in a process's resident set by the page (and the kernel maps ~0.7 MB around each
    client read), so every worker's resident set grew with the file, i.e. with the clients
    registered. Labels are small and held in memory; images are read when a client is asked for."""

    def __init__(self, path: Path, start: int, shape: list[int], labels: np.ndarray):
        self.path, self.start, self.shape, self.labels = path, start, tuple(shape), labels
        self.row_bytes = int(np.prod(shape))
        self._fd: int | None = None

    @classmethod
    def of(cls, path: Path, shape: list[int]) -> ClientRows | None:
        """The reader of ``path`` (an Arrow file of one chunk, as written), or None."""
        source = pa.memory_map(str(path), "r")
        base = source.read_buffer(1).address  # the map's first byte
        source.seek(0)
        table = pa.ipc.open_file(source).read_all()
        if table.column("image").num_chunks != 1 or table.column("label").num_chunks != 1:
            return None
        images = table.column("image").chunk(0).flatten()  # uint8 values of the fixed-size lists
        labels_col = table.column("label").chunk(0)
        labels = labels_col.flatten().to_numpy(zero_copy_only=True).reshape(len(table), labels_col.type.list_size).copy()
        return cls(path, images.buffers()[1].address + images.offset - base, shape, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> Split:
        first, last, _ = rows.indices(len(self.labels))
        n = max(last - first, 0)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, n * self.row_bytes, self.start + first * self.row_bytes)
        images = np.frombuffer(data, np.uint8).reshape(n, *self.shape)  # read-only, as the mapped rows were
        return Split(images, self.labels[first:last])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # a descriptor means nothing in another process

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class ShardSet:
    """Read side of a shard set: memory-maps the Arrow files once and slices clients out of them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            index = pq.read_table(self.folder / "index.parquet")
        except (OSError, ValueError) as exc:
            raise DataError(
                f"shard set {self.folder} is unreadable ({exc}); delete it and rerun (it is rebuilt), and on a "
                f"cluster put data.cache_dir on storage every node can read"
            ) from None
        # Columns, sorted by client: every actor holds the index, so at 100,000 clients a dict of rows
        # per client (~600 bytes each) would cost each of them tens of MB.
        order = np.argsort(index.column("client_id").to_numpy(), kind="stable")
        self._rows = {name: index.column(name).to_numpy()[order] for name in ("client_id", "offset", "num_train", "num_val", "num_holdout")}
        encoded = index.column("dataset").combine_chunks().dictionary_encode()
        self._flags = encoded.dictionary.to_pylist()
        self._rows["dataset"] = encoded.indices.to_numpy()[order]
        self.tasks = {flag: TaskSpec(**info["task"]) for flag, info in self.meta["datasets"].items()}
        self.held_out_tasks = {flag: TaskSpec(**info["task"]) for flag, info in self.meta.get("held_out", {}).items()}
        self._arrays: dict[str, Split] = {}
        self._readers: dict[str, ClientRows | Split] = {}

    @property
    def num_clients(self) -> int:
        return int(self.meta["num_clients"])

    @property
    def synthetic(self) -> bool:
        return any(info["synthetic"] for info in self.meta["datasets"].values())

    def _split(self, flag: str, part: str) -> Split:
        key = f"{flag}.{part}"
        if key not in self._arrays:
            source = pa.memory_map(str(self.folder / f"{key}.arrow"), "r")
            table = pa.ipc.open_file(source).read_all()
            shape = {**self.meta["datasets"], **self.meta.get("held_out", {})}[flag]["shape"]
            images = _one_chunk(table, "image").flatten().to_numpy(zero_copy_only=True)
            labels_col = _one_chunk(table, "label")
            labels = labels_col.flatten().to_numpy(zero_copy_only=True).reshape(len(table), labels_col.type.list_size)
            self._arrays[key] = Split(images.reshape(len(table), *shape), labels)
        return self._arrays[key]

    def _client_file(self, flag: str) -> ClientRows | Split:
        """The training file of ``flag``, whose rows are the clients' (train, validation, held-out):
        read client by client (:class:`ClientRows`), or mapped whole when written in several chunks."""
        key = f"{flag}.train"
        if key not in self._readers:
            path = self.folder / f"{key}.arrow"
            shape = self.meta["datasets"][flag]["shape"]
            self._readers[key] = ClientRows.of(path, shape) or self._split(flag, "train")
        return self._readers[key]

    def client_ids(self) -> np.ndarray:
        """Every client's id, ascending."""
        return np.unique(self._rows["client_id"])

    def _client_rows(self, client_id: int) -> range:
        ids = self._rows["client_id"]
        return range(int(np.searchsorted(ids, client_id, "left")), int(np.searchsorted(ids, client_id, "right")))

    def client(self, client_id: int) -> ClientShard:
        train, val, holdout = {}, {}, {}
        r = self._rows
        for i in self._client_rows(client_id):
            flag = self._flags[r["dataset"][i]]
            start = int(r["offset"][i])
            n_train, n_val = int(r["num_train"][i]), int(r["num_val"][i])
            rows = self._client_file(flag)[start : start + n_train + n_val + int(r["num_holdout"][i])]
            train[flag] = rows[:n_train]
            val[flag] = rows[n_train : n_train + n_val]
            holdout[flag] = rows[n_train + n_val :]
        return ClientShard(client_id, train, holdout, val)

    def client_sizes(self) -> dict[int, tuple[int, int, int]]:
        """client id → (local training examples, validation examples, held-out examples)."""
        r = self._rows
        ids, first = np.unique(r["client_id"], return_index=True)
        sums = [np.add.reduceat(r[k], first) if len(first) else r[k][:0] for k in ("num_train", "num_val", "num_holdout")]
        return {int(c): (int(a), int(b), int(h)) for c, a, b, h in zip(ids, *sums)}

    def test(self, flag: str) -> Split:
        return self._split(flag, "test")

    def val(self, flag: str) -> Split:
        """The validation split of ``flag`` (empty when it has none: a carve-out of 0 rows)."""
        if not self.meta["datasets"].get(flag, {}).get("num_val"):
            return self._empty(flag)
        return self._split(flag, "val")

    def evaluation_split(self, flag: str, split: str) -> Split:
        """The global model's evaluation rows of ``flag``: ``val`` or ``test``."""
        return self.val(flag) if split == "val" else self.test(flag)

    def _empty(self, flag: str) -> Split:
        info = {**self.meta["datasets"], **self.meta.get("held_out", {})}[flag]
        return Split(np.zeros((0, *info["shape"]), np.uint8), np.zeros((0, 1), np.int32))

    def server(self, flag: str) -> Split:
        """The server's own rows of ``flag`` (empty when ``data.server_fraction`` is 0)."""
        if not self.meta["datasets"][flag].get("num_server"):
            return self._empty(flag)
        return self._split(flag, "server")
