"""Ray start-up with safe defaults (ports, the machine lock, token auth), and torch's threads and
determinism in each process. Where the actors go is :mod:`raymed.engine.placement`.

Security: Ray's dashboard and jobs API run code for whoever reaches them. A local Ray started here
has token authentication on (``RAY_AUTH_MODE=token``, set in ``raymed/__init__.py`` before Ray is
imported; Ray writes the token to
``~/.ray/auth_token``, and ``ray get-auth-token`` prints it) and binds the dashboard to 127.0.0.1.
Only ``ray.dashboard_host`` in the config widens that, and only when a user sets it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import ray

from raymed.config import ExperimentConfig, RayConfig
from raymed.errors import ResourceError

logger = logging.getLogger("raymed")


def free_port(host: str = "127.0.0.1", start: int | None = None, tries: int = 100) -> int:
    """A port free on ``host`` now: ``start`` or the next free one after it, else any the OS gives."""
    import socket

    for port in ([*range(start, min(start + tries, 65536))] if start else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ResourceError(f"no free port on {host}")


JOINED: dict[str, str] = {}  # the cluster a run with ray.address joined: its address and session (printed at start)
# Called after this process starts or joins Ray (the CLI puts its SIGTERM handler back over Ray's).
AFTER_RAY_START: list = []
PORTS: dict[str, int | None] = {}  # the ports this process's local Ray took (init_ray): printed at start, saved in meta.json


@contextlib.contextmanager
def _machine_lock(name: str):
    """An exclusive lock shared by every raymed process of this machine (a file in the temp folder)."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / f"raymed-{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_or_join(cfg: RayConfig, attempt: int, quiet: dict[str, Any]) -> Any:
    if cfg.address:
        return ray.init(address=cfg.address, **quiet)
    import torch

    host = cfg.dashboard_host
    first = cfg.dashboard_port + attempt * random.randint(1, 50)  # a retry after a clash looks further on
    PORTS.update(dashboard=free_port(host if host != "0.0.0.0" else "", first) if cfg.dashboard else None,
                 metrics_export=cfg.metrics_export_port or free_port())
    return ray.init(
        address="local",  # a new Ray of our own, even when another one runs on this machine
        num_cpus=cfg.num_cpus or os.cpu_count() or 1,
        num_gpus=cfg.num_gpus if cfg.num_gpus is not None else torch.cuda.device_count(),
        include_dashboard=cfg.dashboard,
        dashboard_host=host,
        **({"dashboard_port": PORTS["dashboard"]} if cfg.dashboard else {}),
        _metrics_export_port=PORTS["metrics_export"],
        **quiet,
    )


def token_file() -> Path:
    """Where Ray keeps the auth token of the clusters this user starts (``RAY_AUTH_TOKEN_PATH`` wins)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _guard_token(existed: bool) -> None:
    """The token is a password to every local Ray of this user: one Ray wrote is made 0600; one that
    was there before and that others can read is named in a warning (it is the user's file)."""
    path = token_file()
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if not existed:
        path.chmod(0o600)
    elif mode & 0o077:
        logger.warning("%s is readable by other users (mode %o): anyone who reads it can run code on your Ray; `chmod 600 %s`", path, mode, path)


_OPEN_PROBE = (
    "import sys\n"
    "from ray._raylet import GcsClient\n"
    "GcsClient(address=sys.argv[1]).internal_kv_keys(b'', namespace=None, timeout=10)\n"
    "print('OPEN')\n"
)


def cluster_is_open(gcs_address: str) -> bool:
    """Whether the Ray cluster at ``gcs_address`` answers a request that carries no token, i.e. its
    token authentication is off (asked from a separate process with no token at all)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN",)}
    env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=os.devnull + ".absent")
    try:
        proc = subprocess.run([sys.executable, "-c", _OPEN_PROBE, gcs_address], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return False
    return "OPEN" in proc.stdout


def init_ray(cfg: RayConfig) -> str | None:
    """Start or join Ray once per process; returns the dashboard URL when there is one.

    A local Ray takes free ports: the dashboard ``ray.dashboard_port`` or the next free one (a second
    run on the same machine gets its own), the metrics export port ``ray.metrics_export_port`` or any
    free one. Local Rays of one machine start one at a time (a file lock), so two runs started at the
    same moment never pick the same ports; a port taken by something else meanwhile: try again."""
    if ray.is_initialized():
        return None
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    attempts = 1 if cfg.address else 3
    for attempt in range(attempts):
        try:
            # Local Rays of this machine start one at a time: the next picks its ports once the
            # previous holds its own (Ray's dashboard, started at the same moment as another, can hang).
            lock = contextlib.nullcontext() if cfg.address else _machine_lock("ray-start")
            existed = token_file().exists()
            with lock:
                context = _start_or_join(cfg, attempt, quiet)
            _guard_token(existed)
            break
        except Exception as exc:  # Ray raises a bare Exception when its dashboard cannot bind
            if ray.is_initialized():
                ray.shutdown()
            if attempt + 1 < attempts and ("port" in str(exc).lower() or "dashboard" in str(exc).lower()):
                time.sleep(random.uniform(0.5, 2.0))  # the other run that took the port is starting too
                continue
            where = f"the Ray cluster at {cfg.address}" if cfg.address else "a local Ray"
            hint = (
                "check ray.address, and that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds the cluster's token"
                if cfg.address
                else "another Ray may hold its ports (`ray status`); set ray.dashboard_port / ray.metrics_export_port, or ray.dashboard=false"
            )
            raise ResourceError(f"could not start or reach {where}: {exc}; {hint}") from None
    for hook in list(AFTER_RAY_START):
        hook()
    if cfg.address:  # say which cluster this run joined: `auto` takes whatever Ray runs on this machine
        info = getattr(context, "address_info", {}) or {}
        JOINED.update(address=info.get("gcs_address") or info.get("address") or cfg.address, session=Path(info.get("session_dir") or "?").name)
        if info.get("gcs_address") and not cfg.allow_unauthenticated and cluster_is_open(info["gcs_address"]):
            ray.shutdown()
            raise ResourceError(
                f"the Ray cluster at {JOINED['address']} (session {JOINED['session']}, joined by ray.address={cfg.address}) has token "
                f"authentication off: anyone who reaches it can run code on it; start it with RAY_AUTH_MODE=token (README, Security), "
                f"or join it anyway with --set ray.allow_unauthenticated=true"
            )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url else None


def configure_torch(cfg: ExperimentConfig, num_cpus: float) -> None:
    """Threads and determinism of an actor that runs torch (a client worker, a decoder rank): its
    thread count is its CPU share, fixed; ``deterministic`` also asks torch for deterministic
    algorithms (an error, not a silent difference, where an op has none) and one inter-op thread."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or inter-op work already ran in this process
            pass


def determinism(cfg: ExperimentConfig) -> dict[str, object]:
    """What meta.json records of how reproducible the run is."""
    import torch

    return {
        "deterministic": cfg.deterministic,
        "torch_threads_per_worker": max(1, int(cfg.clients.num_cpus)),
        "deterministic_algorithms": cfg.deterministic,
        "cuda_devices_on_driver_host": torch.cuda.device_count(),  # where each actor computes: meta.json's workers
    }
