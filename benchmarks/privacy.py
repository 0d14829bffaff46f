"""Differential privacy: accuracy vs ε of client-level DP-FedAvg and of local DP-SGD (strategy dpfedavg).

Two federations on real PneumoniaMNIST (binary; a constant "pneumonia" answer scores 0.625 on the
test split), each with the no-DP FedAvg reference on the same clients:

- **client-level** (``client``): DP-FedAvg (McMahan et al. 2018) in the cross-device regime it is
  meant for: 500 clients holding ~7.5 training images each (IID), 100 per round (q = 0.2), 3 local
  epochs of batch 8, update clip C = 0.2 (about the median update norm without clipping), server
  noise multiplier z ∈ {0 (clipping only), 0.3, 0.5, 1, 2}. ε protects a whole client's
  participation, for δ = 1e-5, from Opacus's RDP accountant (Poisson-sampling approximation of the
  fixed-size sampling of clients). The noise on the mean update has std z·C/100 per coordinate, so
  the utility loss falls with the clients per round: real deployments use thousands per round.
- **record-level** (``local``): local DP-SGD through Opacus in the cross-silo regime: 5 hospitals
  holding ~480 training images each (3000 of PneumoniaMNIST's images, IID), all in every round,
  Poisson batches of expected size 160 (q = 1/3), lr 0.5, per-example clip 1, noise multiplier
  σ ∈ {0.3, 0.5, 1}; no client-level noise (z = 0, no clipping of updates). ε protects one training
  image of a hospital (the largest over the hospitals); it says nothing about a hospital as a whole.

Reported: the final global model's test accuracy (mean ± std over seeds) and the final ε. The
client-level section runs ``--rounds`` rounds (default 20), the record-level one half as many
(per-example gradients cost ~4× a plain step on this CPU).

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/privacy.py [--rounds 20] [--seeds 0,1]
        [--only client,local] [--set key=value ...] [--out benchmarks/results] [--quick] [--allow-synthetic]

Writes ``privacy.json`` (settings with provenance, the tables, every run) and ``privacy.md`` under
``--out``; run folders go to ``<out>/privacy_runs``. ``--quick`` is a smoke test: 2 rounds, 50 and
4 clients, fewer rows and noise levels, one seed.
"""

from __future__ import annotations

import math
import sys
import time

from tables import agg, fmt, mean_std, number, PaperBench, parse_args, run_sections  # benchmarks/tables.py

SECTIONS = ("client", "local")
DELTA = 1e-5
COMMON = ["data.datasets=[pneumoniamnist]", "data.partition=iid", "eval.personalised=false"]
CLIENT_BASE = [*COMMON, "clients.num=500", "clients.fraction=0.2", "clients.batch_size=8", "clients.local_epochs=3", "clients.lr=0.1"]
CLIENT_CLIP = 0.2
CLIENT_Z = (0.0, 0.3, 0.5, 1.0, 2.0)
LOCAL_BASE = [*COMMON, "clients.num=5", "clients.fraction=1.0", "clients.batch_size=160", "clients.local_epochs=1", "clients.lr=0.5",
              "data.max_train_per_dataset=3000"]
LOCAL_SIGMA = (0.3, 0.5, 1.0)
LOCAL_CLIP = 1.0
QUICK = {
    "client": (["clients.num=50", "data.max_train_per_dataset=600", "data.max_test_per_dataset=200"], (0.0, 1.0)),
    "local": (["clients.num=4", "clients.batch_size=32", "data.max_train_per_dataset=300", "data.max_test_per_dataset=200"], (1.0,)),
}


def epsilon_value(v) -> float | str | None:
    """An ε for the JSON: a number, "inf" (no guarantee), or None (no DP)."""
    v = number(v)
    return None if v is None else ("inf" if math.isinf(v) else v)


def epsilon_cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "— (no DP)"
    if "inf" in values:
        return "∞ (none)"
    return mean_std(values, 2)


