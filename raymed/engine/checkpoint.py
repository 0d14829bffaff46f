"""The federation checkpoint, in a format that cannot run code.

A run folder is shared between people and copied from clusters, so nothing in it may execute when it
is read: no pickle. The checkpoint is safetensors files — arrays as tensors, everything else as a JSON
tree in the file's metadata, arrays referenced by name:

- ``checkpoint.safetensors``, the head: the server's state (weights, the method's state, the round),
  the model selected on validation, the rounds so far, the resolved config, and the names of the
  client-state segments that make up the clients' states, oldest first;
- ``checkpoint-clients/<segment>.safetensors``: the states of the clients that changed in the rounds
  since the previous checkpoint (:class:`raymed.engine.client_state.ClientStateStore` writes them).
  A client's state is the one in the newest segment that holds it.

A checkpoint is complete or absent: segments are written first, under new names, then the head
replaces the previous one atomically, and only then are segments no head lists removed. A write
killed midway leaves the previous checkpoint whole. Reading it parses a length-prefixed JSON header and
raw tensor bytes, nothing more. Objects inside it are limited to plain data and the dataclasses
registered with :func:`raymed.checkpointable.checkpointable` (``ServerState``, OmniFM's knowledge bank), rebuilt from their
fields.

The header also carries a format version, the run's id and a hash of the resolved config, so that a
resume continues the same experiment or nothing (:func:`check_resume`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from raymed.checkpointable import REGISTERED
from raymed.errors import ConfigError, DataError
from raymed.files import atomic_path

CHECKPOINT_FILE = "checkpoint.safetensors"
SEGMENTS = "checkpoint-clients"  # the client-state segments, beside the head
LEGACY_CHECKPOINT = "federation.pkl"  # before format 2: a pickle, never read
FORMAT = "raymed-checkpoint"
FORMAT_VERSION = 3  # 3: client states in segments; 2 (still read): every client's state inside the head
READS = ("2", "3")
RESUMABLE_KEYS = ("rounds", "ray.")  # what a resumed run may change: how long it runs and where Ray is

# ---------------------------------------------------------------------------------------------------
# A tree of plain data and arrays <-> JSON + named arrays


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"an array of dtype {array.dtype} cannot be checkpointed (numbers and booleans only)")
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(array.reshape(1) if array.ndim == 0 else array)  # safetensors has no 0-d
        if isinstance(value, np.generic):
            return {"$s": key}
        return {"$a0": key} if array.ndim == 0 else {"$a": key}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, tuple):
        return {"$t": [_encode(v, arrays) for v in value]}
    if isinstance(value, dict):
        return {"$d": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value) and name in REGISTERED:
        return {"$c": name, "f": {f.name: _encode(getattr(value, f.name), arrays) for f in dataclasses.fields(value)}}
    raise TypeError(f"a {name} cannot be checkpointed; register it with raymed.checkpointable.checkpointable")


def _decode(node: Any, tensors: Any) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "$a" in node:
        return tensors.get_tensor(node["$a"])
    if "$a0" in node:
        return tensors.get_tensor(node["$a0"]).reshape(())
    if "$s" in node:
        return tensors.get_tensor(node["$s"])[0]
    if "$t" in node:
        return tuple(_decode(v, tensors) for v in node["$t"])
    if "$d" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["$d"]}
    if "$c" in node:
        cls = REGISTERED.get(node["$c"])
        if cls is None:
            raise DataError(f"the checkpoint holds an object of {node['$c']}, which raymed does not rebuild")
        fields = {name: _decode(v, tensors) for name, v in node["f"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                setattr(obj, k, v)
        return obj
    raise DataError(f"the checkpoint holds an entry raymed does not know ({sorted(node)[:3]})")


def save_tree(path: str | Path, tree: Any, header: dict[str, str] | None = None) -> Path:
    """Write ``tree`` (plain data, arrays, registered dataclasses) to ``path`` as safetensors, atomically."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = _encode(tree, arrays)
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={**(header or {}), "tree": json.dumps(skeleton)})
    return Path(path)


def read_header(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), "np") as handle:
        return dict(handle.metadata() or {})


def load_tree(path: str | Path) -> Any:
    """The tree :func:`save_tree` wrote (only data is read; nothing in the file runs)."""
    with safe_open(str(path), "np") as handle:
        return _decode(json.loads((handle.metadata() or {})["tree"]), handle)


# ---------------------------------------------------------------------------------------------------
# The federation checkpoint


