"""Byzantine-robust aggregation rules: coordinate-wise median, trimmed mean, Krum and multi-Krum.

- Coordinate-wise median and trimmed mean — Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498
- Krum — Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017, https://papers.nips.cc/paper/6617
- multi-Krum — El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018, https://arxiv.org/abs/1802.07927 (and section 4 of Blanchard et al.)

The client half is FedAvg's (E epochs of local SGD, send Δ_k = w_k − w_t); only the server's
combination of the n updates Δ_1..Δ_n of a round changes:

    server:  w_{t+1} = w_t + η_s · robust(Δ_1, ..., Δ_n)

    median:        robust(Δ)[j] = med_k Δ_k[j]                          (every coordinate j on its own)
    trimmed mean:  robust(Δ)[j] = 1/(n − 2b) · Σ_{k=b+1}^{n−b} Δ_(k)[j],  b = ⌈β·n⌉
                   where Δ_(1)[j] ≤ ... ≤ Δ_(n)[j] are the n values of coordinate j sorted
    Krum:          s(i) = Σ_{j ∈ N_i} ‖Δ_i − Δ_j‖²,  N_i = the n − f − 2 updates nearest to Δ_i (j ≠ i)
                   robust(Δ) = Δ_{i*},  i* = argmin_i s(i)
    multi-Krum:    robust(Δ) = (1/m) Σ_{i ∈ M} Δ_i,  M = the m updates of lowest score s(i)

What the rules assume: fewer than half of a round's updates are Byzantine (median); at most a β
fraction at each end of every coordinate (trimmed mean: β at least the attackers' fraction); at most
f attackers among n > 2f + 2 updates (Krum, whose score is then bounded by honest distances). They
assume the honest updates are alike (i.i.d.-ish data): under strong non-IID data an honest but
unusual client looks like an outlier and is discarded, which costs accuracy without any attack.

Choices of this implementation:

- The rules are unweighted by design: a client's aggregation weight n_k (its number of training
  examples) is ignored, since a Byzantine client could claim any n_k.
- Clients send different keys (a dataset's head only comes from the clients holding that dataset):
  median and trimmed mean are applied per key over the clients that sent it; b = ⌈β·n_key⌉ is capped
  at ⌊(n_key − 1)/2⌋ so that at least one value is left (a head with few senders is then its median).
- Krum scores on the keys that every update of the round sent (the backbone, under the modality
  partition), picks the m best-scored updates, and averages them per key over the picked ones that
  sent the key; a key that no picked update sent (the head of a dataset none of them holds) takes the
  coordinate-wise median of the clients that sent it. With no key shared by every update, Krum falls
  back to the coordinate-wise median of every key.
- The server holds every update of the round (memory n × model size, instead of FedAvg's running
  sum). The updates are put in a canonical order (by a digest of their contents), so the result does
  not depend on how the round's clients were spread over workers: median and trimmed mean are
  order-independent anyway, Krum's ties are broken by that order.
- ``check_config`` refuses settings the rules cannot satisfy with the round's clients
  (max(1, round(clients.fraction · clients.num)) per round). A round where fewer updates arrive
  (clients offline, failed or rejected) still aggregates: Krum then uses max(1, n − f − 2) neighbours
  and at most n picks, and logs that its assumption does not hold.
"""

from __future__ import annotations

import hashlib
import logging
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
from pydantic import Field

from raymed.config import ExperimentConfig
from raymed.errors import ConfigError
from raymed.methods.base import ClientUpdate, ServerState, Weights, register_method
from raymed.methods.fedavg import FedAvg, FedAvgParams

logger = logging.getLogger("raymed")


# ---------------------------------------------------------------------------------------------------
# The accumulator: every update, kept whole


def digest(delta: Weights) -> str:
    """A digest of an update's keys and values: the canonical order of a round's updates."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(delta):
        value = np.ascontiguousarray(delta[key])
        h.update(key.encode())
        h.update(str(value.dtype).encode() + str(value.shape).encode())
        h.update(value.tobytes())
    return h.hexdigest()


class UpdateList:
    """Every client's update of a round (the robust rules need them all, not a running sum); the same
    add/merge/count API as :class:`~raymed.methods.base.WeightedMean`, merge concatenates."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Weights]] = []  # (digest, delta); the aggregation weight is not used
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        self.entries.append((digest(update.delta), dict(update.delta)))
        self.count += 1

    def merge(self, other: UpdateList) -> None:
        self.entries += other.entries
        self.count += other.count

    @property
    def updates(self) -> list[Weights]:
        """The updates in canonical order (by digest), whatever order the workers sent them in."""
        return [delta for _, delta in sorted(self.entries, key=lambda e: e[0])]

    def mean(self) -> Weights:
        """The plain (unweighted) per-key mean, the non-robust rule the others are compared with."""
        return per_key(self.updates, lambda stack: stack.mean(axis=0))


