"""DP-FedAvg — McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018, https://arxiv.org/abs/1710.06963 — with optional local DP-SGD (Abadi et al.,
"Deep Learning with Differential Privacy", CCS 2016, https://arxiv.org/abs/1607.00133) through Opacus.

Client-level DP (what is protected: whether any one client took part, whatever its data), round t
with sampled clients S_t, clip norm C, noise multiplier z, k = max(1, round(fraction·N)) clients
per round out of N, sample rate q = k/N:

    client k:  w_k ← w_t;  E epochs of local SGD;  Δ_k = w_k − w_t
               send  Δ̃_k = Δ_k · min(1, C / ‖Δ_k‖₂)           (‖·‖ over the whole update vector)
    server:    w_{t+1} = w_t + η_s · ( Σ_{k∈S_t} Δ̃_k + N(0, z²C²·I) ) / (qN)

- Uniform weights and a fixed denominator qN = k (the paper's estimator f̃ with w_k = 1, W = N):
  one client changes the noised sum by at most C, so the Gaussian mechanism's sensitivity is C.
  Weighting by n_k, or dividing by the number of updates that actually arrived, would make the
  sensitivity depend on a client's data size or on who took part, and the accounting would be wrong.
  A round in which fewer than k updates arrive (failures, rejections, offline clients) still divides
  by k.
- The update is one vector over every key of the global model. A key a client does not send (the
  head of a dataset it does not hold) counts as zero in its norm and in the sum; the noise goes on
  every key of the server state, sent this round or not (so whether a head moved reveals nothing),
  including the heads of ``data.held_out`` datasets, which no client trains.
- The noise is drawn from ``np.random.default_rng([seed, round, salt])``, never from a global
  stream: a resumed run adds exactly the noise the uninterrupted run adds.
- The clipping is done twice: by the client (what leaves the client is bounded) and again, with the
  same C, where the worker folds the update into the round's sum (:class:`ClippedSum`), so the sum's
  sensitivity holds even for an update the simulator changed after the method (``faults.byzantine``).
  Re-clipping a clipped update changes nothing. An update down-weighted for lateness
  (``engine.late_updates=downweight``) enters with its weight (≤ 1), which only lowers its norm.

Accounting: Opacus's RDP accountant (:class:`opacus.accountants.RDPAccountant`), one step of the
sampled Gaussian mechanism per round with noise multiplier z and sample rate q; each round's row
reports ``privacy/epsilon`` for ``delta`` after that many rounds (it depends on the round number
only, so nothing but the round is kept). Assumptions:

- The accountant assumes Poisson sampling (each client in each round independently with probability
  q); the engine draws a fixed-size subset of k clients without replacement. Using q = k/N for it is
  the usual approximation (as in McMahan et al. and TensorFlow Federated), not an exact bound. With
  ``clients.availability`` < 1 the k clients are drawn from the online ones; each client is still
  included with probability about k/N.
- Every round is counted, also a round with no client online.
- z = 0 (clipping only) gives no guarantee: ε is reported as inf.
- The server is trusted to add the noise (central DP); the clients' updates themselves are not noised.

Local DP-SGD (``local_noise_multiplier`` σ > 0; record-level DP of each client's update w.r.t. one
training example of that client): each client trains with Opacus's per-sample gradients
(``GradSampleModule``) and ``DPOptimizer``: every example's gradient clipped to ``local_clip``,
Gaussian noise σ·local_clip added to each step's summed gradient, divided by the expected batch size.
Batches are drawn Poisson-style from :meth:`ClientContext.rng`, as Opacus's accountant assumes: per
dataset d of the client (each step trains one dataset, since each has its own head), an epoch is
s_d = ⌈n_d / batch_size⌉ steps, each taking every one of the n_d rows independently with probability
q_d = 1/s_d (Opacus's ``DPDataLoader`` rule); the steps of the client's datasets are interleaved in a
seeded order. An example of dataset d takes part only in d's steps, so its privacy loss is that of
E·s_d steps per round at rate q_d; the client's ε is the largest over its datasets. Each client keeps
its step history (σ, q_d, steps) in its persistent state and reports its cumulative ε as
``local_epsilon`` in its row of the client table; each round's row reports the largest among its
clients as ``privacy/local_epsilon_max``. Steps of a round whose update the server rejects are not
counted (the engine keeps the state of accepted clients only). Local DP-SGD trains one client at a
time (no vmap).

The model: BatchNorm is replaced by GroupNorm (``opacus.validators.ModuleValidator.fix``) in both
halves, with or without local DP-SGD: per-sample gradients are undefined under BatchNorm (it mixes the
examples of a batch), and noised running variances could turn negative. In-place activations are made
out-of-place (Opacus's backward hooks forbid in-place changes of a hooked module's output). The
backbones ``cnn``/``cnn_large`` have no BatchNorm and keep their weights; ``resnet18`` becomes a
GroupNorm ResNet. Local DP-SGD is refused on ``resnet18``: its residual blocks add in place
(``out += identity``) to a hooked layer's output, which Opacus's backward hooks forbid; client-level
DP works with it. Report generation is not supported.

``seed``, ``clients_per_round`` and ``num_clients`` are filled in from the experiment by
:meth:`DPFedAvg.prepare` (the saved config holds them); a value given that disagrees with the
experiment is refused.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from raymed.config import ExperimentConfig, ModelConfig, StrategyConfig
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import (
    ClientContext,
    ClientUpdate,
    Method,
    ServerState,
    WeightedMean,
    Weights,
    local_optimizer,
    local_sgd,
    register_method,
    take,
)
from raymed.methods.fedavg import FedAvg, FedAvgParams
from raymed.methods.vectorised import local_sgd_many, subtract
from raymed.models import FedModel

# Backbones local DP-SGD is tested on: Opacus's backward hooks forbid in-place changes of a hooked
# layer's output, which torchvision's residual blocks make (``out += identity``); the normalised CNNs
# (BatchNorm made GroupNorm) carry dropout, which the per-example check cannot replay: not tested.
LOCAL_DP_MODELS = ("cnn", "cnn_large")
NOISE_SALT = 0xD9F  # separates the server's noise stream from the other (seed, round) streams
STATE_PREFIX = "dpsgd/"  # client state keys: dpsgd/<dataset> -> rows (σ, q, steps)


class DPFedAvgParams(FedAvgParams):
    weighting: Literal["uniform"] = Field("uniform", description="every clipped update counts alike (the sensitivity is C)")
    clip: float = Field(1.0, gt=0, description="C, the L2 norm each client update is clipped to")
    noise_multiplier: float = Field(1.0, ge=0, description="z: the server adds N(0, z²C²) to the sum of clipped updates")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ) guarantees")
    local_noise_multiplier: float = Field(0.0, ge=0, description="σ of local DP-SGD (0: off)")
    local_clip: float = Field(1.0, gt=0, description="per-example gradient norm bound of local DP-SGD")
    # Filled in from the experiment by prepare(); leave unset.
    seed: int | None = Field(None, description="the experiment's seed (filled in)")
    clients_per_round: int | None = Field(None, ge=1, description="max(1, round(clients.fraction·clients.num)) (filled in)")
    num_clients: int | None = Field(None, ge=1, description="clients.num (filled in)")


def resolved_values(cfg: ExperimentConfig) -> dict[str, int]:
    """The parameters DP-FedAvg takes from the experiment rather than from the user."""
    n = cfg.clients.num
    return {"seed": cfg.seed, "clients_per_round": cfg.clients.per_round, "num_clients": n}


# ---------------------------------------------------------------------------------------------------
# Clipping, noise, accounting


def update_norm(delta: Weights) -> float:
    """‖Δ‖₂ over every key of the update, in float64."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C/‖Δ‖): the scale that brings an update of norm ``norm`` within ``clip``."""
    return min(1.0, clip / norm) if norm > 0 else 1.0


