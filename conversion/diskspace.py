"""The output's file system, as one line with exit code 2: refused up front when it is read-only
or cannot hold what is about to be written, and recognised when a write fails for lack of space
(Python's OSError, or TensorFlow's error carrying the same errno text)."""

import errno
import os
import shutil

from tfbit.errors import TfbitError

# A file-size limit (`ulimit -f`, RLIMIT_FSIZE) fails writes with EFBIG: for the writer it is a full disk.
_NO_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file-size limit",
}


class InsufficientSpace(TfbitError, OSError):
    """Refused before writing: the output's file system cannot hold what is about to be written."""

    def __init__(self, path, needed_bytes, free_bytes, what):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        self.message = (
            f"not enough space for {what} in {os.fspath(path)}: it needs at least "
            f"{needed_bytes / 1e6:.1f} MB, {free_bytes / 1e6:.1f} MB are free"
        )

    def __str__(self):
        return self.message


def out_of_space(error):
    """The reason, naming the file where known, when `error` or an exception it was raised from
    is a write that failed for lack of space; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, InsufficientSpace):
            return str(error)
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return _NO_SPACE[error.errno] + (f" writing {error.filename}" if error.filename else "")
        if reason := out_of_space_in(str(error)):
            return reason
        error = error.__cause__ or error.__context__
    return None


def out_of_space_in(text):
    """The reason when `text` (an error message, a log line) reports a write that failed for lack
    of space, naming the file where TensorFlow's form gives it ("<file>; No space left on device")."""
    for code, reason in _NO_SPACE.items():
        if os.strerror(code) in text:
            where = text.split(";")[0].strip() if ";" in text and "\n" not in text else ""
            return reason + (f" writing {where}" if where else "")
    return None


def existing_ancestor(path):
    """`path`, or its nearest ancestor that exists (what a writer would create its folders in)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_writable(path):
    """ValueError naming the place when `path` cannot be created or written (a read-only file
    system or folder, a file where a folder is needed), before a long run finds out."""
    existing = existing_ancestor(path)
    if existing != os.path.abspath(path) and not os.path.isdir(existing):
        raise ValueError(f"cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write into {existing}: read-only file system or folder")


def check_free_space(path, needed_bytes, what):
    """InsufficientSpace when the file system of `path` has less than `needed_bytes` free.
    `needed_bytes` must be a lower bound of what `what` writes, so a refusal is never premature."""
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < needed_bytes:
        raise InsufficientSpace(path, needed_bytes, free, what)
