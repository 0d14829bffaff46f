"""The server's model under DeepSpeed ZeRO: a run task's generator, or a method's own central model.

The server actor coordinates; the master model (a run task's: e.g. encoder + decoder + adapters) lives in
``server.ranks`` DeepSpeed ranks, each a Ray actor holding a ``DeepSpeedEngine`` at ZeRO stage
``server.zero_stage`` (optimizer-state offload to CPU at stage >= 1 and parameter offload at stage 3
with ``server.offload=cpu``). With several ranks ZeRO shards across them (stage 3: the parameters
themselves). After every aggregation the server loads the global weights into the engine, and the
ranks generate the global model's outputs for evaluation in batches (tasks whose outputs are
generated: :attr:`raymed.tasks.RunTask.server_model`), each rank a share of the split. :meth:`ServerModelGroup.train_step` is the server-side optimisation step (data parallel over the
ranks) for methods that train on the server.

A method may put a model of its own here instead (``Method.build_server_model``; FedKIM's central
model): :meth:`ServerModelGroup.fit` trains it on the server's own split and :meth:`ServerModelGroup.answer`
runs it on a split, through the model's ``batches``/``batch_loss``/``answer``.

Ranks: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT are set per actor and LOCAL_RANK=0 (Ray gives each
actor its own CUDA_VISIBLE_DEVICES, so a rank's GPU is always device 0); NCCL needs whole GPUs per
rank (validated in the config). Without a GPU DeepSpeed runs on its CPU accelerator
(``DS_ACCELERATOR=cpu``); its first start on a machine builds a communication op (~40-70 s, cached).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from typing import Any

import numpy as np
import ray
import torch

from raymed.config import ExperimentConfig
from raymed.experiment import validate_config
from raymed.data.shards import ShardSet
from raymed.engine.devices import local_rank_env
from raymed.engine.placement import Placement
from raymed.engine.runtime import configure_torch
from raymed.engine.worker import EvalChunk
from raymed.errors import ResourceError
from raymed.methods import Weights, build_method



def deepspeed_config(cfg: ExperimentConfig) -> dict[str, Any]:
    s = cfg.server
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload == "cpu" and s.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
    if s.offload == "cpu" and s.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.clients.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # torch's AdamW: no fused-op build (DeepSpeed's own Adam compiles for ~40 s on first use)
        "optimizer": {"type": "AdamW", "params": {"lr": s.lr, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }


class ServerModelRank:
    """One DeepSpeed rank holding the master server model (a Ray actor)."""

    def __init__(self, cfg: dict[str, Any], shard_dir: str, rank: int, world_size: int):
        self.cfg = validate_config(cfg)
        self.rank, self.world_size = rank, world_size
        self.shards = ShardSet(shard_dir)
        self.method = build_method(self.cfg.strategy.name, self.cfg.strategy.params)
        self.engine = None
        configure_torch(self.cfg, self.cfg.server.num_cpus / self.cfg.server.ranks)

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, master_addr: str, master_port: int) -> dict[str, Any]:
        s = self.cfg.server
        per_rank = s.num_gpus / max(s.ranks, 1)
        # The GPU Ray assigned this rank (LOCAL_RANK: its place among those this process sees), or the CPU.
        os.environ.update(local_rank_env(self.rank, self.world_size, master_addr, master_port, whole_gpus=per_rank >= 1 and per_rank == int(per_rank)))
        import deepspeed

        model = self.method.build_server_model(self.cfg, self.shards)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=deepspeed_config(self.cfg))
        self.engine.module.synced_generation = self.cfg.server.zero_stage == 3 and self.world_size > 1
        return self.describe()

    @property
    def stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def describe(self) -> dict[str, Any]:
        """What this rank holds: the engine, its ZeRO stage, and how much of the model lives here."""
        params = list(self.engine.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return {
            "rank": self.rank,
            "world_size": torch.distributed.get_world_size(),
            "engine": type(self.engine).__name__,
            "zero_stage": self.stage,
            "optimizer": type(self.optimizer).__name__,
            "params_total": int(total),
            "params_local": int(local),
            "device": str(self.engine.device),
            "pid": os.getpid(),
        }

    def _gathered(self, params: list[torch.nn.Parameter]):
        """ZeRO-3 partitions parameters: gather them to read or write whole tensors (a collective)."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        return contextlib.nullcontext()

    def load(self, weights: Weights) -> None:
        """Put the global weights into the engine's model (and its optimizer's master copy)."""
        module = self.engine.module
        params = dict(module.named_parameters())
        targets = {k: params[k] for k in weights if k in params}
        with self._gathered(list(targets.values())), torch.no_grad():
            for key, param in targets.items():
                param.data.copy_(torch.from_numpy(np.array(weights[key])).to(param.device, param.dtype))
        buffers = {k: torch.from_numpy(np.array(v)) for k, v in weights.items() if k not in params}
        if buffers:
            module.load_state_dict(buffers, strict=False)
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO's optimizer keeps its own fp32 copy of the weights
            refresh()

    def read(self, keys: list[str]) -> Weights:
        """Whole tensors of the engine's model (gathered under ZeRO-3)."""
        params = dict(self.engine.module.named_parameters())
        chosen = [params[k] for k in keys]
        with self._gathered(chosen):
            return {k: p.detach().cpu().numpy().copy() for k, p in zip(keys, chosen)}

    @torch.no_grad()
    def generate(self, batches: list[EvalChunk]) -> list[tuple[str, str, int, np.ndarray]]:
        """Generated outputs (token ids) for each batch of validation or test rows."""
        module = self.engine.module
        module.eval()
        out = []
        for split_name, flag, start, stop in batches:
            split = self.shards.evaluation_split(flag, split_name)[start:stop]
            task = self.shards.tasks[flag]
            x, _ = task.inputs(np.array(split.images), np.array(split.labels), module.in_channels, self.engine.device)
            out.append((split_name, flag, start, task.scores(module.predict(x, flag))))
        return out

    def train_step(self, flag: str, images: np.ndarray, labels: np.ndarray) -> float:
        """One server-side optimisation step (DeepSpeed backward + step) on a batch of stored rows."""
        module = self.engine.module
        module.train()
        task = self.shards.tasks[flag]
        x, y = task.inputs(images, labels, module.in_channels, self.engine.device)
        loss = task.loss(self.engine(x, flag), y)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss)


    def fit(self, epochs: int, round_: int) -> float:
        """``epochs`` passes over the server's split (data parallel: each rank its share of the
        batches, the same number on every rank); returns the mean loss."""
        module = self.engine.module
        module.train()
        losses = []
        for epoch in range(epochs):
            seed = [self.cfg.seed, round_, epoch]
            for batch in module.batches(self.shards, "server", self.cfg.clients.batch_size, self.rank, self.world_size, seed):
                loss = module.batch_loss("server", batch)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def answer(self, split: str) -> list:
        """The model's answers on this rank's share of ``split``."""
        module = self.engine.module
        module.eval()
        batches = module.batches(self.shards, split, self.cfg.eval.batch_size, self.rank, self.world_size, None)
        return [module.answer(split, batch) for batch in batches]


