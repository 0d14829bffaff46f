"""Compare runs: a table of test metrics at each run's round selected on validation, with the
baseline beside every number, and one PNG with a panel per metric (a dashed line at the baseline)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from raymed.config import flatten
from raymed.errors import RaymedError
from raymed.results.baselines import at_or_below
from raymed.results.metrics import is_validation, val_twin
from raymed.results.runs import read_run
from raymed.results.selection import Selection

DEFAULT_METRICS = ("acc", "auc", "f1")
# Panels and rows: the training loss, the run's summary metrics (``*/mean/*``, ``*/client_mean/*``),
# then the same metrics per dataset.
_SUMMARY = ("personal/client_mean/", "global/mean/")
_REPORT_EXTRA = {"rouge_l", "cider", "ce_f1"}
_OTHER_PRIMARY = {"psnr", "ssim", "bleu4", "mae", "c_index"}  # shown whenever present, whatever --metrics says
BELOW = "▼"  # marks a value at or below its baseline


def _plot_labels(runs: list[dict[str, Any]]) -> list[str]:
    """The legend's names: as the table's (:func:`_run_labels`), synthetic data said."""
    return [label + (" [SYNTHETIC DATA]" if run["meta"].get("synthetic") else "") for label, run in zip(_run_labels(runs), runs)]


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


# Config keys that differ between runs without being what was compared (where a run was written).
_NOT_COMPARED = ("name", "output_dir", "data.cache_dir", "data.root", "logging.")


def _differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The dotted config keys whose values differ between ``runs`` (a sweep: what its trials tried)."""
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flat))
    return [k for k in keys if not k.startswith(_NOT_COMPARED) and len({repr(f.get(k)) for f in flat}) > 1]


def _run_labels(runs: list[dict[str, Any]]) -> list[str]:
    """Short names of runs in a table and a plot: the strategy; when two share it, the hyperparameters
    that differ between the runs (a sweep's trials: ``fedprox lr=0.05,mu=0.1``; runs of several
    seeds: ``fedavg seed=1``), each by its last dotted part unless two share it; else a number."""
    names = [r["config"]["strategy"]["name"] for r in runs]
    if len(set(names)) == len(names):
        return names
    differing = [k for k in _differing_keys(runs) if k != "strategy.name"]
    leaves = [k.rsplit(".", 1)[-1] for k in differing]
    shown = leaves if len(set(leaves)) == len(leaves) else differing
    flat = [flatten(r["config"]) for r in runs]
    labels = [" ".join([n, ",".join(f"{short}={_value(f.get(k))}" for short, k in zip(shown, differing))]).strip() for n, f in zip(names, flat)]
    if differing and len(set(labels)) == len(labels):
        return labels
    return [f"{n} #{i + 1}" for i, n in enumerate(labels)]


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _split_metric(metric: str) -> tuple[str, str, str]:
    """``personal/client_mean/acc`` → (personal, client mean, acc); ``global/breastmnist/auc`` → (global, breastmnist, auc)."""
    scope, rest = metric.split("/", 1)
    where, name = rest.rsplit("/", 1)
    return scope, {"mean": "mean of datasets", "client_mean": "mean of clients"}.get(where, where), name


def result_rows(runs: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, Any]:
    """The results of ``runs`` as plain rows, for the terminal table and summary.md alike.

    ``runs``: one row per run (selection, rounds, loss, traffic); ``results``: one row per (model,
    dataset, run or baseline) with a column per metric name, test values at the round selected on
    validation (and a ``(val)`` row under each summary row: what selection read). A value at or below
    its baseline carries ``below``. Names are never longer than a dataset's or a metric's own."""
    labels = _run_labels(runs)
    chosen = [selected_metrics(r) for r in runs]
    baselines = [baselines_of(r) for r in runs]
    run_rows = [
        {"run": label, "selected on": c.get("selected_on"), "round": c.get("selected_round"), "rounds": c.get("rounds"),
         "train loss": c.get("train/loss"), "MB up+down": c.get("MB up+down"), "folder": str(r["dir"]),
         "synthetic": bool(r["meta"].get("synthetic"))}
        for label, c, r in zip(labels, chosen, runs)
    ]
    tested = _metric_columns(runs, metrics)
    names: list[str] = []
    groups: dict[tuple[str, str], dict[str, str]] = {}  # (model, dataset) -> metric name -> full key
    for key in tested:
        scope, where, name = _split_metric(key)
        groups.setdefault((scope, where), {})[name] = key
        if name not in names:
            names.append(name)
    results = []
    for (scope, where), keys in groups.items():
        summary = next(iter(keys.values())).startswith(_SUMMARY)
        variants = [("", lambda k: k), ("(val)", val_twin)] if summary else [("", lambda k: k)]
        for suffix, name_of in variants:
            base_row = {"model": scope, "dataset": where, "run": " ".join(filter(None, ["baseline", suffix])), "values": {}, "below": set(), "baseline": True}
            rows = []
            for label, values, own in zip(labels, chosen, baselines):
                row = {"model": scope, "dataset": where, "run": " ".join(filter(None, [label, suffix])), "values": {}, "below": set(), "baseline": False}
                for name, key in keys.items():
                    value = values.get(name_of(key))
                    row["values"][name] = value
                    if at_or_below(name_of(key), value, own):
                        row["below"].add(name)
                    if name_of(key) in own and name not in base_row["values"]:
                        base_row["values"][name] = own[name_of(key)]
                rows.append(row)
            rows = [row for row in rows if any(v is not None for v in row["values"].values())]
            if not rows:
                continue  # FedPer has no global model: no "global" row for it
            results.extend([*rows, base_row] if base_row["values"] else rows)
    return {"runs": run_rows, "results": results, "metrics": names}


