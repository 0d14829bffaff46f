"""The cluster launcher YAML, KubeRay manifests and runtime_env: parsed, complete, safe, and the
commands they run are commands the CLI has."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from raymed.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_raymed_command(command: str) -> None:
    """``command`` parses with raymed's own argument parser, and any file it names exists here."""
    args = shlex.split(command)
    assert args[0] == "raymed", command
    parsed = _parser().parse_args(args[1:])
    for attr in ("config", "sweep"):
        path = getattr(parsed, attr, None)
        if path:
            path = path.replace("/home/ray/raymed/", "").replace("~/raymed/", "")
            assert (ROOT / path).is_file(), f"{command}: {path} is not in the repository"


def test_cluster_launcher_yaml():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("g5" in t["node_config"]["InstanceType"] for t in cfg["available_node_types"].values())  # GPU workers
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for command in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    ssh = cfg["provider"]["security_group"]["IpPermissions"]
    assert [p["FromPort"] for p in ssh] == [22]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in ssh for r in p["IpRanges"])
    assert any("torch==2.14.1" in c for c in cfg["setup_commands"])
    for line in (CLUSTER / "aws.yaml").read_text().splitlines():  # the commands in its header
        if "ray job submit -- raymed" in line:
            _check_raymed_command(line.split(" -- ", 1)[1].split("#")[0].split("(")[0])


def test_kuberay_manifests():
    cluster = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    specs = [cluster["spec"]]
    jobs = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    assert {j["kind"] for j in jobs} == {"RayJob"} and len(jobs) == 2
    commands = []
    for job in jobs:
        assert job["apiVersion"] == "ray.io/v1"
        commands.append(job["spec"]["entrypoint"])
        if "rayClusterSpec" in job["spec"]:
            specs.append(job["spec"]["rayClusterSpec"])
        else:
            assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert {shlex.split(c)[1] for c in commands} == {"run", "tune"}
    for command in commands:
        _check_raymed_command(command)
    for spec in specs:
        assert spec["authOptions"]["mode"] == "token"
        assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 54)
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a LoadBalancer/NodePort
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    policy = _docs(CLUSTER / "kuberay" / "networkpolicy.yaml")[0]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"


def test_runtime_env_installs_raymeds_dependencies():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**{k: v for k, v in env.items() if k != "working_dir"})  # Ray's own validation
    packages = env["pip"]["packages"]
    assert packages[:2] == ["torch==2.14.1", "torchvision==0.29.1"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {d.replace(" ", "") for d in project if not d.startswith("ray")}
    assert wanted <= set(packages), wanted - set(packages)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.y*ml")), ids=lambda p: p.name)
def test_cluster_files_keep_ray_off_public_addresses(path: Path):
    text = path.read_text()
    assert "0.0.0.0/0" not in text.replace("never 0.0.0.0/0", "")
    assert "LoadBalancer" not in text.replace("never a LoadBalancer", "")
