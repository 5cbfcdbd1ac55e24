"""Putting a conversion's artifacts into an output folder without losing anything.

    with OutputLock(output):
        version = next_serving_version(output)
        with staging_dir(output) as staging:
            ...write config.json, serving/<version>, ..., report.json into staging...
            publish(staging, output, written, source_paths=source_files, overwrite=overwrite)

Design:
- One conversion per output at a time. `OutputLock` takes a non-blocking flock on
  `<parent>/.<name>.tfbit-lock`, so a second conversion fails at once and names the holder's
  PID. The kernel drops a flock when its process dies, even by kill -9: a crash never leaves an
  output locked. The lock is also what makes the serving version picked under it unique.
- Artifacts are written into a hidden staging folder `<parent>/.<name>.partial-<pid>`: next to
  the output, so that moving them in is a rename on the same filesystem (when the output is a
  mount point, inside it, for the same reason). SIGTERM and SIGHUP become SystemExit while
  staging, so the folder is removed on the way out; after kill -9, the next conversion into the
  same output removes it (its PID is dead, and that conversion holds the lock). No atexit: the
  context manager's `finally` covers every exit atexit would, and neither survives kill -9.
- `publish` moves only the paths the conversion wrote, each with one os.replace (atomic per file
  or folder), with termination signals held off until the last one. Files it did not write are
  never touched; a collision is refused before anything moves unless overwrite is set; the source
  checkpoint's own files are never replaced whatever the flags. Serving versions are never
  replaced: each conversion adds a higher one (TF Serving serves the highest). report.json, the
  record that the artifacts were verified, goes last; when it is replaced, the old one goes first,
  so no reader sees an old report next to new files.
"""

import contextlib
import errno
import fcntl
import os
import posixpath
import re
import shutil
import time

from conversion import processes
from tfbit.errors import TfbitError

REPORT = "report.json"
SERVING = "serving"
_SERVING_VERSION = re.compile(rf"{SERVING}/(\d+)")

_held = {}  # resolved output -> OutputLock held by this process


class OutputError(TfbitError):
    """The output folder cannot be written as asked (refusals come before anything is moved)."""


class OutputLocked(OutputError):
    def __init__(self, output, pid):
        self.output, self.pid = output, pid
        who = f"another conversion (PID {pid})" if pid else "another conversion"
        super().__init__(f"{who} is writing {output}: wait for it to finish or choose another --output")


class ArtifactCollision(OutputError):
    def __init__(self, output, paths):
        self.output, self.paths = output, paths
        super().__init__(
            f"{output} already contains {', '.join(paths)}: pass --overwrite to replace "
            "them (every other file there is kept, and serving versions are added, never replaced)"
        )


class SourceCollision(OutputError):
    def __init__(self, output, paths):
        self.output, self.paths = output, paths
        super().__init__(
            f"{output} holds the source checkpoint: writing {', '.join(paths)} there would replace "
            "its own files, which tfbit never does (not even with --overwrite): choose another --output"
        )


def _home(output):
    # A mount point's parent may be another filesystem (or read-only, as / in a container).
    return output if os.path.ismount(output) else os.path.dirname(output)


def _lock_path(output):
    return os.path.join(_home(output), f".{os.path.basename(output)}.tfbit-lock")


