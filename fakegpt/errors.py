"""The one exception type that the CLI turns into a one-line message and exit status 2."""


class FakegptError(Exception):
    """A user-facing error: bad input, bad flag, unreachable service.

    The message should name the file/flag (and line, where there is one). The CLI prints
    `fakegpt STAGE: error: <message>` and exits with status 2, never a traceback.
    """
