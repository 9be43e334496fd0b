"""Output files: checks that one can be created, made before the work that would write it (not after it), and
writes that replace a file whole or not at all."""
from __future__ import annotations

import errno
import os
from typing import IO, Callable, Optional

__all__ = ["why_not_creatable", "write_replacing", "discard", "os_error_reason", "LockHeld", "lock_exclusive",
           "release_removing", "sibling_lock_path"]


def why_not_creatable(path: str) -> Optional[str]:
    """Why ``path`` (not yet there) cannot be created, or None: its nearest existing ancestor must be a folder this
    user may write in. Read-only: nothing is created."""
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"the folder {probe!r} is read-only or not this user's"
    return None


def write_replacing(path: str, write: Callable[[IO], None], what: str, binary: bool = False,
                    tmp: Optional[str] = None, **open_kw) -> None:
    """Write ``path`` through a temporary file beside it + os.replace: a reader never sees half a file, and a
    failed write (disk full, a file size limit) removes the temporary file, leaves an earlier ``path`` as it was
    and is an OSError naming ``path``, ``what`` it is and what is intact. ``tmp``: the temporary file's name
    (default ``path.tmp.<pid>``)."""
    tmp = tmp or f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **open_kw) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        discard(tmp)
        kept = "the earlier file is unchanged" if os.path.isfile(path) else "nothing was written there"
        raise OSError(e.errno, f"{what}: could not write it ({os_error_reason(e)}); {kept}", path) from None
    except BaseException:  # a writer's own error (matplotlib without LaTeX for .pgf), Ctrl-C
        discard(tmp)
        raise


def discard(path: str) -> None:
    """Remove ``path`` if it is there (a temporary file after a failed write); never raises."""
    try:
        os.remove(path)
    except OSError:
        pass


def os_error_reason(e: OSError) -> str:
    """"disk full" for ENOSPC / EDQUOT, else the system's words."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "disk full"
    return e.strerror or str(e)


def remove_dead_temporaries(*prefixes: str) -> None:
    """``PREFIX<pid>`` files or folders (``OUT.tmp-<pid>``) left by a process that was killed (SIGKILL, power
    loss) are removed once that process is gone; a live process's temporary is left alone."""
    import glob
    import shutil

    for prefix in prefixes:
        for path in glob.glob(glob.escape(prefix) + "*"):
            try:
                os.kill(int(path[len(prefix):]), 0)
            except ProcessLookupError:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    discard(path)
            except (ValueError, PermissionError, OverflowError):  # not our naming, or another user's live process
                pass


class LockHeld(Exception):
    """Another process holds the lock (its path is the message)."""


def lock_exclusive(path: str, wait: bool = False) -> IO:
    """An exclusive lock on ``path`` (created if missing), held while the returned file stays open and released
    by the OS when the process ends, however it ends (kill -9 included: no stale lock to remove by hand).
    Raises :class:`LockHeld` when another process holds it (``wait``: blocks until it is free instead), and the
    OSError of a file that cannot be opened or a file system that takes no locks.

    A POSIX record lock (``lockf``), not ``flock``: an flock belongs to the open file, which forked children
    share, so DataLoader or writer workers kept it held for seconds after their parent was killed with -9, and a
    command started again at once was refused. A POSIX lock belongs to the process alone."""
    import fcntl

    while True:
        fh = open(path, "a")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            fh.close()
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise LockHeld(path) from None
            raise
        # the file may have been removed (release_removing) while this process waited for it: a lock on a
        # removed file guards nothing, so take the one now at ``path``
        mine = os.fstat(fh.fileno())
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fh
        fh.close()


def release_removing(fh: IO) -> None:
    """Releases a :func:`lock_exclusive` lock and removes its file (a lock beside an output, not inside it):
    removed while still held, so a process that waits on it finds it gone and locks a new one, never this one
    after a newcomer created another."""
    discard(fh.name)
    fh.close()


def sibling_lock_path(path: str) -> str:
    """``DIR/.NAME.lock`` for an output ``DIR/NAME`` that is replaced whole (a .beton, a data folder): the lock
    cannot live inside what it guards, and a hidden name keeps listings of DIR clean. Removed when released
    (:func:`release_removing`); one left by a killed process is harmless (the next command takes it)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.lock")
