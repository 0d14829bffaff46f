"""Where a result came from: raymed's version, the git commit of the checkout it runs from, and the
command line. ``raymed --version`` prints it; every run's ``meta.json`` records it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from raymed import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout raymed is imported from (None: an installed copy, or no git)."""
    root = PACKAGE_DIR.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        # tracked files edited since that commit (untracked ones do not change what raymed runs)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.stdout.strip())}


def version_string() -> str:
    """``raymed 0.1.0`` plus ``(git <commit>[, uncommitted changes])`` when run from a checkout."""
    git = git_state()
    if git is None:
        return f"raymed {__version__}"
    return f"raymed {__version__} (git {git['commit'][:12]}{', uncommitted changes' if git['dirty'] else ''})"


def provenance() -> dict[str, Any]:
    """What meta.json records about the code and the invocation."""
    git = git_state()
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if program is not None:  # `python -m raymed` runs raymed/__main__.py
        program = program.parent if program.name == "__main__.py" else program
    return {
        "raymed": __version__,
        "git_commit": None if git is None else git["commit"],
        "git_dirty": None if git is None else git["dirty"],
        "command": None if program is None else shlex.join([program.name, *sys.argv[1:]]),
    }
