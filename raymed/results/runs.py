"""Reading a run folder back: its config, meta, rounds table and summary (written by
:class:`~raymed.results.store.RunWriter`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raymed.config import safe_yaml
from raymed.errors import RaymedError


def read_run(folder: str | Path) -> dict[str, Any]:
    """A finished (or partial) run: its config, meta, rounds table and summary."""
    folder = Path(folder)
    if not (folder / "rounds.parquet").is_file():
        raise RaymedError(f"{folder} holds no rounds.parquet; give the folder of a raymed run")
    def read(name: str, parse: Any, default: Any = None) -> Any:
        path = folder / name
        if default is not None and not path.exists():
            return default
        try:
            return parse(path)
        except Exception as exc:  # pyarrow, json and YAML errors, a missing file
            why = "is missing" if isinstance(exc, FileNotFoundError) else f"is corrupt ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
            raise RaymedError(f"{path} {why}; this run folder cannot be read: restore the file from a copy, or leave the run out") from None

    return {
        "dir": folder,
        "config": read("config.yaml", lambda p: safe_yaml(p.read_text(), str(p)) or {}),
        "meta": read("meta.json", lambda p: json.loads(p.read_text())),
        "rounds": read("rounds.parquet", lambda p: pq.read_table(p).to_pandas()),
        "summary": read("summary.json", lambda p: json.loads(p.read_text()), default={}),
    }
