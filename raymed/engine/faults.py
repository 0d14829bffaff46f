"""What goes wrong with clients, simulated: who is online, who crashes or straggles, who attacks.

Every draw here is seeded by (seed, round, client) and keeps no state, so a resumed run, a rerun
and a run spread differently over workers see the same clients online, the same crashes and the
same attackers. The engine applies these; methods never see them (a Byzantine client's update
looks like any other, which is the point).

- availability: ``clients.availability`` (a probability per client and round) or
  ``clients.availability_trace`` (a CSV/Parquet file of the (client_id, round) pairs a client is online).
- crashes: ``faults.crash`` makes chosen clients raise, kill their worker process, or hang.
- stragglers: ``faults.slow`` adds a simulated delay to chosen clients' round time.
- Byzantine clients: ``faults.byzantine`` picks a seeded fraction of the federation, whose updates
  are replaced (sign flip, scaling, Gaussian noise) or whose labels are flipped before training.
"""

from __future__ import annotations

import os
import time
from functools import cached_property
from pathlib import Path

import numpy as np

from raymed.config import ExperimentConfig
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError, RaymedError

# Salts: the draws of different purposes never share a stream.
_AVAILABLE, _BYZANTINE, _NOISE = 0xA7A, 0xB12, 0x9015E
ATTACK_SCALE = {"sign_flip": 1.0, "scale": 10.0, "noise": 1.0, "label_flip": 1.0}


class InjectedCrash(RuntimeError):
    """A client failure injected by ``faults.crash`` (kind raise)."""


