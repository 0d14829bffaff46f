"""Scaling: whole rounds and each component's peak memory as the registered clients and the clients per round grow.

Workload: ``synthetic_clients`` (every registered client its own generated rows, no file: engine-scale
experiments only, never accuracy), one client per site, FedPer (each client keeps its head between
rounds, so checkpoints carry client state), the small CNN, 1 local epoch. Every round is a *whole*
round: training, aggregation, evaluation (global on the test split, personalised on a seeded sample of
``eval.personal_clients`` clients, default 1,000) and the incremental checkpoint (written while the next
round trains; the last one is waited for). Two sweeps:

    registered clients 1,000 → 100,000 at 1,000 clients per round (the first setting: all of them)
    clients per round 10 → 1,000 at 100,000 registered

Personalised evaluation covers the sampled clients FedPer has trained at least once (the others
have only the seeded initial head and are left out, counted): how many is in the table.

Per setting, in a fresh driver process with its own local Ray (so each process's peak is its own):
the median of rounds 2.. (round 1 warms up) of the whole round as the driver sees it, of its training
and evaluation parts, and of the checkpoint (seconds from its start to its head on disk, bytes of its
client segment and head, states written); and the peak resident set (VmHWM) of each component: the
driver (which also partitions the data once), the server, the client-state store, the client workers
(sum and largest), and each one's peak private (anonymous) memory, sampled every 20 ms (see
:class:`PrivatePeaks` for why both). Claims checked: the federation's peak private memory (server +
store + workers) at 100,000 registered is within 10% of 10,000; a checkpoint's client bytes follow the clients it changed, not the
clients registered.

    python benchmarks/scaling.py [--rounds 4] [--rows 4] [--out benchmarks/results] [--quick]

Prints two tables and writes ``scaling.json`` and ``scaling.png``. ``--quick``: 1,000 and 10,000
registered, 10 and 100 per round, 3 rounds (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status_mb(pid: int, key: str) -> float:
    """A memory line of a live process's /proc status (VmHWM: peak resident set; RssAnon: its
    private memory now), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    return status_mb(pid, "VmHWM")


