"""Experiment configuration: YAML → validated, typed config (pydantic), with ``--set key.path=value``.

Every section forbids unknown keys. :func:`validate_config` turns any problem into a one-line
:class:`~raymed.errors.ConfigError` that names the key path, the value given and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from raymed.errors import ConfigError
from raymed.files import atomic_write

PartitionScheme = Literal["iid", "dirichlet", "client_dirichlet", "quantity", "modality", "by_site"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    # Your own data: {name: path} of MedMNIST-layout .npz files (train/val/test _images and _labels),
    # each usable in datasets under its name; task and classes from the labels, size and channels
    # from the images. A MedMNIST flag as the name is checked against the release as data.verify says.
    files: dict[str, str] = Field(default_factory=dict)
    datasets: list[str] = Field(default_factory=lambda: ["pneumoniamnist", "breastmnist", "retinamnist"])
    # Engine-scale experiments only (datasets: [synthetic_clients], partition: by_site): this many
    # clients, each with synthetic_rows generated training rows of its own; marked SYNTHETIC everywhere.
    synthetic_clients: int | None = Field(None, ge=1)
    synthetic_rows: int = Field(4, ge=2)
    root: str | None = None
    size: Literal[28, 64, 128, 224] = 28
    # A missing MedMNIST file: false never downloads; true downloads it (medmnist's own download, with a
    # progress bar); auto downloads it when the network answers and otherwise goes on as false does.
    download: bool | Literal["auto"] = False
    # MedMNIST files whose md5 is not the release's (a subset, a re-split, your own export in its layout):
    # official refuses them; warn uses them, saying so; off uses them silently. Either way meta.json
    # records each file's md5 and whether it is the official release.
    verify: Literal["official", "warn", "off"] = "official"
    # classification: each dataset's own task (VQA-RAD: answer classification);
    # superresolution: ×sr_scale super-resolution of the MedMNIST images (PSNR/SSIM);
    # report: report generation (pneumoniamnist = MedMNIST-Reports, r2gen = an R2Gen-format folder).
    task: Literal["classification", "superresolution", "report"] = "classification"
    sr_scale: Literal[2, 4] = 2
    vqa_root: str | None = None  # VQA-RAD's data_RAD folder (else $RAYMED_VQA_RAD_DIR, or vqa_rad/ beside $RAYMED_DATA_DIR)
    # Report text: IU X-Ray's indiana_reports.csv folder (MedMNIST-Reports) or an R2Gen folder
    # (annotation.json + images/); else $RAYMED_REPORTS_DIR, or iu_xray/ beside $RAYMED_DATA_DIR.
    report_root: str | None = None
    report_len: int = Field(64, ge=8, le=1024)  # tokens per report, BOS and EOS included
    report_styles: int = Field(4, ge=1, le=4)  # MedMNIST-Reports: reporting styles the clients cycle through
    report_tokenizer: str | None = None  # a local Hugging Face tokenizer; None: a word-level one trained on the training reports
    partition: PartitionScheme = "modality"
    # dirichlet: label-skew concentration (default 0.5); quantity: size-skew concentration (default 1.0);
    # modality: None = IID inside each modality, a number = Dirichlet label skew inside each modality.
    alpha: float | None = Field(None, gt=0)
    # Each client's rows: [local training | local validation (val_fraction) | held-out (holdout_fraction)].
    # The held-out rows are the client's own test split (personalised metrics); its validation rows
    # select (best round, early stopping, Tune). val_fraction is also the seeded share of the training
    # rows carved out as the global validation split of a source that has none (VQA-RAD, by image).
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    min_examples: int = Field(2, ge=2)
    max_train_per_dataset: int | None = Field(None, ge=1)
    max_test_per_dataset: int | None = Field(None, ge=1)  # caps the validation split too
    # Training-time augmentation (raymed.data.augment), none at evaluation. medmnist: each MedMNIST 2D
    # modality's own policy (flips only where anatomy has no side), the generic one for your own data;
    # generic: left-right flips and small shifts, rotations and zooms for every 2D and 3D dataset;
    # none: off (e.g. where orientation carries the label). true/false mean medmnist/none.
    augment: Literal["none", "medmnist", "generic"] = "medmnist"
    # Pixel scaling: fixed maps [0, 255] to [-1, 1] (MedMNIST's own mean 0.5, std 0.5); dataset
    # standardises each channel by its training rows' mean and std.
    normalise: Literal["fixed", "dataset"] = "dataset"
    cache_dir: str | None = None
    # A seeded fraction of every dataset's training rows (VQA-RAD: by image) that no client gets: the
    # server's own small split, for methods that train on the server (FedKIM's central model).
    server_fraction: float = Field(0.0, ge=0, lt=0.5)
    # Datasets only tested on (their test split is stored, no client or server row): zero-shot
    # evaluation of a held-out modality.
    held_out: list[str] = Field(default_factory=list)
    # Ordinal datasets whose grade is read as a discrete time to event (MAFM3's prognosis task): a
    # hazard per grade, the logistic-hazard survival loss, and the C-index among the metrics.
    prognosis: list[str] = Field(default_factory=list)

    @field_validator("datasets", "held_out")
    @classmethod
    def _known_flags(cls, flags: list[str], info: ValidationInfo) -> list[str]:
        if not flags and info.field_name == "datasets":
            raise ValueError("needs at least one MedMNIST flag")
        # The names the data sources know come from the validating caller (raymed.experiment), so
        # that the schema imports no data module; without them only the form is checked.
        builtin = (info.context or {}).get("datasets")
        own = info.data.get("files") or {}
        for flag in flags if builtin is not None else ():
            known = [*builtin, *own]
            if flag not in known:
                close = difflib.get_close_matches(flag, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"unknown dataset {flag!r}{hint}; allowed: {', '.join(sorted(known))}")
        if len(set(flags)) != len(flags):
            raise ValueError("lists a dataset twice")
        return flags

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_switch(cls, value: Any) -> Any:
        return {True: "medmnist", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @property
    def mixes_dimensions(self) -> bool:
        return len({flag.endswith("3d") for flag in self.datasets + self.held_out}) > 1

    @model_validator(mode="after")
    def _task_fits(self, info: ValidationInfo) -> DataConfig:
        context = info.context or {}
        question_answering, report = context.get("question_answering", ()), context.get("report")
        if self.task == "superresolution" and any(flag in question_answering for flag in self.datasets):
            raise ValueError("superresolution applies to MedMNIST images; VQA-RAD datasets are question answering")
        if self.task == "superresolution" and any(flag.endswith("3d") for flag in self.datasets):
            raise ValueError("superresolution is implemented for 2D images; use 2D MedMNIST datasets")
        if report is not None and self.task == "report" and not set(self.datasets) <= set(report):
            raise ValueError(f"task report needs report datasets ({', '.join(report)}); got {', '.join(self.datasets)}")
        if self.task != "report" and "r2gen" in self.datasets:
            raise ValueError("r2gen is a report-generation dataset; set data.task=report")
        if self.holdout_fraction + self.val_fraction >= 0.9:
            raise ValueError(
                f"holdout_fraction {self.holdout_fraction:g} + val_fraction {self.val_fraction:g} leave clients under 10% of their rows to train on"
            )
        if set(self.held_out) & set(self.datasets):
            raise ValueError(f"held_out lists {', '.join(sorted(set(self.held_out) & set(self.datasets)))}, which data.datasets trains on")
        if self.held_out and self.task != "classification":
            raise ValueError("held_out datasets are for classification/question-answering runs")
        from medmnist import INFO

        for flag in self.prognosis:
            if flag not in self.datasets or INFO.get(flag, {}).get("task") != "ordinal-regression" or self.task != "classification":
                graded = [f for f in self.datasets if INFO.get(f, {}).get("task") == "ordinal-regression"]
                raise ValueError(
                    f"prognosis lists {flag}, which is not a graded (ordinal) dataset of this classification run; "
                    f"graded datasets here: {', '.join(graded) or 'none'}"
                )
        return self

    @model_validator(mode="after")
    def _sites_as_given(self) -> DataConfig:
        if self.partition == "by_site" and (self.max_train_per_dataset or self.server_fraction > 0):
            raise ValueError("partition by_site keeps every site's training rows: unset max_train_per_dataset and server_fraction")
        return self

    @model_validator(mode="after")
    def _default_alpha(self) -> DataConfig:
        if self.alpha is None and self.partition in ("dirichlet", "client_dirichlet", "quantity"):
            self.alpha = 1.0 if self.partition == "quantity" else 0.5
        return self


class ClientsConfig(Section):
    num: int = Field(20, ge=1)
    fraction: float = Field(0.5, gt=0, le=1)
    local_epochs: int = Field(1, ge=1)
    # K: exactly K optimiser steps per round over successive shuffled passes (FedOpt's K local steps,
    # Reddi et al. 2021), so a client with 50 rows takes as many steps as one with 5,000.
    # None: local_epochs passes over the client's rows per round. A config that sets local_epochs
    # and not local_steps trains by epochs (local_steps becomes None).
    local_steps: int | None = Field(20, ge=1)
    # With local_steps: at most this many passes over the client's own rows per round, so a 49-row
    # client is not driven through 13 epochs by a step count sized for large clients. None: no cap.
    max_local_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # local optimiser, fresh every round (adamw suits transformer decoders)
    # The local learning rate across rounds: constant; cosine from lr (round 1) towards 0 (past the
    # last round); step: x0.1 after 50% and again after 75% of the rounds (MedMNIST's recipe).
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    # Which clients are online in a round: each with this probability (seeded by seed and round), or
    # as listed in a trace file (CSV or Parquet with columns client_id, round: a client the trace
    # lists is online only in its listed rounds; one it does not list is always online).
    availability: float = Field(1.0, gt=0, le=1)
    availability_trace: str | None = None

    @model_validator(mode="after")
    def _epochs_when_asked(self) -> ClientsConfig:
        if "local_epochs" in self.model_fields_set and "local_steps" not in self.model_fields_set:
            self.local_steps = None  # the user asked for epochs: the default K steps would silently ignore them
        return self

    @property
    def per_round(self) -> int:
        """Clients sampled per round (fewer when fewer are online)."""
        return clients_per_round(self.num, self.fraction)

    def steps_per_round(self, batches_per_epoch: int) -> int | None:
        """Optimiser steps of a client whose one pass is ``batches_per_epoch`` batches: local_steps,
        capped at max_local_epochs passes (at least one step); None under local_epochs."""
        if self.local_steps is None:
            return None
        if self.max_local_epochs is None:
            return self.local_steps
        return max(1, min(self.local_steps, math.ceil(self.max_local_epochs * batches_per_epoch)))

    def examples_per_round(self, num_train: int) -> int:
        """Training examples a client of ``num_train`` rows passes through in one round."""
        if self.local_steps is None:
            return num_train * self.local_epochs
        batches = max(math.ceil(num_train / self.batch_size), 1)
        return round(self.steps_per_round(batches) * num_train / batches)

    def lr_at(self, round_: int, rounds: int) -> float:
        """The local learning rate of round ``round_`` (1-based) of ``rounds`` under ``lr_schedule``."""
        progress = (round_ - 1) / max(rounds, 1)
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "step":
            return self.lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
        return self.lr


def clients_per_round(num: int, fraction: float) -> int:
    """max(1, round(fraction·num)): the clients of a round, as the server samples them."""
    return max(1, round(fraction * num))


class DecoderConfig(Section):
    """The report decoder (report-generation runs only): a causal LM from ``transformers``."""

    checkpoint: str | None = None  # a local Hugging Face checkpoint folder; None: random init from the sizes below
    layers: int = Field(2, ge=1)
    width: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    prefix_tokens: int = Field(16, ge=1)  # image tokens the encoder hands the decoder
    lora_rank: int = Field(8, ge=0)  # LoRA rank of the decoder adapters (peft); 0: fine-tune the whole decoder
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] | None = None  # module names to adapt; None: peft's default for the architecture
    # Without a checkpoint: pretrain the random decoder as a language model for this many epochs on
    # report text no client or test row uses (cached), so that LoRA adapts a language model, not noise.
    pretrain_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> DecoderConfig:
        if self.checkpoint is None and self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        return self


class ModelConfig(Section):
    # The image encoder (backbone). cnn_bn (BatchNorm, global average pooling, dropout) is the default:
    # measured better than cnn on single datasets, 2D and 3D, held-out ones included (benchmarks/README,
    # "Backbone candidates"); cnn is what the paper configs and the embedded demo use.
    name: str = "cnn_bn"
    # per_dataset: one head per dataset, averaged over the clients holding it; shared: one head over the
    # union of every dataset's classes (labels offset per dataset), as one model federated over them all
    head: Literal["per_dataset", "shared"] = "per_dataset"
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)


class StrategyConfig(BaseModel):
    """``name`` picks a method from the registry; the other keys are that method's ``Params``."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EngineConfig(Section):
    # pool: virtual clients multiplexed over long-lived worker actors; dedicated: one actor per client.
    mode: Literal["pool", "dedicated"] = "pool"
    num_workers: int | Literal["auto"] = "auto"
    client_state: Literal["memory", "disk"] = "memory"
    # Train a worker's clients together with torch.func.vmap (small models; see methods/vectorised.py).
    vectorise: bool = False
    # How long the client workers may wait to be placed before the run stops with the reason.
    start_timeout_s: float = Field(600.0, gt=0)
    # Save the whole federation (checkpoint.safetensors in the run folder) every N rounds and after the last;
    # `raymed run --resume RUN_DIR` continues from it. 0: never.
    checkpoint_every: int = Field(1, ge=0)
    # A client whose training raises, or whose worker dies: retried on a live worker up to
    # client_retries times and then left out of the round (retry), left out at once (drop), or the
    # run stops with the reason (stop). A round that aggregates no update at all stops the run.
    on_client_failure: Literal["retry", "drop", "stop"] = "retry"
    client_retries: int = Field(2, ge=0)
    # Stragglers: a client whose round time (its training time, plus any simulated delay) exceeds
    # client_deadline_s is late; its update is dropped, or down-weighted by deadline/time.
    client_deadline_s: float | None = Field(None, gt=0)
    late_updates: Literal["drop", "downweight"] = "drop"
    # A worker call not back after this long is presumed hung: the worker is killed and replaced,
    # and its clients count as failed (see on_client_failure). None: wait as long as it takes.
    worker_timeout_s: float | None = Field(None, gt=0)

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return value


