"""How report text reaches the shards: every row of a report dataset gets its report's token ids.

A row's label becomes ``[diagnosis, style, token ids...]`` (``data.report_len`` ids) and each
dataset's task the ``report`` kind, once the clients are dealt (MedMNIST-Reports draws each
client's reports from its own pool, in its own style: :mod:`raymed.tasks.report.text`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymed.config import ExperimentConfig
from raymed.data.source import DatasetFile
from raymed.data.tasks import TaskSpec
from raymed.tasks.report import text as reports


def attach_reports(
    cfg: ExperimentConfig,
    files: list[DatasetFile],
    tasks: dict[str, TaskSpec],
    train: dict[str, tuple[np.ndarray, np.ndarray]],
    val: dict[str, tuple[np.ndarray, np.ndarray]],
    test: dict[str, tuple[np.ndarray, np.ndarray]],
    clients: list[dict[str, np.ndarray]],
    tmp: Path,
    out: Path,
) -> None:
    """Report generation: give every row its report ([diagnosis, style, token ids]) and tokenizer, in
    place. Validation images get reports of the test pool (another draw than the test images'),
    in the original style: no client's report text."""
    d = cfg.data
    texts: dict[str, tuple[list[str], np.ndarray, list[str], list[str]]] = {}
    for f in files:
        (_, y), (_, yv), (_, yt) = train[f.flag], val[f.flag], test[f.flag]
        if f.flag == "r2gen":
            entries = reports.r2gen_annotation(f.path)
            pick = lambda split, rows: [reports.clean(entries[split][int(i)]["report"]) for i in rows]  # noqa: E731
            texts[f.flag] = (pick("train", y[:, 1]), np.zeros(len(y), np.int64), pick("val", yv[:, 1]), pick("test", yt[:, 1]))
        else:
            owner = np.full(len(y), -1)
            for cid, rows_by_flag in enumerate(clients):
                owner[rows_by_flag.get(f.flag, [])] = cid
            root = reports.find_root(d.report_root, "indiana_reports.csv")
            train_texts, styles = reports.medmnist_reports(y[:, 0], owner, cfg.clients.num, d.report_styles, root, cfg.seed)
            val_texts, _ = reports.medmnist_reports(yv[:, 0], np.full(len(yv), -1), cfg.clients.num, 1, root, cfg.seed, draw=2)
            test_texts, _ = reports.medmnist_reports(yt[:, 0], np.full(len(yt), -1), cfg.clients.num, 1, root, cfg.seed, draw=1)
            texts[f.flag] = (train_texts, styles, val_texts, test_texts)
    if d.report_tokenizer:
        tokenizer, tokenizer_path = reports.load_tokenizer(d.report_tokenizer), str(Path(d.report_tokenizer).resolve())
    else:
        prompts = [p for f in files for p in reports.prompt_texts(f.flag)]
        tokenizer = reports.train_tokenizer([t for tr, *_ in texts.values() for t in tr], tmp / "tokenizer", prompts)
        tokenizer_path = str(out / "tokenizer")
    for f in files:
        train_texts, styles, val_texts, test_texts = texts[f.flag]
        (x, y), (xv, yv), (xt, yt) = train[f.flag], val[f.flag], test[f.flag]
        train[f.flag] = (x, np.column_stack([y[:, 0], styles, reports.encode(tokenizer, train_texts, d.report_len)]))
        val[f.flag] = (xv, np.column_stack([yv[:, 0], np.zeros(len(yv), np.int64), reports.encode(tokenizer, val_texts, d.report_len)]))
        test[f.flag] = (xt, np.column_stack([yt[:, 0], np.zeros(len(yt), np.int64), reports.encode(tokenizer, test_texts, d.report_len)]))
        tasks[f.flag] = TaskSpec(
            dataset=f.flag, kind="report", num_classes=2, channels=1, spatial_dims=2, image_size=f.size,
            vocab_size=len(tokenizer), report_len=d.report_len, tokenizer=tokenizer_path, class_names=reports.CLASS_NAMES[f.flag],
        )
