"""How a conversion's processes end: children die with the converter, and termination signals
become exceptions so that `finally` blocks (staging clean-up, killing children) run.

Pure Python, Linux-first: elsewhere `die_with_parent` is a no-op and the signal helpers still work.
"""

import contextlib
import ctypes
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Signals that end a process by default and that a conversion should clean up after.
TERMINATION_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))
received = []  # the signals `termination_as_exit` turned into exceptions, in order


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Resolved in the parent: a forked child should run as little code as possible before exec.
_prctl = _find_prctl()
_forking_pid = None


def _remember_forking_pid():
    global _forking_pid
    _forking_pid = os.getpid()


# subprocess runs the at-fork hooks when it has a preexec_fn, so the child knows who forked it
# even if that process is already gone by the time the child looks.
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(before=_remember_forking_pid)


def die_with_parent(parent_pid=None):
    """Have the kernel SIGKILL this process when its parent dies (even by kill -9).

    Use it as `subprocess.Popen(..., preexec_fn=die_with_parent)`, or call it first thing in a
    child with the parent's PID. If the parent died before the request took effect, the process
    kills itself at once. Returns whether the request is in place (False where prctl is missing).

    Linux delivers the signal when the *thread* that forked the child exits: start the child
    from a thread that lives as long as the parent needs it (e.g. the main thread).
    """
    if _prctl is None:
        return False
    parent = parent_pid or _forking_pid
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent and os.getppid() != parent:  # orphaned already: no death signal will come
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _exit_on_signal(signum, frame):
    received.append(signum)
    raise _exception(signum)


def _exception(signum):
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)  # the shell's status for "killed by signum"


def raise_if_received():
    """Raise again for a signal already received. The exception a handler raises is lost when
    the signal lands in code that swallows exceptions -- a garbage-collector callback or a
    `__del__` ("Exception ignored in ...", seen with TensorFlow's during TFLite conversion):
    call this before any step that must not run after a termination request (publishing)."""
    if received:
        raise _exception(received[0])


def _in_main_thread():
    # Python signal handlers can only be installed from the main thread.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def termination_as_exit():
    """Inside the block SIGTERM/SIGHUP raise SystemExit(128 + signum) instead of killing the
    process outright, so cleanup code runs, and SIGINT raises KeyboardInterrupt as usual; each
    is also recorded (`received`, `raise_if_received`), since the exception can be swallowed.
    A handler the application installed itself (or an ignored signal) is left alone; the
    previous handlers come back on exit.

    A signal is handled when the main thread next runs Python code: during a long C call
    (a TFLite conversion) it waits for that call to return.
    """
    previous = {}
    if _in_main_thread():
        for signum in (*TERMINATION_SIGNALS, signal.SIGINT):
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                previous[signum] = signal.signal(signum, _exit_on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_termination():
    """Hold SIGTERM, SIGHUP and SIGINT for a short critical section (renames that must all
    happen, a clean-up that must finish) and deliver them, to the previous handlers, after it."""
    if not _in_main_thread():
        yield
        return
    pending = []
    previous = {}
    for signum in (*TERMINATION_SIGNALS, signal.SIGINT):
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:  # None: a C handler we cannot restore
            previous[signum] = signal.signal(signum, lambda s, f: pending.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
