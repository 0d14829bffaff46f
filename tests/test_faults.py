"""Faults survived on real Ray actors: a resumed run ends exactly where an uninterrupted one does;
crashed, killed and hung workers are retried or dropped by policy; stragglers miss a deadline;
clients come and go; bad updates are never aggregated."""

from __future__ import annotations

import errno
import json
import os
import re
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from safetensors.numpy import load_file

from raymed.engine import Federation, run_experiment, sample_clients
from raymed.engine.federation import resume_experiment
from raymed.engine.faults import FaultPlan
from raymed.errors import find_user_error
from raymed.methods import ClientUpdate
from tests.conftest import small_config
from tests.test_cli import raymed

ALL_CLIENTS = ("clients.fraction=1.0", "eval.personalised=false")  # 6 clients, every one sampled


def _rounds(run_dir) -> pd.DataFrame:
    df = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    return df[[c for c in df.columns if not c.startswith(("time/", "memory/"))]]


def _clients(run_dir) -> pd.DataFrame:
    return pq.read_table(run_dir / "clients").to_pandas().sort_values(["round", "client_id", "attempt"]).reset_index(drop=True)


def _status(run_dir) -> str:
    return json.loads((run_dir / "summary.json").read_text())["status"]


def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(data_dir, tmp_path, ray_session):
    # FedPer keeps each client's head between rounds (client state on disk), momentum SGD, and
    # clients that come and go: everything a checkpoint must carry.
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedper", "rounds=4", "clients.momentum=0.9", "engine.client_state=disk", "clients.availability=0.8")
    whole = run_experiment(cfg)

    federation = Federation(cfg)
    with pytest.raises(KeyboardInterrupt), federation:
        federation.start()
        federation.step()
        federation.step()
        ray.get(federation.server.run_round.remote())  # round 3 trains (client states move on) ...
        raise KeyboardInterrupt  # ... and the machine goes before it is logged or checkpointed
    stopped = federation.run_dir
    assert _status(stopped) == "interrupted" and len(_rounds(stopped)) == 2

    # A resume whose config write fails midway (a full disk at the fsync): config.yaml stays whole,
    # the folder is left unlocked, and the next resume continues the same experiment.
    config_before = (stopped / "config.yaml").read_bytes()
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "config.yaml" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    with mock.patch("raymed.files.os.fsync", full_disk), pytest.raises(OSError, match="No space left"):
        resume_experiment(stopped)
    assert (stopped / "config.yaml").read_bytes() == config_before and not list(stopped.glob(".*.tmp"))
    assert not (stopped / ".lock").exists()

    proc = raymed("run", "--resume", str(stopped), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed after round 2" in proc.stdout
    assert _status(stopped) == "completed"
    pd.testing.assert_frame_equal(_rounds(stopped), _rounds(whole), check_exact=True)
    pd.testing.assert_frame_equal(
        _clients(stopped).drop(columns=["time_s", "worker"]), _clients(whole).drop(columns=["time_s", "worker"]), check_exact=True
    )
    meta = json.loads((stopped / "meta.json").read_text())
    assert len(meta["resumed"]) == 1
    assert not [p for p in stopped.rglob("*.pkl")] and (stopped / "checkpoint.safetensors").is_file()  # nothing that could run code
    assert list((stopped / "client_state").glob("*.safetensors")) and not (stopped / ".lock").exists()
    assert list((stopped / "checkpoint-clients").glob("r*.safetensors"))  # the clients' states, in increments


def test_checkpoints_are_incremental_and_a_torn_write_leaves_the_previous_one(data_dir, tmp_path, ray_session, monkeypatch):
    from raymed.engine.checkpoint import CHECKPOINT_FILE, SEGMENTS, read_checkpoint

    # FedPer with 3 of 6 clients per round: each checkpoint writes the states of the round's clients only.
    # A relative output folder (as in a Tune trial): the store actor, which writes the segments, has
    # another working directory than this driver.
    monkeypatch.chdir(tmp_path)
    cfg = small_config(data_dir, tmp_path, "strategy.name=fedper", "rounds=4", "output_dir=relative-results")
    federation = Federation(cfg)
    with pytest.raises(OSError, match="No space left"), federation:
        federation.start()
        trained: list[set[int]] = []
        for _ in range(2):
            metrics = federation.step()
            trained.append(set(sample_clients(cfg.seed, federation.round, cfg.clients.num, cfg.clients.fraction)))
            federation.wait_for_checkpoint()
            assert metrics["clients/aggregated"] == 3
        run = federation.run_dir
        rows = federation.checkpoints
        assert [r["clients_written"] for r in rows] == [3, 3]  # the clients changed, not the 6 registered
        seen = trained[0] | trained[1]
        federation.checkpoint(tmp_path / "whole")  # self-contained, elsewhere: every state once
        assert rows[2]["clients_written"] == len(seen) > 3
        per_client = rows[2]["segment_bytes"] / len(seen)
        assert 2.9 * per_client < rows[1]["segment_bytes"] < 3.1 * per_client  # bytes follow the clients written
        assert read_checkpoint(tmp_path / "whole")[1]["clients"].keys() == seen
        _, saved = read_checkpoint(run)
        assert saved["server"].round == 2 and set(saved["clients"]) == trained[0] | trained[1]
        assert all(saved["segment_of"][c] == "r000002" for c in trained[1])
        live = sorted(p.name for p in (run / SEGMENTS).iterdir())
        assert live == sorted({f"{s}.safetensors" for s in saved["segment_of"].values()})  # superseded segments removed
        head_before = (run / CHECKPOINT_FILE).read_bytes()

        # Round 3's checkpoint dies while its head is written (a full disk at the fsync): round 2's stays whole.
        real_fsync = os.fsync

        def full_disk(fd: int) -> None:
            if CHECKPOINT_FILE in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        with mock.patch("raymed.files.os.fsync", full_disk):
            federation.step()
            federation.wait_for_checkpoint()
    assert (run / CHECKPOINT_FILE).read_bytes() == head_before and not list(run.glob(".*.tmp"))
    _, again = read_checkpoint(run)
    assert again["server"].round == 2 and set(again["clients"]) == set(saved["clients"])
    for c, state in saved["clients"].items():
        assert all(np.array_equal(state[k], again["clients"][c][k]) for k in state)
    assert "r000003.safetensors" in {p.name for p in (run / SEGMENTS).iterdir()}  # written, but listed by no head

    # The run resumes from round 2's incremental checkpoint and ends where an uninterrupted run does.
    resumed = resume_experiment(run)
    whole = run_experiment(cfg)
    pd.testing.assert_frame_equal(_rounds(resumed), _rounds(whole), check_exact=True)
    _, last = read_checkpoint(run)
    assert last["server"].round == 4
    assert {p.name for p in (run / SEGMENTS).iterdir()} == {f"{s}.safetensors" for s in last["client_segments"]}

    # The last round's checkpoint fails: the run says so in summary.json, and the error reaches the caller.
    with mock.patch("raymed.files.os.fsync", full_disk), pytest.raises(OSError, match="No space left"):
        run_experiment(cfg.model_copy(update={"rounds": 1}))
    last_run = max((tmp_path / "relative-results").iterdir(), key=lambda d: d.stat().st_mtime)
    assert _status(last_run).startswith("failed: the checkpoint after round 1 was not written (OSError")

    # A segment gone missing is named in one line.
    gone = run / SEGMENTS / f"{sorted(set(last['segment_of'].values()))[0]}.safetensors"
    gone.unlink()
    with pytest.raises(Exception, match=f"cannot read {gone}, a part of the checkpoint"):
        read_checkpoint(run)


def test_crashed_clients_are_retried_or_dropped(data_dir, tmp_path, ray_session):
    crash = ("faults.crash.clients=[1,4]", "faults.crash.rounds=[1]", "rounds=1", *ALL_CLIENTS)
    retried = run_experiment(small_config(data_dir, tmp_path, *crash, "engine.on_client_failure=retry"))
    rows = _clients(retried)
    first = rows[rows["attempt"] == 0].set_index("client_id")
    assert first.loc[[1, 4], "failed"].str.contains("injected crash").all() and first["failed"].drop([1, 4]).isna().all()
    again = rows[rows["attempt"] == 1]
    assert sorted(again["client_id"]) == [1, 4] and again["failed"].isna().all()  # the second try succeeds
    metrics = _rounds(retried).iloc[-1]
    assert (metrics["clients/aggregated"], metrics["clients/failed"], metrics["clients/retried"]) == (6, 0, 2)

    dropped = run_experiment(small_config(data_dir, tmp_path, *crash, "engine.on_client_failure=drop"))
    metrics = _rounds(dropped).iloc[-1]
    assert (metrics["clients/aggregated"], metrics["clients/failed"], metrics["clients/retried"]) == (4, 2, 0)
    assert _status(dropped) == "completed" and np.isfinite(metrics["global/mean/acc"])

    with pytest.raises(Exception) as stopped:
        run_experiment(small_config(data_dir, tmp_path, *crash, "engine.on_client_failure=stop"))
    reason = str(find_user_error(stopped.value))
    assert re.match(r"client [14] failed in round 1 on worker \d: InjectedCrash", reason) and "engine.on_client_failure" in reason


def test_a_worker_that_dies_mid_round_is_replaced_and_its_clients_retrained(data_dir, tmp_path, ray_session):
    # Training client 2 kills its worker's process (as the OOM killer would), in round 1 only.
    cfg = small_config(data_dir, tmp_path, "faults.crash.clients=[2]", "faults.crash.kind=exit", "faults.crash.rounds=[1]", "engine.num_workers=2", *ALL_CLIENTS)
    run_dir = run_experiment(cfg)
    rows = _clients(run_dir)
    lost = rows[(rows["round"] == 1) & rows["failed"].notna()]
    assert 2 in set(lost["client_id"]) and lost["failed"].str.contains("died").all()
    assert set(rows[(rows["round"] == 1) & (rows["attempt"] == 1)]["client_id"]) == set(lost["client_id"])
    metrics = _rounds(run_dir)
    assert metrics["clients/aggregated"].tolist() == [6, 6] and _status(run_dir) == "completed"


def test_a_killed_worker_does_not_lose_the_run(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "engine.num_workers=2", *ALL_CLIENTS)
    with Federation(cfg) as federation:
        federation.start()
        federation.step()
        ray.kill(ray.get_actor(f"{federation.name}.client-pool-0"))  # for good: Ray does not restart it
        metrics = federation.step()
    assert metrics["clients/aggregated"] == 6 and metrics["clients/retried"] > 0
    rows = _clients(federation.run_dir)
    assert rows[rows["round"] == 2]["failed"].dropna().str.contains("worker 0 died").all()


def test_a_hung_worker_times_out_and_its_clients_are_dropped(data_dir, tmp_path, ray_session):
    hang = ("faults.crash.clients=[0]", "faults.crash.kind=hang", "faults.crash.rounds=[1]", "engine.worker_timeout_s=15")
    cfg = small_config(data_dir, tmp_path, *hang, "engine.on_client_failure=drop", "engine.num_workers=2", *ALL_CLIENTS)
    run_dir = run_experiment(cfg)
    rows = _clients(run_dir)
    hung = rows[(rows["round"] == 1) & rows["failed"].notna()]
    assert 0 in set(hung["client_id"]) and hung["failed"].str.contains("did not answer within").all()
    metrics = _rounds(run_dir)
    assert metrics["clients/aggregated"].tolist() == [6 - len(hung), 6]  # round 2 runs on the replacement


def test_stragglers_past_the_deadline_are_dropped_or_down_weighted(data_dir, tmp_path, ray_session):
    slow = ("faults.slow.clients=[3]", "faults.slow.delay_s=500", "engine.client_deadline_s=100", "rounds=1", *ALL_CLIENTS)
    dropped = run_experiment(small_config(data_dir, tmp_path, *slow, "engine.late_updates=drop"))
    rows = _clients(dropped).set_index("client_id")
    assert rows.loc[3, "late"] and rows.loc[3, "rejected"].startswith("late") and rows["late"].sum() == 1
    assert rows.loc[3, "time_s"] > 500
    assert _rounds(dropped).iloc[-1]["clients/aggregated"] == 5

    weighted = run_experiment(small_config(data_dir, tmp_path, *slow, "engine.late_updates=downweight"))
    metrics = _rounds(weighted).iloc[-1]
    assert (metrics["clients/aggregated"], metrics["clients/late"]) == (6, 1)
    on_time = run_experiment(small_config(data_dir, tmp_path, "rounds=1", *ALL_CLIENTS))
    # Every backbone weight of the down-weighted run lies on the line from the run without client
    # 3 to the run with it at full weight, where FedAvg's weighted mean puts it: the late update
    # counts with weight α·n₃, α = deadline / its time (S: the others' rows).
    weights = {name: load_file(str(d / "model.safetensors")) for name, d in (("dropped", dropped), ("weighted", weighted), ("on_time", on_time))}
    late = _clients(weighted).set_index("client_id")
    alpha = 100 / late.loc[3, "time_s"]
    n3, others = late.loc[3, "num_train"], late["num_train"].sum() - late.loc[3, "num_train"]
    # mean(α) − mean(0) = α·n₃(Δ₃ − Δ̄)/(S + α·n₃), so its ratio to mean(1) − mean(0) is:
    expected = alpha * (others + n3) / (others + alpha * n3)
    backbone = [k for k in weights["on_time"] if not k.startswith("heads.") and weights["on_time"][k].dtype.kind == "f"]
    gap = np.concatenate([(weights["on_time"][k] - weights["dropped"][k]).ravel() for k in backbone]).astype(np.float64)
    moved = np.concatenate([(weights["weighted"][k] - weights["dropped"][k]).ravel() for k in backbone]).astype(np.float64)
    big = np.abs(gap) > 1e-4
    assert big.sum() > 100
    np.testing.assert_allclose(np.median(moved[big] / gap[big]), expected, rtol=0.02)


def test_clients_come_and_go_by_probability_and_by_trace(data_dir, tmp_path, ray_session):
    cfg = small_config(data_dir, tmp_path, "clients.availability=0.5", "clients.num=40", "rounds=3")
    plan = FaultPlan(cfg)
    online = [plan.online(r) for r in (1, 2, 3)]
    assert online[0] != online[1] and all(10 <= len(o) <= 30 for o in online)  # about half, a new draw each round
    assert online == [FaultPlan(cfg).online(r) for r in (1, 2, 3)]  # seeded
    for r, clients in enumerate(online, 1):
        assert set(sample_clients(cfg.seed, r, 40, 0.5, clients)) <= set(clients)
    assert sample_clients(cfg.seed, 1, 40, 0.5, []) == []

    # A trace: clients 0-2 online in round 1 only, client 3 in round 2 only; 4 and 5 (unlisted) always.
    trace = tmp_path / "trace.csv"
    trace.write_text("client_id,round\n0,1\n1,1\n2,1\n3,2\n")
    run_dir = run_experiment(small_config(data_dir, tmp_path, f"clients.availability_trace={trace}", *ALL_CLIENTS))
    rows = _clients(run_dir)
    assert sorted(rows[rows["round"] == 1]["client_id"]) == [0, 1, 2, 4, 5]
    assert sorted(rows[rows["round"] == 2]["client_id"]) == [3, 4, 5]
    assert _rounds(run_dir)["clients/online"].tolist() == [5, 3]


def test_bad_updates_are_named_and_never_aggregated():
    payload = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    good = ClientUpdate(delta={"w": np.ones((2, 3), np.float32)}, weight=5)
    assert good.problem(payload) is None
    assert "shape (3, 2), expected (2, 3)" in ClientUpdate(delta={"w": np.ones((3, 2), np.float32)}, weight=5).problem(payload)
    assert "non-finite values in b" in ClientUpdate(delta={"b": np.array([0, np.inf, 0], np.float32)}, weight=5).problem(payload)
    assert "non-finite values in w" in ClientUpdate(delta={"w": np.full((2, 3), np.nan, np.float32)}, weight=5).problem(payload)
    assert "aggregation weight nan" in ClientUpdate(delta={}, weight=float("nan")).problem(payload)
    assert "aggregation weight 0" in ClientUpdate(delta={}, weight=0).problem(payload)