class CrashConfig(Section):
    """Injected client failures (to exercise the failure policies)."""

    clients: list[int] = Field(default_factory=list)
    rounds: list[int] = Field(default_factory=list)  # empty: every round
    # raise: local training raises; exit: the worker process dies (as under an OOM kill);
    # hang: the worker stops answering (engine.worker_timeout_s catches it).
    kind: Literal["raise", "exit", "hang"] = "raise"
    attempts: int = Field(1, ge=1)  # the first N tries of a client in a round fail, later retries succeed
    # training: the client's local training fails; evaluation: its worker dies while evaluating the
    # client's personalised model (kind exit only: a worker lost mid-evaluation).
    during: Literal["training", "evaluation"] = "training"

    @model_validator(mode="after")
    def _evaluation_exits(self) -> CrashConfig:
        if self.during == "evaluation" and self.kind != "exit":
            raise ValueError(f"during evaluation a crash kills the worker: set kind=exit (got {self.kind})")
        return self


class SlowConfig(Section):
    """Simulated stragglers: these clients' round time counts delay_s more (no real sleep)."""

    clients: list[int] = Field(default_factory=list)
    rounds: list[int] = Field(default_factory=list)  # empty: every round
    delay_s: float = Field(0.0, ge=0)


class ByzantineConfig(Section):
    """Misbehaving clients: a seeded fraction of the federation attacks in every round it is sampled.

    sign_flip sends -scale·Δ (scale 1 by default); scale sends scale·Δ (default 10); noise sends
    N(0, scale²) in every coordinate (default 1); label_flip trains honestly on flipped labels.
    """

    fraction: float = Field(0.0, ge=0, lt=1)
    attack: Literal["sign_flip", "scale", "noise", "label_flip"] = "sign_flip"
    scale: float | None = None


