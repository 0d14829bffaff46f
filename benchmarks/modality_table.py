"""FedAvg vs FedProx vs FedPer on the cross-modality MedMNIST federation (the README's table).

Each value is a test metric at the run's round selected on validation (personalised: each client's
own held-out rows; global: the official test split); the first row is the baseline (majority class;
personal: each client's own majority class), and ▼ marks a value at or below it.

PneumoniaMNIST + BreastMNIST + RetinaMNIST (the real files when found; synthetic stand-ins are
refused here unless --allow-synthetic, and then labelled), modality split over 20 clients (each
client holds one modality), the embedded default's settings otherwise. One Ray session for all runs.

    python benchmarks/modality_table.py [--rounds 30] [--set key=value ...] [--out benchmarks/results]

Prints a table and writes ``modality_table.json`` and ``modality_table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

import raymed  # noqa: F401
from raymed.experiment import load_config
from raymed.engine import run_experiment
from raymed.results import read_run, summary_table
from raymed.results.baselines import at_or_below
from raymed.results.report import baselines_of, plot_runs, selected_metrics

STRATEGIES = ("fedavg", "fedprox", "fedper")
DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--allow-synthetic", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)

    runs = []
    for name in STRATEGIES:
        cfg = load_config(
            None,
            [f"rounds={args.rounds}", f"output_dir={out / 'modality_runs'}", "ray.dashboard=false", f"strategy.name={name}", *args.overrides],
        )
        run = read_run(run_experiment(cfg))
        if run["meta"]["synthetic"] and not args.allow_synthetic:
            print("synthetic stand-ins found instead of the real MedMNIST files; set RAYMED_DATA_DIR", file=sys.stderr)
            return 2
        runs.append(run)

    Console().print(summary_table(runs))
    plot_runs(runs, out / "modality_table.png")
    rows = []
    for run in runs:
        final = selected_metrics(run)
        rows.append(
            {
                "strategy": run["config"]["strategy"]["name"],
                "params": {k: v for k, v in run["config"]["strategy"].items() if k != "name"},
                "personal_client_mean_acc": final.get("personal/client_mean/acc"),
                **{f"personal_{d}_{m}": final.get(f"personal/{d}/{m}") for d in DATASETS for m in ("acc", "auc")},
                **{f"global_{d}_{m}": final.get(f"global/{d}/{m}") for d in DATASETS for m in ("acc", "auc")},
                "retina_personal_mae": final.get("personal/retinamnist/mae"),
                "MB_communicated": final["MB up+down"],
                "selected_round": final["selected_round"],
                "selected_on": final["selected_on"],
                "below_baseline": sorted(k for k, v in final.items() if not str(k).startswith("val/") and isinstance(v, float) and at_or_below(k, v, baselines_of(run))),
                "synthetic": run["meta"]["synthetic"],
                "run_dir": str(run["dir"]),
            }
        )
    settings = runs[0]["config"]
    base = baselines_of(runs[0])
    result = {"settings": {k: settings[k] for k in ("seed", "rounds", "data", "clients", "model")}, "rows": rows, "baselines": base}
    (out / "modality_table.json").write_text(json.dumps(result, indent=1, default=str))
    fmt = lambda v: "—" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    lines = [
        "| strategy (selected round) | mean personalised acc | personalised acc (AUC): pneumonia / breast / retina "
        "| global model on the test splits, acc (AUC): pneumonia / breast / retina | retina grade MAE (pers.) |",
        "|---|---|---|---|---|",
    ]

    def cell(row: dict, key: str, metric: str) -> str:
        return fmt(row[key]) + (" ▼" if metric in row["below_baseline"] else "")

    def both(row: dict, scope: str, d: str) -> str:
        return f"{cell(row, f'{scope}_{d}_acc', f'{scope}/{d}/acc')} ({cell(row, f'{scope}_{d}_auc', f'{scope}/{d}/auc')})"

    baseline_row = {"strategy": "baseline", "below_baseline": [], "personal_client_mean_acc": base.get("personal/client_mean/acc"),
                    "retina_personal_mae": base.get("personal/retinamnist/mae"), "selected_round": "—",
                    **{f"{scope}_{d}_{m}": base.get(f"{scope}/{d}/{m}") for scope in ("personal", "global") for d in DATASETS for m in ("acc", "auc")}}
    for row in [baseline_row, *rows]:
        lines.append(
            f"| {row['strategy']} ({row['selected_round']}) | {cell(row, 'personal_client_mean_acc', 'personal/client_mean/acc')} | "
            + " / ".join(both(row, "personal", d) for d in DATASETS)
            + " | "
            + " / ".join(both(row, "global", d) for d in DATASETS)
            + f" | {cell(row, 'retina_personal_mae', 'personal/retinamnist/mae')} |"
        )
    (out / "modality_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
