"""Peers: the same FedAvg federation in raymed, Flower's simulation engine and pfl-research, against
the bare-loop limit, measured side by side on this machine.

Workload (identical for every system; see ``peers/workload.py``): real PneumoniaMNIST (training
split; Dirichlet label skew alpha=0.5 per client, ``data.partition=client_dirichlet``: each client's
class mix ~ Dir(0.5), equal shares, as pfl-research partitions, since the per-class split leaves
clients empty at 1,000 clients on 4,708 rows; each client's 80% local training rows exactly as raymed
partitions them), raymed's small CNN from one seed, plain SGD lr 0.05, 1
local epoch, batch 32, FedAvg weighted by examples, the same clients in every round (raymed's seeded
draw, replayed by the others), no evaluation inside the timed rounds.

Systems, each in its own process tree, one after another, on all cores (``--cpus``):

- ``raymed``: ``raymed run`` (a pool of one-CPU client workers, one torch thread each);
- ``raymed-vec``: the same with ``engine.vectorise=true`` (torch.func vmap over clients);
- ``flower``: Flower's Simulation Engine, Ray backend, ``client_resources`` 1 CPU (own venv);
- ``pfl``: pfl-research under ``torchrun``, one worker process per core (own venv);
- ``bare``: one process, no framework, with 1 thread and with all cores; the faster is *the limit*.

Every system runs ``--repeats`` times per setting, interleaved (the machine's speed drifts). Per
system: seconds per round (median over the repeats' rounds 2..R; round 1 is warm-up), client-updates/s, peak RSS
of the whole process tree (sum over every process, sampled every 0.25 s: Ray's daemons and workers
included), wall time of the whole command (start-up included) and the final model's test accuracy and AUC
(equal numbers show equal work). Headline ratios: raymed / limit, Flower / raymed, pfl / raymed.

    bash benchmarks/peers/install.sh            # once: Flower and pfl in benchmarks/.venvs/
    RAYMED_DATA_DIR=../shared/data/medmnist python benchmarks/peers.py

Prints a table per setting and writes ``peers.json`` and ``peers.md``. A system that cannot run a
setting (not installed, failed, timed out) gets a row saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

import raymed  # noqa: F401  (secure Ray defaults before Ray is imported)
from raymed.config import ExperimentConfig, save_config
from raymed.experiment import load_config
from raymed.data.medmnist_files import locate
from raymed.data.shards import ShardSet, materialise
from raymed.engine.server import sample_clients

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "peers"
FLAG = "pneumoniamnist"
SYSTEMS = ("raymed", "raymed-vec", "flower", "pfl", "bare")


@dataclasses.dataclass
class Setting:
    registered: int
    per_round: int

    @property
    def name(self) -> str:
        return f"{self.registered}x{self.per_round}"


def experiment_overrides(setting: Setting, args: argparse.Namespace, output_dir: Path) -> list[str]:
    """The raymed config of a setting as ``--set`` items; the other systems get the workload exported from it."""
    return [
        f"data.datasets=[{FLAG}]",
        f"data.root={args.data_root}",
        "data.partition=client_dirichlet",
        f"data.alpha={args.alpha}",
        f"clients.num={setting.registered}",
        f"clients.fraction={setting.per_round / setting.registered}",
        "clients.local_epochs=1",
        "clients.local_steps=null",  # one pass, as the peers train
        f"clients.batch_size={args.batch_size}",
        f"clients.lr={args.lr}",
        # plain SGD on the rows as they are, as the peers train: the same work everywhere (the embedded
        # default's recipe — momentum, weight decay, cosine lr, augmentation, per-dataset statistics — is off)
        "clients.momentum=0",
        "clients.weight_decay=0",
        "clients.lr_schedule=constant",
        "data.augment=false",
        "data.normalise=fixed",
        "strategy.weighting=examples",  # n_k-weighted, as Flower's FedAvg and pfl weigh
        f"rounds={args.rounds}",
        f"eval.every={args.rounds}",
        "eval.personalised=false",
        "strategy.name=fedavg",
        f"seed={args.seed}",
        f"output_dir={output_dir}",
        "ray.dashboard=false",
        f"ray.num_cpus={args.cpus}",
    ]


def export_workload(cfg: ExperimentConfig, folder: Path) -> dict[str, Any]:
    """Write raymed's partition, test split and round schedule in the form every runner reads."""
    shards = ShardSet(materialise(cfg))
    images, labels, offsets = [], [], [0]
    for client in range(cfg.clients.num):
        split = shards.client(client).train[FLAG]
        images.append(np.array(split.images))
        labels.append(np.array(split.labels))
        offsets.append(offsets[-1] + len(split))
    test = shards.test(FLAG)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / "workload.npz",
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        offsets=np.asarray(offsets, dtype=np.int64),
        test_images=np.array(test.images),
        test_labels=np.array(test.labels),
    )
    spec = {
        "rounds": cfg.rounds,
        "local_epochs": cfg.clients.local_epochs,
        "batch_size": cfg.clients.batch_size,
        "lr": cfg.clients.lr,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "task": dataclasses.asdict(shards.tasks[FLAG]),
        "schedule": [sample_clients(cfg.seed, r, cfg.clients.num, cfg.clients.fraction) for r in range(1, cfg.rounds + 1)],
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return {"train_examples": offsets[-1], "test_examples": len(test)}


# ---- running one system, watching its whole process tree


def run_tree(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; sample the summed RSS of its process tree every 0.25 s; kill what it leaves behind."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = psutil.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=HERE.parent)
        seen: dict[int, psutil.Process] = {}
        peak, timed_out = 0, False
        while proc.poll() is None:
            if time.perf_counter() - start > timeout_s:
                timed_out = True
                break
            try:
                tree = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            rss = 0
            for p in tree:
                seen.setdefault(p.pid, p)
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
            time.sleep(0.25)
    wall = time.perf_counter() - start
    for p in [proc, *seen.values()]:  # Ray daemons a driver failed to stop, torchrun's workers, ...
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": wall, "peak_rss_mb": peak / 2**20}


def last_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no output"


def run_system(system: str, threads: int, setting: Setting, work: Path, args: argparse.Namespace, repeat: int = 0) -> dict[str, Any]:
    """One system on one setting: its numbers, or ``error`` saying why there are none."""
    label = (system if system != "bare" else f"bare-{threads}t") + f"-{repeat + 1}"
    logs = Path(args.out) / "peers-logs" / setting.name  # kept: a failed row points here
    logs.mkdir(parents=True, exist_ok=True)
    log, result_file = logs / f"{label}.log", work / f"{label}.json"
    venvs = Path(args.venvs)
    if system in ("raymed", "raymed-vec"):
        run_dir = work / f"{label}-run"
        cmd = [sys.executable, "-m", "raymed", "run", str(work / "raymed.yaml"), "--quiet", "--set", f"output_dir={run_dir}"]
        if system == "raymed-vec":
            cmd += ["--set", "engine.vectorise=true"]
    elif system == "flower":
        python = venvs / "flower" / "bin" / "python"
        if not python.exists():
            return {"error": f"not installed ({python} missing): run bash benchmarks/peers/install.sh"}
        cmd = [str(python), str(RUNNERS / "run_flower.py"), str(work), str(result_file), "--threads", "1", "--cpus", str(args.cpus)]
    elif system == "pfl":
        torchrun = venvs / "pfl" / "bin" / "torchrun"
        if not torchrun.exists():
            return {"error": f"not installed ({torchrun} missing): run bash benchmarks/peers/install.sh"}
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={args.cpus}", str(RUNNERS / "run_pfl.py"), str(work), str(result_file), "--threads", "1"]
    else:
        cmd = [sys.executable, str(RUNNERS / "run_bare.py"), str(work), str(result_file), "--threads", str(threads)]
    # OpenMP spins a pool as wide as the machine unless told: give every process its own thread count
    # (Ray sets it for its workers, torchrun for its ranks).
    env = {"PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if system == "bare" else {})}
    watched = run_tree(cmd, log, args.timeout, env=env)
    if watched["timed_out"]:
        return {**watched, "error": f"timed out after {args.timeout:.0f} s (log: {log})"}
    if watched["rc"] != 0:
        return {**watched, "error": f"exit {watched['rc']}: {last_line(log)} (log: {log})"}
    if system.startswith("raymed"):
        rounds = pq.read_table(next(run_dir.rglob("rounds.parquet"))).to_pandas()
        final = rounds.iloc[-1]
        result = {"round_seconds": rounds["time/train_s"].tolist(), "test": {m: float(final[f"global/{FLAG}/{m}"]) for m in ("acc", "f1", "auc")}}
    else:
        result = json.loads(result_file.read_text())
    return {**watched, "round_seconds": result["round_seconds"], "test": result["test"], "threads": threads}


def combine(runs: list[dict[str, Any]], per_round: int) -> dict[str, Any]:
    """One row from a system's repeats: the median over every timed round (round 1 of each run is
    warm-up), the largest peak RSS, the median command wall time, the first run's test metrics."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    timed = [s for r in runs for s in r["round_seconds"][1:]]
    median = statistics.median(timed)
    return {
        "s_per_round": median,
        "updates_per_s": per_round / median,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "test": runs[0]["test"],
        "threads": runs[0]["threads"],
        "runs": runs,
    }


# ---- the table


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The limit (faster bare loop) and the headline ratios of one setting."""
    bare = [r["s_per_round"] for label, r in rows.items() if label.startswith("bare") and "error" not in r]
    limit = min(bare) if bare else None

    def seconds(label: str) -> float | None:
        row = rows.get(label, {})
        return None if "error" in row or "s_per_round" not in row else row["s_per_round"]

    raymed_s = seconds("raymed")
    ratios = {}
    if raymed_s and limit:
        ratios["raymed/limit"] = raymed_s / limit
    for peer in ("flower", "pfl"):
        if raymed_s and seconds(peer):
            ratios[f"{peer}/raymed"] = seconds(peer) / raymed_s
    if seconds("raymed-vec") and raymed_s:
        ratios["raymed-vec/raymed"] = seconds("raymed-vec") / raymed_s
    return {"limit_s": limit, "ratios": ratios}


def render(setting: Setting, rows: dict[str, dict[str, Any]], summary: dict[str, Any], console: Console) -> list[str]:
    """Print the setting's table; return it as Markdown lines."""
    title = f"{setting.registered:,} registered clients, {setting.per_round} per round"
    header = ["system", "s / round", "client-updates / s", "× limit", "× raymed", "peak RSS, process tree (MB)", "command wall (s)", "test acc / AUC"]
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    md = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    limit, raymed_s = summary["limit_s"], rows.get("raymed", {}).get("s_per_round")
    for label, r in rows.items():
        if "error" in r:
            cells = [label, r["error"], "", "", "", "", "", ""]
        else:
            s = r["s_per_round"]
            cells = [
                label,
                fmt(s, ".3f"),
                fmt(r["updates_per_s"], ".0f"),
                fmt(s / limit if limit else None, ".2f"),
                fmt(s / raymed_s if raymed_s else None, ".2f"),
                fmt(r["peak_rss_mb"], ",.0f"),
                fmt(r["wall_s"], ".1f"),
                f"{fmt(r['test']['acc'], '.3f')} / {fmt(r['test']['auc'], '.3f')}",
            ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    line = "  ".join(f"{k} = {v:.2f}" for k, v in summary["ratios"].items())
    console.print(line or "no ratios (a system failed)")
    return [*md, "", line, ""]


def machine() -> dict[str, Any]:
    import ray
    import torch

    model = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")), "?")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def peer_versions(venvs: Path) -> dict[str, str]:
    versions = {}
    for venv, package in (("flower", "flwr"), ("pfl", "pfl")):
        python = venvs / venv / "bin" / "python"
        if python.exists():
            code = f"import importlib.metadata as m; print(m.version('{package}'), m.version('ray') if '{package}' == 'flwr' else '')"
            out = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.split()
            versions[package] = out[0] if out else "?"
            if len(out) > 1:
                versions["ray (flower venv)"] = out[1]
    return versions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="100x10,100x100,1000x10,1000x100", help="REGISTEREDxPER_ROUND, comma-separated")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="runs of every system per setting, interleaved")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one system may take on one setting")
    ap.add_argument("--venvs", default=str(HERE / ".venvs"), help="where install.sh put the peers' venvs")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    found = locate(FLAG)
    if found.synthetic:
        print(f"real {FLAG} not found (set RAYMED_DATA_DIR): this comparison needs the real file", file=sys.stderr)
        return 2
    args.data_root = str(found.path.parent)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        print(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    settings = [Setting(*map(int, item.split("x"))) for item in args.settings.split(",")]

    console = Console(width=160)
    scratch = Path(tempfile.mkdtemp(prefix="raymed-peers-"))
    report: dict[str, Any] = {"machine": machine(), "peers": peer_versions(Path(args.venvs)), "workload": {}, "settings": []}
    report["workload"] = {
        "dataset": f"{FLAG} (real)", "partition": f"dirichlet alpha={args.alpha}", "model": "raymed cnn", "lr": args.lr,
        "local_epochs": 1, "batch_size": args.batch_size, "rounds": args.rounds, "timed": f"median of rounds 2..{args.rounds} over {args.repeats} interleaved runs",
        "cpus": args.cpus, "seed": args.seed,
    }
    markdown = [f"Measured {report['machine']['date']}; {report['machine']['cores']} cores ({report['machine']['cpu']}), "
                f"GPU: {report['machine']['gpu'] or 'none'}; peers: {report['peers']}.", ""]
    missed = []
    try:
        for setting in settings:
            work = scratch / setting.name
            cfg = load_config(None, experiment_overrides(setting, args, work / "unused"))
            sizes = export_workload(cfg, work)
            save_config(cfg, work / "raymed.yaml")
            console.print(f"[bold]{setting.name}[/]: {sizes['train_examples']} training rows over {setting.registered} clients")
            runs: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):  # interleaved, so a drift in the machine's speed hits all alike
                for system in systems:
                    for threads in ([1, args.cpus] if system == "bare" and args.cpus > 1 else [1]):
                        label = f"bare, {threads} thread{'s' if threads > 1 else ''}" if system == "bare" else system
                        console.print(f"  {label} (run {repeat + 1}/{args.repeats}) ...", end=" ")
                        run = run_system(system, threads, setting, work, args, repeat)
                        runs.setdefault(label, []).append(run)
                        console.print(run.get("error") or f"{statistics.median(run['round_seconds'][1:]):.3f} s/round")
            rows = {label: combine(r, setting.per_round) for label, r in runs.items()}
            summary = summarise(rows)
            markdown += render(setting, rows, summary, console)
            report["settings"].append({"registered": setting.registered, "per_round": setting.per_round, "rows": rows, **summary})
            ratios = summary["ratios"]
            if setting.per_round >= 100 and ratios.get("raymed/limit", 0) > 1.1:
                missed.append(f"{setting.name}: raymed/limit {ratios['raymed/limit']:.2f} > 1.1")
            if ratios.get("flower/raymed", 3) < 3:
                missed.append(f"{setting.name}: flower/raymed {ratios['flower/raymed']:.2f} < 3")
            if ratios.get("pfl/raymed", 1) < 1:
                missed.append(f"{setting.name}: pfl/raymed {ratios['pfl/raymed']:.2f} < 1")
    finally:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peers.json").write_text(json.dumps(report, indent=1, default=float))
        (out / "peers.md").write_text("\n".join(markdown) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
    console.print(f"wrote {out / 'peers.json'} and {out / 'peers.md'}")
    console.print("targets (raymed ≤ 1.1× limit at ≥100/round, Flower ≥ 3× slower, pfl not faster): " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
