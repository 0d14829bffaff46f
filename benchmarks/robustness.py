"""Robust aggregation under Byzantine clients: FedAvg vs coordinate-wise median vs trimmed mean vs
multi-Krum, with 0/10/20/30% of the clients attacking.

Context: the robust rules (raymed/methods/robust.py; Yin et al. 2018, arXiv 1803.01498; Blanchard et
al. 2017, NeurIPS paper 6617; El Mhamdi et al. 2018, arXiv 1802.07927) replace FedAvg's weighted mean
of the clients' updates by a statistic that a minority of bad updates cannot drag far. The attackers
are the engine's (``faults.byzantine``): a seeded fraction of the 20 clients, fixed for the run, whose
update is replaced every round they are sampled. Two attacks:

- **sign_flip ×10**: an attacker sends −10·Δ (its honest update, reversed and scaled): with one
  attacker among 10 sampled clients FedAvg's mean update already points backwards;
- **noise**: an attacker sends N(0, 1) in every coordinate (the engine's default scale).

Settings (the embedded default otherwise): PneumoniaMNIST + BreastMNIST (real files; both binary, so
the mean accuracy is read the same on both), an IID partition over 20 clients, 10 per round, 1 local
epoch of SGD (lr 0.05, momentum 0.9, batch 32), the small CNN, 10 rounds. IID is the fair setting
here: every client holds both datasets and sends every key, so every rule sees every update and the
honest updates are alike, which is what the robust rules assume (under the modality partition each
head comes only from its dataset's clients, Krum scores the backbone alone, and an honest client of
the smaller modality looks like an outlier). ``--set data.partition=modality`` runs that case.

Rules: FedAvg (weighted mean); median; trimmed mean with β = 0.3 (cuts ⌈0.3·n⌉ from each end: as many
as the largest attacker fraction); multi-Krum with f = 3 (the attackers expected among 10 sampled at
30%) averaging the m = 5 best-scored updates. Cells: test accuracy of the global model after the last
round, mean over the two datasets, mean ± std over seeds; the JSON also holds every run's per-round
curve (global mean accuracy), final per-dataset accuracies, the attackers sampled per round and the
norm of the final weights. The 0% column is one run per rule and seed (no attacker, no attack).

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/robustness.py [--rounds 10] [--seeds 0,1]
        [--set key=value ...] [--out benchmarks/results] [--quick] [--allow-synthetic]

Writes ``robustness.json`` and ``robustness.md`` under ``--out``; run folders go to
``<out>/robustness_runs``. 4 rules × (1 + 2 attacks × 3 fractions) × seeds federations in one Ray
session. ``--quick`` is a smoke test (2 rounds, 10 clients all sampled, 200/60 rows, 0% and 30%, one seed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from raymed.experiment import load_config  # importing raymed first sets up Ray's environment
from raymed.engine import run_experiment
from raymed.errors import ClientFailure, find_user_error
from raymed.results import read_run
from tables import agg, mean_std, number, PaperBench, parse_args  # benchmarks/tables.py

SECTIONS = ("main",)
BASE = [
    "data.datasets=[pneumoniamnist, breastmnist]",
    "data.partition=iid",
    "clients.num=20",
    "clients.fraction=0.5",
    "clients.momentum=0.9",
    "clients.local_steps=null",  # one local epoch, as measured (the embedded default now takes 20 steps)
    "data.normalise=fixed",  # as measured (the embedded default now normalises per dataset)
    "eval.every=1",  # the per-round curve
    "eval.personalised=false",  # the global model is what an attack corrupts
    "engine.checkpoint_every=0",
]
QUICK = ["clients.num=10", "clients.fraction=1.0", "data.max_train_per_dataset=200", "data.max_test_per_dataset=60"]
RULES = [
    ("fedavg", "FedAvg (weighted mean)", ["strategy={name: fedavg}"]),
    ("median", "coordinate-wise median", ["strategy={name: median}"]),
    ("trimmed_mean", "trimmed mean (β=0.3)", ["strategy={name: trimmed_mean, trim: 0.3}"]),
    ("krum", "multi-Krum (f=3, m=5)", ["strategy={name: krum, byzantine: 3, select: 5}"]),
]
ATTACKS = {
    "sign_flip": ["faults.byzantine.attack=sign_flip", "faults.byzantine.scale=10"],
    "noise": ["faults.byzantine.attack=noise", "faults.byzantine.scale=1"],
}
FRACTIONS = (0.1, 0.2, 0.3)
QUICK_FRACTIONS = (0.3,)


class Bench(PaperBench):
    config = "default"  # the embedded default (raymed/configs/default.yaml), with BASE
    result = "robustness"
    title = "Robust aggregation under Byzantine clients"
    runs_folder = "robustness_runs"
    quick = tuple(QUICK)

    def __init__(self, args) -> None:
        super().__init__(args)
        if args.quick:
            self.rounds = 2  # two points of the curve
            self.common = [c for c in self.common if not c.startswith(("rounds=", "eval.every="))] + ["rounds=2"]
        self.fractions = QUICK_FRACTIONS if args.quick else FRACTIONS
        self.note = (
            f"Test accuracy of the global model after round {self.rounds}, mean over PneumoniaMNIST and BreastMNIST, "
            f"mean ± std over seeds; IID partition, 20 clients, 10 per round (--quick: 10, all). "
            f"Attackers: a seeded fraction of the clients; sign_flip sends −10·Δ, noise sends N(0, 1) per coordinate."
        )

    def run_one(self, rule: str, attack: str | None, fraction: float, seed: int, overrides: list[str]) -> dict:
        import pyarrow.parquet as pq
        from safetensors.numpy import load_file

        name = f"{rule}-{attack or 'clean'}-{round(100 * fraction)}pct-seed{seed}"
        faults = [f"faults.byzantine.fraction={fraction}", *(ATTACKS[attack] if attack else [])]
        run, wall, stopped = self.federation_or_failure([*BASE, *overrides, *faults, f"seed={seed}", f"name={name}"])
        rounds = run["rounds"]
        final = rounds.iloc[-1]
        clients = pq.read_table(run["dir"] / "clients").to_pandas()
        model = run["dir"] / "model.safetensors"  # missing only if the server died with a failure
        weights = load_file(str(model)) if model.is_file() else None
        record = {
            "rule": rule, "attack": attack, "fraction": fraction, "seed": seed, "name": name,
            "overrides": [*BASE, *overrides, *faults, *self.tail],
            "strategy": run["config"]["strategy"],
            "global_mean_acc": number(final.get("global/mean/acc")),
            "global_acc": {c.split("/")[1]: number(final[c]) for c in rounds.columns if c.startswith("global/") and c.endswith("/acc")},
            "curve": [number(v) for v in rounds["global/mean/acc"]],
            "train_loss": [number(v) for v in rounds["train/loss"]],
            "byzantine_clients": int(clients.groupby("client_id")["byzantine"].first().sum()),
            "byzantine_sampled_per_round": clients.groupby("round")["byzantine"].sum().astype(int).tolist(),
            "weights_norm": float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in weights.values()))) if weights else None,
            "rounds_done": len(rounds),
            "stopped": stopped,  # why the run ended early (every update non-finite after the model diverged), or None
            "run_dir": str(run["dir"]),
            "wall_s": round(wall, 2),
        }
        print(f"{name}: acc={record['global_mean_acc']:.3f}{' STOPPED' if stopped else ''} curve={[round(v, 3) for v in record['curve'] if v is not None]} "
              f"attackers/round={record['byzantine_sampled_per_round']} |w|={record['weights_norm'] or float('nan'):.3g} {wall:.0f}s", flush=True)
        self.runs.append(record)
        return record

    def federation_or_failure(self, overrides: list[str]) -> tuple[dict, float, str | None]:
        """One federation: (its run as read back, wall seconds, why it stopped early or None). A run
        whose model diverged stops when every update of a round is non-finite (ClientFailure); that
        is an outcome here, and its rows up to then are kept: the model stays where it went."""
        cfg = load_config(self.config, [*self.common, *overrides, *self.tail])
        started: dict = {}
        start, stopped = time.time(), None
        try:
            folder = run_experiment(cfg, on_start=started.update)
        except Exception as exc:
            failure = find_user_error(exc)
            if not isinstance(failure, ClientFailure) or not (Path(started.get("run_dir", "")) / "rounds.parquet").is_file():
                raise
            folder, stopped = started["run_dir"], str(failure)
        wall = time.time() - start
        run = read_run(folder)
        if run["meta"]["synthetic"]:
            if not self.args.allow_synthetic:
                sys.exit("synthetic stand-ins found instead of the real data files; set RAYMED_DATA_DIR (or pass --allow-synthetic)")
            self.synthetic = True
        return run, wall, stopped

    def main(self) -> None:
        columns = [("none", 0.0)] + [(a, f) for a in ATTACKS for f in self.fractions]
        cells: dict[tuple[str, str, float], list[dict]] = {}
        for seed in self.seeds:
            for rule, _, overrides in RULES:
                for attack, fraction in columns:
                    record = self.run_one(rule, None if attack == "none" else attack, fraction, seed, overrides)
                    cells.setdefault((rule, attack, fraction), []).append(record)
            self.save_table(cells, columns)
            self.save()  # after every seed: a partial table survives an interrupted run

    def save_table(self, cells: dict, columns: list[tuple[str, float]]) -> None:
        def key(attack: str, fraction: float) -> str:
            return "0%" if attack == "none" else f"{attack} {round(100 * fraction)}%"

        rows = []
        for rule, label, _ in RULES:
            row = {"rule": rule, "label": label}
            for attack, fraction in columns:
                runs = cells.get((rule, attack, fraction), [])
                row[key(attack, fraction)] = agg([r["global_mean_acc"] for r in runs])
                row[key(attack, fraction) + " curve"] = [agg(list(v)) for v in zip(*(r["curve"] for r in runs))]
            rows.append(row)
        header = ["rule", *(key(a, f) for a, f in columns)]

        def cell(row: dict, attack: str, fraction: float) -> str:
            stopped = any(r["stopped"] for r in cells.get((row["rule"], attack, fraction), []))
            return mean_std(row[key(attack, fraction)], 3) + (" †" if stopped else "")

        for row in rows:
            row["stopped_runs"] = {key(a, f): sum(1 for r in cells.get((row["rule"], a, f), []) if r["stopped"]) for a, f in columns}
        self.add_table("main", "Global test accuracy (mean of the two datasets) with a fraction of Byzantine clients", header, rows,
                       lambda r: [r["label"], *(cell(r, a, f) for a, f in columns)],
                       note="† some runs stopped early: the model diverged until every client's update was non-finite; their accuracy "
                            "is that of the last evaluated round (the model cannot recover from there)." if any(r["stopped"] for r in self.runs) else "")

    def save(self) -> None:
        self.write(self.result, self.title, self.note, base=BASE, quick_overrides=QUICK if self.args.quick else [],
                   rules={rule: overrides for rule, _, overrides in RULES}, attacks=ATTACKS, fractions=[0.0, *self.fractions],
                   partition_note="IID: every client holds both datasets, so every rule sees every key from every client")


def main() -> int:
    import ray

    args = parse_args(__doc__, SECTIONS, rounds=10, seeds="0,1", quick="2 rounds, 10 clients all sampled, 200/60 rows, 0% and 30%, one seed")
    # One Ray session for every run; "local": a fresh one of our own, never a cluster another process started.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    start = time.time()
    bench = Bench(args)
    bench.main()
    print(f"\n{len(bench.runs)} runs in {time.time() - start:.0f}s; wrote {bench.out / 'robustness.json'} and {bench.out / 'robustness.md'}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
