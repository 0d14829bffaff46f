"""Pretrained models as self-describing files: a run's final global model, or one pretrained here.

Every raymed run writes ``model.safetensors`` into its folder when it ends: the server's weights, with
the backbone's name, the tasks (one head each) and the strategy in the file's metadata, so
:func:`load_model` rebuilds the network from the file alone. Methods that start from a pretrained
network (LoRKD's teacher, MAFM3's foundation model) take such a run folder or file; without one they
pretrain it here with :func:`pretrain`, centrally on the clients' pooled training rows of the given
datasets (never their held-out rows or the test splits), cached beside the shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from safetensors import SafetensorError, safe_open

from raymed.config import ExperimentConfig, StrategyConfig
from raymed.data.shards import ShardSet
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError
from raymed.files import atomic_path
from raymed.models import FedModel, build_model

MODEL_FILE = "model.safetensors"
SELECTED_MODEL_FILE = "model-selected.safetensors"  # the round selected on validation
PLAIN_STRATEGIES = ("fedavg", "fedprox", "pretrain")  # whose weights are a plain backbone + heads


def save_model(path: Path, weights: dict[str, np.ndarray], model_name: str, tasks: dict[str, TaskSpec], strategy: str, round_: int) -> Path:
    """Write ``weights`` and what rebuilds their network to ``path`` (atomically)."""
    meta = {"model": model_name, "tasks": json.dumps({f: asdict(t) for f, t in tasks.items()}), "strategy": strategy, "round": str(round_)}
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp), metadata=meta)
    return path


def model_file(source: str | Path, what: str) -> Path:
    """The model file of a run folder, or ``source`` itself when it is a file; ConfigError otherwise."""
    path = Path(source)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"{what}: {source} holds no {MODEL_FILE}; give the folder of a finished raymed run (fedavg or fedprox) or its {MODEL_FILE}"
        )
    return path


def load_model(source: str | Path, what: str, needs: list[str] = ()) -> FedModel:
    """Rebuild the network saved at ``source`` (a run folder or a model file) with its weights; refuse,
    naming ``what`` it is for, a file that is no plain backbone + heads or lacks a head of ``needs``."""
    path = model_file(source, what)
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
        tasks = {flag: TaskSpec(**t) for flag, t in json.loads(meta["tasks"]).items()}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ConfigError(f"{what}: {path} is not a raymed model file ({type(exc).__name__}: {exc}); rerun the run that wrote it") from None
    if meta.get("strategy") not in PLAIN_STRATEGIES:
        raise ConfigError(f"{what}: {path} was trained by strategy {meta.get('strategy')}, whose model is not a plain backbone + heads; use a fedavg or fedprox run")
    missing = [flag for flag in needs if flag not in tasks]
    if missing:
        raise ConfigError(f"{what}: {path} has no head for {', '.join(missing)} (it knows {', '.join(tasks)}); train it on those datasets too")
    model = build_model(meta["model"], tasks, seed=0)
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"{what}: {path} does not match a {meta['model']} model (missing {result.missing_keys[:2]}, unexpected {result.unexpected_keys[:2]})")
    return model


def resolve_pretrained(cfg: ExperimentConfig, shard_dir: str, key: str, datasets: list[str], model_name: str, epochs: int) -> ExperimentConfig:
    """``cfg`` with ``strategy.<key>`` naming a model file: the given run's (or file), or else one
    :func:`pretrain` builds; every actor then loads that same file."""
    given = cfg.strategy.params.get(key)
    path = model_file(given, f"strategy.{key}") if given else pretrain(shard_dir, datasets, model_name, epochs, cfg.seed)
    return cfg.model_copy(update={"strategy": StrategyConfig(name=cfg.strategy.name, **{**cfg.strategy.params, key: str(path.resolve())})})


def pretrain(shard_dir: str, datasets: list[str], model_name: str, epochs: int, seed: int, lr: float = 1e-3, batch_size: int = 64) -> Path:
    """A ``model_name`` trained centrally (AdamW, ``epochs`` epochs) on the clients' pooled training rows
    of ``datasets``; built once per (shard set, datasets, model, epochs, seed, lr), cached beside the shards."""
    identity = [1, Path(shard_dir).name, sorted(datasets), model_name, epochs, seed, lr, batch_size]
    out = Path(shard_dir).parent / f"pretrained-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}.safetensors"
    if out.is_file():
        return out
    shards = ShardSet(shard_dir)
    unknown = [f for f in datasets if f not in shards.tasks]
    if unknown:
        raise ConfigError(f"cannot pretrain on {', '.join(unknown)}: not among data.datasets ({', '.join(shards.tasks)}); add them or give a pretrained run")
    tasks = {f: shards.tasks[f] for f in datasets}
    model = build_model(model_name, tasks, seed)
    rows: dict[str, list] = {f: [] for f in datasets}
    for client in map(shards.client, range(shards.num_clients)):
        for flag in datasets:
            if flag in client.train:
                rows[flag].append(client.train[flag])  # its training block: never its held-out rows
    images = {f: np.concatenate([s.images for s in parts]) for f, parts in rows.items()}
    labels = {f: np.concatenate([s.labels for s in parts]) for f, parts in rows.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng([seed, 0x9E7])
    model.train()
    for _ in range(epochs):
        plan = [(f, order[i : i + batch_size]) for f in datasets for order in [rng.permutation(len(labels[f]))] for i in range(0, len(order), batch_size)]
        for k in rng.permutation(len(plan)):
            flag, batch = plan[k]
            x, y = tasks[flag].inputs(images[flag][np.sort(batch)], labels[flag][np.sort(batch)], model.in_channels, torch.device("cpu"))
            loss = tasks[flag].loss(model(x, flag), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return save_model(out, state, model_name, tasks, "pretrain", epochs)
