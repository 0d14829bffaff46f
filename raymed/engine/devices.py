"""Which device an actor computes on, and how much GPU memory it really holds.

The one rule: an actor computes on the accelerator **Ray assigned it**, and on nothing else.

- Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU ids it assigned an actor that asked for GPUs
  (``num_gpus`` 0.25 → a quarter of one GPU, shared with three other such actors), so torch sees
  exactly those GPUs and the actor uses the first one it was given.
- An actor that asked for 0 GPUs is left with every GPU of its node visible (Ray does not touch
  ``CUDA_VISIBLE_DEVICES`` for it): without this rule it would train on physical GPU 0 behind Ray's
  back. :func:`assigned_device` hides the GPUs from torch in that process and answers CPU, even on a
  GPU host.
- A multi-rank DeepSpeed group needs whole, separate GPUs (NCCL refuses two ranks on one GPU); each
  rank of a node sees that node's GPUs and takes ``LOCAL_RANK`` = its position among them, as Ray
  Train does (:func:`local_rank_env`).

A GPU fraction does not cap memory: :func:`gpu_peak_bytes` measures what a worker really holds —
its allocator's reserved peak plus its CUDA context — and :func:`check_gpu_fit` refuses co-located
workers whose peaks together exceed their GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray

from raymed.errors import ResourceError

GPU_HEADROOM = 0.95  # fraction of a GPU's memory co-located workers may use together
# What a CUDA context costs before any tensor (measured on recent GPUs: 300-600 MB); used only when
# the driver cannot tell this process's own usage (no NVML).
CUDA_CONTEXT_BYTES = 512 * 2**20


def assigned_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned the calling actor or task ([] outside Ray or with 0 GPUs)."""
    if not ray.is_initialized():
        return []
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return [str(i) for i in ids]


def _hide_gpus() -> None:
    """Make this actor's torch see no GPU (effective before CUDA is first initialised, as in a fresh
    actor process). The driver's own process is left alone."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _local_index(gpu_id: str) -> int:
    """The CUDA index torch gives Ray's GPU ``gpu_id`` in this process: its place in
    ``CUDA_VISIBLE_DEVICES`` (Ray narrows it to the assigned GPUs), or the id itself when every GPU is visible."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return int(gpu_id)
    return visible.index(gpu_id) if gpu_id in visible else 0


def assigned_device(cuda_available: Callable[[], bool] | None = None) -> Any:
    """The torch device of the calling actor: ``cuda:<i>`` for the first GPU Ray assigned it (``i``
    its position among the GPUs this process sees), else the CPU with the GPUs hidden from torch.

    ``cuda_available`` is torch's own query unless given (a test stubs it). A GPU assigned by Ray that
    torch cannot use (a CPU build of torch) is refused with one line rather than run on the CPU
    while Ray keeps the GPU for it.
    """
    import torch

    ids = assigned_gpu_ids()
    if not ids:
        _hide_gpus()
        return torch.device("cpu")
    available = (cuda_available or torch.cuda.is_available)()
    if not available:
        raise ResourceError(
            f"Ray assigned GPU {ids[0]} to this actor but torch sees no CUDA device (torch {torch.__version__}); "
            f"install a CUDA build of torch on that node, or set clients.num_gpus=0 / server.num_gpus=0 to run on CPU"
        )
    return torch.device("cuda", _local_index(ids[0]))


def local_rank_env(rank: int, world_size: int, master_addr: str, master_port: int, whole_gpus: bool) -> dict[str, str]:
    """The environment of one DeepSpeed rank: on a GPU, ``LOCAL_RANK`` is the position of its assigned
    GPU among those the process sees (Ray Train's rule); on the CPU, 0 and the CPU accelerator."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
    ids = assigned_gpu_ids()
    if not ids:
        _hide_gpus()
        return {**env, "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    if world_size > 1 and not whole_gpus:
        raise ResourceError(
            f"a ZeRO group of {world_size} ranks needs whole, separate GPUs (NCCL refuses two ranks on one GPU); "
            f"set server.num_gpus to a multiple of server.ranks ({world_size}) or server.num_gpus=0"
        )
    return {**env, "LOCAL_RANK": str(_local_index(ids[0]))}


def gpu_peak_bytes(device: Any) -> int:
    """What this process holds on ``device`` at its peak: the caching allocator's reserved peak (not
    only the allocated bytes: the cache stays held) plus the CUDA context, read from NVML for this
    process when NVML is there, else :data:`CUDA_CONTEXT_BYTES`."""
    import torch

    reserved = int(torch.cuda.max_memory_reserved(device))
    return reserved + _context_bytes(device, int(torch.cuda.memory_reserved(device)))


def _context_bytes(device: Any, reserved_now: int) -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        import torch

        uuid = str(torch.cuda.get_device_properties(device).uuid)
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if uuid.replace("GPU-", "") in str(pynvml.nvmlDeviceGetUUID(handle)):
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory:
                        return max(0, int(proc.usedGpuMemory) - reserved_now)
    except Exception:  # no NVML (a CPU host, a container without it): the documented estimate
        pass
    return CUDA_CONTEXT_BYTES


def check_gpu_fit(workers: list[dict[str, Any]], setting: str = "clients.num_gpus") -> None:
    """Refuse co-located workers whose measured peaks together exceed their GPU.

    ``workers``: one dict per worker with ``node_id``, ``gpu_ids`` (Ray's), ``peak_bytes`` and
    ``total_bytes`` (its GPU's memory). Workers on the CPU (no ``gpu_ids``) are ignored.
    """
    by_gpu: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for w in workers:
        for gpu in w.get("gpu_ids") or []:
            by_gpu.setdefault((w["node_id"], str(gpu)), []).append(w)
    for (node, gpu), sharing in sorted(by_gpu.items()):
        total = max(int(w["total_bytes"]) for w in sharing)
        need = sum(int(w["peak_bytes"]) for w in sharing)
        if need > GPU_HEADROOM * total:
            worst = max(int(w["peak_bytes"]) for w in sharing)
            fraction = min(1.0, worst / (GPU_HEADROOM * total))
            raise ResourceError(
                f"{len(sharing)} workers share GPU {gpu} on node {node[:8]} and peak at {need / 2**30:.2f} GiB together "
                f"(each up to {worst / 2**30:.2f} GiB, CUDA context and allocator cache included) on a {total / 2**30:.1f} GiB GPU; "
                f"raise {setting} to at least {fraction:.2f} or lower clients.batch_size / eval.batch_size"
            )
