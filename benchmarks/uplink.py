"""What each method sends off a client, and its size: one real client update per method.

For every registered method, on its shipped config (``raymed/configs/<name>.yaml``, else the
default), this trains client 0 for one round on real MedMNIST (or the report data) and lists what
its :class:`~raymed.methods.ClientUpdate` carries up to the server: the averaged update (``delta``,
grouped by module) and anything else sent (``uploads``, e.g. OmniFM's spectral summaries). The
privacy-relevant question "what leaves a hospital" is answered from the update object itself, not
from the docs. Prints a markdown table; writes ``benchmarks/results/uplink.json``.

    python benchmarks/uplink.py [--only fedavg,omnifm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import raymed  # noqa: F401  (before Ray or torch)
from tables import git_commit, md_table, sources_md5

SHIPPED = {"fedkim": "fedkim", "fedmrg": "fedmrg", "lorkd": "lorkd", "mafm3": "mafm3"}
EXTRA = {"fedbn": ["model.name=cnn_bn"]}  # FedBN needs normalisation layers to keep local


def _group(key: str) -> str:
    """The module a parameter belongs to, two levels deep (``backbone.features``, ``heads.pneumoniamnist``)."""
    return ".".join(key.split(".")[:2])


def uplink(name: str) -> dict:
    import torch

    from raymed.experiment import load_config
    from raymed.data.shards import ShardSet, materialise
    from raymed.engine.worker import float_state
    from raymed.methods import build_method, client_context

    torch.set_num_threads(2)
    cfg = load_config(SHIPPED.get(name), ([f"strategy.name={name}"] if name not in SHIPPED else []) + EXTRA.get(name, []))
    shard_dir = materialise(cfg)
    cfg = build_method(cfg.strategy.name, cfg.strategy.params).prepare(cfg, str(shard_dir))
    method = build_method(cfg.strategy.name, cfg.strategy.params)
    shards = ShardSet(shard_dir)
    model = method.build_model(cfg.model, shards.tasks, cfg.seed)
    initial = float_state(model)
    state = method.init_state(initial)
    payload = method.broadcast(state)
    ctx = client_context(cfg, 0, 1, model, shards, torch.device("cpu"), initial)
    start = time.perf_counter()
    update = method.client_update(ctx, payload)
    groups: dict[str, int] = {}
    for key, value in update.delta.items():
        groups[f"delta {_group(key)}"] = groups.get(f"delta {_group(key)}", 0) + value.nbytes
    for key, value in update.uploads.items():
        groups[f"upload {key}"] = value.nbytes
    kept = sum(v.nbytes for v in (update.state or {}).values())
    return {
        "method": name,
        "datasets": list(ctx.shard.datasets),
        "model_bytes": int(sum(v.nbytes for v in initial.values())),
        "down_bytes": int(sum(np.asarray(v).nbytes for v in payload.values())),
        "up_bytes": int(update.nbytes),
        "kept_on_client_bytes": int(kept),
        "sent": groups,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    from raymed.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated methods (default: all registered)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "uplink.json"))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else sorted(METHODS)
    rows, results = [], []
    for name in names:
        r = uplink(name)
        results.append(r)
        sent = "; ".join(f"{k} {v / 1024:,.1f} kB" for k, v in sorted(r["sent"].items(), key=lambda kv: -kv[1]))
        rows.append([name, f"{r['up_bytes'] / 1024:,.1f}", f"{r['up_bytes'] / max(r['model_bytes'], 1):.3f}", f"{r['kept_on_client_bytes'] / 1024:,.1f}", sent])
        print(f"{name}: {r['up_bytes'] / 1024:,.1f} kB up", flush=True)
    print(md_table(["method", "kB up per client per round", "× model", "kB kept on the client", "what is sent"], rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"commit": git_commit(), "sources_md5": sources_md5(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
