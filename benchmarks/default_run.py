"""The embedded default run (`raymed run`) over several seeds: does it beat its baselines, and do
FedAvg and FedPer differ by more than their seed spread?

The default federation (raymed/configs/default.yaml): PneumoniaMNIST + BreastMNIST + RetinaMNIST,
20 hospitals, each one modality with a Dirichlet(0.5) mix of that dataset's classes, half of them per
round, 20 local steps each, 20 rounds, the training recipe (momentum 0.9, weight decay 5e-4, cosine lr, augmentation),
each modality normalised by its own channel statistics.
FedPer's private heads can follow each hospital's own class mix; FedAvg's one head per dataset
cannot. Each cell is a test metric at the round selected on validation, mean ± std over seeds, beside
its baseline (majority class; personal: each client's own majority class), ▼ at or below it.

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/default_run.py [--seeds 0,1,2] [--rounds 20] [--out benchmarks/results]

Writes ``default_run.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import time

from tables import PaperBench, agg, flagged, mean_std, parse_args  # benchmarks/tables.py

DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")
STRATEGIES = ("fedavg", "fedper")
METRICS = [("personal/client_mean/acc", "personal acc (client mean)")] + [(f"personal/{d}/acc", f"personal {d[:-5]} acc") for d in DATASETS] + [
    ("global/mean/acc", "global acc (mean)")] + [(f"global/{d}/acc", f"global {d[:-5]} acc") for d in DATASETS]


class Bench(PaperBench):
    config = None  # the embedded default
    result = "default_run"
    runs_folder = "default_run_runs"
    title = "The embedded default run: FedAvg vs FedPer over seeds"
    quick = ("data.max_train_per_dataset=300", "data.max_test_per_dataset=100")

    def __init__(self, args):
        super().__init__(args)
        self.common = [f"rounds={self.rounds}", "eval.every=1", "ray.dashboard=false", f"output_dir={self.out / self.runs_folder}"]

    def main(self) -> None:
        chosen: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
        bases: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
        for seed in self.seeds:
            for strategy in STRATEGIES:
                _, run, wall = self.federation([f"strategy.name={strategy}", f"seed={seed}"])
                values = self.selected(run)
                chosen[strategy].append(values)
                bases[strategy].append(run["summary"].get("baseline_metrics") or {})  # each seed its own partition
                self.runs.append({"strategy": strategy, "seed": seed, "wall_s": round(wall, 1), "run": str(run["dir"]),
                                  "selected_round": values.get("selected_round"), **{k: values.get(k) for k, _ in METRICS}})
                print(f"{strategy} seed {seed}: round {values.get('selected_round')}, " + ", ".join(
                    f"{k} {values.get(k, float('nan')):.3f}" for k, _ in METRICS[:1] + METRICS[4:5]) + f" ({wall:.0f}s)", flush=True)
        self.tabulate(chosen, bases)

    def tabulate(self, chosen: dict[str, list[dict]], bases: dict[str, list[dict]]) -> None:
        """The table: per metric, the mean baseline over seeds, each strategy's mean ± std (▼ when any
        seed is at or below its own seed's baseline), and the FedPer − FedAvg gap against the spread."""
        rows = []
        for key, label in METRICS:
            row = {"metric": key, "label": label, "baseline": agg([b.get(key) for b in bases[STRATEGIES[0]]])["mean"]}
            for s in STRATEGIES:
                row[s] = agg([c.get(key) for c in chosen[s]])
                row[f"{s}_below"] = any(c.get(key) is not None and b.get(key) is not None and c[key] <= b[key] for c, b in zip(chosen[s], bases[s]))
            a, p = row["fedavg"], row["fedper"]
            if a["mean"] is not None and p["mean"] is not None:
                row["difference"] = p["mean"] - a["mean"]
                row["spread"] = max(a.get("std") or 0.0, p.get("std") or 0.0)
            rows.append(row)
        self.add_table(
            "default", f"Test accuracy at the round selected on validation, {len(self.seeds)} seeds (mean ± std)",
            ["metric", "baseline (mean over seeds)", "FedAvg", "FedPer", "FedPer − FedAvg", "larger than the seed spread?"], rows,
            lambda r: [r["label"], "—" if r["baseline"] is None else f"{r['baseline']:.3f}",
                       flagged(mean_std(r["fedavg"], 3), r["fedavg_below"]), flagged(mean_std(r["fedper"], 3), r["fedper_below"]),
                       "—" if "difference" not in r else f"{r['difference']:+.3f}",
                       "—" if "difference" not in r else ("yes" if abs(r["difference"]) > r["spread"] else "no")],
            note="Personal: each client's own model on its own held-out rows (FedAvg's is the global model); its baseline is "
            "each client's own majority class. Global: the server's model on each official test split, against the "
            "majority class (FedPer's global model is the shared body with the seeded initial heads: not reported). "
            "▼: at least one seed at or below its own seed's baseline (each seed partitions anew). Spread: the larger of "
            "the two strategies' std over seeds.",
        )


if __name__ == "__main__":
    args = parse_args(__doc__, ("main",), rounds=20, seeds="0,1,2", quick="2 rounds, one seed, 300/100 rows")
    start = time.time()
    bench = Bench(args)
    bench.main()
    bench.save()
    print(f"\n{len(bench.runs)} runs in {time.time() - start:.0f}s; wrote {bench.out / 'default_run.json'} and .md")
