"""The method interface: what every federated method implements, and what the engine gives it.

A method is one class in one module, holding both halves of the algorithm::

    server:  init_state → broadcast (what goes down) → aggregate (what came up) → eval_weights
    client:  client_update (local training on one client) and load_personalised (for evaluation)

The engine calls only these, and knows no method. Clients send :class:`ClientUpdate` objects; the
engine folds them into the method's accumulator on the worker that trained them (one partial
aggregate per worker per round, as pfl-research does), and the server merges the partials.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from raymed.config import ClientsConfig, ExperimentConfig, ModelConfig
from raymed.data.augment import Policy, augment, policy_for
from raymed.data.shards import ClientShard, Split
from raymed.checkpointable import checkpointable
from raymed.data.tasks import ModelInput, TaskSpec
from raymed.models import FedModel
from raymed.tasks.registry import build_task_model

Weights = dict[str, np.ndarray]
Penalty = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # trained parameters by name -> extra loss


def nbytes(weights: Weights) -> int:
    """Bytes on the wire for a set of weights (the communication accounting)."""
    return sum(v.nbytes for v in weights.values())


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@checkpointable
@dataclass
class ServerState:
    """Everything the server carries between rounds (checkpointable)."""

    weights: Weights
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What one client sends up (``delta``), its aggregation weight, and what it keeps (``state``)."""

    delta: Weights
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, np.ndarray] | None = None  # persistent client state: never sent to the server
    uploads: Weights = field(default_factory=dict)  # other things sent up, not averaged (e.g. summaries)

    @property
    def nbytes(self) -> int:
        return nbytes(self.delta) + nbytes(self.uploads)

    def problem(self, payload: Weights) -> str | None:
        """Why this update must not be aggregated, or None."""
        if not math.isfinite(self.weight) or self.weight <= 0:
            return f"aggregation weight {self.weight}"
        for key, value in self.delta.items():
            if key in payload and value.shape != payload[key].shape:
                return f"{key} has shape {value.shape}, expected {payload[key].shape}"
        for key, value in {**self.delta, **self.uploads}.items():
            if not finite(value):
                return f"non-finite values in {key}"
        return None


