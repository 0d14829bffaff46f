"""OmniFM — spectral knowledge retrieval, cross-attention fusion and prefix-suffix prompting for
federations whose clients hold different imaging modalities and tasks. CVPR 2026,
https://arxiv.org/abs/2603.21660 (no public code: every value the paper leaves open is a parameter
of :class:`OmniFMParams`, with the default documented there).

Client k, image x, the backbone's feature map m = body(x), unmodified and whole: its spatial tokens
r = lift(m) ∈ R^{N×d} and its own feature vector g = lift_g(pool(m)) ∈ R^d (the vector every other
method's head reads, so OmniFM holds the same backbone as they do and every parameter of it trains):

    spectral token   s = normalise(pool(proj(FreqMix(log1p|fftshift(FFT2(x))| ⊙ 1[|ω| ≤ ρ·ω_max]))))
                     ‖s‖ = 1, and s is invariant to circular shifts of x (it sees only |FFT|)
    GSKR retrieval   S_g = top-k_{b ∈ B} cos(s, b)       B: the server's knowledge base (a round snapshot)
    ECA              K = [s ; S_g],  Z = softmax((r W_q)(K W_k)ᵀ / √d) (K W_v)    queries r, keys/values K
    PSP              h = Encoder([Z ‖ r ‖ g ‖ c]),  features = LN(h_c)  c: the client's private CLS token
    loss             L = L_task(head(features), y) + λ · ‖s − mean(S_g)‖²        (SPAlign)

The query token s is itself among ECA's keys and values (our choice where the paper is silent):
retrieval is a hard top-k, which passes no gradient, so with S_g alone the task loss would never
reach the spectral tokenizer and SPAlign, its only signal, is minimised by mapping every image to
one constant token. With s in K the task loss trains the tokenizer and retrieval stays the paper's
hard top-k, in training and at inference alike.

    client sends:    Δ of the shared parameters (everything but c and the task heads, as FedPer),
                     summaries of its spectral tokens — k-means centroids per dataset (modality),
                     never images — and how often it retrieved each knowledge-base entry
    server:          w_{t+1} = w_t + η_s Σ n_k Δ_k / Σ n_k                   (FedAvg on shared parts)
                     B ← prune_M(B ∪ centroids): at most M entries; while over capacity, the modality
                     holding the most entries loses its least-retrieved one (retrievals are an
                     exponential moving average; an entry joins at its modality's mean, ties go
                     to the oldest), so no modality crowds the others out.

As FedPer, there is no global model (c and the heads are private): OmniFM is evaluated through each
client's personalised model. The heads are those of every other method, so the same mechanism serves
classification, super-resolution and VQA. Ablations: ``use_gskr=false`` (no knowledge base: the
image's own spectral token s is ECA's only key, and SPAlign vanishes), ``use_eca=false`` (no Z in the
sequence, so s reaches nothing but SPAlign), ``use_psp_suffix=false`` (no private c: the features are the mean of the encoder's
outputs), ``lam=0`` (no SPAlign).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.cluster import KMeans
from torch import nn

from raymed.config import ExperimentConfig, ModelConfig
from raymed.data.tasks import ModelInput, TaskSpec
from raymed.errors import ConfigError
from raymed.methods.base import ClientContext, ClientUpdate, Method, ServerState, WeightedMean, Weights, local_sgd, register_method
from raymed.methods.fedavg import apply_mean_update
from raymed.methods.fedper import FedPer, FedPerParams
from raymed.models import Backbone, FedModel, build_backbone, images_of, reads_map
from raymed.checkpointable import checkpointable

BANK_KEY = "gskr.bank"  # the knowledge-base snapshot in the broadcast
HITS_KEY = "gskr.hits"  # a client's retrieval counts per snapshot entry
CENTROIDS_PREFIX = "gskr.centroids."  # + dataset flag: a client's spectral summaries of that modality


class OmniFMParams(FedPerParams):
    personal_layers: list[str] = Field(
        default_factory=lambda: ["heads.", "psp.cls"], description="never aggregated: the task heads and the private CLS token c"
    )
    lam: float = Field(0.1, ge=0, description="λ, weight of SPAlign ‖s − mean(S_g)‖²")
    top_k: int = Field(4, ge=1, description="k, prototypes retrieved per image")
    rho: float = Field(0.5, gt=0, le=1, description="ρ, low-pass radius as a fraction of the Nyquist radius")
    bank_size: int = Field(128, ge=1, description="M, capacity of the global spectral knowledge base")
    summary_k: int = Field(4, ge=1, description="k-means centroids a client uploads per dataset per round")
    token_dim: int = Field(64, ge=4, description="dimension of the spectral token s")
    width: int = Field(128, ge=8, description="width d of ECA and the PSP encoder (the heads read d features)")
    num_heads: int = Field(4, ge=1, description="attention heads of ECA and PSP")
    hit_decay: float = Field(0.9, ge=0, lt=1, description="per-round decay of the retrieval counts used for pruning")
    use_gskr: bool = True
    use_eca: bool = True
    use_psp_suffix: bool = True


# ---------------------------------------------------------------------------------------------------
# Client-side modules


class SpectralToken(nn.Module):
    """s: log-magnitude spectrum (centred), circular low-pass, FreqMix, projection, pooling, L2 norm."""

    def __init__(self, image_size: int, rho: float, dim: int):
        super().__init__()
        centre = image_size // 2  # fftshift puts frequency 0 here
        offset = torch.arange(image_size) - centre
        disk = offset[:, None] ** 2 + offset[None, :] ** 2 <= (rho * image_size / 2) ** 2
        keep = torch.nonzero(disk.any(dim=1)).flatten()  # the disk's bounding box: the cropped spectrum
        self.crop = slice(int(keep[0]), int(keep[-1]) + 1)
        size = len(keep)
        self.register_buffer("disk", disk[self.crop, self.crop].float(), persistent=False)  # fixed, never sent
        self.norm = nn.LayerNorm([size, size])
        self.mix_columns = nn.Linear(size, size)  # FreqMix: mixing along each frequency row ...
        self.mix_rows = nn.Linear(size, size)  # ... and along each frequency column
        self.proj = nn.Linear(size, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        luminance = images.mean(dim=1)
        spectrum = torch.fft.fftshift(torch.fft.fft2(luminance).abs(), dim=(-2, -1))
        h = self.norm(torch.log1p(spectrum[:, self.crop, self.crop]) * self.disk)
        h = h + F.gelu(self.mix_columns(h))
        h = h + F.gelu(self.mix_rows(h.transpose(1, 2))).transpose(1, 2)
        return F.normalize(self.proj(h).mean(dim=1), dim=-1)  # one token per frequency row, mean-pooled


def retrieve(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B×k) of the k bank entries of highest cosine similarity to each query."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T
    return sims.topk(min(k, len(bank)), dim=1).indices


class Encoding(NamedTuple):
    features: torch.Tensor  # B×d, what the heads read
    feature_map: torch.Tensor  # B×d×g×g, the encoder's outputs at the spatial tokens (what a decoding head reads)
    token: torch.Tensor  # s, B×d_s
    prototypes: torch.Tensor | None  # S_g, B×k×d_s, or None when nothing is retrieved
    retrieved: torch.Tensor | None  # bank indices B×k, or None


class PromptEncoder(nn.Module):
    """PSP: one pre-norm transformer layer over [Z ‖ r ‖ c]; ``cls`` is c, private to each client."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.block = nn.TransformerEncoderLayer(width, num_heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)


