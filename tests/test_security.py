"""Security defaults: the HTTP endpoints a local Ray opens (dashboard, jobs API) listen on the
loopback address only, with token authentication on; no secret lands in a run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from raymed.engine import run_experiment
from tests.conftest import free_port, small_config

LISTENERS = textwrap.dedent(
    """
    import json, sys, time
    import psutil
    import raymed  # token authentication on, before Ray is imported
    from raymed.config import RayConfig
    from raymed.engine.runtime import init_ray

    url = init_ray(RayConfig(num_cpus=1, num_gpus=0, dashboard_port=int(sys.argv[1])))
    time.sleep(2)
    ports = {int(sys.argv[1])}
    bound = sorted({c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.laddr.port in ports})
    print("RESULT " + json.dumps({"url": url, "dashboard_bound_to": bound, "auth": __import__("os").environ.get("RAY_AUTH_MODE")}))
    """
)


def test_dashboard_and_jobs_api_listen_on_loopback_only_with_token_auth():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # raymed itself must turn it on
    proc = subprocess.run([sys.executable, "-c", LISTENERS, str(port)], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["url"] == f"http://127.0.0.1:{port}"
    assert result["dashboard_bound_to"] == ["127.0.0.1"]  # not 0.0.0.0, not the machine's address
    assert result["auth"] == "token"


def test_no_secret_lands_in_a_run_folder(data_dir, tmp_path, ray_session, monkeypatch):
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()  # the session Ray's token
    monkeypatch.setenv("RAYMED_TEST_SECRET", "s3cr3t-value-that-must-not-leak")
    run_dir = run_experiment(small_config(data_dir, tmp_path, "rounds=1"))
    for path in run_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert token.encode() not in blob, path
            assert b"s3cr3t-value-that-must-not-leak" not in blob, path


def test_joining_a_cluster_without_token_auth_is_refused_unless_asked(data_dir, tmp_path):
    """`--address` to a Ray whose token authentication is off: one line naming the cluster and the
    switch, exit 2, before any run folder; the probe tells an open cluster from a closed one."""
    import signal
    import time

    import yaml

    from raymed.engine.runtime import cluster_is_open

    import shutil
    import tempfile

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rm-", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        for _ in range(60):
            if head.poll() is not None:
                raise AssertionError(f"ray start --head exited with {head.returncode}")
            if cluster_is_open(address):
                break
            time.sleep(2)
        else:
            raise AssertionError("the open Ray head did not come up")
        from tests.conftest import small_config

        cfg = tmp_path / "exp.yaml"
        cfg.write_text(yaml.safe_dump(small_config(data_dir, tmp_path).to_dict()))
        proc = subprocess.run([sys.executable, "-m", "raymed", "run", str(cfg), "--address", address], capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if k != "RAYMED_DEBUG"})
        lines = [line for line in proc.stderr.splitlines() if line.startswith("raymed: ")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert "has token authentication off" in lines[0] and "ray.allow_unauthenticated=true" in lines[0] and str(port) in lines[0]
        assert not (tmp_path / "results").exists() or not any(p for p in (tmp_path / "results").iterdir() if not p.name.startswith("."))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)  # the head's own processes, whatever survived
        shutil.rmtree(temp_dir, ignore_errors=True)
