"""The one workload every system in ``benchmarks/peers.py`` runs, so that they do identical work.

``peers.py`` (in raymed's venv) fixes it and writes it to a folder that each system's runner reads:

- ``workload.npz``: every client's local training rows exactly as raymed partitioned them (uint8
  images and labels, concatenated, with per-client offsets) and the official test split;
- ``spec.json``: rounds, local epochs, batch size, learning rate, seed, the task, and the
  *schedule*: the clients of every round (raymed's seeded draw), so every system trains the same
  clients in the same round.

A runner (``run_bare.py``, ``run_flower.py``, ``run_pfl.py``; raymed runs through its own CLI)
builds raymed's small CNN from the same seed (same initial weights), trains each scheduled client
for the same number of plain-SGD steps with the same loss, averages weighted by examples (FedAvg),
and writes ``result.json``: the seconds of every round (from sampling to the aggregated model; no
evaluation) and the test metrics of the final global model. The model, the loss, the
preprocessing and the metrics are raymed's own (``install.sh`` puts raymed in the peers' venvs
without its dependencies, plus the few those modules import).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raymed.data.tasks import TaskSpec
from raymed.data.tasks import to_model_input  # raymed clients' own preprocessing
from raymed.models import build_model

CPU = torch.device("cpu")



class SingleTaskNet(nn.Module):
    """raymed's ``FedModel`` with its one head selected, as a plain ``forward(x) -> logits`` module."""

    def __init__(self, task: TaskSpec, seed: int, name: str = "cnn"):
        super().__init__()
        self.net = build_model(name, {task.dataset: task}, seed)
        self.flag = task.dataset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.flag)


@dataclass
class Workload:
    spec: dict[str, Any]
    x: torch.Tensor  # every client's training images, model input in [-1, 1], concatenated
    y: torch.Tensor  # their labels, N×1
    offsets: np.ndarray  # client c's rows are offsets[c]:offsets[c+1]
    test_x: torch.Tensor
    test_y: torch.Tensor
    task: TaskSpec

    @property
    def rounds(self) -> int:
        return int(self.spec["rounds"])

    @property
    def schedule(self) -> list[list[int]]:
        return self.spec["schedule"]

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def num_examples(self, client: int) -> int:
        return int(self.offsets[client + 1] - self.offsets[client])

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.offsets[client], self.offsets[client + 1]
        return self.x[lo:hi], self.y[lo:hi]

    def new_model(self) -> SingleTaskNet:
        return SingleTaskNet(self.task, int(self.spec["seed"]), self.spec.get("model", "cnn"))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.task.loss(logits, labels)

    def local_train(self, model: nn.Module, client: int, round_: int) -> int:
        """``local_epochs`` of plain mini-batch SGD on the client's rows, in an order seeded by
        (seed, round, client) as raymed's clients draw theirs. Returns the client's example count."""
        x, y = self.client_data(client)
        batch = int(self.spec["batch_size"])
        rng = np.random.default_rng([int(self.spec["seed"]), round_, client])
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=float(self.spec["lr"]))
        for _ in range(int(self.spec["local_epochs"])):
            order = torch.from_numpy(rng.permutation(len(x)))
            for i in range(0, len(x), batch):
                rows = order[i : i + batch]
                loss = self.loss(model(x[rows]), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return len(x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test-split accuracy, macro-F1 and AUC of ``model``, computed as raymed's global evaluation does."""
        model.eval()
        scores = [self.task.scores(model(self.test_x[i : i + 1024])) for i in range(0, len(self.test_x), 1024)]
        return self.task.metrics(np.concatenate(scores), self.test_y.numpy())


def load(folder: str | Path, threads: int) -> Workload:
    """The workload in ``folder``; sets this process's torch threads (each system's own layout)."""
    folder = Path(folder)
    spec = json.loads((folder / "spec.json").read_text())
    arrays = np.load(folder / "workload.npz")
    torch.set_num_threads(threads)
    task = TaskSpec(**spec["task"])
    return Workload(
        spec=spec,
        x=to_model_input(arrays["images"], task.channels, CPU),
        y=torch.from_numpy(arrays["labels"]).long(),
        offsets=arrays["offsets"],
        test_x=to_model_input(arrays["test_images"], task.channels, CPU),
        test_y=torch.from_numpy(arrays["test_labels"]).long(),
        task=task,
    )


def write_result(path: str | Path, system: str, round_seconds: list[float], test: dict[str, float], **extra: Any) -> None:
    """What every runner reports back to peers.py: seconds of every round, final test metrics."""
    result = {"system": system, "round_seconds": round_seconds, "test": test, "pid": os.getpid(), **extra}
    Path(path).write_text(json.dumps(result, indent=1))


class RoundClock:
    """Seconds of each round: ``start(r)`` when round r's sampling begins, ``stop(r)`` once its
    aggregated model exists."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}

    def start(self, round_: int) -> None:
        self.started[round_] = time.perf_counter()

    def stop(self, round_: int) -> None:
        self.seconds[round_] = time.perf_counter() - self.started[round_]

    def as_list(self) -> list[float]:
        return [self.seconds[r] for r in sorted(self.seconds)]
