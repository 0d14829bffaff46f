"""Bad input, as a user types it: every case ends in one line naming what is wrong and what to do,
exit status 2, no traceback, and no result folder (or, for a run folder being resumed, nothing in
it changed)."""

from __future__ import annotations

import pickle
import socket
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from raymed.cli import main
from tests.conftest import small_config


@dataclass
class Case:
    args: list[str]  # after `raymed`; {cfg}, {tmp}, {data} are filled in
    needles: tuple[str, ...]
    setup: str | None = None  # what to write first (see _prepare)
    env_data: str | None = None  # RAYMED_DATA_DIR for this case ({tmp}: an empty folder)


RUN = ["run", "{cfg}"]
CASES = {
    "malformed_yaml": Case(["run", "{tmp}/broken.yaml"], ("not valid YAML at line",), setup="broken_yaml"),
    "yaml_not_a_mapping": Case(["run", "{tmp}/list.yaml"], ("must hold a mapping of config keys, got a list",), setup="list_yaml"),
    "missing_config_file": Case(["run", "{tmp}/absent.yaml"], ("does not exist", "one of raymed's: default")),
    "unknown_key": Case([*RUN, "--set", "clients.fration=0.5"], ("unknown key clients.fration", "did you mean clients.fraction?")),
    "unknown_section": Case([*RUN, "--set", "optimiser.lr=0.1"], ("unknown key optimiser", "allowed keys here")),
    "wrong_type": Case([*RUN, "--set", "rounds=ten"], ("rounds: got 'ten'", "valid integer")),
    "out_of_range": Case([*RUN, "--set", "clients.fraction=1.5"], ("clients.fraction: got 1.5", "less than or equal to 1")),
    "no_rounds": Case([*RUN, "--set", "rounds=0"], ("rounds: got 0", "greater than or equal to 1")),
    "unknown_strategy": Case([*RUN, "--set", "strategy.name=fedbest"], ("strategy.name: got 'fedbest'", "allowed: ")),
    "param_of_another_strategy": Case([*RUN, "--set", "strategy.mu=0.1"], ("unknown key strategy.mu",)),
    "unknown_dataset": Case([*RUN, "--set", "data.datasets=[pneumonia]"], ("unknown dataset 'pneumonia'", "did you mean pneumoniamnist?")),
    "unknown_model": Case([*RUN, "--set", "model.name=vit_huge"], ("model.name: got 'vit_huge'", "allowed: ")),
    "set_without_value": Case([*RUN, "--set", "rounds"], ("is not of the form key.path=value",)),
    "set_into_a_value": Case([*RUN, "--set", "rounds.max=3"], ("'rounds' holds a value, not a section",)),
    "missing_data_file": Case([*RUN, "--set", "data.root={tmp}/empty"], ("pneumoniamnist.npz not found", "RAYMED_DATA_DIR"), setup="empty_dir", env_data="{tmp}/empty"),
    "truncated_data_file": Case([*RUN, "--set", "data.root={tmp}/bad"], ("pneumoniamnist.npz is corrupt",), setup="truncated", env_data="{tmp}/empty"),
    "foreign_npz_under_the_name": Case([*RUN, "--set", "data.root={tmp}/bad"], ("pneumoniamnist.npz is corrupt",), setup="foreign_npz", env_data="{tmp}/empty"),
    "corrupt_file_in_embedded_default": Case(["run", "--set", "data.root={tmp}/bad", "--set", "output_dir={tmp}/results"], ("pneumoniamnist.npz is corrupt",), setup="truncated", env_data="{tmp}/empty"),
    "more_clients_than_samples": Case([*RUN, "--set", "clients.num=5000"], ("5000 clients need at least", "lower clients.num")),
    "empty_partitions": Case([*RUN, "--set", "data.min_examples=400"], ("need at least", "data.min_examples=400")),
    "zero_participation": Case([*RUN, "--set", "clients.availability=0"], ("clients.availability: got 0", "greater than 0")),
    "trace_with_nobody_online": Case([*RUN, "--set", "clients.availability_trace={tmp}/trace.csv"], ("none online in rounds 1..2",), setup="empty_trace"),
    "missing_trace": Case([*RUN, "--set", "clients.availability_trace={tmp}/nope.csv"], ("clients.availability_trace", "does not exist")),
    "fault_on_a_client_that_does_not_exist": Case([*RUN, "--set", "faults.crash.clients=[99]"], ("faults.crash.clients lists client(s) [99]", "0..5")),
    "label_flip_without_labels": Case(
        [*RUN, "--set", "data.task=superresolution", "--set", "faults.byzantine.fraction=0.3", "--set", "faults.byzantine.attack=label_flip"],
        ("label_flip needs class labels",),
    ),
    "unknown_failure_policy": Case([*RUN, "--set", "engine.on_client_failure=ignore"], ("engine.on_client_failure: got 'ignore'", "'retry', 'drop' or 'stop'")),
    "resume_a_folder_without_a_run": Case(["run", "--resume", "{tmp}/empty"], ("holds no config.yaml",), setup="empty_dir"),
    "resume_without_checkpoint": Case(["run", "--resume", "{tmp}/run"], ("holds no checkpoint.safetensors", "engine.checkpoint_every"), setup="run_folder"),
    "resume_corrupt_checkpoint": Case(["run", "--resume", "{tmp}/run"], ("checkpoint.safetensors", "is corrupt"), setup="corrupt_checkpoint"),
    "resume_a_pickle_checkpoint": Case(["run", "--resume", "{tmp}/run"], ("federation.pkl", "is not read", "can run code"), setup="pickle_checkpoint"),
    "resume_an_old_format": Case(["run", "--resume", "{tmp}/run"], ("version 1", "this raymed reads raymed-checkpoint versions 2 and 3"), setup="old_format"),
    "resume_a_foreign_checkpoint": Case(["run", "--resume", "{tmp}/run"], ("comes from another run", "run other-run", "says this-run"), setup="foreign_checkpoint"),
    "resume_an_edited_config": Case(["run", "--resume", "{tmp}/run", "--set", "rounds=4"], ("differs from the checkpoint's config in clients.lr", "undo the edit"), setup="edited_config"),
    "resume_an_empty_config": Case(["run", "--resume", "{tmp}/run", "--set", "rounds=4"], ("config.yaml is empty",), setup="empty_config"),
    "resume_a_folder_in_use": Case(["run", "--resume", "{tmp}/run", "--set", "rounds=4"], ("is in use by process 1",), setup="locked"),
    "yaml_alias_bomb": Case(["run", "{tmp}/bomb.yaml"], ("YAML aliases (*a) are not allowed",), setup="bomb"),
    "name_leaving_output_dir": Case([*RUN, "--set", "name=../../x"], ("name", "would leave output_dir"),),
    "resume_and_a_config": Case(["run", "{cfg}", "--resume", "{tmp}/run"], ("either a CONFIG or --resume",), setup="run_folder"),
    "resume_changing_the_config": Case(["run", "--resume", "{tmp}/run", "--set", "clients.lr=1"], ("a resumed run keeps its config", "only rounds and ray.*"), setup="checkpoint"),
    "resume_a_finished_run": Case(["run", "--resume", "{tmp}/run"], ("already finished round 2 of rounds=2", "--set rounds=N"), setup="checkpoint"),
    "report_of_a_non_run": Case(["report", "{tmp}"], ("holds no rounds.parquet",)),
    # values: every number finite and in range, checked before anything starts
    "infinite_learning_rate": Case([*RUN, "--set", "clients.lr=inf"], ("clients.lr: got inf", "must be finite")),
    "huge_float_is_infinite": Case([*RUN, "--set", "clients.lr=1e400"], ("clients.lr: got inf", "must be finite")),
    "infinite_strategy_parameter": Case([*RUN, "--set", "strategy.name=fedprox", "--set", "strategy.mu=.inf"], ("strategy.mu: got inf", "must be finite")),
    "negative_seed": Case([*RUN, "--set", "seed=-1"], ("seed: got -1", "greater than or equal to 0")),
    "seed_past_32_bits": Case([*RUN, "--set", "seed=4294967296"], ("seed: got 4294967296", "less than 4294967296")),
    "crash_in_evaluation_that_does_not_kill": Case([*RUN, "--set", "faults.crash.during=evaluation"], ("set kind=exit",)),
    # own files: labels and images a model can take
    "own_string_labels": Case([*RUN, "--set", "data.files={{mine: {tmp}/own.npz}}", "--set", "data.datasets=[mine]"],
                              ("own.npz: train_labels holds str", "integers 0 … C−1"), setup="own_string_labels"),
    "own_non_square_images": Case([*RUN, "--set", "data.files={{mine: {tmp}/own.npz}}", "--set", "data.datasets=[mine]"],
                                  ("are 32×17", "square"), setup="own_non_square"),
    "own_stray_label": Case([*RUN, "--set", "data.files={{mine: {tmp}/own.npz}}", "--set", "data.datasets=[mine]"],
                            ("label 255 would make 256 classes of which only 4 occur", "relabel"), setup="own_stray_label"),
    "own_file_missing_in_embedded_default": Case(["run", "--set", "data.files={{mine: {tmp}/absent.npz}}", "--set", "data.datasets=[mine]",
                                                  "--set", "output_dir={tmp}/results"], ("data.files.mine", "does not exist")),
    # output folders: refused before Ray starts, nothing created
    "output_dir_is_a_file": Case([*RUN, "--set", "output_dir={tmp}/afile", "--set", "data.cache_dir=null"], ("output error", "afile is a file, not a folder"), setup="a_file"),
    "output_dir_under_a_file": Case([*RUN, "--set", "output_dir={tmp}/afile/results", "--set", "data.cache_dir=null"], ("output error", "afile is a file, not a folder"), setup="a_file"),
    "report_of_a_corrupt_rounds_file": Case(["report", "{tmp}/run"], ("rounds.parquet is corrupt", "restore the file"), setup="corrupt_rounds"),
    "report_to_an_unwritable_place": Case(["report", "{tmp}/run", "--out", "{tmp}/afile/r.png"], ("--out's folder", "afile is a file"), setup="a_run_and_a_file"),
    "report_out_is_a_folder": Case(["report", "{tmp}/run", "--out", "{tmp}"], ("is a folder; give the PNG file",), setup="a_run_and_a_file"),
}