def clip_update(delta: Weights, clip: float) -> tuple[Weights, float]:
    """Δ · min(1, C/‖Δ‖) (float32, as sent) and the norm before clipping."""
    norm = update_norm(delta)
    factor = clip_factor(norm, clip)
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in delta.items()}, norm


class ClippedSum(WeightedMean):
    """Σ_k Δ̃_k, unweighted, each update clipped to ``clip`` as it is added (see the module docstring);
    ``weights`` counts the updates per key, and merging partials is WeightedMean's."""

    def __init__(self, clip: float) -> None:
        super().__init__()
        self.clip = clip

    def add(self, update: ClientUpdate) -> None:
        factor = clip_factor(update_norm(update.delta), self.clip) * min(1.0, update.weight)
        for key, value in update.delta.items():
            self.add_term(key, value, factor)
            self.weights[key] = self.weights.get(key, 0.0) + 1.0
        self.count += 1


def server_noise(weights: Weights, std: float, seed: int, round_: int) -> Weights:
    """N(0, std²) for every key of ``weights`` (float64), drawn in key order from (seed, round) only."""
    rng = np.random.default_rng([seed, round_, NOISE_SALT])
    return {k: rng.standard_normal(weights[k].shape) * std for k in sorted(weights)}


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of Opacus's RDP accountant for ``history`` [(noise multiplier, sample rate, steps)];
    0 without steps, inf where a noise multiplier is 0."""
    from opacus.accountants import RDPAccountant

    history = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(z == 0 for z, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = history
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` rounds of DP-FedAvg: one sampled Gaussian step per round."""
    return rdp_epsilon([(noise_multiplier, sample_rate, rounds)], delta)