def _title(runs: list[dict[str, Any]]) -> str:
    synthetic = any(r["meta"].get("synthetic") for r in runs)
    return "test metrics at the round selected on validation" + (" — SYNTHETIC DATA: not real MedMNIST results" if synthetic else "")


CAPTION = f"baseline: majority class (personal: each client's own majority); {BELOW} at or below it; (val): the validation split selection read"


def summary_table(runs: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS) -> Group:
    """Two tables that fit any width without cutting a name: the runs (selection, rounds, traffic),
    then one row per model × dataset × run with a column per metric (the baseline's row under each
    group; ▼ marks a value at or below its baseline). The full run folders follow, one a line."""
    built = result_rows(runs, metrics)
    overview = Table(title="runs", title_justify="left")
    for col in ("run", "selected on", "round", "rounds", "train loss", "MB up+down"):
        overview.add_column(col, overflow="fold", justify="left" if col in ("run", "selected on") else "right")
    for row in built["runs"]:
        overview.add_row(*(_fmt(row[c]) for c in ("run", "selected on", "round", "rounds", "train loss", "MB up+down")))
    table = Table(title=_title(runs), title_justify="left", caption=CAPTION, caption_justify="left")
    for col in ("model", "dataset", "run"):
        table.add_column(col, overflow="fold")
    for name in built["metrics"]:
        table.add_column(name, justify="right", overflow="fold")
    previous = None
    for row in built["results"]:
        group = (row["model"], row["dataset"])
        if previous is not None and group != previous:
            table.add_section()
        cells = [
            f"[red]{_fmt(row['values'].get(n))} {BELOW}[/red]" if n in row["below"] else _fmt(row["values"].get(n))
            for n in built["metrics"]
        ]
        first = group != previous
        table.add_row(row["model"] if first else "", row["dataset"] if first else "", row["run"], *cells, style="dim" if row["baseline"] else None)
        previous = group
    folders = Text("\n".join(f"{r['run']}: {r['folder']}" + (" (SYNTHETIC DATA)" if r["synthetic"] else "") for r in built["runs"]))
    return Group(overview, table, Text("run folders:"), folders)


def summary_markdown(runs: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    """The same tables as Markdown (summary.md in each run folder)."""
    built = result_rows(runs, metrics)

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]

    cols = ["run", "selected on", "round", "rounds", "train loss", "MB up+down"]
    lines = ["# " + _title(runs), "", *table(cols, [[_fmt(r[c]) for c in cols] for r in built["runs"]]), ""]
    rows = [
        [r["model"], r["dataset"], r["run"], *(_fmt(r["values"].get(n)) + (f" {BELOW}" if n in r["below"] else "") for n in built["metrics"])]
        for r in built["results"]
    ]
    lines += [*table(["model", "dataset", "run", *built["metrics"]], rows), "", CAPTION, ""]
    lines += [f"- {r['run']}: `{r['folder']}`" + (" (SYNTHETIC DATA)" if r["synthetic"] else "") for r in built["runs"]]
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[dict[str, Any]], path: str | Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in ["train/loss", *_metric_columns(runs, metrics)] if any(c in r["rounds"] for r in runs)]
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    labels = _plot_labels(runs)
    for ax, metric in zip(axes.flat, columns):
        for run, label in zip(runs, labels):
            df = run["rounds"]
            if metric in df:
                points = df[["round", metric]].dropna()
                line = ax.plot(points["round"], points[metric], marker=".", label=label)[0]
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


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders named by ``paths``: each a run folder, or a folder with runs beneath it (the
    default run's ``results/``, a sweep's storage folder): every folder holding a rounds.parquet,
    in name order; everything else is ignored. A path with no run at all is a one-line error."""
    found: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise RaymedError(f"{given} is not a folder; give run folders, or a folder that holds runs (e.g. results/)")
        if (given / "rounds.parquet").is_file():
            found.append(given)
            continue
        beneath = sorted(p.parent for p in given.rglob("rounds.parquet") if (p.parent / "config.yaml").is_file())
        if not beneath:
            raise RaymedError(f"{given} holds no rounds.parquet, in it or beneath it; give the folder of a raymed run or one that holds runs")
        found.extend(beneath)
    return list(dict.fromkeys(found))


def report(folders: list[str | Path], out: str | Path, console: Console | None = None, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    runs = [read_run(f) for f in run_folders(folders)]
    (console or Console()).print(summary_table(runs, metrics))
    return plot_runs(runs, out, metrics)
