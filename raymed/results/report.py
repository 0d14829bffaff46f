"""Compare runs: a summary table (rich) and one PNG with a panel per metric, a line per run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raymed.results.store import read_run

# Panels: the training loss, the run's summary metrics (accuracy, PSNR or BLEU-4: ``*/mean/*``),
# then the same metrics per dataset (report generation adds ROUGE-L, CIDEr and clinical F1).
_SUMMARY = ("personal/client_mean/", "global/mean/")
_REPORT_EXTRA = {"rouge_l", "cider", "ce_f1"}


def _label(run: dict[str, Any]) -> str:
    synthetic = " [SYNTHETIC DATA]" if run["meta"].get("synthetic") else ""
    return f"{run['dir'].name}{synthetic}"


def _metric_columns(runs: list[dict[str, Any]]) -> list[str]:
    present = set().union(*(set(r["rounds"].columns) for r in runs))
    summary = sorted(c for c in present if c.startswith(_SUMMARY))
    names = {c.rsplit("/", 1)[1] for c in summary} or {"acc"}
    if "bleu4" in names:
        names |= _REPORT_EXTRA
    per_dataset = sorted(c for c in present if c.rsplit("/", 1)[-1] in names and c.startswith(("global/", "personal/")) and c not in summary)
    return [c for c in ["train/loss", *summary] if c in present] + per_dataset


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def final_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """Metrics of the last evaluated round (training metrics of the last round)."""
    df = run["rounds"]
    out = {c: df[c].dropna().iloc[-1] if df[c].notna().any() else None for c in df.columns}
    out["MB up+down"] = (df.get("comm/bytes_up", 0).sum() + df.get("comm/bytes_down", 0).sum()) / 1e6
    out["rounds"] = len(df)
    return out


def summary_table(runs: list[dict[str, Any]]) -> Table:
    """One row per metric, one column per run: several strategies side by side."""
    synthetic = any(r["meta"].get("synthetic") for r in runs)
    title = "final evaluated round" + (" — SYNTHETIC DATA: not real MedMNIST results" if synthetic else "")
    table = Table(title=title)
    table.add_column("metric")
    finals = [final_metrics(r) for r in runs]
    for run in runs:
        table.add_column(f"{run['config']['strategy']['name']}\n{run['dir'].name}", justify="right")
    for metric in ["rounds", *_metric_columns(runs), "MB up+down"]:
        table.add_row(metric, *(_fmt(f.get(metric)) for f in finals))
    return table


def plot_runs(runs: list[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _metric_columns(runs)
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, columns):
        for run in runs:
            df = run["rounds"]
            if metric in df:
                points = df[["round", metric]].dropna()
                ax.plot(points["round"], points[metric], marker=".", label=_label(run))
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small")
    if any(r["meta"].get("synthetic") for r in runs):
        fig.suptitle("SYNTHETIC DATA — not real MedMNIST results", color="red")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 3), 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(folders: list[str | Path], out: str | Path, console: Console | None = None) -> Path:
    runs = [read_run(f) for f in folders]
    (console or Console()).print(summary_table(runs))
    return plot_runs(runs, out)
