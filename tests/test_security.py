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