class FaultsConfig(Section):
    """Simulated faults and adversaries; all off by default."""

    crash: CrashConfig = Field(default_factory=CrashConfig)
    slow: SlowConfig = Field(default_factory=SlowConfig)
    byzantine: ByzantineConfig = Field(default_factory=ByzantineConfig)


class ServerConfig(Section):
    # The server coordinates and aggregates while clients train; evaluation runs on the client pool.
    # Report generation: the server's resources are split over `ranks` DeepSpeed ranks that hold the
    # master decoder under ZeRO `zero_stage` and generate the global model's reports.
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    ranks: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"  # ZeRO offload of optimizer state (stage >= 1) and parameters (stage 3)
    lr: float = Field(1e-4, gt=0)  # the decoder's optimiser, for server-side steps

    @model_validator(mode="after")
    def _whole_gpus_per_rank(self) -> ServerConfig:
        per_rank = self.num_gpus / self.ranks
        if self.ranks > 1 and self.num_gpus > 0 and (per_rank < 1 or per_rank != int(per_rank)):
            raise ValueError(
                f"num_gpus={self.num_gpus:g} over ranks={self.ranks} gives {per_rank:g} GPU per rank; NCCL needs whole, "
                f"separate GPUs per rank: set num_gpus to a multiple of ranks"
            )
        return self


