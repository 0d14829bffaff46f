"""User-facing errors: each carries one line that says what is wrong and what to do about it."""

from __future__ import annotations


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


def find_user_error(exc: BaseException) -> RaymedError | None:
    """The RaymedError behind ``exc``, looking through Ray's task-error wrappers and exception chains."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)  # Ray's task errors carry the original exception here
        if isinstance(cause, RaymedError):
            return cause
        if isinstance(cur, RaymedError):
            return cur
        stack.extend([getattr(cur, "cause", None), cur.__cause__, cur.__context__])
    return None
