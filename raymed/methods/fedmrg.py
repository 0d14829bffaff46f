"""FedMRG — "Federated Medical Report Generation" (IEEE TMI 2025), https://arxiv.org/abs/2506.17562

The report model (:mod:`raymed.tasks.report.model`) is an image encoder whose spatial tokens form a visual
prefix for a causal LM decoder, followed by a diagnosis-driven prompt. The decoder carries two LoRA
adapters: a generic one G, federated, and a specialised one S, which never leaves its client.

Client k, round t (global weights w_t: encoder, prefix projection, diagnosis head, contrastive
head, G = B·A; class prototypes P from the server; S_k its own, LoRA's zero-initialised B making a
new S a no-op):

    ŷ = argmax diagnosis(f(x))          the prompt "diagnosis ŷ ." follows the visual prefix
    L = CE(report | G+S) + CE(report | G) + β·KL(p_{G+S} ‖ p_G)         mutual boosting of the adapters
      + CE(diagnosis(f(x)), y)                                           trains the prompt's source
      + λ_c·(L_glob + L_loc)                                             client-aware contrastive encoder
    L_glob = −log softmax_c(z·P̂_c/τ)[y]       z = normalise(contrast(f(x))); P̂ = normalised prototypes
    L_loc  = SupCon over the client's batch (positives: same diagnosis), the client's own structure

    after E epochs, send every update as low-rank factors (truncated SVD at rank r_c):
      ΔW ≈ U_k V_kᵀ   for each 2-D weight (convolutions as out × in·k·k) whose factors are smaller,
      Δ(B A) ≈ U_k V_kᵀ for G (the update of the adapter's product, not of its factors),
      dense for the rest (biases, tiny matrices); plus per-class sums and counts of z (prototypes).
    keep S_k.

Server:
    w_{t+1} = w_t + η_s Σ_k n_k U_k V_kᵀ / Σ_k n_k                         (dense weights)
    B' A'   = truncated SVD at the LoRA rank r of  B A + η_s Σ_k n_k U_k V_kᵀ / Σ_k n_k
              (B' = U_r √Σ_r, A' = √Σ_r V_rᵀ; averaging B and A separately is biased, since
               mean(B_k)·mean(A_k) ≠ mean(B_k A_k))
    P_c     = Σ_k Σ_{i∈k, y_i=c} z_i / Σ_k |{i∈k: y_i = c}|              (classes nobody saw keep theirs)

The global model (G alone) is evaluated on the test split by the server's DeepSpeed ranks; each
client's personalised model (G+S_k) on its held-out rows. ``use_contrastive``, ``use_prompts`` and
``use_specialised`` switch the components off for ablations.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymed.config import ExperimentConfig, ModelConfig
from raymed.data.tasks import TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import ClientContext, ClientUpdate, Method, ServerState, WeightedMean, Weights, local_sgd, register_method
from raymed.methods.fedavg import FedAvgParams, client_weight
from raymed.tasks.report.model import ReportModel, build_report_model

GENERIC, SPECIALISED = "generic", "specialised"
PROTOTYPES = "fedmrg.prototypes"  # broadcast beside the weights; not a model parameter


class FedMRGParams(FedAvgParams):
    comm_rank: int = Field(4, ge=1, description="r_c, rank of the factorised updates clients send")
    use_contrastive: bool = True
    use_prompts: bool = True
    use_specialised: bool = True
    contrast_weight: float = Field(0.1, ge=0, description="λ_c")
    contrast_dim: int = Field(64, ge=2)
    temperature: float = Field(0.1, gt=0, description="τ")
    kl_weight: float = Field(1.0, ge=0, description="β, the KL term of mutual boosting")


# ---------------------------------------------------------------------------------------------------
# Low-rank factors


def factorise(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """U, V with U Vᵀ the best rank-``rank`` approximation of ``matrix`` (truncated SVD; U carries Σ)."""
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    r = min(rank, len(s))
    return (u[:, :r] * s[:r]).astype(np.float32), vt[:r].T.astype(np.float32)


def refactorise(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """LoRA factors (B, A) of rank ``rank`` with B A the best rank-``rank`` approximation of ``matrix``."""
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    b, a = u[:, :rank] * root, root[:, None] * vt[:rank]
    if len(s) < rank:  # keep the adapter's shape
        b = np.pad(b, ((0, 0), (0, rank - len(s))))
        a = np.pad(a, ((0, rank - len(s)), (0, 0)))
    return b.astype(np.float32), a.astype(np.float32)


def lora_pairs(keys) -> dict[str, tuple[str, str]]:
    """The generic adapter's (B key, A key) per adapted layer, by the name of their product."""
    return {
        k.replace(f".lora_A.{GENERIC}.", f".lora_BA.{GENERIC}."): (k.replace(".lora_A.", ".lora_B."), k)
        for k in keys
        if f".lora_A.{GENERIC}." in k
    }


