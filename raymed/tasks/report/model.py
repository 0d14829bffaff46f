"""The report generator: an image encoder hands a causal language model (``transformers``) a visual
prefix, optionally followed by a diagnosis-driven prompt, and the LM writes the report.

::

    images ─ backbone ─┬─ spatial tokens ─ pool to P ─ visual (linear) ─ V ∈ R^{P×d}
                       └─ pooled features ─ diagnosis (linear) ─ ŷ      (when prompts are on)
    LM input  = [V ‖ embed(prompt(ŷ)) ‖ embed(report[:-1])]  →  logits of report[1:]

The decoder is a small GPT-2 built from ``model.decoder`` with seeded random weights (no hub
download), or any local Hugging Face causal-LM checkpoint (``model.decoder.checkpoint``). With
``lora_rank`` > 0 its weights are frozen and LoRA adapters (``peft``) are trained instead; several
named adapters can be stacked (FedMRG: generic + specialised) and switched with :meth:`use_adapters`.
Frozen weights are listed in :attr:`frozen_keys`: the engine never sends them (every process holds
them already) and the client workers of a node share one copy from Ray's object store. Neither does
it send the second name of a tied weight (:attr:`unsent_keys` holds both kinds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raymed.config import DecoderConfig, ExperimentConfig, ModelConfig
from raymed.data.tasks import ModelInput, TaskSpec
from raymed.errors import ConfigError
from raymed.models import Backbone, build_backbone, images_of
from raymed.tasks.report import text as reports


@dataclass
class ReportOutput:
    logits: torch.Tensor  # B×(L−1)×V, next-token logits of report[1:]
    features: torch.Tensor  # B×F pooled image features
    diagnosis: torch.Tensor | None  # B×C diagnosis logits (when prompts are on)


def build_decoder(cfg: DecoderConfig, task: TaskSpec, context: int) -> nn.Module:
    """The causal LM: a local checkpoint, or GPT-2 of the configured size with random weights."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if cfg.checkpoint:
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.checkpoint, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.decoder.checkpoint: {cfg.checkpoint} could not be loaded ({exc}); give a local transformers checkpoint folder") from None
    pad, bos, eos = reports.special_ids(reports.load_tokenizer(task.tokenizer))
    config = GPT2Config(
        vocab_size=task.vocab_size, n_positions=context, n_embd=cfg.width, n_layer=cfg.layers, n_head=cfg.heads,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    return GPT2LMHeadModel(config)


class ReportModel(nn.Module):
    def __init__(self, backbone: Backbone, in_channels: int, task: TaskSpec, cfg: DecoderConfig, prompts: bool, adapters: tuple[str, ...]):
        super().__init__()
        self.in_channels, self.task, self.prefix_tokens = in_channels, task, cfg.prefix_tokens
        tokenizer = reports.load_tokenizer(task.tokenizer)
        self.pad_id, self.bos_id, self.eos_id = reports.special_ids(tokenizer)
        rows = tokenizer(reports.prompt_texts(task.dataset), add_special_tokens=False)["input_ids"] if prompts else [[]] * task.num_classes
        longest = max(map(len, rows))
        prompt_ids = np.array([row + [self.pad_id] * (longest - len(row)) for row in rows], dtype=np.int64)
        context = cfg.prefix_tokens + prompt_ids.shape[1] + task.report_len
        decoder = build_decoder(cfg, task, context)
        width = decoder.get_input_embeddings().embedding_dim
        self.backbone = backbone
        self.visual = nn.Linear(backbone.token_dim, width)
        self.diagnosis = nn.Linear(backbone.feature_dim, task.num_classes) if prompts else None
        self.register_buffer("prompt_ids", torch.as_tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.adapters = adapters if cfg.lora_rank > 0 else ()  # no adapters: the whole decoder is trained
        if self.adapters:
            from peft import LoraConfig, get_peft_model

            def lora() -> LoraConfig:
                return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_targets, lora_dropout=0.0, bias="none")

            with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself and says so
                warnings.simplefilter("ignore", UserWarning)
                decoder = get_peft_model(decoder, lora(), adapter_name=adapters[0])
                for name in adapters[1:]:
                    decoder.add_adapter(name, lora())
        self.decoder = decoder
        # Under LoRA the decoder's own weights are frozen; every adapter (active or not) is trained.
        # (state_dict, not named_parameters: tied weights such as GPT-2's lm_head appear there under both names)
        self.frozen_keys = frozenset(f"decoder.{n}" for n in decoder.state_dict() if cfg.lora_rank > 0 and "lora_" not in n)
        # A tied weight (GPT-2's lm_head = its token embedding) is one tensor under two names: send it once.
        first: dict[int, str] = {}
        for key, value in self.state_dict(keep_vars=True).items():
            first.setdefault(value.data_ptr(), key)
        tied = {k for k, v in self.state_dict(keep_vars=True).items() if first[v.data_ptr()] != k}
        self.unsent_keys = self.frozen_keys | tied
        self.use_adapters(adapters)
        self.synced_generation = False  # DeepSpeed ZeRO-3 with several ranks: every rank steps together

    # ---- adapters

    def use_adapters(self, names: tuple[str, ...] | list[str]) -> None:
        """Activate the named LoRA adapters (their outputs add up); all adapters stay trainable."""
        if not self.adapters:
            return
        self.decoder.base_model.set_adapter(list(names))
        for key, param in self.decoder.named_parameters():
            if "lora_" in key:
                param.requires_grad_(True)  # peft freezes inactive adapters; local SGD picks its own parameters

    @contextlib.contextmanager
    def adapters_active(self, names: tuple[str, ...]):
        self.use_adapters(names)
        try:
            yield
        finally:
            self.use_adapters(self.adapters)

    # ---- the engine's model interface

    def state_keys(self, datasets: list[str]) -> list[str]:
        """Everything a client trains: all state except the frozen decoder weights (tied ones once)."""
        return [k for k in self.state_dict() if k not in self.unsent_keys]

    def _prefix(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[V ‖ prompt] embeddings, pooled features and diagnosis logits."""
        body = self.backbone.body(images)
        features = self.backbone.pool(body)
        tokens = body.flatten(2)  # B×C×(H·W)
        tokens = F.adaptive_avg_pool1d(tokens, self.prefix_tokens).transpose(1, 2)
        parts = [self.visual(tokens)]
        diagnosis = None
        if self.diagnosis is not None:
            diagnosis = self.diagnosis(features)
            prompt = self.prompt_ids[diagnosis.argmax(1)]  # the encoder's own diagnosis picks the prompt
            parts.append(self.decoder.get_input_embeddings()(prompt))
        return torch.cat(parts, dim=1), features, diagnosis

    def run(self, x: ModelInput) -> ReportOutput:
        """Teacher-forced pass: next-token logits of the report (x = (images, report ids))."""
        images, ids = x
        prefix, features, diagnosis = self._prefix(images)
        text = self.decoder.get_input_embeddings()(ids[:, :-1])
        inputs = torch.cat([prefix, text], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long, device=ids.device), (ids[:, :-1] != self.pad_id).long()], 1)
        mask[:, prefix.shape[1]] = 1  # BOS may share its id with padding (GPT-2 tokenizers)
        logits = self.decoder(inputs_embeds=inputs, attention_mask=mask).logits[:, prefix.shape[1] :]
        return ReportOutput(logits, features, diagnosis)

    def forward(self, x: ModelInput, dataset: str | None = None) -> torch.Tensor:
        return self.run(x).logits

    @torch.no_grad()
    def predict(self, x: ModelInput, dataset: str | None = None) -> torch.Tensor:
        """Greedy-decoded reports (token ids, B×(report_len−1), padded)."""
        images = images_of(x)
        prefix, _, _ = self._prefix(images)
        bos = self.decoder.get_input_embeddings()(torch.full((len(images), 1), self.bos_id, device=images.device))
        inputs = torch.cat([prefix, bos], dim=1)
        out = self.decoder.generate(
            inputs_embeds=inputs,
            attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long, device=images.device),
            max_new_tokens=self.task.report_len - 1,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            synced_gpus=self.synced_generation,
        )
        return F.pad(out, (0, self.task.report_len - 1 - out.shape[1]), value=self.pad_id)


def build_report_model(cfg: ModelConfig, tasks: dict[str, TaskSpec], seed: int, prompts: bool = False, adapters: tuple[str, ...] = ("default",)) -> ReportModel:
    """The report model for the (single) report dataset of ``tasks``, seeded like every model."""
    if len(tasks) != 1:
        raise ValueError("report generation takes one report dataset per run")
    (task,) = tasks.values()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, in_channels = build_backbone(cfg.name, tasks)
        return ReportModel(backbone, in_channels, task, cfg.decoder, prompts, adapters)


# ---------------------------------------------------------------------------------------------------
# A pretrained decoder (model.decoder.pretrain_epochs)


def pretrained_decoder(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` pointing at a decoder pretrained on report text no client or test row uses, when
    ``model.decoder.pretrain_epochs`` > 0 and no checkpoint is given (built once, cached beside the
    shards; its tokenizer becomes the run's). MedMNIST-Reports: the IU X-Ray reports that are neither
    normal nor pneumonia-like (never paired with an image); R2Gen: the training split's reports."""
    d = cfg.model.decoder
    if cfg.data.task != "report" or d.checkpoint or not d.pretrain_epochs:
        return cfg

    if "r2gen" in cfg.data.datasets:
        root = reports.find_root(cfg.data.report_root, "annotation.json")
        texts, source = [reports.clean(e["report"]) for e in reports.r2gen_annotation(root)["train"]], root / "annotation.json"
    else:
        root = reports.find_root(cfg.data.report_root, "indiana_reports.csv")
        texts, source = reports.pretraining_text(root), root / "indiana_reports.csv"
    identity = [1, reports.md5(source), d.layers, d.width, d.heads, d.prefix_tokens, cfg.data.report_len, d.pretrain_epochs, cfg.seed]
    out = (cfg.shards_dir / f"decoder-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}").resolve()
    if not (out / "config.json").is_file():
        pretrain_lm(texts, out, d, cfg.data.report_len, cfg.seed)
    resolved = cfg.model_copy(deep=True)
    resolved.model.decoder.checkpoint = str(out)
    resolved.data.report_tokenizer = str(out)
    return resolved


def pretrain_lm(
    texts: list[str], out: Path, d: DecoderConfig, report_len: int, seed: int, extra: list[str] = (), context: int | None = None, batch_size: int = 32
) -> None:
    """Next-token pretraining of a GPT-2 of the configured size (AdamW) for ``d.pretrain_epochs``
    epochs (0: saved as initialised), saved with its tokenizer (which also knows the words of ``extra``)."""
    from transformers import GPT2Config, GPT2LMHeadModel


    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    prompts = [p for flag in reports.REPORT_DATASETS for p in reports.prompt_texts(flag)]
    tokenizer = reports.train_tokenizer(texts, tmp, [*prompts, *extra])
    pad, bos, eos = reports.special_ids(tokenizer)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max(context or 0, d.prefix_tokens + 16 + report_len), n_embd=d.width, n_layer=d.layers, n_head=d.heads,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        ids = torch.as_tensor(reports.encode(tokenizer, texts, report_len)) if texts else torch.zeros(0, report_len, dtype=torch.long)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(d.pretrain_epochs):
            for rows in torch.randperm(len(ids)).split(batch_size):
                batch = ids[rows]
                mask = (batch != pad).long()
                mask[:, 0] = 1
                loss = model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.save_pretrained(str(tmp))
    try:
        tmp.rename(out)
    except OSError:  # built concurrently by another process: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
