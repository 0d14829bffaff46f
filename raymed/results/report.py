"""Compare runs: a table of test metrics at each run's round selected on validation, with the
baseline beside every number, and one PNG with a panel per metric (a dashed line at the baseline)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raymed.results.baselines import at_or_below
from raymed.results.metrics import is_validation, val_twin
from raymed.results.selection import Selection
from raymed.results.store import read_run

DEFAULT_METRICS = ("acc", "auc", "f1")
# Panels and rows: the training loss, the run's summary metrics (``*/mean/*``, ``*/client_mean/*``),
# then the same metrics per dataset.
_SUMMARY = ("personal/client_mean/", "global/mean/")
_REPORT_EXTRA = {"rouge_l", "cider", "ce_f1"}
_OTHER_PRIMARY = {"psnr", "ssim", "bleu4", "mae", "c_index"}  # shown whenever present, whatever --metrics says
BELOW = "▼"  # marks a value at or below its baseline


def _label(run: dict[str, Any]) -> str:
    synthetic = " [SYNTHETIC DATA]" if run["meta"].get("synthetic") else ""
    return f"{run['dir'].name}{synthetic}"


def _metric_columns(runs: list[dict[str, Any]], names: tuple[str, ...] = DEFAULT_METRICS) -> list[str]:
    """Test-split metric columns to show, summary ones first: ``names`` plus each task's own (PSNR, BLEU, ...)."""
    present = set().union(*(set(r["rounds"].columns) for r in runs))
    wanted = set(names) | (_OTHER_PRIMARY & {c.rsplit("/", 1)[-1] for c in present})
    if "bleu4" in wanted:
        wanted |= _REPORT_EXTRA
    tested = [c for c in present if c.startswith(("global/", "personal/")) and not is_validation(c) and c.rsplit("/", 1)[-1] in wanted]
    summary = sorted(c for c in tested if c.startswith(_SUMMARY))
    per_dataset = sorted(c for c in tested if c not in summary)
    return summary + per_dataset


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


def selection_of(run: dict[str, Any]) -> Selection:
    """The run's selection on validation: as its summary recorded it, else replayed over its rounds
    with its config's eval.select (a run from before validation existed selects nothing)."""
    ev = run["config"].get("eval", {})
    rounds = run["rounds"].to_dict("records")
    return Selection.replay(rounds, ev.get("select"), ev.get("select_mode", "max"))


def selected_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """Every metric of the round selected on validation (the last evaluated round when the run has
    no validation metrics), with ``selected_round``, ``selected_on``, ``rounds`` and ``MB up+down``."""
    selection = selection_of(run)
    out = final_metrics(run)
    if selection.round is not None:
        out.update({k: v for k, v in selection.metrics.items() if not (isinstance(v, float) and math.isnan(v))})
    out["selected_round"] = selection.round if selection.round is not None else out.get("round")
    out["selected_on"] = selection.metric or "last evaluated round"
    return out


def baselines_of(run: dict[str, Any]) -> dict[str, float]:
    return run["summary"].get("baseline_metrics") or run["meta"].get("baseline_metrics") or {}


def summary_table(runs: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS) -> Table:
    """One row per metric, one column per run (several strategies side by side), the baseline first.
    Values are test metrics at each run's round selected on validation; ▼ marks one at or below its
    baseline (a model that learned nothing scores the baseline)."""
    synthetic = any(r["meta"].get("synthetic") for r in runs)
    title = "test metrics at the round selected on validation" + (" — SYNTHETIC DATA: not real MedMNIST results" if synthetic else "")
    table = Table(title=title, caption=f"baseline: majority class (personal: each client's own majority); {BELOW} at or below it")
    table.add_column("metric")
    table.add_column("baseline", justify="right", style="dim")
    chosen = [selected_metrics(r) for r in runs]
    baselines = [baselines_of(r) for r in runs]
    for run in runs:
        table.add_column(f"{run['config']['strategy']['name']}\n{run['dir'].name}", justify="right")
    for row in ("selected_on", "selected_round", "rounds"):
        table.add_row(row, "", *(_fmt(c.get(row)) for c in chosen))
    present = set().union(*(set(r["rounds"].columns) for r in runs))
    rows = []
    for metric in _metric_columns(runs, metrics):
        rows.append(metric)
        if metric.startswith(_SUMMARY) and val_twin(metric) in present:
            rows.append(val_twin(metric))  # what the round was selected on, beside its test value
    for metric in ["train/loss", *rows, "MB up+down"]:
        base = next((b[metric] for b in baselines if metric in b), None)
        cells = []
        for values, own in zip(chosen, baselines):
            value = values.get(metric)
            flagged = at_or_below(metric, value, own)
            cells.append(f"[red]{_fmt(value)} {BELOW}[/red]" if flagged else _fmt(value))
        table.add_row(metric, _fmt(base), *cells)
    return table


def plot_runs(runs: list[dict[str, Any]], path: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in ["train/loss", *_metric_columns(runs, metrics)] if any(c in r["rounds"] for r in runs)]
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, columns):
        for run in runs:
            df = run["rounds"]
            if metric in df:
                points = df[["round", metric]].dropna()
                line = ax.plot(points["round"], points[metric], marker=".", label=_label(run))[0]
                selected = selection_of(run).round
                if selected is not None and selected in set(points["round"]):
                    ax.plot([selected], points.loc[points["round"] == selected, metric], marker="*", markersize=11, color=line.get_color())
        base = next((baselines_of(r)[metric] for r in runs if metric in baselines_of(r)), None)
        if base is not None:
            ax.axhline(base, linestyle="--", color="gray", linewidth=1, label="baseline (majority class)")
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small")
    cfg = runs[0]["config"]
    data = cfg.get("data", {})
    title = f"{', '.join(data.get('datasets', []))} · partition {data.get('partition')}" + (
        f" (α={data['alpha']})" if data.get("alpha") else ""
    ) + f" · {' vs '.join(sorted({r['config']['strategy']['name'] for r in runs}))} · test split; ★ round selected on validation"
    if any(r["meta"].get("synthetic") for r in runs):
        title = "SYNTHETIC DATA — not real MedMNIST results\n" + title
    fig.suptitle(title, color="red" if any(r["meta"].get("synthetic") for r in runs) else "black", fontsize="medium")
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(labels) / 3), 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(folders: list[str | Path], out: str | Path, console: Console | None = None, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    runs = [read_run(f) for f in folders]
    (console or Console()).print(summary_table(runs, metrics))
    return plot_runs(runs, out, metrics)
