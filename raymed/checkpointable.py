"""Which dataclasses a checkpoint may hold: a registry at the bottom of the package.

Methods register the state they carry between rounds (``ServerState``, OmniFM's knowledge bank) here,
and :mod:`raymed.engine.checkpoint` rebuilds only registered classes from their fields, so a
checkpoint never runs code. Living here, not in the engine, lets a method register its state without
importing the engine.
"""

from __future__ import annotations

REGISTERED: dict[str, type] = {}


def checkpointable(cls: type) -> type:
    """Allow instances of the dataclass ``cls`` in checkpoints (rebuilt from their fields)."""
    REGISTERED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls
