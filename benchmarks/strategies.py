"""The strategies researchers compare against, side by side on the embedded default's federation.

For each seed, runs ``raymed run --strategies ... --set seed=S`` (the command users type: every
strategy on the same partition, sampling and schedule) with ``cnn_bn`` at lr 0.02 (so that FedBN has
normalisation layers to keep; where ``cnn_bn`` holds on this federation, benchmarks/README's
"Backbone candidates") and evaluation every round, then reads every run folder: test accuracy at
the round selected on validation, global (the global model on each dataset's test split) and
personal (each hospital's own model on its held-out rows, mean over hospitals), mean ± std over
seeds, beside the baselines (each dataset's majority class; each hospital's own majority class).
Prints a markdown table; writes ``benchmarks/results/strategies.json``.

    python benchmarks/strategies.py [--seeds 0,1,2] [--strategies fedavg,fedadam,...] [--out DIR]
    python benchmarks/strategies.py --runs DIR [DIR ...]     # tabulate runs made before, run nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import raymed  # noqa: F401  (before Ray or torch)
from raymed.results.report import baselines_of, run_folders, selected_metrics
from raymed.results.runs import read_run
from tables import agg, flagged, git_commit, md_table, mean_std, sources_md5

STRATEGIES = "fedavg,fedavgm,fedadam,fedyogi,fedadagrad,scaffold,ditto,fedper,fedbn"
RECIPE = ["model.name=cnn_bn", "clients.lr=0.02", "eval.every=1"]
DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")
PERSONAL = "personal/client_mean/acc"
COLUMNS = ["global/mean/acc", *(f"global/{d}/acc" for d in DATASETS), PERSONAL]


def run_seed(seed: int, strategies: str, out: Path) -> None:
    """One ``raymed run --strategies`` for ``seed``, its output in ``out/seed<S>.log``."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "raymed", "run", "--strategies", strategies, "--quiet", "--set", f"seed={seed}",
           "--set", f"output_dir={out / f'seed{seed}'}", *(x for kv in RECIPE for x in ("--set", kv))]
    with open(out / f"seed{seed}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env=os.environ)


def tabulate(folders: list[Path]) -> dict:
    """Per strategy: each seed's selected metrics and their mean ± std; the baselines (the same for
    every run of one seed: they depend on the partition only)."""
    by_strategy: dict[str, dict[int, dict]] = {}
    per_seed: dict[int, dict[str, float]] = {}  # each seed's baselines (the partition differs by seed)
    for folder in folders:
        run = read_run(folder)
        if run["summary"].get("status") != "completed":
            continue
        name, seed = run["config"]["strategy"]["name"], int(run["config"].get("seed", 0))
        metrics = selected_metrics(run)
        by_strategy.setdefault(name, {})[seed] = {
            "selected_round": metrics.get("selected_round"), "selected_on": metrics.get("selected_on"),
            **{c: metrics.get(c) for c in COLUMNS}, "wall_time_s": run["summary"].get("wall_time_s"), "run": str(folder),
        }
        if seed not in per_seed:
            base = baselines_of(run)
            per_seed[seed] = {c: base.get(c) for c in COLUMNS}
    summary = {}
    for name, seeds in by_strategy.items():
        summary[name] = {c: agg([s[c] for s in seeds.values()]) for c in COLUMNS}
        # paired with the seed's own baseline: the hospitals' majority classes change with the partition
        summary[name]["personal_over_baseline"] = agg(
            [s[PERSONAL] - per_seed[k][PERSONAL] for k, s in seeds.items() if s[PERSONAL] is not None and per_seed[k][PERSONAL] is not None]
        )
    baselines = {c: agg([b[c] for b in per_seed.values()]) for c in COLUMNS}
    return {"runs": by_strategy, "summary": summary, "baselines": baselines, "baselines_per_seed": per_seed}


def markdown(result: dict, order: list[str]) -> str:
    base = result["baselines"]
    rows = []
    for name in order:
        if name not in result["summary"]:
            continue
        s, seeds = result["summary"][name], result["runs"][name]
        cells = [f"`{name}`", str(len(seeds)), ", ".join(str(seeds[k]["selected_round"]) for k in sorted(seeds))]
        for c in COLUMNS:
            below = s[c]["mean"] is not None and base[c]["mean"] is not None and s[c]["mean"] <= base[c]["mean"]
            cells.append(flagged(mean_std(s[c], 3), below))
        gain = s["personal_over_baseline"]
        cells.append(flagged(mean_std(gain, 3), gain["mean"] is not None and gain["mean"] <= 0))
        rows.append(cells)
    rows.append(["baseline (majority; personal: each hospital's own)", "", "", *(mean_std(base[c], 3) for c in COLUMNS), "0"])
    header = ["strategy", "seeds", "selected rounds", "global mean ACC", *DATASETS, "personal ACC (client mean)", "personal − its seed's baseline"]
    return md_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--out", default="benchmarks/results/strategies-runs", help="where the runs go")
    parser.add_argument("--runs", nargs="+", help="tabulate these run folders (or folders holding runs) instead of running")
    args = parser.parse_args()
    start = time.time()
    if not args.runs:
        for seed in (int(s) for s in args.seeds.split(",")):
            run_seed(seed, args.strategies, Path(args.out))
    result = tabulate(run_folders(args.runs or [args.out]))
    order = [*args.strategies.split(","), *sorted(set(result["summary"]) - set(args.strategies.split(",")))]
    table = markdown(result, order)
    print(table)
    result.update({"recipe": RECIPE, "commit": git_commit(), "sources_md5": sources_md5(), "wall_s": round(time.time() - start, 1), "table": table})
    out = Path(__file__).resolve().parent / "results" / "strategies.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
