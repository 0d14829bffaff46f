"""A federation on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

The cluster runs in a subprocess (a pytest session holds one Ray per process). Each node has one
CPU and each client worker asks for one, so the pool of two workers must spread over both nodes;
the run must finish with the same numbers as on one node. The same cluster checks that the
dashboard refuses a request without Ray's token and serves one with it, that
``ray job submit -- raymed run ...`` runs a federation through the jobs API, and that a federation
whose worker node is lost mid-run retrains that node's clients on the other and completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from raymed.config import save_config
from raymed.engine import run_experiment
from raymed.results.runs import read_run
from tests.conftest import small_config

SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time, urllib.error, urllib.request
    import raymed  # token authentication on, before Ray is imported
    import ray
    from ray.cluster_utils import Cluster
    from raymed.experiment import validate_config
    from raymed.engine import run_experiment

    # Own ports for the dashboard and each node's agent: the test session's Ray holds the default ones.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": True, "dashboard_port": int(sys.argv[2]), "dashboard_agent_listen_port": int(sys.argv[5])})
    worker_node = cluster.add_node(num_cpus=1, num_gpus=0, dashboard_agent_listen_port=int(sys.argv[6]))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    cfg = validate_config(json.loads(sys.argv[1]))
    run_dir = run_experiment(cfg)

    url = f"http://127.0.0.1:{sys.argv[2]}/api/version"
    codes = {}
    for name, headers in (("anonymous", {}), ("token", {"Authorization": "Bearer " + open(sys.argv[3]).read().strip()})):
        try:
            codes[name] = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).status
        except urllib.error.HTTPError as exc:
            codes[name] = exc.code
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    for attempt in range(10):  # the head's job agent can take a while to register on a loaded machine
        job = subprocess.run(
            [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{sys.argv[2]}", "--",
             "raymed", "run", sys.argv[4], "--address", "auto", "--quiet"],
            capture_output=True, text=True, timeout=400,
        )
        if "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(3)

    # A node is lost mid-run: its client worker dies with it; the run goes on on the other node.
    from raymed.engine import Federation
    lost = validate_config({**json.loads(sys.argv[1]), "name": "node-loss", "rounds": 3})
    node_loss = {}
    with Federation(lost) as federation:
        info = federation.start()
        node_loss["server_node"] = info["server_node"]
        federation.step()
        cluster.remove_node(worker_node)
        node_loss["rounds"] = [federation.step() for _ in range(2)]
    node_loss["run_dir"] = str(federation.run_dir)
    node_loss["removed"] = worker_node.node_id
    print("RESULT " + json.dumps({"run_dir": str(run_dir), "nodes": nodes, "dashboard": codes, "node_loss": node_loss,
                                  "job": {"rc": job.returncode, "out": (job.stdout + job.stderr)[-3000:]}}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def run_cluster_script(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` (which starts its own Ray cluster) in a subprocess, with token auth; return the
    JSON of its last ``RESULT `` line (a pytest session holds one Ray per process)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "token", **(env or {})},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_federation_spreads_over_two_nodes_and_matches_one_node(data_dir, tmp_path, ray_session):
    from tests.conftest import free_port

    cfg = small_config(data_dir, tmp_path, "engine.num_workers=2", "clients.num_cpus=1", "rounds=2")
    job_config = tmp_path / "job.yaml"
    save_config(cfg.model_copy(update={"output_dir": str(tmp_path / "job-results"), "name": "via-jobs-api"}), job_config)
    token_file = os.path.expanduser("~/.ray/auth_token")  # written by the session's Ray (token mode)
    result = run_cluster_script(
        SCRIPT, json.dumps(cfg.to_dict()), str(free_port()), token_file, str(job_config), str(free_port()), str(free_port()),
        # The job's entrypoint `raymed` is found on the PATH of the nodes this process starts.
        env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
    )
    assert len(result["nodes"]) == 2

    two_nodes = read_run(result["run_dir"])
    assert two_nodes["summary"]["status"] == "completed"
    worker_nodes = {w["node_id"] for w in two_nodes["meta"]["workers"]}
    assert worker_nodes == set(result["nodes"])  # one client worker on each node

    one_node = read_run(run_experiment(cfg))["rounds"]  # the same federation on the session's single node
    for key in ("train/loss", "global/mean/acc", "personal/client_mean/acc", "comm/bytes_up"):
        np.testing.assert_allclose(two_nodes["rounds"][key], one_node[key], rtol=1e-6, err_msg=key)

    assert result["dashboard"] == {"anonymous": 401, "token": 200}

    # The node that held one client worker went after round 1; rounds 2 and 3 retrained its
    # clients on the other node's worker, and the run completed.
    loss = result["node_loss"]
    assert loss["server_node"] != loss["removed"], "the server landed on the node the test removes"
    assert [m["clients/aggregated"] for m in loss["rounds"]] == [m["clients/sampled"] for m in loss["rounds"]]
    assert loss["rounds"][0]["clients/retried"] > 0
    assert read_run(loss["run_dir"])["summary"]["status"] == "completed"

    assert result["job"]["rc"] == 0, result["job"]["out"]
    (job_run,) = [d for d in (tmp_path / "job-results").glob("via-jobs-api-*") if d.is_dir()]
    submitted = read_run(job_run)
    assert submitted["summary"]["status"] == "completed"
    np.testing.assert_allclose(submitted["rounds"]["train/loss"], one_node["train/loss"], rtol=1e-6)


NODES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import raymed  # token authentication on, before Ray is imported
    import ray
    from ray.cluster_utils import Cluster
    from raymed.experiment import validate_config
    from raymed.engine import run_experiment
    from raymed.engine.runtime import free_port

    cfg = json.loads(sys.argv[1])
    out = {}
    for nodes in (1, 2, 4):  # 8 one-CPU workers: 8, 4 and 2 per node
        cpus = 8 // nodes
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                                                "dashboard_agent_listen_port": free_port()})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus, num_gpus=0, dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        out[nodes] = str(run_experiment(validate_config({**cfg, "name": f"nodes{nodes}"})))
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


def test_per_node_aggregation_equals_flat_fedavg_on_1_2_and_4_nodes(data_dir, tmp_path, ray_session):
    """Eight client workers on 1, 2 and 4 nodes: each node's first worker merges the node's float32
    partials and the server one partial per node. The aggregated model equals one worker's flat
    sum over every client (no per-node reduction) within float32 pairwise rounding (rtol 1e-5, atol 1e-6)."""
    from safetensors.numpy import load_file

    cfg = small_config(data_dir, tmp_path, "clients.num=16", "clients.fraction=1.0", "clients.num_cpus=1", "engine.num_workers=8",
                       "rounds=1", "eval.personalised=false", "strategy.name=fedavg")
    runs = {int(k): read_run(v) for k, v in run_cluster_script(NODES_SCRIPT, json.dumps(cfg.to_dict())).items()}

    flat_dir = run_experiment(cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"num_workers": 1}), "name": "flat"}))
    flat, flat_run = load_file(str(flat_dir / "model.safetensors")), read_run(flat_dir)
    assert flat_run["rounds"]["comm/partials_to_server"].tolist() == [1.0]
    for nodes, run in runs.items():
        assert run["summary"]["status"] == "completed"
        assert len({w["node_id"] for w in run["meta"]["workers"]}) == nodes and len(run["meta"]["workers"]) == 8
        assert run["rounds"]["comm/partials_to_server"].tolist() == [float(nodes)]  # one partial per node, not per worker
        assert run["rounds"]["clients/aggregated"].tolist() == [16.0]
        model = load_file(str(run["dir"] / "model.safetensors"))
        assert model.keys() == flat.keys()
        for key in flat:
            np.testing.assert_allclose(model[key], flat[key], rtol=1e-5, atol=1e-6, err_msg=f"{nodes} nodes: {key}")