def finite(value: np.ndarray | torch.Tensor) -> bool:
    """Whether every entry is finite: one sum in the array's own precision (NaN and inf propagate
    through it), and the exact element-wise test only when that sum is not finite (it can also
    overflow)."""
    tensor = as_tensor(value)
    if not tensor.is_floating_point():
        return True
    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of ``value`` (no copy); read-only arrays from the object store are only read."""
    if isinstance(value, torch.Tensor):
        return value
    global _read_only_seen
    array = np.asarray(value)
    if any(stride < 0 for stride in array.strides):  # torch cannot view reversed strides
        array = np.ascontiguousarray(array)
    if array.flags.writeable or _read_only_seen:
        return torch.from_numpy(array)
    with warnings.catch_warnings():  # torch warns once per process about read-only arrays: not here
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    _read_only_seen = True
    return tensor


_read_only_seen = False


class PairwiseSum:
    """A float32 running sum whose rounding error grows like a pairwise sum's: terms are added in
    place into a block of ``BLOCK`` terms, and full blocks are summed pairwise (a binary counter of
    block sums; NumPy's own ``sum`` blocks by 8 the same way). For n terms the error per element is
    at most about ``(BLOCK + log2(n / BLOCK) + 2) · ε₃₂ · Σ|term|`` (a test holds it to that against
    float64), while a term costs one fused multiply-add pass over float32 — float64 sums cost a
    conversion, a temporary and twice the bytes, on every worker and on the wire."""

    BLOCK = 16

    def __init__(self, received: torch.Tensor | None = None) -> None:
        self.received = received  # a partial total that came over the wire: read, never written
        self.block: torch.Tensor | None = None
        self.in_block = 0
        self.levels: list[torch.Tensor | None] = []  # levels[i]: the sum of 2^i full blocks, or None

    def add(self, value: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale · value``."""
        if self.block is None:
            self.block = value.to(torch.float32, copy=True)
            if scale != 1.0:
                self.block.mul_(scale)
        else:
            self.block.add_(value, alpha=scale)
        self.in_block += 1
        if self.in_block == self.BLOCK:
            self._carry(self.block)
            self.block, self.in_block = None, 0

    def add_sum(self, other: PairwiseSum) -> None:
        """Add another running sum (a worker's or a node's partial) as one full block."""
        total = other.total()
        if total is not None:
            self._carry(total)

    def _carry(self, full: torch.Tensor) -> None:
        for level, held in enumerate(self.levels):
            if held is None:
                self.levels[level] = full
                return
            full = held.add_(full)
            self.levels[level] = None
        self.levels.append(full)

    def total(self) -> torch.Tensor | None:
        """The sum so far, as a new tensor (None when nothing was added)."""
        parts = [p for p in (self.received, self.block, *self.levels) if p is not None]
        if not parts:
            return None
        out = parts[0].clone()
        for part in parts[1:]:
            out.add_(part)
        return out


class WeightedMean:
    """Per-parameter weighted mean Σ_k n_k Δ_k / Σ_k n_k over the clients that sent that parameter.

    Sums are float32 :class:`PairwiseSum` (torch, in place, one pass per update); a partial crosses
    the wire as one float32 array per parameter. The engine merges partials in a fixed order (worker,
    then node), so a run does not depend on who finished first.
    """

    def __init__(self) -> None:
        self.partial: dict[str, PairwiseSum] = {}
        self.weights: dict[str, float] = {}
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        for key, value in update.delta.items():
            self.add_term(key, value, update.weight)
            self.weights[key] = self.weights.get(key, 0.0) + update.weight
        self.count += 1

    def add_term(self, key: str, value: np.ndarray | torch.Tensor, scale: float) -> None:
        """Add ``scale · value`` to the sum of ``key`` (the weights are the caller's to count)."""
        if key not in self.partial:
            self.partial[key] = PairwiseSum()
        self.partial[key].add(as_tensor(value), scale)

    def merge(self, other: WeightedMean) -> None:
        for key, value in other.partial.items():
            if key not in self.partial:
                self.partial[key] = PairwiseSum()
            self.partial[key].add_sum(value)
            self.weights[key] = self.weights.get(key, 0.0) + other.weights[key]
        self.count += other.count

    @property
    def sums(self) -> dict[str, np.ndarray]:
        """Σ_k n_k Δ_k per parameter, float32."""
        return {k: s.total().numpy() for k, s in self.partial.items()}

    def mean(self) -> Weights:
        return {k: s.total().div_(self.weights[k]).numpy() for k, s in self.partial.items()}

    def __getstate__(self) -> dict[str, Any]:
        """On the wire: one float32 array per parameter (zero-copy in Ray's object store)."""
        return {**self.__dict__, "partial": self.sums}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["partial"] = {k: PairwiseSum(received=as_tensor(v)) for k, v in state["partial"].items()}
        self.__dict__.update(state)


# ---------------------------------------------------------------------------------------------------
# What a client sees


def load_weights(model: torch.nn.Module, weights: Weights, state: dict[str, torch.Tensor] | None = None) -> None:
    """Copy ``weights`` into ``model`` in place, one tensor copy per entry (keys the model lacks are
    ignored, keys ``weights`` lacks keep their values; a shape mismatch raises). The arrays, often
    read-only views of Ray's object store, are only read. ``state``: the model's ``state_dict()``,
    when the caller holds it already."""
    state = model.state_dict() if state is None else state
    with torch.no_grad():
        for key, value in weights.items():
            target = state.get(key)
            if target is None:
                continue
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"weights {key}: shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}")
            target.copy_(as_tensor(value))