class TaskConfig(Section):
    """How each dataset's task is trained (the task itself is ``data.task``)."""

    # Graded datasets (RetinaMNIST): ce = softmax cross-entropy over the grades, as MedMNIST's
    # benchmarks train them (numbers comparable with the literature); cumulative = one logit per
    # threshold P(y > k), trained with BCE, so grade errors are ordered.
    ordinal_loss: Literal["ce", "cumulative"] = "ce"
    # balanced: each client weights its loss by n / (C · n_c) from its own training labels
    # (binary, multi-class and CE-trained graded tasks), against imbalanced sets.
    class_weighting: Literal["none", "balanced"] = "none"


class EvalConfig(Section):
    every: int = Field(1, ge=1)  # evaluate every N rounds, and always after the last one
    # The global model on each dataset's validation and test split (global/..., val/global/...); false:
    # skipped, for studies that report personalised metrics only (it is most of a small run's evaluation).
    global_model: bool = True
    personalised: bool = True
    # Personalised evaluation covers every registered client up to this many, then a seeded sample of
    # this many (the same clients every round; the round's row says eval/personal_clients_sampled).
    personal_clients: int | None = Field(1000, ge=1)
    batch_size: int = Field(512, ge=1)
    report_samples: int = Field(16, ge=0)  # report generation: test reports written beside their references
    # Model selection, on validation only: the round whose `select` metric is best is the run's
    # selected round, and its test metrics are the run's result. None: val/global/mean/<primary> when
    # the method has a global model, else val/personal/client_mean/<primary>.
    select: str | None = None
    select_mode: Literal["max", "min"] = "max"
    # Stop when `select` has not improved for this many evaluations (None: run every round).
    early_stop_patience: int | None = Field(None, ge=1)

    @field_validator("select")
    @classmethod
    def _validation_only(cls, metric: str | None) -> str | None:
        if metric is not None and not metric.startswith("val/"):
            raise ValueError(f"selects on validation metrics only (val/...); {metric} is a test metric: use val/{metric}")
        return metric


