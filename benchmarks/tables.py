"""Helpers the paper-table benchmarks share: numbers over seeds, markdown tables, provenance."""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import time
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


def sources_md5() -> str:
    """md5 over raymed's Python files and embedded configs (names and contents): a shared working
    tree may be edited while a benchmark runs."""
    import raymed

    root, h = Path(raymed.__file__).resolve().parent, hashlib.md5()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(doc: str, sections: tuple[str, ...], rounds: int, seeds: str, quick: str) -> argparse.Namespace:
    """The paper-table benchmarks' shared command line; ``args.only`` comes back as a list of sections."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--allow-synthetic", action="store_true", help="accept synthetic stand-in image files (results flagged)")
    ap.add_argument("--only", default=",".join(sections), help="comma list among " + ",".join(sections))
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {quick}")
    args = ap.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(args.only) - set(sections):
        ap.error(f"unknown sections {sorted(unknown)}; allowed: {','.join(sections)}")
    return args


def run_sections(bench, sections: tuple[str, ...], only: list[str], name: str) -> None:
    """Run the chosen sections in order (``bench.<section>()``), saving after each."""
    start = time.time()
    for section in sections:
        if section in only:
            getattr(bench, section)()
            bench.save()
    print(f"\n{len(bench.runs)} runs in {time.time() - start:.0f}s; wrote {bench.out / f'{name}.json'} and {bench.out / f'{name}.md'}")
