"""User-facing errors: each carries one line that says what is wrong and what to do about it."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator


class RaymedError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line, no traceback."""

    kind = "error"

    def __str__(self) -> str:  # always one line, whatever the message was built from
        return " ".join(str(self.args[0] if self.args else "").split())


class ConfigError(RaymedError):
    kind = "config error"


class DataError(RaymedError):
    kind = "data error"


class ResourceError(RaymedError):
    kind = "resource error"


class ClientFailure(RaymedError):
    kind = "client error"


class OutputError(RaymedError):
    """A file or folder raymed must write could not be written (full disk, no permission, a file
    where a folder should be)."""

    kind = "output error"


class RunFailed(RaymedError):
    """A run stopped by something outside the user's input (an actor killed, a node lost); the
    message says where its finished rounds are and how to continue."""

    kind = "run failed"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's scheduler, ``kill``): handled as Ctrl-C is, with exit status 143."""


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or point output_dir elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or point output_dir elsewhere",
    errno.EACCES: "no permission to write there: choose a folder you can write (--set output_dir=...)",
    errno.EPERM: "no permission to write there: choose a folder you can write (--set output_dir=...)",
    errno.EROFS: "the file system is read-only: choose a writable folder (--set output_dir=...)",
    errno.ENOTDIR: "a file stands where a folder is needed: move it, or choose another path",
    errno.EEXIST: "a file stands where a folder is needed: move it, or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: choose a file name",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: Ray's task-error wrappers (``cause``) and Python's chains."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack.extend([getattr(cur, "cause", None), cur.__cause__, cur.__context__])


def os_error(exc: BaseException) -> OutputError | None:
    """The full-disk, permission or path error behind ``exc`` (an OSError anywhere in its chain, or a
    safetensors error that carries an OS error code) as one line naming the path; None otherwise."""
    for cur in _chain(exc):
        code = getattr(cur, "errno", None) if isinstance(cur, OSError) else None
        if code is None and type(cur).__name__ == "SafetensorError":
            found = re.search(r"code: (\d+)", str(cur))
            code = int(found.group(1)) if found else None
        if code in _OS_HINTS:
            where = getattr(cur, "filename", None)
            return OutputError(f"{os.strerror(code)}{f': {where}' if where else ''}; {_OS_HINTS[code]}")
    return None


def find_user_error(exc: BaseException) -> RaymedError | None:
    """The RaymedError behind ``exc``, looking through Ray's task-error wrappers and exception chains."""
    for cur in _chain(exc):
        cause = getattr(cur, "cause", None)  # Ray's task error is an instance of its cause's class too: take the original
        if isinstance(cause, RaymedError):
            return cause
        if isinstance(cur, RaymedError):
            return cur
    return None
