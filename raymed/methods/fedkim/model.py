"""FedKIM's two models: the clients' lightweight local model, and the server's central model whose
language model takes the federation's knowledge through a multi-task multi-modal mixture of experts
(M3OE). The method itself is :mod:`raymed.methods.fedkim`.

Local model (clients): a lightweight encoder per input kind (``image``: 2D, gray images repeated to
RGB; ``volume``: 3D) and a head per dataset; parameters ``encoders.<kind>.*`` and ``heads.<flag>.*``.

Central model (the server's DeepSpeed ranks)::

    tokens_x = project_kind(pool_P(encoder_kind(x)))                 P modality tokens in the LM's width
    input    = [tokens_x ‖ E(question) ‖ E(<bos> answer)]            cross-entropy on the answer tokens
    gate     g = softmax(W_g · mean_i Attn(q=E(modality description), k=v=E(task description))_i)
                 (single-head cross-attention; E = the LM's frozen input embeddings; top-k optional)
    layer    y = W0 x + Σ_e g_e · (α/r) · B_e A_e x                   every adapted linear of the LM

The encoders have the local model's names and seeded initial values, so injecting the federation's
encoders is a load by key. The language model (``model.decoder``: a local checkpoint, which FedKIM
prepares once per run) is frozen; the encoders, projections, gate and experts train.

The experts are written here rather than taken from ``peft``: peft's LoRA variants weight adapters
per layer or per token from hidden states (X-LoRA), not per sample from a gate outside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raymed.config import ModelConfig
from raymed.errors import ConfigError
from raymed.data.tasks import ModelInput, TaskSpec, to_model_input
from raymed.methods.fedkim.instructions import Examples, InstructionTask, examples
from raymed.models import MODELS, images_of, make_head
from raymed.tasks.report import text as reports

KINDS = ("image", "volume")  # input kinds; each has its own encoder


def kind_of(spatial_dims: int) -> str:
    return "volume" if spatial_dims == 3 else "image"


def build_encoders(name: str, kinds: set[str], in_channels: int, seed: int) -> nn.ModuleDict:
    """One backbone per input kind, each seeded by (seed, kind): the same weights in the local and
    the central model, whatever other kinds either has."""
    encoders = {}
    for kind in sorted(kinds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * len(KINDS) + KINDS.index(kind))
            encoders[kind] = MODELS[name](in_channels, 3 if kind == "volume" else 2)
    return nn.ModuleDict(encoders)


# ---------------------------------------------------------------------------------------------------
# Clients


class LocalModel(nn.Module):
    """A client's lightweight model: the encoder of its input kind and its dataset's head."""

    def __init__(self, name: str, tasks: dict[str, TaskSpec], seed: int, in_channels: int):
        super().__init__()
        self.in_channels = in_channels  # gray images (and volumes) are repeated to fit
        self.kinds = {flag: kind_of(t.spatial_dims) for flag, t in tasks.items()}
        self.encoders = build_encoders(name, set(self.kinds.values()), self.in_channels, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.heads = nn.ModuleDict({flag: make_head(t, self.encoders[self.kinds[flag]].feature_dim) for flag, t in tasks.items()})

    def forward(self, x: ModelInput, dataset: str) -> torch.Tensor:
        return self.heads[dataset](self.encoders[self.kinds[dataset]](images_of(x)), x)

    def predict(self, x: ModelInput, dataset: str) -> torch.Tensor:
        return self(x, dataset)

    def state_keys(self, datasets: list[str]) -> list[str]:
        """What a client holding ``datasets`` trains: their encoders and their heads."""
        own = tuple(f"encoders.{self.kinds[d]}." for d in datasets) + tuple(f"heads.{d}." for d in datasets)
        return [k for k in self.state_dict() if k.startswith(own)]


# ---------------------------------------------------------------------------------------------------
# M3OE


class MoELoRA(nn.Module):
    """y = W0 x + Σ_e g_e · (α/r) · B_e A_e x around a frozen linear (``nn.Linear`` or GPT-2's
    ``Conv1D``); A Kaiming-initialised, B zero (a new layer is the identity change). The gate g (B×E)
    is set by the central model before each pass."""

    def __init__(self, base: nn.Module, experts: int, rank: int, alpha: float):
        super().__init__()
        self.base = base
        rows, cols = base.weight.shape
        fan_in, fan_out = (rows, cols) if type(base).__name__ == "Conv1D" else (cols, rows)  # Conv1D stores in×out
        self.lora_A = nn.Parameter(torch.empty(experts, rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(experts, fan_out, rank))
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and peft's LoRA
        self.scaling = alpha / rank
        self.gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate.to(x.dtype)  # B×E
        low = torch.einsum("bti,eri->bter", x, self.lora_A) * gate[:, None, :, None]
        return self.base(x) + self.scaling * torch.einsum("bter,eor->bto", low, self.lora_B)


class M3OEGate(nn.Module):
    """Expert weights from a modality description (queries) attending over a task description."""

    def __init__(self, width: int, experts: int, top_k: int | None):
        super().__init__()
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        self.attend = nn.MultiheadAttention(width, num_heads=1, batch_first=True)
        # MultiheadAttention reads out_proj's weights without calling out_proj: under ZeRO-3 (which
        # gathers a module's parameters when it is called) they must be declared to it (no-op otherwise).
        for param in self.attend.out_proj.parameters():
            register_external_parameter(self.attend, param)
        self.logits = nn.Linear(width, experts)
        self.top_k = top_k if top_k and top_k < experts else None

    def forward(self, modality: torch.Tensor, modality_mask: torch.Tensor, task: torch.Tensor, task_mask: torch.Tensor) -> torch.Tensor:
        """Descriptions as embeddings (N×L×d) and masks (N×L, True = a word); returns N×E, rows summing to 1."""
        attended, _ = self.attend(modality, task, task, key_padding_mask=~task_mask, need_weights=False)
        weights = modality_mask.unsqueeze(-1).to(attended.dtype)
        logits = self.logits((attended * weights).sum(1) / weights.sum(1))
        if self.top_k is not None:  # keep the k largest logits; the others get no weight
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=1)


# ---------------------------------------------------------------------------------------------------
# The central model


@dataclass(frozen=True)
class CentralSpec:
    """What shapes the central model besides ``model``: its tasks and FedKIM's M3OE settings."""

    tasks: tuple[InstructionTask, ...]
    in_channels: int
    experts: int
    top_k: int | None
    question_len: int
    answer_len: int


