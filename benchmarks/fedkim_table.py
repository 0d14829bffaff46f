"""FedKIM's central model with and without federated knowledge injection: per-task answer scores.

Context: FedKIM (EMNLP 2024, arXiv 2408.10276) injects the encoders that hospitals train locally
into a central model through M3OE, a mixture of LoRA experts gated by modality and task
descriptions, and evaluates trained tasks and held-out tasks. This benchmark runs the embedded
``fedkim`` experiment (real MedMNIST files and VQA-RAD, 28×28 images, a small CNN per input kind, a
2-layer GPT-2 of width 128 pretrained on IU X-Ray text as the frozen language model) for three rows:

- **no injection**: the central model (M3OE, 4 experts) trained on the server's split alone
  (``strategy.inject=false``); the clients still train, but their encoders never reach it;
- **FedAvg + LoRA**: FedAvg-injected encoders and a single LoRA (``strategy.experts=1``);
- **FedKIM (M3OE)**: FedAvg-injected encoders and 4 experts, dense gate, as configured.

Columns per task, final evaluated round (each run evaluates only after its last round), mean ± std
over seeds: exact-match accuracy, macro-F1 and Matthews correlation of the central model's greedy
answers on the test split; for VQA-RAD's open questions BLEU-1 and ROUGE-1. Trained tasks and
held-out tasks (a new task sentence on chest X-rays; VQA on abdominal CT, a modality never trained)
are separate tables; a last table gives the mean accuracy over each group.

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/fedkim_table.py [--rounds 10] [--seeds 0,1,2]
        [--set key=value ...] [--out benchmarks/results] [--quick] [--allow-synthetic]

Writes ``fedkim_table.json`` (every run with its overrides, final metrics and folder, the table
rows, the settings) and ``fedkim_table.md`` under ``--out``; run folders go to ``<out>/fedkim_runs``.
``--quick`` is a smoke test (1 round, 6 clients, 200/40 rows, one seed).
"""

from __future__ import annotations

import argparse
import sys

from raymed.methods.fedkim.instructions import CATALOGUE, NEW_SENTENCES
from tables import agg, mean_std, number, PaperBench, parse_args, run_sections  # benchmarks/tables.py

CONFIG = "fedkim"
SECTIONS = ("main",)
QUICK = ["clients.num=6", "data.max_train_per_dataset=200", "data.max_test_per_dataset=40"]
ROWS = [
    ("no_injection", "central model, no injection", ["strategy.inject=false"]),
    ("fedavg_lora", "FedAvg encoders + single LoRA", ["strategy.experts=1"]),
    ("fedkim", "FedKIM (M3OE, 4 experts)", []),
]
CLOSED_METRICS = ("acc", "f1", "mcc")
OPEN_METRICS = ("bleu1", "rouge1")


class Bench(PaperBench):
    config = CONFIG
    result = "fedkim_table"
    title = "FedKIM central model on raymed"
    note = "Central model's greedy answers on each task's test split; mean ± std over seeds."
    runs_folder = "fedkim_runs"
    quick = tuple(QUICK)

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.held_out: set[str] = set()  # names of the held-out tasks

    def run_one(self, key: str, label: str, overrides: list[str]) -> dict:
        cfg, run, wall = self.federation(overrides)
        self.held_out |= {t.name for t in NEW_SENTENCES.values()} | {CATALOGUE[f].name for f in cfg.data.held_out}
        final = {k: number(v) for k, v in self.selected(run).items() if number(v) is not None}
        central = {k.removeprefix("central/"): v for k, v in final.items() if k.startswith("central/")}
        record = {"row": key, "label": label, "overrides": [*overrides, *self.tail], "seed": cfg.seed, "central": central,
                  "clients_global_acc": final.get("global/mean/acc"), "run_dir": str(run["dir"]), "wall_s": round(wall, 2)}
        print(f"{label} seed={cfg.seed} trained acc={central.get('trained/acc', float('nan')):.3f} "
              f"held-out acc={central.get('held_out/acc', float('nan')):.3f} {wall:.0f}s", flush=True)
        self.runs.append(record)
        return record

    def main(self) -> None:
        by_row = {key: [self.run_one(key, label, [*o, f"seed={s}"]) for s in self.seeds] for key, label, o in ROWS}
        names = sorted({k.split("/")[0] for r in self.runs for k in r["central"]} - {"trained", "held_out", "train_loss"})
        held_out = self.held_out

        def values(runs, name):
            return agg([r["central"].get(name) for r in runs])

        for group, title in ((False, "Trained tasks"), (True, "Held-out tasks (zero-shot)")):
            tasks = [n for n in names if (n in held_out) == group]
            header = ["task", "metric", *(label for _, label, _ in ROWS)]
            rows = []
            for task in tasks:
                metrics = list(CLOSED_METRICS) + [m for m in OPEN_METRICS if any(f"{task}/{m}" in r["central"] for r in self.runs)]
                rows += [{"task": task, "metric": m, **{key: values(by_row[key], f"{task}/{m}") for key, _, _ in ROWS}} for m in metrics]
            self.add_table("trained" if not group else "held_out", title, header, rows,
                           lambda r: [r["task"], r["metric"], *(mean_std(r[key], 3) for key, _, _ in ROWS)])
        summary = [{"group": g, **{key: values(by_row[key], f"{g}/acc") for key, _, _ in ROWS}} for g in ("trained", "held_out")]
        summary.append({"group": "clients' FedAvg models (global/mean/acc)", **{key: agg([r["clients_global_acc"] for r in by_row[key]]) for key, _, _ in ROWS}})
        summary.append({"group": "wall s per run", **{key: agg([r["wall_s"] for r in by_row[key]]) for key, _, _ in ROWS}})
        self.add_table("summary", "Mean accuracy over tasks", ["group", *(label for _, label, _ in ROWS)], summary,
                       lambda s: [s["group"], *(mean_std(s[key], 3 if "wall" not in s["group"] else 0) for key, _, _ in ROWS)])


def main() -> int:
    args = parse_args(__doc__, SECTIONS, rounds=10, seeds="0,1,2", quick="1 round, 6 clients, 200/40 rows, one seed")
    run_sections(Bench(args), SECTIONS, args.only, "fedkim_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