class OmniFMModel(FedModel):
    def __init__(self, backbone: Backbone, tasks: dict[str, TaskSpec], in_channels: int, p: OmniFMParams):
        image_size = max(t.image_size for t in tasks.values())
        super().__init__(backbone, p.width, tasks, in_channels, map_channels=p.width)
        self.p = p
        self.spectral = SpectralToken(image_size, p.rho, p.token_dim)
        self.lift = nn.Linear(backbone.token_dim, p.width)
        self.lift_pooled = nn.Linear(backbone.feature_dim, p.width)  # g: the backbone's own feature vector
        self.eca = nn.MultiheadAttention(p.width, p.num_heads, kdim=p.token_dim, vdim=p.token_dim, batch_first=True)
        self.psp = PromptEncoder(p.width, p.num_heads)
        self.bank: torch.Tensor | None = None  # the round's knowledge-base snapshot (not a parameter)

    def set_bank(self, bank: np.ndarray | None) -> None:
        device = self.lift.weight.device
        self.bank = torch.as_tensor(bank, device=device) if bank is not None and len(bank) else None

    def encode(self, x: ModelInput) -> Encoding:
        images = images_of(x)
        token = self.spectral(images)
        feature_map = self.backbone.body(images)
        r = self.lift(feature_map.flatten(2).transpose(1, 2))
        g = self.lift_pooled(self.backbone.pool(feature_map)).unsqueeze(1)
        keys = token.unsqueeze(1)  # s itself: the task loss's path to the spectral tokenizer
        retrieved = prototypes = None
        if self.p.use_gskr and self.bank is not None:
            retrieved = retrieve(token.detach(), self.bank, self.p.top_k)
            prototypes = self.bank[retrieved]
            keys = torch.cat([keys, prototypes], dim=1)
        sequence = [r, g]
        if self.p.use_eca:
            z, _ = self.eca(r, keys, keys, need_weights=False)
            sequence.insert(0, z)
        if self.p.use_psp_suffix:
            sequence.append(self.psp.cls.expand(len(r), -1, -1))
        h = self.psp.block(torch.cat(sequence, dim=1))
        features = self.psp.norm(h[:, -1] if self.p.use_psp_suffix else h.mean(dim=1))
        start = r.shape[1] if self.p.use_eca else 0  # [Z ‖ r ‖ g ‖ c]: r follows Z's N tokens
        spatial = h[:, start : start + r.shape[1]].transpose(1, 2).reshape(len(h), -1, *feature_map.shape[2:])
        return Encoding(features, spatial, token, prototypes, retrieved)

    def features(self, x: ModelInput) -> torch.Tensor:
        return self.encode(x).features

    def feature_map(self, x: ModelInput) -> torch.Tensor:
        return self.encode(x).feature_map