class ServerModelGroup:
    """The server's DeepSpeed ranks, started together and driven together."""

    def __init__(self, cfg: ExperimentConfig, shard_dir: str, run_name: str, placement: Placement | None = None):
        s = cfg.server
        self.cfg = cfg
        cls = ray.remote(ServerModelRank)
        self.ranks = []
        for rank in range(s.ranks):
            options: dict[str, Any] = {"name": f"{run_name}.decoder-rank-{rank}", "num_cpus": s.num_cpus / s.ranks, "num_gpus": s.num_gpus / s.ranks}
            if placement:
                bundle = placement.server_bundles[rank] if placement.server_bundles else 0
                options["scheduling_strategy"] = placement.strategy(bundle)
            self.ranks.append(cls.options(**options).remote(cfg.to_dict(), shard_dir, rank, s.ranks))
        timeout = cfg.engine.start_timeout_s
        try:
            addr, port = ray.get(self.ranks[0].endpoint.remote(), timeout=timeout)
            self.info = ray.get([r.start.remote(addr, port) for r in self.ranks], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ResourceError(
                f"the {s.ranks} DeepSpeed decoder rank(s) (server.num_cpus={s.num_cpus:g}, server.num_gpus={s.num_gpus:g} in all) did not "
                f"start within {timeout:g} s; free the resources (see `ray status`) or raise engine.start_timeout_s"
            ) from None

    def load(self, weights: Weights) -> None:
        ref = ray.put(weights)
        ray.get([r.load.remote(ref) for r in self.ranks])

    def read(self, keys: list[str]) -> Weights:
        return ray.get([r.read.remote(keys) for r in self.ranks])[0]

    def generate(self, sizes: dict[tuple[str, str], int], batch_size: int) -> list[tuple[str, str, int, np.ndarray]]:
        """Outputs for every row of each (split, dataset) of ``sizes``, each rank generating an equal
        number of batches (ZeRO-3 ranks run every forward pass together, so none may stop early)."""
        per_rank: list[list[EvalChunk]] = [[] for _ in self.ranks]
        for (split, flag), n in sizes.items():
            shares = np.array_split(np.arange(n), len(self.ranks))
            num_batches = max(1, math.ceil(max(len(s) for s in shares) / batch_size))
            for rank, share in enumerate(shares):
                for rows in np.array_split(share, min(num_batches, max(len(share), 1))):
                    if len(rows):
                        per_rank[rank].append((split, flag, int(rows[0]), int(rows[-1]) + 1))
        counts = {len(b) for b in per_rank}
        if len(counts) > 1:  # fewer rows than ranks × batches: let the short ranks repeat their last batch
            most = max(counts)
            per_rank = [b + [b[-1]] * (most - len(b)) if b else b for b in per_rank]
        parts = sum(ray.get([r.generate.remote(b) for r, b in zip(self.ranks, per_rank)]), [])
        unique = {(split, flag, start): ids for split, flag, start, ids in parts}
        return [(*key, ids) for key, ids in sorted(unique.items())]

    def train_step(self, flag: str, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        """One server-side step on every rank (data parallel), rank i on batches[i] = (images, labels)."""
        return ray.get([r.train_step.remote(flag, x, y) for r, (x, y) in zip(self.ranks, batches)])

    def fit(self, epochs: int, round_: int) -> float:
        """Server-side training of a method's own model on the server's split (every rank)."""
        return float(np.mean(ray.get([r.fit.remote(epochs, round_) for r in self.ranks])))

    def answer(self, split: str) -> list:
        """A method's own model run on every row of ``split`` (ranks share the batches; repeats dropped)."""
        parts = sum(ray.get([r.answer.remote(split) for r in self.ranks]), [])
        unique = {(a.task, a.first_row): a for a in parts}
        return [unique[key] for key in sorted(unique)]

    def close(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
