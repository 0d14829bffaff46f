"""Faults beyond a client's crash, as a user meets them: real signals to the driver, Ray actors
killed, a worker lost while it evaluates, a driver gone before its summary, a disk that fills up.
Each ends in one ``raymed:`` line with the right exit status (2: input or environment; 143:
SIGTERM), or in a run that finishes, and the run folder always agrees with itself: summary.json
is written, its round count is rounds.parquet's, no lock or temporary file stays behind."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from raymed.cli import main
from raymed.engine import run_experiment
from raymed.engine.federation import resume_experiment
from tests.conftest import small_config

ALL_CLIENTS = ("clients.fraction=1.0",)


def _consistent(run_dir: Path) -> dict:
    """The run folder agrees with itself; returns its summary."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    assert summary["rounds_completed"] == len(rounds), (summary, rounds["round"].tolist())
    assert rounds["round"].tolist() == list(range(1, len(rounds) + 1))
    assert not (run_dir / ".lock").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")], list(run_dir.rglob("*.tmp"))
    return summary


def _start(tmp_path: Path, cfg: dict, *extra: str, home: Path | None = None) -> subprocess.Popen:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAYMED_DEBUG", "RAY_AUTH_TOKEN_PATH")}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.Popen([sys.executable, "-m", "raymed", "run", str(path), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _wait_for_round(proc: subprocess.Popen, r: int, total: int) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f" round {r}/{total} " in line:
            return seen
    raise AssertionError(f"the run ended before round {r}: {''.join(seen)[-2000:]} {proc.stderr.read()[-2000:]}")


def _raymed_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("raymed: ")]


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir


@pytest.mark.slow
def test_sigterm_ends_a_run_as_ctrl_c_does_with_exit_143_and_a_private_token(data_dir, tmp_path):
    """A scheduler's SIGTERM mid-run: exit 143, one line, no native stack dump, summary.json written
    and consistent, no stale lock. The Ray token this run's Ray wrote is readable by its owner only."""
    home = tmp_path / "home"
    home.mkdir()
    cfg = small_config(data_dir, tmp_path, "rounds=8").to_dict()
    proc = _start(tmp_path, cfg, home=home)
    _wait_for_round(proc, 1, 8)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (proc.returncode, err[-3000:])
    assert "SIGTERM received" not in err and "PC: @" not in err and "Traceback" not in err, err[-3000:]
    lines = _raymed_lines(err)
    assert len(lines) == 1 and "terminated (SIGTERM)" in lines[0] and "--resume" in lines[0], err[-2000:]
    summary = _consistent(_run_dir(tmp_path))
    assert summary["status"] == "interrupted (SIGTERM)" and 1 <= summary["rounds_completed"] < 8
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_a_killed_server_actor_says_how_to_resume_and_the_resume_finishes(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "rounds=6").to_dict()
    proc = _start(tmp_path, cfg)
    _wait_for_round(proc, 2, 6)  # round 1's checkpoint is on disk once round 2 has begun its own
    driver = psutil.Process(proc.pid)
    servers = [p for p in driver.children(recursive=True) if "ServerActor" in " ".join(p.cmdline())]
    assert servers, [" ".join(p.cmdline())[:80] for p in driver.children(recursive=True)]
    for p in servers:
        p.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    lines = _raymed_lines(err)
    run_dir = _run_dir(tmp_path)
    assert len(lines) == 1 and lines[0].startswith("raymed: run failed: an actor of the run died"), err[-2000:]
    assert f"raymed run --resume {run_dir}" in lines[0] and "Traceback" not in err
    summary = _consistent(run_dir)
    assert summary["status"].startswith("failed")
    resumed = subprocess.run([sys.executable, "-m", "raymed", "run", "--resume", str(run_dir), "--quiet"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _consistent(run_dir)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 6


def test_a_worker_killed_while_evaluating_is_replaced_and_the_evaluation_retried(data_dir, tmp_path, ray_session):
    crash = ("faults.crash.clients=[1]", "faults.crash.kind=exit", "faults.crash.rounds=[1]", "faults.crash.during=evaluation")
    cfg = small_config(data_dir, tmp_path, *crash, "engine.num_workers=2", *ALL_CLIENTS)
    run_dir = run_experiment(cfg)
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    assert rounds["personal/client_mean/acc"].notna().all() and len(rounds) == 2
    evaluated = pq.read_table(run_dir / "evaluation").to_pandas()
    first = evaluated[evaluated["round"] == 1]
    # every client's rows were evaluated in round 1, the dead worker's share again on its replacement,
    # on both splits: a lost chunk would leave clients or splits out
    assert set(first["client_id"]) == set(range(cfg.clients.num)) and set(first["split"]) == {"val", "test"}
    assert len(first) == len(evaluated[evaluated["round"] == 2])
    assert _consistent(run_dir)["status"] == "completed"
    # with policy stop, the same loss stops the run, saying why and how to go on
    cfg = small_config(data_dir, tmp_path, *crash, "engine.num_workers=2", "engine.on_client_failure=stop", *ALL_CLIENTS)
    from raymed.errors import ClientFailure

    with pytest.raises(ClientFailure, match="died while evaluating personalised models"):
        run_experiment(cfg)


def test_a_driver_gone_before_its_summary_is_finished_by_resume(data_dir, tmp_path, ray_session):
    """Killed after the last checkpoint but before summary.json and the model files: --resume finishes it."""
    run_dir = run_experiment(small_config(data_dir, tmp_path))
    for name in ("summary.json", "summary.md", "model.safetensors", "model-selected.safetensors"):
        (run_dir / name).unlink()
    (run_dir / ".lock").write_text("999999 " + os.uname().nodename)  # the dead driver's lock
    resume_experiment(run_dir)
    summary = _consistent(run_dir)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "summary.md").is_file()


def _full_disk(monkeypatch, when) -> None:
    """The driver's checkpoint head write fails with ENOSPC (as on a full disk) once ``when(round)``."""
    from raymed.engine import federation

    real = federation.save_checkpoint

    def save(folder, run_id, saved):
        if when(saved["server"].round):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "checkpoint.safetensors"))
        return real(folder, run_id, saved)

    monkeypatch.setattr(federation, "save_checkpoint", save)