# ---------------------------------------------------------------------------------------------------
# The rules, on plain lists of updates


CHUNK_BYTES = 64 << 20  # the float64 stack a rule sees at once: n updates × this / (8 n) coordinates


def chunks(values: list[np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
    """(coordinates, the n × chunk float64 stack of ``values`` there), over the flattened values in
    chunks of at most CHUNK_BYTES, so a rule never holds an n × P float64 copy of a large key."""
    flat = [v.reshape(-1) for v in values]
    step = max(1, CHUNK_BYTES // (8 * len(flat)))
    for start in range(0, flat[0].size, step):
        part = slice(start, start + step)
        yield part, np.stack([f[part] for f in flat]).astype(np.float64)


def per_key(updates: list[Weights], rule: Callable[[np.ndarray], np.ndarray]) -> Weights:
    """``rule`` (a coordinate-wise function of an (n_key, coordinates) float64 stack of a key's values,
    along axis 0) applied to each key over the updates that sent it, chunk by chunk; results in the
    dtype the updates came in."""
    keys = sorted({k for u in updates for k in u})
    out = {}
    for key in keys:
        values = [u[key] for u in updates if key in u]
        result = np.empty(values[0].size, dtype=values[0].dtype)
        for part, stack in chunks(values):
            result[part] = rule(stack)
        out[key] = result.reshape(values[0].shape)
    return out


def coordinate_median(updates: list[Weights]) -> Weights:
    """med_k Δ_k[j] per coordinate, per key over the updates that sent the key."""
    return per_key(updates, lambda stack: np.median(stack, axis=0))


def trim_count(trim: float, n: int) -> int:
    """b = ⌈β·n⌉ values cut from each end, at most ⌊(n − 1)/2⌋ so at least one is left."""
    return min(math.ceil(trim * n - 1e-9), (n - 1) // 2)  # 1e-9: 0.1·30 = 3.0000000000000004 in floats cuts 3


def trimmed_mean(updates: list[Weights], trim: float) -> Weights:
    """Per coordinate: sort the n values, drop b = ⌈β·n⌉ at each end, average the rest."""

    def rule(stack: np.ndarray) -> np.ndarray:
        n = len(stack)
        b = trim_count(trim, n)
        return np.sort(stack, axis=0)[b : n - b].mean(axis=0)

    return per_key(updates, rule)


def shared_keys(updates: list[Weights]) -> list[str]:
    """The keys every update sent (the backbone), sorted."""
    return sorted(set.intersection(*(set(u) for u in updates))) if updates else []


def krum_scores(updates: list[Weights], byzantine: int, keys: list[str] | None = None) -> np.ndarray:
    """s(i) = Σ ‖Δ_i − Δ_j‖² over the n − f − 2 nearest j ≠ i (at least 1, at most n − 1), on ``keys``
    (default: the keys every update sent)."""
    n = len(updates)
    keys = shared_keys(updates) if keys is None else keys
    if n == 1 or not keys:  # nothing to compare
        return np.zeros(n)
    dist = np.zeros((n, n))
    for key in keys:  # chunk by chunk: never an n × P float64 copy of the updates
        for _, block in chunks([u[key] for u in updates]):
            for i in range(n):  # exact differences (no ‖a‖² + ‖b‖² − 2ab cancellation under scaled attacks)
                dist[i, i + 1 :] += ((block[i + 1 :] - block[i]) ** 2).sum(axis=1)
    dist = dist + dist.T
    neighbours = min(max(n - byzantine - 2, 1), n - 1)
    others = np.sort(dist + np.diag(np.full(n, np.inf)), axis=1)  # the diagonal (i itself) sorts last
    return others[:, :neighbours].sum(axis=1)


def krum_select(updates: list[Weights], byzantine: int, select: int) -> list[int]:
    """Indices of the ``select`` updates of lowest Krum score (ties: the earlier index)."""
    scores = krum_scores(updates, byzantine)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[: min(select, len(updates))])


def krum(updates: list[Weights], byzantine: int, select: int = 1) -> Weights:
    """Krum (select = 1) or multi-Krum: the mean of the picked updates per key, over the picked ones
    that sent it; a key none of them sent takes the coordinate-wise median of its senders."""
    if not shared_keys(updates):
        return coordinate_median(updates)
    picked = [updates[i] for i in krum_select(updates, byzantine, select)]
    out = per_key(picked, lambda stack: stack.mean(axis=0))
    rest = [k for k in {k for u in updates for k in u} if k not in out]
    if rest:
        out.update(coordinate_median([{k: u[k] for k in rest if k in u} for u in updates]))
    return out


# ---------------------------------------------------------------------------------------------------
# The strategies


class RobustAggregation(FedAvg):
    """FedAvg's clients; the server keeps every update and steps along ``robust_delta`` of them."""

    def new_accumulator(self) -> UpdateList:  # type: ignore[override]
        return UpdateList()

    def check_model(self, cfg: ExperimentConfig, model) -> None:
        """The rules need every update of a round at once: K clients × P parameters in float32."""
        params = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
        need = cfg.clients.per_round * params * 4 / 2**30
        if need > self.params.max_updates_gb:
            raise ConfigError(
                f"strategy {self.name} keeps every update of a round: {cfg.clients.per_round} clients × {params / 1e6:.1f} M parameters "
                f"× 4 bytes = {need:.1f} GB > strategy.max_updates_gb={self.params.max_updates_gb:g}; sample fewer clients per round "
                "(clients.fraction) or raise strategy.max_updates_gb where the server has the memory"
            )

    @abstractmethod
    def robust_delta(self, updates: list[Weights]) -> Weights:
        """The robust combination of the round's updates, per key."""

    def aggregate(self, state: ServerState, accumulator: UpdateList) -> ServerState:  # type: ignore[override]
        weights = dict(state.weights)
        for key, delta in self.robust_delta(accumulator.updates).items():
            weights[key] = (weights[key] + self.params.server_lr * delta).astype(weights[key].dtype)
        return ServerState(weights=weights, round=state.round, extra=state.extra)


class RobustParams(FedAvgParams):
    weighting: Literal["uniform"] = Field("uniform", description="the rules weigh every client alike (see above)")
    max_updates_gb: float = Field(16.0, gt=0, description="the most memory a round's updates may take on the server (K × P × 4 bytes)")


@register_method
class Median(RobustAggregation):
    name = "median"
    Params = RobustParams

    def robust_delta(self, updates: list[Weights]) -> Weights:
        return coordinate_median(updates)


class TrimmedMeanParams(RobustParams):
    trim: float = Field(0.1, ge=0, lt=0.5, description="β, the fraction of values cut from EACH end of every coordinate")


@register_method
class TrimmedMean(RobustAggregation):
    name = "trimmed_mean"
    Params = TrimmedMeanParams

    def check_config(self, cfg: ExperimentConfig) -> None:
        n, trim = cfg.clients.per_round, self.params.trim
        cut = math.ceil(trim * n - 1e-9)  # as trim_count: β·n = 3.0000000000000004 cuts 3
        if n - 2 * cut < 1:
            most = (n - 1) // 2 / n  # the largest β with ⌈β·n⌉ ≤ ⌊(n − 1)/2⌋
            raise ConfigError(
                f"strategy.trim={trim:g} cuts ⌈{trim:g}·{n}⌉={cut} of the {n} clients per round from each end, leaving none; "
                f"set strategy.trim ≤ {most:.4g} or sample more clients (clients.fraction·clients.num)"
            )

    def robust_delta(self, updates: list[Weights]) -> Weights:
        return trimmed_mean(updates, self.params.trim)


class KrumParams(RobustParams):
    byzantine: int = Field(1, ge=0, description="f, the number of Byzantine clients per round Krum tolerates")
    select: int = Field(1, ge=1, description="m, updates averaged: 1 = Krum, > 1 = multi-Krum")


@register_method
class Krum(RobustAggregation):
    name = "krum"
    Params = KrumParams

    def check_config(self, cfg: ExperimentConfig) -> None:
        n, f, m = cfg.clients.per_round, self.params.byzantine, self.params.select
        if n <= 2 * f + 2:
            raise ConfigError(
                f"strategy krum with strategy.byzantine={f} (f) needs more than 2f+2={2 * f + 2} clients per round, got {n} "
                f"(round(clients.fraction·clients.num)); sample more clients or lower strategy.byzantine"
            )
        if m > n - f:
            raise ConfigError(f"strategy.select={m} exceeds the n−f={n - f} updates multi-Krum may average ({n} clients per round, byzantine={f}); lower strategy.select")

    def robust_delta(self, updates: list[Weights]) -> Weights:
        f = self.params.byzantine
        if len(updates) <= 2 * f + 2:
            logger.warning("krum: %d updates this round, not more than 2f+2=%d: its guarantee does not hold", len(updates), 2 * f + 2)
        return krum(updates, f, self.params.select)
