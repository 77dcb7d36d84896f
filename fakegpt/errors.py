"""The one exception type that the CLI turns into a one-line message and exit status 2, and its formatter."""

from __future__ import annotations


class FakegptError(Exception):
    """A user-facing error: bad input, bad flag, unreachable service.

    The message should name the file/flag (and line, where there is one). The CLI prints
    `fakegpt STAGE: error: <message>` and exits with status 2, never a traceback.
    """


def one_line(exc: BaseException, limit: int = 500, with_type: bool = False) -> str:
    """`exc` as one line of at most `limit` characters, for the terminal and for MLflow's error tag.

    An OSError names its file (`path: No space left on device`); an exception without a message gives its
    class name, so the line is never empty. `with_type` prefixes the class name (`ValueError: ...`), for
    records of failures that were not user errors (a failed tune trial).
    """
    if isinstance(exc, OSError) and not isinstance(exc, FakegptError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if with_type:
        first = f"{type(exc).__name__}: {first}"
    return (first or type(exc).__name__)[:limit]
