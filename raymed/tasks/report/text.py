"""Report-generation data: "MedMNIST-Reports" (semi-synthetic) and the R2Gen format.

**MedMNIST-Reports** (``data.datasets=[pneumoniamnist]``, ``data.task=report``) is semi-synthetic:
real PneumoniaMNIST chest X-rays paired, by diagnosis, with real IU X-Ray report text
(``indiana_reports.csv``, findings + impression, de-identification placeholders removed). The images
and the reports come from different patients; only the diagnosis links them:

- a pneumonia image gets a report whose MeSH/Problems mention pneumonia, opacity, consolidation or
  an infiltrate; a normal image gets a report whose Problems say exactly "normal";
- the reports are shuffled (seeded) into a test pool (20%) and one disjoint pool per client, and
  every client writes in its own reporting style (``client id mod data.report_styles``): a
  terminology rewrite (:data:`STYLES`), style 0 being the original text. Different report pools and
  styles on top of different images are the "dual heterogeneity" FedMRG targets. The official test
  images get reports from the test pool in the original style.

**R2Gen format** (``data.datasets=[r2gen]``): the ``annotation.json`` of R2Gen (train/val/test lists
of ``{id, report, image_path: [...], split}``; IU X-Ray's copy stores the test list under a key of
four spaces, which is read as "test") with the images under ``images/`` beside it, as distributed
for IU X-Ray and MIMIC-CXR. The first image of a study is used, read as gray and resized to
``data.size``. The diagnosis used by diagnosis-driven prompts is "abnormal" when the rule-based
labeler finds any finding in the report.

A row's label is ``[diagnosis, style, token ids...]`` (``data.report_len`` ids: BOS, the report,
EOS, padding). The tokenizer is word-level, trained with ``tokenizers`` on the training reports and
saved in the shard set (``tokenizer/``, loadable with ``transformers``), unless
``data.report_tokenizer`` names a local Hugging Face tokenizer (e.g. the decoder checkpoint's).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raymed.data.medmnist_files import side_data_dirs
from raymed.data.source import DatasetFile, Source, register_source
from raymed.data.tasks import TaskSpec
from raymed.errors import DataError
from raymed.tasks.report.metrics import label_report

if TYPE_CHECKING:
    from raymed.config import DataConfig, ExperimentConfig

REPORT_DATASETS = ("pneumoniamnist", "r2gen")
CLASS_NAMES = {"pneumoniamnist": ("normal", "pneumonia"), "r2gen": ("normal", "abnormal")}
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
TEST_POOL_FRACTION = 0.2
_POSITIVE = re.compile(r"pneumonia|opacit|consolidat|infiltrat", re.IGNORECASE)

# Reporting styles: (phrase rewrites applied in order, impression before findings?). Style 0 is the
# original text; the rewrites keep the meaning (the clinical labeler reads every style alike).
STYLES: tuple[tuple[tuple[tuple[str, str], ...], bool], ...] = (
    ((), False),
    (
        (
            ("pneumothorax", "PTX"),
            ("pleural effusion", "pleural fluid"),
            ("cardiomediastinal silhouette", "heart and mediastinum"),
            ("within normal limits", "normal"),
            ("no acute cardiopulmonary abnormality", "no active disease"),
        ),
        False,
    ),
    (
        (
            ("opacities", "opacifications"),
            ("opacity", "opacification"),
            ("consolidation", "airspace disease"),
            ("lungs are clear", "lung fields are clear"),
            ("normal", "unremarkable"),
        ),
        False,
    ),
    ((("there is no", "negative for"), ("no evidence of", "without")), True),
)


# ---------------------------------------------------------------------------------------------------
# Where the text is


def find_root(root: str | None, marker: str) -> Path:
    """The folder holding ``marker`` (indiana_reports.csv or annotation.json), or a one-line DataError."""
    looked = []
    for folder in side_data_dirs(root, "RAYMED_REPORTS_DIR", "iu_xray"):
        looked.append(str(folder))
        if (folder / marker).is_file():
            return folder.resolve()
    raise DataError(
        f"{marker} not found (looked in {', '.join(looked) or 'nowhere: no folder given'}); set data.report_root "
        f"(or RAYMED_REPORTS_DIR) to the folder holding it (IU X-Ray text: https://openi.nlm.nih.gov/faq)"
    )


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def locate_r2gen(size: int, root: str | None) -> DatasetFile:
    folder = find_root(root, "annotation.json")
    if not (folder / "images").is_dir():
        raise DataError(f"{folder} has annotation.json but no images/ folder; put the dataset's images there (R2Gen layout)")
    return DatasetFile("r2gen", size, folder, md5(folder / "annotation.json"), synthetic=False, source=R2Gen.name)


def corpus_fingerprint(root: str | None) -> str:
    """md5 of the IU X-Ray reports file MedMNIST-Reports draws from (part of the shard set's identity)."""
    return md5(find_root(root, "indiana_reports.csv") / "indiana_reports.csv")


# ---------------------------------------------------------------------------------------------------
# Text


def clean(text: str) -> str:
    """One line of report text, IU X-Ray's de-identification marks (runs of capital X) removed."""
    text = re.sub(r"\bX{2,}\b", " ", text)
    text = re.sub(r"\s+([.,;:])", r"\1", text)
    return " ".join(text.split())


def restyle(findings: str, impression: str, style: int) -> str:
    """A report in reporting style ``style`` (see :data:`STYLES`)."""
    rewrites, impression_first = STYLES[style % len(STYLES)]
    parts = [impression, findings] if impression_first else [findings, impression]
    text = " ".join(p for p in parts if p)
    for old, new in rewrites:
        text = re.sub(rf"\b{re.escape(old)}(s?)\b", rf"{new}\1", text, flags=re.IGNORECASE)  # plurals too
    return text


@functools.lru_cache(maxsize=2)
def iu_pools(folder: Path) -> dict[int, list[tuple[str, str]]]:
    """Distinct IU X-Ray (findings, impression) by diagnosis: 1 = pneumonia/opacity/consolidation/infiltrate,
    0 = normal, and −1 = every other report (never paired with an image; the decoder's pretraining text)."""
    path = folder / "indiana_reports.csv"
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path} could not be read ({exc}); replace it with IU X-Ray's indiana_reports.csv") from None
    pools: dict[int, list[tuple[str, str]]] = {0: [], 1: [], -1: []}
    for row in rows:
        findings, impression = clean(row.get("findings") or ""), clean(row.get("impression") or "")
        if not findings:
            continue
        labels = f"{row.get('MeSH') or ''};{row.get('Problems') or ''}"
        if (row.get("Problems") or "").strip().lower() == "normal":
            pools[0].append((findings, impression))
        elif _POSITIVE.search(labels):
            pools[1].append((findings, impression))
        else:
            pools[-1].append((findings, impression))
    # Many normal studies share a stock text: keep each text once, so that pools are disjoint in text too.
    pools = {label: list(dict.fromkeys(texts)) for label, texts in pools.items()}
    if not pools[0] or not pools[1]:
        raise DataError(f"{path} has no usable normal or pneumonia reports (columns MeSH, Problems, findings, impression)")
    return pools


