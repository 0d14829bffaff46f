"""Clients' persistent state between rounds (FedPer heads, optimizer state, control variates, ...).

It lives in its own actor, not in the server: workers fetch a client's state before training it and
store the new state after, so what a method keeps on the client never reaches the server process.
Backends: memory (the actor's heap) or disk (one file per client under the run folder, for
federations whose states outgrow memory; on a cluster that folder must be on shared storage).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raymed.engine.checkpoint import load_tree, save_tree

SUFFIX = ".safetensors"  # one file per client, in a format that cannot run code (no pickle)


class ClientStateStore:
    def __init__(self, folder: str | None = None):
        self.folder = Path(folder) if folder else None
        self.memory: dict[int, Any] = {}
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get_many(self, client_ids: list[int]) -> list[Any]:
        return [self._get(c) for c in client_ids]

    def put_many(self, states: dict[int, Any]) -> int:
        for client_id, state in states.items():
            self._put(client_id, state)
        return len(states)

    def pid(self) -> int:
        return os.getpid()

    def snapshot(self) -> dict[int, Any]:
        """Every client's state (for a checkpoint of the whole federation)."""
        return {c: self._get(c) for c in self.keys()}

    def replace_all(self, states: dict[int, Any]) -> int:
        """Exactly these states and no others (a restored checkpoint: states written after it go)."""
        for client_id in self.keys():
            if client_id not in states:
                self._drop(client_id)
        return self.put_many(states)

    def keys(self) -> list[int]:
        if self.folder is None:
            return sorted(self.memory)
        return sorted(int(p.name[: -len(SUFFIX)]) for p in self.folder.glob(f"*{SUFFIX}") if p.name[: -len(SUFFIX)].isdigit())

    def _get(self, client_id: int) -> Any:
        if self.folder is None:
            return self.memory.get(client_id)
        path = self.folder / f"{client_id}{SUFFIX}"
        return load_tree(path) if path.exists() else None

    def _drop(self, client_id: int) -> None:
        if self.folder is None:
            self.memory.pop(client_id, None)
        else:
            (self.folder / f"{client_id}{SUFFIX}").unlink(missing_ok=True)

    def _put(self, client_id: int, state: Any) -> None:
        if self.folder is None:
            self.memory[client_id] = state
            return
        save_tree(self.folder / f"{client_id}{SUFFIX}", state)
