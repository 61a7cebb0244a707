"""A Ctrl-C that stops ``cssbench run`` even where Python swallows its KeyboardInterrupt.

Python raises the KeyboardInterrupt of a SIGINT in whatever code runs then: in a finalizer
or a weakref callback (a WeakSet's, say), it prints "Exception ignored in ..." and goes on,
and the run with it. While ``noting_interrupts`` holds, a SIGINT is also noted, and
``raise_if_interrupted``, called where a run can stop cleanly (before every iteration, between
runs), raises it again. A plain flag: checking it costs no more than a global's read.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

_interrupted = False   # a SIGINT came while noting_interrupts held, in this process


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt where a SIGINT came (``noting_interrupts``) whose own was
    swallowed or caught: nothing should go on after it."""
    if _interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def noting_interrupts():
    """For the block, a SIGINT is noted and then raises KeyboardInterrupt as Python's default
    handler does; on leaving the block, the previous handler is back. Only over that default
    handler, in the main thread (the only one that can set one): a SIGINT that is ignored (a
    background job of a script) or handled otherwise stays so. A loader worker forked in the
    block inherits the handler: there it notes nothing and raises as the default one does
    (torch's worker loop ends quietly on it; the main process, which got the SIGINT too,
    stops the run)."""
    global _interrupted
    if (signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    previous = signal.signal(signal.SIGINT, _noting_in(os.getpid()))
    try:
        yield   # one swallowed after the block's last check came when its work was done
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False


def _noting_in(owner: int):
    """The SIGINT handler of ``noting_interrupts``, noting only in the process ``owner``."""
    def note_and_raise(signum, frame):
        global _interrupted
        if os.getpid() == owner:
            _interrupted = True
        signal.default_int_handler(signum, frame)
    return note_and_raise