def pretraining_text(folder: Path) -> list[str]:
    """IU X-Ray reports that MedMNIST-Reports never pairs with an image (neither normal nor
    pneumonia-like): text to pretrain the decoder on without touching any federated or test report."""
    return [" ".join(p for p in pair if p) for pair in iu_pools(folder)[-1]]


def medmnist_reports(
    diagnosis: np.ndarray, owner: np.ndarray, num_clients: int, styles: int, folder: Path, seed: int, draw: int = 0
) -> tuple[list[str], np.ndarray]:
    """Report text and style for each image: from its client's pool (``owner`` −1: the test pool, style 0).
    The pools depend on ``seed`` only; ``draw`` varies which report of a pool each image gets."""
    rng = np.random.default_rng([seed, 0x4D52])
    pools = iu_pools(folder)
    test_pool, client_pools = {}, {}
    for label, reports in ((0, pools[0]), (1, pools[1])):
        order = rng.permutation(len(reports))
        n_test = max(1, int(TEST_POOL_FRACTION * len(reports)))
        test_pool[label] = order[:n_test]
        chunks = np.array_split(order[n_test:], num_clients) if len(order) - n_test >= num_clients else [order[n_test:]] * num_clients
        client_pools[label] = chunks  # disjoint when there are enough reports, else shared
    texts, style_of = [], np.zeros(len(diagnosis), np.int64)
    rng = np.random.default_rng([seed, 0x4D52, draw])
    for i, (label, client) in enumerate(zip(diagnosis, owner)):
        label, client = int(label), int(client)
        pool = test_pool[label] if client < 0 else client_pools[label][client]
        findings, impression = pools[label][int(rng.choice(pool))]
        style_of[i] = 0 if client < 0 else client % styles
        texts.append(restyle(findings, impression, int(style_of[i])))
    return texts, style_of


