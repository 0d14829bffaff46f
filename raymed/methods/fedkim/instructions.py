"""The central model's tasks (FedKIM): every dataset's rows as questions with text answers.

A task pairs a dataset with a natural-language **modality description** and **task description**
(what the M3OE gate reads) and a question; its answer is text. Classification datasets ask one
question per image and answer with the class name; VQA-RAD keeps each row's own question and
answer. Tasks the central model never trains on test its generalisation:

- **held-out task on a seen modality**: a new task sentence and question on a trained dataset's
  test images (chest X-rays: "a lung infection" instead of "pneumonia");
- **seen task on a held-out modality**: a dataset in ``data.held_out`` (VQA-RAD's abdominal CT),
  asked the trained task ("answer a clinical question about a radiology image") zero-shot.

Scores per task (:func:`answer_metrics`): exact-match accuracy, macro-F1 and Matthews correlation
over the answers (scikit-learn), and for tasks with open answers BLEU-1 (``pycocoevalcap``) and
ROUGE-1 F (``rouge-score``) over the open questions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from raymed.data import vqa_rad
from raymed.data.shards import ShardSet, Split

VQA_TASK = "answer a clinical question about a radiology image"


@dataclass(frozen=True)
class InstructionTask:
    name: str  # the task's name in metrics (central/<name>/acc)
    dataset: str  # where its images (and, for VQA, questions) come from
    modality: str  # the modality description the gate reads
    description: str  # the task description the gate reads
    question: str | None  # the question asked of every image; None: each row's own (VQA)
    answers: tuple[str, ...] = ()  # class index -> answer text (classification)
    held_out: bool = False  # never trained on: zero-shot evaluation only

    @property
    def volume(self) -> bool:
        return self.dataset.endswith("3d")


# Trained tasks, by dataset (the datasets FedKIM runs on).
CATALOGUE: dict[str, InstructionTask] = {
    t.dataset: t
    for t in [
        InstructionTask("pneumonia", "pneumoniamnist", "chest x-ray radiograph", "detect pneumonia in a chest x-ray", "does this chest x-ray show pneumonia ?", ("no", "yes")),
        InstructionTask("breast", "breastmnist", "breast ultrasound image", "classify a breast ultrasound lesion as malignant or benign", "is the lesion in this breast ultrasound malignant or benign ?", ("malignant", "benign")),
        InstructionTask("retina", "retinamnist", "retinal fundus photograph", "grade diabetic retinopathy in a fundus photograph", "what is the diabetic retinopathy grade of this fundus photograph ?", tuple(f"grade {g}" for g in range(5))),
        InstructionTask("adrenal", "adrenalmnist3d", "abdominal ct volume of the adrenal gland", "classify the shape of an adrenal gland", "is this adrenal gland normal or hyperplastic ?", ("normal", "hyperplasia")),
        InstructionTask("vqa_head", "vqarad_head", "head mri or ct image", VQA_TASK, None),
        InstructionTask("vqa_chest", "vqarad_chest", "chest radiology image", VQA_TASK, None),
        InstructionTask("vqa_abd", "vqarad_abd", "abdominal ct image", VQA_TASK, None),
    ]
}
# Held-out task sentences on a seen modality, by the trained dataset whose test images they ask about.
NEW_SENTENCES: dict[str, InstructionTask] = {
    "pneumoniamnist": InstructionTask(
        "lung_infection", "pneumoniamnist", "chest x-ray radiograph", "screen a chest radiograph for a lung infection",
        "is there a lung infection in this radiograph ?", ("no", "yes"), held_out=True,
    ),
}


def tasks_of(shards: ShardSet) -> list[InstructionTask]:
    """The central model's tasks for a shard set: trained ones, then held-out ones (same order everywhere)."""
    trained = [CATALOGUE[flag] for flag in shards.tasks]
    new_sentences = [NEW_SENTENCES[flag] for flag in shards.tasks if flag in NEW_SENTENCES]
    new_modalities = [replace(CATALOGUE[flag], held_out=True) for flag in shards.held_out_tasks]
    return trained + new_sentences + new_modalities


def strings(task: InstructionTask) -> list[str]:
    """Every fixed text of a task (the tokenizer must know their words)."""
    return [task.modality, task.description, *([task.question] if task.question else []), *task.answers]


@dataclass
class Examples:
    """One task's rows of one split as text: images (uint8), questions, answers, closed-question flags."""

    task: InstructionTask
    images: np.ndarray
    questions: list[str]
    answers: list[str]
    closed: np.ndarray

    def __len__(self) -> int:
        return len(self.answers)


def examples(task: InstructionTask, shards: ShardSet, split: str) -> Examples:
    """``task``'s rows of the server's split (``server``) or the test split (``test``)."""
    rows: Split = shards.server(task.dataset) if split == "server" else shards.test(task.dataset)
    labels = np.asarray(rows.labels)
    if task.question is None:  # VQA-RAD: each row's own question and answer
        info = {**shards.meta["datasets"], **shards.meta.get("held_out", {})}[task.dataset]
        vocab = vqa_rad.vocabulary(Path(info["file"]))
        questions = [vocab.question(row[2:]) + " ?" for row in labels]
        answers = [vocab.all_answers[int(row[0])] for row in labels]
        closed = labels[:, 1] == 1 if len(labels) else np.zeros(0, bool)
    else:
        questions = [task.question] * len(labels)
        answers = [task.answers[int(y)] for y in labels[:, 0]] if len(labels) else []
        closed = np.ones(len(labels), bool)
    return Examples(task, rows.images, questions, answers, closed)


# ---------------------------------------------------------------------------------------------------
# Scores


def answer_metrics(predictions: list[str], references: list[str], closed: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and MCC over the answers; BLEU-1 and ROUGE-1 over the open ones."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    if not references:
        return {}
    pred = [" ".join(p.lower().split()) for p in predictions]
    ref = [" ".join(r.lower().split()) for r in references]
    out = {
        "acc": float(np.mean([p == r for p, r in zip(pred, ref)])),
        "f1": float(f1_score(ref, pred, labels=sorted(set(ref)), average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(ref, pred)) if len(set(ref) | set(pred)) > 1 else 0.0,
    }
    open_rows = np.flatnonzero(~np.asarray(closed, bool))
    if len(open_rows):
        out.update(open_answer_scores([pred[i] for i in open_rows], [ref[i] for i in open_rows]))
        out["acc_open"] = float(np.mean([pred[i] == ref[i] for i in open_rows]))
    if np.asarray(closed, bool).any() and len(open_rows):
        shut = np.flatnonzero(np.asarray(closed, bool))
        out["acc_closed"] = float(np.mean([pred[i] == ref[i] for i in shut]))
    return out


def open_answer_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-1 (pycocoevalcap) and mean ROUGE-1 F (rouge-score) of free-text answers."""
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu
    from rouge_score import rouge_scorer

    gts = {i: [r or "<empty>"] for i, r in enumerate(references)}
    res = {i: [p or "<empty>"] for i, p in enumerate(predictions)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(1).compute_score(gts, res, verbose=0)
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    rouge = [scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(predictions, references)]
    return {"bleu1": float(bleu[0]), "rouge1": float(np.mean(rouge))}
