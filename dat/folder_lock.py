"""One process at a time per output folder: a run directory, or an evaluation's ``out_dir``.

Two trainings in one run directory interleave their checkpoints and metrics, and two
evaluations in one folder overwrite each other's ``progress.json`` (the last writer wins).
An exclusive ``flock`` on ``FOLDER/.lock`` refuses the second process in one line. The
kernel drops the lock when its holder exits, so a crash or ``kill -9`` leaves nothing
stale to clean up. Within one process the lock is shared (a notebook may resume the run
it built), forked children (DataLoader workers) drop their copy, and where ``fcntl`` does
not exist (Windows) nothing is locked. On NFS the lock holds across machines only where
the mount supports locks (not with ``nolock``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through this module
    fcntl = None

__all__ = ["FolderInUse", "LOCK_NAME", "acquire", "check_free", "hold_folder", "key_of", "release"]

LOCK_NAME = ".lock"
_held: dict[str, list[int]] = {}  # resolved folder -> [file descriptor, holders in this process]


def _forget_in_child() -> None:
    """A forked child (DataLoader worker, multiprocessing) drops its copies of the locked
    descriptors: the lock stays the parent's alone, and ends with the parent."""
    for fd, _ in _held.values():
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class FolderInUse(ValueError):
    """Another process holds the folder: its run or evaluation is still going."""


def _owner() -> str:
    command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command or 'python'}")


def _in_use(folder: Path | str, fix: str) -> FolderInUse:
    """The refusal, naming the holder as its lock file records it."""
    owner = "owner unknown"
    with contextlib.suppress(OSError):
        owner = (Path(folder) / LOCK_NAME).read_text(errors="replace").strip() or owner
    return FolderInUse(f"{folder} is in use by another process ({owner}); {fix}")


def key_of(folder: Path | str) -> str:
    """The key :func:`acquire` returns for ``folder``."""
    return str(Path(folder).resolve())


def acquire(folder: Path | str, fix: str) -> str:
    """Lock ``folder`` (created if missing) for this process; the key for :func:`release`.

    Raises :class:`FolderInUse`, whose message names the holder and ends with ``fix``,
    when another process holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = key_of(folder)
    if key in _held:
        _held[key][1] += 1
        return key
    if fcntl is None:
        _held[key] = [-1, 1]
        return key
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(folder, fix) from None
    except OSError as err:  # a file system without locks: run unlocked rather than not at all
        os.close(fd)
        print(f"note: cannot lock {folder} ({err.strerror or err}); nothing stops a second "
              "process from writing there", file=sys.stderr)
        _held[key] = [-1, 1]
        return key
    os.ftruncate(fd, 0)
    os.write(fd, (_owner() + "\n").encode())
    _held[key] = [fd, 1]
    return key


def check_free(folder: Path | str, fix: str) -> None:
    """Raise :class:`FolderInUse` now if another process holds ``folder``; creates nothing
    (a run refused later for another reason leaves no folder behind)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None or key_of(folder) in _held or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, fix) from None
    except OSError:
        pass
    finally:
        os.close(fd)


def release(key: str) -> None:
    """Drop one hold taken by :func:`acquire`; the last one unlocks the folder."""
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    if entry[0] >= 0:
        os.close(entry[0])  # closing the descriptor releases the flock


@contextlib.contextmanager
def hold_folder(folder: Path | str, fix: str) -> Iterator[Path]:
    """``with hold_folder(out, fix):`` hold ``out`` for the block (see :func:`acquire`)."""
    key = acquire(folder, fix)
    try:
        yield Path(folder)
    finally:
        release(key)
