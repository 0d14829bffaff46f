"""GPU check: see the GPU path work on your machine, and how fast it is.

One command for a user with a GPU. On PneumoniaMNIST (the real file when found, else a synthetic
stand-in, said in the output), FedAvg, the small CNN, 1 local epoch, batch 32, 3 rounds per setting:

- **packing**: 1 client worker on a whole GPU (``clients.num_gpus=1``) against 4 workers sharing it
  (``clients.num_gpus=0.25``), at 100 and at 1,000 clients per round: clients trained per second
  (median of rounds 2.., round 1 warms up) and the speed-up of packing;
- **memory**: each setting's largest worker peak on the GPU (CUDA context and allocator cache
  included, as raymed's fit check measures it) against the refusal threshold (95% of the GPU shared
  by the workers on it);
- **decoder**: the report decoder under DeepSpeed ZeRO with 2 ranks on 2 GPUs when there are 2,
  else 1 rank on the one GPU (FedMRG, 1 round): where its ranks ran and their ZeRO stage.

    python benchmarks/gpu_check.py [--rounds 3] [--out benchmarks/results] [--quick]

Without a GPU it says so and exits 0. Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``.
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

import raymed  # noqa: F401  (secure Ray defaults before Ray is imported)

import ray  # noqa: E402, I001
import torch  # noqa: E402

from raymed.experiment import load_config  # noqa: E402
from raymed.data.medmnist_files import find_file, write_synthetic  # noqa: E402
from raymed.engine import run_experiment  # noqa: E402
from raymed.engine.devices import GPU_HEADROOM  # noqa: E402
from raymed.results.runs import read_run  # noqa: E402

FLAG = "pneumoniamnist"


def data_root(work: Path) -> tuple[str, bool]:
    path = find_file(FLAG)
    if path is not None:
        return str(path.parent), False
    write_synthetic(FLAG, work / "synthetic", seed=0)
    return str(work / "synthetic"), True


def federation(root: str, out: Path, registered: int, per_round: int, gpus: float, rounds: int, extra: list[str]) -> dict:
    cfg = load_config(None, [
        f"data.datasets=[{FLAG}]", f"data.root={root}", "data.partition=iid", "data.val_fraction=0", "data.holdout_fraction=0",
        f"clients.num={registered}", f"clients.fraction={per_round / registered}", f"clients.num_gpus={gpus}",
        f"clients.num_cpus={max(0.25, min(1.0, (os.cpu_count() or 1) / max(1, round(1 / gpus)) / 2)):g}",
        "clients.batch_size=32", "clients.local_epochs=1", "strategy.name=fedavg", "model.name=cnn",
        f"rounds={rounds}", f"eval.every={rounds}", "eval.personalised=false", "engine.checkpoint_every=0",
        f"output_dir={out}", "ray.dashboard=false", *extra,
    ])  # fmt: skip
    run = read_run(run_experiment(cfg))
    r = run["rounds"]
    train = list(r["time/train_s"])[1:] or list(r["time/train_s"])
    seconds = statistics.median(train)
    peak_mb = float(r["memory/worker_gpu_peak_mb"].max()) if "memory/worker_gpu_peak_mb" in r else float("nan")
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    sharing = max(1, round(1 / gpus))
    return {
        "registered": registered, "per_round": per_round, "clients.num_gpus": gpus, "workers": len(run["meta"]["workers"]),
        "devices": sorted({w["device"] + " gpu " + ",".join(w.get("gpu_ids") or []) for w in run["meta"]["workers"]}),
        "round_s": seconds, "clients_per_s": per_round / seconds, "worker_gpu_peak_mb": peak_mb,
        "refused_above_mb_per_worker": GPU_HEADROOM * total / sharing, "gpu_total_mb": total,
        "test_acc": float(r["global/mean/acc"].iloc[-1]),
    }


def decoder_check(out: Path, gpus: int) -> dict:
    ranks = 2 if gpus >= 2 else 1
    cfg = load_config(None, [
        "strategy.name=fedmrg", "data.task=report", "data.datasets=[pneumoniamnist]", "data.max_train_per_dataset=400",
        "data.max_test_per_dataset=64", "clients.num=4", "clients.fraction=1.0", "rounds=1", "eval.personalised=false",
        f"server.ranks={ranks}", f"server.num_gpus={ranks}", "server.zero_stage=2", "clients.num_gpus=0.25",
        f"output_dir={out}", "ray.dashboard=false",
    ])  # fmt: skip
    start = time.time()
    run = read_run(run_experiment(cfg))
    return {"ranks": ranks, "decoder": run["meta"].get("decoder"), "status": run["summary"]["status"], "wall_s": round(time.time() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="100 clients per round only, no decoder check")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device on this machine: nothing to check (the CPU path is what the tests cover).")
        return 0
    gpus = torch.cuda.device_count()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    root, synthetic = data_root(work)
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, logging_level="WARNING")
    rows = []
    for per_round in (100,) if args.quick else (100, 1000):
        registered = max(per_round, 1000)
        for share in (1.0, 0.25):
            row = federation(root, work / "runs", registered, per_round, share, args.rounds, [])
            rows.append(row)
            print(json.dumps(row), flush=True)
    decoder = None if args.quick else decoder_check(work / "decoder", gpus)
    result = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "synthetic": synthetic, "torch": torch.__version__, "rows": rows, "decoder": decoder}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    lines = [f"# GPU check: {result['gpu']} × {gpus}, torch {torch.__version__}{' — SYNTHETIC DATA' if synthetic else ''}", "",
             "| clients/round | clients.num_gpus | workers | devices | round s | clients/s | speed-up of packing | worker GPU peak MB | refused above MB/worker |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        alone = next(r for r in rows if r["per_round"] == row["per_round"] and r["clients.num_gpus"] == 1.0)
        lines.append(f"| {row['per_round']} | {row['clients.num_gpus']:g} | {row['workers']} | {'; '.join(row['devices'])} | {row['round_s']:.2f} | "
                     f"{row['clients_per_s']:.1f} | {row['clients_per_s'] / alone['clients_per_s']:.2f}× | {row['worker_gpu_peak_mb']:.0f} | {row['refused_above_mb_per_worker']:.0f} |")
    if decoder:
        lines += ["", f"Decoder: {decoder['ranks']} ZeRO rank(s), {decoder['status']} in {decoder['wall_s']} s: {json.dumps(decoder['decoder'], default=str)[:600]}"]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
