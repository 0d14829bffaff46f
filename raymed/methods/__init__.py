"""Federated methods, one module each (client update + server aggregation), in a registry by name."""

from raymed.methods.base import (
    METHODS,
    ClientContext,
    ClientUpdate,
    Method,
    ServerState,
    WeightedMean,
    Weights,
    local_sgd,
    register_method,
)
from raymed.methods import fedavg, fedmrg, fedper, fedprox, omnifm  # noqa: E402,F401  (registers the methods)


def build_method(name: str, params: dict) -> Method:
    cls = METHODS[name]
    return cls(cls.Params.model_validate(params))


__all__ = [
    "METHODS",
    "ClientContext",
    "ClientUpdate",
    "Method",
    "ServerState",
    "WeightedMean",
    "Weights",
    "build_method",
    "local_sgd",
    "register_method",
]
