"""Shared fixtures: one Ray per test session, real MedMNIST files when present (synthetic otherwise)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import raymed  # noqa: F401  (sets RAY_AUTH_MODE before Ray is imported)
from raymed.config import ExperimentConfig, apply_overrides
from raymed.experiment import validate_config
from raymed.data.medmnist_files import write_synthetic

FLAGS = ("pneumoniamnist", "breastmnist", "retinamnist")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


def _real_dir() -> Path | None:
    for candidate in (os.environ.get("RAYMED_DATA_DIR"), SHARED):
        if candidate and all((Path(candidate) / f"{f}.npz").is_file() for f in FLAGS):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The real MedMNIST files (RAYMED_DATA_DIR or ../shared/data/medmnist), else synthetic stand-ins."""
    real = _real_dir()
    if real is not None:
        return real
    out = tmp_path_factory.mktemp("synthetic-medmnist")
    for flag in FLAGS:
        write_synthetic(flag, out, scale=0.2)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Through the environment: pytest may import this file twice (as conftest and tests.conftest).
METRICS_PORT = int(os.environ.setdefault("RAYMED_TEST_METRICS_PORT", str(free_port())))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 logical CPUs, as on CI), exporting metrics every second."""
    import ray

    ray.init(
        address="local",  # never another Ray running on this machine
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        logging_level="WARNING",
        _metrics_export_port=METRICS_PORT,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray
    ray.shutdown()


def small_config(data_dir: Path, tmp_path: Path, *overrides: str) -> ExperimentConfig:
    """A federation small enough for a test: two modalities, 6 clients, subsampled data."""
    raw = {
        "seed": 3,
        "rounds": 2,
        "output_dir": str(tmp_path / "results"),
        "data": {
            "datasets": ["pneumoniamnist", "breastmnist"],
            "root": str(data_dir),
            "partition": "modality",
            "max_train_per_dataset": 300,
            "max_test_per_dataset": 120,
            "cache_dir": str(tmp_path / "shards"),
            "normalise": "fixed",
        },
        # The plain recipe the engine tests were written against (one local epoch, plain SGD, constant
        # lr), not the schema's default recipe: a test's assertions are about the engine, and it stays fast.
        "clients": {"num": 6, "fraction": 0.5, "batch_size": 16, "lr": 0.05, "local_steps": None, "momentum": 0.0,
                    "weight_decay": 0.0, "lr_schedule": "constant"},
        "eval": {"every": 1},
        "ray": {"dashboard": False},
        "model": {"name": "cnn"},  # the backbone the engine tests were written against (the schema's default is cnn_bn)
    }
    return validate_config(apply_overrides(raw, list(overrides)))


def prepared_method(cfg: ExperimentConfig):
    """A method as every actor builds it, outside Ray: shards materialised, ``prepare`` run (teacher,
    foundation, ...), the model built from the resolved config. Returns (resolved config, method,
    model, server state, shards, context(client_id) -> ClientContext for round 1 on the CPU)."""
    import torch

    from raymed.data.shards import ShardSet, materialise
    from raymed.methods import ClientContext, build_method, client_context

    shard_dir = materialise(cfg)
    cfg = build_method(cfg.strategy.name, cfg.strategy.params).prepare(cfg, str(shard_dir))
    method = build_method(cfg.strategy.name, cfg.strategy.params)
    shards = ShardSet(shard_dir)
    model = method.build_model(cfg.model, shards.tasks, cfg.seed)
    unsent = getattr(model, "unsent_keys", ())
    initial = {k: v.numpy().copy() for k, v in model.state_dict().items() if k not in unsent}

    def context(client: int) -> ClientContext:
        return client_context(cfg, client, 1, model, shards, torch.device("cpu"), initial)

    return cfg, method, model, method.init_state(initial), shards, context
