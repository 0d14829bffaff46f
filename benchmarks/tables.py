"""Helpers the paper-table benchmarks share: numbers over seeds, markdown tables, provenance."""

from __future__ import annotations

import argparse
import hashlib
import sys
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


def fmt(v: float | None, digits: int = 3) -> str:
    """A number, or '—' when there is none."""
    return "—" if v is None else f"{v:.{digits}f}"


BELOW = "▼"  # a cell at or below its baseline (what a model that learned nothing scores)


def flagged(cell: str, below: bool) -> str:
    """A table cell, marked when its value is at or below its baseline."""
    return f"{cell} {BELOW}" if below else cell


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


def parse_args(doc: str, sections: tuple[str, ...], rounds: int | None, seeds: str, quick: str, extra=None,
               default_sections: tuple[str, ...] | None = None) -> argparse.Namespace:
    """The paper-table benchmarks' shared command line; ``args.only`` comes back as a list of sections
    (``default_sections`` when not given: all). ``extra(parser)`` adds a benchmark's own arguments."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(ap)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--allow-synthetic", action="store_true", help="accept synthetic stand-in image files (results flagged)")
    ap.add_argument("--only", default=",".join(default_sections or sections), help="comma list among " + ",".join(sections))
    ap.add_argument("--quick", action="store_true", help="smoke test: " + quick.replace("%", "%%"))  # argparse %-formats help
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


class PaperBench:
    """What the paper-table benchmarks share: the run settings from :func:`parse_args`, one federation
    run (refusing synthetic stand-ins unless allowed), and the tables kept for the JSON and markdown.
    Subclasses set ``config`` (an embedded experiment or None for the default), ``runs_folder`` and
    ``quick`` (the overrides of ``--quick``)."""

    config: str | None = None
    runs_folder: str = "runs"
    quick: tuple[str, ...] = ()
    result: str = ""  # <out>/<result>.json and .md (subclasses using the default save)
    title: str = ""
    note: str = ""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.rounds = 1 if args.quick else args.rounds
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        self.seeds = seeds[:1] if args.quick else seeds
        self.common = [f"rounds={self.rounds}", f"eval.every={self.rounds}", "ray.dashboard=false", f"output_dir={self.out / self.runs_folder}"]
        self.tail = [*(self.quick if args.quick else []), *args.overrides]  # after a row's own overrides
        self.runs: list[dict] = []
        self.below_baseline: list[dict] = []  # runs with a reported test metric at or below its baseline
        self.tables: dict[str, dict] = {}
        self.synthetic = False
        self.sources = sources_md5()  # a shared working tree may be edited while the benchmark runs

    def federation(self, overrides: list[str]):
        """Run one federation of ``config`` with ``overrides``: (its config, its run as read back, wall seconds)."""
        from raymed.experiment import load_config
        from raymed.engine import run_experiment
        from raymed.results import read_run

        cfg = load_config(self.config, [*self.common, *overrides, *self.tail])
        start = time.time()
        run = read_run(run_experiment(cfg))
        wall = time.time() - start
        if run["meta"]["synthetic"]:
            if not self.args.allow_synthetic:
                sys.exit("synthetic stand-ins found instead of the real data files; set RAYMED_DATA_DIR (or pass --allow-synthetic)")
            self.synthetic = True
        return cfg, run, wall

    def selected(self, run: dict) -> dict:
        """Every metric of ``run``'s round selected on validation (its last evaluated round when it
        logs no validation metric); test metrics at or below their baseline (a model that learned
        nothing) are recorded for the tables' baseline check."""
        from raymed.results.baselines import at_or_below
        from raymed.results.report import baselines_of, selected_metrics

        chosen, base = selected_metrics(run), baselines_of(run)
        below = sorted(k for k, v in chosen.items() if not k.startswith("val/") and at_or_below(k, number(v), base))
        if below:
            self.below_baseline.append({"run": str(run["dir"]), "round": chosen.get("selected_round"), "metrics": below,
                                        "baselines": {k: base[k] for k in below}})
        return chosen

    def baseline_check(self) -> str:
        """Markdown: which runs reported a test metric at or below its baseline."""
        if not self.below_baseline:
            return "\n### Baseline check\n\nNo reported test metric is at or below its baseline (majority class; personal: each client's own majority).\n"
        lines = [f"- `{Path(b['run']).name}` (round {b['round']}): " + ", ".join(f"{m} {BELOW} (baseline {b['baselines'][m]:.3f})" for m in b["metrics"])
                 for b in self.below_baseline]
        return "\n### Baseline check\n\nTest metrics at or below their baseline (majority class; personal: each client's own majority):\n\n" + "\n".join(lines) + "\n"

    def add_table(self, name: str, title: str, header: list[str], rows: list[dict], cells, note: str = "") -> None:
        """``rows``: aggregated rows (kept in the JSON); ``cells(row)``: the row's markdown cells."""
        text = f"### {title}\n\n" + md_table(header, [cells(r) for r in rows]) + (f"\n{note}\n" if note else "")
        self.tables[name] = {"title": title, "rows": rows, "markdown": text}
        print("\n" + text, flush=True)

    def sources_changed(self) -> bool:
        return sources_md5() != self.sources


    def save(self) -> None:
        self.write(self.result, self.title, self.note)

    def write(self, name: str, title: str, note: str, **settings) -> None:
        """``<out>/<name>.json`` (settings, tables, runs) and ``<name>.md`` (a header, then the tables);
        ``settings`` adds to the shared ones (config, rounds, seeds, commit, machine, data, sources)."""
        import json
        import os
        from datetime import datetime

        self.out.mkdir(parents=True, exist_ok=True)
        changed = self.sources_changed()
        settings = {"config": self.config, "rounds": self.rounds, "seeds": self.seeds, "quick": self.args.quick, "set": self.args.overrides,
                    "commit": git_commit(), "cpu_cores": os.cpu_count(), "gpu": torch_cuda(), "synthetic": self.synthetic,
                    "raymed_sources_md5": self.sources, "sources_changed_during_run": changed, **settings}
        result = {"date": datetime.now().isoformat(timespec="seconds"), "settings": settings,
                  "tables": {k: {"title": t["title"], "rows": t["rows"]} for k, t in self.tables.items()}, "runs": self.runs,
                  "below_baseline": self.below_baseline}
        (self.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        head = (f"# {title} ({result['date']}, commit {settings['commit']})\n\n"
                f"config `{self.config}`, rounds {settings['rounds']}, seeds {','.join(map(str, self.seeds))}, "
                f"machine: {os.cpu_count()} CPU cores, {'GPU' if torch_cuda() else 'no GPU'}{', --quick' if self.args.quick else ''}"
                f"{', SYNTHETIC DATA: not real results' if self.synthetic else ''}"
                f"{', RAYMED SOURCES CHANGED DURING THE BENCHMARK: runs used different code' if changed else ''}. {note}\n")
        (self.out / f"{name}.md").write_text(head + "".join("\n" + t["markdown"] for t in self.tables.values()) + self.baseline_check())