class RayConfig(Section):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:port": join a cluster
    # Joining a cluster whose token authentication is off (anyone who reaches it runs code on it) is
    # refused unless this is true.
    allow_unauthenticated: bool = False
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local Ray (default: all cores)
    num_gpus: int | None = Field(None, ge=0)  # logical GPUs of a local Ray (default: those torch sees)
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)  # the first port tried; taken (another Ray): the next free one
    metrics_export_port: int | None = Field(None, ge=1, le=65535)  # Prometheus metrics of a local Ray; None: a free port


class LoggingConfig(Section):
    """Experiment trackers for every run (:mod:`raymed.results.trackers`); ``logging: [mlflow]`` is
    short for ``logging: {to: [mlflow]}``."""

    to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    mlflow_uri: str | None = None  # an MLflow tracking URI; None: a SQLite store in the run folder (<run>/mlflow.db)
    experiment: str = "raymed"  # the MLflow experiment / W&B project the run goes to
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: nothing leaves the machine (wandb sync uploads later)

    @model_validator(mode="before")
    @classmethod
    def _list_is_to(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return {"to": value} if isinstance(value, list) else value

    @field_validator("to")
    @classmethod
    def _once_each(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))


class ExperimentConfig(Section):
    name: str | None = None
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's and torch's seeds are unsigned 32-bit
    rounds: int = Field(20, ge=1)
    output_dir: str = "results"
    data: DataConfig = Field(default_factory=DataConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # Bit-identical reruns on the same machine: torch's deterministic algorithms, a fixed thread count
    # per worker, seeded data order (recorded in meta.json).
    deterministic: bool = False

    @model_validator(mode="after")
    def _clients_exist(self) -> ExperimentConfig:
        if self.eval.personalised and self.data.holdout_fraction == 0:
            raise ValueError("data.holdout_fraction=0 leaves clients no held-out rows for eval.personalised; set eval.personalised=false or a holdout_fraction > 0")
        f, n = self.faults, self.clients.num
        for name, ids in (("faults.crash.clients", f.crash.clients), ("faults.slow.clients", f.slow.clients)):
            wrong = [c for c in ids if not 0 <= c < n]
            if wrong:
                raise ValueError(f"{name} lists client(s) {wrong}, but clients are numbered 0..{n - 1} (clients.num={n})")
        for name, rounds in (("faults.crash.rounds", f.crash.rounds), ("faults.slow.rounds", f.slow.rounds)):
            if any(r < 1 for r in rounds):
                raise ValueError(f"{name}: rounds are numbered from 1")
        return self

    @field_validator("name")
    @classmethod
    def _stays_in_output_dir(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or "/" in name or "\\" in name or name.strip(".") == "" or "\0" in name):
            raise ValueError(f"{name!r} would leave output_dir (a run's folder is output_dir/<name>-<time>); use a plain name without / \\ or ..")
        return name

    @property
    def run_name(self) -> str:
        return self.name or f"{self.strategy.name}-seed{self.seed}"

    @property
    def shards_dir(self) -> Path:
        """Where shard sets are cached, and what is built once beside them (a pretrained decoder)."""
        return Path(self.data.cache_dir or Path(self.output_dir) / ".shards")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------------
# Loading, overrides, validation


def default_config_path() -> Path:
    return Path(str(resources.files("raymed") / "configs" / "default.yaml"))


def embedded_configs() -> list[str]:
    """Names of the experiments shipped with raymed (``raymed run NAME``)."""
    return sorted(p.stem for p in default_config_path().parent.glob("*.yaml"))


def embedded_config_descriptions() -> dict[str, str]:
    """Each shipped experiment's one-line description: the first comment line of its file (read
    from the files, so ``raymed run --help`` cannot drift from what ships)."""
    out = {}
    for name in embedded_configs():
        first = (default_config_path().parent / f"{name}.yaml").read_text().splitlines()[:1]
        out[name] = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
    return out


MAX_YAML_BYTES = 1_000_000  # an experiment or sweep file is a few kB


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*name`` repeats a node, and nested repeats grow a few hundred bytes
    into gigabytes (the "billion laughs"); raymed's configs need none."""

    def compose_node(self, parent, index):  # noqa: ANN001
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in raymed files; write the value out")
        return super().compose_node(parent, index)


def safe_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML with no aliases and at most :data:`MAX_YAML_BYTES` (ConfigError, one line, otherwise)."""
    if len(text.encode(errors="replace")) > MAX_YAML_BYTES:
        raise ConfigError(f"{source} is {len(text) / 1e6:.1f} MB; a raymed config is at most {MAX_YAML_BYTES / 1e6:g} MB")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506  (a SafeLoader without aliases)
    except yaml.YAMLError as exc:
        if "aliases" in str(exc):
            raise ConfigError(f"{source}: {exc}") from None
        raise


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file() and str(path) in embedded_configs():
        path = default_config_path().parent / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; give the path of an experiment YAML or one of raymed's: {', '.join(embedded_configs())}"
        )
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size / 1e6:.1f} MB; a raymed config is at most {MAX_YAML_BYTES / 1e6:g} MB")
    try:
        raw = safe_yaml(path.read_text(errors="replace"), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got a {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings; values are parsed as YAML (``[a,b]``, ``0.1``, ``true``)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key.path=value")
        try:
            value = safe_yaml(text, f"--set {key.strip()}") if text.strip() else None
        except yaml.YAMLError:
            value = text
        set_key(out, key.strip(), value, what="--set")
    return out


def set_key(raw: dict[str, Any], key: str, value: Any, what: str = "key") -> None:
    """Set the dotted ``key`` (``clients.lr``) of a raw config mapping in place."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what} {key}: {part!r} holds a value, not a section of keys")
        node = child
    node[parts[-1]] = value


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names of the section that ``path`` points into (for 'unknown key' messages)."""
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def format_error(err: ValidationError, root: type[BaseModel], prefix: tuple = ()) -> str:
    first = err.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    path = ".".join(prefix + loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean {'.'.join(prefix + loc[:-1] + (close[0],))}?)" if close else ""
        return f"unknown key {path}{hint}; allowed keys here: {', '.join(allowed)}"
    given = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: its message names the keys itself
        return msg
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"{path}: got {given!r}; {msg}{more}"


def non_finite_values(raw: Any, path: str = "") -> list[tuple[str, float]]:
    """Every (key path, value) of ``raw`` whose value is an infinite or nan float (YAML's .inf, .nan)."""
    if isinstance(raw, dict):
        return [hit for k, v in raw.items() for hit in non_finite_values(v, f"{path}.{k}" if path else str(k))]
    if isinstance(raw, (list, tuple)):
        return [hit for i, v in enumerate(raw) for hit in non_finite_values(v, f"{path}[{i}]")]
    return [(path, raw)] if isinstance(raw, float) and not math.isfinite(raw) else []


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (lists stay values): a config as tracker parameters."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