class Bench(PaperBench):
    result = "privacy"
    title = "Differential privacy on raymed: accuracy vs ε"
    note = ("Final global test accuracy on PneumoniaMNIST (a constant answer scores 0.625), mean ± std over seeds; ε for δ = 1e-5 "
            "from Opacus's RDP accountant. Client-level ε protects a client's participation; record-level ε one training image.")
    runs_folder = "privacy_runs"

    def __init__(self, args) -> None:
        super().__init__(args)
        self.rounds = 2 if args.quick else args.rounds  # the client-level section's; the record-level one runs half

    def rows(self, section: str) -> tuple[list[str], int, list[tuple[str, str, list[str]]]]:
        """(base overrides, rounds, rows [(key, label, overrides)]) of a section."""
        quick, levels = QUICK[section]
        if section == "client":
            base, rounds = CLIENT_BASE, self.rounds
            levels = levels if self.args.quick else CLIENT_Z
            dp = [(f"z={z:g}", f"DP-FedAvg, z = {z:g}" + (" (clipping only)" if z == 0 else ""),
                   ["strategy.name=dpfedavg", f"strategy.noise_multiplier={z}", f"strategy.clip={CLIENT_CLIP}", f"strategy.delta={DELTA}"])
                  for z in levels]
        else:
            base, rounds = LOCAL_BASE, max(1, self.rounds // 2)
            levels = levels if self.args.quick else LOCAL_SIGMA
            dp = [(f"sigma={s:g}", f"local DP-SGD, σ = {s:g}",
                   ["strategy.name=dpfedavg", "strategy.noise_multiplier=0", "strategy.clip=1e9", f"strategy.local_noise_multiplier={s}",
                    f"strategy.local_clip={LOCAL_CLIP}", f"strategy.delta={DELTA}"]) for s in levels]
        if self.args.quick:
            base, rounds = [*base, *quick], 2
        return [*base, f"rounds={rounds}", f"eval.every={rounds}"], rounds, [("fedavg", "FedAvg (no DP)", ["strategy.name=fedavg"]), *dp]

    def run_one(self, section: str, key: str, label: str, overrides: list[str]) -> dict:
        cfg, run, wall = self.federation(overrides)
        final = self.selected(run)
        clients = cfg.clients
        record = {"section": section, "row": key, "label": label, "seed": cfg.seed, "overrides": [*overrides, *self.tail],
                  "clients": clients.num, "clients_per_round": clients.per_round, "rounds": cfg.rounds,
                  "acc": number(final.get("global/mean/acc")), "epsilon": epsilon_value(final.get("privacy/epsilon")),
                  "local_epsilon_max": epsilon_value(final.get("privacy/local_epsilon_max")),
                  "clipped_fraction": number(run["rounds"]["privacy/clipped_fraction"].mean()) if "privacy/clipped_fraction" in run["rounds"] else None,
                  "run_dir": str(run["dir"]), "wall_s": round(wall, 2)}
        eps = record["local_epsilon_max"] if section == "local" else record["epsilon"]
        print(f"{section} {label} seed={cfg.seed} acc={fmt(record['acc'])} ε={eps} {wall:.0f}s", flush=True)
        self.runs.append(record)
        return record

    def section(self, section: str) -> None:
        base, rounds, rows = self.rows(section)
        by_row: dict[str, list[dict]] = {key: [] for key, _, _ in rows}
        for seed in self.seeds:
            for key, label, overrides in rows:
                by_row[key].append(self.run_one(section, key, label, [*base, *overrides, f"seed={seed}"]))
        eps_key = "epsilon" if section == "client" else "local_epsilon_max"
        table = [{"row": key, "label": label, "acc": agg([r["acc"] for r in by_row[key]]),
                  "epsilon": [r[eps_key] for r in by_row[key]], "clipped_fraction": agg([r["clipped_fraction"] for r in by_row[key]]),
                  "wall_s": agg([r["wall_s"] for r in by_row[key]])} for key, label, _ in rows]
        k = by_row[rows[0][0]][0]  # the federation's sizes, as run
        if section == "client":
            title = (f"Client-level DP-FedAvg: {k['clients']} clients, {k['clients_per_round']} per round, {rounds} rounds, C = {CLIENT_CLIP:g}")
            header = ["method", "client-level ε (δ=1e-5)", "global acc", "updates clipped", "s / run"]
            cells = lambda r: [r["label"], epsilon_cell(r["epsilon"]), mean_std(r["acc"], 3), mean_std(r["clipped_fraction"], 2), mean_std(r["wall_s"], 0)]  # noqa: E731
            note = ("ε is that of the whole federation after the last round (the same for every seed). \"updates clipped\": the fraction of "
                    "client updates longer than C (a diagnostic of the simulation, not released privately).")
        else:
            title = f"Record-level local DP-SGD (Opacus): {k['clients']} hospitals, all in every round, {rounds} rounds, per-example clip {LOCAL_CLIP:g}"
            header = ["method", "record-level ε, largest client (δ=1e-5)", "global acc", "s / run"]
            cells = lambda r: [r["label"], epsilon_cell(r["epsilon"]), mean_std(r["acc"], 3), mean_std(r["wall_s"], 0)]  # noqa: E731
            note = "No client-level noise in these rows: the update of a hospital is released as DP-SGD left it."
        self.add_table(section, title, header, table, cells, note=note)

    def client(self) -> None:
        self.section("client")

    def local(self) -> None:
        self.section("local")

    def save(self) -> None:
        self.write(self.result, self.title, self.note, delta=DELTA, sections={
            "client": {"base": CLIENT_BASE, "clip": CLIENT_CLIP, "noise_multipliers": list(CLIENT_Z), "rounds": self.rows("client")[1]},
            "local": {"base": LOCAL_BASE, "local_clip": LOCAL_CLIP, "local_noise_multipliers": list(LOCAL_SIGMA), "rounds": self.rows("local")[1]},
        }, quick_overrides={s: q for s, (q, _) in QUICK.items()} if self.args.quick else {})


def main() -> int:
    import ray  # after raymed (imported above), which sets Ray's environment

    args = parse_args(__doc__, SECTIONS, rounds=20, seeds="0,1", quick="2 rounds, 50 and 4 clients, fewer rows and noise levels, one seed")
    # One Ray session for every run; "local": a fresh one of our own, never a cluster another process started.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    start = time.time()
    run_sections(Bench(args), SECTIONS, args.only, "privacy")
    print(f"total {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