def config_hash(config: dict[str, Any]) -> str:
    """A hash of what a run computes: the resolved config without ``rounds`` and ``ray.*``."""
    kept = {k: v for k, v in config.items() if not f"{k}.".startswith(RESUMABLE_KEYS)}  # "rounds.", "ray."
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def segment_path(folder: str | Path, segment: str) -> Path:
    return Path(folder) / SEGMENTS / f"{segment}.safetensors"


def save_checkpoint(folder: str | Path, run_id: str, saved: dict[str, Any]) -> Path:
    """Write the head (``saved``: server, selected, rounds, config, client_segments; see
    Federation.checkpoint) once its segments are written; then remove the segments it no longer lists."""
    header = {"format": FORMAT, "version": str(FORMAT_VERSION), "run_id": run_id, "config_sha256": config_hash(saved["config"])}
    path = save_tree(Path(folder) / CHECKPOINT_FILE, saved, header)
    listed = {f"{s}.safetensors" for s in saved["client_segments"]}
    for old in (Path(folder) / SEGMENTS).glob("*.safetensors"):
        if old.name not in listed:
            old.unlink(missing_ok=True)
    return path


def read_checkpoint(folder: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The checkpoint in ``folder``: (its header, its content, with ``clients``: every client's state
    and ``segment_of``: the segment each came from); one line when it or a segment is missing,
    unreadable, of another format or version, or does not match its own config hash."""
    folder = Path(folder)
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        if (folder / LEGACY_CHECKPOINT).is_file():
            raise DataError(
                f"{folder} holds a {LEGACY_CHECKPOINT} checkpoint, a pickle of an earlier raymed: it is not read (unpickling "
                f"can run code planted in it); rerun from the start"
            )
        raise DataError(f"{folder} holds no {CHECKPOINT_FILE}; give the folder of a raymed run saved with engine.checkpoint_every > 0")
    try:
        header = read_header(path)
    except Exception as exc:
        raise DataError(f"cannot read the federation checkpoint {path} ({type(exc).__name__}); it is corrupt: rerun from the start") from None
    if header.get("format") != FORMAT or header.get("version") not in READS:
        raise DataError(
            f"{path} is checkpoint format {header.get('format', '?')} version {header.get('version', '?')}; this raymed reads "
            f"{FORMAT} versions {' and '.join(READS)}: resume it with the raymed that wrote it, or rerun from the start"
        )
    try:
        saved = load_tree(path)
        saved["server"].round  # noqa: B018  (a tree of something else fails here)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read the federation checkpoint {path} ({type(exc).__name__}); it is corrupt: rerun from the start") from None
    if config_hash(saved["config"]) != header.get("config_sha256"):
        raise DataError(f"{path}: its config does not match the hash it was saved with; the file was altered: rerun from the start")
    saved.setdefault("clients", {})  # version 2 holds them inline
    saved["segment_of"] = {}
    for segment in saved.get("client_segments", []):
        part = segment_path(folder, segment)
        try:
            states = load_tree(part)
        except Exception as exc:
            raise DataError(
                f"cannot read {part}, a part of the checkpoint in {folder} ({type(exc).__name__}); it is missing or corrupt: rerun from the start"
            ) from None
        saved["clients"].update(states)
        saved["segment_of"].update(dict.fromkeys(states, segment))
    saved["folder"] = str(folder)  # where it was read (not saved): a resume in the same folder continues its segments
    return header, saved


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_resume(folder: Path, header: dict[str, str], saved: dict[str, Any], config: dict[str, Any], run_id: str | None) -> None:
    """Refuse (one line) a resume that would not continue the same experiment: a checkpoint of another
    run, or a config.yaml that differs from the checkpoint's beyond ``rounds`` and ``ray.*``."""
    if run_id is not None and header.get("run_id") != run_id:
        raise ConfigError(
            f"{folder / CHECKPOINT_FILE} comes from another run (run {header.get('run_id')}, this folder's meta.json says {run_id}); "
            f"resume the run it belongs to, or rerun from the start"
        )
    changed = [k for k in differing_keys(saved["config"], config) if not k.startswith(RESUMABLE_KEYS)]
    if changed:
        raise ConfigError(
            f"{folder / 'config.yaml'} differs from the checkpoint's config in {', '.join(changed[:8])}"
            + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            + "; a resumed run keeps its config (only rounds and ray.* may change): undo the edit, or rerun from the start"
        )
