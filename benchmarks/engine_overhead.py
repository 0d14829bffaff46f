"""Engine overhead: raymed's FedAvg round time against a plain single-process PyTorch loop.

Workload: PneumoniaMNIST (real file when found, else synthetic, said in the output), IID over 100
clients, every client in every round, 1 local epoch, batch 32, the small CNN. The bare loop does the
same training steps in one process, with no Ray: for each client, load the global weights, run SGD
over its rows in mini-batches, add n_k·w_k to a float64 sum; then average. It runs with one thread
and with all cores, and the faster of the two is "the limit". Rounds after the first (warm-up) are
timed; raymed's time is the round's training phase (sampling, broadcast, local training, partial
and final aggregation), measured in the server actor.

    python benchmarks/engine_overhead.py [--clients 100] [--rounds 4] [--out benchmarks/results]

Prints a table and writes ``engine_overhead.json``. Target for this stage: ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

import raymed  # noqa: F401  (secure Ray defaults before Ray is imported)
from raymed.config import load_config
from raymed.data.medmnist_files import locate, write_synthetic
from raymed.data.shards import ShardSet, materialise
from raymed.errors import DataError
from raymed.models import build_model


def bare_loop(shards: ShardSet, cfg, rounds: int, threads: int) -> list[float]:
    """The same FedAvg training steps in one process; returns seconds per round."""
    torch.set_num_threads(threads)
    task = shards.tasks["pneumoniamnist"]
    model = build_model(cfg.model.name, shards.tasks, cfg.seed)
    global_w = {k: v.clone() for k, v in model.state_dict().items()}
    clients = []
    for cid in range(cfg.clients.num):
        split = shards.client(cid).train["pneumoniamnist"]
        x = torch.from_numpy(np.array(split.images)).float().div_(127.5).sub_(1.0)
        clients.append((x, torch.from_numpy(np.array(split.labels)).long()))
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_w.items()}
        total = 0
        for cid, (x, y) in enumerate(clients):
            model.load_state_dict(global_w)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.clients.lr)
            order = torch.from_numpy(np.random.default_rng([cfg.seed, r, cid]).permutation(len(x)))
            for i in range(0, len(x), cfg.clients.batch_size):
                idx = order[i : i + cfg.clients.batch_size]
                loss = task.loss(model(x[idx], "pneumoniamnist"), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for k, v in model.state_dict().items():
                sums[k] += len(x) * v.double()
            total += len(x)
        global_w = {k: (s / total).float() for k, s in sums.items()}
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raymed-bench-"))
    try:
        found = locate("pneumoniamnist")
        root, synthetic = str(found.path.parent), found.synthetic
    except DataError:
        root, synthetic = str(write_synthetic("pneumoniamnist", work / "data", scale=1.0).parent), True
    cfg = load_config(
        None,
        [
            "data.datasets=[pneumoniamnist]",
            f"data.root={root}",
            "data.partition=iid",
            f"clients.num={args.clients}",
            "clients.fraction=1.0",
            "clients.local_epochs=1",
            "clients.batch_size=32",
            f"rounds={args.rounds}",
            f"eval.every={args.rounds}",
            "eval.personalised=false",
            f"output_dir={work / 'results'}",
            "ray.dashboard=false",
            "strategy.name=fedavg",
        ],
    )
    cpus = os.cpu_count() or 1
    shards = ShardSet(materialise(cfg))

    from raymed.engine import run_experiment

    run_dir = run_experiment(cfg)
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    timed = rounds.iloc[1:]  # round 1 is warm-up
    raymed_s = statistics.median(timed["time/train_s"])
    without_eval = timed[timed["time/eval_s"].isna()] if "time/eval_s" in timed else timed
    raymed_round_s = statistics.median(without_eval["time/round_s"]) if len(without_eval) else float("nan")
    import ray

    ray.shutdown()  # the bare loop gets the machine to itself

    bare = {threads: statistics.median(bare_loop(shards, cfg, args.rounds, threads)[1:]) for threads in sorted({1, cpus})}
    limit_threads = min(bare, key=bare.get)
    limit = bare[limit_threads]
    result = {
        "workload": {
            "dataset": "pneumoniamnist",
            "synthetic": synthetic,
            "clients": args.clients,
            "clients_per_round": args.clients,
            "train_examples_per_round": int(sum(s[0] for s in shards.client_sizes().values())),
            "local_epochs": 1,
            "batch_size": 32,
            "model": cfg.model.name,
            "timed_rounds": args.rounds - 1,
            "cpus": cpus,
        },
        "raymed_train_s": raymed_s,
        "raymed_round_s_without_eval": raymed_round_s,
        "bare_loop_s": {str(k): v for k, v in bare.items()},
        "limit_s": limit,
        "ratio": raymed_s / limit,
        "target_ratio": 1.5,
    }
    table = Table(title="engine overhead: one FedAvg round" + (" — SYNTHETIC DATA" if synthetic else " (real PneumoniaMNIST)"))
    for col in ("runner", "seconds / round", "x bare-loop limit"):
        table.add_column(col, justify="right" if col != "runner" else "left")
    for threads, secs in bare.items():
        table.add_row(f"bare loop, 1 process, {threads} thread(s)", f"{secs:.3f}", f"{secs / limit:.2f}")
    table.add_row(f"raymed ({cfg.clients.num} clients, pool of workers)", f"{raymed_s:.3f}", f"{raymed_s / limit:.2f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_overhead.json").write_text(json.dumps(result, indent=1))
    print(f"ratio raymed / limit = {result['ratio']:.2f} (target <= 1.5); wrote {out / 'engine_overhead.json'}")
    return 0 if result["ratio"] <= result["target_ratio"] else 1


if __name__ == "__main__":
    sys.exit(main())
