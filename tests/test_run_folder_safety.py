"""A run folder is data, never code, and one writer at a time: planted pickles are not executed, YAML
bombs are refused at once, a run's name cannot leave output_dir, checkpoints round-trip exactly."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from raymed.config import load_yaml
from raymed.experiment import load_config
from raymed.engine.checkpoint import CHECKPOINT_FILE, differing_keys, load_tree, read_checkpoint, save_tree
from raymed.errors import ConfigError, DataError
from raymed.methods import ServerState
from raymed.methods.omnifm import SpectralKnowledgeBase
from raymed.results.store import RunLock


class _Planted:
    """Unpickling this runs ``open(path, "w")``: what a shared run folder must never do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["federation.pkl", CHECKPOINT_FILE])
def test_a_planted_pickle_is_refused_and_never_run(tmp_path, name):
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps({"server": _Planted(str(marker))}))
    with pytest.raises(DataError) as refused:
        read_checkpoint(tmp_path)
    assert "\n" not in str(refused.value) and not marker.exists()


def test_yaml_alias_bomb_is_refused_fast_and_small(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1000  # expands to 9^10 ≈ 3.5e9 items
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"YAML aliases \(\*a\) are not allowed"):
        load_yaml(bomb)
    took = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert took < 1.0 and peak < 200 * 2**20
    huge = tmp_path / "huge.yaml"
    huge.write_text("rounds: 2\n" + "# " + "x" * 2_000_000 + "\n")
    with pytest.raises(ConfigError, match="at most 1 MB"):
        load_yaml(huge)


@pytest.mark.parametrize("name", ["../x", "../../x", "a/b", "..", "/etc/x", "a\\b"])
def test_a_name_cannot_leave_output_dir(name):
    with pytest.raises(ConfigError, match="would leave output_dir"):
        load_config(None, [f"name={name!r}" if "\\" in name else f"name={name}"])
    assert load_config(None, ["name=my-run.v2"]).run_name == "my-run.v2"


def test_checkpoint_tree_round_trips_exactly(tmp_path):
    bank = SpectralKnowledgeBase(capacity=4, dim=3)
    bank.insert(np.eye(3, dtype=np.float32)[:2], ["x", "y"], round_=1)
    tree = {
        "server": ServerState(weights={"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, round=3, extra={"gskr": bank, "n": np.int64(4)}),
        "clients": {0: {"head": np.ones(2)}, 7: None},
        "rounds": [{"round": 1, "acc": float("nan"), "name": "a"}, {"round": 2, "pair": (1, 2.5)}],
        "flag": True,
        "zero_d": np.array(2.5),
    }
    save_tree(tmp_path / "t.safetensors", tree)
    back = load_tree(tmp_path / "t.safetensors")
    assert back["server"].round == 3 and np.array_equal(back["server"].weights["w"], tree["server"].weights["w"])
    assert back["server"].weights["w"].dtype == np.float32 and back["server"].extra["n"] == 4 and isinstance(back["server"].extra["n"], np.int64)
    restored = back["server"].extra["gskr"]
    assert isinstance(restored, SpectralKnowledgeBase) and restored.modality == ["x", "y"] and np.array_equal(restored.vectors, bank.vectors)
    assert set(back["clients"]) == {0, 7} and back["clients"][7] is None and np.array_equal(back["clients"][0]["head"], np.ones(2))
    assert np.isnan(back["rounds"][0]["acc"]) and back["rounds"][1]["pair"] == (1, 2.5) and back["flag"] is True
    assert back["zero_d"].shape == () and float(back["zero_d"]) == 2.5
    with pytest.raises(TypeError, match="cannot be checkpointed"):
        save_tree(tmp_path / "u.safetensors", {"f": object()})
    assert differing_keys({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 3}) == ["a.c", "d", "e"]


def test_a_folder_has_one_writer_and_a_dead_writers_lock_is_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()}")
        with pytest.raises(ConfigError, match=f"in use by process {sleeper.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock.acquire(tmp_path)  # its holder is gone: taken over
    assert (tmp_path / ".lock").read_text().startswith(str(os.getpid()))
    lock.release()
    assert not (tmp_path / ".lock").exists()
