"""The researcher's own images: a folder of class sub-folders, or a CSV of (path, label[, site][, split]).

``data.files: {name: path}`` with ``path`` a folder or a ``.csv`` (a ``.npz`` is :mod:`raymed.data.own_files`'):

- a folder ``root/<class>/<image>`` (png, jpg, jpeg, bmp, tif, tiff): the sub-folder is the label
  (classes in sorted name order);
- a CSV with a header: ``path`` (relative to the CSV's folder, or absolute) and ``label`` (an integer
  0 … C−1, or a class name: names in sorted order), and optionally ``site`` (the hospital that holds
  the row: ``partition: by_site`` gives each site its own client) and ``split`` (train, val or test).

Images are read with Pillow and resized to ``data.size`` (bilinear); they are gray unless some image
is in colour, then all are RGB. Without a ``split`` column the rows are split 70 / 10 / 20 into
train / val / test, seeded by the file's content, not the run's seed: the test rows are a property of
the data, the same in every run (per site when there is a site column). Bad input is one line naming
the file, the row or column, and the value.
"""

from __future__ import annotations

import csv
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raymed.data.medmnist_files import SPLITS
from raymed.data.source import DatasetFile, Source, register_source
from raymed.data.tasks import TaskSpec
from raymed.errors import DataError

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_SHARES = (0.7, 0.1, 0.2)  # train, val, test without a split column


@dataclass(frozen=True)
class Table:
    images: np.ndarray  # N×H×W or N×H×W×3, uint8
    labels: np.ndarray  # N×1 int64
    sites: np.ndarray | None  # N site names, or None
    split: np.ndarray  # N of "train" / "val" / "test"
    classes: tuple[str, ...]


def rows_of(path: Path) -> list[dict[str, str]]:
    """(path, label[, site][, split]) rows of a CSV or of a folder of class sub-folders."""
    if path.is_dir():
        rows = [{"path": str(f), "label": d.name} for d in sorted(p for p in path.iterdir() if p.is_dir())
                for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not rows:
            raise DataError(f"{path}: no images in class sub-folders (<folder>/<class>/<image>.png); nothing to read")
        return rows
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("path", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r}; the CSV needs a header with path and label (and optionally site, split)")
        rows = [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise DataError(f"{path}: no rows under the header")
    for number, row in enumerate(rows, start=2):
        image = Path(row["path"]) if Path(row["path"]).is_absolute() else path.parent / row["path"]
        if not image.is_file():
            raise DataError(f"{path}, line {number}: image {row['path']!r} does not exist (paths are relative to the CSV's folder)")
        row["path"] = str(image)
        if "split" in row and row["split"] not in SPLITS:
            raise DataError(f"{path}, line {number}: split {row['split']!r}; use train, val or test")
    return rows


@functools.lru_cache(maxsize=8)
def read_table(path_str: str, size: int, mtime_ns: int) -> Table:
    """Every row, images resized to ``size`` (cached per file, size and modification time)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path_str)
    rows = rows_of(path)
    names = [r["label"] for r in rows]
    if all(n.lstrip("-").isdigit() for n in names):
        labels = np.array([int(n) for n in names], dtype=np.int64)
        if labels.min() < 0:
            raise DataError(f"{path}: label {labels.min()}; integer labels are classes 0 … C−1")
        classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    else:
        classes = tuple(sorted(set(names)))
        labels = np.array([classes.index(n) for n in names], dtype=np.int64)
    pictures = []
    for row in rows:
        try:
            with Image.open(row["path"]) as im:
                pictures.append(im.convert("RGB") if im.mode not in ("L", "I;16", "I", "F", "1") else im.convert("L"))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: image {row['path']} could not be read ({type(exc).__name__}); replace it") from None
    colour = any(p.mode == "RGB" for p in pictures)
    images = np.stack([np.asarray(p.convert("RGB" if colour else "L").resize((size, size), Image.BILINEAR), dtype=np.uint8) for p in pictures])
    sites = np.array([r.get("site", "") for r in rows]) if any(r.get("site") for r in rows) else None
    if sites is not None and not all(sites):
        raise DataError(f"{path}: the site column is empty on some rows; give every row its site (or drop the column)")
    if all(r.get("split") for r in rows):
        split = np.array([r["split"] for r in rows])
    else:
        split = seeded_split(images, sites)
    for name in SPLITS:
        if not (split == name).any():
            raise DataError(f"{path}: the {name} split is empty; give it rows (split column) or add images")
    return Table(images, labels.reshape(-1, 1), sites, split, classes)


def seeded_split(images: np.ndarray, sites: np.ndarray | None) -> np.ndarray:
    """70 / 10 / 20 train / val / test, seeded by the images themselves (per site when there are sites)."""
    rng = np.random.default_rng(int(hashlib.md5(images.tobytes()).hexdigest()[:8], 16))
    split = np.empty(len(images), dtype=object)
    groups = [np.arange(len(images))] if sites is None else [np.flatnonzero(sites == s) for s in sorted(set(sites))]
    for rows in groups:
        order = rng.permutation(rows)
        n_test = max(1, round(SPLIT_SHARES[2] * len(rows))) if len(rows) >= 3 else 0
        n_val = max(1, round(SPLIT_SHARES[1] * len(rows))) if len(rows) >= 3 else 0
        split[order[:n_test]] = "test"
        split[order[n_test : n_test + n_val]] = "val"
        split[order[n_test + n_val :]] = "train"
    return split.astype(str)


def _table(file: DatasetFile) -> Table:
    return read_table(str(file.path), file.size, file.path.stat().st_mtime_ns)


@register_source
class ImageFolder(Source):
    name = "images"
    priority = 0

    def claims(self, flag: str, d: DataConfig) -> bool:
        return flag in d.files and (Path(d.files[flag]).expanduser().is_dir() or d.files[flag].lower().endswith(".csv"))

    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        path = Path(d.files[flag]).expanduser().resolve()
        if not path.exists():
            raise DataError(f"data.files.{flag}: {path} does not exist; point it at a folder of class sub-folders or a CSV")
        file = DatasetFile(flag, d.size, path, "", synthetic=False, official=False, source=self.name)
        table = _table(file)  # reads and checks every row now, before anything is written
        digest = hashlib.md5(table.images.tobytes())
        digest.update(table.labels.tobytes())
        return DatasetFile(flag, d.size, path, digest.hexdigest(), synthetic=False, official=False, source=self.name)

    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        table = _table(file)
        rows = table.split == split
        return table.images[rows], table.labels[rows]

    def sites(self, file: DatasetFile, split: str) -> np.ndarray | None:
        table = _table(file)
        return None if table.sites is None else table.sites[table.split == split]

    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        table = _table(file)
        classes = len(table.classes)
        if classes < 2:
            raise DataError(f"{file.path}: one class only ({table.classes[0]}); a classification task needs at least two")
        return TaskSpec(dataset=file.flag, kind="binary" if classes == 2 else "multiclass", num_classes=classes,
                        channels=3 if table.images.ndim == 4 else 1, spatial_dims=2, image_size=file.size)
