"""Local SGD for many clients at once: ``torch.func.vmap`` over stacked client parameters.

For small models the per-client cost of the sequential loop is dominated by Python and kernel-launch
overhead, not arithmetic. Here every client of a group keeps its own copy of the trained parameters
in one stacked tensor per parameter, and each optimisation step runs all clients' forward and
backward passes as one batched call::

    step t:  for the clients that still have a batch at step t (grouped by batch size),
             g_k = ∇ [loss_k(w_k; batch_k,t) + penalty(w_k)]      (vmap over k)
             w_k ← SGD(w_k, g_k)   (torch.optim.SGD's update: weight decay, momentum, lr)

Each client draws exactly the batches it would draw alone (its own seeded stream, the same plan),
so the updates equal the sequential ones to float tolerance. Clients are grouped by the dataset they
hold; a client holding several datasets, or a model with buffers (BatchNorm statistics), is trained
by the sequential loop instead.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from raymed.methods.base import ClientContext, Penalty, Weights, load_weights, local_sgd


def local_sgd_many(
    ctxs: list[ClientContext], starts: list[Weights], penalty: Penalty | None = None
) -> list[tuple[Weights, dict[str, float]]]:
    """Train each client from its ``starts`` weights; returns its trained weights and its metrics."""
    results: dict[int, tuple[Weights, dict[str, float]]] = {}
    groups: dict[str, list[int]] = defaultdict(list)
    model = ctxs[0].model if ctxs else None
    has_buffers = model is not None and any(True for _ in model.buffers())
    for i, ctx in enumerate(ctxs):
        tensors = ctx.tensors()
        if len(tensors) == 1 and not has_buffers and isinstance(next(iter(tensors.values()))[0], torch.Tensor):
            groups[next(iter(ctx.tensors()))].append(i)
        else:  # several datasets interleave per batch, buffers, or (image, question) inputs: train alone
            load_weights(ctx.model, starts[i])
            metrics = local_sgd(ctx, penalty)
            results[i] = (ctx.read(ctx.trained_keys), metrics)
    for flag, members in groups.items():
        trained = _train_group(flag, [ctxs[i] for i in members], [starts[i] for i in members], penalty)
        results.update(zip(members, trained))
    return [results[i] for i in range(len(ctxs))]


def _train_group(
    flag: str, ctxs: list[ClientContext], starts: list[Weights], penalty: Penalty | None
) -> list[tuple[Weights, dict[str, float]]]:
    model, cfg, device = ctxs[0].model, ctxs[0].train, ctxs[0].device
    task = ctxs[0].tasks[flag]
    names = [n for n, _ in model.named_parameters() if n in set(ctxs[0].trained_keys)]
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    params = {n: torch.from_numpy(np.stack([s[n] for s in starts])).to(device) for n in names}  # a writable copy
    momentum = {n: torch.zeros_like(p) for n, p in params.items()} if cfg.momentum else None
    lr = ctxs[0].lr  # one round: every client's schedule is at the same point

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = task.loss(functional_call(model, {**frozen, **p}, (x, flag)), y)
        return loss + penalty(p) if penalty is not None else loss

    step_fn = vmap(grad_and_value(loss_fn))
    plans = [[(x, y) for _, x, y in ctx.local_batches()] for ctx in ctxs]
    loss_sums = torch.zeros(len(ctxs), device=device)
    model.train()
    for t in range(max(len(p) for p in plans)):
        by_size: dict[int, list[int]] = defaultdict(list)
        for k, plan in enumerate(plans):
            if t < len(plan):
                by_size[len(plan[t][0])].append(k)
        for members in by_size.values():
            index = torch.as_tensor(members, device=device)
            x = torch.stack([plans[k][t][0] for k in members])
            y = torch.stack([plans[k][t][1] for k in members])
            grads, losses = step_fn({n: v[index] for n, v in params.items()}, x, y)
            loss_sums[index] += losses.detach()  # each client once per step: no duplicate indices
            for n in names:  # torch.optim.SGD's update, client by client in one tensor op
                g = grads[n]
                if cfg.weight_decay:
                    g = g.add(params[n][index], alpha=cfg.weight_decay)
                if momentum is not None:
                    g = momentum[n][index].mul(cfg.momentum).add(g)
                    momentum[n][index] = g
                params[n][index] = params[n][index].add(g, alpha=-lr)
    out = []
    for k, plan in enumerate(plans):
        weights = {n: params[n][k].detach().cpu().numpy().copy() for n in names}
        out.append((weights, {"train_loss": float(loss_sums[k]) / max(len(plan), 1)}))
    return out


def subtract(final: Weights, start: Weights, keys: list[str] | None = None) -> Weights:
    """``final − start`` over ``keys`` (default: every key of ``final`` that ``start`` has)."""
    keys = [k for k in (keys if keys is not None else final) if k in start and k in final]
    return {k: final[k] - np.asarray(start[k]) for k in keys}