def worth_factorising(shape: tuple[int, ...], rank: int) -> bool:
    rows, cols = shape[0], int(np.prod(shape[1:]))
    return len(shape) >= 2 and rank * (rows + cols) < rows * cols


def expand(delta: Weights) -> Weights:
    """Factored entries (``key@U``, ``key@V``) back to dense 2-D updates; others as they are."""
    out = {k: v for k, v in delta.items() if "@" not in k}
    for key in {k.rsplit("@", 1)[0] for k in delta if "@" in k}:
        out[key] = delta[f"{key}@U"] @ delta[f"{key}@V"].T
    return out


class FactorisedMean(WeightedMean):
    """Σ_k n_k U_k V_kᵀ / Σ_k n_k (the products, never the factors, are averaged), plus prototype sums."""

    def __init__(self) -> None:
        super().__init__()
        self.proto_sum: np.ndarray | None = None
        self.proto_count: np.ndarray | None = None

    def add(self, update: ClientUpdate) -> None:
        super().add(replace(update, delta=expand(update.delta)))
        if "proto_sum" in update.uploads:
            self._add_prototypes(update.uploads["proto_sum"], update.uploads["proto_count"])

    def merge(self, other: FactorisedMean) -> None:
        super().merge(other)
        if other.proto_sum is not None:
            self._add_prototypes(other.proto_sum, other.proto_count)

    def _add_prototypes(self, sums: np.ndarray, counts: np.ndarray) -> None:
        if self.proto_sum is None:
            self.proto_sum, self.proto_count = sums.astype(np.float64), counts.astype(np.float64)
        else:
            self.proto_sum, self.proto_count = self.proto_sum + sums, self.proto_count + counts


# ---------------------------------------------------------------------------------------------------
# Losses


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) within a batch: pull same-diagnosis embeddings together."""
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    has = positives.any(1)
    if not has.any():
        return z.sum() * 0.0
    mean_pos = log_prob.masked_fill(~positives, 0.0).sum(1)[has] / positives.sum(1)[has]
    return -mean_pos.mean()


def token_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over non-padding tokens; the teacher is not trained by it."""
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher.detach(), -1), log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------------
# The method


