"""One data source's interface: what :mod:`raymed.data.sources` (the registry) asks of each.

A source finds a dataset's file or folder (:meth:`Source.locate`), reads one split as uint8 images and
integer labels (:meth:`Source.load`) and says what task the dataset is (:meth:`Source.task`). A new
source is one module with one ``@register_source`` class, imported by the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig
    from raymed.data.tasks import TaskSpec


@dataclass(frozen=True)
class DatasetFile:
    flag: str
    size: int
    path: Path
    md5: str
    synthetic: bool
    official: bool = True  # False: not the published release (data.verify allowed it, or the user's own file)
    source: str = "medmnist"  # the registered source that reads it


class Source(ABC):
    """One kind of data: subclasses set ``name`` (and ``priority``: lower is asked first) and implement
    the four abstract methods."""

    name: ClassVar[str]
    priority: ClassVar[int] = 50
    # Whether a missing dataset of this source may be replaced by a synthetic stand-in in the embedded
    # default (said in red everywhere); only the MedMNIST release can be, having a published layout.
    stand_in: ClassVar[bool] = False

    @abstractmethod
    def claims(self, flag: str, d: DataConfig) -> bool:
        """Whether dataset ``flag`` of this config is this source's."""

    @abstractmethod
    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        """Find (and check) the dataset; a one-line DataError when it is missing or malformed."""

    @abstractmethod
    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Images (uint8: N×H×W, N×H×W×3 or N×D×H×W) and labels (N×L) of ``split`` (train, val, test)."""

    @abstractmethod
    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        """The dataset's own task (classification, VQA, ...)."""

    def available(self, flag: str, d: DataConfig) -> bool:
        """Whether the dataset is on this machine now, without fetching anything. A file that is
        there but corrupt is a DataError, never "absent"; by default a missing one is too (the
        source's own one-line :meth:`locate` error), as only :attr:`stand_in` sources can go on without it."""
        self.locate(flag, d)
        return True

    def fetchable(self, flag: str, d: DataConfig) -> bool:
        """Whether a missing dataset can be fetched now, as the config allows (MedMNIST's download)."""
        return False

    def fetch(self, flag: str, d: DataConfig) -> DatasetFile:
        """Fetch a missing dataset (only when :meth:`fetchable`); by default, :meth:`locate`."""
        return self.locate(flag, d)

    def has_val_split(self, file: DatasetFile) -> bool:
        """Whether it ships a validation split (else one is carved out of its training rows)."""
        return True

    def sites(self, file: DatasetFile, split: str) -> np.ndarray | None:
        """The site (hospital) of each row of ``split``, where the data says (``partition: by_site``)."""
        return None


SOURCES: dict[str, Source] = {}


def register_source(cls: type[Source]) -> type[Source]:
    SOURCES[cls.name] = cls()
    return cls
