"""MedMNIST files: find them, check their md5, load them through the ``medmnist`` package.

Search order for ``{flag}.npz`` (``{flag}_{size}.npz`` for larger sizes): ``data.root``, the
``RAYMED_DATA_DIR`` environment variable, then the ``medmnist`` package's default root. A download
(from the URL in ``medmnist.INFO``) is attempted only when ``data.download`` is true.

``medmnist`` does not check md5 itself, so every file is checked against ``INFO[flag]["MD5"]`` here
(results cached by path, size and mtime). Synthetic stand-ins written by :func:`write_synthetic`
carry a marker array and are reported as synthetic wherever results are shown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raymed.data.source import DatasetFile, Source, register_source
from raymed.data.tasks import TaskSpec
from raymed.errors import DataError

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig

logger = logging.getLogger("raymed")

SYNTHETIC_MARKER = "raymed_synthetic"
SPLITS = ("train", "val", "test")


def _info(flag: str) -> dict:
    from medmnist import INFO

    return INFO[flag]


def file_name(flag: str, size: int = 28) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_md5(flag: str, size: int = 28) -> str:
    key = "MD5" if size == 28 else f"MD5_{size}"
    info = _info(flag)
    if key not in info:
        raise DataError(f"{flag} has no {size}x{size} release in MedMNIST; use data.size=28")
    return info[key]


def download_url(flag: str, size: int = 28) -> str:
    return _info(flag)["url" if size == 28 else f"url_{size}"]


def search_dirs(root: str | None) -> list[Path]:
    from medmnist.info import DEFAULT_ROOT

    dirs: list[Path] = []
    for candidate in (root, os.environ.get("RAYMED_DATA_DIR"), DEFAULT_ROOT):
        if candidate and Path(candidate).expanduser() not in dirs:
            dirs.append(Path(candidate).expanduser())
    return dirs


def side_data_dirs(given: str | None, env_var: str, sibling: str) -> list[Path]:
    """Where a dataset other than MedMNIST's files is looked for: the configured folder, ``$env_var``,
    then ``sibling/`` beside ``$RAYMED_DATA_DIR`` (as ../shared/data lays them out)."""
    candidates = [given, os.environ.get(env_var)]
    if os.environ.get("RAYMED_DATA_DIR"):
        candidates.append(str(Path(os.environ["RAYMED_DATA_DIR"]).expanduser().parent / sibling))
    return [Path(c).expanduser() for c in candidates if c]




def _md5_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raymed" / "md5.json"


def file_md5(path: Path) -> str:
    """md5 of a file, cached by (path, size, mtime) so large files are hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = _md5_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return cache[key]


def verify(path: Path, flag: str, size: int = 28, mode: str = "official") -> DatasetFile:
    """Accept a file whose md5 matches MedMNIST's, or a raymed synthetic stand-in. Any other file
    (a subset, a re-split, a hospital's own export in MedMNIST's layout) is refused under
    ``data.verify: official``, and accepted as unofficial under ``warn`` (saying so) or ``off``, once
    it opens as an npz with every split's images and labels. Its true md5 is recorded either way."""
    md5 = file_md5(path)
    want = expected_md5(flag, size)
    if md5 == want:
        return DatasetFile(flag, size, path, md5, synthetic=False)
    keys: list[str] = []
    try:
        with np.load(path) as npz:
            keys = list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        pass
    if SYNTHETIC_MARKER in keys and all(f"{s}_images" in keys for s in SPLITS):
        return DatasetFile(flag, size, path, md5, synthetic=True)
    layout = all(f"{s}_{kind}" in keys for s in SPLITS for kind in ("images", "labels"))
    if mode != "official" and layout:
        if mode == "warn":
            logger.warning("%s is not the MedMNIST release (md5 %s, expected %s); used as data.verify=warn allows, recorded as unofficial", path, md5, want)
        return DatasetFile(flag, size, path, md5, synthetic=False, official=False)
    if layout:
        raise DataError(
            f"{path} is not the MedMNIST release (md5 {md5}, expected {want}); if it is your own file in MedMNIST's "
            f"layout, set data.verify=warn to use it (recorded as unofficial), else download the release from {download_url(flag, size)}"
        )
    raise DataError(
        f"{path} is corrupt or not the MedMNIST release (md5 {md5}, expected {want}); delete it and "
        f"download it again from {download_url(flag, size)} (or set data.download=true)"
    )


def find_file(flag: str, size: int = 28, root: str | None = None) -> Path | None:
    """The first ``{flag}.npz`` in the search order, unchecked; None when there is none."""
    for directory in search_dirs(root):
        if (directory / file_name(flag, size)).is_file():
            return directory / file_name(flag, size)
    return None