class OutputLock:
    """The exclusive right to write one output folder, held for a whole conversion.

    A context manager (or acquire()/release()); acquire raises OutputLocked at once when another
    process, or another OutputLock in this one, holds it. Creates the output's parent folders.
    """

    def __init__(self, output):
        self.output = os.path.realpath(output)
        self.path = _lock_path(self.output)
        self._fd = None

    def acquire(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the output folder {self.output}: {e.strerror} ({e.filename})") from None
        while True:
            # Not inherited by child processes (O_CLOEXEC): a child must not keep the lock alive.
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"cannot write into {os.path.dirname(self.path)}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _lock_holder(fd)
                os.close(fd)
                raise OutputLocked(self.output, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # release() unlinks the file: if that happened between our open and flock, we locked
            # a file the next process will not open, so start over on the current one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _held[self.output] = self
        return self

    def release(self):
        if self._fd is None:
            return
        del _held[self.output]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking: see acquire
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock_holder(fd, wait=1.0):
    # The holder writes its PID just after locking: give it a moment.
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit() or time.monotonic() > deadline:
            return int(text) if text.isdigit() else None
        time.sleep(0.02)


def _same_file(fd, path):
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _locked(output):
    output = os.path.realpath(output)
    if output not in _held:
        raise RuntimeError(f"hold OutputLock({output!r}) first: staging and publishing are only safe under it")
    return output


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_folder(path):
    return os.path.isdir(path) and not os.path.islink(path)


def _remove(path):
    if _is_folder(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _remove_stale_staging(output):
    """Staging folders of `output` left by conversions that died (kill -9, power loss), including
    `<output>.partial-<pid>` from tfbit versions before this module. Only exact names, only dead PIDs."""
    name = re.escape(os.path.basename(output))
    pattern = re.compile(rf"\.{name}\.partial-(\d+)|{name}\.partial-(\d+)")
    home = _home(output)
    removed = []
    for entry in os.listdir(home):
        match = pattern.fullmatch(entry)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(os.path.join(home, entry), ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staging_dir(output):
    """A fresh, empty staging folder for `output` (whose OutputLock must be held), removed on exit.

    Removes stale staging folders of the same output first. Inside the block SIGTERM and SIGHUP
    raise SystemExit(128 + signum) (unless the application handles them itself), so the folder
    is removed when the process is terminated too.
    """
    output = _locked(output)
    _remove_stale_staging(output)
    path = os.path.join(_home(output), f".{os.path.basename(output)}.partial-{os.getpid()}")
    with processes.termination_as_exit():
        try:
            shutil.rmtree(path, ignore_errors=True)  # an earlier staging of this process
            os.makedirs(path)
            yield path
        finally:
            with processes.deferred_termination():  # a second SIGTERM must not cut the clean-up short
                shutil.rmtree(path, ignore_errors=True)


def next_serving_version(output):
    """The version a new SavedModel takes in `<output>/serving/`: above every existing one.
    Pick it while holding the output's lock, so no other conversion can take it too."""
    try:
        names = os.listdir(os.path.join(output, SERVING))
    except (FileNotFoundError, NotADirectoryError):
        return 1
    return max((int(n) for n in names if n.isascii() and n.isdigit()), default=0) + 1


def _paths(paths):
    # One path passed where a list was expected would otherwise be read character by character.
    return [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)


def _normalized(written):
    paths = []
    for path in _paths(written):
        path = os.fspath(path)
        norm = posixpath.normpath(path.replace(os.sep, "/"))
        if not path or posixpath.isabs(norm) or norm == "." or norm == ".." or norm.startswith("../"):
            raise ValueError(f"artifacts are relative paths inside the staging folder, got {path!r}")
        if (norm == SERVING or norm.startswith(SERVING + "/")) and not _SERVING_VERSION.fullmatch(norm):
            raise ValueError(f"only whole serving versions ({SERVING}/<integer>) can be published, got {path!r}")
        paths.append(norm)
    for a in paths:
        nested = [b for b in paths if b == a or b.startswith(a + "/")]
        if len(nested) > 1:
            raise ValueError(f"artifact paths repeat or nest: {nested}")
    return paths


def _overlap(a, b):
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def check_output(output, written, *, source_paths=(), overwrite=False, staging=None):
    """Raise OutputError if publishing `written` into `output` would be refused; changes nothing.

    `publish` runs it itself (with `staging`, the folder the paths are staged in); call it before
    a long export as well, to fail early.
    """
    output = os.path.realpath(output)
    written = _normalized(written)
    if os.path.lexists(output) and not os.path.isdir(output):
        raise OutputError(f"{output} exists and is not a folder")
    # Lexical and resolved paths both: a symlinked alias of the source folder is still the source.
    sources = {f(p) for p in _paths(source_paths) for f in (os.path.abspath, os.path.realpath)}
    mine = [
        rel
        for rel in written
        if any(
            _overlap(target, source)
            for source in sources
            for target in {os.path.join(output, rel), os.path.realpath(os.path.join(output, rel))}
        )
    ]
    if mine:
        raise SourceCollision(output, mine)
    blocked = sorted(
        {
            ancestor
            for rel in written
            for ancestor in _ancestors(rel)
            if os.path.lexists(os.path.join(output, ancestor)) and not os.path.isdir(os.path.join(output, ancestor))
        }
    )
    if blocked:
        raise OutputError(f"{output} has files where tfbit needs folders: {', '.join(blocked)}")
    lowest = next_serving_version(output)
    stale = [rel for rel in written if (m := _SERVING_VERSION.fullmatch(rel)) and int(m.group(1)) < lowest]
    if stale:
        raise OutputError(
            f"{', '.join(stale)}: {output} already has serving version {lowest - 1}, and versions "
            "are never replaced or added below it (take next_serving_version under the lock)"
        )
    existing = [rel for rel in written if os.path.lexists(os.path.join(output, rel))]
    # --overwrite never replaces a folder (a user's, which may hold anything) with a file of the
    # same name. Before the export the kinds are the converter's (files, serving versions
    # folders); `publish` checks again with the staged ones.
    if staging is None:
        is_folder = {rel: bool(_SERVING_VERSION.fullmatch(rel)) for rel in existing}
    else:
        is_folder = {rel: _is_folder(os.path.join(staging, rel)) for rel in existing}
    folders = [rel for rel in existing if _is_folder(os.path.join(output, rel)) and not is_folder[rel]]
    if folders:
        raise OutputError(
            f"{output} has folders where tfbit writes files: {', '.join(folders)}; tfbit never "
            "replaces a folder (not even with --overwrite): move them away or choose another --output"
        )
    if existing and not overwrite:
        raise ArtifactCollision(output, existing)


def _ancestors(rel):
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _move(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst) and (_is_folder(dst) or _is_folder(src)):
        # rename() only replaces a file with a file (or an empty folder with a folder): move the old
        # one aside within its folder, put the new one in, then delete the old.
        aside = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tfbit-old-{os.getpid()}")
        if os.path.lexists(aside):
            _remove(aside)
        os.replace(dst, aside)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(aside, dst)
            raise
        _remove(aside)
    else:
        os.replace(src, dst)


def publish(staging, output, written, *, source_paths=(), overwrite=False):
    """Move the artifacts a conversion wrote from `staging` into `output`; return their new paths.

    staging: the folder from `staging_dir(output)`; `OutputLock(output)` must be held.
    written: paths relative to staging, '/'-separated, each a file or a whole folder: e.g.
        config.json, preprocessor_config.json, name.keras, serving/<version>, tflite/name_fp32.tflite,
        report.json. Only these are moved; their parent folders are created in output as needed.
    source_paths: the files of the source checkpoint. A written path that is, or contains, one of
        them is refused (SourceCollision) whatever `overwrite` says.
    overwrite: replace written paths that already exist in output (ArtifactCollision otherwise,
        naming them). Nothing else in output is touched; serving versions are never replaced and
        must be at least next_serving_version(output).
    All checks run before anything moves. Each artifact moves with one os.replace (a folder that
    is replaced is moved aside first and deleted after); report.json moves last.
    """
    processes.raise_if_received()  # a termination request that an ignored exception lost
    output = _locked(output)
    written = _normalized(written)
    missing = [rel for rel in written if not os.path.lexists(os.path.join(staging, rel))]
    if missing:
        raise FileNotFoundError(f"not in the staging folder {staging}: {', '.join(missing)}")
    check_output(output, written, source_paths=source_paths, overwrite=overwrite, staging=staging)
    ordered = sorted(written, key=lambda rel: rel == REPORT)  # stable: the rest keeps its order
    with processes.deferred_termination():  # SIGTERM or Ctrl-C waits for the last rename
        os.makedirs(output, exist_ok=True)
        if REPORT in written and os.path.lexists(os.path.join(output, REPORT)):
            _remove(os.path.join(output, REPORT))
        for rel in ordered:
            try:
                _move(os.path.join(staging, rel), os.path.join(output, rel))
            except OSError as e:
                if e.errno == errno.EXDEV:  # a mount point inside the output
                    raise OutputError(
                        f"cannot rename {rel} into {output}: it is on another filesystem "
                        f"than the staging folder {staging}"
                    ) from e
                raise
    return [os.path.join(output, rel) for rel in written]
