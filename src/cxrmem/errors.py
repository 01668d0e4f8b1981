"""The one exception type for mistakes a user can make and fix.

Contract: the message is a single line that names the cause and the fix.
The command-line entry points print it as ``error: <message>`` on stderr and
exit with status 2, without a traceback (``--debug`` shows one).
"""


class UserError(Exception):
    """A problem with the user's input (config, data, paths, checkpoints)."""

    exit_code = 2