def load_trace(path: str | Path, num_clients: int) -> dict[int, set[int]]:
    """An availability trace: {client: rounds online} for the clients it lists (one line on any problem)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"clients.availability_trace: {path} does not exist; give a CSV or Parquet file with columns client_id, round")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:
        raise ConfigError(f"clients.availability_trace: cannot read {path} ({type(exc).__name__}); give a CSV or Parquet file with columns client_id, round") from None
    missing = {"client_id", "round"} - set(table.columns)
    if missing:
        raise ConfigError(f"clients.availability_trace: {path} lacks column(s) {', '.join(sorted(missing))}; it has {', '.join(map(str, table.columns))}")
    ids = pd.to_numeric(table["client_id"], errors="coerce")
    rounds = pd.to_numeric(table["round"], errors="coerce")
    if ids.isna().any() or rounds.isna().any() or not ids.between(0, num_clients - 1).all():
        raise ConfigError(f"clients.availability_trace: {path} has client ids outside 0..{num_clients - 1} or non-numeric rows; fix the file or clients.num")
    trace: dict[int, set[int]] = {}
    for client, round_ in zip(ids.astype(int), rounds.astype(int)):
        trace.setdefault(int(client), set()).add(int(round_))
    return trace


class FaultPlan:
    """The run's simulated faults, as pure functions of (seed, round, client)."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.faults = cfg.faults

    @cached_property
    def trace(self) -> dict[int, set[int]] | None:
        c = self.cfg.clients
        return load_trace(c.availability_trace, c.num) if c.availability_trace else None

    # ---- availability

    def online(self, round_: int) -> list[int]:
        """The clients online in ``round_`` (all of them unless availability says otherwise)."""
        n, c = self.cfg.clients.num, self.cfg.clients
        clients = np.arange(n)
        if c.availability < 1:
            draw = np.random.default_rng([self.cfg.seed, round_, _AVAILABLE]).random(n)
            clients = clients[draw < c.availability]
        if self.trace is not None:
            clients = np.array([k for k in clients if k not in self.trace or round_ in self.trace[k]], dtype=int)
        return [int(k) for k in clients]

    def check_participation(self) -> None:
        """Refuse a trace under which no client is ever online (zero participation)."""
        if self.trace is None:
            return
        unlisted = set(range(self.cfg.clients.num)) - set(self.trace)
        if not unlisted and not any(1 <= r <= self.cfg.rounds for rounds in self.trace.values() for r in rounds):
            raise ConfigError(
                f"clients.availability_trace lists every client but none online in rounds 1..{self.cfg.rounds}: "
                f"no round could train; fix the trace or its round numbers"
            )

    # ---- crashes and stragglers

    @staticmethod
    def _hits(clients: list[int], rounds: list[int], client: int, round_: int) -> bool:
        return client in clients and (not rounds or round_ in rounds)

    def maybe_crash(self, client: int, round_: int, attempt: int) -> None:
        """Fail as ``faults.crash`` says, on this client's first ``attempts`` tries of a round."""
        crash = self.faults.crash
        if crash.during != "training" or not self._hits(crash.clients, crash.rounds, client, round_) or attempt >= crash.attempts:
            return
        if crash.kind == "exit":
            os._exit(1)  # the whole worker process goes, as under the kernel's OOM killer
        if crash.kind == "hang":
            time.sleep(10**6)
        raise InjectedCrash(f"injected crash (faults.crash) of client {client} in round {round_}, try {attempt + 1}")

    def maybe_crash_evaluating(self, client: int, round_: int, attempt: int) -> None:
        """Kill this worker while it evaluates ``client`` (``faults.crash.during: evaluation``)."""
        crash = self.faults.crash
        if crash.during == "evaluation" and self._hits(crash.clients, crash.rounds, client, round_) and attempt < crash.attempts:
            os._exit(1)

    def delay_s(self, client: int, round_: int) -> float:
        slow = self.faults.slow
        return slow.delay_s if self._hits(slow.clients, slow.rounds, client, round_) else 0.0

    # ---- Byzantine clients

    @cached_property
    def byzantine(self) -> frozenset[int]:
        """The attacking clients: a seeded draw of round(fraction·N) of them, fixed for the run."""
        b, n = self.faults.byzantine, self.cfg.clients.num
        k = round(b.fraction * n)
        rng = np.random.default_rng([self.cfg.seed, _BYZANTINE])
        return frozenset(int(c) for c in rng.choice(n, size=k, replace=False)) if k else frozenset()

    @property
    def attack_scale(self) -> float:
        b = self.faults.byzantine
        return b.scale if b.scale is not None else ATTACK_SCALE[b.attack]

    def label_transform(self, client: int):
        """The label flip of a label-flipping attacker, else None."""
        if client in self.byzantine and self.faults.byzantine.attack == "label_flip":
            return flip_labels
        return None

    def poison(self, delta: dict[str, np.ndarray], client: int, round_: int) -> dict[str, np.ndarray]:
        """What an attacking client sends instead of its honest update ``delta``."""
        attack = self.faults.byzantine.attack
        if client not in self.byzantine or attack == "label_flip":
            return delta
        s = self.attack_scale
        if attack == "sign_flip":
            return {k: (-s * v).astype(v.dtype) for k, v in delta.items()}
        if attack == "scale":
            return {k: (s * v).astype(v.dtype) for k, v in delta.items()}
        rng = np.random.default_rng([self.cfg.seed, round_, client, _NOISE])
        return {k: rng.normal(0.0, s, size=v.shape).astype(v.dtype) for k, v in delta.items()}


def flip_labels(task: TaskSpec, labels: np.ndarray) -> np.ndarray:
    """Label flipping: class c → C−1−c (binary and ordinal: the opposite end), multi-label: every bit."""
    if task.kind in ("binary", "multiclass", "ordinal", "prognosis"):
        return (task.num_classes - 1 - labels).astype(labels.dtype)
    if task.kind == "multilabel":
        return (1 - labels).astype(labels.dtype)
    raise RaymedError(f"faults.byzantine.attack=label_flip needs class labels; {task.dataset} is a {task.kind} task")


def check_faults(cfg: ExperimentConfig, tasks: dict[str, TaskSpec]) -> None:
    """Refuse, before any actor starts, fault settings this run cannot have."""
    b = cfg.faults.byzantine
    if b.fraction and b.attack == "label_flip":
        wrong = [f"{t.dataset} ({t.kind})" for t in tasks.values() if t.kind not in ("binary", "multiclass", "ordinal", "prognosis", "multilabel")]
        if wrong:
            raise ConfigError(f"faults.byzantine.attack=label_flip needs class labels, which {', '.join(wrong)} lack; pick another attack")
    FaultPlan(cfg).check_participation()
