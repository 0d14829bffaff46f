"""The GPU path, checked on a CPU machine with Ray's logical GPUs.

Ray's GPUs are logical: a node started with ``num_gpus=2`` hands out GPU ids 0 and 1 and sets each
GPU actor's ``CUDA_VISIBLE_DEVICES`` whether or not a GPU exists. torch's CUDA queries are stubbed
at the boundary (``torch.cuda.is_available``), so what is checked is raymed's own logic: which
device an actor computes on, where workers are planned, and when a layout is refused.

The cluster runs in a subprocess (a pytest session holds one Ray per process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raymed.experiment import load_config
from raymed.engine.devices import check_gpu_fit
from raymed.engine.placement import plan_nodes
from raymed.errors import ResourceError
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import raymed  # token authentication on, before Ray is imported
    import ray
    from ray.cluster_utils import Cluster
    from raymed.experiment import validate_config
    from raymed.engine import run_experiment
    from raymed.engine.placement import cluster_nodes, plan_cluster, plan_nodes
    from raymed.errors import ResourceError
    from raymed.results.runs import read_run

    def pretend_cuda():
        # Every worker process's torch says CUDA is there, as on a GPU host (the boundary stub).
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 2

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING", runtime_env={"worker_process_setup_hook": pretend_cuda})
    base = json.loads(sys.argv[1])

    # An "autoscaling" cluster whose GPU node is not up yet: the plan asks for resources and waits
    # (planning in a thread; the node boots here, as Ray's Cluster starts nodes from the main thread).
    waiting = validate_config({**base, "clients": {**base["clients"], "num_gpus": 1, "num_cpus": 1},
                               "engine": {"num_workers": 2, "start_timeout_s": 120}, "ray": {**base["ray"], "address": cluster.address}})
    planned = {}
    def plan_when_ready():
        started = time.time()
        planned["plan"] = plan_cluster(waiting, poll_s=1.0)
        planned["waited_s"] = time.time() - started
    planner = threading.Thread(target=plan_when_ready)
    planner.start()
    time.sleep(3)
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    planner.join(timeout=150)
    grown = planned["plan"]
    cluster.wait_for_nodes()
    out = {"head": ray.get_runtime_context().get_node_id(), "gpu_node": gpu_node.node_id,
           "grown_plan": {r["node"]: r["workers"] for r in grown.rows()}, "waited_s": planned["waited_s"]}
    too_wide = validate_config({**waiting.to_dict(), "engine": {"num_workers": 5, "start_timeout_s": 120}, "ray": {**base["ray"], "address": None}})
    started = time.time()
    try:
        plan_cluster(too_wide)  # without ray.address (a local Ray, which never grows): refused at once
        out["local_refused"] = None
    except ResourceError as exc:
        out["local_refused"], out["local_refused_s"] = str(exc), time.time() - started

    @ray.remote(num_cpus=0)
    class Probe:
        def device(self):
            import torch
            from raymed.engine.devices import assigned_device, assigned_gpu_ids
            return {"device": str(assigned_device()), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "ids": assigned_gpu_ids(), "torch_says_cuda": torch.cuda.is_available(),
                    "node": ray.get_runtime_context().get_node_id()}

    cpu_probe = Probe.options(num_gpus=0).remote()
    quarter = [Probe.options(num_gpus=0.25).remote() for _ in range(4)]
    out["cpu"] = ray.get(cpu_probe.device.remote())
    out["quarter"] = ray.get([p.device.remote() for p in quarter])
    for p in [cpu_probe, *quarter]:
        ray.kill(p)

    def plan(**changes):
        cfg = validate_config({**base, **changes})
        try:
            return [(r["node"], r["workers"]) for r in plan_nodes(cfg, cluster_nodes(), out["head"]).rows()]
        except ResourceError as exc:
            return str(exc)
    short = {out["head"][:8]: "head", out["gpu_node"][:8]: "gpu"}
    def named(result):
        return result if isinstance(result, str) else {short[n]: k for n, k in result}
    out["plan_whole"] = named(plan(clients={**base["clients"], "num_gpus": 1, "num_cpus": 1}, engine={"num_workers": 2}))
    out["plan_too_many"] = named(plan(clients={**base["clients"], "num_gpus": 1, "num_cpus": 1}, engine={"num_workers": 3}))
    out["plan_quarter"] = named(plan(clients={**base["clients"], "num_gpus": 0.25, "num_cpus": 0.5, "num": 12, "fraction": 1.0}))
    out["plan_cpu"] = named(plan(clients={**base["clients"], "num_cpus": 1}))
    out["plan_no_gpus"] = named(plan(clients={**base["clients"], "num_gpus": 3, "num_cpus": 1}))

    # The default engine on this "GPU host" with clients.num_gpus=0: every worker must stay on the CPU.
    run = read_run(run_experiment(validate_config(base)))
    out["workers"] = run["meta"]["workers"]
    out["rounds"] = len(run["rounds"])
    out["status"] = run["summary"]["status"]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_devices_follow_rays_assignment_and_the_plan_follows_each_node(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path, "clients.num_cpus=1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cfg.to_dict())],
        capture_output=True, text=True, timeout=900, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(lines[0][len("RESULT "):])

    # 0 GPUs: the CPU, even though torch says CUDA is there; the GPUs are hidden from its torch.
    assert out["cpu"]["torch_says_cuda"] and out["cpu"]["device"] == "cpu" and out["cpu"]["visible"] == "" and out["cpu"]["ids"] == []
    # A quarter GPU each: four actors packed on the GPU node, each on the GPU Ray gave it (cuda:0 of
    # what it sees: Ray narrows CUDA_VISIBLE_DEVICES to that GPU).
    for probe in out["quarter"]:
        assert probe["node"] == out["gpu_node"] and len(probe["ids"]) == 1 and probe["visible"] == probe["ids"][0]
        assert probe["device"] == "cuda:0"
    assert sum(len(p["ids"]) for p in out["quarter"]) == 4 and len({p["ids"][0] for p in out["quarter"]}) <= 2

    # Planned before the GPU node was up: it asked for resources, waited for the node, then placed there.
    assert out["grown_plan"] == {out["gpu_node"][:8]: 2, out["head"][:8]: 0} and 2 < out["waited_s"] < 60
    assert out["local_refused"] and "engine.num_workers=5" in out["local_refused"] and out["local_refused_s"] < 5

    # The plan: whole-GPU workers only where GPUs are, and a layout with more than fit is refused.
    assert out["plan_whole"] == {"head": 0, "gpu": 2}
    assert "engine.num_workers=3" in out["plan_too_many"] and "only 2 fit" in out["plan_too_many"]
    assert out["plan_quarter"] == {"head": 0, "gpu": 4}  # 2 CPUs / 0.5 per worker on the GPU node
    assert out["plan_cpu"] == {"head": 2, "gpu": 1}  # a round's 3 clients, dealt over both nodes
    assert "clients.num_gpus=3" in out["plan_no_gpus"]

    # The default federation with clients.num_gpus=0 on a host whose torch reports CUDA ran on the CPU.
    assert out["status"] == "completed" and out["rounds"] == 2
    assert out["workers"] and all(w["device"] == "cpu" and w["gpu_ids"] == [] for w in out["workers"])


def test_only_the_device_function_picks_a_device():
    """No code path but raymed/engine/devices.py asks torch whether CUDA is there to choose a device."""
    offenders = []
    for path in (ROOT / "raymed").rglob("*.py"):
        if path.name == "devices.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"cuda\.is_available\(\)|torch\.device\(\s*[\"']cuda", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_co_located_workers_past_their_gpu_are_refused_in_one_line():
    gib = 2**30
    fits = [{"node_id": "n1", "gpu_ids": ["0"], "peak_bytes": 3 * gib, "total_bytes": 16 * gib} for _ in range(4)]
    check_gpu_fit(fits)  # 12 GiB of 16: fine
    check_gpu_fit([{"node_id": "n1", "gpu_ids": [], "peak_bytes": 99 * gib, "total_bytes": 16 * gib}])  # CPU workers: ignored
    too_much = [{"node_id": "n1", "gpu_ids": ["0"], "peak_bytes": 5 * gib, "total_bytes": 16 * gib} for _ in range(4)]
    too_much.append({"node_id": "n1", "gpu_ids": ["1"], "peak_bytes": 5 * gib, "total_bytes": 16 * gib})  # alone on GPU 1: fine
    with pytest.raises(ResourceError) as refused:
        check_gpu_fit(too_much)
    message = str(refused.value)
    assert "\n" not in message and "4 workers share GPU 0" in message and "20.00 GiB together" in message
    assert "raise clients.num_gpus to at least 0.33" in message


def test_plan_of_a_pooled_cluster_keeps_its_refusals(data_dir, tmp_path):
    nodes = [{"node_id": "a", "address": "10.0.0.1", "resources": {"CPU": 4.0, "GPU": 1.0, "memory": 8e9}},
             {"node_id": "b", "address": "10.0.0.2", "resources": {"CPU": 4.0, "memory": 8e9}}]
    cfg = small_config(data_dir, tmp_path, "clients.num_gpus=0.5", "clients.num_cpus=1")
    plan = plan_nodes(cfg, nodes, "b")
    assert [(r["address"], r["workers"]) for r in plan.rows()] == [("10.0.0.2", 0), ("10.0.0.1", 2)]
    assert plan.node_of_worker() == ["a", "a"]
    cpu = plan_nodes(small_config(data_dir, tmp_path, "clients.num_cpus=1"), nodes, "b")
    assert cpu.num_workers == 3 and [r["workers"] for r in cpu.rows()] == [2, 1]  # the server's node first
    with pytest.raises(ResourceError, match="no node has room"):
        plan_nodes(small_config(data_dir, tmp_path, "clients.num_cpus=5"), nodes, "b")  # 8 CPUs in all, 4 per node


def test_ray_ports_are_keys_of_the_config():
    cfg = load_config(None, ["ray.metrics_export_port=9999"])
    assert cfg.ray.metrics_export_port == 9999 and cfg.ray.dashboard_port == 8265
