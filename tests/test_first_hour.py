"""The first hour of a new user: their own data through the embedded default with --set only, a
result table readable in a log, `raymed report` on the folder the default run writes, and --help
that names what ships."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raymed import cli
from raymed.config import embedded_config_descriptions, embedded_configs


def _raymed(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("RAYMED_DEBUG", None)
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "raymed", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def own_npz(path: Path, classes: int = 3, rows: tuple[int, int, int] = (120, 30, 30), seed: int = 0) -> Path:
    """A MedMNIST-layout file whose classes a CNN can tell apart (brightness by class)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), rows):
        y = np.arange(n) % classes
        arrays[f"{split}_images"] = (rng.integers(0, 50, (n, 28, 28)) + y[:, None, None] * (200 // classes)).astype(np.uint8)
        arrays[f"{split}_labels"] = y.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def own_images(folder: Path, per_class: int = 40, rgb: bool = False) -> tuple[Path, Path]:
    """A folder of class sub-folders (PNG files) and a CSV (path,label) over the same images."""
    from PIL import Image

    rng = np.random.default_rng(1)
    lines = ["path,label"]
    for label, name in enumerate(("benign", "malignant")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.integers(0, 60, (20, 20, 3) if rgb else (20, 20)) + 150 * label).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
            lines.append(f"{name}/{i}.png,{name}")
    csv = folder / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return folder, csv


def test_embedded_default_takes_own_data_from_every_source_with_no_config_file(tmp_path, monkeypatch):
    """--set data.files=… data.datasets=[…] alone: each source says it is present, nothing is asked
    of MedMNIST (no download URL, no synthetic stand-in)."""
    npz = own_npz(tmp_path / "mine.npz")
    folder, csv = own_images(tmp_path / "imgs")
    monkeypatch.setenv("RAYMED_DATA_DIR", str(tmp_path / "nowhere"))
    for name, path in (("mine", npz), ("folder", folder), ("table", csv)):
        configs = cli._embedded_default([f"data.files={{{name}: {path}}}", f"data.datasets=[{name}]", f"output_dir={tmp_path}/results"])
        assert [c.strategy.name for c in configs] == ["fedavg", "fedper"]
        assert all(c.data.datasets == [name] and c.data.root is None for c in configs)  # no synthetic root
    assert not (tmp_path / "results").exists()


def test_embedded_default_leaves_out_missing_medmnist_beside_own_data(tmp_path, monkeypatch, capsys):
    from raymed.data import medmnist_files

    monkeypatch.setattr(medmnist_files, "online", lambda *a, **k: False)
    monkeypatch.setenv("RAYMED_DATA_DIR", str(tmp_path / "nowhere"))
    npz = own_npz(tmp_path / "mine.npz")
    configs = cli._embedded_default([f"data.files={{mine: {npz}}}", "data.datasets=[mine,dermamnist]", f"output_dir={tmp_path}/results"])
    assert configs[0].data.datasets == ["mine"]
    said = "".join(capsys.readouterr().out.split())
    assert "leftout:dermamnist" in said and "SYNTHETIC" not in said


def test_embedded_default_with_a_missing_own_file_is_one_line(tmp_path):
    proc = _raymed("run", "--set", f"data.files={{mine: {tmp_path / 'absent.npz'}}}", "--set", "data.datasets=[mine]", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("raymed: data error: data.files.mine") and "does not exist" in lines[0]
    assert "KeyError" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_own_npz_folder_and_csv_run_through_the_embedded_default_into_a_readable_log(tmp_path):
    """The quickest own-data path, as a user types it with output to a log: it completes, and the
    final table names every metric and dataset in full (no cut names), with summary.md beside it."""
    npz = own_npz(tmp_path / "mine.npz")
    folder, _ = own_images(tmp_path / "imgs")
    _, csv = own_images(tmp_path / "rgb", rgb=True)
    files = f"data.files={{mine: {npz}, scans: {folder}, photos: {csv}}}"
    proc = _raymed(
        "run", "--set", files, "--set", "data.datasets=[mine,scans,photos]", "--set", "rounds=2", "--set", "clients.num=6",
        "--set", "clients.local_steps=3", "--set", "ray.num_cpus=2", "--set", "ray.dashboard=false", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "…" not in out  # Rich cuts names with an ellipsis; nothing may be cut
    for word in ("mine", "scans", "photos", "acc", "auc", "f1", "mean of clients", "baseline", "fedavg", "fedper"):
        assert word in out, word
    runs = sorted(p for p in (tmp_path / "results").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("-")[0] for p in runs] == ["fedavg", "fedper"]
    for run in runs:
        assert f"{run.relative_to(tmp_path)}" in out  # each full folder name, once below the table
        md = (run / "summary.md").read_text()
        assert "| model | dataset | run | acc | auc | f1 |" in md and "| personal | scans |" in md
    # `raymed report results/`: the folder the default run wrote its two runs into
    (tmp_path / "results" / "notes.txt").write_text("not a run")
    rep = _raymed("report", "results", "--out", "cmp.png", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    assert "fedavg" in rep.stdout and "fedper" in rep.stdout and (tmp_path / "cmp.png").is_file()


def test_report_finds_runs_beneath_a_folder_and_refuses_one_without(tmp_path):
    from raymed.errors import RaymedError
    from raymed.results.report import run_folders

    for name in ("sweep/trial_1/run-a", "sweep/trial_2/run-b", "other/not-a-run"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("sweep/trial_1/run-a", "sweep/trial_2/run-b"):
        (tmp_path / name / "rounds.parquet").write_bytes(b"")
        (tmp_path / name / "config.yaml").write_text("{}")
    (tmp_path / "sweep" / "basic-variant-state.json").write_text("{}")
    assert run_folders([tmp_path / "sweep"]) == [tmp_path / "sweep/trial_1/run-a", tmp_path / "sweep/trial_2/run-b"]
    assert run_folders([tmp_path / "sweep/trial_1/run-a", tmp_path / "sweep"]) == [tmp_path / "sweep/trial_1/run-a", tmp_path / "sweep/trial_2/run-b"]
    with pytest.raises(RaymedError, match="holds no rounds.parquet, in it or beneath it"):
        run_folders([tmp_path / "other"])
    with pytest.raises(RaymedError, match="is not a folder"):
        run_folders([tmp_path / "absent"])


def test_run_help_lists_every_shipped_config_with_its_description_and_raymed_debug():
    proc = subprocess.run([sys.executable, "-m", "raymed", "run", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    described = embedded_config_descriptions()
    assert set(described) == set(embedded_configs()) and len(described) >= 5
    for name, text in described.items():
        assert text, f"{name}.yaml has no one-line description in its first comment line"
        assert f"{name}  " in proc.stdout and text in " ".join(proc.stdout.split()), name
    assert "RAYMED_DEBUG=1" in proc.stdout
    top = subprocess.run([sys.executable, "-m", "raymed", "--help"], capture_output=True, text=True)
    assert "RAYMED_DEBUG=1" in top.stdout


def test_a_minimal_yaml_trains_with_the_embedded_default_recipe(tmp_path):
    """One set of defaults: a YAML with only the datasets and the strategy gets the embedded
    default's training recipe; the default file sets only its data, partition, pace and backbone
    (cnn: its three modalities would share BatchNorm statistics; the schema's default is cnn_bn)."""
    from raymed.experiment import load_config

    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  datasets: [breastmnist, pneumoniamnist, retinamnist]\nstrategy:\n  name: fedavg\n")
    mine, default = load_config(path).to_dict(), load_config(None).to_dict()
    demo = {"data": {"datasets", "download", "partition", "alpha"}, "clients": {"num", "fraction"}, "eval": {"every"}, "model": {"name"}}
    for section in ("clients", "model", "strategy", "data", "task", "server", "engine", "eval"):
        keep = lambda d: {k: v for k, v in d.items() if k not in demo.get(section, set())}  # noqa: E731
        assert keep(mine[section]) == keep(default[section]), section
    assert mine["rounds"] == default["rounds"] == 20
    assert mine["clients"]["local_steps"] == 20 and mine["strategy"]["weighting"] == "uniform" and mine["data"]["normalise"] == "dataset"
    # asking for epochs trains by epochs: the default K steps never silently override local_epochs
    assert load_config(path, ["clients.local_epochs=2"]).clients.local_steps is None
    assert load_config(path, ["clients.local_epochs=2", "clients.local_steps=5"]).clients.local_steps == 5