class PrivatePeaks:
    """Peak private (anonymous) memory of processes, sampled every 20 ms. The resident set's peak
    (VmHWM) also counts the pages of the memory-mapped shard files a worker has touched: page cache
    shared with every process of the node and dropped by the kernel at will, which grows with the
    file (0.7 MB of it mapped per client read, at 100,000 clients, by the kernel's large pages)."""

    def __init__(self, pids: dict[str, int]):
        import threading

        self.pids, self.peak = pids, dict.fromkeys(pids, 0.0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            try:
                self.peak[name] = max(self.peak[name], status_mb(pid, "RssAnon"))
            except OSError:
                pass

    def result(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        self.sample()
        return self.peak


def one_setting(registered: int, per_round: int, rounds: int, rows: int, work: Path) -> dict:
    """Run one federation in this process (a fresh driver) and measure it."""
    import raymed  # noqa: F401  (secure Ray defaults before Ray is imported)
    from raymed.experiment import load_config
    from raymed.engine import Federation

    cfg = load_config(None, [
        "data.datasets=[synthetic_clients]", f"data.synthetic_clients={registered}", f"data.synthetic_rows={rows}",
        "data.partition=by_site", "data.max_train_per_dataset=null", f"data.cache_dir={work / 'shards'}",
        f"clients.num={registered}", f"clients.fraction={per_round / registered}", "clients.local_epochs=1", "clients.local_steps=null",
        "clients.batch_size=32", "clients.num_cpus=1", "strategy.name=fedper", "model.name=cnn", f"rounds={rounds}", "eval.every=1",
        "engine.checkpoint_every=1", f"output_dir={work / 'results'}", "ray.dashboard=false", f"ray.num_cpus={os.cpu_count()}", "ray.num_gpus=0",
    ])
    started = time.perf_counter()
    with Federation(cfg) as federation:
        info = federation.start()
        setup_s = time.perf_counter() - started
        processes = {"driver": os.getpid(), "server": info["pids"]["server"], "store": info["pids"]["client_state"],
                     **{f"worker{i}": w["pid"] for i, w in enumerate(info["workers"])}}
        private = PrivatePeaks(processes)
        whole, metrics = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            metrics.append(federation.step())
            whole.append(time.perf_counter() - t)
        federation.wait_for_checkpoint()
        pids = {"server": info["pids"]["server"], "store": info["pids"]["client_state"]}
        workers = [peak_rss_mb(w["pid"]) for w in info["workers"]]
        peaks = {name: peak_rss_mb(pid) for name, pid in pids.items()}
        checkpoints = list(federation.checkpoints)
        anon = private.result()
    peaks["driver"] = peak_rss_mb(os.getpid())
    workers_anon = [v for k, v in anon.items() if k.startswith("worker")]
    later = slice(1, None)  # round 1 warms up
    med = lambda xs: statistics.median(xs[later])  # noqa: E731
    return {
        "registered": registered,
        "per_round": per_round,
        "rows_per_client": rows,
        "workers": len(workers),
        "setup_s": setup_s,
        "round_s": med(whole),
        "train_s": med([m["time/train_s"] for m in metrics]),
        "eval_s": med([m.get("time/eval_s", float("nan")) for m in metrics]),
        # FedPer leaves out sampled clients it never trained (their head is the seeded initial one)
        "personal_clients_sampled": metrics[-1].get("eval/personal_clients_sampled", min(registered, 1000)),
        "personal_clients_evaluated": metrics[-1].get("eval/personal_clients_sampled", min(registered, 1000)) - metrics[-1].get("eval/unseen_clients", 0),
        "checkpoint_s": med([c["seconds"] for c in checkpoints]),
        "checkpoint_segment_bytes": med([c["segment_bytes"] for c in checkpoints]),
        "checkpoint_head_bytes": med([c["head_bytes"] for c in checkpoints]),
        "checkpoint_clients_written": med([c["clients_written"] for c in checkpoints]),
        "peak_mb": {**peaks, "workers_sum": sum(workers), "worker_max": max(workers)},
        "federation_peak_mb": peaks["server"] + peaks["store"] + sum(workers),
        "private_peak_mb": {"driver": anon["driver"], "server": anon["server"], "store": anon["store"], "workers_sum": sum(workers_anon)},
        "federation_private_peak_mb": anon["server"] + anon["store"] + sum(workers_anon),
        "run_dir": str(federation.run_dir),
    }


def in_fresh_driver(registered: int, per_round: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"setting-{registered}-{per_round}.json"
    command = [sys.executable, __file__, "--one", f"{registered},{per_round}", "--rounds", str(args.rounds), "--rows", str(args.rows),
               "--work", str(work), "--result", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"setting {registered:,} registered x {per_round:,} per round failed:\n{proc.stderr[-3000:]}")
    row = json.loads(out.read_text())
    print(f"{registered:>7,} registered x {per_round:>5,} per round: round {row['round_s']:.2f} s "
          f"(train {row['train_s']:.2f}, eval {row['eval_s']:.2f} of {row['personal_clients_evaluated']:,.0f} clients), setup {row['setup_s']:.0f} s, checkpoint {row['checkpoint_s']:.2f} s "
          f"{row['checkpoint_segment_bytes'] / 1e6:.2f} MB, federation peak {row['federation_peak_mb']:.0f} MB, driver {row['peak_mb']['driver']:.0f} MB",
          flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4, help="training rows per client (validation and held-out rows are split from them)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        registered, per_round = (int(v) for v in args.one.split(","))
        Path(args.result).write_text(json.dumps(one_setting(registered, per_round, args.rounds, args.rows, Path(args.work))))
        return 0

    big, top = (10_000, 100) if args.quick else (100_000, 1_000)
    if args.quick:
        args.rounds = min(args.rounds, 3)
    registered_sweep_n = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    work = Path(tempfile.mkdtemp(prefix="raymed-scaling-"))
    started = time.perf_counter()
    registered_sweep = [in_fresh_driver(n, min(top, n), args, work) for n in registered_sweep_n]
    per_round_sweep = [r for r in registered_sweep if r["registered"] == big and r["per_round"] == top]
    per_round_sweep = [in_fresh_driver(big, k, args, work) for k in (10, 100, 1_000) if k < top] + per_round_sweep
    total_s = time.perf_counter() - started

    by_n = {r["registered"]: r for r in registered_sweep}
    memory_ratio = by_n[big]["federation_private_peak_mb"] / by_n[big // 10]["federation_private_peak_mb"]
    resident_ratio = by_n[big]["federation_peak_mb"] / by_n[big // 10]["federation_peak_mb"]
    per_client = [r["checkpoint_segment_bytes"] / r["checkpoint_clients_written"] for r in per_round_sweep]
    print_tables(registered_sweep, per_round_sweep, big, memory_ratio, resident_ratio, per_client)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "workload": {"dataset": "synthetic_clients", "synthetic": True, "strategy": "fedper", "model": "cnn", "cpus": os.cpu_count(),
                     "rounds": args.rounds, "rows_per_client": args.rows, "quick": args.quick, "total_s": total_s},
        "registered_sweep": registered_sweep,
        "per_round_sweep": per_round_sweep,
        f"federation_private_memory_ratio_{big}_vs_{big // 10}": memory_ratio,
        f"federation_resident_peak_ratio_{big}_vs_{big // 10}": resident_ratio,
        "checkpoint_bytes_per_client_written": per_client,
    }
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    plot(registered_sweep, per_round_sweep, big, out / "scaling.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'} ({total_s / 60:.1f} min)")
    return 0 if memory_ratio <= 1.10 else 1


def print_tables(registered_sweep: list[dict], per_round_sweep: list[dict], big: int, memory_ratio: float, resident_ratio: float,
                 per_client: list[float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    columns = ("registered", "per round", "whole round s", "train s", "eval s", "evaluated / sampled", "checkpoint s", "ckpt client MB", "ckpt head MB",
               "states written", "driver MB", "server MB", "store MB", "workers MB (sum)", "federation MB", "federation private MB")
    for title, rows in (("registered clients", registered_sweep), (f"clients per round, {big:,} registered", per_round_sweep)):
        table = Table(title=f"scaling: {title} — SYNTHETIC clients (engine scale only), whole rounds")
        for col in columns:
            table.add_column(col, justify="right")
        for r in rows:
            p = r["peak_mb"]
            table.add_row(f"{r['registered']:,}", f"{r['per_round']:,}", f"{r['round_s']:.2f}", f"{r['train_s']:.2f}", f"{r['eval_s']:.2f}",
                          f"{r['personal_clients_evaluated']:,.0f} / {r['personal_clients_sampled']:,.0f}",
                          f"{r['checkpoint_s']:.2f}", f"{r['checkpoint_segment_bytes'] / 1e6:.2f}", f"{r['checkpoint_head_bytes'] / 1e6:.2f}",
                          f"{r['checkpoint_clients_written']:,.0f}", f"{p['driver']:.0f}", f"{p['server']:.0f}", f"{p['store']:.0f}",
                          f"{p['workers_sum']:.0f}", f"{r['federation_peak_mb']:.0f}", f"{r['federation_private_peak_mb']:.0f}")
        console.print(table)
    console.print(f"federation peak private memory, {big:,} vs {big // 10:,} registered: x{memory_ratio:.3f} (target <= 1.10); "
                  f"peak resident sets (with mapped shard pages): x{resident_ratio:.3f}")
    console.print("checkpoint client bytes per state written: " + ", ".join(f"{b:,.0f}" for b in per_client) + " (constant: bytes follow the clients changed)")


def plot(registered_sweep: list[dict], per_round_sweep: list[dict], big: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, rows, key, label in ((axes[0], registered_sweep, "registered", "registered clients"),
                                 (axes[1], per_round_sweep, "per_round", f"clients per round ({big:,} registered)")):
        x = [r[key] for r in rows]
        for part, style in (("round_s", "o-"), ("train_s", "s--"), ("eval_s", "^:"), ("checkpoint_s", "d-.")):
            ax.plot(x, [r[part] for r in rows], style, label=part.replace("_s", " s").replace("round", "whole round"))
        ax.set_xscale("log"), ax.set_xlabel(label), ax.set_ylabel("seconds (median of rounds 2..)"), ax.legend(fontsize=8)
        ax.set_title(f"time per round vs {label.split(' (')[0]}")
    ax = axes[2]
    x = [r["registered"] for r in registered_sweep]
    for part, style in (("driver", "o-"), ("server", "s--"), ("store", "^:"), ("workers_sum", "d-.")):
        ax.plot(x, [r["peak_mb"][part] for r in registered_sweep], style, label=part.replace("_sum", " (sum)") + ", resident")
    ax.plot(x, [r["federation_private_peak_mb"] for r in registered_sweep], "k*-", label="server + store + workers, private")
    ax.set_xscale("log"), ax.set_xlabel("registered clients"), ax.set_ylabel("peak RSS (MB)"), ax.set_ylim(bottom=0), ax.legend(fontsize=8)
    ax.set_title("peak memory per component")
    fig.suptitle(f"raymed scaling — SYNTHETIC clients (engine scale only), FedPer, small CNN, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
