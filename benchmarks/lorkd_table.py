"""LoRKD, federated: per-task accuracy and parameter counts of the teacher, a single multi-task student
and the fused LoRKD experts, with the KL transfer on and off.

Context: LoRKD (CVPR 2024, arXiv 2404.17184) decomposes a foundation model into a light student with
a low-rank expert per task and distils the teacher through a KL term (which the released MedMNIST
script multiplies by 0). This benchmark runs the embedded ``lorkd`` experiment (real MedMNIST files:
pneumonia X-ray, breast ultrasound, retina fundus; 12 hospitals, one task each, half per round) for
four rows, every one a raymed federation on the same clients:

- **teacher**: FedAvg of ``cnn_large`` (1.7 M parameters) for three times the rounds with every
  client in every round (a foundation model gets more compute than the student); its run's
  ``model.safetensors`` is the teacher of the LoRKD rows of the same seed;
- **multi-task student**: FedAvg of ``cnn`` (0.42 M), one backbone and a head per task;
- **LoRKD, KL off** (λ = 0): the student with a rank-8 expert per task on every dense layer;
- **LoRKD, KL on** (λ = 1, T = 2).

LoRKD's accuracies are those of each task's fused network W0 + ΔW_t (what evaluation scores).
Columns: test accuracy per task and their mean (global model, final round), mean ± std over seeds;
parameters: total, shared, per-task expert, and deployed per task.

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/lorkd_table.py [--rounds 10] [--seeds 0,1,2]
        [--set key=value ...] [--out benchmarks/results] [--quick] [--allow-synthetic]

Writes ``lorkd_table.json`` (every run with its overrides, final metrics and folder, the table rows,
the settings) and ``lorkd_table.md`` under ``--out``; run folders go to ``<out>/lorkd_runs``.
``--quick`` is a smoke test (1 round, 6 clients, 200/40 rows, one seed).
"""

from __future__ import annotations

import sys

from tables import agg, mean_std, number, PaperBench, parse_args, run_sections  # benchmarks/tables.py

CONFIG = "lorkd"
SECTIONS = ("main",)
QUICK = ["clients.num=6", "data.max_train_per_dataset=200", "data.max_test_per_dataset=40"]
TEACHER = ("teacher", "teacher (FedAvg, cnn_large, 3× rounds, every client)", ["strategy={name: fedavg}", "model.name=cnn_large", "clients.fraction=1.0"])
ROWS = [
    ("student", "multi-task student (FedAvg, cnn)", ["strategy={name: fedavg}"]),
    ("kl_off", "LoRKD fused, KL off (λ=0)", ["strategy.lam=0"]),
    ("kl_on", "LoRKD fused, KL on (λ=1, T=2)", []),
]


def parameter_counts(cfg, tasks) -> dict:
    """Parameters of the row's model: total, shared, one task's expert, and one deployed task network."""
    from raymed.methods import build_method
    from raymed.methods.lorkd import LoRKDModel, is_expert

    model = build_method(cfg.strategy.name, cfg.strategy.params).build_model(cfg.model, tasks, cfg.seed)
    named = {k: p.numel() for k, p in model.named_parameters() if not k.startswith("teacher.")}
    heads = {f: sum(n for k, n in named.items() if k.startswith(f"heads.{f}.")) for f in tasks}
    experts = {f: sum(n for k, n in named.items() if is_expert(k) and k.endswith(f".{f}")) for f in tasks}
    shared = sum(n for k, n in named.items() if not k.startswith("heads.") and not is_expert(k))
    deployed = {f: sum(p.numel() for p in model.fused(f).parameters()) if isinstance(model, LoRKDModel) else shared + heads[f] for f in tasks}
    return {"total": sum(named.values()), "shared": shared, "expert_per_task": max(experts.values()), "deployed_per_task": max(deployed.values())}


class Bench(PaperBench):
    config = CONFIG
    result = "lorkd_table"
    title = "LoRKD on raymed"
    note = "Test accuracy of the final global model per task; mean ± std over seeds."
    runs_folder = "lorkd_runs"
    quick = tuple(QUICK)

    def run_one(self, key: str, label: str, overrides: list[str]) -> dict:
        from raymed.data.shards import ShardSet

        cfg, run, wall = self.federation(overrides)
        final = {k: number(v) for k, v in self.selected(run).items() if number(v) is not None}
        params = parameter_counts(cfg, ShardSet(run["meta"]["shards"]).tasks)
        record = {"row": key, "label": label, "overrides": [*overrides, *self.tail], "seed": cfg.seed, "params": params,
                  "global": {k.removeprefix("global/"): v for k, v in final.items() if k.startswith("global/")},
                  "bytes_up_per_round": final.get("comm/bytes_up"), "run_dir": str(run["dir"]), "wall_s": round(wall, 2)}
        print(f"{label} seed={cfg.seed} mean acc={record['global'].get('mean/acc', float('nan')):.3f} {wall:.0f}s", flush=True)
        self.runs.append(record)
        return record

    def main(self) -> None:
        by_row: dict[str, list[dict]] = {TEACHER[0]: [], **{key: [] for key, _, _ in ROWS}}
        for seed in self.seeds:
            teacher = self.run_one(TEACHER[0], TEACHER[1], [*TEACHER[2], f"rounds={3 * self.rounds}", f"seed={seed}"])
            by_row[TEACHER[0]].append(teacher)
            for key, label, overrides in ROWS:
                with_teacher = [] if key == "student" else [f"strategy.teacher={teacher['run_dir']}"]
                by_row[key].append(self.run_one(key, label, [*overrides, *with_teacher, f"seed={seed}"]))
        rows = [TEACHER, *ROWS]
        flags = sorted({k.split("/")[0] for r in self.runs for k in r["global"]} - {"mean"})
        table = []
        for key, label, _ in rows:
            runs = by_row[key]
            table.append({"row": key, "label": label, **{f: agg([r["global"].get(f"{f}/acc") for r in runs]) for f in [*flags, "mean"]},
                          **runs[0]["params"], "bytes_up_per_round": agg([r["bytes_up_per_round"] for r in runs]), "wall_s": agg([r["wall_s"] for r in runs])})
        header = ["model", *(f"{f} acc" for f in flags), "mean acc", "params total", "shared", "expert / task", "deployed / task"]
        self.add_table("main", "Per-task test accuracy (global model, fused per task for LoRKD) and parameters", header, table,
                       lambda r: [r["label"], *(mean_std(r[f], 3) for f in [*flags, "mean"]),
                                  *(f"{r[k]:,}" for k in ("total", "shared", "expert_per_task", "deployed_per_task"))])


def main() -> int:
    args = parse_args(__doc__, SECTIONS, rounds=10, seeds="0,1,2", quick="1 round, 6 clients, 200/40 rows, one seed")
    run_sections(Bench(args), SECTIONS, args.only, "lorkd_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