@dataclass
class ClientContext:
    """One simulated client, as the engine hands it to a method on a worker."""

    client_id: int
    round: int
    seed: int
    model: FedModel  # the worker's reusable module; its weights on entry are arbitrary
    shard: ClientShard
    tasks: dict[str, TaskSpec]
    train: ClientsConfig
    device: torch.device
    initial_weights: Weights  # the seeded initialisation, identical on the server and every worker
    state: dict[str, np.ndarray] | None = None
    # Simulated data poisoning (a label-flipping Byzantine client): applied to its training labels.
    label_transform: Callable[[TaskSpec, np.ndarray], np.ndarray] | None = None
    augment: str = "none"  # data.augment: none | medmnist (each modality's policy) | generic
    round_lr: float | None = None  # this round's local learning rate (clients.lr_schedule); None: clients.lr
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False)
    _tensors: dict[str, dict] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_train(self) -> int:
        return self.shard.num_train

    @functools.cached_property
    def trained_keys(self) -> list[str]:
        return self.model.state_keys(self.shard.datasets)

    @functools.cached_property
    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state tensors by name, looked up once per client (views of the parameters
        and buffers, so they follow training, which updates them in place)."""
        return self.model.state_dict()

    @property
    def lr(self) -> float:
        """The local learning rate of this round."""
        return self.round_lr if self.round_lr is not None else self.train.lr

    def rng(self) -> np.random.Generator:
        """This client's random stream for this round, seeded by (seed, round, client); one per context,
        so successive local epochs draw different batch orders."""
        if self._rng is None:
            self._rng = np.random.default_rng([self.seed, self.round, self.client_id])
        return self._rng

    def load(self, weights: Weights) -> None:
        load_weights(self.model, weights, self.model_state)

    def own_state(self, is_own: Callable[[str], bool]) -> Weights:
        """What this client keeps between rounds (FedPer's heads, FedMRG's specialised adapter): its
        saved state, or on first participation the seeded initial values of the keys ``is_own`` picks."""
        if self.state is not None:
            return self.state
        return {k: v for k, v in self.initial_weights.items() if is_own(k)}

    def read(self, keys: list[str]) -> Weights:
        state = self.model_state
        return {k: state[k].detach().cpu().numpy().copy() for k in keys}

    def delta_from(self, payload: Weights, keys: list[str] | None = None) -> Weights:
        """Local minus received weights, for the trained keys that came down in ``payload``: one
        torch subtraction per key on the client's device, handed over as numpy (no further copy on the CPU)."""
        state = self.model_state
        keys = [k for k in (keys or self.trained_keys) if k in payload]
        with torch.no_grad():
            return {k: torch.sub(state[k], as_tensor(payload[k]).to(state[k].device)).cpu().numpy() for k in keys}

    def tensors(self, split: str = "train") -> dict[str, tuple[ModelInput, torch.Tensor]]:
        """The client's (input, target) per dataset for ``split``, on the device; built once per context."""
        if split not in self._tensors:
            parts: dict[str, Split] = getattr(self.shard, split)
            poison = self.label_transform if split == "train" else None
            self._tensors[split] = {
                flag: self.tasks[flag].inputs(
                    np.array(part.images),
                    poison(self.tasks[flag], np.array(part.labels)) if poison else np.array(part.labels),
                    self.model.in_channels,
                    self.device,
                )
                for flag, part in parts.items()
                if len(part)
            }
        return self._tensors[split]

    def batches(self, split: str = "train", batch_size: int | None = None, shuffle: bool = True):
        """Yield (dataset, x, y) mini-batches over the client's data, one dataset per batch, in an
        order drawn from :meth:`rng` (a new order on every call, the same on every rerun). Shuffled
        training batches are augmented (``augment``) by each dataset's policy, from the same stream."""
        batch_size = batch_size or self.train.batch_size
        rng = self.rng()
        plan = []
        for flag, (_, y) in self.tensors(split).items():
            order = rng.permutation(len(y)) if shuffle else np.arange(len(y))
            plan += [(flag, order[i : i + batch_size]) for i in range(0, len(y), batch_size)]
        if shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        tensors = self.tensors(split)
        policies = {flag: self._augmentation(flag) for flag in tensors} if self.augment != "none" and split == "train" and shuffle else {}
        for flag, rows in plan:
            x, y = tensors[flag]
            index = torch.as_tensor(rows, device=self.device)
            x = take(x, index)
            if policies.get(flag) is not None:
                x = augment(x, policies[flag], rng)
            yield flag, x, y[index]

    def local_batches(self):
        """The round's training batches: ``clients.local_epochs`` passes of :meth:`batches`, or, with
        ``clients.local_steps`` K, the first K batches of successive passes (at most
        ``clients.max_local_epochs`` passes' worth)."""
        tensors = self.tensors("train")
        if self.train.local_steps is not None and not tensors:
            return iter(())  # no rows: endless passes would yield nothing forever
        steps = self.train.steps_per_round(sum(math.ceil(len(y) / self.train.batch_size) for _, y in tensors.values()))
        passes = itertools.repeat(None) if steps is not None else range(self.train.local_epochs)
        return itertools.islice(itertools.chain.from_iterable(self.batches() for _ in passes), steps)

    def _augmentation(self, flag: str) -> Policy | None:
        task = self.tasks[flag]
        return policy_for(flag, self.augment) if task.augmentable else None