# ---------------------------------------------------------------------------------------------------
# Server side: the global spectral knowledge base


@checkpointable
@dataclass
class SpectralKnowledgeBase:
    """GSKR's bank B: at most ``capacity`` unit vectors, each tagged with its modality."""

    capacity: int
    dim: int
    hit_decay: float = 0.9
    vectors: np.ndarray = field(default=None)  # type: ignore[assignment]
    modality: list[str] = field(default_factory=list)
    hits: np.ndarray = field(default_factory=lambda: np.zeros(0))
    added: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.vectors is None:
            self.vectors = np.zeros((0, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def counts(self) -> Counter:
        return Counter(self.modality)

    def record_hits(self, retrievals: np.ndarray) -> None:
        """Fold one round's retrieval counts (aligned with the snapshot clients retrieved from) in."""
        self.hits = self.hit_decay * self.hits + retrievals[: len(self)]

    def insert(self, vectors: np.ndarray, modalities: list[str], round_: int) -> None:
        """Add unit-normalised ``vectors`` of ``modalities``, then prune back to capacity."""
        if not len(vectors):
            return
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        prior = {m: float(np.mean([h for h, mm in zip(self.hits, self.modality) if mm == m] or [0.0])) for m in set(modalities)}
        self.vectors = np.concatenate([self.vectors, vectors.astype(np.float32)])
        self.modality = self.modality + list(modalities)
        self.hits = np.concatenate([self.hits, [prior[m] for m in modalities]])
        self.added = np.concatenate([self.added, np.full(len(vectors), round_, dtype=np.int64)])
        self._prune()

    def _prune(self) -> None:
        drop: set[int] = set()
        counts = self.counts()
        while len(self) - len(drop) > self.capacity:
            crowded = max(counts, key=lambda m: (counts[m], m))  # the modality with most entries (ties by name)
            members = [i for i, m in enumerate(self.modality) if m == crowded and i not in drop]
            drop.add(min(members, key=lambda i: (self.hits[i], self.added[i], i)))  # least retrieved, then oldest
            counts[crowded] -= 1
        keep = [i for i in range(len(self)) if i not in drop]
        self.vectors, self.hits, self.added = self.vectors[keep], self.hits[keep], self.added[keep]
        self.modality = [self.modality[i] for i in keep]


class GSKRAccumulator(WeightedMean):
    """FedAvg's weighted mean of the shared parameters, plus the round's spectral summaries and retrievals."""

    def __init__(self) -> None:
        super().__init__()
        self.summaries: list[tuple[str, np.ndarray]] = []
        self.hits: np.ndarray | None = None

    def add(self, update: ClientUpdate) -> None:
        super().add(update)
        for key, value in update.uploads.items():
            if key.startswith(CENTROIDS_PREFIX):
                self.summaries.append((key.removeprefix(CENTROIDS_PREFIX), value))
            elif key == HITS_KEY:
                self._add_hits(value)

    def merge(self, other: GSKRAccumulator) -> None:
        super().merge(other)
        self.summaries += other.summaries
        if other.hits is not None:
            self._add_hits(other.hits)

    def _add_hits(self, hits: np.ndarray) -> None:
        self.hits = hits.astype(np.float64) if self.hits is None else self.hits + hits


# ---------------------------------------------------------------------------------------------------
# The method


@register_method
class OmniFM(FedPer):
    name = "omnifm"
    Params = OmniFMParams

    def check_config(self, cfg: ExperimentConfig) -> None:
        if any(flag.endswith("3d") for flag in cfg.data.datasets):
            raise ConfigError("strategy omnifm: the spectral token is a 2D FFT; use 2D datasets (no *3d flags)")
        if cfg.data.task == "report":
            raise ConfigError("strategy omnifm: report generation is FedMRG's task here; use strategy.name=fedmrg, fedavg or fedprox")
        if self.params.width % self.params.num_heads:
            raise ConfigError(f"strategy.width={self.params.width} must be divisible by strategy.num_heads={self.params.num_heads}")

    def build_model(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int) -> OmniFMModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            body, in_channels = build_backbone(cfg.name, tasks)
            return OmniFMModel(body, tasks, in_channels, self.params)

    # ---- server half

    def init_state(self, initial_weights: Weights) -> ServerState:
        state = super().init_state(initial_weights)
        state.extra["gskr"] = SpectralKnowledgeBase(self.params.bank_size, self.params.token_dim, self.params.hit_decay)
        return state

    def broadcast(self, state: ServerState) -> Weights:
        if not self.params.use_gskr:
            return state.weights
        return {**state.weights, BANK_KEY: state.extra["gskr"].vectors}

    def new_accumulator(self) -> GSKRAccumulator:
        return GSKRAccumulator()

    def aggregate(self, state: ServerState, accumulator: GSKRAccumulator) -> ServerState:
        new = apply_mean_update(state, accumulator, self.params.server_lr)
        bank: SpectralKnowledgeBase = new.extra["gskr"]
        if self.params.use_gskr:
            if accumulator.hits is not None and len(accumulator.hits) == len(bank):
                bank.record_hits(accumulator.hits)
            summaries = sorted(accumulator.summaries, key=lambda s: (s[0], s[1].tobytes()))  # independent of worker order
            if summaries:
                bank.insert(np.concatenate([v for _, v in summaries]), [m for m, v in summaries for _ in v], state.round + 1)
        return new

    # ---- client half

    def load_personalised(self, ctx: ClientContext, payload: Weights) -> None:
        super().load_personalised(ctx, payload)
        ctx.model.set_bank(payload.get(BANK_KEY))

    def client_update(self, ctx: ClientContext, payload: Weights) -> ClientUpdate:
        self.load_personalised(ctx, payload)
        model: OmniFMModel = ctx.model
        bank_size = 0 if model.bank is None else len(model.bank)
        hits = torch.zeros(bank_size, device=ctx.device)
        lam = self.params.lam

        def objective(flag: str, x: ModelInput, y: torch.Tensor) -> torch.Tensor:
            enc = model.encode(x)
            loss = ctx.tasks[flag].loss(model.head(flag)(enc.feature_map if reads_map(model.head(flag)) else enc.features, x), y)
            if enc.prototypes is not None:
                hits.add_(torch.bincount(enc.retrieved.flatten(), minlength=bank_size))
                if lam > 0:  # SPAlign: pull s towards the prototypes it retrieved
                    loss = loss + lam * (enc.token - enc.prototypes.mean(dim=1)).pow(2).sum(dim=1).mean()
            return loss

        metrics = local_sgd(ctx, objective=objective)
        update = self._update(ctx, payload, ctx.read(ctx.trained_keys), metrics)
        if self.params.use_gskr:
            update.uploads = {**self.summarise(ctx), HITS_KEY: hits.cpu().numpy().astype(np.float32)}
        return update

    client_updates = Method.client_updates  # no vectorised form (FedPer has one): one client at a time

    @torch.no_grad()
    def summarise(self, ctx: ClientContext) -> Weights:
        """k-means centroids of the client's spectral tokens, per dataset: all that leaves about its images."""
        model: OmniFMModel = ctx.model
        model.eval()
        out: Weights = {}
        for flag, (x, _) in ctx.tensors("train").items():
            images = images_of(x)
            tokens = torch.cat([model.spectral(images[i : i + 512]) for i in range(0, len(images), 512)]).cpu().numpy()
            k = min(self.params.summary_k, len(tokens))
            seed = int(np.random.default_rng([ctx.seed, ctx.round, ctx.client_id]).integers(2**31))
            centroids = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(tokens.astype(np.float64)).cluster_centers_
            out[CENTROIDS_PREFIX + flag] = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
        return out
