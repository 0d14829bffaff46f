"""Helpers the paper-table benchmarks share: numbers over seeds, markdown tables, provenance."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np


def number(v) -> float | None:
    """``v`` as a float, or None when it is missing or NaN."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def agg(values: list) -> dict:
    values = [v for v in map(number, values) if v is not None]
    return {"mean": float(np.mean(values)) if values else None, "std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values)}


def mean_std(values: dict | list, digits: int = 2) -> str:
    """'mean ± sample std' (std only with ≥ 2 values), '—' when there is none."""
    a = values if isinstance(values, dict) else agg(values)
    if a["mean"] is None:
        return "—"
    return f"{a['mean']:.{digits}f}" + ("" if a["std"] is None else f" ± {a['std']:.{digits}f}")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def git_commit() -> str | None:
    """The checkout's short commit, '+dirty' when tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
