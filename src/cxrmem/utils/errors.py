"""The one exception type for mistakes a user can make and fix.

Contract: the message is a single line that names the cause and the fix.
The command-line entry points print it as ``error: <message>`` on stderr and
exit with status 2, without a traceback (``--debug`` shows one).
"""

import difflib


class UserError(Exception):
    """A problem with the user's input (config, data, paths, checkpoints)."""

    exit_code = 2


def closest(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate most like ``name`` (difflib's ratio >= ``cutoff``), for "did you mean" hints."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return match[0] if match else None


def describe_error(exc: BaseException) -> str:
    """An exception as one short line: its first line, else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
