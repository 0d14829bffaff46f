"""Clients' persistent state between rounds (FedPer heads, optimizer state, control variates, ...).

It lives in its own actor, not in the server: workers fetch a client's state before training it and
store the new state after, so what a method keeps on the client never reaches the server process.
Backends: memory (the actor's heap) or disk (one file per client under the run folder, for
federations whose states outgrow memory; on a cluster that folder must be on shared storage). On disk
the workers read and write the clients' files themselves (:class:`ClientStates`), so no state passes
through the store actor; they only tell it which clients changed.

Checkpoints are incremental and written by this actor, not the driver: the store remembers which
clients changed since the last checkpoint, and :meth:`ClientStateStore.capture` takes exactly those
(between two rounds, so the set is consistent); :meth:`ClientStateStore.write` then writes them as one
segment file while the next round trains. The checkpoint's head lists the segments that still hold
some client's newest state (:mod:`raymed.engine.checkpoint`), so a round's checkpoint costs bytes in
proportion to the clients that round changed, not to the clients registered.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import ray

from raymed.engine.checkpoint import load_tree, save_tree

SUFFIX = ".safetensors"  # one file per client, in a format that cannot run code (no pickle)


class ClientStateStore:
    def __init__(self, folder: str | None = None):
        self.folder = Path(folder) if folder else None
        self.memory: dict[int, Any] = {}
        self.changed: set[int] = set()  # clients whose state changed since the last captured checkpoint
        self.segment_of: dict[int, str] = {}  # client -> the checkpoint segment holding its newest state
        self.captured: dict[str, dict[int, Any]] = {}  # segment -> the states to write to it
        self.lock = threading.Lock()  # the actor is threaded: a segment is written while a round trains
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get_many(self, client_ids: list[int]) -> list[Any]:
        return [self._get(c) for c in client_ids]

    def put_many(self, states: dict[int, Any]) -> int:
        for client_id, state in states.items():
            self._put(client_id, state)
        return self.mark_changed(list(states))

    def mark_changed(self, client_ids: list[int]) -> int:
        """These clients' states changed (written to their files by a worker)."""
        with self.lock:
            self.changed.update(client_ids)
        return len(client_ids)

    def where(self) -> str | None:
        """The folder of the clients' files (disk), or None (memory: ask this actor)."""
        return None if self.folder is None else str(self.folder)

    def pid(self) -> int:
        return os.getpid()

    def snapshot(self) -> dict[int, Any]:
        """Every client's state."""
        return {c: self._get(c) for c in self.keys()}

    # ---- checkpoints

    def capture(self, segment: str, everything: bool = False) -> dict[str, Any]:
        """Take the states changed since the last capture (``everything``: all states, for a
        self-contained checkpoint elsewhere, which leaves the run's own chain as it is) for the
        segment named ``segment``; returns the segments a checkpoint must list, oldest first, and
        how many states this one holds. Called between rounds: cheap (references; the disk
        backend reads the changed files), the writing is :meth:`write`'s."""
        with self.lock:
            ids = self.keys() if everything else sorted(self.changed)
            states = {c: self._get(c) for c in ids}
            if everything:
                live = [segment] if states else []
            else:
                self.changed.clear()
                self.segment_of.update(dict.fromkeys(ids, segment))
                live = sorted(set(self.segment_of.values()))  # names sort by round
            self.captured[segment] = states
        return {"segments": live, "clients": len(states)}

    def write(self, segment: str, path: str) -> int:
        """Write the states captured for ``segment`` to ``path`` (atomically); returns its bytes
        (0 and no file when the segment is empty)."""
        with self.lock:
            states = self.captured.pop(segment)
        if not states:
            return 0
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_tree(path, states)
        return os.path.getsize(path)

    def restored(self, states: dict[int, Any], segment_of: dict[int, str]) -> int:
        """Exactly these states and no others (a restored checkpoint: states written after it go);
        ``segment_of``: where each is in the checkpoint's segments, the base of the next increment."""
        for client_id in self.keys():
            if client_id not in states:
                self._drop(client_id)
        for client_id, state in states.items():
            self._put(client_id, state)
        with self.lock:
            self.changed = set(states) - set(segment_of)  # a checkpoint from elsewhere: everything is new here
            self.segment_of = dict(segment_of)
            self.captured.clear()
        return len(states)

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


class ClientStates:
    """A worker's access to the clients' states: straight from their files when they are on disk
    (the store only hears which changed), else through the store actor."""

    def __init__(self, store: Any):
        self.store = store
        folder = ray.get(store.where.remote())
        self.folder = Path(folder) if folder else None

    def get_many(self, client_ids: list[int]) -> list[Any]:
        if self.folder is None:
            return ray.get(self.store.get_many.remote(client_ids))
        return [load_tree(path) if (path := self.folder / f"{c}{SUFFIX}").exists() else None for c in client_ids]

    def put_many(self, states: dict[int, Any]) -> None:
        """Stored (and the store told) before this returns: before the round ends."""
        if self.folder is None:
            ray.get(self.store.put_many.remote(states))
            return
        for client_id, state in states.items():
            save_tree(self.folder / f"{client_id}{SUFFIX}", state)
        ray.get(self.store.mark_changed.remote(list(states)))
