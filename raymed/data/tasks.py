"""Task types and, for each, how a batch is built, its loss, its outputs and its metrics.

A task is what a model is asked to do with one dataset's rows. Classification tasks come from
``medmnist.INFO[flag]["task"]`` (binary-class, multi-class, multi-label/binary-class or
ordinal-regression); two more kinds reuse the same rows differently:

- ``superres`` (×2 or ×4): the input is the image shrunk by the scale (bicubic, antialiased) and
  enlarged back (bicubic) to full size; the target is the original image. Loss: mean squared error;
  metrics: PSNR (dB, on intensities in [0, 1]) and SSIM (scikit-image).
- ``vqa`` (VQA-RAD, :mod:`raymed.data.vqa_rad`): answer classification over the training answer
  vocabulary. A row's label holds ``[answer id, closed?, question token ids...]`` (an id past the
  classes when the answer never occurs in training: always counted wrong); the model input is the pair
  (image, question tokens). Metrics: accuracy overall and per answer type (closed / open).
- ``report`` (:mod:`raymed.tasks.report`, which registers how its text is read): report
  generation. A row's label holds ``[diagnosis, style, report token ids...]``; the model input is (image, report tokens) and its
  output the next-token logits of the report (teacher forcing; loss: cross-entropy over non-padding
  tokens). Evaluation generates reports (token ids) and scores the decoded text with BLEU-1..4,
  ROUGE-L, CIDEr and clinical-efficacy P/R/F1 (:mod:`raymed.tasks.report.metrics`).

Classification losses:

- binary / multi-class: softmax cross-entropy over C classes (MedMNIST's own convention);
  ``task.class_weighting: balanced`` weights class c by n / (C · n_c) of the client's own labels.
- multi-label (ChestMNIST): a sigmoid per label, binary cross-entropy.
- ordinal (RetinaMNIST), ``task.ordinal_loss``: ``ce`` (default) treats the grades as C classes with
  softmax cross-entropy and predicts the arg-max, as MedMNIST's benchmarks do, so numbers compare
  with the literature; ``cumulative`` ("extended binary") has one logit per threshold k < C-1, trained
  with BCE on [y > k], and predicts the median grade, so grade errors are ordered.
- prognosis (an ordinal dataset listed in ``data.prognosis``): the grade read as a discrete time to
  event, grade k = the event in interval k. One hazard logit per interval k < C-1,
  h_k = σ(z_k) = P(Y = k | Y ≥ k), trained with the logistic-hazard survival loss (Gensheimer &
  Narasimhan 2019, https://doi.org/10.7717/peerj.6257)

      NLL(y) = −[ Σ_{k<y} log(1 − h_k) + 1[y < C−1] · log h_y ]     (grade C−1: no event by the last interval)

  P(Y = k) = h_k Π_{j<k} (1 − h_j); the prediction is the median grade, the risk score the expected
  grade, and the C-index (Harrell's, from ``lifelines``) scores how well that risk orders the grades.

Metrics come from scikit-learn: accuracy, AUC (macro one-vs-rest where there are several classes),
macro-F1, and mean absolute grade error for ordinal tasks. An undefined AUC (a split with one class)
is NaN, never a made-up number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import warnings
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import f1_score, roc_auc_score

from raymed.errors import ConfigError

TaskKind = Literal["binary", "multiclass", "multilabel", "ordinal", "prognosis", "superres", "vqa", "report"]
ModelInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # images, or (images, question or report tokens)

class GeneratedText(Protocol):
    """How a task kind whose outputs are generated token ids reads and scores them (report
    generation registers its own: :mod:`raymed.tasks.report`)."""

    def pad_id(self, task: TaskSpec) -> int: ...

    def decode(self, task: TaskSpec, ids: np.ndarray) -> list[str]: ...

    def scores(self, generated: list[str], references: list[str]) -> dict[str, float]: ...


GENERATED: dict[str, GeneratedText] = {}


def register_generated(kind: str, reader: GeneratedText) -> None:
    GENERATED[kind] = reader


_KINDS: dict[str, TaskKind] = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}


@dataclass(frozen=True)
class TaskSpec:
    dataset: str
    kind: TaskKind
    num_classes: int  # classes, or labels for multi-label tasks
    channels: int
    spatial_dims: int  # 2 or 3
    synthetic: bool = False
    image_size: int = 28
    scale: int = 1  # super-resolution factor
    question_vocab: int = 0  # VQA: question token vocabulary size (0 = padding)
    question_len: int = 0  # VQA: question tokens per row
    vocab_size: int = 0  # report: the tokenizer's vocabulary
    report_len: int = 0  # report: tokens per report (BOS and EOS included)
    tokenizer: str = ""  # report: folder of the tokenizer (transformers' save_pretrained)
    class_names: tuple[str, ...] = ()  # report: diagnosis classes (the diagnosis-driven prompts)
    ordinal_loss: Literal["ce", "cumulative"] = "ce"  # ordinal: softmax over grades, or threshold logits
    # Input scaling, per stored channel, on intensities in [0, 1]: (x − mean) / std. The default
    # (0.5, 0.5) maps [0, 255] to [−1, 1]; data.normalise=dataset sets the training rows' own statistics.
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    class_weights: tuple[float, ...] = ()  # per-class loss weights (task.class_weighting=balanced), () = none
    # model.head=shared: one head over the union of every dataset's classes, this dataset's being outputs
    # label_offset … label_offset + num_classes − 1 of union_classes (0: the dataset has a head of its own)
    label_offset: int = 0
    union_classes: int = 0

    def __post_init__(self) -> None:
        for name in ("class_names", "mean", "std", "class_weights"):  # JSON gives back lists
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_medmnist(cls, flag: str, synthetic: bool = False) -> TaskSpec:
        from medmnist import INFO

        info = INFO[flag]
        return cls(
            dataset=flag,
            kind=_KINDS[info["task"]],
            num_classes=len(info["label"]),
            channels=info["n_channels"],
            spatial_dims=3 if flag.endswith("3d") else 2,
            synthetic=synthetic,
        )

    def super_resolution(self, scale: int) -> TaskSpec:
        """The ×``scale`` super-resolution task on this dataset's images."""
        return replace(self, kind="superres", num_classes=0, scale=scale)

    def prognosis(self) -> TaskSpec:
        """This ordinal dataset's grade read as a discrete time to event (see the module's docstring)."""
        if self.kind != "ordinal":
            raise ValueError(f"{self.dataset} is {self.kind}, not ordinal: only a graded dataset reads as a prognosis")
        return replace(self, kind="prognosis")

    @property
    def graded(self) -> bool:
        """Whether the classes are ordered grades (ordinal or prognosis): grade MAE among the metrics."""
        return self.kind in ("ordinal", "prognosis")

    @property
    def per_threshold(self) -> bool:
        """Whether the outputs are C−1 logits, one per grade threshold (cumulative ordinal, prognosis
        hazards), whose prediction is the median grade."""
        return self.kind == "prognosis" or (self.kind == "ordinal" and self.ordinal_loss == "cumulative")

    @property
    def single_label(self) -> bool:
        """One class per row, scored by softmax cross-entropy (class weights apply)."""
        return self.kind in ("binary", "multiclass") or (self.kind == "ordinal" and not self.per_threshold)

    @property
    def augmentable(self) -> bool:
        """Whether training batches may be augmented: images and volumes classified (not
        super-resolution's paired input and target, not question or report inputs)."""
        return self.kind in ("binary", "multiclass", "multilabel", "ordinal", "prognosis")

    @property
    def rows_share_images(self) -> bool:
        """Whether several rows ask about one image (VQA), which then stay on one side of every split."""
        return self.kind == "vqa"

    @property
    def normalisable(self) -> bool:
        """Whether inputs may be standardised by dataset statistics (super-resolution reads [−1, 1] pixels)."""
        return self.kind != "superres"

    @property
    def num_outputs(self) -> int:
        if self.union_classes:
            return self.union_classes
        if self.kind == "superres":
            return self.channels * self.image_size**self.spatial_dims
        return self.num_classes - 1 if self.per_threshold else self.num_classes

    def balanced(self, labels: np.ndarray) -> TaskSpec:
        """This task with class weights n / (C · n_c) from ``labels`` (a client's own training labels);
        unchanged where class weights do not apply."""
        if not self.single_label or len(labels) == 0:
            return self
        counts = np.bincount(np.asarray(labels)[:, 0].astype(np.int64), minlength=self.num_classes).astype(np.float64)
        weights = len(labels) / (self.num_classes * np.maximum(counts, 1.0))
        return replace(self, class_weights=tuple(float(w) for w in weights))

    @property
    def primary_metric(self) -> str:
        """The metric a run is summarised by (``global/mean/<it>``, ``personal/client_mean/<it>``)."""
        return {"superres": "psnr", "report": "bleu4"}.get(self.kind, "acc")

    # ---- batches

    def partition_labels(self, labels: np.ndarray) -> np.ndarray:
        """The labels a partitioner skews by (VQA: the answer; the other kinds: the dataset's labels)."""
        return labels[:, :1] if self.kind in ("vqa", "report") else labels

    def targets(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """What the outputs are scored against: labels, the full-size image (in [−1, 1]), or (answer, closed?)."""
        if self.kind == "superres":
            return np.asarray(images, dtype=np.float32) / 127.5 - 1.0
        if self.kind == "vqa":
            return np.asarray(labels[:, :2], dtype=np.int64)
        return np.asarray(labels, dtype=np.int64) if self.kind == "report" else np.asarray(labels)

    def inputs(self, images: np.ndarray, labels: np.ndarray, in_channels: int, device: torch.device) -> tuple[ModelInput, torch.Tensor]:
        """A batch (model input, target) from stored uint8 images and labels, on ``device``."""
        x = to_model_input(images, in_channels, device, self.mean, self.std)
        if self.kind == "superres":
            target = x[:, : self.channels].clone()
            return degrade(x, self.scale), target
        if self.kind == "vqa":
            labels = torch.as_tensor(labels, device=device).long()
            return (x, labels[:, 2:]), labels[:, :2]
        if self.kind == "report":
            labels = torch.as_tensor(labels, device=device).long()
            return (x, labels[:, 2:]), labels
        return x, torch.as_tensor(labels, device=device)

    # ---- generated text (report generation: its reader is registered by raymed.tasks.report)

    @property
    def generated(self) -> bool:
        """Whether outputs are generated (report token ids), which the server model's ranks produce."""
        return self.kind == "report"

    def samples(self, outputs: np.ndarray, targets: np.ndarray, round_: int, count: int) -> list[dict]:
        """The first ``count`` generated outputs beside their references, for the run folder (none
        for tasks whose outputs are not text)."""
        if self.kind != "report":
            return []
        n = min(count, len(targets))
        return [
            {"round": round_, "dataset": self.dataset, "row": i, "diagnosis": self.class_names[int(targets[i, 0])], "reference": ref, "generated": gen}
            for i, (gen, ref) in enumerate(zip(self.decode(outputs[:n]), self.decode(targets[:n, 2:])))
        ]

    @property
    def _text(self) -> GeneratedText:
        if self.kind not in GENERATED:
            raise RuntimeError(f"no reader of generated text is registered for task kind {self.kind}: import raymed.tasks.registry first")
        return GENERATED[self.kind]

    @property
    def pad_id(self) -> int:
        return self._text.pad_id(self)

    def decode(self, ids: np.ndarray) -> list[str]:
        """The text of token id rows."""
        return self._text.decode(self, ids)

    # ---- training

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` is N×L integer (L=1 except for multi-label tasks), or the target image."""
        if self.kind == "superres":
            return F.mse_loss(logits, labels)
        if self.kind == "vqa":
            answer = labels[:, 0].masked_fill(labels[:, 0] >= logits.shape[1], -1)  # test-only answers: no class to train
            return F.cross_entropy(logits, answer, ignore_index=-1)
        if self.kind == "report":  # logits predict tokens 1.. of the report
            return F.cross_entropy(logits.transpose(1, 2), labels[:, 3:], ignore_index=self.pad_id)
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        target = labels[:, 0].long()
        if self.kind == "prognosis":
            return survival_nll(logits, target)
        if self.per_threshold:
            thresholds = torch.arange(self.num_outputs, device=logits.device)
            return F.binary_cross_entropy_with_logits(logits, (target[:, None] > thresholds).float())
        weight = torch.tensor(self.class_weights, dtype=logits.dtype, device=logits.device) if self.class_weights else None
        if self.union_classes:  # the union's softmax; other datasets' classes keep weight 1 (never a target here)
            if weight is not None:
                weight = F.pad(weight, (self.label_offset, self.union_classes - self.label_offset - self.num_classes), value=1.0)
            target = target + self.label_offset
        return F.cross_entropy(logits, target, weight=weight)

    # ---- evaluation

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Per-class probabilities (N×C) from logits; super-resolution: the image, clipped to [−1, 1]."""
        if self.kind == "superres":
            return logits.clamp(-1, 1).cpu().numpy()
        if self.kind == "report":  # generated token ids
            return logits.cpu().numpy()
        if self.kind == "multilabel":
            return torch.sigmoid(logits).cpu().numpy()
        if self.kind == "ordinal" and self.per_threshold:
            exceed = torch.cummin(torch.sigmoid(logits), dim=1).values  # P(y > k), monotone in k
            ones = torch.ones_like(exceed[:, :1])
            upper = torch.cat([ones, exceed], dim=1)
            lower = torch.cat([exceed, torch.zeros_like(ones)], dim=1)
            return (upper - lower).clamp_min(0).cpu().numpy()
        if self.kind == "prognosis":
            return grade_probabilities(logits).cpu().numpy()
        probs = torch.softmax(logits, dim=1)
        if self.union_classes:  # own classes, then the likeliest other dataset's class (argmax there: wrong)
            own = probs[:, self.label_offset : self.label_offset + self.num_classes]
            other = torch.cat([probs[:, : self.label_offset], probs[:, self.label_offset + self.num_classes :]], dim=1)
            probs = torch.cat([own, other.max(dim=1, keepdim=True).values], dim=1)
        return probs.cpu().numpy()

    def predict(self, scores: np.ndarray) -> np.ndarray:
        if self.kind == "multilabel":
            return (scores > 0.5).astype(np.int64)
        if self.per_threshold:  # the median grade: where the cumulative mass crosses 1/2
            return (1.0 - np.cumsum(scores, axis=1)[:, :-1] > 0.5).sum(axis=1)
        return scores.argmax(axis=1)

    def constant_scores(self, train_labels: np.ndarray, n: int) -> np.ndarray | None:
        """Outputs of the constant predictor fitted on ``train_labels``, for ``n`` rows: the majority
        class (answer, grade) one-hot, or each label's majority value (multi-label); None for tasks
        whose baseline is not a constant (super-resolution: bicubic; reports: none)."""
        if self.kind in ("superres", "report") or len(train_labels) == 0:
            return None
        labels = np.asarray(train_labels)
        if self.kind == "multilabel":
            return np.tile((labels.mean(axis=0) > 0.5).astype(np.float32), (n, 1))
        scores = np.zeros((n, self.num_classes), np.float32)
        scores[:, majority_class(labels[:, 0], self.num_classes)] = 1.0
        return scores

    def metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics of outputs ``scores`` against :meth:`targets`."""
        if len(labels) == 0:
            return {}
        if self.kind == "superres":
            return image_quality(scores, labels)
        if self.generated:
            return self._text.scores(self.decode(scores), self.decode(labels[:, 2:]))
        if self.kind == "vqa":
            correct = scores.argmax(axis=1) == labels[:, 0]  # an answer unseen in training (id >= classes) is never right
            closed = labels[:, 1] == 1
            return {
                "acc": float(correct.mean()),
                "acc_closed": float(correct[closed].mean()) if closed.any() else float("nan"),
                "acc_open": float(correct[~closed].mean()) if (~closed).any() else float("nan"),
            }
        labels = labels.reshape(len(labels), -1).astype(np.int64)
        pred = self.predict(scores)
        if self.kind == "multilabel":
            out = {
                "acc": float((pred == labels).mean()),
                "f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
                "auc": _safe_auc(lambda: roc_auc_score(labels, scores, average="macro")),
            }
            return out
        y = labels[:, 0]
        classes = np.arange(self.num_classes)
        out = {
            "acc": float((pred == y).mean()),  # a shared head's "other dataset" column (index C) is never right
            "f1": macro_f1(y, pred, self.num_classes),
        }
        own = scores[:, : self.num_classes]  # the dataset's own classes (renormalised under a shared head)
        if scores.shape[1] > self.num_classes:
            own = own / own.sum(axis=1, keepdims=True).clip(1e-12)
        if self.num_classes == 2:
            # one class only (most clients' few held-out rows): undefined, as scikit-learn says, without asking it
            out["auc"] = _safe_auc(lambda: roc_auc_score(y, own[:, 1])) if 0 < y.sum() < len(y) else float("nan")
        else:
            out["auc"] = _safe_auc(
                lambda: roc_auc_score(y, own, multi_class="ovr", average="macro", labels=classes)
            )
        if self.graded:
            out["mae"] = float(np.abs(own.argmax(axis=1) - y).mean() if scores.shape[1] > self.num_classes else np.abs(pred - y).mean())
        if self.kind == "prognosis":
            out["c_index"] = c_index(y, scores @ classes)
        return out


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over classes 0..C-1, a class with no true and no predicted row scoring 0: scikit-learn's
    ``f1_score(average="macro", labels=range(C), zero_division=0)``, without its per-call validation
    (which dominated personalised evaluation over thousands of clients of a few rows each)."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    inside = (pred >= 0) & (pred < num_classes)  # a shared head's other-dataset column counts as no class here
    tp = np.bincount(y[pred == y], minlength=num_classes)[:num_classes]
    true = np.bincount(y, minlength=num_classes)[:num_classes]
    predicted = np.bincount(pred[inside], minlength=num_classes)[:num_classes]
    denominator = true + predicted
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return float(f1.mean())


def majority_class(labels: np.ndarray, num_classes: int) -> int:
    """The most common class of ``labels`` (the lowest one on a tie)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).clip(0, num_classes - 1), minlength=num_classes)
    return int(counts.argmax())


def survival_nll(logits: torch.Tensor, grade: torch.Tensor) -> torch.Tensor:
    """Mean logistic-hazard NLL of ``grade`` under hazards σ(logits) (N×(C−1)); see the module's docstring."""
    intervals = torch.arange(logits.shape[1], device=logits.device)
    survived = (intervals[None, :] < grade[:, None]).float()  # 1 − h_k for every interval passed
    event = (intervals[None, :] == grade[:, None]).float()  # h_y, absent for the last grade
    # log(1 − σ(z)) = logsigmoid(−z): stable for large |z|
    return -(survived * F.logsigmoid(-logits) + event * F.logsigmoid(logits)).sum(dim=1).mean()


def grade_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(Y = k) = h_k Π_{j<k}(1 − h_j), and for the last grade Π_j (1 − h_j): N×C, rows sum to 1."""
    hazard = torch.sigmoid(logits)
    alive = torch.cumprod(torch.cat([torch.ones_like(hazard[:, :1]), 1 - hazard], dim=1), dim=1)  # P(Y ≥ k)
    return alive * torch.cat([hazard, torch.ones_like(hazard[:, :1])], dim=1)


def c_index(grades: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance of a risk score with the observed grades (every event observed); NaN when
    no pair of rows has different grades."""
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(grades, risk))
    except ZeroDivisionError:  # no comparable pair
        return float("nan")


def to_model_input(
    images: np.ndarray | torch.Tensor,
    in_channels: int,
    device: torch.device,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
) -> torch.Tensor:
    """uint8 N×C×... → float (x/255 − mean) / std per channel on ``device`` (the defaults give [−1, 1]);
    gray images repeated when the model takes RGB."""
    x = torch.as_tensor(images).to(device, non_blocking=True).float().div_(255.0)
    if len(mean) == 1:
        x = x.sub_(mean[0]).div_(std[0])
    else:
        shape = (1, len(mean)) + (1,) * (x.dim() - 2)
        x = x.sub_(torch.tensor(mean, device=x.device).view(shape)).div_(torch.tensor(std, device=x.device).view(shape))
    if x.shape[1] != in_channels:
        x = x.expand(-1, in_channels, *x.shape[2:])
    return x


def degrade(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Shrink by ``scale`` (bicubic, antialiased: the usual SR degradation) and enlarge back (bicubic)."""
    size = images.shape[2:]
    small = F.interpolate(images, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=size, mode="bicubic", align_corners=False).clamp_(-1, 1)


def image_quality(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean PSNR and SSIM over images (N×C×H×W in [−1, 1]), computed on intensities in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pred, target = (pred + 1) / 2, (target + 1) / 2
    with np.errstate(divide="ignore"):  # identical images: infinite PSNR, capped below
        psnr = [peak_signal_noise_ratio(t, p, data_range=1.0) for p, t in zip(pred, target)]
    ssim = [structural_similarity(t, p, data_range=1.0, channel_axis=0) for p, t in zip(pred, target)]
    return {"psnr": float(np.mean(np.minimum(psnr, 100.0))), "ssim": float(np.mean(ssim))}


def _safe_auc(compute) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        try:
            value = float(compute())
        except ValueError:  # only one class present, or a class never seen: AUC is undefined
            return float("nan")
    return value


def shared_label_space(tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
    """``model.head=shared``: the tasks of one head over the union of their classes, each dataset's
    labels offset by the classes of the datasets before it (in ``tasks``' order), as a single-model
    federation over several datasets trains them."""
    other = [f"{flag} ({t.kind}{', cumulative' if t.per_threshold else ''})" for flag, t in tasks.items() if not t.single_label]
    if other:
        raise ConfigError(
            f"model.head=shared needs single-label classification tasks (softmax over classes); {', '.join(other)} "
            "is not: use model.head=per_dataset"
        )
    total, offset, out = sum(t.num_classes for t in tasks.values()), 0, {}
    for flag, task in tasks.items():
        out[flag] = replace(task, label_offset=offset, union_classes=total)
        offset += task.num_classes
    return out