@dataclass(frozen=True)
class Answers:
    task: str
    held_out: bool
    first_row: int
    predicted: list[str]
    reference: list[str]
    closed: np.ndarray


@dataclass(frozen=True)
class Batch:
    task: int  # index into the central model's tasks
    rows: np.ndarray  # rows of that task's examples


class CentralModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: CentralSpec, seed: int):
        super().__init__()
        from transformers import AutoModelForCausalLM

        d = cfg.decoder
        self.spec, self.tasks = spec, spec.tasks
        self.in_channels = spec.in_channels
        self.prefix_tokens = d.prefix_tokens
        self.tokenizer = reports.load_tokenizer(d.checkpoint)
        self.pad_id, self.bos_id, self.eos_id = reports.special_ids(self.tokenizer)
        self.kinds = ["volume" if t.volume else "image" for t in spec.tasks]
        self.encoders = build_encoders(cfg.name, set(self.kinds), spec.in_channels, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            lm = AutoModelForCausalLM.from_pretrained(d.checkpoint, local_files_only=True)
            lm.requires_grad_(False)  # the language model is frozen; only what is added around it trains
            width = lm.get_input_embeddings().embedding_dim
            self.project = nn.ModuleDict({k: nn.Linear(self.encoders[k].token_dim, width) for k in self.encoders})
            self.experts = self._attach_experts(lm, d.lora_targets, spec.experts, d.lora_rank, d.lora_alpha)
            self.gate = M3OEGate(width, spec.experts, spec.top_k)
        self.lm = lm
        self.register_buffer("modality_ids", self._ids([t.modality for t in spec.tasks]), persistent=False)
        self.register_buffer("task_ids", self._ids([t.description for t in spec.tasks]), persistent=False)
        self.frozen_keys = frozenset(f"lm.{k}" for k, p in lm.named_parameters() if not p.requires_grad)
        self.synced_generation = False  # DeepSpeed ZeRO-3 with several ranks: every rank steps together
        self._data: dict[str, list[tuple[Examples, np.ndarray, np.ndarray]]] = {}

    @staticmethod
    def _attach_experts(lm: nn.Module, targets: list[str] | None, experts: int, rank: int, alpha: float) -> list[MoELoRA]:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

        targets = targets or DEFAULT_TARGETS.get(lm.config.model_type) or ["q_proj", "v_proj"]
        layers = []
        for name, module in list(lm.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in targets and hasattr(child, "weight") and child.weight.dim() == 2:
                    layer = MoELoRA(child, experts, rank, alpha)
                    setattr(module, child_name, layer)
                    layers.append(layer)
        if not layers:

            raise ConfigError(f"model.decoder.lora_targets: no linear layer of the language model is named {', '.join(targets)}")
        return layers

    def _ids(self, texts: list[str]) -> torch.Tensor:
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        longest = max(map(len, rows))
        return torch.tensor([r + [self.pad_id] * (longest - len(r)) for r in rows], dtype=torch.long)

    # ---- the gate

    def gate_weights(self, modality_ids: torch.Tensor | None = None, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Expert weights of every task (T×E), or of the given description token ids."""
        modality_ids = self.modality_ids if modality_ids is None else modality_ids
        task_ids = self.task_ids if task_ids is None else task_ids
        embed = self.lm.get_input_embeddings()
        with torch.no_grad():  # the LM's embeddings are frozen: the descriptions are fixed inputs
            modality, task = embed(modality_ids), embed(task_ids)
        return self.gate(modality, modality_ids != self.pad_id, task, task_ids != self.pad_id)

    def _set_gate(self, task: int, batch: int) -> None:
        g = self.gate_weights(self.modality_ids[task : task + 1], self.task_ids[task : task + 1]).expand(batch, -1)
        for layer in self.experts:
            layer.gate = g

    # ---- data

    def tokenise(self, shards, split: str) -> None:
        """Tokenise every task's rows of ``split`` once (``server``: trained tasks; ``test``: all)."""
        if split in self._data:
            return

        data = []
        for task in self.tasks:
            ex = examples(task, shards, split) if (split == "test" or not task.held_out) else None
            if ex is None or not len(ex):
                data.append((ex, np.zeros((0, self.spec.question_len), np.int64), np.zeros((0, self.spec.answer_len + 1), np.int64)))
                continue
            q = self.tokenizer(ex.questions, add_special_tokens=False, padding="max_length", truncation=True, max_length=self.spec.question_len)["input_ids"]
            data.append((ex, np.asarray(q, np.int64), reports.encode(self.tokenizer, ex.answers, self.spec.answer_len + 1)))
        self._data[split] = data

    def batches(self, shards, split: str, batch_size: int, rank: int, world: int, seed: list[int] | None) -> list[Batch]:
        """This rank's batches of ``split``, one task per batch, and at every step the same task on
        every rank (ZeRO-3 gathers the parameters of the modules a step uses: the ranks must use the
        same ones). With a seed (training): shuffled rows and steps; a task's last step is dropped when
        it cannot give every rank a batch. Without (answering): every row in order, a task's last step
        filled by repeating its last batch (drop repeats by (task, first row))."""
        self.tokenise(shards, split)
        rng = np.random.default_rng(seed) if seed is not None else None
        steps: list[list[Batch]] = []
        for t, (ex, _, _) in enumerate(self._data[split]):
            if ex is None or not len(ex):
                continue
            order = rng.permutation(len(ex)) if rng is not None else np.arange(len(ex))
            chunks = [Batch(t, order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
            for i in range(0, len(chunks), world):
                step = chunks[i : i + world]
                if len(step) < world:
                    if rng is not None:
                        continue
                    step += [step[-1]] * (world - len(step))
                steps.append(step)
        if rng is not None:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        return [step[rank] for step in steps]

    def _tensors(self, split: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ex, q, a = self._data[split][batch.task]
        device = self.modality_ids.device
        images = to_model_input(np.asarray(ex.images[batch.rows]), self.in_channels, device)
        return images, torch.as_tensor(q[batch.rows], device=device), torch.as_tensor(a[batch.rows], device=device)

    # ---- passes

    def _prefix(self, task: int, images: torch.Tensor, questions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[modality tokens ‖ question] embeddings and their attention mask; sets the gate."""
        kind = self.kinds[task]
        body = self.encoders[kind].body(images)
        tokens = F.adaptive_avg_pool1d(body.flatten(2), self.prefix_tokens).transpose(1, 2)
        embeds = torch.cat([self.project[kind](tokens), self.lm.get_input_embeddings()(questions)], dim=1)
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.long, device=images.device), (questions != self.pad_id).long()], dim=1)
        self._set_gate(task, len(images))
        return embeds, mask

    def batch_loss(self, split: str, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the answer tokens (teacher forcing)."""
        images, questions, answers = self._tensors(split, batch)
        prefix, mask = self._prefix(batch.task, images, questions)
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(answers[:, :-1])], dim=1)
        answer_mask = (answers[:, :-1] != self.pad_id).long()
        answer_mask[:, 0] = 1  # BOS may share its id with padding
        logits = self.lm(inputs_embeds=inputs, attention_mask=torch.cat([mask, answer_mask], dim=1)).logits[:, prefix.shape[1] :]
        return F.cross_entropy(logits.transpose(1, 2), answers[:, 1:], ignore_index=self.pad_id)

    @torch.no_grad()
    def answer(self, split: str, batch: Batch) -> Answers:
        """Greedy answers of a batch, beside the references."""

        images, questions, _ = self._tensors(split, batch)
        prefix, mask = self._prefix(batch.task, images, questions)
        bos = self.lm.get_input_embeddings()(torch.full((len(images), 1), self.bos_id, device=images.device))
        out = self.lm.generate(
            inputs_embeds=torch.cat([prefix, bos], dim=1),
            attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
            max_new_tokens=self.spec.answer_len,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            synced_gpus=self.synced_generation,
        )
        ex = self._data[split][batch.task][0]
        return Answers(
            task=self.tasks[batch.task].name,
            held_out=self.tasks[batch.task].held_out,
            first_row=int(batch.rows[0]),
            predicted=reports.decode(self.tokenizer, out.cpu().numpy()),
            reference=[ex.answers[i] for i in batch.rows],
            closed=ex.closed[batch.rows],
        )
