"""MAFM3, federated: a new modality and a new task on a frozen foundation model, and what each client sends.

Context: MAFM3 (arXiv 2511.11212) extends a frozen foundation model to new tasks and modalities with
LoRA modules, heads and patch embeddings selected by the input's metadata. This benchmark runs the
embedded ``mafm3`` experiment (real MedMNIST files; 12 hospitals, one dataset each, half per round):

- **foundation**: FedAvg of ``cnn`` on the gray datasets only (pneumonia X-ray, breast ultrasound),
  a raymed run whose ``model.safetensors`` is the frozen foundation of the MAFM3 rows of its seed;
- **full-model FedAvg**: ``cnn`` trained from scratch on all three datasets, every weight sent;
- **MAFM3, heads + embeddings** (``lora=false``): the new RGB fundus patch embedding and the heads;
- **MAFM3** (rank-8 LoRA per (task, modality), plus the above).

The new modality and task: RetinaMNIST's RGB fundus photographs, graded as a prognosis (a hazard per
diabetic-retinopathy grade, discrete-time survival loss). Columns, final round, mean ± std over
seeds: retina accuracy (median grade), mean absolute grade error and C-index; pneumonia and breast
accuracy; bytes one client sends per round (mean over clients and rounds) and its ratio to
full-model FedAvg; parameters trained. The foundation file's sha256 is recorded before and after
every MAFM3 run (it must not change; the tests check the loaded weights bit for bit).

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/mafm3_table.py [--rounds 10] [--seeds 0,1,2]
        [--set key=value ...] [--out benchmarks/results] [--quick] [--allow-synthetic]

Writes ``mafm3_table.json`` and ``mafm3_table.md`` under ``--out``; run folders go to
``<out>/mafm3_runs``. ``--quick`` is a smoke test (1 round, 6 clients, 200/40 rows, one seed).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd

from tables import agg, fmt, mean_std, number, PaperBench, parse_args, run_sections  # benchmarks/tables.py

CONFIG = "mafm3"
SECTIONS = ("main",)
QUICK = ["clients.num=6", "data.max_train_per_dataset=200", "data.max_test_per_dataset=40"]
FOUNDATION = ("foundation", "foundation (FedAvg cnn, gray datasets)", ["strategy={name: fedavg}", "data.datasets=[pneumoniamnist,breastmnist]", "data.prognosis=[]"])
ROWS = [
    ("fedavg", "full-model FedAvg (cnn)", ["strategy={name: fedavg}"]),
    ("heads", "MAFM3, heads + embeddings", ["strategy.lora=false"]),
    ("mafm3", "MAFM3 (LoRA r=8)", []),
]
RETINA = ("acc", "mae", "c_index")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Bench(PaperBench):
    config = CONFIG
    result = "mafm3_table"
    title = "MAFM3 on raymed"
    note = "Final global model on each test split; mean ± std over seeds."
    runs_folder = "mafm3_runs"
    quick = tuple(QUICK)

    def run_one(self, key: str, label: str, overrides: list[str], foundation: Path | None = None) -> dict:
        before = sha256(foundation) if foundation else None
        cfg, run, wall = self.federation(overrides)
        final = {k: number(v) for k, v in self.selected(run).items() if number(v) is not None}
        clients = pd.concat(pd.read_parquet(p) for p in sorted((Path(run["dir"]) / "clients").glob("*.parquet")))
        record = {"row": key, "label": label, "overrides": [*overrides, *self.tail], "seed": cfg.seed,
                  "global": {k.removeprefix("global/"): v for k, v in final.items() if k.startswith("global/")},
                  "bytes_up_per_client": float(clients["bytes_up"].mean()), "trained_params": self.trained_params(cfg, run),
                  "foundation_unchanged": None if foundation is None else sha256(foundation) == before,
                  "run_dir": str(run["dir"]), "wall_s": round(wall, 2)}
        print(f"{label} seed={cfg.seed} retina c-index={record['global'].get('retinamnist/c_index', float('nan')):.3f} "
              f"up/client={record['bytes_up_per_client'] / 1e3:.0f} kB {wall:.0f}s", flush=True)
        self.runs.append(record)
        return record

    @staticmethod
    def trained_params(cfg, run) -> int:
        """Parameters any client trains (the union over datasets)."""
        from raymed.data.shards import ShardSet
        from raymed.methods import build_method

        tasks = ShardSet(run["meta"]["shards"]).tasks
        model = build_method(cfg.strategy.name, cfg.strategy.params).build_model(cfg.model, tasks, cfg.seed)
        keys = set(model.state_keys(list(tasks)))
        return sum(p.numel() for k, p in model.named_parameters() if k in keys)

    def main(self) -> None:
        by_row: dict[str, list[dict]] = {FOUNDATION[0]: [], **{key: [] for key, _, _ in ROWS}}
        for seed in self.seeds:
            base = self.run_one(FOUNDATION[0], FOUNDATION[1], [*FOUNDATION[2], f"seed={seed}"])
            by_row[FOUNDATION[0]].append(base)
            model_file = Path(base["run_dir"]) / "model.safetensors"
            for key, label, overrides in ROWS:
                given = [] if key == "fedavg" else [f"strategy.foundation={base['run_dir']}"]
                by_row[key].append(self.run_one(key, label, [*overrides, *given, f"seed={seed}"], None if key == "fedavg" else model_file))
        full = agg([r["bytes_up_per_client"] for r in by_row["fedavg"]])["mean"]
        table = []
        for key, label, _ in [FOUNDATION, *ROWS]:
            runs = by_row[key]
            up = agg([r["bytes_up_per_client"] for r in runs])
            table.append({"row": key, "label": label, **{f"retina_{m}": agg([r["global"].get(f"retinamnist/{m}") for r in runs]) for m in RETINA},
                          "pneumonia_acc": agg([r["global"].get("pneumoniamnist/acc") for r in runs]),
                          "breast_acc": agg([r["global"].get("breastmnist/acc") for r in runs]),
                          "bytes_up_per_client": up, "vs_fedavg": up["mean"] / full if full and up["mean"] is not None else None,
                          "trained_params": runs[0]["trained_params"],
                          "foundation_unchanged": None if runs[0]["foundation_unchanged"] is None else all(r["foundation_unchanged"] for r in runs)})
        header = ["model", "retina acc", "retina MAE", "retina C-index", "pneumonia acc", "breast acc", "kB up / client / round", "× FedAvg", "params trained", "foundation unchanged"]
        self.add_table("main", "New modality (RGB fundus) and new task (grade as prognosis) on a frozen gray foundation", header, table,
                       lambda r: [r["label"], *(mean_std(r[f"retina_{m}"], 3) for m in RETINA), mean_std(r["pneumonia_acc"], 3), mean_std(r["breast_acc"], 3),
                                  fmt(None if r["bytes_up_per_client"]["mean"] is None else r["bytes_up_per_client"]["mean"] / 1e3, 1),
                                  fmt(r["vs_fedavg"], 3), f"{r['trained_params']:,}",
                                  "—" if r["foundation_unchanged"] is None else ("yes" if r["foundation_unchanged"] else "NO")],
                       note="The foundation never saw fundus images: it has no retina columns.")


def main() -> int:
    args = parse_args(__doc__, SECTIONS, rounds=10, seeds="0,1,2", quick="1 round, 6 clients, 200/40 rows, one seed")
    run_sections(Bench(args), SECTIONS, args.only, "mafm3_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