def _prepare(kind: str | None, tmp: Path, data_dir: Path, cfg_path: Path) -> None:
    (tmp / "empty").mkdir(exist_ok=True)
    if kind == "broken_yaml":
        (tmp / "broken.yaml").write_text("rounds: [2\nclients: {num: 4}\n")
    elif kind == "list_yaml":
        (tmp / "list.yaml").write_text("- rounds\n- 2\n")
    elif kind in ("truncated", "foreign_npz"):
        (tmp / "bad").mkdir()
        target = tmp / "bad" / "pneumoniamnist.npz"
        if kind == "truncated":
            target.write_bytes((data_dir / "pneumoniamnist.npz").read_bytes()[:20000])
        else:
            np.savez(target, images=np.zeros((3, 28, 28), np.uint8))
        shutil.copy(data_dir / "breastmnist.npz", tmp / "bad")
    elif kind == "empty_trace":
        (tmp / "trace.csv").write_text("client_id,round\n" + "".join(f"{c},9\n" for c in range(6)))
    elif kind in ("run_folder", "corrupt_checkpoint", "checkpoint"):
        run = tmp / "run"
        run.mkdir()
        shutil.copy(cfg_path, run / "config.yaml")
        if kind == "corrupt_checkpoint":
            (run / "checkpoint.safetensors").write_bytes(b"\x80\x05not a checkpoint")
        if kind == "checkpoint":
            _write_checkpoint(run, yaml.safe_load(cfg_path.read_text()), 2)
            (run / "summary.json").write_text('{"status": "completed"}')  # finished (without it, a resume finishes the run)
    elif kind in ("pickle_checkpoint", "old_format", "foreign_checkpoint", "edited_config", "empty_config", "locked"):
        run = tmp / "run"
        run.mkdir()
        config = yaml.safe_load(cfg_path.read_text())
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        if kind == "pickle_checkpoint":
            (run / "federation.pkl").write_bytes(pickle.dumps({"server": None}))
        elif kind == "old_format":
            _write_checkpoint(run, config, 1, version="1")
        elif kind == "foreign_checkpoint":
            (run / "meta.json").write_text('{"run_id": "this-run"}')
            _write_checkpoint(run, config, 1, run_id="other-run")
        elif kind == "edited_config":
            _write_checkpoint(run, config, 1)
            (run / "config.yaml").write_text(yaml.safe_dump({**config, "clients": {**config["clients"], "lr": 0.5}}))
        elif kind == "empty_config":
            _write_checkpoint(run, config, 1)
            (run / "config.yaml").write_text("")
        elif kind == "locked":
            _write_checkpoint(run, config, 1)
            (run / ".lock").write_text(f"1 {socket.gethostname()}")  # pid 1 is always alive
    elif kind in ("own_string_labels", "own_non_square", "own_stray_label"):
        arrays = {f"{sp}_{k}": v for sp in ("train", "val", "test") for k, v in
                  (("images", np.zeros((12, 28, 28), np.uint8)), ("labels", (np.arange(12) % 3).reshape(-1, 1)))}
        if kind == "own_string_labels":
            arrays["train_labels"] = np.array(["benign", "malignant", "normal"] * 4).reshape(-1, 1)
        elif kind == "own_non_square":
            arrays.update({f"{sp}_images": np.zeros((12, 32, 17), np.uint8) for sp in ("train", "val", "test")})
        else:
            arrays["test_labels"] = np.array([0, 1, 2] * 3 + [0, 1, 255]).reshape(-1, 1)
        np.savez(tmp / "own.npz", **arrays)
    elif kind in ("a_file", "corrupt_rounds", "a_run_and_a_file"):
        (tmp / "afile").write_text("a file where a folder should be")
        if kind != "a_file":
            run = tmp / "run"
            run.mkdir()
            shutil.copy(cfg_path, run / "config.yaml")
            (run / "meta.json").write_text("{}")
            if kind == "corrupt_rounds":
                (run / "rounds.parquet").write_bytes(b"PAR1 not really")
            else:
                import pandas as pd

                pd.DataFrame({"round": [1, 2], "train/loss": [0.7, 0.5], "global/mean/acc": [0.6, 0.7]}).to_parquet(run / "rounds.parquet")
    elif kind == "bomb":
        (tmp / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
            for i in range(9)))