@register_method
class FedMRG(Method):
    name = "fedmrg"
    Params = FedMRGParams
    personal_state = True

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.data.task != "report":
            raise ConfigError("strategy fedmrg generates reports: set data.task=report (datasets pneumoniamnist or r2gen)")
        if cfg.model.decoder.lora_rank < 1:
            raise ConfigError("strategy fedmrg trains decoder adapters: set model.decoder.lora_rank >= 1")

    @property
    def adapters(self) -> tuple[str, ...]:
        return (GENERIC, SPECIALISED) if self.params.use_specialised else (GENERIC,)

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> ReportModel:
        model = build_report_model(cfg, tasks, seed, prompts=self.params.use_prompts, adapters=self.adapters)
        if self.params.use_contrastive:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                model.contrast = nn.Linear(model.backbone.feature_dim, self.params.contrast_dim)
        return model

    @staticmethod
    def is_personal(key: str) -> bool:
        return f".{SPECIALISED}." in key

    # ---- server half

    def init_state(self, initial_weights: Weights) -> ServerState:
        return ServerState(weights={k: v for k, v in initial_weights.items() if not self.is_personal(k)})

    def broadcast(self, state: ServerState) -> Weights:
        prototypes = state.extra.get("prototypes")
        return {**state.weights, PROTOTYPES: prototypes} if prototypes is not None else state.weights

    def new_accumulator(self) -> FactorisedMean:
        return FactorisedMean()

    def aggregate(self, state: ServerState, accumulator: FactorisedMean) -> ServerState:
        weights, eta = dict(state.weights), self.params.server_lr
        pairs = lora_pairs(weights)
        for key, mean in accumulator.mean().items():
            if key in pairs:
                b_key, a_key = pairs[key]
                product = weights[b_key].astype(np.float64) @ weights[a_key] + eta * mean
                weights[b_key], weights[a_key] = refactorise(product, weights[a_key].shape[0])
            else:
                weights[key] = weights[key] + eta * mean.reshape(weights[key].shape)
        extra = dict(state.extra)
        if accumulator.proto_sum is not None:
            seen = accumulator.proto_count > 0
            prototypes = np.array(extra.get("prototypes", np.zeros_like(accumulator.proto_sum, dtype=np.float32)))
            prototypes[seen] = accumulator.proto_sum[seen] / accumulator.proto_count[seen, None]
            extra["prototypes"] = prototypes.astype(np.float32)
        return ServerState(weights=weights, round=state.round, extra=extra)

    # ---- client half

    def load_personalised(self, ctx: ClientContext, payload: Weights) -> None:
        ctx.load(payload)
        ctx.load(ctx.own_state(self.is_personal))
        ctx.model.use_adapters(self.adapters)

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        self.load_personalised(ctx, payload)
        model, p = ctx.model, self.params
        prototypes = payload.get(PROTOTYPES)
        prototypes = F.normalize(torch.as_tensor(np.array(prototypes), device=ctx.device), dim=1) if prototypes is not None else None

        def objective(flag: str, x, y: torch.Tensor) -> torch.Tensor:
            task = ctx.tasks[flag]
            out = model.run(x)  # G+S (G alone without the specialised adapter)
            loss = task.loss(out.logits, y)
            if p.use_specialised:
                with model.adapters_active((GENERIC,)):
                    generic = model.run(x)
                mask = (y[:, 3:] != task.pad_id).float()
                loss = loss + task.loss(generic.logits, y) + p.kl_weight * token_kl(generic.logits, out.logits, mask)
            diagnosis = y[:, 0]
            if out.diagnosis is not None:
                loss = loss + F.cross_entropy(out.diagnosis, diagnosis)
            if p.use_contrastive:
                z = F.normalize(model.contrast(out.features), dim=1)
                contrast = supervised_contrastive(z, diagnosis, p.temperature)
                if prototypes is not None:
                    contrast = contrast + F.cross_entropy(z @ prototypes.T / p.temperature, diagnosis)
                loss = loss + p.contrast_weight * contrast
            return loss

        metrics = local_sgd(ctx, objective=objective)
        trained = ctx.read(ctx.trained_keys)
        uploads = self._prototype_sums(ctx) if p.use_contrastive else {}
        return ClientUpdate(
            delta=self._factorised_delta(trained, payload),
            weight=client_weight(self.params, ctx),
            metrics=metrics,
            state={k: v for k, v in trained.items() if self.is_personal(k)},
            uploads=uploads,
        )

    def _factorised_delta(self, trained: Weights, payload: Weights) -> Weights:
        """What goes up: rank-r_c factors of each update worth factorising, dense otherwise."""
        rank, out = self.params.comm_rank, {}
        pairs = lora_pairs(trained)
        in_pairs = {k for b, a in pairs.values() for k in (b, a)}
        for key, (b_key, a_key) in pairs.items():
            change = trained[b_key] @ trained[a_key] - payload[b_key] @ payload[a_key]
            out[f"{key}@U"], out[f"{key}@V"] = factorise(change, rank)
        for key, value in trained.items():
            if key in in_pairs or self.is_personal(key) or key not in payload:
                continue
            change = value - payload[key]
            if worth_factorising(change.shape, rank):
                out[f"{key}@U"], out[f"{key}@V"] = factorise(change.reshape(change.shape[0], -1), rank)
            else:
                out[key] = change
        return out

    @torch.no_grad()
    def _prototype_sums(self, ctx: ClientContext) -> Weights:
        """Per-diagnosis sums and counts of the client's contrastive embeddings (after training)."""
        model = ctx.model
        model.eval()
        (task,) = ctx.tasks.values()
        sums = torch.zeros(task.num_classes, self.params.contrast_dim, dtype=torch.float64, device=ctx.device)
        counts = torch.zeros(task.num_classes, dtype=torch.float64, device=ctx.device)
        for _, x, y in ctx.batches(shuffle=False):
            z = F.normalize(model.contrast(model.backbone(x[0])), dim=1).double()
            sums.index_add_(0, y[:, 0], z)
            counts.index_add_(0, y[:, 0], torch.ones_like(y[:, 0], dtype=torch.float64))
        return {"proto_sum": sums.cpu().numpy(), "proto_count": counts.cpu().numpy()}
