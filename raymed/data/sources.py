"""Data sources behind one interface, in one registry (timm-style).

Each source implements :class:`~raymed.data.source.Source` (find a dataset, read a split, say its
task). :mod:`raymed.data.shards` asks :func:`source_of` which source holds a dataset and knows no
source itself; a new source is one module with one ``@register_source`` class, imported here. The
built-in ones, asked in this order:

- ``files`` (:mod:`raymed.data.own_files`): the user's own MedMNIST-layout ``.npz`` under a name of
  their choosing (``data.files``);
- ``images`` (:mod:`raymed.data.image_folder`): the user's own images, a folder of class sub-folders
  or a CSV of (path, label[, site][, split]) (``data.files``);
- ``vqa_rad`` (:mod:`raymed.data.vqa_rad`): VQA-RAD's organs;
- sources a run task brings (:mod:`raymed.tasks`: report generation's R2Gen-format folder);
- ``synthetic_clients`` (:mod:`raymed.data.synthetic_clients`): generated data per client, for
  engine-scale experiments only;
- ``medmnist`` (:mod:`raymed.data.medmnist_files`): the MedMNIST release, any other flag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raymed.data import image_folder, medmnist_files, own_files, synthetic_clients, vqa_rad  # noqa: F401  (each registers its source)
from raymed.data.source import SOURCES, DatasetFile, Source, register_source
import raymed.tasks.registry  # noqa: F401  (run tasks register the sources they bring: R2Gen)

if TYPE_CHECKING:
    from raymed.config import DataConfig

__all__ = ["SOURCES", "DatasetFile", "Source", "register_source", "registered", "source_of", "source_of_file"]


def registered() -> list[Source]:
    """Every source, in the order they are asked."""
    return sorted(SOURCES.values(), key=lambda s: (s.priority, s.name))


def source_of(flag: str, d: DataConfig) -> Source:
    return next(s for s in registered() if s.claims(flag, d))


def source_of_file(file: DatasetFile) -> Source:
    return SOURCES[file.source]