def test_a_disk_full_mid_run_stops_at_once_in_one_line_with_a_consistent_folder(data_dir, tmp_path, ray_session, monkeypatch, capsys):
    _full_disk(monkeypatch, lambda r: r >= 2)
    cfg = small_config(data_dir, tmp_path, "rounds=5").to_dict()
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("RAYMED_DEBUG", raising=False)
    status = main(["run", str(path), "--quiet"])
    err = capsys.readouterr().err
    lines = _raymed_lines(err)
    assert status == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("raymed: output error: No space left on device") and "checkpoint.safetensors" in lines[0]
    summary = _consistent(_run_dir(tmp_path))
    # the failed checkpoint (after round 2) stops the run before round 4 trains, not at the end
    assert summary["status"].startswith("failed") and "No space left on device" in summary["status"]
    assert summary["rounds_completed"] <= 3


def test_a_full_disk_on_resume_is_one_line_before_ray_starts_and_leaves_the_folder_as_it_was(data_dir, tmp_path, ray_session, monkeypatch, capsys):
    run_dir = run_experiment(small_config(data_dir, tmp_path))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    monkeypatch.delenv("RAYMED_DEBUG", raising=False)
    status = main(["run", "--resume", str(run_dir), "--set", "rounds=4"])
    monkeypatch.undo()
    lines = _raymed_lines(capsys.readouterr().err)
    assert status == 2 and len(lines) == 1 and "cannot be written (No space left on device); free space" in lines[0], lines
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_the_ray_token_is_made_private_and_a_readable_one_is_named(tmp_path, monkeypatch, caplog):
    from raymed.engine import runtime

    token = tmp_path / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    token.write_text("secret")
    token.chmod(0o644)
    runtime._guard_token(existed=False)  # Ray just wrote it
    assert token.stat().st_mode & 0o777 == 0o600
    token.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="raymed"):
        runtime._guard_token(existed=True)  # the user's own file: named, left as it is
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text
    assert token.stat().st_mode & 0o777 == 0o644
