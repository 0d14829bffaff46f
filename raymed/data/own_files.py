"""The researcher's own data: a MedMNIST-layout ``.npz`` under a name of their choosing (``data.files``).

The layout is MedMNIST's: ``train_images``, ``val_images``, ``test_images`` (uint8, N×H×W for gray,
N×H×W×3 for RGB, or N×D×H×W volumes) and ``train_labels``, ``val_labels``, ``test_labels`` (N or N×L
integers). The task follows from the labels: one column with two classes is binary, more classes
multi-class (classes 0 … C−1, C = the largest label + 1), several 0/1 columns multi-label; image size
and channels follow from the arrays. The file's md5 is recorded with every run. A name that is a
MedMNIST flag is the release's file at another path, md5-checked as ``data.verify`` says.

    data:
      files: {hospital_path: /data/our_pathology.npz}
      datasets: [hospital_path, pneumoniamnist]

Bad input is one line naming the file, the key and the value: a missing key, labels that are not
non-negative integers, images that are not uint8 or differ in size between splits, an empty split.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raymed.data.medmnist_files import SPLITS, MedMNISTRelease, file_md5, verify
from raymed.data.source import DatasetFile, Source, register_source
from raymed.data.tasks import TaskSpec
from raymed.errors import DataError

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig

KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a MedMNIST-layout file, checked (read once per file version: locate, task and
    each split's load share it)."""
    return _read_npz(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_npz(path_str: str, mtime_ns: int) -> dict[str, np.ndarray]:
    path = Path(path_str)
    try:
        with np.load(path) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: no key {missing[0]} (a MedMNIST-layout file has {', '.join(KEYS)}); it has {', '.join(npz.files) or 'none'}")
            arrays = {k: npz[k] for k in KEYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} could not be read as an .npz ({type(exc).__name__}: {exc}); replace the file") from None
    shapes = set()
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) == 0:
            raise DataError(f"{path}: {split}_images is empty; every split (train, val, test) needs rows")
        if images.dtype != np.uint8:
            raise DataError(f"{path}: {split}_images is {images.dtype}; store images as uint8 (0-255), as MedMNIST does")
        if len(labels) != len(images):
            raise DataError(f"{path}: {split}_images has {len(images)} rows but {split}_labels has {len(labels)}")
        labels = labels.reshape(len(labels), -1)
        if labels.dtype.kind not in "biuf":
            example = labels.flat[0].item() if labels.size else ""
            raise DataError(
                f"{path}: {split}_labels holds {labels.dtype.name} values such as {example!r}; class labels must be integers 0 … C−1 "
                f"(map class names to integers, or use a CSV, whose label column may hold names)"
            )
        if images.ndim in (3, 4) and not (images.ndim == 4 and images.shape[-1] != 3) and images.shape[1] != images.shape[2]:
            raise DataError(
                f"{path}: {split}_images are {images.shape[1]}×{images.shape[2]} (height×width); raymed's models take square images: "
                f"pad or resize them to a square, e.g. 28×28"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))].flat[0]
                raise DataError(f"{path}: {split}_labels holds {bad!r}; class labels must be integers 0 … C−1")
        if labels.min() < 0:
            raise DataError(f"{path}: {split}_labels holds {labels.min()}; class labels must be integers 0 … C−1")
        arrays[f"{split}_labels"] = labels.astype(np.int64)
        shapes.add(images.shape[1:])
    if len(shapes) > 1:
        raise DataError(f"{path}: the splits' images differ in size ({', '.join(map(str, sorted(shapes)))}); resize them to one size")
    return arrays


def _is_medmnist(flag: str) -> bool:
    from medmnist import INFO

    return flag in INFO


@register_source
class OwnFiles(Source):
    name = "files"
    priority = 0

    def claims(self, flag: str, d: DataConfig) -> bool:
        return flag in d.files and d.files[flag].lower().endswith(".npz")

    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        path = Path(d.files[flag]).expanduser()
        if not path.is_file():
            raise DataError(f"data.files.{flag}: {path} does not exist; point it at a MedMNIST-layout .npz")
        if _is_medmnist(flag):  # the release's file at a path of the user's choosing
            return replace(verify(path, flag, d.size, d.verify), source=self.name)
        arrays = read_npz(path)
        return DatasetFile(flag, int(arrays["train_images"].shape[1]), path, file_md5(path), synthetic=False, official=False, source=self.name)

    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = read_npz(file.path)
        return arrays[f"{split}_images"], arrays[f"{split}_labels"]

    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        if _is_medmnist(file.flag):
            return MedMNISTRelease().task(file, cfg)
        arrays = read_npz(file.path)
        labels = np.concatenate([arrays[f"{s}_labels"] for s in SPLITS])
        images = arrays["train_images"]
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if labels.shape[1] > 1:
            if labels.max() > 1:
                raise DataError(f"{file.path}: labels have {labels.shape[1]} columns (multi-label) but hold {labels.max()}; multi-label columns are 0/1")
            kind, classes = "multilabel", labels.shape[1]
        else:
            classes = int(labels.max()) + 1
            seen = np.unique(labels)
            if classes > 2 and len(seen) * 2 < classes:  # most classes 0 … C−1 never occur: a stray value, not a class
                raise DataError(
                    f"{file.path}: label {int(labels.max())} would make {classes} classes of which only {len(seen)} occur "
                    f"({', '.join(map(str, seen[:8]))}{' …' if len(seen) > 8 else ''}); class labels are 0 … C−1: relabel, or remove the stray row(s)"
                )
            if classes < 2:
                raise DataError(f"{file.path}: every label is {labels.max()}; a classification task needs at least two classes")
            kind = "binary" if classes == 2 else "multiclass"
        return TaskSpec(dataset=file.flag, kind=kind, num_classes=classes, channels=3 if rgb else 1,
                        spatial_dims=2 if rgb or images.ndim == 3 else 3, image_size=file.size)