# ---------------------------------------------------------------------------------------------------
# Local DP-SGD


def poisson_plan(ctx: ClientContext, epochs: int) -> tuple[list[tuple[str, np.ndarray]], dict[str, tuple[float, int, float]]]:
    """The client's Poisson-sampled steps [(dataset, rows)] in a seeded order, and per dataset
    (sample rate q_d, steps, expected batch size)."""
    rng = ctx.rng()
    plan: list[tuple[str, np.ndarray]] = []
    rates: dict[str, tuple[float, int, float]] = {}
    for _ in range(epochs):
        order = []
        for flag, (_, y) in ctx.tensors("train").items():
            n = len(y)
            steps = math.ceil(n / ctx.train.batch_size)
            q = 1.0 / steps
            rates[flag] = (q, rates.get(flag, (q, 0, 0.0))[1] + steps, n * q)
            order += [flag] * steps
        for i in rng.permutation(len(order)):
            flag = order[i]
            n = len(ctx.tensors("train")[flag][1])
            plan.append((flag, np.flatnonzero(rng.random(n) < rates[flag][0])))
    return plan, rates


def dp_sgd(ctx: ClientContext, noise_multiplier: float, max_grad_norm: float) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """``clients.local_epochs`` epochs of DP-SGD through Opacus on the client's data (see the module
    docstring). Returns the metrics and, per dataset, (sample rate, steps) taken. Opacus's hooks and
    attributes are removed from the (shared) model before it returns."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model, cfg = ctx.model, ctx.train
    model.train()
    trained = set(ctx.trained_keys)
    params = {name: p for name, p in model.named_parameters() if name in trained}
    heads = {flag: [p for name, p in params.items() if name.startswith(f"heads.{model.head_key(flag)}.")] for flag in ctx.tensors("train")}
    base = local_optimizer(params.values(), cfg, ctx.lr)
    plan, rates = poisson_plan(ctx, cfg.local_epochs)
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapped = GradSampleModule(model, loss_reduction="mean")
    total, steps = torch.zeros((), device=ctx.device), 0
    try:
        # The noise comes from torch's global generator, which the worker seeds per (seed, round, client).
        optimizer = DPOptimizer(base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="mean")
        tensors = ctx.tensors("train")
        for flag, rows in plan:
            # One dataset per step: the other heads of this client sit the step out (no gradient, no noise).
            for other, ps in heads.items():
                for p in ps:
                    p.requires_grad_(other == flag)
            optimizer.expected_batch_size = rates[flag][2]
            optimizer.zero_grad(set_to_none=True)
            if len(rows):
                x, y = tensors[flag]
                index = torch.as_tensor(rows, device=ctx.device)
                with warnings.catch_warnings():  # the first layer's input needs no gradient: fine
                    warnings.simplefilter("ignore", UserWarning)
                    loss = ctx.tasks[flag].loss(wrapped(take(x, index), flag), y[index])
                    loss.backward()
                total += loss.detach()
                steps += 1
            else:  # an empty Poisson batch still takes its noisy step
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            optimizer.step()
    finally:
        wrapped.to_standard_module()  # Opacus's hooks and attributes off the worker's shared model
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
            for attr in ("summed_grad", "grad_sample", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    return {"train_loss": float(total) / max(steps, 1)}, {flag: (q, n) for flag, (q, n, _) in rates.items()}


def add_history(state: dict[str, np.ndarray] | None, sigma: float, taken: dict[str, tuple[float, int]]) -> dict[str, np.ndarray]:
    """The client's DP-SGD history with this round's steps added: per dataset, rows (σ, q, steps)."""
    out = {k: np.array(v, dtype=np.float64) for k, v in (state or {}).items()}
    for flag, (q, n) in taken.items():
        rows = out.get(STATE_PREFIX + flag, np.zeros((0, 3)))
        same = np.flatnonzero((rows[:, 0] == sigma) & (rows[:, 1] == q)) if len(rows) else []
        if len(same):
            rows[same[0], 2] += n
        else:
            rows = np.vstack([rows, [[sigma, q, n]]])
        out[STATE_PREFIX + flag] = rows
    return out


def local_epsilon(state: dict[str, np.ndarray], delta: float) -> float:
    """A client's record-level ε: the largest over its datasets of their step histories' ε."""
    return max((rdp_epsilon([tuple(r) for r in rows], delta) for k, rows in state.items() if k.startswith(STATE_PREFIX)), default=0.0)


# ---------------------------------------------------------------------------------------------------
# The method


@register_method
class DPFedAvg(FedAvg):
    name = "dpfedavg"
    Params = DPFedAvgParams

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.data.task == "report":
            raise ConfigError("strategy dpfedavg does not support report generation (data.task=report); use classification or superresolution")
        if cfg.clients.local_steps is not None:
            raise ConfigError("strategy dpfedavg accounts privacy per local epoch (Poisson-sampled passes): set clients.local_steps=null (the default is 20 steps) and use clients.local_epochs")
        if self.params.local_noise_multiplier > 0 and cfg.model.name not in LOCAL_DP_MODELS:
            why = "adds residuals in place, which Opacus's hooks forbid" if cfg.model.name.startswith("resnet") else "is not tested with it"
            raise ConfigError(
                f"strategy.local_noise_multiplier: local DP-SGD (Opacus per-example gradients) runs on model.name {' or '.join(LOCAL_DP_MODELS)}; "
                f"{cfg.model.name} {why}: set model.name=cnn (client-level DP alone works with {cfg.model.name})"
            )
        given = self.params.model_dump()
        for key, value in resolved_values(cfg).items():
            if given[key] is not None and given[key] != value:
                raise ConfigError(
                    f"strategy.{key}={given[key]} does not match this experiment ({value}); it is filled in from the experiment: remove strategy.{key}"
                )

    def prepare(self, cfg: ExperimentConfig, shard_dir: str) -> ExperimentConfig:
        """Fill in the seed of the server's noise and the sampling the accountant needs."""
        strategy = StrategyConfig(name=cfg.strategy.name, **{**cfg.strategy.params, **resolved_values(cfg)})
        return cfg.model_copy(update={"strategy": strategy})

    def _resolved(self) -> tuple[int, int, int]:
        p = self.params
        if p.seed is None or p.clients_per_round is None or p.num_clients is None:
            raise ConfigError("strategy dpfedavg: seed, clients_per_round and num_clients were not filled in; run it through raymed (Federation prepares them)")
        return p.seed, p.clients_per_round, p.num_clients

    @property
    def sample_rate(self) -> float:
        _, k, n = self._resolved()
        return k / n

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> FedModel:
        """The backbone with BatchNorm replaced by GroupNorm and in-place activations made
        out-of-place (see the module docstring); the same in every process."""
        from opacus.validators import ModuleValidator

        model = super().build_model(cfg, tasks, seed)
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = ModuleValidator.fix(model)  # a copy; GroupNorm starts at weight 1, bias 0: no RNG drawn
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        return model

    # ---- server half

    def new_accumulator(self) -> ClippedSum:
        return ClippedSum(self.params.clip)

    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        """w ← w + η_s · (Σ Δ̃_k + N(0, z²C²)) / (qN), on every key of the state."""
        seed, k, _ = self._resolved()
        p = self.params
        round_ = state.round + 1  # the engine sets state.round to this round after aggregating
        std = p.noise_multiplier * p.clip
        noise = server_noise(state.weights, std, seed, round_) if std > 0 else {}
        weights, sums = {}, accumulator.sums
        for key, value in state.weights.items():
            total = sums.get(key, 0.0) + noise.get(key, 0.0)
            weights[key] = (value + p.server_lr * total / k).astype(value.dtype)
        return ServerState(weights=weights, round=state.round, extra=state.extra)

    def round_metrics(self, state: ServerState, records: list[dict[str, Any]]) -> dict[str, float]:
        p = self.params
        out = {"privacy/epsilon": client_level_epsilon(p.noise_multiplier, self.sample_rate, state.round, p.delta)}
        accepted = [r for r in records if r.get("failed") is None and r.get("rejected") is None]
        clipped = [r["clipped"] for r in accepted if "clipped" in r]
        # A diagnostic of the simulation (how often C binds), not part of the private release.
        out["privacy/clipped_fraction"] = float(np.mean(clipped)) if clipped else float("nan")
        if p.local_noise_multiplier > 0:
            local = [r["local_epsilon"] for r in records if r.get("local_epsilon") is not None and not math.isnan(r["local_epsilon"])]
            out["privacy/local_epsilon_max"] = max(local) if local else float("nan")
        return out

    # ---- client half

    def _finish(self, delta: Weights, metrics: dict[str, float], state: dict[str, np.ndarray] | None = None) -> ClientUpdate:
        clipped, norm = clip_update(delta, self.params.clip)
        # The pre-clip norm is a simulator diagnostic (to choose C), not something a client would publish.
        metrics = {**metrics, "update_norm": norm, "clipped": float(norm > self.params.clip)}
        if state is not None:
            metrics["local_epsilon"] = local_epsilon(state, self.params.delta)
        return ClientUpdate(delta=clipped, weight=1.0, metrics=metrics, state=state)

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        ctx.load(payload)
        sigma = self.params.local_noise_multiplier
        if sigma == 0:
            metrics = local_sgd(ctx)  # train first, then read the delta
            return self._finish(ctx.delta_from(payload), metrics)
        metrics, taken = dp_sgd(ctx, sigma, self.params.local_clip)
        return self._finish(ctx.delta_from(payload), metrics, add_history(ctx.state, sigma, taken))

    def client_updates(self, ctxs: list[ClientContext], payload: Weights) -> list[ClientUpdate]:
        if self.params.local_noise_multiplier > 0 or not ctxs:  # DP-SGD: one client at a time
            return Method.client_updates(self, ctxs, payload)
        trained = local_sgd_many(ctxs, [payload] * len(ctxs), None)
        return [self._finish(subtract(weights, payload), metrics) for weights, metrics in trained]