def client_context(
    cfg: ExperimentConfig,
    client_id: int,
    round_: int,
    model: FedModel,
    shards: Any,
    device: torch.device,
    initial_weights: Weights,
    state: dict[str, np.ndarray] | None = None,
    label_transform: Callable[[TaskSpec, np.ndarray], np.ndarray] | None = None,
) -> ClientContext:
    """Client ``client_id`` of a run in round ``round_`` (−1: evaluation, no training), as the
    config sets it up: its shard (from a :class:`~raymed.data.shards.ShardSet`), its tasks (with its
    own class weights under ``task.class_weighting: balanced``), augmentation, this round's learning rate."""
    shard = shards.client(client_id)
    tasks = shards.tasks
    if cfg.task.class_weighting == "balanced":
        tasks = {flag: t.balanced(shard.train[flag].labels) if flag in shard.train else t for flag, t in tasks.items()}
    return ClientContext(
        client_id=client_id,
        round=round_,
        seed=cfg.seed,
        model=model,
        shard=shard,
        tasks=tasks,
        train=cfg.clients,
        device=device,
        initial_weights=initial_weights,
        state=state,
        label_transform=label_transform,
        augment=cfg.data.augment,
        round_lr=cfg.clients.lr_at(round_, cfg.rounds) if round_ >= 1 else None,
    )


def take(x: ModelInput, index: torch.Tensor) -> ModelInput:
    """Rows ``index`` of a model input (a tensor, or a tuple of them such as (images, questions))."""
    return tuple(part[index] for part in x) if isinstance(x, tuple) else x[index]


Objective = Callable[[str, ModelInput, torch.Tensor], torch.Tensor]  # (dataset, input, target) -> loss