# ---------------------------------------------------------------------------------------------------
# R2Gen


@functools.lru_cache(maxsize=2)
def r2gen_annotation(folder: Path) -> dict[str, list[dict]]:
    path = folder / "annotation.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} could not be read ({type(exc).__name__}: {exc}); give an R2Gen annotation.json") from None
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for key, entries in raw.items():
        name = key.strip() or "test"  # IU X-Ray's R2Gen file stores its test list under "    "
        for entry in entries:
            if isinstance(entry, dict) and entry.get("report") and entry.get("image_path"):
                splits.setdefault(entry.get("split", name) or name, []).append(entry)
    if not splits["train"] or not splits["test"]:
        raise DataError(f"{path} has no train or test studies with report and image_path; is it an R2Gen annotation file?")
    return splits


def load_r2gen(folder: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N×size×size uint8), diagnosis labels (N×1: 1 = the labeler finds something) and report text."""
    from PIL import Image, UnidentifiedImageError


    entries = r2gen_annotation(folder)[split]
    images = np.empty((len(entries), size, size), np.uint8)
    for i, entry in enumerate(entries):
        path = folder / "images" / entry["image_path"][0]
        try:
            with Image.open(path) as img:
                images[i] = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BICUBIC))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path} (study {entry.get('id')}) could not be read as an image ({exc}); check the images/ folder") from None
    texts = [clean(e["report"]) for e in entries]
    diagnosis = np.array([[1 - label_report(t)["no_finding"]] for t in texts], np.int64)
    return images, diagnosis, texts


# ---------------------------------------------------------------------------------------------------
# Tokens


def train_tokenizer(texts: list[str], out: Path, extra: list[str]):
    """A word-level tokenizer (lower case, words and punctuation) trained on ``texts``, saved in ``out``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, BOS, EOS], min_frequency=1)
    tok.train_from_iterator([*texts, *extra], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(str(out))
    return fast


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"no tokenizer could be loaded from {path} ({exc}); give a folder saved by save_pretrained") from None
    if tok.pad_token is None:  # many causal LMs have none: pad with EOS
        tok.pad_token = tok.eos_token
    return tok


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(pad, bos, eos) ids; a tokenizer without BOS starts reports with EOS, as GPT-2 does."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return tokenizer.pad_token_id, bos, eos


def encode(tokenizer, texts: list[str], length: int) -> np.ndarray:
    """N×length ids: BOS, the report (cut to fit), EOS, padding."""
    pad, bos, eos = special_ids(tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = np.full((len(texts), length), pad, np.int64)
    for i, row in enumerate(ids):
        row = [bos, *row[: length - 2], eos]
        out[i, : len(row)] = row
    return out


def decode(tokenizer, ids: np.ndarray) -> list[str]:
    """Text of id rows, cut at the first EOS (after the leading BOS, if there is one)."""
    pad, bos, eos = special_ids(tokenizer)
    texts = []
    for row in np.asarray(ids):
        row = [int(t) for t in row]
        if row and row[0] == bos:
            row = row[1:]
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return texts


def prompt_texts(flag: str) -> list[str]:
    """The diagnosis-driven prompt of each class (FedMRG): words the tokenizer must know."""
    return [f"diagnosis {name} ." for name in CLASS_NAMES[flag]]


@register_source
class R2Gen(Source):
    """An R2Gen-format folder (annotation.json + images/): chest X-rays with reports. Labels are
    [diagnosis, study index]; the report text is attached when the shards are written."""

    name = "r2gen"
    priority = 10

    def claims(self, flag: str, d: DataConfig) -> bool:
        return flag == "r2gen"

    def locate(self, flag: str, d: DataConfig) -> DatasetFile:
        return locate_r2gen(d.size, d.report_root)

    def load(self, file: DatasetFile, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, diagnosis, _ = load_r2gen(file.path, split, file.size)
        return images, np.column_stack([diagnosis[:, 0], np.arange(len(images))])

    def task(self, file: DatasetFile, cfg: ExperimentConfig) -> TaskSpec:
        return TaskSpec(dataset="r2gen", kind="binary", num_classes=2, channels=1, spatial_dims=2, image_size=file.size)

    def has_val_split(self, file: DatasetFile) -> bool:
        return bool(r2gen_annotation(file.path).get("val"))
