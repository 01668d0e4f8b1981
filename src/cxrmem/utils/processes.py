"""Process pools that are safe to start from any process, and cheap to start again.

A pool of forked workers inherits every lock another thread held at the fork: from a process
with threads (a training run, pytest-xdist's worker) a forked child can hang on one, as the
synthetic generator's did. The workers here are forked from a ``forkserver`` process instead,
which has no such threads; the server imports the modules named at the pools' creation once, so
that later pools start in a tenth of a second rather than importing the package again in every
worker (about 2.5 s each, measured on 2 cores).
"""

from __future__ import annotations

import multiprocessing

_PRELOADED: list[str] = []


def process_pool(workers: int, module: str):
    """A ``multiprocessing.Pool`` of ``workers`` forked from the forkserver, with ``module`` (the one that
    defines the workers' function) imported in the server."""
    context = multiprocessing.get_context("forkserver")
    if module not in _PRELOADED:
        _PRELOADED.append(module)
        context.set_forkserver_preload(list(_PRELOADED))  # takes effect if the server has not started yet
    return context.Pool(workers)
