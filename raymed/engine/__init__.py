"""Engine: Ray server actor + client worker pool. It calls the method interface and knows no method.

Exports are imported on first use (PEP 562), so a process that only needs a light piece, such as
the client-state actor, does not import torch through this package.
"""

from importlib import import_module

_EXPORTS = {
    "run_experiment": "raymed.engine.federation",
    "resume_experiment": "raymed.engine.federation",
    "Federation": "raymed.engine.federation",
    "Placement": "raymed.engine.placement",
    "federation_bundles": "raymed.engine.placement",
    "init_ray": "raymed.engine.runtime",
    "plan_workers": "raymed.engine.placement",
    "ServerActor": "raymed.engine.server",
    "assign": "raymed.engine.pool",
    "sample_clients": "raymed.engine.server",
    "ClientWorker": "raymed.engine.worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raymed.engine' has no attribute {name!r}")