def local_optimizer(params, cfg: ClientsConfig, lr: float) -> torch.optim.Optimizer:
    """A fresh local optimiser (``clients.optimizer``) over ``params`` at learning rate ``lr``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_sgd(
    ctx: ClientContext,
    penalty: Penalty | None = None,
    objective: Objective | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """``clients.local_epochs`` epochs (or ``clients.local_steps`` steps) of mini-batch SGD (or AdamW,
    ``clients.optimizer``) on the client's data, over ``ctx.trained_keys``.

    ``penalty`` (optional) maps the trained parameters (by name) to an extra loss term, e.g.
    FedProx's proximal term. ``objective`` (optional) replaces the task loss of the model's output
    with a loss of the batch, for methods whose loss reads activations (OmniFM's SPAlign).
    ``optimizer`` (optional) is one built over ``trained_parameters(ctx)`` by the caller, who keeps its
    state (centralised training); by default a fresh one per round. Returns the mean training loss.
    """
    if objective is None:
        objective = lambda flag, x, y: ctx.tasks[flag].loss(ctx.model(x, flag), y)  # noqa: E731
    model, cfg = ctx.model, ctx.train
    model.train()
    params = trained_parameters(ctx)
    optimizer = optimizer or local_optimizer(params.values(), cfg, ctx.lr)
    total, steps = torch.zeros((), device=ctx.device), 0
    for flag, x, y in ctx.local_batches():
        loss = objective(flag, x, y)
        if penalty is not None:
            loss = loss + penalty(params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    return {"train_loss": float(total) / max(steps, 1)}


def trained_parameters(ctx: ClientContext) -> dict[str, torch.nn.Parameter]:
    """The model's parameters this client trains, by name, in the model's order."""
    trained = set(ctx.trained_keys)
    return {name: p for name, p in ctx.model.named_parameters() if name in trained}


# ---------------------------------------------------------------------------------------------------
# The interface


class Method(ABC):
    """Base class of every federated method. Subclasses set ``name`` and, if they have any, ``Params``."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    mixes_dimensions: ClassVar[bool] = False  # True: the model has an encoder per input kind (2D and 3D together)
    uses_server_model: ClassVar[bool] = False  # True: the server trains a model of its own (DeepSpeed ranks)
    # True: a client's personalised model reads state it keeps between rounds (FedPer's heads), so a
    # client never sampled yet has only the seeded initial values: evaluation leaves it out and counts it.
    personal_state: ClassVar[bool] = False

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """Settings the method decides (centralised training: one client holding every row); the
        returned config is the one validated, run and saved."""
        return cfg

    def check_config(self, cfg: ExperimentConfig) -> None:
        """Refuse (ConfigError, one line) an experiment this method cannot run; called on validation."""

    def check_model(self, cfg: ExperimentConfig, model: torch.nn.Module) -> None:
        """Refuse (ConfigError, one line) a layout this method cannot hold, once its model exists (the
        server calls it before any client trains)."""

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> FedModel:
        """The model this method trains (the same seed gives the same weights in every process): a
        classifier/regressor with a head per dataset, or the model a run task builds for its kind of
        dataset (:func:`raymed.tasks.build_task_model`); methods that add modules around the backbone
        (OmniFM, FedMRG) override it."""
        return build_task_model(cfg, tasks, seed)

    def prepare(self, cfg: ExperimentConfig, shard_dir: str) -> ExperimentConfig:
        """Build what the run needs once, before any actor starts (FedKIM: the central model's
        tokenizer and language model); returns the resolved config that is saved with the results."""
        return cfg

    def build_server_model(self, cfg: ExperimentConfig, shards: Any) -> torch.nn.Module:
        """The model the server's DeepSpeed ranks hold: the run task's generator, or a method's own."""
        return self.build_model(cfg.model, shards.tasks, cfg.seed)

    # ---- server half

    def init_state(self, initial_weights: Weights) -> ServerState:
        """The server's state before round 1, from the seeded initial model weights."""
        return ServerState(weights=dict(initial_weights))

    def broadcast(self, state: ServerState) -> Weights:
        """What every sampled client receives this round (put in the object store once)."""
        return state.weights

    def new_accumulator(self) -> WeightedMean:
        return WeightedMean()

    @abstractmethod
    def aggregate(self, state: ServerState, accumulator: WeightedMean) -> ServerState:
        """The next server state from this round's merged client updates."""

    def eval_weights(self, state: ServerState) -> Weights | None:
        """Weights of the global model to test on each dataset's test split (None: there is none)."""
        return state.weights

    def server_update(self, state: ServerState, server: Any, round_: int) -> ServerState:
        """After aggregation, for methods with a server model (``server`` is the engine's
        :class:`~raymed.engine.server_model.ServerModelGroup`): e.g. FedKIM's injection and central training."""
        return state

    def round_metrics(self, state: ServerState, records: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics the method adds to a round's row, from the new state and the round's per-client
        records (which carry each update's ``metrics``): e.g. DP-FedAvg's privacy spent."""
        return {}

    def evaluate_server_model(self, server: Any) -> dict[str, float]:
        """Metrics of the server's own model, when the method has one (FedKIM's central model)."""
        return {}

    # ---- client half

    @abstractmethod
    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        """Local training of one client from ``payload``; returns what it sends and what it keeps."""

    def client_updates(self, ctxs: list[ClientContext], payload: Weights) -> list[ClientUpdate]:
        """Several clients at once (``engine.vectorise``); methods with a vectorised form override it
        (see :mod:`raymed.methods.vectorised`), the others train their clients one after another."""
        return [self.client_update(ctx, payload) for ctx in ctxs]

    def load_personalised(self, ctx: ClientContext, payload: Weights) -> None:
        """Put this client's personalised model into ``ctx.model`` (evaluated on its held-out split)."""
        ctx.load(payload)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