def online(url: str = "https://zenodo.org", timeout_s: float = 3.0) -> bool:
    """Whether the MedMNIST download host answers (a TCP connection to it within ``timeout_s``)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(url).hostname or "zenodo.org"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def locate(flag: str, size: int = 28, root: str | None = None, download: bool | str = False, verify_mode: str = "official") -> DatasetFile:
    name = file_name(flag, size)
    dirs = search_dirs(root)
    found = find_file(flag, size, root)
    if found is not None:
        return verify(found, flag, size, verify_mode)
    offline = download == "auto" and not online(download_url(flag, size))
    if download and not offline:
        return _download(flag, size, dirs[0])
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(
        f"{name} not found (looked in {looked}{'; data.download=auto found no network' if offline else ''}); download it from "
        f"{download_url(flag, size)} into one of those folders or set RAYMED_DATA_DIR, allow a download with --set "
        f"data.download=true, or write a synthetic stand-in with `raymed data synth --out DIR {flag}`"
    )


def _download(flag: str, size: int, directory: Path) -> DatasetFile:
    import medmnist

    directory.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, _info(flag)["python_class"])
    try:
        cls(split="test", root=str(directory), download=True, size=size)
    except Exception:  # medmnist raises a multi-line RuntimeError for any network failure
        raise DataError(
            f"could not download {file_name(flag, size)} from {download_url(flag, size)} into {directory} "
            f"(offline?); fetch it by hand and point data.root or RAYMED_DATA_DIR at its folder"
        ) from None
    return verify(directory / file_name(flag, size), flag, size)


def load_split(file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, as stored: N×H×W, N×H×W×3 or N×D×H×W) and labels (N×L) of one split."""
    import medmnist

    cls = getattr(medmnist, _info(file.flag)["python_class"])
    try:
        ds = cls(split=split, root=str(file.path.parent), download=False, size=file.size)
        images, labels = np.asarray(ds.imgs), np.asarray(ds.labels)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise DataError(f"{file.path} could not be read ({type(exc).__name__}: {exc}); replace the file") from None
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{file.path}: {split} split has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.reshape(labels.shape[0], -1)


@register_source
class MedMNISTRelease(Source):
    """The MedMNIST files, found and md5-checked as above; any flag no other source claims."""

    name = "medmnist"
    priority = 100
    stand_in = True

    def claims(self, flag: str, d: DataConfig) -> bool:
        return True

    def available(self, flag: str, d: DataConfig) -> bool:
        path = find_file(flag, d.size, d.root)
        if path is None:
            return False
        verify(path, flag, d.size, d.verify)  # a corrupt file is an error, never quietly replaced
        return True

    def fetchable(self, flag: str, d: DataConfig) -> bool:
        return d.download is True or (d.download == "auto" and online(download_url(flag, d.size)))

    def fetch(self, flag: str, d: DataConfig) -> DatasetFile:
        return locate(flag, d.size, d.root, True, d.verify)

    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        return locate(flag, d.size, d.root, d.download, d.verify)

    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        return load_split(file, split)

    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        from dataclasses import replace


        return replace(TaskSpec.from_medmnist(file.flag, synthetic=file.synthetic), image_size=file.size, ordinal_loss=cfg.task.ordinal_loss)


def locate_all(flags: list[str], size: int = 28, root: str | None = None, download: bool = False) -> list[DatasetFile]:
    return [locate(flag, size, root, download) for flag in flags]


# ---------------------------------------------------------------------------------------------------
# Synthetic stand-ins in the exact MedMNIST npz format


def write_synthetic(flag: str, out_dir: str | Path, scale: float = 0.1, seed: int = 0, size: int = 28) -> Path:
    """Write ``{flag}.npz`` with MedMNIST's keys, shapes and dtypes, and learnable class structure.

    Each class gets a fixed random template; images are template + noise, so a model can learn the
    task. Split sizes are ``scale`` times the real ones (at least 20 per split). The file carries the
    ``raymed_synthetic`` marker, so everything computed on it is labelled synthetic.
    """
    info = _info(flag)
    rng = np.random.default_rng(seed)
    is_3d = flag.endswith("3d")
    channels = info["n_channels"]
    num_labels = len(info["label"])
    multilabel = info["task"].startswith("multi-label")
    shape = (size,) * (3 if is_3d else 2) + ((3,) if channels == 3 else ())
    templates = rng.uniform(40, 215, size=(num_labels, *shape))
    arrays: dict[str, np.ndarray] = {SYNTHETIC_MARKER: np.array(1, dtype=np.uint8)}
    for split in SPLITS:
        n = max(20, int(info["n_samples"][split] * scale))
        if multilabel:
            labels = (rng.random((n, num_labels)) < 0.2).astype(np.uint8)
            base = labels @ templates.reshape(num_labels, -1) / np.maximum(labels.sum(1, keepdims=True), 1)
            base = np.where(labels.sum(1, keepdims=True) > 0, base, 128.0).reshape(n, *shape)
        else:
            labels = rng.integers(0, num_labels, size=(n, 1)).astype(np.uint8)
            base = templates[labels[:, 0]]
        images = np.clip(base + rng.normal(0, 35, size=base.shape), 0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name(flag, size)
    np.savez_compressed(path, **arrays)
    return path
