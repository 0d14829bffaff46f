"""FedMRG (federated medical report generation) against FedAvg on MedMNIST-Reports: quality and upload size.

Context: FedMRG, "Federated Medical Report Generation" (IEEE TMI 2025, arXiv 2506.17562), sends
low-rank factors of the client updates, and adds client-aware contrastive training of the encoder,
diagnosis-driven prompts and a client-specific (never sent) LoRA adapter beside the federated one. A
communication reduction of "62%" is attributed to it by a third-party summary, not verified against
the paper. The paper uses IU X-Ray and MIMIC-CXR with their real images; this benchmark runs the
embedded ``fedmrg`` experiment on MedMNIST-Reports, which is **semi-synthetic** (real PneumoniaMNIST
X-rays paired with real IU X-Ray report text by diagnosis only, different patients; see
:mod:`raymed.tasks.report.text`) with a small CNN encoder and a 2-layer decoder: values are not
comparable with the paper's, only the ordering of the methods.

Two sections, all in one Python process (Ray starts with the first run and every later run joins it):

- main: FedAvg on the full decoder (``model.decoder.lora_rank=0``), FedAvg on the LoRA adapters
  (rank 8 as in the config), and FedMRG as configured.
- ablation: FedMRG without the contrastive losses, without the diagnosis prompts, without the
  specialised adapter (the full FedMRG runs of "main" are reused when that section ran).

Columns (final evaluated round; every run evaluates only after its last round): the global model's
BLEU-4, ROUGE-L, CIDEr and clinical-efficacy F1 on the official test split; the personalised
BLEU-4 and clinical F1 (each client's model on its own held-out rows, pooled); bytes each client
sends per round (mean over rounds of ``comm/bytes_up / clients/aggregated``) in KB (10³ bytes);
wall seconds of the run. Then FedMRG's communication reduction vs FedAvg (LoRA) and vs FedAvg (full
decoder), with PASS/FAIL for the goal "at least 62% less upload than FedAvg (LoRA) with a global
clinical F1 (mean over seeds) no worse than FedAvg (LoRA)'s".

    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/fedmrg_table.py [--rounds 10] [--seeds 0]
        [--only main,ablation] [--set key=value ...] [--out benchmarks/results] [--quick] [--allow-synthetic]

Prints each section's markdown table as soon as the section ends and (re)writes ``fedmrg_table.json``
(every run with its overrides, metrics and folder, the table rows, the reduction, the settings) and
``fedmrg_table.md`` under ``--out`` after every section; run folders go to ``<out>/fedmrg_runs``.
``--quick`` is a smoke test (1 round, 4 clients, 200/60 rows, 4 report samples, one seed). ``--set``
overrides apply to every run after the row's own (so a FedMRG-only key such as
``strategy.comm_rank`` would be refused by the FedAvg rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime

import numpy as np

from tables import agg, fmt, git_commit, mean_std, number, PaperBench, parse_args, run_sections, torch_cuda  # benchmarks/tables.py

CONFIG = "fedmrg"
FLAG = "pneumoniamnist"
SECTIONS = ("main", "ablation")
QUICK = ["clients.num=4", "data.max_train_per_dataset=200", "data.max_test_per_dataset=60", "eval.report_samples=4"]
TARGET_REDUCTION = 62.0  # percent, the goal (the paper's figure via a third-party summary; unverified)
# (key, label, overrides); a YAML mapping replaces the whole strategy section (fedavg refuses comm_rank).
MAIN = [
    ("fedavg_full", "FedAvg (full decoder)", ["strategy={name: fedavg}", "model.decoder.lora_rank=0"]),
    ("fedavg_lora", "FedAvg (LoRA)", ["strategy={name: fedavg}"]),
    ("fedmrg", "FedMRG", []),
]
ABLATIONS = [
    ("fedmrg_no_contrastive", "FedMRG − contrastive", ["strategy.use_contrastive=false"]),
    ("fedmrg_no_prompts", "FedMRG − prompts", ["strategy.use_prompts=false"]),
    ("fedmrg_no_specialised", "FedMRG − specialised adapter", ["strategy.use_specialised=false"]),
]
# metric name in the JSON -> column of rounds.parquet (final evaluated round)
METRICS = {
    "bleu4": f"global/{FLAG}/bleu4",
    "rouge_l": f"global/{FLAG}/rouge_l",
    "cider": f"global/{FLAG}/cider",
    "ce_f1": f"global/{FLAG}/ce_f1",
    "personal_bleu4": f"personal/{FLAG}/bleu4",
    "personal_ce_f1": f"personal/{FLAG}/ce_f1",
}
HEADER = ["method", "BLEU-4", "ROUGE-L", "CIDEr", "clinical F1", "personal BLEU-4", "personal clinical F1", "KB up / client / round", "wall s"]


class Bench(PaperBench):
    config = CONFIG
    runs_folder = "fedmrg_runs"
    quick = tuple(QUICK)

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.reduction: dict | None = None

    def run_one(self, section: str, key: str, label: str, overrides: list[str]) -> dict:
        cfg, run, wall = self.federation(overrides)
        final = self.selected(run)
        metrics = {name: number(final.get(column)) for name, column in METRICS.items()}
        df = run["rounds"]
        per_round = [number(up) / n for up, n in zip(df["comm/bytes_up"], df["clients/aggregated"]) if number(n)]
        metrics["bytes_up_per_client_round"] = float(np.mean(per_round)) if per_round else None
        rejected = int(df["clients/rejected"].sum()) if "clients/rejected" in df else 0
        record = {
            "section": section,
            "row": key,
            "label": label,
            "strategy": cfg.strategy.name,
            "lora_rank": cfg.model.decoder.lora_rank,
            "overrides": [*overrides, *self.tail],
            "seed": cfg.seed,
            "clients": cfg.clients.num,
            "metrics": {k: v for k, v in metrics.items() if v is not None},
            "rejected_updates": rejected,  # rejected updates count in bytes_up but not in clients/aggregated
            "final": {k: number(v) for k, v in final.items() if number(v) is not None and k.startswith(("personal/", "global/", "comm/", "clients/"))},
            "run_dir": str(run["dir"]),
            "wall_s": round(wall, 2),
        }
        f1, kb = metrics["ce_f1"], metrics["bytes_up_per_client_round"]
        print(
            f"[{section}] {label} seed={cfg.seed} ce_f1={'—' if f1 is None else f'{f1:.3f}'} "
            f"up={'—' if kb is None else f'{kb / 1e3:.1f}'} KB/client/round {wall:.1f}s"
            + (f" ({rejected} rejected updates)" if rejected else ""),
            flush=True,
        )
        self.runs.append(record)
        return record

    def series(self, section: str, key: str, label: str, overrides: list[str]) -> list[dict]:
        return [self.run_one(section, key, label, [*overrides, f"seed={seed}"]) for seed in self.seeds]

    def row(self, key: str, label: str, runs: list[dict], override: list[str]) -> dict:
        names = [*METRICS, "bytes_up_per_client_round"]
        return {"row": key, "label": label, "overrides": override, **{m: agg([r["metrics"].get(m) for r in runs]) for m in names},
                "wall_s": agg([r["wall_s"] for r in runs]), "rejected_updates": sum(r["rejected_updates"] for r in runs)}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        clients = ", ".join(f"{s} {n}" for s, n in {r["section"]: r["clients"] for r in self.runs}.items())
        gpu = "GPU" if torch_cuda() else "no GPU"
        changed = self.sources_changed()
        settings = {"config": CONFIG, "rounds": self.rounds, "seeds": self.seeds, "quick": self.args.quick, "set": self.args.overrides,
                    "commit": git_commit(), "clients": clients, "cpu_cores": os.cpu_count(), "gpu": torch_cuda(),
                    "synthetic": self.synthetic, "semi_synthetic_data": True,
                    "raymed_sources_md5": self.sources, "sources_changed_during_run": changed}
        result = {"date": datetime.now().isoformat(timespec="seconds"), "settings": settings,
                  "tables": {k: {"title": t["title"], "rows": t["rows"]} for k, t in self.tables.items()},
                  "reduction": self.reduction, "runs": self.runs}
        (self.out / "fedmrg_table.json").write_text(json.dumps(result, indent=1, default=str))
        head = (f"# FedMRG vs FedAvg on raymed ({result['date']}, commit {settings['commit']})\n\n"
                f"config `{CONFIG}`, rounds {self.rounds}, seeds {','.join(map(str, self.seeds))}, clients: {clients or '—'}, "
                f"machine: {os.cpu_count()} CPU cores, {gpu}{', --quick' if self.args.quick else ''}"
                f"{', SYNTHETIC DATA: not real results' if self.synthetic else ''}"
                f"{', RAYMED SOURCES CHANGED DURING THE BENCHMARK: runs used different code' if changed else ''}; "
                "MedMNIST-Reports is semi-synthetic (PneumoniaMNIST images and IU X-Ray reports paired by diagnosis only): "
                "not comparable with the paper's IU X-Ray / MIMIC-CXR values, compare the ordering only.\n")
        (self.out / "fedmrg_table.md").write_text(head + "".join("\n" + t["markdown"] for t in self.tables.values()))

    def cells(self, r: dict) -> list[str]:
        kb = r["bytes_up_per_client_round"]
        kb = {**kb, "mean": None if kb["mean"] is None else kb["mean"] / 1e3, "std": None if kb["std"] is None else kb["std"] / 1e3}
        return [r["label"], *(mean_std(r[m], 3) for m in METRICS), mean_std(kb, 1), mean_std(r["wall_s"], 0)]

    # ---- sections

    def main(self) -> None:
        rows = [self.row(key, label, self.series("main", key, label, override), override) for key, label, override in MAIN]
        by = {r["row"]: r for r in rows}
        self.reduction = {
            "target_pct": TARGET_REDUCTION,
            "vs_fedavg_lora": compare(by["fedmrg"], by["fedavg_lora"]),
            "vs_fedavg_full": compare(by["fedmrg"], by["fedavg_full"]),
        }
        self.add_table("main", "Report generation, MedMNIST-Reports: global (test split) and personalised (held-out rows) scores",
                       HEADER, rows, self.cells, self.reduction_note(rows))

    def reduction_note(self, rows: list[dict]) -> str:
        lora, full = self.reduction["vs_fedavg_lora"], self.reduction["vs_fedavg_full"]
        lines = [
            f"Communication reduction of FedMRG vs FedAvg (LoRA): {pct(lora['reduction_pct'])} "
            f"(goal ≥ {TARGET_REDUCTION:.0f}%: **{verdict(lora['reduction_pass'])}**); "
            f"global clinical F1 FedMRG {fmt(lora['ce_f1'])} vs FedAvg (LoRA) {fmt(lora['ce_f1_baseline'])} "
            f"(no worse: **{verdict(lora['ce_f1_pass'])}**); both: **{verdict(lora['pass'])}**.",
            f"Communication reduction of FedMRG vs FedAvg (full decoder): {pct(full['reduction_pct'])}; "
            f"global clinical F1 {fmt(full['ce_f1'])} vs {fmt(full['ce_f1_baseline'])}.",
            "Global: the global model's reports on the official test split; personal: each client's model on its own "
            "held-out rows, pooled. KB up / client / round: mean over rounds of comm/bytes_up / clients/aggregated (10³ bytes). "
            "Clinical F1 means over seeds.",
        ]
        if lora["ce_f1"] == 0 and lora["ce_f1_baseline"] == 0:
            lines.append("Both clinical F1 are 0 (no finding reported correctly yet): the \"no worse\" check is vacuous.")
        if rejected := sum(r["rejected_updates"] for r in rows):
            lines.append(f"WARNING: {rejected} client updates were rejected; their bytes count in comm/bytes_up but not in clients/aggregated.")
        return "\n".join(lines) + "\n"

    def ablation(self) -> None:
        full = [r for r in self.runs if r["section"] == "main" and r["row"] == "fedmrg"]
        full = full or self.series("ablation", "fedmrg", "FedMRG", [])
        base = self.row("fedmrg", "FedMRG (full)", full, [])
        rows = [base, *(self.row(key, label, self.series("ablation", key, label, override), override) for key, label, override in ABLATIONS)]
        for r in rows:
            a, b = r["ce_f1"]["mean"], base["ce_f1"]["mean"]
            r["delta_ce_f1"] = None if a is None or b is None else a - b
        self.add_table(
            "ablation", "FedMRG ablation (global and personalised scores, upload size)",
            [*HEADER, "Δ clinical F1 vs full"], rows,
            lambda r: [*self.cells(r), "—" if r["delta_ce_f1"] is None else f"{r['delta_ce_f1']:+.3f}"],
            "Without the contrastive losses FedMRG also stops sending class-prototype sums, so its upload shrinks slightly.",
        )


def compare(method: dict, baseline: dict) -> dict:
    """1 − bytes(method) / bytes(baseline) in percent (means over seeds) and the clinical-F1 check."""
    b_m, b_b = method["bytes_up_per_client_round"]["mean"], baseline["bytes_up_per_client_round"]["mean"]
    reduction = None if b_m is None or not b_b else 100 * (1 - b_m / b_b)
    f1_m, f1_b = method["ce_f1"]["mean"], baseline["ce_f1"]["mean"]
    f1_ok = None if f1_m is None or f1_b is None else bool(f1_m >= f1_b)
    red_ok = None if reduction is None else bool(reduction >= TARGET_REDUCTION)
    return {"baseline": baseline["row"], "bytes_up_per_client_round": b_m, "bytes_up_per_client_round_baseline": b_b,
            "reduction_pct": reduction, "reduction_pass": red_ok, "ce_f1": f1_m, "ce_f1_baseline": f1_b, "ce_f1_pass": f1_ok,
            "pass": None if red_ok is None or f1_ok is None else red_ok and f1_ok}


def verdict(ok: bool | None) -> str:
    return "n/a (missing values)" if ok is None else ("PASS" if ok else "FAIL")


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}%"


def main() -> int:
    args = parse_args(__doc__, SECTIONS, rounds=10, seeds="0", quick="1 round, 4 clients, 200/60 rows, 4 report samples, one seed")
    run_sections(Bench(args), SECTIONS, args.only, "fedmrg_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