def _write_checkpoint(run: Path, config: dict, round_: int, run_id: str = "r", version: str | None = None) -> None:
    """A checkpoint as raymed writes it (format and version overridable, to plant an old one)."""
    from raymed.engine import checkpoint
    from raymed.methods import ServerState

    saved = {"server": ServerState(weights={}, round=round_), "selected": None, "client_segments": [], "rounds": [], "config": config}
    checkpoint.save_checkpoint(run, run_id, saved)
    if version is not None:
        header = {**checkpoint.read_header(run / checkpoint.CHECKPOINT_FILE), "version": version}
        checkpoint.save_tree(run / checkpoint.CHECKPOINT_FILE, saved, {k: v for k, v in header.items() if k != "tree"})


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(name, data_dir, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    cfg = small_config(data_dir, tmp_path).to_dict()
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    _prepare(case.setup, tmp_path, data_dir, cfg_path)
    fill = lambda s: s.format(cfg=cfg_path, tmp=tmp_path, data=data_dir)  # noqa: E731
    monkeypatch.delenv("RAYMED_DEBUG", raising=False)
    if case.env_data:
        monkeypatch.setenv("RAYMED_DATA_DIR", fill(case.env_data))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    status = main([fill(a) for a in case.args])

    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert status == 2, (status, out.out[-2000:], out.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("raymed: "), out.err
    assert "Traceback" not in out.out + out.err
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "results").exists()  # refused before any run folder was made
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before} == before  # nothing it was given was touched

