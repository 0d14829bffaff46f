"""``synthetic_clients``: generated data for engine-scale experiments only — never in accuracy tables.

``data.datasets: [synthetic_clients]``, ``data.synthetic_clients: N`` and ``data.partition: by_site``
(with ``clients.num: N``) give each of N clients its own small dataset (``data.synthetic_rows``
training rows: 28×28 gray images, two classes, each a fixed template plus noise, in a class mix of the
client's own), without any file, so a federation of 100,000 registered clients can be timed. Validation and test splits are 512 rows each.
Everything computed on it is marked SYNTHETIC, as the MedMNIST stand-ins are.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raymed.data.source import DatasetFile, Source, register_source
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig

FLAG = "synthetic_clients"
EVAL_ROWS = 512
SIZE = 28
CHUNK = 16384  # rows generated at once
GENERATOR = 2  # in the data's name, so shards cached from an earlier generator are not reused


@lru_cache(maxsize=2)
def generate(clients: int, rows: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """{split: (images, labels, site per row or None)}; the training rows are ``rows`` per client."""
    rng = np.random.default_rng([seed, 0x5C11E])
    templates = rng.uniform(60, 195, size=(2, SIZE, SIZE))
    out = {}
    for split, n in (("train", clients * rows), ("val", EVAL_ROWS), ("test", EVAL_ROWS)):
        if split == "train":  # each client its own class mix
            p = rng.beta(0.5, 0.5, size=clients).repeat(rows)
            labels = (rng.random(n) < p).astype(np.int64)
            sites = np.arange(clients).repeat(rows)
        else:
            labels, sites = rng.integers(0, 2, size=n), None
        images = np.empty((n, SIZE, SIZE), np.uint8)
        for start in range(0, n, CHUNK):  # in chunks: 400,000 rows of float64 noise at once would be 2.5 GB
            part = slice(start, start + CHUNK)
            noise = rng.normal(0, 40, size=(len(labels[part]), SIZE, SIZE)).astype(np.float32)
            images[part] = np.clip(templates[labels[part]] + noise, 0, 255)
        out[split] = (images, labels.reshape(-1, 1), sites)
    return out


@register_source
class SyntheticClients(Source):
    name = FLAG
    priority = 5

    def claims(self, flag: str, d: DataConfig) -> bool:
        return flag == FLAG

    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        if not d.synthetic_clients:
            raise ConfigError("data.datasets names synthetic_clients: set data.synthetic_clients to the number of generated clients")
        # there is no file: the name says what was generated, and is what the shards are keyed by
        name = f"generated-v{GENERATOR}-{d.synthetic_clients}x{d.synthetic_rows}"
        return DatasetFile(FLAG, SIZE, Path(f"<{name}>"), name, synthetic=True, official=False, source=self.name)

    def _data(self, file: DatasetFile) -> dict:
        clients, rows = (int(v) for v in file.md5.removeprefix(f"generated-v{GENERATOR}-").split("x"))
        return generate(clients, rows, 0)

    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = self._data(file)[split]
        return images, labels

    def sites(self, file: DatasetFile, split: str) -> np.ndarray | None:
        return self._data(file)[split][2]

    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        return TaskSpec(dataset=FLAG, kind="binary", num_classes=2, channels=1, spatial_dims=2, synthetic=True, image_size=SIZE)
