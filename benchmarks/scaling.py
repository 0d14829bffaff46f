"""Scaling: round time and peak memory as the number of registered clients and of clients per round grow.

Workload: OrganAMNIST (34,561 training images; the real file when found, else a synthetic stand-in
in the exact format, said in the output) split IID, FedAvg, the small CNN, 1 local epoch, batch 32,
a pool of client workers as wide as the machine. Two sweeps:

    registered clients 100 → 10,000 at 100 clients per round
    clients per round 10 → 1,000 at 10,000 registered clients (also with engine.vectorise=true)

Per setting: the median training time of rounds 2.. (round 1 warms up) and the federation's peak
memory: the sum of the peak resident sets (VmHWM) of its processes (server, client-state store,
every client worker), read after the last round. The claim checked: peak memory does not grow with
the registered clients, only with the clients per round (10,000 within 10% of 1,000).

    python benchmarks/scaling.py [--rounds 4] [--out benchmarks/results]

Prints two tables and writes ``scaling.json`` and ``scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import raymed  # noqa: F401  (secure Ray defaults before Ray is imported)

import matplotlib  # noqa: I001

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from raymed.config import load_config  # noqa: E402
from raymed.data.medmnist_files import locate, write_synthetic  # noqa: E402
from raymed.engine import Federation  # noqa: E402
from raymed.errors import DataError  # noqa: E402

FLAG = "organamnist"


def peak_rss_mb(pid: int) -> float:
    """Peak resident set of a live process (Linux VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_setting(base: list[str], registered: int, per_round: int, rounds: int, vectorise: bool) -> dict:
    cfg = load_config(
        None,
        [
            *base,
            f"clients.num={registered}",
            f"clients.fraction={per_round / registered}",
            f"rounds={rounds}",
            f"eval.every={rounds}",
            f"engine.vectorise={str(vectorise).lower()}",
        ],
    )
    with Federation(cfg) as federation:
        info = federation.start()
        rows = [federation.step() for _ in range(rounds)]
        pids = [info["pids"]["server"], info["pids"]["client_state"], *(w["pid"] for w in info["workers"])]
        peak = sum(peak_rss_mb(pid) for pid in pids)
    train = [r["time/train_s"] for r in rows[1:]]
    return {
        "registered": registered,
        "per_round": per_round,
        "vectorise": vectorise,
        "workers": len(info["workers"]),
        "train_s_per_round": statistics.median(train),
        "client_updates_per_s": per_round / statistics.median(train),
        "peak_rss_mb": peak,
        "run_dir": str(federation.run_dir),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raymed-scaling-"))
    try:
        root, synthetic = str(locate(FLAG).path.parent), False
    except DataError:
        root, synthetic = str(write_synthetic(FLAG, work / "data", scale=1.0).parent), True
    base = [
        f"data.datasets=[{FLAG}]",
        f"data.root={root}",
        "data.partition=iid",
        "data.max_test_per_dataset=500",
        "clients.local_epochs=1",
        "clients.batch_size=32",
        "clients.num_cpus=1",
        "strategy.name=fedavg",
        "eval.personalised=false",
        f"output_dir={work / 'results'}",
        "ray.dashboard=false",
    ]
    ray.init(num_cpus=os.cpu_count(), num_gpus=0, include_dashboard=False, logging_level="WARNING")
    registered_sweep = [run_setting(base, n, 100, args.rounds, False) for n in (100, 1000, 3000, 10000)]
    per_round_sweep = [run_setting(base, 10000, k, args.rounds, v) for v in (False, True) for k in (10, 100, 1000)]
    ray.shutdown()

    by_n = {r["registered"]: r for r in registered_sweep}
    memory_ratio = by_n[10000]["peak_rss_mb"] / by_n[1000]["peak_rss_mb"]
    console = Console(width=130)
    note = " — SYNTHETIC DATA" if synthetic else " (real OrganAMNIST)"
    for title, rows in (("registered clients, 100 per round", registered_sweep), ("clients per round, 10,000 registered", per_round_sweep)):
        table = Table(title=f"scaling: {title}{note}")
        for col in ("registered", "per round", "vectorised", "workers", "s / round (train)", "client-updates / s", "peak RSS MB (all processes)"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                f"{r['registered']:,}", f"{r['per_round']:,}", "yes" if r["vectorise"] else "no", str(r["workers"]),
                f"{r['train_s_per_round']:.3f}", f"{r['client_updates_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
            )
        console.print(table)
    console.print(f"peak memory 10,000 vs 1,000 registered clients: x{memory_ratio:.3f} (target <= 1.10)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "workload": {"dataset": FLAG, "synthetic": synthetic, "cpus": os.cpu_count(), "rounds": args.rounds, "model": "cnn"},
        "registered_sweep": registered_sweep,
        "per_round_sweep": per_round_sweep,
        "memory_ratio_10000_vs_1000": memory_ratio,
    }
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot([r["registered"] for r in registered_sweep], [r["peak_rss_mb"] for r in registered_sweep], "o-", label="peak RSS (MB)")
    ax.set_xscale("log"), ax.set_xlabel("registered clients (100 per round)"), ax.set_ylabel("MB"), ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot([r["registered"] for r in registered_sweep], [r["train_s_per_round"] for r in registered_sweep], "s--", color="C1", label="s / round")
    twin.set_ylabel("seconds per round")
    ax.set_title("registered clients")
    ax = axes[1]
    for vectorise, style in ((False, "o-"), (True, "^:")):
        rows = [r for r in per_round_sweep if r["vectorise"] == vectorise]
        ax.plot([r["per_round"] for r in rows], [r["train_s_per_round"] for r in rows], style, label=f"s / round{' (vectorised)' if vectorise else ''}")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("clients per round (10,000 registered)"), ax.set_ylabel("seconds per round")
    twin = ax.twinx()
    rows = [r for r in per_round_sweep if not r["vectorise"]]
    twin.plot([r["per_round"] for r in rows], [r["peak_rss_mb"] for r in rows], "s--", color="C2", label="peak RSS (MB)")
    twin.set_ylabel("MB"), twin.set_ylim(bottom=0)
    ax.legend(loc="upper left"), ax.set_title("clients per round")
    fig.suptitle("raymed scaling" + note)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0 if memory_ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
