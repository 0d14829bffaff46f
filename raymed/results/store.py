"""A run's folder: the resolved config, per-round and per-client metrics as Parquet, a summary.

::

    config.yaml              the resolved config (every default filled in); rerunnable as is
    meta.json                data files and md5s, synthetic flag, shard set, workers, versions, and
                             provenance: raymed's version, the git commit (and whether it had
                             uncommitted changes), the command line
    rounds.parquet           one row per round (rewritten atomically after every round)
    clients/round-NNNN.parquet      per-client training records of round NNNN
    evaluation/round-NNNN.parquet   per-client personalised metrics (on evaluation rounds)
    reports/round-NNNN.jsonl        report generation: sample generated reports beside their references
    summary.md               the result tables (runs; model x dataset rows, a column per metric, baselines)
    tensorboard/, mlflow.db, mlartifacts/, wandb/   the trackers of logging.to (:mod:`raymed.results.trackers`)
    summary.json             status (completed / failed: why / interrupted), the round selected on
                             validation and its metrics, the last round's metrics, baselines, wall time
    checkpoint.safetensors   the checkpoint (every engine.checkpoint_every rounds): server state,
                             clients' persistent state, metrics so far; `raymed run --resume DIR`
    model.safetensors        the server's weights when the run ends (with the backbone's name, the
                             tasks and the strategy as metadata: :mod:`raymed.models.pretrained`)
    model-selected.safetensors  the server's weights at the round selected on validation

Everything is written as soon as it exists (temporary file, then rename), so a run that fails or
is interrupted keeps every finished round.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import uuid
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raymed.config import ExperimentConfig, save_config
from raymed.errors import ConfigError, OutputError
from raymed.provenance import provenance
from raymed.files import atomic_path, atomic_write
from raymed.results.report import summary_markdown
from raymed.results.runs import read_run
from raymed.results.trackers import Trackers


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table; a column with no value this round (no client failed) is typed as text, so
    the rounds' files still read as one dataset."""
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
    return table.cast(schema)


def _atomic_json(data: Any, path: Path) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=str))


def check_writable(folder: str | Path, key: str = "output_dir") -> None:
    """Refuse, in one line before anything starts, a folder raymed cannot write into: a file in its
    place or above it, no permission, a read-only or full file system. Nothing is created: a small
    probe file in the folder (or its nearest existing parent) is removed at once."""
    import errno
    import tempfile


    folder = Path(folder)
    setter = f" (--set {key}=...)" if " " not in key else ""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:  # the folder is made later, when the run starts
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise OutputError(f"{key} {folder}: {existing} is a file, not a folder; move the file or choose another folder{setter}")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".raymed-probe-") as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        hint = "free space, or choose another folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you can write"
        raise OutputError(f"{key} {folder} cannot be written ({exc.strerror or exc}); {hint}{setter}") from None


LOCK_FILE = ".lock"


