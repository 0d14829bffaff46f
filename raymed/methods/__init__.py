"""Federated methods, one module each (client update + server aggregation), in a registry by name."""

from raymed.methods.base import (
    METHODS,
    ClientContext,
    ClientUpdate,
    Method,
    ServerState,
    WeightedMean,
    Weights,
    client_context,
    local_sgd,
    register_method,
)
from raymed.tasks.registry import run_task  # noqa: E402
from raymed.methods import central, ditto, dpfedavg, fedavg, fedavgm, fedbn, fedkim, fedmrg, fedopt, fedper, fedprox, lorkd, mafm3, omnifm, robust, scaffold  # noqa: E402,F401  (registers the methods)


def build_method(name: str, params: dict) -> Method:
    cls = METHODS[name]
    return cls(cls.Params.model_validate(params))


def has_server_model(cfg) -> bool:
    """Whether the server holds a model in DeepSpeed ranks: a run task's generator (report
    generation), or a method's own server-side model (FedKIM's central model)."""
    return run_task(cfg.data.task).server_model or METHODS[cfg.strategy.name].uses_server_model


__all__ = [
    "METHODS",
    "ClientContext",
    "ClientUpdate",
    "Method",
    "ServerState",
    "WeightedMean",
    "Weights",
    "build_method",
    "client_context",
    "has_server_model",
    "local_sgd",
    "register_method",
]
