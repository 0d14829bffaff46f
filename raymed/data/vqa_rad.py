"""VQA-RAD (Lau et al., Scientific Data 2018, https://doi.org/10.1038/sdata.2018.251; CC0) as three
datasets, one per imaged organ — ``vqarad_head``, ``vqarad_chest``, ``vqarad_abd`` — so that the
``modality`` partition gives each simulated hospital one kind of study.

Layout expected (the official release, as in ``../shared/data/vqa_rad/``)::

    data_RAD/trainset.json, data_RAD/testset.json   qid, image_name, image_organ, question, answer, answer_type
    data_RAD/images/*.jpg

Found at ``data.vqa_root``, ``$RAYMED_VQA_RAD_DIR``, or ``vqa_rad/`` next to ``$RAYMED_DATA_DIR``.
Images are read as gray and resized to ``data.size`` (bicubic). Questions are lower-cased word
tokens (ids from the training questions, 0 = padding, 1 = unknown), cut to :data:`QUESTION_LEN`.
Answers are normalised (lower case, collapsed spaces) and classified over every answer of the
training set (all organs); a test answer never seen in training gets an id past them (into
:attr:`Vocabulary.all_answers`, so its text is kept for open-answer scores) and always counts as
wrong, as in answer-classification VQA. A row's label is ``[answer id, closed?, token ids...]``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raymed.data.medmnist_files import side_data_dirs
from raymed.data.source import DatasetFile, Source, register_source
from raymed.data.tasks import TaskSpec
from raymed.errors import DataError

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig

ORGANS = {"vqarad_head": "HEAD", "vqarad_chest": "CHEST", "vqarad_abd": "ABD"}
QUESTION_LEN = 20
_WORD = re.compile(r"[a-z0-9]+")


def is_vqa_flag(flag: str) -> bool:
    return flag in ORGANS


def find_root(root: str | None = None) -> Path:
    """The ``data_RAD`` folder, or a one-line DataError naming where it was looked for."""
    looked = []
    for base in side_data_dirs(root, "RAYMED_VQA_RAD_DIR", "vqa_rad"):
        for folder in (base, base / "data_RAD"):
            looked.append(str(folder))
            if (folder / "trainset.json").is_file() and (folder / "images").is_dir():
                return folder.resolve()
    raise DataError(
        f"VQA-RAD not found (looked in {', '.join(looked) or 'nowhere: no folder given'}); download it from "
        f"https://osf.io/89kps/ and set data.vqa_root (or RAYMED_VQA_RAD_DIR) to its data_RAD folder"
    )


def _read(folder: Path, split: str) -> list[dict]:
    path = folder / ("trainset.json" if split == "train" else "testset.json")
    try:
        rows = json.loads(path.read_text())
        return [r for r in rows if all(k in r for k in ("image_name", "image_organ", "question", "answer", "answer_type"))]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} could not be read ({type(exc).__name__}: {exc}); replace it with the VQA-RAD release") from None


def fingerprint(folder: Path) -> str:
    """md5 of the question files (the images are named in them)."""
    digest = hashlib.md5()
    for name in ("trainset.json", "testset.json"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def locate(flag: str, size: int, root: str | None = None) -> DatasetFile:
    folder = find_root(root)
    return DatasetFile(flag, size, folder, fingerprint(folder), synthetic=False, source=VQARAD.name)


def task(flag: str, folder: Path, size: int) -> TaskSpec:
    vocab = vocabulary(folder)
    return TaskSpec(
        dataset=flag, kind="vqa", num_classes=len(vocab.answers), channels=1, spatial_dims=2, image_size=size,
        question_vocab=len(vocab.words), question_len=QUESTION_LEN,
    )


def words(question: str) -> list[str]:
    return _WORD.findall(question.lower())


def normalise_answer(answer: object) -> str:
    return " ".join(str(answer).lower().split())


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]  # index 0 = padding, 1 = unknown
    answers: tuple[str, ...]  # the training answers: the classes
    test_answers: tuple[str, ...] = ()  # answers only the test set has (ids len(answers)...)

    @property
    def all_answers(self) -> tuple[str, ...]:
        return self.answers + self.test_answers

    def question(self, ids) -> str:
        """The (lower-case, tokenised) question of a row's word ids."""
        return " ".join(self.words[int(i)] for i in ids if int(i) > 0)

    @functools.cached_property
    def word_ids(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, question: str) -> list[int]:
        ids = [self.word_ids.get(w, 1) for w in words(question)][:QUESTION_LEN]
        return ids + [0] * (QUESTION_LEN - len(ids))


@functools.lru_cache(maxsize=4)
def vocabulary(folder: Path) -> Vocabulary:
    """Question words and answers of the training set (every organ), most frequent first."""
    train = _read(folder, "train")
    word_counts = Counter(w for r in train for w in words(r["question"]))
    answer_counts = Counter(normalise_answer(r["answer"]) for r in train)
    by_count = lambda counts: tuple(k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))  # noqa: E731
    test_only = Counter(a for r in _read(folder, "test") if (a := normalise_answer(r["answer"])) not in answer_counts)
    return Vocabulary(("<pad>", "<unk>") + by_count(word_counts), by_count(answer_counts), by_count(test_only))


@functools.lru_cache(maxsize=2048)  # 315 images in the release
def _image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path} could not be read as an image ({exc}); replace it with the VQA-RAD release") from None


def load_split(folder: Path, flag: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×size×size uint8) and labels (N×(2+QUESTION_LEN) int64) of one organ's split."""
    vocab = vocabulary(folder)
    answer_id = {a: i for i, a in enumerate(vocab.all_answers)}
    rows = [r for r in _read(folder, "train" if split == "train" else "test") if r["image_organ"].strip() == ORGANS[flag]]
    if not rows:
        raise DataError(f"{folder}: no {split} questions on {ORGANS[flag]} images; is this the VQA-RAD release?")
    images = np.stack([_image(folder / "images" / r["image_name"], size) for r in rows])
    labels = np.array(
        [
            [answer_id[normalise_answer(r["answer"])], int(r["answer_type"].strip().upper() == "CLOSED"), *vocab.encode(r["question"])]
            for r in rows
        ],
        dtype=np.int64,
    )
    return images, labels


@register_source
class VQARAD(Source):
    """VQA-RAD's release, one dataset per imaged organ; no validation split of its own."""

    name = "vqa_rad"
    priority = 10

    def claims(self, flag: str, d: DataConfig) -> bool:
        return is_vqa_flag(flag)

    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        return locate(flag, d.size, d.vqa_root)

    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        return load_split(file.path, file.flag, split, file.size)

    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        return task(file.flag, file.path, file.size)

    def has_val_split(self, file: DatasetFile) -> bool:
        return False