class RunLock:
    """A run folder is written by one process at a time: ``.lock`` holds the writer's pid and host.
    A second writer is refused in one line naming the holder; the lock of a process that is gone
    (killed, crashed) is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.held = False

    @classmethod
    def ensure_free(cls, folder: str | Path) -> None:
        """Refuse (one line) a folder that another live process writes (checked before a resume starts Ray)."""
        holder = cls(Path(folder)).holder()
        if holder is not None and holder != (os.getpid(), socket.gethostname()):
            pid, host = holder
            raise ConfigError(
                f"run folder {folder} is in use by process {pid} on {host} (its {LOCK_FILE}); wait for it to finish or stop it, then resume"
            )

    @classmethod
    def acquire(cls, folder: str | Path) -> RunLock:
        lock = cls(Path(folder))
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(3):
            try:
                fd = os.open(lock.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cls.ensure_free(folder)
                lock.path.unlink(missing_ok=True)  # its writer is gone (or is this process): take the lock over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            lock.held = True
            return lock
        raise ConfigError(f"could not lock run folder {folder}: another process keeps taking {LOCK_FILE}")

    def holder(self) -> tuple[int, str] | None:
        """(pid, host) of a live writer holding the lock, or None when nobody alive holds it."""
        try:
            pid_text, _, host = self.path.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if host.strip() != socket.gethostname():
            return pid, host.strip()  # another machine's process: cannot tell, so it holds
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid, host.strip()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def run_id_of(folder: str | Path) -> str | None:
    """The run id in a run folder's meta.json (None for a folder without one)."""
    try:
        return json.loads((Path(folder) / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


class RunWriter:
    def __init__(self, cfg: ExperimentConfig, meta: dict[str, Any]):
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir) / f"{cfg.run_name}-{stamp}"
        folder, n = base, 1
        while True:
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                folder = base.with_name(f"{base.name}-{n}")
        self.dir = folder
        self.lock = RunLock.acquire(folder)
        self.started = time.time()
        self.rounds: list[dict[str, float]] = []
        save_config(cfg, folder / "config.yaml")
        import ray
        import torch

        self.meta = {
            **meta,
            "run": folder.name,
            "run_id": uuid.uuid4().hex,  # the checkpoint carries it: a resume refuses another run's checkpoint
            "started": datetime.now().isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
            "provenance": provenance(),
        }
        _atomic_json(self.meta, folder / "meta.json")
        self._open_trackers(cfg, None)

    def _open_trackers(self, cfg: ExperimentConfig, saved: dict[str, Any] | None) -> None:
        """The run's trackers (``logging.to``); their run ids go into meta.json for a resume."""
        try:
            self.trackers = Trackers(cfg, self.dir, saved)
        except BaseException:
            self.lock.release()
            raise
        if self.trackers.state:
            self.add_meta(trackers=self.trackers.state)

    @classmethod
    def reopen(cls, cfg: ExperimentConfig, folder: str | Path, meta: dict[str, Any]) -> RunWriter:
        """The writer of an existing run folder, to resume it: its config (rounds may have grown)
        and meta are rewritten, its finished rounds come from the checkpoint (:meth:`restore_rounds`)."""
        self = cls.__new__(cls)
        self.dir = Path(folder)
        self.lock = RunLock.acquire(self.dir)
        self.started = time.time()
        self.rounds = []
        try:  # a write that fails (a full disk) leaves the old file whole and the folder unlocked
            save_config(cfg, self.dir / "config.yaml")
            old = json.loads((self.dir / "meta.json").read_text()) if (self.dir / "meta.json").is_file() else {}
            resumed = [*old.get("resumed", []), datetime.now().isoformat(timespec="seconds")]
            self.meta = {**old, **meta, "resumed": resumed}
            _atomic_json(self.meta, self.dir / "meta.json")
        except BaseException:
            self.lock.release()
            raise
        self._open_trackers(cfg, old.get("trackers"))
        return self

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id") or self.dir.name)

    def add_meta(self, **items: Any) -> None:
        self.meta.update(items)
        _atomic_json(self.meta, self.dir / "meta.json")

    def log_round(self, result: dict[str, Any]) -> None:
        metrics = result["metrics"]
        self._write_rounds([*self.rounds, metrics])
        self.rounds.append(metrics)  # only once on disk: summary.json's count always agrees with rounds.parquet
        self.trackers.log(metrics)
        r = int(metrics["round"])
        for part in ("clients", "evaluation"):
            if result.get(part):
                (self.dir / part).mkdir(exist_ok=True)
                _atomic_parquet(_table(result[part]), self.dir / part / f"round-{r:04d}.parquet")
        if result.get("samples"):  # generated reports beside their references
            (self.dir / "reports").mkdir(exist_ok=True)
            atomic_write(self.dir / "reports" / f"round-{r:04d}.jsonl", "".join(json.dumps(row) + "\n" for row in result["samples"]))

    def restore_rounds(self, rounds: list[dict[str, float]]) -> None:
        """Start from the rounds of a checkpoint (their per-client files stay in the earlier run's folder)."""
        self.rounds = list(rounds)
        if self.rounds:
            self._write_rounds()

    def _write_rounds(self, rounds: list[dict[str, float]] | None = None) -> None:
        rows = self.rounds if rounds is None else rounds
        _atomic_parquet(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), self.dir / "rounds.parquet")

    def finish(self, status: str, **extra: Any) -> dict[str, Any]:
        """summary.json: the status, the last round's metrics (``final``) and what the driver adds:
        the round selected on validation with its metrics (``selected``), the baselines."""
        summary = {
            "status": status,
            "rounds_completed": len(self.rounds),
            "wall_time_s": round(time.time() - self.started, 2),
            "final": self.rounds[-1] if self.rounds else {},
            **extra,
        }
        _atomic_json(summary, self.dir / "summary.json")
        if self.rounds:
            self._write_summary_md()
        self.trackers.finish(status)  # after the summary files: they go to the trackers as artifacts
        self.lock.release()
        return summary

    def _write_summary_md(self) -> None:
        """summary.md: the run's result tables as the terminal shows them, in Markdown."""
        try:
            atomic_write(self.dir / "summary.md", summary_markdown([read_run(self.dir)]))
        except OSError as exc:  # summary.json and rounds.parquet hold the same numbers
            logging.getLogger("raymed").warning("summary.md not written in %s: %s", self.dir, exc)
