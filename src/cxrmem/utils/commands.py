"""Running a command: one line for a user's mistake (exit 2), Ctrl-C and SIGTERM handled alike.

Every entry point is ``@guarded``; the messages below are the ones a stopped command prints.
"""

from __future__ import annotations

import argparse
import functools
import re
import signal
import sys
import threading
import warnings

from . import io
from .errors import UserError


#: The options several commands take, each spelled once: name -> how to add it to a parser.
SHARED_OPTIONS = {
    "debug": lambda p: p.add_argument("--debug", action="store_true", help="show tracebacks for errors"),
    "set": lambda p: p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                                    help="override a config key, e.g. --set memory.top_k=5 (repeatable)"),
    "workers": lambda p: p.add_argument("--workers", type=int, default=None, help="processes (default: every core)"),
}


def add_shared_options(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    """Add the named SHARED_OPTIONS to ``parser`` (or an argument group); returns it."""
    for name in names:
        SHARED_OPTIONS[name](parser)
    return parser


TRAINING_INTERRUPTED = ("interrupted: the last finished epoch is saved; add --resume to the same command to "
                        "continue (make demo continues by itself)")


RERUN_TO_RESUME = "interrupted: finished files are kept; run the same command again to continue"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, ``timeout``): handled as Ctrl-C is, exit status 143."""


def _terminate(signum, frame):
    raise Terminated


def handle_sigterm() -> None:
    """SIGTERM raises :class:`Terminated` in the main thread, unless something else (a launcher such as
    submitit) has installed a handler of its own."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def guarded(main=None, *, interrupted: str = TRAINING_INTERRUPTED):
    """Run ``main(argv)`` for every command line: a user mistake becomes one line on stderr and exit
    status 2, Ctrl-C the line ``interrupted`` and status 130. ``@guarded`` or ``@guarded(interrupted=...)``."""
    if main is None:
        return functools.partial(guarded, interrupted=interrupted)

    def wrapper(argv=None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv
        if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # off a terminal each line shows when printed, not minutes later
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
        handle_sigterm()
        try:
            return main(argv)
        except UserError as exc:
            if debug:
                raise
            # fastai prefixes errors raised inside callbacks with a line of its own, and a DataLoader worker's
            # error comes back as its traceback text ending "cxrmem.<module>.<UserError class>: <ours>": keep ours
            line = re.sub(r"^cxrmem(\.\w+)+: ", "", str(exc).splitlines()[-1].strip())
            print(f"error: {line}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            cause = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"\n{interrupted.replace('interrupted', cause, 1)}", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        except OSError as exc:
            if debug or not io.out_of_space(exc):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: no space left on the device{where}; free some space, then run the same command again "
                  f"(with --resume when it was training: finished epochs are kept)", file=sys.stderr)
            return UserError.exit_code
    return wrapper
