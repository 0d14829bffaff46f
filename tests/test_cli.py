"""The command line as a user meets it: one-line errors with exit status 2, and a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import raymed as raymed_package
from raymed import __version__ as raymed_version
from tests.conftest import small_config


def raymed(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("RAYMED_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "raymed", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymed: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _write_config(tmp_path, cfg_dict) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    return str(path)


def test_bad_config_is_one_line(tmp_path):
    path = _write_config(tmp_path, {"rounds": 2, "clients": {"num": 4, "fration": 0.5}})
    _assert_one_line_error(raymed("run", path), "config error", "clients.fration", "clients.fraction")
    good = _write_config(tmp_path, {"rounds": 2})
    _assert_one_line_error(raymed("run", good, "--set", "strategy.name=fedbest"), "strategy.name", "allowed: ", "fedavg, ")
    (tmp_path / "broken.yaml").write_text("rounds: [2\n")
    _assert_one_line_error(raymed("run", str(tmp_path / "broken.yaml")), "not valid YAML")
    _assert_one_line_error(raymed("run", str(tmp_path / "absent.yaml")), "does not exist")


def test_corrupt_and_missing_data_are_one_line(data_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "pneumoniamnist.npz").write_bytes((data_dir / "pneumoniamnist.npz").read_bytes()[:20000])
    cfg = small_config(data_dir, tmp_path).to_dict()
    cfg["data"]["root"] = str(bad_dir)
    path = _write_config(tmp_path, cfg)
    env = {"RAYMED_DATA_DIR": str(tmp_path / "nowhere")}
    _assert_one_line_error(raymed("run", path, env_extra=env), "data error", "pneumoniamnist.npz is corrupt")
    _assert_one_line_error(
        raymed("run", path, "--set", "data.datasets=[dermamnist]", env_extra=env), "dermamnist.npz not found", str(bad_dir)
    )
    assert not (tmp_path / "results").exists()  # refused before any result folder was made


@pytest.mark.slow
def test_run_and_report_end_to_end(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedper").to_dict()
    proc = raymed("run", _write_config(tmp_path, cfg), "--set", "rounds=2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "results").glob("fedper-seed3-*") if p.is_dir()]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["rounds"] == 2 and saved["strategy"] == {"name": "fedper", "server_lr": 1.0, "weighting": "uniform", "personal_layers": ["heads."]}
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    assert rounds["round"].tolist() == [1, 2]
    assert (rounds["comm/bytes_up"] > 0).all() and rounds["personal/client_mean/acc"].between(0, 1).all()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert len(pq.read_table(run_dir / "evaluation").to_pandas()) >= 6  # each client sampled so far, val and held-out rows
    assert "selected on validation" in proc.stdout
    assert "data breastmnist: " in proc.stdout and "train/val/test rows" in proc.stdout  # the data summary at start
    meta = json.loads((run_dir / "meta.json").read_text())  # where the result came from
    assert meta["provenance"]["raymed"] == raymed_version and meta["provenance"]["command"].startswith("raymed run ")
    if (Path(raymed_package.__file__).parents[1] / ".git").exists():
        assert len(meta["provenance"]["git_commit"]) == 40
    for flag, split in meta["splits"].items():
        assert sum(split["class_counts"]["train"]) == split["num_train"] and sum(split["class_counts"]["test"]) == split["num_test"], flag

    report = raymed("report", str(run_dir), "--out", str(tmp_path / "r.png"))
    assert report.returncode == 0 and (tmp_path / "r.png").stat().st_size > 10_000
    assert "mean of clients" in report.stdout and "fedper" in report.stdout and str(run_dir) in report.stdout
    assert (run_dir / "summary.md").is_file()
    (tmp_path / "no-runs").mkdir()
    _assert_one_line_error(raymed("report", str(tmp_path / "no-runs")), "holds no rounds.parquet")


@pytest.mark.slow
def test_redirected_output_shows_each_round_while_it_runs(data_dir, tmp_path):
    """stdout to a file or pipe (a cluster job): one plain line per round, written when the round ends,
    not a progress bar that shows nothing until the run is over."""
    cfg = small_config(data_dir, tmp_path).to_dict()
    env = {k: v for k, v in os.environ.items() if k != "RAYMED_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "raymed", "run", _write_config(tmp_path, cfg), "--set", "rounds=3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen, running_at_first = [], None
    for line in proc.stdout:
        if " round " in line and "/3 " in line:
            seen.append(line.strip())
            if running_at_first is None:
                running_at_first = proc.poll() is None  # the line came while the run went on
    proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert [line.split()[2] for line in seen] == ["1/3", "2/3", "3/3"], seen
    assert running_at_first
    assert all("global val/acc" in line and "test/acc" in line and "loss" in line for line in seen), seen


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_machine_both_complete(data_dir, tmp_path):
    """Each starts its own local Ray with its dashboard: the second takes free ports instead of dying on 8265."""
    env = {k: v for k, v in os.environ.items() if k != "RAYMED_DEBUG"}
    procs = []
    for i in range(2):
        cfg = small_config(data_dir, tmp_path / str(i), "rounds=1", "ray.dashboard=true", "ray.num_cpus=2").to_dict()
        (tmp_path / str(i)).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "raymed", "run", _write_config(tmp_path / str(i), cfg)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, (out[-2000:], err[-3000:])
    ports = [line for out, _ in outputs for line in out.splitlines() if line.startswith("ray ports:")]
    assert len(ports) == 2 and ports[0] != ports[1], ports  # each run its own dashboard and metrics ports
    for i in range(2):
        (summary,) = (tmp_path / str(i) / "results").glob("*/summary.json")
        assert json.loads(summary.read_text())["status"] == "completed"


def test_data_check_and_synth(tmp_path):
    proc = raymed("data", "synth", "--out", str(tmp_path), "--scale", "0.02", "breastmnist")
    assert proc.returncode == 0 and (tmp_path / "breastmnist.npz").is_file()
    check = raymed("data", "check", "--root", str(tmp_path), env_extra={"COLUMNS": "200"})
    assert check.returncode == 0 and "synthetic" in check.stdout and "breastmnist" in check.stdout


def test_version_names_the_release_and_the_commit():
    proc = raymed("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"raymed {raymed_version}")
    if (Path(raymed_package.__file__).parents[1] / ".git").exists():
        assert "(git " in proc.stdout


def test_own_data_errors_are_one_line_and_write_nothing(data_dir, tmp_path):
    import numpy as np

    broken = tmp_path / "mine.npz"
    np.savez(broken, train_images=np.zeros((4, 28, 28), np.uint8))
    cfg = small_config(data_dir, tmp_path).to_dict()
    cfg["data"].update(files={"mine": str(broken)}, datasets=["mine"])
    _assert_one_line_error(raymed("run", _write_config(tmp_path, cfg)), "data error", str(broken), "no key train_labels")
    cfg["data"]["files"] = {"mine": str(tmp_path / "absent.npz")}
    _assert_one_line_error(raymed("run", _write_config(tmp_path, cfg)), "data.files.mine", "does not exist")
    assert not (tmp_path / "results").exists()


def test_embedded_default_downloads_when_online_and_says_why_it_falls_back_when_not(tmp_path, monkeypatch, capsys):
    """data.download: auto (the embedded default): a missing file is fetched when the network answers;
    offline, the run goes on synthetic stand-ins and the red line names the files and where it looked."""
    import medmnist.info

    from raymed import cli
    from raymed.data import medmnist_files

    empty = tmp_path / "nowhere"
    monkeypatch.setenv("RAYMED_DATA_DIR", str(empty))
    monkeypatch.setattr(medmnist.info, "DEFAULT_ROOT", str(tmp_path / "medmnist-home"))
    base = [f"output_dir={tmp_path / 'results'}", f"data.root={tmp_path / 'root'}"]

    monkeypatch.setattr(medmnist_files, "online", lambda *a, **k: False)
    configs = cli._embedded_default(base)
    said = "".join(capsys.readouterr().out.split())  # the console wraps long lines anywhere
    assert "SYNTHETIC" in said and "nonetwork" in said and "pneumoniamnist.npz" in said and str(empty) in said
    assert all(c.data.root.endswith(".synthetic-data") for c in configs)

    fetched = []

    def fake_download(flag, size, directory):  # what medmnist's download leaves behind, without the network
        fetched.append(flag)
        return medmnist_files.verify(medmnist_files.write_synthetic(flag, directory, scale=0.02), flag, size)

    monkeypatch.setattr(medmnist_files, "online", lambda *a, **k: True)
    monkeypatch.setattr(medmnist_files, "_download", fake_download)
    configs = cli._embedded_default(base)
    assert fetched == ["pneumoniamnist", "breastmnist", "retinamnist"]
    assert "downloading" in capsys.readouterr().out and configs[0].data.datasets == fetched
